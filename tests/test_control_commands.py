# -*- test-case-name: tests.test_control_commands -*-
"""
Tests for L{twisted_postcopy.control.commands}.
"""

from __future__ import annotations

from twisted.protocols.amp import Command
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import errors
from twisted_postcopy.control import commands


class JSONTests(SynchronousTestCase):
    """
    Tests for L{commands.JSON}.
    """

    def test_roundTrip(self) -> None:
        """
        A nested QMP-shaped value survives encoding and decoding.
        """
        argument = commands.JSON()
        value = {"status": "completed", "ram": {"transferred": 1 << 40}, "x": [1.5, None]}
        self.assertEqual(argument.fromString(argument.toString(value)), value)

    def test_compact(self) -> None:
        """
        The encoding is compact, ASCII-only JSON, keeping the key order (QMP's
        order: C{status} first).
        """
        self.assertEqual(commands.JSON().toString({"b": 1, "a": "é"}), b'{"b":1,"a":"\\u00e9"}')


class ErrorsMapTests(SynchronousTestCase):
    """
    Tests for L{commands.MIGRATION_ERRORS} and its use by every command.
    """

    def test_subclassesFirst(self) -> None:
        """
        No error class follows one of its base classes, since AMP maps an
        exception to the first matching class.
        """
        seen: list[type] = []
        for cls in commands.MIGRATION_ERRORS:
            for earlier in seen:
                self.assertFalse(issubclass(cls, earlier), f"{cls} after {earlier}")
            seen.append(cls)

    def test_uniqueCodes(self) -> None:
        """
        Every error class has its own wire code.
        """
        codes = list(commands.MIGRATION_ERRORS.values())
        self.assertEqual(len(codes), len(set(codes)))

    def test_everyCommandDeclaresErrors(self) -> None:
        """
        Every migration command in the module maps every migration error;
        every snapshot command (C{snapshot-*}, C{query-snapshot}) maps
        L{commands.SNAPSHOT_ERRORS}, which holds them too.
        """
        found = [
            value
            for value in vars(commands).values()
            if isinstance(value, type) and issubclass(value, Command) and value is not Command
        ]
        snapshot = [c for c in found if "Snapshot" in c.__name__]
        self.assertEqual((len(found), len(snapshot)), (24, 6))
        for command in found:
            expected = commands.SNAPSHOT_ERRORS if command in snapshot else commands.MIGRATION_ERRORS
            self.assertEqual(dict(command.errors), expected, command)
        self.assertLessEqual(commands.MIGRATION_ERRORS.items(), commands.SNAPSHOT_ERRORS.items())

    def test_snapshotErrorsOrder(self) -> None:
        """
        In L{commands.SNAPSHOT_ERRORS} no class comes after one of its
        bases, codes are unique, and L{errors.PostcopyError} is last.
        """
        classes = list(commands.SNAPSHOT_ERRORS)
        for i, cls in enumerate(classes):
            for later in classes[i + 1:]:
                self.assertFalse(issubclass(later, cls), (later, cls))
        codes = list(commands.SNAPSHOT_ERRORS.values())
        self.assertEqual(len(codes), len(set(codes)))
        self.assertIs(classes[-1], errors.PostcopyError)

    def test_migrationErrorRoot(self) -> None:
        """
        The root L{errors.PostcopyError} is mapped last, as a catch-all.
        """
        self.assertIs(list(commands.MIGRATION_ERRORS)[-1], errors.PostcopyError)
