# -*- test-case-name: tests.test_wire_commands -*-
"""
Tests for L{twisted_postcopy.wire.commands}: every QEMU 7.2 command, its
golden bytes (migration-stream.md section 7) and its length checks.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.wirehelpers import unhex
from twisted_postcopy.errors import (
    BadLengthError,
    BadRAMRecordError,
    LimitExceededError,
    LocalProtocolError,
    UnknownElementError,
    UnsupportedFeatureError,
)
from twisted_postcopy.wire.encoder import StreamEncoder, encodeEvents
from twisted_postcopy.wire.events import (
    DiscardReceived,
    ListenReceived,
    PackageReceived,
    PingReceived,
    PostcopyAdvised,
    RecvBitmapRequested,
    ResumeReceived,
    ReturnPathOpened,
    RunReceived,
)
from twisted_postcopy.wire.stream import decodeAll

#: Vector 7.G: the whole-pc.ram discard.
DISCARD_WHOLE = unhex("08 00 06 00 19 00 06 70 63 2e 72 61 6d 00"
                      "00 00 00 00 00 00 00 00  00 00 00 00 08 00 00 00")


def decodeCommands(data: bytes, **options: object) -> list:
    """
    @param data: header-less command elements.
    @param options: decoder options.
    @return: their events.
    """
    return decodeAll(data, header=False, **options)


class CommandGoldenTests(SynchronousTestCase):
    """
    Real 7.2 command bytes decode to the right events and re-encode exactly.
    """

    def assertRoundTrip(self, data: bytes, expected: list) -> None:
        """
        @param data: command bytes.
        @param expected: their events.
        """
        events = decodeCommands(data)
        self.assertEqual(events, expected)
        self.assertEqual(encodeEvents(events), data)

    def test_openReturnPathPingAdvise(self) -> None:
        """
        Vector 7.B.
        """
        self.assertRoundTrip(unhex(
            "08 00 01 00 00  08 00 02 00 04 00 00 00 01"
            "08 00 03 00 10 00 00 00 00 00 00 10 00 00 00 00 00 00 00 10 00"),
            [ReturnPathOpened(), PingReceived(1), PostcopyAdvised(4096, 4096)])

    def test_adviseWithoutPayload(self) -> None:
        """
        The 0-byte ADVISE (dirty bitmaps only) decodes with L{None} values.
        """
        self.assertRoundTrip(unhex("08 00 03 00 00"), [PostcopyAdvised(None, None)])

    def test_discard(self) -> None:
        """
        Vector 7.G: a whole-block discard, and a 12-range one.
        """
        self.assertRoundTrip(DISCARD_WHOLE, [DiscardReceived("pc.ram", [(0, 0x8000000)])])
        ranges = [(0x10000 + i * 0x2000, 0x1000) for i in range(12)]
        data = StreamEncoder().discard("pc.ram", ranges)
        self.assertTrue(data.startswith(unhex(
            "08 00 06 00 c9 00 06 70 63 2e 72 61 6d 00 00 00 00 00 00 01 00 00 00 00 00 00 00 00 10 00")))
        self.assertRoundTrip(data, [DiscardReceived("pc.ram", ranges)])

    def test_discardSplitsInTwelves(self) -> None:
        """
        L{StreamEncoder.discard} sends at most 12 ranges per command.
        """
        ranges = [(i * 0x2000, 0x1000) for i in range(29)]
        events = decodeCommands(StreamEncoder().discard("pc.ram", ranges))
        self.assertEqual([len(e.ranges) for e in events], [12, 12, 5])
        self.assertEqual([r for e in events for r in e.ranges], ranges)

    def test_pingPackageListen(self) -> None:
        """
        Vectors 7.H and 7.I: PING(2), PACKAGED with its body, PING(4).
        """
        package = unhex("08 00 04 00 00  08 00 02 00 04 00 00 00 03  08 00 05 00 00")
        data = (unhex("08 00 02 00 04 00 00 00 02  08 00 07 00 04 00 00 00 13") + package
                + unhex("08 00 02 00 04 00 00 00 04"))
        self.assertRoundTrip(data, [PingReceived(2), PackageReceived(package), PingReceived(4)])
        self.assertEqual(decodeCommands(package), [ListenReceived(), PingReceived(3), RunReceived()])
        self.assertEqual(StreamEncoder().packaged(package), data[9:37])

    def test_recoveryCommands(self) -> None:
        """
        RECV_BITMAP and POSTCOPY_RESUME as on a recovery main channel
        (return-path spec 4.4).
        """
        self.assertRoundTrip(unhex("08 00 0a 00 07 06") + b"pc.ram" + unhex("08 00 09 00 00"),
                             [RecvBitmapRequested("pc.ram"), ResumeReceived()])


class CommandErrorTests(SynchronousTestCase):
    """
    Bad commands raise specific errors naming the element's offset.
    """

    def assertCommandError(self, exception: type, data: bytes, offset: int = 0, **options: object) -> None:
        """
        @param exception: the expected error class.
        @param data: the bad input.
        @param offset: the expected offset.
        @param options: decoder options.
        """
        error = self.assertRaises(exception, decodeCommands, data, **options)
        self.assertEqual(error.offset, offset)

    def test_unknownCommands(self) -> None:
        """
        Commands 0 and 11 are unknown.
        """
        self.assertCommandError(UnknownElementError, unhex("08 00 00 00 00"))
        self.assertCommandError(UnknownElementError, unhex("08 00 01 00 00  08 00 0b 00 00"), 5)

    def test_fixedLengthsCheckedFirst(self) -> None:
        """
        A fixed-length command with another length is rejected before its
        payload is read (PING with length 8 here has no payload at all).
        """
        self.assertCommandError(BadLengthError, unhex("08 00 02 00 08"))
        self.assertCommandError(BadLengthError, unhex("08 00 04 00 01 00"))
        self.assertCommandError(BadLengthError, unhex("08 00 07 00 05"))

    def test_adviseLength(self) -> None:
        """
        ADVISE must be 16 or 0 bytes.
        """
        self.assertCommandError(BadLengthError, unhex("08 00 03 00 08" + "00" * 8))

    def test_discardErrors(self) -> None:
        """
        A discard with no range, version 1, no NUL, or a ragged range list
        is rejected.
        """
        self.assertCommandError(BadLengthError, unhex("08 00 06 00 09 00 06") + b"pc.ram\x00")
        self.assertCommandError(UnknownElementError, b"\x08\x00\x06\x00\x19\x01" + DISCARD_WHOLE[6:], 5)
        bad = bytearray(DISCARD_WHOLE)
        bad[13] = 1
        self.assertCommandError(BadLengthError, bytes(bad), 13)
        self.assertCommandError(BadLengthError, unhex("08 00 06 00 1a") + DISCARD_WHOLE[5:] + b"\x00")

    def test_discardOutsideListedBlock(self) -> None:
        """
        Once the START list is known, a discard of an unknown block or
        beyond a block's length is rejected.
        """
        from twisted_postcopy.wire.events import RAMBlockInfo
        self.assertCommandError(BadRAMRecordError, DISCARD_WHOLE, blocks=[RAMBlockInfo("pc.ram", 0x1000)])
        self.assertCommandError(BadRAMRecordError, DISCARD_WHOLE, blocks=[RAMBlockInfo("other", 0x1000)])

    def test_recvBitmapLength(self) -> None:
        """
        RECV_BITMAP's length must be 1 + the name length, and the name non-empty.
        """
        self.assertCommandError(BadLengthError, unhex("08 00 0a 00 08 06") + b"pc.ram\x00")
        self.assertCommandError(BadLengthError, unhex("08 00 0a 00 01 00"), 5)

    def test_coloRefused(self) -> None:
        """
        ENABLE_COLO names the x-colo capability.
        """
        error = self.assertRaises(UnsupportedFeatureError, decodeCommands, unhex("08 00 08 00 00"))
        self.assertIn("x-colo", str(error))

    def test_packageLimit(self) -> None:
        """
        A package over C{maxPackageSize} is refused from its header alone.
        """
        self.assertCommandError(LimitExceededError, unhex("08 00 07 00 04 00 10 00 00"), maxPackageSize=4096)

    def test_encoderRefusesEmptyDiscard(self) -> None:
        """
        The encoder refuses a discard with no range.
        """
        self.assertRaises(LocalProtocolError, StreamEncoder().discard, "pc.ram", [])
        self.assertRaises(LocalProtocolError, StreamEncoder().command, 2, b"x" * 65536)
