# -*- test-case-name: tests.test_recovery_source -*-
"""
Postcopy pause and recovery on the source (return-path-preempt-recovery.md
sections 4.2-4.6): QEMU 7.2's C{postcopy_pause}, C{ram_resume_prepare} and
C{migrate_handle_rp_recv_bitmap}, without sockets.

While C{postcopy-active} (or C{postcopy-recover}) a lost main connection
pauses the outgoing migration instead of failing it: the guest stays
stopped here and nothing is lost.  L{SourceResume} then runs the
handshake on a new connection: a C{RECV_BITMAP} command per block in list
order, each reply turns into the dirty map (dirty := NOT received), then
C{POSTCOPY_RESUME}; C{RESUME_ACK(1)} returns to C{postcopy-active} and the
scan restarts from the start of RAM.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define, field
from twisted.logger import Logger

from twisted_postcopy.errors import BitmapError, MigrationError, RemoteProtocolError
from twisted_postcopy.ram.bitmap import bitmapSize, dirtyFromReceived
from twisted_postcopy.state import PAUSABLE, PAUSED_MESSAGE, MigrationStatus as S
from twisted_postcopy.wire import StreamEncoder
from twisted_postcopy.source.outgoing import SourcePhase

__all__ = ["PAUSABLE", "PAUSED_MESSAGE", "SourceResume", "bitmapSize", "channelLost", "checkResume",
           "dirtyFromReceived", "pauseOutgoing"]

#: Command encoder (RECV_BITMAP, POSTCOPY_RESUME).
_wire = StreamEncoder()

log = Logger()


def currentTransport(migration: Any) -> Any:
    """
    @param migration: an L{twisted_postcopy.source.outgoing.OutgoingMigration}.
    @return: the transport of its attached main channel, or L{None}
        (paused, or not connected yet).
    """
    return getattr(migration.channel, "transport", None)


def pauseOutgoing(migration: Any, reason: object) -> None:
    """
    QEMU's C{postcopy_pause}: status C{postcopy-paused}; the main channel
    is detached (writes are dropped) until a new connection attaches
    itself.

    @param migration: the outgoing migration, in a L{PAUSABLE} status.
    @param reason: why (logged).
    """
    log.warn("{message} ({reason})", message=PAUSED_MESSAGE, reason=reason)
    migration.detachChannel()
    migration.scheduler.queue.clear()
    migration.preemptDropped()
    migration.machine.moveTo(S.POSTCOPY_PAUSED)


def channelLost(migration: Any, transport: Any, reason: object) -> bool:
    """
    The main connection of an outgoing migration was lost: pause if
    postcopy can be recovered, that is once the destination has the whole
    package (L{OutgoingMigration.packageLoaded
    <twisted_postcopy.source.outgoing.OutgoingMigration.packageLoaded>}),
    so that its guest may run.  Before that the destination fails (it
    pauses only once RUNNING), so the source fails too, where 7.2 would
    pause and wait for nothing.

    @param migration: the outgoing migration.
    @param transport: the lost connection's transport.
    @param reason: why.
    @return: L{True} when handled here (a replaced connection, or the
        migration paused), L{False} when the migration must fail.
    """
    status = migration.machine.status
    if status == S.POSTCOPY_PAUSED or (
            status in PAUSABLE and currentTransport(migration) is not transport):
        return True
    if status in PAUSABLE and migration.packageLoaded:
        pauseOutgoing(migration, reason)
        return True
    return False


def checkResume(migration: Any) -> None:
    """
    C{migrate} with C{resume}: only a paused migration may resume.

    @param migration: the outgoing migration, or L{None}.
    @raise MigrationError: QEMU's text otherwise.
    """
    if migration is None or migration.machine.status != S.POSTCOPY_PAUSED:
        raise MigrationError("Cannot resume if there is no paused migration")


@define
class SourceResume:
    """
    The source's side of one recovery handshake.

    @ivar migration: the paused outgoing migration.
    @ivar write: writes to the new main channel.
    @ivar awaited: blocks whose bitmap has not come back yet.
    """

    migration: Any
    write: Callable[[bytes], None]
    awaited: set[str] = field(init=False, factory=set)

    def start(self) -> None:
        """
        Connected: status C{postcopy-recover}, then one RECV_BITMAP per
        block in list order (no header, no OPEN_RETURN_PATH).
        """
        migration = self.migration
        migration.machine.moveTo(S.POSTCOPY_RECOVER)
        blocks = [b.idstr for b in migration.vm.blocks]
        self.awaited = set(blocks)
        self.write(b"".join(_wire.recvBitmap(name) for name in blocks))

    def bitmapReceived(self, idstr: str, bitmap: bytes) -> None:
        """
        An RP RECV_BITMAP: rebuild that block's dirty map; after the last
        one, send POSTCOPY_RESUME.

        @param idstr: the block name.
        @param bitmap: its received bitmap.
        @raise RemoteProtocolError: outside recovery or an unknown block
            (QEMU's texts).
        @raise BitmapError: the size does not match the block.
        """
        status = self.migration.machine.status
        if status != S.POSTCOPY_RECOVER:
            raise RemoteProtocolError(f"ram_dirty_bitmap_reload: incorrect state {status.value}")
        scheduler = self.migration.scheduler
        block = next((b for b in scheduler.blocks if b.idstr == idstr), None)
        if block is None:
            raise RemoteProtocolError(f"migrate_handle_rp_recv_bitmap: invalid block name '{idstr}'")
        expected = bitmapSize(block.length)
        if len(bitmap) != expected:
            raise BitmapError(
                f"ram_dirty_bitmap_reload: ramblock '{idstr}' bitmap size mismatch "
                f"(0x{len(bitmap):x} != 0x{expected:x})")
        scheduler.dirtyBytes -= block.dirty.count(1) * block.pageSize
        block.dirty = dirtyFromReceived(bitmap, block.length, block.pageSize)
        block.maskSkipped()
        scheduler.dirtyBytes += block.dirty.count(1) * block.pageSize
        self.awaited.discard(idstr)
        if not self.awaited:
            self.write(_wire.resume())

    def resumeAcked(self) -> bool:
        """
        RESUME_ACK(1): back to C{postcopy-active}; the scan restarts at the
        start of RAM and every channel names its first block again.  An
        ack outside recovery is ignored, as in QEMU.

        What was written before the cut may have been lost with the old
        connection (the last pages, END and EOF when the stream had been
        written out): the stream is written again from the reloaded dirty
        maps, so a migration that was only waiting for SHUT sends what the
        destination lacks and its END and EOF anew.

        @return: whether the migration resumed.
        """
        migration = self.migration
        if migration.machine.status != S.POSTCOPY_RECOVER or self.awaited:
            return False
        migration.resumed = True
        migration.scheduler.restartScan()
        migration.scheduler.lastRequestBlock = None
        migration.records.lastBlock = None
        # The stream may have been written to its end into the lost
        # connection's buffer (END, EOS, EOF never arrived): the pages the
        # bitmaps say are missing, and the end, are written again.
        if migration.phase is SourcePhase.WRITTEN:
            migration.phase = SourcePhase.POSTCOPY
        migration.machine.moveTo(S.POSTCOPY_ACTIVE)
        return True
