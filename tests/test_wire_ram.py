# -*- test-case-name: tests.test_wire_ram -*-
"""
Tests for L{twisted_postcopy.wire.ram} and L{twisted_postcopy.wire.strings}:
RAM records and the START block list, against the spec's golden vectors.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.wirehelpers import unhex
from twisted_postcopy.errors import (
    BadLengthError,
    BadRAMRecordError,
    LimitExceededError,
    LocalProtocolError,
    UnsupportedFeatureError,
)
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.events import (
    NEED_DATA,
    PageReceived,
    RAMBlockInfo,
    RAMBlocksListed,
    RAMSectionEOS,
    ZeroPageReceived,
)
from twisted_postcopy.wire.ram import (
    RAMRecordDecoder,
    RAMRecordEncoder,
    blockListFor,
    encodeBlockList,
    wirePageSize,
)
from twisted_postcopy.wire.strings import encodeStr8

#: migration-stream.md 7.C: the MEM_SIZE word, first and last entries.
BLOCK_LIST_HEAD = unhex("00 00 00 00 09 0d 20 04  06 70 63 2e 72 61 6d 00 00 00 00 08 00 00 00")
#: The 9 RAMBlocks of a minimal pc VM (migration-stream.md 3.5).
PC_BLOCKS = [
    RAMBlockInfo("pc.ram", 0x8000000), RAMBlockInfo("0000:00:02.0/vga.vram", 0x1000000),
    RAMBlockInfo("/rom@etc/acpi/tables", 0x20000), RAMBlockInfo("pc.bios", 0x40000),
    RAMBlockInfo("0000:00:03.0/e1000.rom", 0x40000), RAMBlockInfo("pc.rom", 0x20000),
    RAMBlockInfo("0000:00:02.0/vga.rom", 0x10000), RAMBlockInfo("/rom@etc/table-loader", 0x1000),
    RAMBlockInfo("/rom@etc/acpi/rsdp", 0x1000),
]


def decodeRecords(data: bytes, lengths: dict[str, int] | None = None) -> list:
    """
    @param data: RAM records.
    @param lengths: known block lengths (default: C{pc.ram} of 128 MiB).
    @return: the decoded events up to the first L{NEED_DATA}.
    """
    decoder = RAMRecordDecoder(dict(lengths or {"pc.ram": 0x8000000}))
    buffer = ReceiveBuffer()
    buffer.feed(data)
    events = []
    while (event := decoder.nextRecord(buffer)) is not NEED_DATA:
        events.append(event)
    return events


class RecordDecodingTests(SynchronousTestCase):
    """
    L{RAMRecordDecoder.nextRecord} decodes the records QEMU 7.2 sends.
    """

    def test_goldenZeroRecords(self) -> None:
        """
        Vector 7.D: a ZERO record naming C{pc.ram}, then one with CONTINUE.
        """
        data = unhex("00 00 00 00 00 00 00 02 06 70 63 2e 72 61 6d 00  00 00 00 00 00 00 10 22 00")
        self.assertEqual(decodeRecords(data), [
            ZeroPageReceived("pc.ram", 0, 0, False), ZeroPageReceived("pc.ram", 0x1000, 0, True)])

    def test_goldenPageRecords(self) -> None:
        """
        Vector 7.E: a PAGE record naming its block, then PAGE|CONTINUE; the
        data is a view of the received bytes.
        """
        one, two = bytes(range(256)) * 16, b"\xaa" * 4096
        data = (unhex("00 00 00 00 00 00 00 08 06 70 63 2e 72 61 6d") + one
                + unhex("00 00 00 00 00 00 60 28") + two)
        events = decodeRecords(data)
        self.assertEqual(events, [PageReceived("pc.ram", 0, memoryview(one), False),
                                  PageReceived("pc.ram", 0x6000, memoryview(two), True)])
        self.assertEqual([bytes(e.data) for e in events], [one, two])
        self.assertIsInstance(events[1].data, memoryview)

    def test_eos(self) -> None:
        """
        The EOS word decodes to L{RAMSectionEOS}.
        """
        self.assertEqual(decodeRecords(unhex("00 00 00 00 00 00 00 10")), [RAMSectionEOS()])

    def test_continueCarriesAcrossCalls(self) -> None:
        """
        The last block persists (QEMU keeps it across sections).
        """
        decoder = RAMRecordDecoder({"pc.ram": 0x8000000, "pc.bios": 0x40000})
        buffer = ReceiveBuffer()
        buffer.feed(unhex("00 00 00 00 00 00 10 02 07") + b"pc.bios" + b"\x00")
        decoder.nextRecord(buffer)
        buffer.feed(unhex("00 00 00 00 00 00 20 22 00"))
        self.assertEqual(decoder.nextRecord(buffer), ZeroPageReceived("pc.bios", 0x2000, 0, True))

    def test_unsupportedFlagsNameTheCapability(self) -> None:
        """
        XBZRLE, COMPRESS_PAGE, HOOK and 0x200 raise
        L{UnsupportedFeatureError} naming the capability to switch off,
        with the record's offset.
        """
        cases = {
            "00 00 00 00 00 01 00 60 01 00 03 00 01 f4": "xbzrle",
            "00 00 00 00 00 01 41 20 00 00 06 3a 78 01": "compress",
            "00 00 00 00 00 00 00 80": "rdma",
            "00 00 00 00 00 00 02 00": "multifd",
        }
        for vector, capability in cases.items():
            error = self.assertRaises(UnsupportedFeatureError, decodeRecords, unhex(vector))
            self.assertIn(capability, str(error))
            self.assertEqual(error.offset, 0)

    def test_badFlagCombinations(self) -> None:
        """
        ZERO|MEM_SIZE, FULL, a bare CONTINUE and EOS with extra bits are
        rejected.
        """
        for word in ("06", "01", "20", "30"):
            self.assertRaises(BadRAMRecordError, decodeRecords, unhex("00" * 7 + word + "06") + b"pc.ram")

    def test_continueWithoutPreviousBlock(self) -> None:
        """
        CONTINUE as the first record is an error ("bad migration stream").
        """
        error = self.assertRaises(BadRAMRecordError, decodeRecords, unhex("00 00 00 00 00 00 00 28"))
        self.assertIn("no previous block", str(error))

    def test_unknownBlock(self) -> None:
        """
        A block name not in the START list is rejected.
        """
        error = self.assertRaises(
            BadRAMRecordError, decodeRecords, unhex("00 00 00 00 00 00 00 02 03") + b"xyz\x00")
        self.assertIn("'xyz'", str(error))

    def test_offsetOutsideBlock(self) -> None:
        """
        An offset at or beyond the block's used length is rejected.
        """
        data = unhex("00 00 00 00 08 00 00 02 06") + b"pc.ram\x00"
        self.assertRaises(BadRAMRecordError, decodeRecords, data)
        self.assertRaises(BadRAMRecordError, decodeRecords, unhex("00 00 00 00 00 00 20 02 06") + b"pc.ram\x00",
                          {"pc.ram": 0x2000})

    def test_emptyIdstr(self) -> None:
        """
        A zero-length block name is a read failure in QEMU.
        """
        error = self.assertRaises(BadLengthError, decodeRecords, unhex("00 00 00 00 00 00 00 02 00 00"))
        self.assertEqual(error.offset, 8)

    def test_incompleteRecordNeedsData(self) -> None:
        """
        A record cut short yields nothing and consumes nothing.
        """
        self.assertEqual(decodeRecords(unhex("00 00 00 00 00 00 00 08 06 70 63")), [])
        self.assertEqual(decodeRecords(unhex("00 00 00 00 00 00 00 08 06") + b"pc.ram" + b"\x00" * 4095), [])


class BlockListTests(SynchronousTestCase):
    """
    The MEM_SIZE record of the RAM START section.
    """

    def decode(self, data: bytes, **options: object) -> object:
        """
        @param data: the record.
        @param options: L{RAMRecordDecoder.nextBlockList} options.
        @return: its result.
        """
        buffer = ReceiveBuffer()
        buffer.feed(data)
        return RAMRecordDecoder().nextBlockList(buffer, **options)  # type: ignore[arg-type]

    def test_goldenPcList(self) -> None:
        """
        Vector 7.C: the pc list starts with the total 0x90d2000|MEM_SIZE and
        C{pc.ram}; it round-trips.
        """
        encoded = encodeBlockList(PC_BLOCKS)
        self.assertTrue(encoded.startswith(BLOCK_LIST_HEAD))
        self.assertTrue(encoded.endswith(unhex(
            "12 2f 72 6f 6d 40 65 74 63 2f 61 63 70 69 2f 72 73 64 70 00 00 00 00 00 00 10 00")))
        self.assertEqual(self.decode(encoded), RAMBlocksListed(PC_BLOCKS))

    def test_ignoreSharedAddsMrAddr(self) -> None:
        """
        With x-ignore-shared each entry carries C{be64 mr_addr}.
        """
        blocks = [RAMBlockInfo("pc.ram", 0x8000000, mrAddr=0), RAMBlockInfo("pc.bios", 0x40000, mrAddr=0xFFFC0000)]
        encoded = encodeBlockList(blocks)
        self.assertIn(unhex("06 70 63 2e 72 61 6d 00 00 00 00 08 00 00 00" + " 00" * 8), encoded)
        self.assertEqual(self.decode(encoded, ignoreShared=True), RAMBlocksListed(blocks))

    def test_pageSizeForListedBlocks(self) -> None:
        """
        Blocks named in C{pageSizeBlocks} carry C{be64 page_size}.
        """
        blocks = [RAMBlockInfo("pc.ram", 0x40000000, pageSize=0x200000), RAMBlockInfo("pc.rom", 0x20000)]
        self.assertEqual(self.decode(encodeBlockList(blocks), pageSizeBlocks={"pc.ram"}),
                         RAMBlocksListed(blocks))

    def test_pageSizeFromAdviseSummary(self) -> None:
        """
        When the ADVISE summary has a bit above the target page size, the
        entries that carry a page size are read off the wire: a huge page
        block in the middle or at the end of the list, and none after it
        (the next entry's idstr length, or the EOS word, follows).
        """
        for blocks in ([RAMBlockInfo("mem", 0x800000, pageSize=0x200000), RAMBlockInfo("pc.bios", 0x40000)],
                       [RAMBlockInfo("pc.bios", 0x40000), RAMBlockInfo("mem", 0x800000, pageSize=0x200000)],
                       [RAMBlockInfo("mem", 0x800000, pageSize=0x40000000)]):
            encoded = encodeBlockList(blocks) + unhex("00 00 00 00 00 00 00 10")
            summary = 0x1000
            for block in blocks:
                summary |= block.pageSize or 0x1000
            self.assertEqual(self.decode(encoded, pageSizeSummary=summary), RAMBlocksListed(blocks))

    def test_pageSizeSummaryNeedsLookahead(self) -> None:
        """
        Deciding whether an entry carries a page size waits for the 8 bytes
        after its length; fed byte by byte the list decodes the same.
        """
        blocks = [RAMBlockInfo("mem", 0x400000, pageSize=0x200000), RAMBlockInfo("pc.rom", 0x20000)]
        encoded = encodeBlockList(blocks) + unhex("00 00 00 00 00 00 00 10")
        buffer, decoder = ReceiveBuffer(), RAMRecordDecoder()
        results = []
        for byte in encoded:
            buffer.feed(bytes([byte]))
            results.append(decoder.nextBlockList(buffer, pageSizeSummary=0x201000))
        self.assertIn(RAMBlocksListed(blocks), results)

    def test_smallPagesOnlySummary(self) -> None:
        """
        A summary of the target page size alone means no entry carries
        a page size, whatever follows.
        """
        blocks = [RAMBlockInfo("pc.ram", 0x200000)]
        encoded = encodeBlockList(blocks) + unhex("00 00 00 00 00 20 00 00")
        self.assertEqual(self.decode(encoded, pageSizeSummary=0x1000), RAMBlocksListed(blocks))

    def test_badWirePageSize(self) -> None:
        """
        An explicitly expected page size that is not a power of two is
        refused.
        """
        encoded = encodeBlockList([RAMBlockInfo("mem", 0x400000, pageSize=0x300000)])
        self.assertRaises(BadRAMRecordError, self.decode, encoded, pageSizeBlocks={"mem"})

    def test_wirePageSizeRule(self) -> None:
        """
        QEMU's ram_save_setup rule: a page size only with postcopy-ram and
        only for blocks whose page size is not the target page size.
        """
        self.assertEqual(wirePageSize(0x200000, True), 0x200000)
        self.assertIsNone(wirePageSize(0x200000, False))
        self.assertIsNone(wirePageSize(0x1000, True))

        class Block:
            def __init__(self, idstr: str, length: int, pageSize: int) -> None:
                self.idstr, self.length, self.pageSize = idstr, length, pageSize

        blocks = [Block("mem", 0x400000, 0x200000), Block("pc.rom", 0x20000, 0x1000)]
        self.assertEqual(blockListFor(blocks, True),
                         [RAMBlockInfo("mem", 0x400000, 0x200000), RAMBlockInfo("pc.rom", 0x20000)])
        self.assertEqual(blockListFor(blocks, False),
                         [RAMBlockInfo("mem", 0x400000), RAMBlockInfo("pc.rom", 0x20000)])

    def test_notMemSize(self) -> None:
        """
        A START payload must begin with MEM_SIZE.
        """
        self.assertRaises(BadRAMRecordError, self.decode, unhex("00 00 00 00 00 00 00 10"))

    def test_lengthsExceedTotal(self) -> None:
        """
        Entries whose lengths overshoot the total are rejected.
        """
        data = unhex("00 00 00 00 00 00 10 04 01") + b"a" + unhex("00 00 00 00 00 00 20 00")
        self.assertRaises(BadRAMRecordError, self.decode, data)

    def test_limit(self) -> None:
        """
        A list longer than the limit raises L{LimitExceededError}.
        """
        blocks = [RAMBlockInfo(f"block{i}", 0x1000) for i in range(100)]
        self.assertRaises(LimitExceededError, self.decode, encodeBlockList(blocks), limit=200)


class RecordEncodingTests(SynchronousTestCase):
    """
    L{RAMRecordEncoder} tracks CONTINUE and never copies pages.
    """

    def test_pageBuffersKeepTheView(self) -> None:
        """
        A page record is C{[header, view]} with the caller's very view.
        """
        ram = memoryview(bytearray(8192))
        encoder = RAMRecordEncoder()
        first = encoder.page("pc.ram", 0, ram[:4096])
        second = encoder.page("pc.ram", 0x6000, ram[4096:])
        self.assertEqual(first[0], unhex("00 00 00 00 00 00 00 08 06 70 63 2e 72 61 6d"))
        self.assertEqual(second[0], unhex("00 00 00 00 00 00 60 28"))
        self.assertIs(second[1].obj, ram.obj)

    def test_alwaysNameBlock(self) -> None:
        """
        With C{alwaysNameBlock} every record names its block.
        """
        encoder = RAMRecordEncoder(alwaysNameBlock=True)
        encoder.zeroPage("pc.ram", 0)
        self.assertEqual(encoder.zeroPage("pc.ram", 0x1000), unhex("00 00 00 00 00 00 10 02 06") + b"pc.ram\x00")

    def test_resetNamesTheNextBlock(self) -> None:
        """
        After L{RAMRecordEncoder.reset} the next record names its block.
        """
        encoder = RAMRecordEncoder()
        encoder.zeroPage("pc.ram", 0)
        encoder.reset()
        self.assertEqual(encoder.zeroPage("pc.ram", 0x1000)[8:9], b"\x06")

    def test_localErrors(self) -> None:
        """
        Unaligned offsets, short pages and bad names are refused locally.
        """
        encoder = RAMRecordEncoder()
        self.assertRaises(LocalProtocolError, encoder.zeroPage, "pc.ram", 0x10)
        self.assertRaises(LocalProtocolError, encoder.page, "pc.ram", 0, b"x")
        self.assertRaises(LocalProtocolError, encodeStr8, "")
        self.assertRaises(LocalProtocolError, encodeStr8, "x" * 256)


class PageRunTests(SynchronousTestCase):
    """
    L{RAMRecordEncoder.pageRun}: the source's zero-copy encoding of a run
    of pages straight from guest memory.
    """

    def setUp(self) -> None:
        """
        A 4-page block: pages 1 and 3 hold data, 0 and 2 are zero.
        """
        self.memory = bytearray(4 * 4096)
        self.memory[4096:8192] = b"\x01" * 4096
        self.memory[3 * 4096 + 100] = 7
        self.view = memoryview(self.memory)

    def decode(self, buffers: list) -> list:
        """
        @param buffers: the records.
        @return: their events.
        """
        buffer = ReceiveBuffer()
        buffer.feed(b"".join(bytes(piece) for piece in buffers) + unhex("00 00 00 00 00 00 00 10"))
        decoder = RAMRecordDecoder({"pc.ram": len(self.memory)})
        events = []
        while (event := decoder.nextRecord(buffer)) != RAMSectionEOS():
            events.append(event)
        return events

    def test_zeroCopyAndContinue(self) -> None:
        """
        Zero pages become ZERO records, the others PAGE records whose data
        is the caller's memory itself; only the first record names the block.
        """
        encoder = RAMRecordEncoder()
        out: list = []
        self.assertEqual(encoder.pageRun("pc.ram", self.view, 0, 4 * 4096, out), 2)
        pages = [piece for piece in out if isinstance(piece, memoryview)]
        self.assertEqual(len(pages), 2)
        self.assertIs(pages[0].obj, self.memory)
        events = self.decode(out)
        self.assertEqual([type(event) for event in events],
                         [ZeroPageReceived, PageReceived, ZeroPageReceived, PageReceived])
        self.assertEqual([event.continued for event in events], [False, True, True, True])
        self.assertEqual(bytes(events[3].data), bytes(self.memory[3 * 4096:]))
        self.assertEqual(encoder.lastBlock, "pc.ram")
        out = []
        encoder.pageRun("pc.ram", self.view, 4096, 2 * 4096, out)
        self.assertEqual(bytes(out[0])[:8], (4096 | 0x08 | 0x20).to_bytes(8, "big"))

    def test_alwaysNameBlock(self) -> None:
        """
        With C{alwaysNameBlock} every record names the block.
        """
        out: list = []
        RAMRecordEncoder(alwaysNameBlock=True).pageRun("pc.ram", self.view, 0, 4 * 4096, out)
        self.assertEqual([event.continued for event in self.decode(out)], [False] * 4)

    def test_unaligned(self) -> None:
        """
        An unaligned run start is this side's error.
        """
        self.assertRaises(LocalProtocolError, RAMRecordEncoder().pageRun, "pc.ram", self.view, 100, 4096, [])
