# -*- test-case-name: tests.test_qemu_recovery -*-
"""
Decode a real QEMU 7.2 postcopy recovery recorded at test time.

Once per test process, L{migratePostcopyRecovered} migrates the boot-sector
guest between two QEMUs (TCG, 32 MiB) through a relay, cuts the relay
during postcopy, and recovers through a second relay.  The tests check the
recovery itself (both sides paused, then completed with consistent guest
memory), then hold the wire codec to both recordings: the interrupted
stream decodes up to the cut, the recovery channel and its return path
decode and re-encode exactly, and the received bitmaps agree with the pages
each channel carried.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import wire
from twisted_postcopy.testing.bootsector import PAGE_SIZE, CounterSnapshot
from twisted_postcopy.testing.qemuhost import inTemporaryDirectory, recordOnce
from twisted_postcopy.testing.qemurecovery import RecoveryResult, migratePostcopyRecovered


def recovery() -> RecoveryResult:
    """
    Record the recovered migration on first use; later calls return the
    same result (or raise the same error).

    @return: the recorded recovery.
    @raise SkipTest: when QEMU is not installed (a failure in strict mode).
    """
    return recordOnce("recovery", lambda: inTemporaryDirectory("qemu-recovery-", migratePostcopyRecovered))


def interruptedEvents() -> tuple[list[Any], Any]:
    """
    Decode the interrupted main stream without feeding an EOF.

    @return: its events and the decoder.
    """
    decoder = wire.StreamDecoder()
    decoder.receiveData(bytes(recovery().interrupted.forward))
    return list(decoder.events()), decoder


def listedBlocks() -> tuple[Any, ...]:
    """
    @return: the RAMBlocks of the interrupted stream's START list.
    """
    events, _ = interruptedEvents()
    (listed,) = [e for e in events if type(e).__name__ == "RAMBlocksListed"]
    return listed.blocks


def recoveredEvents() -> list[Any]:
    """
    @return: the events of the recovery main channel (no header; the
        blocks and the RAM section id come from the first connection).
    """
    return wire.decodeAll(
        bytes(recovery().recovered.forward), header=False,
        blocks=listedBlocks(), ramSectionId=2,
    )


def returnPathEvents(data: bytes) -> list[Any]:
    """
    @param data: a recorded return path.
    @return: its events.
    """
    return wire.ReturnPathDecoder().decodeWhole(data)


def kinds(events: list[Any]) -> list[str]:
    """
    @param events: decoded events.
    @return: their class names.
    """
    return [type(event).__name__ for event in events]


def sentPages(events: list[Any]) -> set[tuple[str, int]]:
    """
    @param events: main-stream events.
    @return: the C{(block, offset)} of every page (normal or zero) sent.
    """
    return {
        (event.block, event.offset) for event in events
        if type(event).__name__ in ("PageReceived", "ZeroPageReceived")
    }


def bitmapPages(block: str, bitmap: bytes, length: int) -> set[tuple[str, int]]:
    """
    @param block: the RAMBlock idstr.
    @param bitmap: its received bitmap (little-endian 64-bit words).
    @param length: the block length.
    @return: the C{(block, offset)} of every page marked received.
    """
    return {
        (block, page * PAGE_SIZE) for page in range(length // PAGE_SIZE)
        if bitmap[page // 8] >> (page % 8) & 1
    }


class RecoveryTests(SynchronousTestCase):
    """
    The recovery itself (no codec involved).
    """

    def test_completedConsistent(self) -> None:
        """
        After the cut both sides paused, and after recovery both completed
        with the destination's guest memory consistent.
        """
        result = recovery()
        self.assertEqual(result.source["status"], "completed")
        self.assertEqual(result.destination["status"], "completed")
        self.assertGreater(result.pausedAfter, 0)
        self.assertIsInstance(result.snapshot, CounterSnapshot)

    def test_recoveryChannelHasNoHeader(self) -> None:
        """
        The recovery channel starts with a command (RECV_BITMAP), not with
        the stream magic.
        """
        self.assertEqual(recovery().recovered.forward[:3], b"\x08\x00\x0a")


class InterruptedStreamTests(SynchronousTestCase):
    """
    The stream cut during postcopy.
    """

    def test_decodesUpToCut(self) -> None:
        """
        Without an EOF fed, the cut stream decodes without error into an
        incomplete stream that had reached the package.
        """
        events, decoder = interruptedEvents()
        self.assertFalse(decoder.complete)
        self.assertIn("PackageReceived", kinds(events))

    def test_reencodesPrefix(self) -> None:
        """
        The decoded elements re-encode to a prefix of the recording.
        """
        events, _ = interruptedEvents()
        encoded = wire.encodeEvents(events)
        self.assertTrue(encoded)
        self.assertTrue(bytes(recovery().interrupted.forward).startswith(encoded))


class RecoveryChannelTests(SynchronousTestCase):
    """
    The recovery main channel and its return path.
    """

    def test_handshake(self) -> None:
        """
        The channel opens with one RECV_BITMAP per RAMBlock in START list
        order, then POSTCOPY_RESUME, and ends with EOF.
        """
        events = recoveredEvents()
        blocks = [block.idstr for block in listedBlocks()]
        self.assertEqual(
            kinds(events)[: len(blocks) + 1],
            ["RecvBitmapRequested"] * len(blocks) + ["ResumeReceived"],
        )
        self.assertEqual([event.block for event in events[: len(blocks)]], blocks)
        self.assertEqual(kinds(events)[-1], "EOFReceived")

    def test_reencodes(self) -> None:
        """
        Re-encoding the recovery channel's events gives back its bytes.
        """
        encoded = wire.encodeEvents(recoveredEvents())
        self.assertTrue(encoded == bytes(recovery().recovered.forward))

    def test_returnPath(self) -> None:
        """
        The recovery return path holds one RECV_BITMAP reply per block (in
        order, sized to whole 64-bit words), RESUME_ACK 1, and ends with
        SHUT 0; it re-encodes exactly.
        """
        data = bytes(recovery().recovered.backward)
        events = returnPathEvents(data)
        blocks = listedBlocks()
        replies = events[: len(blocks)]
        self.assertEqual([e.block for e in replies], [b.idstr for b in blocks])
        for reply, block in zip(replies, blocks):
            pages = block.length // PAGE_SIZE
            self.assertEqual(len(reply.bitmap), (pages + 63) // 64 * 8)
        self.assertEqual(kinds(events)[len(blocks)], "ResumeAckReceived")
        self.assertEqual(events[len(blocks)].value, 1)
        self.assertEqual((kinds(events)[-1], events[-1].value), ("ShutReceived", 0))
        encoder = wire.ReturnPathEncoder()
        self.assertTrue(b"".join(encoder.encode(e) for e in events) == data)

    def test_bitmapsMatchPages(self) -> None:
        """
        Every page the destination reports received was sent before the
        cut, and every page it lacks is sent on the recovery channel.
        """
        blocks = {block.idstr: block.length for block in listedBlocks()}
        received: set[tuple[str, int]] = set()
        for reply in returnPathEvents(bytes(recovery().recovered.backward)):
            if type(reply).__name__ == "RecvBitmapReceived":
                received |= bitmapPages(reply.block, reply.bitmap, blocks[reply.block])
        events, _ = interruptedEvents()
        self.assertTrue(received <= sentPages(events))
        everything = {
            (name, offset) for name, length in blocks.items()
            for offset in range(0, length, PAGE_SIZE)
        }
        self.assertTrue(everything - received <= sentPages(recoveredEvents()))
