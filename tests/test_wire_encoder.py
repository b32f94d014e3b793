# -*- test-case-name: tests.test_wire_encoder -*-
"""
Tests for L{twisted_postcopy.wire.encoder} against the golden vectors of
migration-stream.md section 7.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.test_wire_ram import PC_BLOCKS
from tests.wirehelpers import globalstatePayload, unhex
from twisted_postcopy.wire.constants import SectionType
from twisted_postcopy.wire.encoder import StreamEncoder
from twisted_postcopy.wire.events import DeviceSectionReceived
from twisted_postcopy.wire.stream import decodeAll


class EncoderGoldenTests(SynchronousTestCase):
    """
    L{StreamEncoder} writes what a QEMU 7.2 source writes.
    """

    def test_ramStart(self) -> None:
        """
        Vector 7.C: START header, block list, EOS and footer.
        """
        data = StreamEncoder().ramStart(2, PC_BLOCKS)
        self.assertTrue(data.startswith(unhex(
            "01 00 00 00 02 03 72 61 6d 00 00 00 00 00 00 00 04  00 00 00 00 09 0d 20 04")))
        self.assertTrue(data.endswith(unhex("00 00 00 00 00 00 00 10  7e 00 00 00 02")))

    def test_postcopyPartAndEnd(self) -> None:
        """
        Vectors 7.I and 7.K: after a reset the first record of a PART names
        its block; the stream ends with END, EOS, footer, EOF.
        """
        encoder = StreamEncoder()
        encoder.zeroPage("pc.ram", 0)
        encoder.resetLastBlock()
        part = encoder.sectionHeader(SectionType.SECTION_PART, 2) + encoder.page("pc.ram", 0, b"\x00" * 4096)[0]
        self.assertEqual(part, unhex("02 00 00 00 02  00 00 00 00 00 00 00 08 06 70 63 2e 72 61 6d"))
        end = (encoder.eos() + encoder.sectionFooter(2) + encoder.sectionHeader(SectionType.SECTION_END, 2)
               + encoder.eos() + encoder.sectionFooter(2) + encoder.eof())
        self.assertEqual(end, unhex("00 00 00 00 00 00 00 10 7e 00 00 00 02"
                                    "03 00 00 00 02 00 00 00 00 00 00 00 10 7e 00 00 00 02 00"))

    def test_continueAcrossSections(self) -> None:
        """
        The CONTINUE memory persists across section boundaries.
        """
        encoder = StreamEncoder()
        encoder.zeroPage("pc.ram", 0)
        encoder.sectionFooter(2)
        encoder.sectionHeader(SectionType.SECTION_PART, 2)
        self.assertEqual(encoder.zeroPage("pc.ram", 0x1000), unhex("00 00 00 00 00 00 10 22 00"))

    def test_fullSectionHeader(self) -> None:
        """
        Vector 7.J: the C{globalstate} FULL header; its section decodes
        back to the same payload.
        """
        encoder = StreamEncoder()
        header = encoder.sectionHeader(SectionType.SECTION_FULL, 45, "globalstate", 0, 1)
        self.assertEqual(header, unhex(
            "04 00 00 00 2d 0b 67 6c 6f 62 61 6c 73 74 61 74 65 00 00 00 00 00 00 00 01"))
        section = header + globalstatePayload() + encoder.sectionFooter(45)
        [event] = decodeAll(section, header=False)
        self.assertEqual(event, DeviceSectionReceived(SectionType.SECTION_FULL, 45, "globalstate", 0, 1, section))
        self.assertEqual(event.payload, globalstatePayload())

    def test_eofAndVMDescription(self) -> None:
        """
        Vector 7.L: EOF then VMDESCRIPTION with its be32 length.
        """
        encoder = StreamEncoder()
        self.assertEqual(encoder.eof() + encoder.vmDescription(b'{"page_size": 4096}'),
                         unhex("00 06 00 00 00 13") + b'{"page_size": 4096}')

    def test_ownDeviceSection(self) -> None:
        """
        Our guests' sections are FULL, instance 0, version 1, payload
        C{be32 len} + blob.
        """
        data = StreamEncoder().ownDeviceSection(46, "kv", b"state")
        self.assertEqual(data, unhex("04 00 00 00 2e 13") + b"twisted-postcopy/kv"
                         + unhex("00 00 00 00 00 00 00 01 00 00 00 05") + b"state" + unhex("7e 00 00 00 2e"))

    def test_pageIsNotCopied(self) -> None:
        """
        L{StreamEncoder.page} returns the caller's view as the second buffer.
        """
        ram = memoryview(bytearray(4096))
        self.assertIs(StreamEncoder().page("pc.ram", 0, ram)[1], ram)
