# -*- test-case-name: tests.test_wire_encoder -*-
"""
Tests for L{twisted_postcopy.wire.encoder} against the golden vectors of
migration-stream.md section 7.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.test_wire_ram import PC_BLOCKS
from tests.wirehelpers import globalstatePayload, unhex
from twisted_postcopy.wire.constants import SectionType
from twisted_postcopy.wire.encoder import StreamEncoder, encodeEvents
from twisted_postcopy.wire.events import (
    DeviceSectionReceived,
    DiscardReceived,
    PageReceived,
    PingReceived,
    RAMBlockInfo,
    ZeroPageReceived,
)
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

    def test_headerVerbatimConfiguration(self) -> None:
        """
        Vector 7.A, and a captured configuration element (here with the
        capabilities subsection of vector 7.M) is sent unchanged.
        """
        encoder = StreamEncoder()
        self.assertEqual(encoder.header("pc-i440fx-7.2"), unhex(
            "51 45 56 4d 00 00 00 03 07 00 00 00 0d 70 63 2d 69 34 34 30 66 78 2d 37 2e 32"))
        configuration = (unhex("00 00 00 0d") + b"pc-i440fx-7.2" + b"\x05\x1a" + b"configuration/capabilities"
                         + unhex("00 00 00 01 00 00 00 01 0f") + b"x-ignore-shared")
        data = encoder.header("ignored", configuration=configuration)
        self.assertEqual(data, unhex("51 45 56 4d 00 00 00 03 07") + configuration)

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


#: Blocks of the generated streams.
BLOCKS = {"pc.ram": 0x100000, "pc.bios": 0x40000, "x": 0x20000}
_records = st.lists(st.one_of(
    st.tuples(st.just("page"), st.sampled_from(sorted(BLOCKS)), st.integers(0, 1), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("zero"), st.sampled_from(sorted(BLOCKS)), st.integers(0, 1), st.integers(0, 255)),
    st.tuples(st.just("ping"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("discard"), st.sampled_from(sorted(BLOCKS)), st.integers(1, 30)),
    st.tuples(st.just("section")),
), max_size=25)


class GeneratedStreamTests(SynchronousTestCase):
    """
    Streams generated from random element sequences decode to exactly the
    elements encoded, and re-encode to the same bytes.
    """

    @settings(max_examples=40, deadline=None)
    @given(_records, st.booleans())
    def test_roundTrip(self, records: list[tuple], alwaysName: bool) -> None:
        """
        Encode, decode, compare events, re-encode.
        """
        encoder = StreamEncoder(alwaysNameBlock=alwaysName)
        parts = [encoder.header("pc-q35-7.2"), encoder.ramStart(7, [RAMBlockInfo(k, v) for k, v in BLOCKS.items()]),
                 encoder.sectionHeader(SectionType.SECTION_PART, 7)]
        expected: list[tuple] = []
        for record in records:
            if record[0] == "page":
                _, block, page, pattern = record
                data = (pattern * 4096)[:4096]
                parts.extend(encoder.page(block, page * 0x1000, data))
                expected.append(("page", block, page * 0x1000, data))
            elif record[0] == "zero":
                _, block, page, fill = record
                parts.append(encoder.zeroPage(block, page * 0x1000, fill))
                expected.append(("zero", block, page * 0x1000, fill))
            elif record[0] == "ping":
                parts += [encoder.eos(), encoder.sectionFooter(7), encoder.ping(record[1]),
                          encoder.sectionHeader(SectionType.SECTION_PART, 7)]
                expected.append(("ping", record[1]))
            elif record[0] == "discard":
                ranges = [(i * 0x1000, 0x1000) for i in range(record[2])]
                parts += [encoder.eos(), encoder.sectionFooter(7), encoder.discard(record[1], ranges),
                          encoder.sectionHeader(SectionType.SECTION_PART, 7)]
                expected.extend(("discard", record[1], ranges[i:i + 12]) for i in range(0, len(ranges), 12))
            else:
                parts += [encoder.eos(), encoder.sectionFooter(7),
                          encoder.sectionHeader(SectionType.SECTION_END, 7)]
        parts += [encoder.eos(), encoder.sectionFooter(7), encoder.eof()]
        stream = b"".join(bytes(part) for part in parts)
        events = decodeAll(stream)
        self.assertEqual(encodeEvents(events), stream)
        found: list[tuple] = []
        for event in events:
            if isinstance(event, PageReceived):
                found.append(("page", event.block, event.offset, bytes(event.data)))
            elif isinstance(event, ZeroPageReceived):
                found.append(("zero", event.block, event.offset, event.fill))
            elif isinstance(event, PingReceived):
                found.append(("ping", event.value))
            elif isinstance(event, DiscardReceived):
                found.append(("discard", event.block, list(event.ranges)))
        self.assertEqual(found, expected)
