"""
Tests for L{twisted_postcopy.ram.placement.writeRecords} (C
C{tp_write_records}) and L{twisted_postcopy.ram.faults.FaultService.placeRecords}
(C C{tp_record_runs}, C{tp_uffd_place_records}): precopy and postcopy
records written or placed into a RAMBlock straight from the receive
buffer.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.destination.placer import PagePlacer
from twisted_postcopy.errors import RAMBlockError, RemoteProtocolError
from twisted_postcopy.protocols.dispatch import IncomingStreamReader
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.faults import FaultService
from twisted_postcopy.ram.placement import writeRecords
from twisted_postcopy.testing.real import requireUserfaultfd
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.events import RAMRecordsReceived
from twisted_postcopy.wire.ram import RAMRecordDecoder

PAGE = 4096


def run(records: list[tuple[int, int | bytes]], length: int) -> RAMRecordsReceived:
    """
    @param records: (offset, page bytes or a ZERO fill byte), CONTINUE
        records of C{pc.ram}.
    @param length: the block length the decoder knows.
    @return: them as one decoded run.
    """
    data = b""
    for offset, content in records:
        if isinstance(content, bytes):
            data += (offset | 0x28).to_bytes(8, "big") + content
        else:
            data += (offset | 0x22).to_bytes(8, "big") + bytes((content,))
    decoder = RAMRecordDecoder({"pc.ram": length}, lastBlock="pc.ram", batch=len(records))
    buffer = ReceiveBuffer()
    buffer.feed(data)
    event = decoder.nextRecord(buffer)
    assert isinstance(event, RAMRecordsReceived) and len(event) == len(records), event
    return event


class WriteRecordsTests(SynchronousTestCase):
    """
    L{writeRecords} writes what the records say and marks it received.
    """

    def setUp(self) -> None:
        """
        A 2200-page memfd block (more than one C{pwritev}'s 1024 pages).
        """
        self.pages = 2200
        self.block = RAMBlock("pc.ram", self.pages * PAGE)
        self.addCleanup(self.block.close)

    def content(self) -> bytes:
        """
        @return: the block's bytes, read from its memfd.
        """
        return os.pread(self.block.fd, self.block.length, 0)

    def test_runsAndHoles(self) -> None:
        """
        Consecutive pages (over 1024 of them), pages out of order, zero
        runs and a non-zero fill all land where they belong, with their
        received and hole bits.
        """
        os.pwrite(self.block.fd, b"\xee" * PAGE * 4, 1100 * PAGE)
        records: list[tuple[int, int | bytes]] = []
        expected = bytearray(self.block.length)
        expected[1100 * PAGE:1104 * PAGE] = b"\xee" * PAGE * 4
        for page in list(range(0, 1100)) + [2000, 1500]:
            content = page.to_bytes(2, "big") * (PAGE // 2)
            records.append((page * PAGE, content))
            expected[page * PAGE:(page + 1) * PAGE] = content
        records += [(1100 * PAGE, 0), (1101 * PAGE, 0), (1102 * PAGE, 0), (1103 * PAGE, 7), (1200 * PAGE, 0)]
        expected[1100 * PAGE:1103 * PAGE] = bytes(3 * PAGE)
        expected[1103 * PAGE:1104 * PAGE] = b"\x07" * PAGE
        records.append((2199 * PAGE, b"\x01" * PAGE))
        expected[2199 * PAGE:] = b"\x01" * PAGE
        writeRecords(self.block, run(records, self.block.length))
        self.assertEqual(self.content(), bytes(expected))
        received = [page for page in range(self.pages) if self.block.receivedMap.test(page)]
        self.assertEqual(received, list(range(1104)) + [1200, 1500, 2000, 2199])
        holes = [page for page in range(self.pages) if self.block.holeMap.test(page)]
        self.assertEqual(holes, [1100, 1101, 1102, 1200])

    def test_manyRuns(self) -> None:
        """
        More separate runs than one C call reports are all written.
        """
        records: list[tuple[int, int | bytes]] = [(page * PAGE, bytes((page % 250 + 1,)) * PAGE)
                                                  for page in range(0, 2 * 200, 2)]
        writeRecords(self.block, run(records, self.block.length))
        content = self.content()
        for page in range(0, 400, 2):
            self.assertEqual(content[page * PAGE:page * PAGE + 1], bytes((page % 250 + 1,)), page)
        self.assertEqual(self.block.receivedMap.count(), 200)

    def test_pastTheEnd(self) -> None:
        """
        A page past the block's end (the decoder knew a longer block) is
        the peer's error; the pages before it are written.
        """
        records: list[tuple[int, int | bytes]] = [(0, b"\x01" * PAGE), (self.pages * PAGE, b"\x02" * PAGE)]
        error = self.assertRaises(RemoteProtocolError, writeRecords, self.block,
                                  run(records, 2 * self.block.length))
        self.assertIn(f"Illegal RAM offset {self.pages * PAGE:x}", str(error))
        self.assertTrue(self.block.receivedMap.test(0))
        zeros: list[tuple[int, int | bytes]] = [(self.pages * PAGE, 0)]
        self.assertRaises(RemoteProtocolError, writeRecords, self.block, run(zeros, 2 * self.block.length))

    def test_recordsOutsideTheirData(self) -> None:
        """
        Records not made by the decoder whose pages lie past their data are
        refused before anything is written.
        """
        good = run([(0, b"\x01" * PAGE), (PAGE, 0), (2 * PAGE, b"\x02" * PAGE)], self.block.length)
        for data in (good.data[:-1], good.data[:8]):
            self.assertRaises(ValueError, writeRecords, self.block,
                              RAMRecordsReceived("pc.ram", data, good.words, good.payloads))
        self.assertRaises(ValueError, writeRecords, self.block,
                          RAMRecordsReceived("pc.ram", good.data, good.words[:2], good.payloads))
        self.assertEqual(self.block.receivedMap.count(), 0)
        self.assertEqual(self.content(), bytes(self.block.length))

    def test_registered(self) -> None:
        """
        A block registered with userfaultfd is never written.
        """
        self.block.registered = True
        self.assertRaises(RAMBlockError, writeRecords, self.block, run([(0, b"\x01" * PAGE)], self.block.length))

    def test_placerFallsBackRecordByRecord(self) -> None:
        """
        A placer whose blocks are not memfd RAMBlocks of 4 KiB pages does
        not take a run; the main stream's reader then gives it the records
        one by one, with the same result.
        """
        written: list = []

        class Block:
            length, pageSize = 4 * PAGE, PAGE

            def write(self, offset: int, data: bytes) -> None:
                written.append((offset, bytes(data)))

            def writeZero(self, offset: int, length: int) -> None:
                written.append((offset, length))

        placer = PagePlacer({"pc.ram": Block()})
        records = run([(0, b"\x01" * PAGE), (PAGE, b"\x02" * PAGE), (3 * PAGE, 0)], 4 * PAGE)
        self.assertFalse(placer.records("pc.ram", records))

        class Incoming:
            def records(self, idstr: str, records: RAMRecordsReceived) -> bool:
                return placer.records(idstr, records)

            def page(self, idstr: str, offset: int, data: bytes) -> None:
                placer.page(idstr, offset, data)

            def zero(self, idstr: str, offset: int, fill: int) -> None:
                placer.zero(idstr, offset, fill, PAGE)

        IncomingStreamReader(Incoming())._records(records)
        placer.flush()
        self.assertEqual(written, [(0, b"\x01" * PAGE + b"\x02" * PAGE), (3 * PAGE, PAGE)])


class _Never:
    """
    A page source that never answers (requests are only counted).
    """

    def __init__(self) -> None:
        """
        No requests yet.
        """
        self.requests: list = []

    def requestPage(self, block: str, offset: int) -> None:
        """
        @param block: the idstr.
        @param offset: the page offset.
        """
        self.requests.append((block, offset))


class PlaceRecordsTests(SynchronousTestCase):
    """
    L{FaultService.placeRecords}: postcopy records placed straight from the
    receive buffer, with a real userfaultfd.
    """

    def setUp(self) -> None:
        """
        A fault service over one 300-page block.
        """
        requireUserfaultfd()
        self.block = RAMBlock("pc.ram", 300 * PAGE)
        self.addCleanup(self.block.close)
        self.service = FaultService(MemoryReactor(), _Never(), {"pc.ram": self.block})
        self.addCleanup(self.service.stop)

    def test_placed(self) -> None:
        """
        Pages, zero pages and a non-zero fill land where they belong, are
        marked received, and what waited for them is released.
        """
        waited = self.service.requestPage("pc.ram", 101 * PAGE)
        records: list[tuple[int, int | bytes]] = [(page * PAGE, bytes((page % 200 + 1,)) * PAGE)
                                                  for page in list(range(100, 103)) + [7] + list(range(150, 300, 2))]
        records += [(10 * PAGE, 0), (11 * PAGE, 0), (12 * PAGE, 5)]
        self.service.placeRecords("pc.ram", run(records, self.block.length))
        self.assertIsNone(self.successResultOf(waited))
        content = os.pread(self.block.fd, self.block.length, 0)
        for offset, value in records:
            expected = value if isinstance(value, bytes) else bytes((value,)) * PAGE
            self.assertEqual(content[offset:offset + PAGE], expected, offset // PAGE)
        self.assertEqual(self.block.receivedMap.count(), len(records))
        self.assertEqual(self.service.missingPages(), 300 - len(records))

    def test_sentTwice(self) -> None:
        """
        A page already received is the peer's error; the runs before it
        are placed.
        """
        self.service.placePages("pc.ram", 5 * PAGE, b"\x01" * PAGE)
        error = self.assertRaises(RemoteProtocolError, self.service.placeRecords, "pc.ram",
                                  run([(0, b"\x02" * PAGE), (5 * PAGE, b"\x03" * PAGE)], self.block.length))
        self.assertIn("sent twice", str(error))
        self.assertTrue(self.block.receivedMap.test(0))

    def test_outside(self) -> None:
        """
        A record past the block (the decoder knew a longer one) is refused.
        """
        self.assertRaises(RAMBlockError, self.service.placeRecords, "pc.ram",
                          run([(300 * PAGE, b"\x02" * PAGE)], 2 * self.block.length))
        self.assertRaises(RAMBlockError, self.service.placeRecords, "other", run([(0, 0)], PAGE))

    def test_runs(self) -> None:
        """
        C{tp_record_runs} splits on a gap, a change of kind and a non-zero
        fill (alone), and stops at C{maxRuns}.
        """
        records = run([(0, b"\x01" * PAGE), (PAGE, b"\x01" * PAGE), (2 * PAGE, 0), (3 * PAGE, 0), (4 * PAGE, 9),
                       (5 * PAGE, 9), (7 * PAGE, b"\x01" * PAGE)], 8 * PAGE)
        runs, after = ffi.new("uint64_t[]", 4 * 8), ffi.new("uint64_t *")
        with ffi.from_buffer(records.data) as data, ffi.from_buffer("uint64_t[]", records.words) as words, \
                ffi.from_buffer("uint32_t[]", records.payloads) as payloads:
            length = len(records.data)
            found = lib.tp_record_runs(data, length, words, payloads, 0, 7, runs, 8, after)
            self.assertEqual((found, after[0]), (5, 7))
            self.assertEqual([tuple(runs[4 * k:4 * k + 4]) for k in range(found)],
                             [(0, 2 * PAGE, 0, 1), (2 * PAGE, 2 * PAGE, 2, 0), (4 * PAGE, PAGE, 4, 2),
                              (5 * PAGE, PAGE, 5, 2), (7 * PAGE, PAGE, 6, 1)])
            self.assertEqual((lib.tp_record_runs(data, length, words, payloads, 1, 7, runs, 2, after), after[0]),
                             (2, 4))
            self.assertEqual((lib.tp_record_runs(data, length, words, payloads, 7, 7, runs, 2, after), after[0]),
                             (0, 7))
            self.assertEqual(lib.tp_record_runs(data, length - 1, words, payloads, 0, 7, runs, 8, after), -22)

    def test_recordsOutsideTheirData(self) -> None:
        """
        Records not made by the decoder whose pages lie past their data are
        refused before anything is read or placed.
        """
        good = run([(0, b"\x01" * PAGE), (PAGE, b"\x02" * PAGE)], self.block.length)
        bad = RAMRecordsReceived("pc.ram", good.data[:-1], good.words, good.payloads)
        self.assertRaises(ValueError, self.service.placeRecords, "pc.ram", bad)
        short = RAMRecordsReceived("pc.ram", good.data, good.words, good.payloads[:1])
        self.assertRaises(ValueError, self.service.placeRecords, "pc.ram", short)
        self.assertEqual(self.block.receivedMap.count(), 0)
