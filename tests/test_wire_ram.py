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
    RAMRecordsReceived,
    RAMSectionEOS,
    ZeroPageReceived,
)
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.wire.ram import RAMRecordDecoder, RAMRecordEncoder, encodeBlockList
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

    def test_outsideBlock(self) -> None:
        """
        A run past the end of the block's memory is this side's error
        (the C loop never reads past the view).
        """
        for start, end in [(0, 5 * 4096), (3 * 4096, 5 * 4096)]:
            encoder = RAMRecordEncoder()
            encoder.lastBlock = "pc.ram"
            self.assertRaises(LocalProtocolError, encoder.pageRun, "pc.ram", self.view, start, end, [])

    def test_zeroRunIsOneBuffer(self) -> None:
        """
        Consecutive zero pages after the first record are one buffer of
        ZERO records; a page whose only non-zero byte is the last is a PAGE.
        """
        memory = bytearray(8 * 4096)
        memory[8 * 4096 - 1] = 1
        encoder = RAMRecordEncoder()
        out: list = []
        self.assertEqual(encoder.pageRun("pc.ram", memoryview(memory), 0, 8 * 4096, out), 1)
        self.assertEqual([len(piece) for piece in out], [8 + 1 + 6 + 1, 6 * 9 + 8, 4096])
        events = decodeRecords(b"".join(bytes(piece) for piece in out), {"pc.ram": len(memory)})
        self.assertEqual([type(event) for event in events], [ZeroPageReceived] * 7 + [PageReceived])
        self.assertEqual([event.offset for event in events], [page * 4096 for page in range(8)])


def batchDecode(data: bytes, chunk: int, batch: int, lengths: dict[str, int]) -> list:
    """
    @param data: RAM records ending with EOS.
    @param chunk: the size of the pieces the buffer is fed.
    @param batch: the decoder's C{batch}.
    @param lengths: the block lengths.
    @return: the events up to EOS, runs split into one event per record.
    """
    decoder = RAMRecordDecoder(dict(lengths), batch=batch)
    buffer = ReceiveBuffer()
    for start in range(0, len(data), chunk):
        buffer.feed(data[start:start + chunk])
    buffer.feed(b"")
    events = []
    while (event := decoder.nextRecord(buffer)) != RAMSectionEOS():
        if event is NEED_DATA:
            raise AssertionError("truncated")
        if isinstance(event, RAMRecordsReceived):
            assert 0 < len(event) <= batch, len(event)
            events.extend(event.records())
        else:
            events.append(event)
    return events


class BatchDecodingTests(SynchronousTestCase):
    """
    With C{batch} set, runs of CONTINUE records are scanned in C into
    L{RAMRecordsReceived}; they mean exactly what the same records decoded
    one by one mean, and bad records fail at the same place.
    """

    def stream(self) -> bytes:
        """
        @return: mixed records of two blocks (named and CONTINUE, PAGE and
            ZERO with a non-zero fill), then EOS.
        """
        encoder = RAMRecordEncoder()
        pieces: list = []
        for page in range(40):
            block = "pc.ram" if page < 30 else "other"
            if page % 3:
                pieces += encoder.page(block, page * 4096, bytes([page]) * 4096)
            else:
                pieces.append(encoder.zeroPage(block, page * 4096, fill=page % 2))
        pieces.append(encoder.eos())
        return b"".join(bytes(piece) for piece in pieces)

    def test_sameEventsAnyChunking(self) -> None:
        """
        Any chunking and batch size gives the per-record events, and a run
        re-encodes to its own bytes.
        """
        data = self.stream()
        lengths = {"pc.ram": 64 * 4096, "other": 64 * 4096}
        expected = decodeRecords(data, lengths)[:-1]
        for chunk in (1, 7, 4096, 4104, 5000, 65536, len(data)):
            for batch in (1, 3, 256):
                events = batchDecode(data, chunk, batch, lengths)
                self.assertEqual(events, expected, (chunk, batch))
                self.assertEqual([bytes(e.data) for e in events if isinstance(e, PageReceived)],
                                 [bytes(e.data) for e in expected if isinstance(e, PageReceived)])
        decoder = RAMRecordDecoder(dict(lengths), batch=256)
        buffer = ReceiveBuffer()
        buffer.feed(data)
        encoder = RAMRecordEncoder()
        again = []
        while (event := decoder.nextRecord(buffer)) is not NEED_DATA:
            again += encoder.encode(event)
        self.assertEqual(b"".join(bytes(piece) for piece in again), data)

    def test_offsetOutsideBlockMidRun(self) -> None:
        """
        A record past the block's end inside a run: the records before it
        are delivered, then the same error as without batching.
        """
        encoder = RAMRecordEncoder()
        pieces = encoder.page("pc.ram", 0, b"\x01" * 4096) + encoder.page("pc.ram", 4096, b"\x02" * 4096)
        pieces.append(encoder.zeroPage("pc.ram", 2 * 4096))
        pieces.append((0x10000 | 0x28).to_bytes(8, "big") + b"\x03" * 4096)
        data = b"".join(bytes(piece) for piece in pieces)
        lengths = {"pc.ram": 0x10000}
        plain = self.assertRaises(BadRAMRecordError, decodeRecords, data, lengths)
        decoder = RAMRecordDecoder(dict(lengths), batch=256)
        buffer = ReceiveBuffer()
        buffer.feed(data)
        first = decoder.nextRecord(buffer)
        self.assertIsInstance(first, PageReceived)
        run = decoder.nextRecord(buffer)
        self.assertIsInstance(run, RAMRecordsReceived)
        self.assertEqual([word & ~0xFFF for word in run.words], [4096, 2 * 4096])
        error = self.assertRaises(BadRAMRecordError, decoder.nextRecord, buffer)
        self.assertEqual((str(error), error.offset), (str(plain), plain.offset))

    def test_hostileRecordsStopTheScan(self) -> None:
        """
        Unsupported flags, unknown flags, a CONTINUE before any block and a
        truncated record are left to the record decoder and fail as they
        do without batching.
        """
        good = (0x28).to_bytes(8, "big") + b"\x01" * 4096
        named = (0x08).to_bytes(8, "big") + encodeStr8("pc.ram") + b"\x05" * 4096
        cases = [
            named + good + (0x40 | 0x20).to_bytes(8, "big") + b"\x00" * 100,
            named + good + (0x28 | 0x100).to_bytes(8, "big") + b"\x00" * 4096,
            named + (0x22 | 0x01).to_bytes(8, "big") + b"\x00",
            good,
        ]
        for data in cases:
            plain = self.assertRaises(Exception, decodeRecords, data)
            batched = self.assertRaises(Exception, batchDecode, data, 4096, 256, {"pc.ram": 0x8000000})
            self.assertEqual((type(batched), str(batched)), (type(plain), str(plain)))
        truncated = named + good + good[:-1]
        self.assertRaises(AssertionError, batchDecode, truncated, 4096, 256, {"pc.ram": 0x8000000})


class CRecordLoopTests(SynchronousTestCase):
    """
    The C loops of C{ram/_uffd_build.py} behind the RAM records, at hostile
    lengths.
    """

    def test_bufferIsZero(self) -> None:
        """
        C{tp_buffer_is_zero} sees a single non-zero byte anywhere, at any
        length, and reads no byte past C{length}.
        """
        for length in (0, 1, 7, 8, 9, 63, 64, 65, 71, 72, 127, 4095, 4096, 4097):
            zeros = bytes(length)
            self.assertEqual(lib.tp_buffer_is_zero(ffi.from_buffer(zeros), length), 1, length)
            for where in {0, length // 2, length - 1} if length else ():
                data = bytearray(length)
                data[where] = 0x80
                self.assertEqual(lib.tp_buffer_is_zero(ffi.from_buffer(data), length), 0, (length, where))
            padded = bytes(length) + b"\x01"
            self.assertEqual(lib.tp_buffer_is_zero(ffi.from_buffer(padded), length), 1, length)

    def scan(self, data: bytes, blockLength: int = 1 << 30, limit: int = 64) -> tuple[int, int, list]:
        """
        @return: C{tp_ram_scan}'s count, consumed bytes and words.
        """
        words, payloads, consumed = ffi.new("uint64_t[]", limit), ffi.new("uint32_t[]", limit), ffi.new("uint64_t *")
        count = lib.tp_ram_scan(ffi.from_buffer(data), len(data), blockLength, limit, words, payloads, consumed)
        return count, consumed[0], [words[i] for i in range(count)]

    def test_scanLengths(self) -> None:
        """
        C{tp_ram_scan} stops before a record that is not whole: a lone
        word, a page one byte short, a ZERO without its fill byte; and at
        its limit.
        """
        page = (0x28).to_bytes(8, "big") + b"\x01" * 4096
        zero = (0x1000 | 0x22).to_bytes(8, "big") + b"\x00"
        self.assertEqual(self.scan(b""), (0, 0, []))
        self.assertEqual(self.scan(page[:7]), (0, 0, []))
        self.assertEqual(self.scan(page[:-1]), (0, 0, []))
        self.assertEqual(self.scan(zero[:-1]), (0, 0, []))
        self.assertEqual(self.scan(page + zero + page[:8])[:2], (2, len(page) + len(zero)))
        self.assertEqual(self.scan(zero * 10, limit=4)[:2], (4, 36))
        self.assertEqual(self.scan(zero * 3, limit=0)[:2], (0, 0))

    def test_scanStopsAtOtherRecords(self) -> None:
        """
        Anything but a CONTINUE PAGE or ZERO record (named, EOS, extra
        flag bits), and an offset not below the block length, stops it.
        """
        zero = (0x1000 | 0x22).to_bytes(8, "big") + b"\x00"
        for word in (0x08, 0x02, 0x10, 0x28 | 0x40, 0x28 | 0x01, 0x22 | 0x100):
            self.assertEqual(self.scan(zero + word.to_bytes(8, "big") + bytes(4200))[:2], (1, 9), hex(word))
        self.assertEqual(self.scan(zero + (0x2000 | 0x22).to_bytes(8, "big") + b"\x00", 0x2000)[:2], (1, 9))
        self.assertEqual(self.scan(zero, 0x1000)[:2], (0, 0))

    def test_encodeRun(self) -> None:
        """
        C{tp_ram_encode} refuses an unaligned start; zero pages become
        ZERO records, others PAGE words followed by their data's place.
        """
        memory = bytearray(3 * 4096)
        memory[4096 + 4095] = 9
        out, splits, pages = ffi.new("char[]", 27), ffi.new("uint32_t[]", 3), ffi.new("uint32_t[]", 3)
        written = ffi.new("uint64_t *")
        self.assertEqual(lib.tp_ram_encode(ffi.from_buffer(memory), 1, 3, out, splits, pages, written), -22)
        self.assertEqual(lib.tp_ram_encode(ffi.from_buffer(memory), 0, 0, out, splits, pages, written), 0)
        self.assertEqual(written[0], 0)
        self.assertEqual(lib.tp_ram_encode(ffi.from_buffer(memory), 0, 3, out, splits, pages, written), 1)
        self.assertEqual((written[0], splits[0], pages[0]), (9 + 8 + 9, 17, 1))
        self.assertEqual(ffi.buffer(out, 26)[:], (0x22).to_bytes(8, "big") + b"\x00" + (0x1028).to_bytes(8, "big")
                         + (0x2022).to_bytes(8, "big") + b"\x00")


class BatchChunkingTests(SynchronousTestCase):
    """
    Runs of small records stay batched across chunk boundaries.
    """

    def test_zeroRecordsAcrossChunks(self) -> None:
        """
        ZERO records fed in 64 KiB chunks come in runs of C{batch} records
        but for a few around each chunk boundary.
        """
        encoder = RAMRecordEncoder()
        pages = 20000
        data = b"".join(encoder.zeroPage("pc.ram", page * 4096) for page in range(pages)) + encoder.eos()
        decoder = RAMRecordDecoder({"pc.ram": pages * 4096}, batch=256)
        buffer = ReceiveBuffer()
        for start in range(0, len(data), 65536):
            buffer.feed(data[start:start + 65536])
        events, records = 0, 0
        while (event := decoder.nextRecord(buffer)) != RAMSectionEOS():
            events += 1
            records += len(event) if isinstance(event, RAMRecordsReceived) else 1
        self.assertEqual(records, pages)
        chunks = -(-len(data) // 65536)
        self.assertLessEqual(events, pages // 256 + 4 * chunks)
