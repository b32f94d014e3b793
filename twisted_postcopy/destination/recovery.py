# -*- test-case-name: tests.test_recovery_destination -*-
"""
Postcopy pause and recovery on the destination (return-path-preempt-recovery.md
sections 4.2-4.5): QEMU 7.2's C{postcopy_pause_incoming},
C{loadvm_handle_recv_bitmap} and C{loadvm_postcopy_handle_resume}, without
sockets.

While postcopy is RUNNING any main-channel failure pauses the incoming
migration: faulting guest threads keep waiting, the userfaultfds stay open,
page requests are held.  On a new connection the status is
C{postcopy-recover}; each RECV_BITMAP command is answered with the block's
received bitmap and POSTCOPY_RESUME with RESUME_ACK(1), after which every
page still awaited is requested again (REQ_PAGES_ID first) by the fault
service (L{twisted_postcopy.interfaces.IFaultService.rerequestPending}),
which owns the received and wanted pages.  Recovery replaces the incoming
migration's main channel (C{IncomingMigration.attachChannel}); the
return path's bytes still come from the one engine.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.logger import Logger

from twisted_postcopy.destination.machine import PostcopyState
from twisted_postcopy.errors import MigrationError, RemoteProtocolError
from twisted_postcopy.state import PAUSABLE, PAUSED_MESSAGE, MigrationStatus as S

log = Logger()


def pauseIncoming(incoming: Any, reason: object) -> None:
    """
    QEMU's C{postcopy_pause_incoming}: status C{postcopy-paused}, the lost
    main channel detached (its status observers removed; page requests
    are held until a recovery), the preempt channel dropped (a new one
    comes with the new main connection).

    @param incoming: the incoming migration.
    @param reason: why (logged).
    """
    log.warn("{message} ({reason})", message=PAUSED_MESSAGE, reason=reason)
    channel = incoming.channel
    observers = incoming.machine.status.observers
    for observer in list(observers):
        if channel is not None and getattr(observer, "__self__", None) is channel:
            observers.remove(observer)
    incoming.detachChannel()
    incoming.machine.channelsLost()
    placer = getattr(incoming, "placer", None)
    if placer is not None:
        placer.resetTempPages()
    incoming.machine.status.moveTo(S.POSTCOPY_PAUSED)


def pausable(machine: Any) -> bool:
    """
    @param machine: an incoming migration's
        L{twisted_postcopy.destination.machine.IncomingMachine}.
    @return: whether an I/O failure pauses it (postcopy is RUNNING and the
        status is C{postcopy-active} or C{postcopy-recover}) rather than
        failing it.
    """
    return machine.status.status in PAUSABLE and machine.postcopy == PostcopyState.RUNNING


def channelLost(incoming: Any, protocol: Any, reason: object) -> bool:
    """
    A main connection of an incoming migration failed or closed: pause
    while postcopy is RUNNING.

    @param incoming: the incoming migration.
    @param protocol: the connection's protocol.
    @param reason: why.
    @return: L{True} when handled here (a replaced connection, or the
        migration paused), L{False} when the migration must fail.
    """
    if incoming.machine.status.status == S.POSTCOPY_PAUSED:
        return True
    if not pausable(incoming.machine):
        return False
    if incoming.channel is not protocol:
        return True
    pauseIncoming(incoming, reason)
    return True


def checkRecover(incoming: Any) -> None:
    """
    C{migrate-recover}: only while paused.

    @param incoming: the incoming migration, or L{None}.
    @raise MigrationError: QEMU's text otherwise.
    """
    if incoming is None or incoming.machine.status.status != S.POSTCOPY_PAUSED:
        raise MigrationError("Migrate recover can only be run when postcopy is paused.")


@define
class DestinationResume:
    """
    The destination's side of one recovery handshake.

    @ivar incoming: the paused incoming migration.
    @ivar channel: the new main connection's protocol.
    """

    incoming: Any
    channel: Any

    def start(self) -> None:
        """
        The new main connection is up: C{postcopy-recover}; replies go to
        it, page requests stay held.
        """
        self.incoming.attachChannel(self.channel)
        self.incoming.machine.status.moveTo(S.POSTCOPY_RECOVER)

    def recvBitmap(self, idstr: str) -> None:
        """
        RECV_BITMAP: answer with the block's received bitmap.

        @param idstr: the block.
        @raise RemoteProtocolError: an unknown block (QEMU's text).
        """
        incoming = self.incoming
        if incoming.machine.status.status != S.POSTCOPY_RECOVER:
            log.warn("MSG_RP_RECV_BITMAP only used for recovery")
            return
        faults = incoming.faults
        if idstr not in faults.blocks:
            raise RemoteProtocolError(f"RECV_BITMAP: block '{idstr}' not found")
        incoming.send(incoming.encoder.recvBitmap(idstr, faults.receivedBitmap(idstr)))

    def resume(self) -> None:
        """
        POSTCOPY_RESUME: RESUME_ACK(1), C{postcopy-active}, and every
        awaited page requested again (REQ_PAGES_ID first).
        """
        incoming = self.incoming
        if incoming.machine.status.status != S.POSTCOPY_RECOVER:
            log.warn("illegal resume received")
            return
        incoming.encoder.reset()
        incoming.send(incoming.encoder.resumeAck())
        incoming.machine.status.moveTo(S.POSTCOPY_ACTIVE)
        incoming.faults.rerequestPending()
