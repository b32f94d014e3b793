# -*- test-case-name: tests.test_recovery_destination -*-
"""
Tests for L{twisted_postcopy.destination.recovery}: pausing an incoming
migration, received bitmaps and the destination's handshake, without
sockets.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.destination.machine import IncomingMachine, PostcopyState
from twisted_postcopy.destination.placer import HOLE
from twisted_postcopy.destination.recovery import (
    DestinationResume, HeldReturnPath, channelLost, checkRecover, receivedBitmap)
from twisted_postcopy.errors import MigrationError, RemoteProtocolError
from twisted_postcopy.protocols.returnpath import ReturnPathWriter
from twisted_postcopy.source.machine import MigrationStatus as S

PAGE = 4096


@define
class _Block:
    """
    A block as the placer knows it.

    @ivar length: bytes.
    @ivar pageSize: host page size.
    """

    length: int
    pageSize: int = PAGE


@define
class _Placer:
    """
    The placer's received bytes of a 64-page C{pc.ram} (pages 0-2 received,
    page 3 a precopy hole).

    @ivar blocks: idstr -> block.
    @ivar received: idstr -> one byte per page.
    """

    blocks: dict[str, _Block] = field(factory=lambda: {"pc.ram": _Block(64 * PAGE)})
    received: dict[str, bytearray] = field(
        factory=lambda: {"pc.ram": bytearray(b"\x01\x01\x01" + bytes([HOLE])) + bytearray(60)})


@define
class _Incoming:
    """
    The parts of an incoming migration recovery uses.

    @ivar machine: the state machines, postcopy RUNNING.
    @ivar placer: the placer.
    @ivar returnPath: the return path.
    @ivar waiting: pages awaited by faulting guest threads.
    """

    machine: IncomingMachine = field(factory=IncomingMachine)
    placer: _Placer = field(factory=_Placer)
    returnPath: Any = None
    waiting: dict[tuple[str, int], list[Any]] = field(factory=dict)


class _Protocol:
    """
    A connection's protocol.

    @ivar transport: its transport.
    """

    def __init__(self) -> None:
        """
        A fresh transport.
        """
        self.transport = StringTransport()

    def statusChanged(self, status: S) -> None:
        """
        An observer that must be dropped at pause.

        @param status: ignored.
        """


def runningIncoming() -> tuple[_Incoming, _Protocol]:
    """
    @return: an incoming migration in C{postcopy-active}, postcopy
        RUNNING, with its connection's protocol.
    """
    incoming, protocol = _Incoming(), _Protocol()
    incoming.returnPath = ReturnPathWriter(protocol.transport)
    for status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE):
        incoming.machine.status.moveTo(status)
    incoming.machine.postcopy = PostcopyState.RUNNING
    incoming.machine.status.observers.append(protocol.statusChanged)
    return incoming, protocol


class BitmapTests(SynchronousTestCase):
    """
    L{receivedBitmap}: QEMU's layout (spec 4.5).
    """

    def test_vectors(self) -> None:
        """
        A 1-page block gives C{01} padded to 8 bytes; 32 received pages of a
        32-page block give C{ffffffff00000000}.
        """
        self.assertEqual(receivedBitmap(b"\x01", PAGE, PAGE), bytes.fromhex("0100000000000000"))
        self.assertEqual(receivedBitmap(b"\x01" * 32, 32 * PAGE, PAGE), bytes.fromhex("ffffffff00000000"))

    def test_holesAreReceived(self) -> None:
        """
        A precopy zero page (a hole) counts as received, so the source does
        not send it again.
        """
        self.assertEqual(receivedBitmap(bytes([0, HOLE, 1]), 3 * PAGE, PAGE), bytes.fromhex("0600000000000000"))

    def test_hugePages(self) -> None:
        """
        A received host page sets all of its target pages.
        """
        self.assertEqual(receivedBitmap(b"\x00\x01", 8 * PAGE, 4 * PAGE), bytes.fromhex("f000000000000000"))

    def test_empty(self) -> None:
        """
        Nothing received: all zero.
        """
        self.assertEqual(receivedBitmap(bytes(65), 65 * PAGE, PAGE), bytes(16))


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
        self.assertIsInstance(incoming.returnPath, HeldReturnPath)
        self.assertNotIn(protocol.statusChanged, incoming.machine.status.observers)
        incoming.returnPath.requestPages("pc.ram", 0, PAGE)
        self.assertEqual(protocol.transport.value(), b"")
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
        self.incoming.waiting[("pc.ram", 5 * PAGE)] = []
        channelLost(self.incoming, old, "cut")
        self.transport = StringTransport()
        self.resume = DestinationResume(self.incoming, ReturnPathWriter(self.transport))
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
