# -*- test-case-name: tests.test_wire_preempt -*-
"""
Tests for L{twisted_postcopy.wire.preempt}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.wirehelpers import decodeChunked, pageBytes, unhex
from twisted_postcopy.errors import BadRAMRecordError, TruncatedStreamError, UnknownElementError
from twisted_postcopy.wire.events import PageReceived, RAMBlockInfo, RAMSectionEOS, ZeroPageReceived
from twisted_postcopy.wire.preempt import PreemptDecoder, PreemptEncoder

BLOCKS = [RAMBlockInfo("pc.ram", 0x10000000)]
#: Section 3.3: the first preempt record (PAGE for pc.ram 0x171d000, data 0x81...).
FIRST = unhex("00000000 0171d008 06 70632e72616d") + b"\x81" + b"\x00" * 4095


def newDecoder() -> PreemptDecoder:
    """
    @return: a decoder for L{BLOCKS}.
    """
    return PreemptDecoder(BLOCKS)


class PreemptTests(SynchronousTestCase):
    """
    The preempt channel carries raw RAM records up to EOS.
    """

    def test_golden(self) -> None:
        """
        The real first record and the final EOS decode, in any chunking, and
        the encoder (naming every block, like 7.2) gives the same bytes.
        """
        data = FIRST + unhex("0000000000000010")
        for size in (1, 100, len(data)):
            events = decodeChunked(newDecoder, data, size)
            self.assertEqual(pageBytes(events), pageBytes(
                [PageReceived("pc.ram", 0x171D000, memoryview(FIRST[15:]), False), RAMSectionEOS()]))
        encoder = PreemptEncoder()
        self.assertEqual(b"".join(encoder.page("pc.ram", 0x171D000, FIRST[15:])) + encoder.eos(), data)

    def test_ownLastBlock(self) -> None:
        """
        CONTINUE on the preempt channel refers to its own previous record.
        """
        encoder = PreemptEncoder(alwaysNameBlock=False)
        data = encoder.zeroPage("pc.ram", 0) + encoder.zeroPage("pc.ram", 0x1000) + encoder.eos()
        decoder = newDecoder()
        decoder.receiveData(data)
        self.assertEqual(list(decoder.events()), [
            ZeroPageReceived("pc.ram", 0, 0, False), ZeroPageReceived("pc.ram", 0x1000, 0, True), RAMSectionEOS()])
        self.assertTrue(decoder.complete)
        self.assertEqual(PreemptEncoder().encodeEvents(decodeChunked(newDecoder, data, 5)), data)

    def test_errors(self) -> None:
        """
        CONTINUE first, data after EOS, and EOF before EOS are errors.
        """
        self.assertRaises(BadRAMRecordError, decodeChunked, newDecoder, unhex("0000000000000022 00"), 100)
        self.assertRaises(UnknownElementError, decodeChunked, newDecoder, unhex("0000000000000010 00"), 100)
        self.assertRaises(TruncatedStreamError, decodeChunked, newDecoder, FIRST, 100)
