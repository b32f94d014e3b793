# -*- test-case-name: tests.test_snapshot_mapping -*-
"""
Tests for L{twisted_postcopy.snapshot.mapping}: block files mapped
read-only with their holes backed by zero pages.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.snapshot.mapping import BlockMapping

PAGE = 4096


class BlockMappingTests(SynchronousTestCase):
    """
    L{BlockMapping}.
    """

    def mapped(self, pages: dict[int, bytes], length: int) -> BlockMapping:
        """
        @param pages: offset -> bytes written into a sparse file.
        @param length: the file length.
        @return: its mapping (closed at cleanup).
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(length)
            for offset, data in pages.items():
                f.seek(offset)
                f.write(data)
        mapping = BlockMapping(path, length)
        self.addCleanup(mapping.close)
        return mapping

    def test_contents(self) -> None:
        """
        Data pages read from the file, holes (at the start, between and
        at the end) read as zeros, and only the data is counted.
        """
        length = 64 * PAGE
        pages = {3 * PAGE: b"a" * PAGE, 10 * PAGE: b"b" * 2 * PAGE}
        mapping = self.mapped(pages, length)
        expected = bytearray(length)
        for offset, data in pages.items():
            expected[offset : offset + len(data)] = data
        self.assertEqual(mapping.view().tobytes(), bytes(expected))
        self.assertEqual(mapping.dataBytes, 3 * PAGE)

    def test_hugeAligned(self) -> None:
        """
        The mapping starts at a 2 MiB boundary (so 2 MiB holes can read as
        the huge zero page), and a hole spanning huge pages reads as zeros
        around data in the middle of one.
        """
        length = 8 << 20
        mapping = self.mapped({(5 << 20) + PAGE: b"d" * PAGE}, length)
        self.assertEqual(mapping.address % (2 << 20), 0)
        view = mapping.view()
        self.assertEqual(view[: 5 << 20].tobytes(), bytes(5 << 20))
        self.assertEqual(view[(5 << 20) + PAGE : (5 << 20) + 2 * PAGE].tobytes(), b"d" * PAGE)
        self.assertEqual(view[(5 << 20) + 2 * PAGE :].tobytes(), bytes(length - (5 << 20) - 2 * PAGE))

    def test_allHole(self) -> None:
        """
        A file without data maps as zeros.
        """
        self.assertEqual(self.mapped({}, 8 * PAGE).view().tobytes(), bytes(8 * PAGE))

    def test_readOnlyBytes(self) -> None:
        """
        The view is read-only, of unsigned bytes (indexing gives ints).
        """
        view = self.mapped({0: b"\x07" * PAGE}, PAGE).view()
        self.assertTrue(view.readonly)
        self.assertEqual(view[0], 7)

    def test_closed(self) -> None:
        """
        A closed mapping gives no view; closing twice is harmless.
        """
        mapping = self.mapped({}, PAGE)
        mapping.close()
        mapping.close()
        self.assertRaises(ValueError, mapping.view)

    def test_missingFile(self) -> None:
        """
        A missing file is an L{OSError}.
        """
        self.assertRaises(OSError, BlockMapping, os.path.join(self.mktemp(), "none"), PAGE)
