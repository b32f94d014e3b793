# -*- test-case-name: tests.test_destination_machine -*-
"""
Tests for L{twisted_postcopy.destination.machine}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.destination.machine import IncomingMachine, PostcopyState as P
from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.state import MigrationStatus as S


def _active() -> IncomingMachine:
    """
    @return: a machine that has started loading.
    """
    machine = IncomingMachine()
    machine.setup()
    machine.loadingStarted()
    return machine


class IncomingMachineTests(SynchronousTestCase):
    """
    Postcopy commands are accepted only in the states QEMU 7.2 accepts them.
    """

    def test_postcopySequence(self) -> None:
        """
        ADVISE, DISCARD, DISCARD, LISTEN, RUN, then completion walks
        advise, discard, listening, running, end; LISTEN makes the status
        postcopy-active.
        """
        machine = _active()
        machine.advise()
        self.assertEqual(machine.postcopy, P.ADVISE)
        machine.discard()
        machine.discard()
        self.assertEqual(machine.postcopy, P.DISCARD)
        self.assertFalse(machine.inPostcopy)
        machine.listen()
        self.assertEqual(machine.status.status, S.POSTCOPY_ACTIVE)
        self.assertTrue(machine.inPostcopy)
        machine.run()
        machine.complete()
        self.assertEqual((machine.postcopy, machine.status.status), (P.END, S.COMPLETED))

    def test_listenWithoutDiscard(self) -> None:
        """
        LISTEN straight after ADVISE is legal.
        """
        machine = _active()
        machine.advise()
        machine.listen()
        self.assertEqual(machine.postcopy, P.LISTENING)

    def test_outOfOrder(self) -> None:
        """
        DISCARD before ADVISE, a second ADVISE, RUN before LISTEN, DISCARD
        after LISTEN and LISTEN without ADVISE are load errors.
        """
        machine = _active()
        self.assertRaises(RemoteProtocolError, machine.discard)
        self.assertRaises(RemoteProtocolError, machine.listen)
        machine.advise()
        self.assertRaises(RemoteProtocolError, machine.advise)
        self.assertRaises(RemoteProtocolError, machine.run)
        machine.listen()
        self.assertRaises(RemoteProtocolError, machine.discard)

    def test_returnPath(self) -> None:
        """
        PING needs OPEN_RETURN_PATH first; a second OPEN_RETURN_PATH is
        reported but harmless.
        """
        machine = _active()
        self.assertRaises(RemoteProtocolError, machine.ping)
        self.assertTrue(machine.openReturnPath())
        self.assertFalse(machine.openReturnPath())
        machine.ping()

    def test_precopyCompletion(self) -> None:
        """
        A precopy completion leaves the postcopy state at none; a failure
        after completion changes nothing.
        """
        machine = _active()
        machine.complete()
        machine.fail()
        self.assertEqual((machine.postcopy, machine.status.status), (P.NONE, S.COMPLETED))
