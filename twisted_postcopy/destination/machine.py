# -*- test-case-name: tests.test_destination_machine -*-
"""
The destination's two state machines: QEMU's C{PostcopyState}
(C{migration/postcopy-ram.h}) and the incoming C{MigrationStatus}.

L{IncomingMachine} checks every postcopy command against the state QEMU
7.2 accepts it in (C{loadvm_postcopy_handle_*}, migration-stream.md 4.5 and
6.1) and moves both machines together: LISTEN makes the status
C{postcopy-active}; the end of the listen phase makes it C{completed}.
"""

from __future__ import annotations

from enum import Enum

from attrs import Factory, define

from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.state import MigrationStatus, StatusMachine, incomingMachine


class PostcopyState(Enum):
    """
    QEMU's C{PostcopyState}; the value is QEMU's number.
    """

    NONE = 0
    ADVISE = 1
    DISCARD = 2
    LISTENING = 3
    RUNNING = 4
    END = 5


P = PostcopyState


class PreemptChannelState(Enum):
    """
    The destination's preempt channel (capability C{postcopy-preempt}),
    as QEMU 7.2's C{postcopy_prio_thread_created} and its preempt thread
    see it: the listen phase ends only once the channel's EOS was loaded
    (C{postcopy_ram_incoming_cleanup} joins that thread before the status
    becomes C{completed}).

    @cvar NONE: no channel (the capability is off, or none was accepted
        yet, or the last one was dropped by a pause).
    @cvar OPEN: a channel is accepted and its EOS has not arrived.
    @cvar ENDED: its EOS arrived and every page before it was placed.
    """

    NONE = 0
    OPEN = 1
    ENDED = 2

#: For each postcopy command, the states QEMU accepts it in.
_ALLOWED = {
    "ADVISE": frozenset({P.NONE}),
    "DISCARD": frozenset({P.ADVISE, P.DISCARD}),
    "LISTEN": frozenset({P.ADVISE, P.DISCARD}),
    "RUN": frozenset({P.LISTENING}),
}


@define
class IncomingMachine:
    """
    The destination's C{PostcopyState} and C{MigrationStatus}.

    @ivar postcopy: the current L{PostcopyState}.
    @ivar status: the incoming L{StatusMachine}.
    @ivar returnPathOpen: whether OPEN_RETURN_PATH was processed.
    @ivar preemptEnabled: the destination's C{postcopy-preempt}
        capability: a postcopy migration completes only after the preempt
        channel's EOS.
    @ivar preempt: the preempt channel's L{PreemptChannelState}.
    @ivar mainEnded: whether the main channel's EOF was loaded (in
        postcopy the migration then waits for the preempt channel's EOS,
        see L{readyToComplete}).
    """

    postcopy: PostcopyState = P.NONE
    status: StatusMachine = Factory(incomingMachine)
    returnPathOpen: bool = False
    preemptEnabled: bool = False
    preempt: PreemptChannelState = PreemptChannelState.NONE
    mainEnded: bool = False

    def _check(self, command: str) -> None:
        """
        Refuse a postcopy command outside the states QEMU accepts it in.

        @param command: C{ADVISE}, C{DISCARD}, C{LISTEN} or C{RUN}.
        @raise RemoteProtocolError: the source sent it out of order.
        """
        if self.postcopy not in _ALLOWED[command]:
            raise RemoteProtocolError(
                f"postcopy {command} received in wrong postcopy state ({self.postcopy.name})"
            )

    def setup(self) -> None:
        """
        C{migrate-incoming} was called: status C{setup}.
        """
        self.status.moveTo(MigrationStatus.SETUP)

    def loadingStarted(self) -> None:
        """
        The source connected and loading began: status C{active}.
        """
        self.status.moveTo(MigrationStatus.ACTIVE)

    def openReturnPath(self) -> bool:
        """
        OPEN_RETURN_PATH.  A second one is only logged by QEMU.

        @return: whether this opened the return path (C{False} when it was
            already open).
        """
        if self.returnPathOpen:
            return False
        self.returnPathOpen = True
        return True

    def ping(self) -> None:
        """
        A PING arrived.

        @raise RemoteProtocolError: no return path to answer on.
        """
        if not self.returnPathOpen:
            raise RemoteProtocolError("CMD_PING received with no return path")

    def advise(self) -> None:
        """
        POSTCOPY_ADVISE: state C{advise}.

        @raise RemoteProtocolError: not in state C{none}.
        """
        self._check("ADVISE")
        self.postcopy = P.ADVISE

    def discard(self) -> None:
        """
        POSTCOPY_RAM_DISCARD: state C{discard}.

        @raise RemoteProtocolError: not in C{advise} or C{discard}.
        """
        self._check("DISCARD")
        self.postcopy = P.DISCARD

    def listen(self) -> None:
        """
        POSTCOPY_LISTEN: state C{listening}, status C{postcopy-active}.

        @raise RemoteProtocolError: not in C{advise} or C{discard}.
        """
        self._check("LISTEN")
        self.postcopy = P.LISTENING
        self.status.moveTo(MigrationStatus.POSTCOPY_ACTIVE)

    def run(self) -> None:
        """
        POSTCOPY_RUN: state C{running}.

        @raise RemoteProtocolError: not in C{listening}.
        """
        self._check("RUN")
        self.postcopy = P.RUNNING

    @property
    def inPostcopy(self) -> bool:
        """
        Whether pages now go in through userfaultfd (LISTEN was processed).
        """
        return self.postcopy in (P.LISTENING, P.RUNNING, P.END)

    def preemptOpened(self) -> None:
        """
        A preempt channel was accepted (the first, or a new one after a
        recovery): its EOS is now awaited.
        """
        self.preempt = PreemptChannelState.OPEN

    def preemptEnded(self) -> None:
        """
        The preempt channel's EOS was loaded.
        """
        self.preempt = PreemptChannelState.ENDED

    def preemptDropped(self) -> None:
        """
        The preempt channel is gone without its EOS (a pause dropped it): a
        new one is awaited.
        """
        if self.preempt is PreemptChannelState.OPEN:
            self.preempt = PreemptChannelState.NONE

    def channelsLost(self) -> None:
        """
        A pause dropped the connections: the preempt channel is awaited
        anew (L{preemptDropped}), and so is the main stream's end (a
        recovered source sends the rest and ends its new main channel).
        """
        self.preemptDropped()
        self.mainEnded = False

    def mainEOF(self) -> None:
        """
        The main channel's EOF was loaded.
        """
        self.mainEnded = True

    @property
    def readyToComplete(self) -> bool:
        """
        Whether the listen phase may end: the main stream ended and, in
        postcopy with C{postcopy-preempt}, the preempt channel's EOS
        arrived (QEMU joins its preempt thread first).  A precopy
        migration never waits for the preempt channel (a QEMU 7.2 source
        closes it unused).
        """
        if not self.mainEnded:
            return False
        if not (self.preemptEnabled and self.inPostcopy):
            return True
        return self.preempt is PreemptChannelState.ENDED

    def complete(self) -> None:
        """
        Every page arrived (EOF, and the package was loaded): postcopy state
        C{end} if postcopy ran, status C{completed}.
        """
        if self.inPostcopy:
            self.postcopy = P.END
        self.status.moveTo(MigrationStatus.COMPLETED)

    def fail(self) -> None:
        """
        Loading failed: status C{failed}, unless it already ended.
        """
        self.status.moveIfPossible(MigrationStatus.FAILED)
