# -*- test-case-name: tests.test_source_machine -*-
"""
Tests for L{twisted_postcopy.source.machine}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import IllegalTransitionError
from twisted_postcopy.state import (
    MigrationStatus as S,
    incomingMachine,
    outgoingMachine,
)


class OutgoingMachineTests(SynchronousTestCase):
    """
    The source side's status machine follows QEMU's edges.
    """

    def test_postcopyPath(self) -> None:
        """
        setup, active, postcopy-active, completed is legal and recorded, and
        observers see each status.
        """
        machine = outgoingMachine()
        seen: list[S] = []
        machine.observers.append(seen.append)
        for status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.COMPLETED):
            machine.moveTo(status)
        self.assertEqual(seen, [S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.COMPLETED])
        self.assertEqual(machine.history[0], S.NONE)
        self.assertFalse(machine.inProgress)

    def test_illegal(self) -> None:
        """
        Skipping from none to active, or leaving completed except for a new
        setup, raises L{IllegalTransitionError} and keeps the status.
        """
        machine = outgoingMachine()
        self.assertRaises(IllegalTransitionError, machine.moveTo, S.ACTIVE)
        self.assertEqual(machine.status, S.NONE)
        machine.moveTo(S.SETUP)
        machine.moveTo(S.ACTIVE)
        machine.moveTo(S.COMPLETED)
        self.assertRaises(IllegalTransitionError, machine.moveTo, S.FAILED)
        machine.moveTo(S.SETUP)
        self.assertTrue(machine.inProgress)

    def test_cancelAndRecovery(self) -> None:
        """
        cancelling leads to cancelled; postcopy-paused and postcopy-recover
        are connected both ways to postcopy-active.
        """
        machine = outgoingMachine()
        for status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
                       S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.CANCELLING, S.CANCELLED):
            machine.moveTo(status)
        self.assertEqual(machine.status, S.CANCELLED)

    def test_moveIfPossible(self) -> None:
        """
        L{StatusMachine.moveIfPossible} returns C{False} instead of raising.
        """
        machine = outgoingMachine()
        self.assertFalse(machine.moveIfPossible(S.COMPLETED))
        self.assertTrue(machine.moveIfPossible(S.SETUP))


class IncomingMachineTests(SynchronousTestCase):
    """
    The destination side's status machine.
    """

    def test_noCancelOnDestination(self) -> None:
        """
        A destination never enters cancelling, and never leaves completed.
        """
        machine = incomingMachine()
        machine.moveTo(S.SETUP)
        machine.moveTo(S.ACTIVE)
        self.assertRaises(IllegalTransitionError, machine.moveTo, S.CANCELLING)
        machine.moveTo(S.COMPLETED)
        self.assertRaises(IllegalTransitionError, machine.moveTo, S.SETUP)
