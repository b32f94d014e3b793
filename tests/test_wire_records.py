"""
Tests for the C loops behind L{twisted_postcopy.wire.ram}'s RAM records:
the source's L{RAMRecordEncoder.pageRun} (zero detection and record words
in C) and the decoder's runs of CONTINUE records scanned in C
(L{RAMRecordsReceived}), with hostile lengths.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.test_wire_ram import decodeRecords
from twisted_postcopy.errors import BadRAMRecordError, LocalProtocolError
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.events import (
    NEED_DATA,
    PageReceived,
    RAMRecordsReceived,
    RAMSectionEOS,
    ZeroPageReceived,
)
from twisted_postcopy.wire.ram import RAMRecordDecoder, RAMRecordEncoder
from twisted_postcopy.wire.strings import encodeStr8


class PageRunCTests(SynchronousTestCase):
    """
    L{RAMRecordEncoder.pageRun} through C{tp_ram_encode}.
    """

    def setUp(self) -> None:
        """
        A 4-page block: pages 1 and 3 hold data, 0 and 2 are zero.
        """
        self.memory = bytearray(4 * 4096)
        self.memory[4096:8192] = b"\x01" * 4096
        self.memory[3 * 4096 + 100] = 7
        self.view = memoryview(self.memory)

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
