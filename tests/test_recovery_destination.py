# -*- test-case-name: tests.test_recovery_destination -*-
"""
Tests for L{twisted_postcopy.destination.recovery}: pausing an incoming
migration, received bitmaps and the destination's handshake, without
sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.destination.machine import IncomingMachine, PostcopyState
from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.destination.placer import PagePlacer
from twisted_postcopy.destination.recovery import DestinationResume, channelLost, checkRecover
from twisted_postcopy.ram.bitmap import PageBitmap
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.errors import MigrationError, RemoteProtocolError
from twisted_postcopy.state import MigrationStatus as S

PAGE = 4096


class _Faults:
    """
    A unit-test stand-in for the fault service (the production one needs
    a userfaultfd): a real 64-page RAMBlock C{pc.ram} with pages 0-2
    received and page 3 a precopy hole, and one wanted page.

    @ivar blocks: idstr -> RAMBlock.
    @ivar wanted: (idstr, offset) of pages faulted on and not placed.
    @ivar pageSource: where L{rerequestPending} asks.
    """

    def __init__(self) -> None:
        """
        Fill the block.
        """
        block = RAMBlock("pc.ram", 64 * PAGE)
        block.write(0, bytes(3 * PAGE))
        block.writeZero(3 * PAGE, PAGE)
        self.blocks = {"pc.ram": block}
        self.wanted: list[tuple[str, int]] = []
        self.pageSource: Any = None

    def receivedBitmap(self, idstr: str) -> bytes:
        """
        @param idstr: the block.
        @return: its received bitmap (the production code path).
        """
        return self.blocks[idstr].receivedBitmap()

    def rerequestPending(self) -> int:
        """
        Ask the page source again for every wanted page.

        @return: how many.
        """
        for idstr, offset in self.wanted:
            self.pageSource.requestPage(idstr, offset)
        return len(self.wanted)


class _Protocol:
    """
    A main connection's protocol, as far as recovery needs it.

    @ivar incoming: the incoming migration.
    @ivar transport: its transport.
    """

    def __init__(self, incoming: Any = None) -> None:
        """
        @param incoming: the incoming migration whose bytes it writes.
        """
        self.incoming = incoming
        self.transport = StringTransport()

    def returnPathReady(self) -> None:
        """
        Write the incoming migration's return-path bytes.
        """
        self.transport.write(self.incoming.dataToSend())

    def statusChanged(self, status: S) -> None:
        """
        An observer that must be dropped at pause.

        @param status: ignored.
        """


def runningIncoming() -> tuple[IncomingMigration, _Protocol]:
    """
    @return: an incoming migration in C{postcopy-active}, postcopy
        RUNNING, over the L{_Faults} stand-in, with its main connection's
        protocol.
    """
    incoming = IncomingMigration(None)
    faults = _Faults()
    incoming.faults = faults
    incoming.placer = PagePlacer(faults.blocks)
    protocol = _Protocol(incoming)
    incoming.attachChannel(protocol)
    for status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE):
        incoming.machine.status.moveTo(status)
    incoming.machine.postcopy = PostcopyState.RUNNING
    incoming.machine.status.observers.append(protocol.statusChanged)
    return incoming, protocol


class BitmapTests(SynchronousTestCase):
    """
    The received bitmap the destination sends: QEMU's layout (spec 4.5).
    """

    def test_vectors(self) -> None:
        """
        A 1-page block gives C{01} padded to 8 bytes; 32 received pages of a
        32-page block give C{ffffffff00000000}.
        """
        block = RAMBlock("one", PAGE)
        self.addCleanup(block.close)
        block.write(0, bytes(PAGE))
        self.assertEqual(block.receivedBitmap(), bytes.fromhex("0100000000000000"))
        block = RAMBlock("many", 32 * PAGE)
        self.addCleanup(block.close)
        block.write(0, bytes(32 * PAGE))
        self.assertEqual(block.receivedBitmap(), bytes.fromhex("ffffffff00000000"))

    def test_holesAreReceived(self) -> None:
        """
        A precopy zero page (a hole) counts as received, so the source does
        not send it again; a discarded page does not.
        """
        block = RAMBlock("pc.ram", 3 * PAGE)
        self.addCleanup(block.close)
        block.writeZero(PAGE, PAGE)
        block.write(2 * PAGE, b"x" * PAGE)
        self.assertEqual(block.receivedBitmap(), bytes.fromhex("0600000000000000"))
        block.discard(PAGE, PAGE)
        self.assertEqual(block.receivedBitmap(), bytes.fromhex("0400000000000000"))

    def test_hugePages(self) -> None:
        """
        A received host page sets all of its target pages.
        """
        bitmap = PageBitmap(2)
        bitmap.set(1)
        self.assertEqual(bitmap.scaled(4).toBytes(), bytes.fromhex("f000000000000000"))

    def test_empty(self) -> None:
        """
        Nothing received: all zero.
        """
        block = RAMBlock("pc.ram", 65 * PAGE)
        self.addCleanup(block.close)
        self.assertEqual(block.receivedBitmap(), bytes(16))


class PauseTests(SynchronousTestCase):
    """
    L{channelLost} pauses while postcopy runs.
    """

    def test_beforeRunFails(self) -> None:
        """
        Before postcopy RUNNING a failure is fatal (not handled here).
        """
        incoming, protocol = runningIncoming()
        incoming.machine.postcopy = PostcopyState.LISTENING
        self.assertFalse(channelLost(incoming, protocol, "lost"))

    def test_pause(self) -> None:
        """
        The current connection's failure pauses; page requests are then
        held; the protocol's status observer is dropped.
        """
        incoming, protocol = runningIncoming()
        self.assertTrue(channelLost(incoming, protocol, "lost"))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.assertIsNone(incoming.channel)
        self.assertNotIn(protocol.statusChanged, incoming.machine.status.observers)
        incoming.requestPage("pc.ram", 0)
        self.assertEqual((protocol.transport.value(), incoming.dataToSend(), incoming.pageRequests),
                         (b"", b"", 0))
        self.assertTrue(channelLost(incoming, protocol, "again"))

    def test_staleConnection(self) -> None:
        """
        A connection that is no longer the main channel changes nothing.
        """
        incoming, _ = runningIncoming()
        self.assertTrue(channelLost(incoming, _Protocol(), "old"))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_ACTIVE)

    def test_recoverNeedsPause(self) -> None:
        """
        C{migrate-recover} outside C{postcopy-paused}: QEMU's text.
        """
        incoming, _ = runningIncoming()
        for candidate in (None, incoming):
            error = self.assertRaises(MigrationError, checkRecover, candidate)
            self.assertEqual(str(error), "Migrate recover can only be run when postcopy is paused.")


class HandshakeTests(SynchronousTestCase):
    """
    L{DestinationResume}: bitmaps, RESUME_ACK, re-sent requests.
    """

    def setUp(self) -> None:
        """
        A paused migration, with one page awaited, and a new connection.
        """
        self.incoming, old = runningIncoming()
        self.incoming.faults.wanted.append(("pc.ram", 5 * PAGE))
        self.incoming.faults.pageSource = self.incoming
        channelLost(self.incoming, old, "cut")
        channel = _Protocol(self.incoming)
        self.transport = channel.transport
        self.resume = DestinationResume(self.incoming, channel)
        self.resume.start()

    def test_bitmap(self) -> None:
        """
        C{postcopy-recover}; RECV_BITMAP is answered with the name, be64
        size, bitmap and end mark.
        """
        self.assertEqual(self.incoming.machine.status.status, S.POSTCOPY_RECOVER)
        self.resume.recvBitmap("pc.ram")
        self.assertEqual(self.transport.value(),
                         bytes.fromhex("0005 0007 06") + b"pc.ram"
                         + bytes.fromhex("0000000000000008 0f00000000000000 0123456789abcdef"))

    def test_unknownBlock(self) -> None:
        """
        RECV_BITMAP for an unknown block is an error (7.2 would crash).
        """
        error = self.assertRaises(RemoteProtocolError, self.resume.recvBitmap, "xyz")
        self.assertIn("block 'xyz' not found", str(error))

    def test_resume(self) -> None:
        """
        POSTCOPY_RESUME: RESUME_ACK(1), C{postcopy-active}, then the
        awaited page requested again with its block named.
        """
        self.resume.resume()
        self.assertEqual(self.incoming.machine.status.status, S.POSTCOPY_ACTIVE)
        self.assertEqual(self.transport.value(),
                         bytes.fromhex("0006 0004 00000001")
                         + bytes.fromhex("0003 0013 0000000000005000 00001000 06") + b"pc.ram")

    def test_outsideRecovery(self) -> None:
        """
        RECV_BITMAP and POSTCOPY_RESUME outside C{postcopy-recover} are
        only logged: nothing is sent.
        """
        self.resume.resume()
        self.transport.clear()
        self.resume.recvBitmap("pc.ram")
        self.resume.resume()
        self.assertEqual(self.transport.value(), b"")
