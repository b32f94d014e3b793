# -*- test-case-name: tests.test_wire_returnpath -*-
"""
Tests for L{twisted_postcopy.wire.returnpath}, with the real bytes of
section 1.3 and 4.4 of return-path-preempt-recovery.md.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.wirehelpers import decodeChunked, decodeSplit, unhex
from twisted_postcopy.errors import (
    BadLengthError,
    BadRAMRecordError,
    LimitExceededError,
    LocalProtocolError,
    TruncatedStreamError,
    UnknownElementError,
)
from twisted_postcopy.wire.events import (
    PagesRequested,
    PongReceived,
    RecvBitmapReceived,
    ResumeAckReceived,
    ShutReceived,
)
from twisted_postcopy.wire.returnpath import ReturnPathDecoder, ReturnPathEncoder

#: Section 1.3: PONG 1, REQ_PAGES_ID, REQ_PAGES, SHUT 0, RESUME_ACK.
GOLDEN = unhex("0002 0004 00000001"
               "0003 0013 0000000000aba000 00001000 06 70632e72616d"
               "0004 000c 0000000000b21000 00001000"
               "0001 0004 00000000"
               "0006 0004 00000001")
GOLDEN_EVENTS = [
    PongReceived(1), PagesRequested("pc.ram", 0xABA000, 0x1000, True),
    PagesRequested("pc.ram", 0xB21000, 0x1000, False), ShutReceived(0), ResumeAckReceived(1)]
#: Section 4.4: RECV_BITMAP of a 32-page block.
BITMAP = (unhex("0005 0015 14") + b"/rom@etc/acpi/tables"
          + unhex("0000000000000008 ffffffff00000000 0123456789abcdef"))


def decode(data: bytes) -> list:
    """
    @param data: return-path bytes.
    @return: their events (EOF fed).
    """
    return decodeChunked(ReturnPathDecoder, data, len(data) or 1)


class ReturnPathDecoderTests(SynchronousTestCase):
    """
    L{ReturnPathDecoder} decodes every 7.2 message.
    """

    def test_golden(self) -> None:
        """
        The real bytes decode; REQ_PAGES resolves its block from the last
        REQ_PAGES_ID.
        """
        self.assertEqual(decode(GOLDEN), GOLDEN_EVENTS)

    def test_realRecording(self) -> None:
        """
        The return path of a real postcopy migration (TCG, so PONGs in
        order) decodes to four PONGs and SHUT(0).
        """
        import os
        path = os.path.join(os.path.dirname(__file__), "data", "qemu72-postcopy-pc-32m.rp.bin")
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(decodeChunked(ReturnPathDecoder, data, 3),
                         [PongReceived(1), PongReceived(2), PongReceived(3), PongReceived(4), ShutReceived(0)])

    def test_recvBitmap(self) -> None:
        """
        RECV_BITMAP carries its trailing size, bitmap and end mark.
        """
        self.assertEqual(decode(BITMAP), [RecvBitmapReceived("/rom@etc/acpi/tables", unhex("ffffffff00000000"))])

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(GOLDEN + BITMAP)), max_size=10))
    def test_anySplit(self, cuts: list[int]) -> None:
        """
        Any chunking gives the same events.
        """
        self.assertEqual(decodeSplit(ReturnPathDecoder, GOLDEN + BITMAP, cuts), decode(GOLDEN + BITMAP))

    def test_errors(self) -> None:
        """
        Invalid types, wrong fixed lengths, REQ_PAGES first, bad RESUME_ACK,
        overlong messages and bad RECV_BITMAP trailers raise specific errors
        at the message's offset.
        """
        cases = [
            (UnknownElementError, "0007 0004 00000000"),
            (UnknownElementError, "0000 0000"),
            (BadLengthError, "0001 0005 0000000000"),
            (BadLengthError, "0003 0014 0000000000aba000 00001000 06 70632e72616d00"),
            (BadRAMRecordError, "0004 000c 0000000000b21000 00001000"),
            (UnknownElementError, "0006 0004 00000002"),
            (LimitExceededError, "0003 0201"),
            (BadLengthError, "0005 0007 06 70632e72616d 0000000000000008 0000000000000000 0123456789abcdee"),
            (BadLengthError, "0005 0007 06 70632e72616d 0000000000000007"),
        ]
        for exception, vector in cases:
            error = self.assertRaises(exception, decode, unhex("0002 0004 00000001") + unhex(vector))
            self.assertTrue(error.offset >= 8, (vector, error.offset))

    def test_bitmapLimit(self) -> None:
        """
        A RECV_BITMAP body over the limit is refused from its size.
        """
        decoder = ReturnPathDecoder(maxBitmapSize=64)
        decoder.receiveData(unhex("0005 0007 06 70632e72616d 0000000000001000"))
        self.assertRaises(LimitExceededError, decoder.nextEvent)

    def test_truncated(self) -> None:
        """
        Input ending inside a message raises L{TruncatedStreamError}.
        """
        self.assertRaises(TruncatedStreamError, decode, GOLDEN[:-2])

    def test_decodeWhole(self) -> None:
        """
        L{ReturnPathDecoder.decodeWhole} (from L{BufferedDecoder}) feeds a
        complete input and its end and returns every event; a truncated
        input raises L{TruncatedStreamError}, again on the next call.
        """
        bitmap = RecvBitmapReceived("/rom@etc/acpi/tables", unhex("ffffffff00000000"))
        self.assertEqual(ReturnPathDecoder().decodeWhole(GOLDEN + BITMAP), [*GOLDEN_EVENTS, bitmap])
        decoder = ReturnPathDecoder()
        self.assertRaises(TruncatedStreamError, decoder.decodeWhole, GOLDEN[:-2])
        self.assertRaises(TruncatedStreamError, decoder.nextEvent)


class ReturnPathEncoderTests(SynchronousTestCase):
    """
    L{ReturnPathEncoder} produces the real bytes and QEMU's
    REQ_PAGES_ID/REQ_PAGES choice.
    """

    def test_golden(self) -> None:
        """
        The encoder's messages equal the captured bytes.
        """
        encoder = ReturnPathEncoder()
        data = (encoder.pong(1) + encoder.requestPages("pc.ram", 0xABA000, 0x1000)
                + encoder.requestPages("pc.ram", 0xB21000, 0x1000) + encoder.shut(0) + encoder.resumeAck())
        self.assertEqual(data, GOLDEN)
        self.assertEqual(encoder.recvBitmap("/rom@etc/acpi/tables", unhex("ffffffff00000000")), BITMAP)

    def test_blockMemory(self) -> None:
        """
        A request names its block when it differs from the previous one, and
        after L{ReturnPathEncoder.reset}.
        """
        encoder = ReturnPathEncoder()
        kinds = [encoder.requestPages(block, 0, 0x1000)[:2] for block in ("a", "a", "b", "a")]
        encoder.reset()
        kinds.append(encoder.requestPages("a", 0, 0x1000)[:2])
        self.assertEqual(kinds, [b"\x00\x03", b"\x00\x04", b"\x00\x03", b"\x00\x03", b"\x00\x03"])

    def test_reEncode(self) -> None:
        """
        Re-encoding decoded events gives back the bytes.
        """
        encoder = ReturnPathEncoder()
        events = decode(GOLDEN + BITMAP)
        self.assertEqual(b"".join(encoder.encode(e) for e in events), GOLDEN + BITMAP)

    def test_localErrors(self) -> None:
        """
        A ragged bitmap and an overlong message are refused locally.
        """
        encoder = ReturnPathEncoder()
        self.assertRaises(LocalProtocolError, encoder.recvBitmap, "pc.ram", b"\x00" * 7)
        self.assertRaises(LocalProtocolError, encoder.requestPages, "x" * 300, 0, 0x1000)
