# -*- test-case-name: tests.test_recovery_source -*-
"""
Tests for L{twisted_postcopy.source.recovery}: pausing an outgoing
migration, the received-bitmap reload and the source's handshake, without
sockets; and the QMP errors of the recovery commands.
"""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.enginevm import PAGE, OutgoingTestVM
from twisted_postcopy.ram.bitmap import PageBitmap
from twisted_postcopy.errors import BitmapError, MigrationError, RemoteProtocolError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.state import MigrationStatus as S
from twisted_postcopy.wire import StreamEncoder
from twisted_postcopy.wire.constants import RAM_SECTION_ID, SectionType
from twisted_postcopy.source.outgoing import DONE, OutgoingMigration, WriteChannel
from twisted_postcopy.source.recovery import (
    SourceResume, bitmapSize, channelLost, checkResume, dirtyFromReceived)


class _Transport:
    """
    A transport whose C{write} collects bytes.

    @ivar written: the bytes written.
    """

    def __init__(self) -> None:
        """
        Nothing written yet.
        """
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        """
        @param data: collected.
        """
        self.written += data


def pausableMigration() -> tuple[OutgoingMigration, _Transport]:
    """
    @return: an outgoing migration of a 64-page C{pc.ram} and a 2-page
        C{pc.rom} in C{postcopy-active}, writing to a transport.
    """
    transport = _Transport()
    vm = OutgoingTestVM({"pc.ram": 64 * PAGE, "pc.rom": 2 * PAGE})
    migration = OutgoingMigration(vm, transport.write, Clock().seconds, {"postcopy-ram": True},
                                  {"max-bandwidth": 0, "max-postcopy-bandwidth": 0,
                                   "downtime-limit": 300})
    for status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE):
        migration.machine.moveTo(status)
    migration.pong(3)
    return migration, transport


def receivedBitmap(received: bytes, length: int, pageSize: int) -> bytes:
    """
    What the destination's fault service encodes (a RAMBlock's
    C{receivedBitmap}: its C{receivedMap} scaled to target pages).

    @param received: one byte per host page (non-zero = received).
    @param length: the block's length.
    @param pageSize: its host page size.
    @return: the RECV_BITMAP payload.
    """
    bitmap = PageBitmap(length // pageSize)
    for page, byte in enumerate(received):
        if byte:
            bitmap.set(page)
    return bitmap.scaled(pageSize // PAGE).toBytes()


class BitmapTests(SynchronousTestCase):
    """
    QEMU's received-bitmap layout, as the source reads it.
    """

    def test_size(self) -> None:
        """
        One bit per 4 KiB page, rounded up to whole 64-bit words (the
        spec's measured sizes).
        """
        self.assertEqual([bitmapSize(pages * PAGE) for pages in (65536, 32, 64, 1, 65)],
                         [8192, 8, 8, 8, 16])

    def test_notReceived(self) -> None:
        """
        Dirty := NOT received, least significant bit first per byte.
        """
        dirty = dirtyFromReceived(bytes.fromhex("ffffffff00000000"), 64 * PAGE, PAGE)
        self.assertEqual(dirty, bytearray(32) + bytearray(b"\x01") * 32)
        dirty = dirtyFromReceived(bytes.fromhex("0500000000000000"), 4 * PAGE, PAGE)
        self.assertEqual(dirty, bytearray(b"\x00\x01\x00\x01"))

    @given(st.binary(min_size=1, max_size=300), st.sampled_from([1, 2, 512]))
    def test_roundTrip(self, received: bytes, ratio: int) -> None:
        """
        What the destination encodes the source reloads as exactly the
        pages not received, for any block size and page size.

        @param received: one byte per host page (non-zero = received).
        @param ratio: target pages per host page.
        """
        pageSize = ratio * PAGE
        length = len(received) * pageSize
        bitmap = receivedBitmap(received, length, pageSize)
        self.assertEqual(len(bitmap), bitmapSize(length))
        self.assertEqual(dirtyFromReceived(bitmap, length, pageSize),
                         bytearray(int(not byte) for byte in received))

    def test_hugePages(self) -> None:
        """
        A host page is dirty when any of its target pages is missing.
        """
        bitmap = (0b1111_0111).to_bytes(8, "little")
        self.assertEqual(dirtyFromReceived(bitmap, 8 * PAGE, 4 * PAGE), bytearray(b"\x01\x00"))


class PauseTests(SynchronousTestCase):
    """
    L{channelLost} pauses a postcopy migration and ignores stale
    connections.
    """

    def test_precopyFails(self) -> None:
        """
        Before postcopy a lost connection is not handled (the migration
        fails).
        """
        migration, transport = pausableMigration()
        migration.machine.status = S.ACTIVE
        self.assertFalse(channelLost(migration, transport, "lost"))

    def test_beforeRunFails(self) -> None:
        """
        In postcopy but before PONG 3 or any page request (the destination
        may not have the whole package, so may never run the guest) a lost
        connection fails.
        """
        migration, transport = pausableMigration()
        migration.destinationRunning = False
        self.assertFalse(migration.packageLoaded)
        self.assertFalse(channelLost(migration, transport, "lost"))

    def test_pageRequestBeforePongPauses(self) -> None:
        """
        A page request before PONG 3 shows the destination has the whole
        package (it asks for pages only once LISTEN in it ran), so a lost
        connection pauses: a real QEMU 7.2 asked for a page while loading
        its devices and PONG 3 was still in flight at the cut, and a
        failed source could not recover a guest already running there.
        """
        migration, transport = pausableMigration()
        migration.destinationRunning = False
        migration.pagesRequested("pc.ram", 0, PAGE)
        self.assertTrue(migration.packageLoaded)
        self.assertTrue(channelLost(migration, transport, "lost"))
        self.assertEqual(migration.machine.status, S.POSTCOPY_PAUSED)

    def test_postcopyPauses(self) -> None:
        """
        In postcopy the current connection's loss pauses; writes are then
        dropped and the request queue is emptied.
        """
        migration, transport = pausableMigration()
        migration.scheduler.queueRequest("pc.ram", 0, PAGE)
        self.assertTrue(channelLost(migration, transport, "lost"))
        self.assertEqual(migration.machine.status, S.POSTCOPY_PAUSED)
        self.assertEqual(len(migration.scheduler.queue), 0)
        self.assertIsNone(migration.channel)
        migration._sendBuffers([b"dropped"])
        self.assertEqual(transport.written, b"")
        self.assertTrue(channelLost(migration, transport, "again"))
        self.assertEqual(migration.machine.history.count(S.POSTCOPY_PAUSED), 1)

    def test_staleConnection(self) -> None:
        """
        The loss of a connection that is no longer the main channel
        changes nothing.
        """
        migration, transport = pausableMigration()
        self.assertTrue(channelLost(migration, _Transport(), "old"))
        self.assertEqual(migration.machine.status, S.POSTCOPY_ACTIVE)

    def test_resumeNeedsPause(self) -> None:
        """
        C{migrate resume} without a paused migration: QEMU's text.
        """
        migration, _ = pausableMigration()
        for candidate in (None, migration):
            error = self.assertRaises(MigrationError, checkResume, candidate)
            self.assertEqual(str(error), "Cannot resume if there is no paused migration")


class HandshakeTests(SynchronousTestCase):
    """
    L{SourceResume}: RECV_BITMAP requests, bitmap reloads, POSTCOPY_RESUME,
    RESUME_ACK.
    """

    def setUp(self) -> None:
        """
        A paused migration and a handshake on a new transport.
        """
        self.migration, old = pausableMigration()
        channelLost(self.migration, old, "cut")
        self.transport = _Transport()
        self.resume = SourceResume(self.migration, self.transport.write)
        self.resume.start()

    def test_requests(self) -> None:
        """
        Status C{postcopy-recover}; one RECV_BITMAP per block in list order,
        with no header.
        """
        self.assertEqual(self.migration.machine.status, S.POSTCOPY_RECOVER)
        self.assertEqual(bytes(self.transport.written),
                         bytes.fromhex("08000a0007 06") + b"pc.ram" + bytes.fromhex("08000a0007 06") + b"pc.rom")

    def test_reloadAndResume(self) -> None:
        """
        After every bitmap: POSTCOPY_RESUME; the dirty maps are NOT
        received; RESUME_ACK moves to C{postcopy-active} with the scan at
        the start and the CONTINUE memory cleared.
        """
        self.transport.written.clear()
        self.migration.records.lastBlock = "pc.ram"
        self.migration.scheduler.position = (1, 1)
        self.resume.bitmapReceived("pc.ram", bytes.fromhex("ffffffff00000000"))
        self.assertEqual(self.transport.written, b"")
        self.assertFalse(self.resume.resumeAcked())
        self.resume.bitmapReceived("pc.rom", bytes.fromhex("0100000000000000"))
        self.assertEqual(bytes(self.transport.written), bytes.fromhex("0800090000"))
        self.assertEqual(self.migration.scheduler.remainingBytes, 33 * PAGE)
        self.assertTrue(self.resume.resumeAcked())
        self.assertEqual(self.migration.machine.status, S.POSTCOPY_ACTIVE)
        self.assertEqual(self.migration.scheduler.position, (0, 0))
        self.assertIsNone(self.migration.records.lastBlock)
        self.assertFalse(self.resume.resumeAcked())

    def test_resumeAfterEverythingWritten(self) -> None:
        """
        A cut after the source wrote its last page and EOF (lost with the
        connection, so no SHUT came) does not end the migration: after
        RESUME_ACK the pages the destination lacks go out again on the new
        connection, then END and EOF, and SHUT completes it (the finding:
        the source stayed C{postcopy-active} sending nothing, and the
        destination's guest waited for its pages forever).
        """
        migration, old = pausableMigration()
        migration.returnPathOpen = True
        while migration.step() != DONE:
            pass
        self.assertTrue(migration.written)
        self.assertEqual(migration.scheduler.remainingBytes, 0)
        channelLost(migration, old, "cut")
        transport = _Transport()
        resume = SourceResume(migration, transport.write)
        resume.start()
        resume.bitmapReceived("pc.ram", bytes.fromhex("ffffffff00000000"))
        resume.bitmapReceived("pc.rom", bytes.fromhex("0300000000000000"))
        self.assertTrue(resume.resumeAcked())
        transport.written.clear()
        migration.attachChannel(WriteChannel(transport.write))
        normal = migration.stats.normal + migration.stats.duplicate
        while migration.step() != DONE:
            pass
        self.assertEqual(migration.stats.normal + migration.stats.duplicate - normal, 32)
        self.assertEqual(migration.scheduler.remainingBytes, 0)
        wire = StreamEncoder()
        end = (wire.sectionHeader(SectionType.SECTION_END, RAM_SECTION_ID) + wire.eos()
               + wire.sectionFooter(RAM_SECTION_ID) + wire.eof())
        self.assertTrue(bytes(transport.written).endswith(end))
        self.assertEqual(migration.machine.status, S.POSTCOPY_ACTIVE)
        migration.shut(0)
        self.assertEqual(migration.machine.status, S.COMPLETED)

    def test_badSize(self) -> None:
        """
        A bitmap of the wrong size: QEMU's text.
        """
        error = self.assertRaises(BitmapError, self.resume.bitmapReceived, "pc.ram", bytes(16))
        self.assertEqual(str(error), "ram_dirty_bitmap_reload: ramblock 'pc.ram' bitmap size "
                                     "mismatch (0x10 != 0x8)")

    def test_unknownBlock(self) -> None:
        """
        A bitmap for a block the source does not have: QEMU's text.
        """
        error = self.assertRaises(RemoteProtocolError, self.resume.bitmapReceived, "xyz", bytes(8))
        self.assertEqual(str(error), "migrate_handle_rp_recv_bitmap: invalid block name 'xyz'")

    def test_outsideRecovery(self) -> None:
        """
        A bitmap once resumed: QEMU's text.
        """
        self.resume.bitmapReceived("pc.ram", bytes(8))
        self.resume.bitmapReceived("pc.rom", bytes(8))
        self.resume.resumeAcked()
        error = self.assertRaises(RemoteProtocolError, self.resume.bitmapReceived, "pc.ram", bytes(8))
        self.assertEqual(str(error), "ram_dirty_bitmap_reload: incorrect state postcopy-active")


class ManagerErrorTests(SynchronousTestCase):
    """
    The recovery commands' QMP errors on a manager with nothing to
    recover.
    """

    def test_errors(self) -> None:
        """
        C{migrate resume}, C{migrate-pause} and C{migrate-recover} outside
        their states: QEMU's texts.
        """
        manager = MigrationManager(Clock(), OutgoingTestVM({"pc.ram": PAGE}))
        calls = [
            (lambda: manager.migrate("tcp:127.0.0.1:1", resume=True),
             "Cannot resume if there is no paused migration"),
            (manager.migratePause,
             "migrate-pause is currently only supported during postcopy-active state"),
            (lambda: manager.migrateRecover("tcp:127.0.0.1:0"),
             "Migrate recover can only be run when postcopy is paused."),
        ]
        for call, text in calls:
            self.assertEqual(str(self.assertRaises(MigrationError, call)), text)
