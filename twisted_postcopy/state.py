# -*- test-case-name: tests.test_source_machine -*-
"""
The vocabulary both migration sides share: QEMU's C{MigrationStatus}, the
explicit state machine a migration side moves through, the sets of
statuses, and QEMU's message when postcopy pauses.  C{source/} and
C{destination/} import it from here and never from each other.

The statuses and the edges between them follow QEMU 7.2
(C{migration/migration.c}): a source goes C{setup -> active ->
[postcopy-active ->] completed}, C{cancelling -> cancelled} on
C{migrate-cancel}, C{failed} on error, and C{postcopy-paused <->
postcopy-recover} during recovery.  The destination uses the same statuses
with its own edge table (L{INCOMING_TRANSITIONS}).  Any other move raises
L{IllegalTransitionError}.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Mapping

from attrs import Factory, define, field

from twisted_postcopy.errors import IllegalTransitionError


class MigrationStatus(Enum):
    """
    QEMU's C{MigrationStatus}; the value is the QMP spelling.
    """

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"


S = MigrationStatus

#: Statuses in which no migration is in progress.
FINISHED = frozenset({S.NONE, S.COMPLETED, S.FAILED, S.CANCELLED})

#: Statuses in which the source guest no longer runs on the source.
POSTCOPY = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER})

#: Statuses in which a lost connection pauses instead of failing.
PAUSABLE = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER})

#: QEMU's log line when a postcopy migration pauses.
PAUSED_MESSAGE = "Detected IO failure for postcopy. Migration paused."

_RESTART = {S.SETUP}

#: Legal moves of an outgoing migration (QEMU's source side).
OUTGOING_TRANSITIONS: Mapping[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset(_RESTART),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset({S.POSTCOPY_ACTIVE, S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_PAUSED, S.CANCELLING}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.COMPLETED: frozenset(_RESTART),
    S.FAILED: frozenset(_RESTART),
    S.CANCELLED: frozenset(_RESTART),
}

#: Legal moves of an incoming migration (QEMU's destination side).
INCOMING_TRANSITIONS: Mapping[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP, S.ACTIVE}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED}),
    S.ACTIVE: frozenset({S.POSTCOPY_ACTIVE, S.COMPLETED, S.FAILED}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER, S.FAILED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.CANCELLING: frozenset(),
}


@define
class StatusMachine:
    """
    The C{MigrationStatus} of one migration side, with its legal moves.

    @ivar transitions: the edge table (L{OUTGOING_TRANSITIONS} or
        L{INCOMING_TRANSITIONS}).
    @ivar status: the current status.
    @ivar history: every status entered, in order (the first is C{none}).
    @ivar observers: callables called with each new status after it is
        entered.
    """

    transitions: Mapping[MigrationStatus, frozenset[MigrationStatus]] = OUTGOING_TRANSITIONS
    status: MigrationStatus = S.NONE
    history: list[MigrationStatus] = field(default=Factory(lambda: [S.NONE]))
    observers: list[Callable[[MigrationStatus], object]] = Factory(list)

    def canMoveTo(self, new: MigrationStatus) -> bool:
        """
        @param new: a status.
        @return: whether moving from the current status to C{new} is legal.
        """
        return new in self.transitions[self.status]

    def moveTo(self, new: MigrationStatus) -> None:
        """
        Enter C{new} and tell the observers.

        @param new: the status to enter.
        @raise IllegalTransitionError: QEMU's model has no such edge.
        """
        if not self.canMoveTo(new):
            raise IllegalTransitionError(
                f"illegal migration status transition {self.status.value} -> {new.value}"
            )
        self.status = new
        self.history.append(new)
        for observer in list(self.observers):
            observer(new)

    def moveIfPossible(self, new: MigrationStatus) -> bool:
        """
        Enter C{new} if that is legal, as QEMU's C{migrate_set_state} does
        with its compare-and-swap.

        @param new: the status to enter.
        @return: whether the status changed.
        """
        if not self.canMoveTo(new):
            return False
        self.moveTo(new)
        return True

    @property
    def inProgress(self) -> bool:
        """
        Whether a migration is running (QEMU's C{migration_is_running}).
        """
        return self.status not in FINISHED


def outgoingMachine() -> StatusMachine:
    """
    @return: a fresh source-side L{StatusMachine} in C{none}.
    """
    return StatusMachine(OUTGOING_TRANSITIONS)


def incomingMachine() -> StatusMachine:
    """
    @return: a fresh destination-side L{StatusMachine} in C{none}.
    """
    return StatusMachine(INCOMING_TRANSITIONS)
