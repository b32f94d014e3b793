"""
Tests for L{twisted_postcopy.testing.qmpshapes.shape}, the JSON shape the
QMP interoperability tests compare.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.qmpshapes import shape


class ShapeTests(SynchronousTestCase):
    """
    L{shape} names JSON types and keeps structure.
    """

    def test_scalarsAndStructure(self) -> None:
        """
        Objects keep their keys, arrays the union of their shapes, scalars
        become their JSON type names.
        """
        self.assertEqual(shape({"b": [1, 2, "x"], "a": {"c": True, "d": None, "e": 1.5}}),
                         {"a": {"c": "boolean", "d": "null", "e": "number"}, "b": ["integer", "string"]})

    def test_qapiNumberWhole(self) -> None:
        """
        A QAPI C{number} member such as C{mbps} is C{number} whether QEMU
        printed a whole value (JSON integer) or a fraction; other integer
        members stay C{integer}, and a boolean is not a number.
        """
        self.assertEqual(shape({"mbps": 0, "total": 3}), {"mbps": "number", "total": "integer"})
        self.assertEqual(shape({"mbps": 268.4}), {"mbps": "number"})
        self.assertEqual(shape({"mbps": True}), {"mbps": "boolean"})
