# -*- test-case-name: tests.test_hugepages -*-
"""
Huge pages on the destination: host pages assembled from target-page
records before one atomic placement (QEMU's C{ram_load_postcopy}
temporary page), discards in host pages, precopy writes into hugetlbfs.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Callable

from attrs import define
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_demo import demoReport
from twisted_postcopy.destination.placer import PagePlacer
from twisted_postcopy.errors import RAMBlockError, RemoteProtocolError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.ram.block import HUGE_PAGE_SIZE, RAMBlock
from twisted_postcopy.testing.enginevm import OutgoingTestVM
from twisted_postcopy.testing.real import requireUserfaultfd, reserveHugePages
from twisted_postcopy.testing.waiting import waitUntil
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE

PAGE = TARGET_PAGE_SIZE
HUGE = HUGE_PAGE_SIZE
#: Target pages per huge page.
RATIO = HUGE // PAGE
MiB = 1 << 20


@define
class _Block:
    """
    A unit-test stand-in for a destination RAMBlock: only its geometry
    (after LISTEN the placer never touches the block itself).
    """

    idstr: str
    length: int
    pageSize: int


class _Faults:
    """
    A unit-test stand-in for the fault service: records placements with
    their bytes.
    """

    def __init__(self) -> None:
        """
        No placement yet.
        """
        self.calls: list[tuple] = []

    def placePages(self, block: str, offset: int, data: bytes) -> None:
        """
        Record a copy.
        """
        self.calls.append(("copy", block, offset, bytes(data)))

    def placeZero(self, block: str, offset: int, length: int) -> None:
        """
        Record a zero placement.
        """
        self.calls.append(("zero", block, offset, length))


def _target(index: int) -> bytes:
    """
    @param index: a target page index.
    @return: distinct content for it.
    """
    return index.to_bytes(4, "little") * (PAGE // 4)


class HostPageAssemblyTests(SynchronousTestCase):
    """
    After LISTEN the target-page records of a huge page are assembled and
    the host page placed once, whole.
    """

    def setUp(self) -> None:
        """
        A placer over a 4 MiB block of 2 MiB pages and a 4 KiB-page block.
        """
        self.faults = _Faults()
        self.placer = PagePlacer({"mem": _Block("mem", 2 * HUGE, HUGE), "rom": _Block("rom", 4 * PAGE, PAGE)},
                                 self.faults)

    def test_wholeHostPageOnce(self) -> None:
        """
        512 records (one at offset 0x1000, refused before this existed)
        make one placement of the whole host page, with every record's
        bytes at its place; nothing is placed before the last one, not
        even on flush.
        """
        for index in range(RATIO):
            self.placer.page("mem", HUGE + index * PAGE, _target(index))
            if index < RATIO - 1:
                self.placer.flush()
                self.assertEqual(self.faults.calls, [])
        expected = b"".join(_target(index) for index in range(RATIO))
        self.assertEqual(self.faults.calls, [("copy", "mem", HUGE, expected)])

    def test_outOfOrderWithinHostPage(self) -> None:
        """
        The records of one host page may come in any order (QEMU writes
        each at its offset in the temporary page).
        """
        order = list(range(RATIO))[::-1]
        for index in order:
            self.placer.page("mem", index * PAGE, _target(index))
        self.assertEqual(self.faults.calls, [("copy", "mem", 0, b"".join(map(_target, range(RATIO))))])

    def test_zeroRecords(self) -> None:
        """
        A host page of ZERO records only is placed as zero pages; ZERO
        records among PAGE records leave zeros in the copy.
        """
        for index in range(RATIO):
            self.placer.zero("mem", index * PAGE, 0)
        self.assertEqual(self.faults.calls, [("zero", "mem", 0, HUGE)])
        for index in range(RATIO):
            if index % 2:
                self.placer.page("mem", HUGE + index * PAGE, _target(index))
            else:
                self.placer.zero("mem", HUGE + index * PAGE, 0)
        expected = b"".join(_target(i) if i % 2 else bytes(PAGE) for i in range(RATIO))
        self.assertEqual(self.faults.calls[1], ("copy", "mem", HUGE, expected))

    def test_nonSameHostPageRefused(self) -> None:
        """
        A record of another host page while one is incomplete on the same
        channel is refused, naming both.
        """
        self.placer.page("mem", 0, _target(0))
        error = self.assertRaises(RemoteProtocolError, self.placer.page, "mem", HUGE, _target(1))
        self.assertIn("Non-same host page detected on channel 0", str(error))
        self.assertIn("mem:0x0 (1 of 512 target pages)", str(error))
        self.assertEqual(self.faults.calls, [])

    def test_targetPageTwiceRefused(self) -> None:
        """
        The same target page twice within one host page is refused.
        """
        self.placer.page("mem", PAGE, _target(1))
        error = self.assertRaises(RemoteProtocolError, self.placer.zero, "mem", PAGE, 0)
        self.assertIn("sent twice", str(error))

    def test_channelsAssembleApart(self) -> None:
        """
        The main stream and the preempt channel each have their own
        temporary page: interleaved records of two host pages on two
        channels make two placements.
        """
        for index in range(RATIO):
            self.placer.page("mem", index * PAGE, _target(index), 0)
            self.placer.page("mem", HUGE + index * PAGE, _target(index + 1), 1)
        self.assertEqual([call[:3] for call in self.faults.calls], [("copy", "mem", 0), ("copy", "mem", HUGE)])
        self.assertEqual(self.faults.calls[1][3], b"".join(_target(i + 1) for i in range(RATIO)))

    def test_smallPagesUnchanged(self) -> None:
        """
        A 4 KiB-page block's records still go out as runs, beside an
        incomplete huge page.
        """
        self.placer.page("mem", 0, _target(0))
        self.placer.page("rom", 0, _target(7))
        self.placer.page("rom", PAGE, _target(8))
        self.placer.flush()
        self.assertEqual(self.faults.calls, [("copy", "rom", 0, _target(7) + _target(8))])

    def test_partialAtEndRefused(self) -> None:
        """
        The stream must not end inside a host page.
        """
        self.placer.checkComplete()
        self.placer.page("mem", 0, _target(0))
        error = self.assertRaises(RemoteProtocolError, self.placer.checkComplete)
        self.assertIn("stream ended inside huge page(s) mem:0x0 (1 of 512", str(error))

    def test_resetAtPause(self) -> None:
        """
        At a pause the incomplete pages are dropped; after recovery the
        source sends them again whole, which places them.
        """
        for index in range(10):
            self.placer.page("mem", index * PAGE, _target(index))
        self.placer.resetTempPages()
        for index in range(RATIO):
            self.placer.page("mem", index * PAGE, _target(index))
        self.assertEqual(self.faults.calls, [("copy", "mem", 0, b"".join(map(_target, range(RATIO))))])

    def test_discardsInHostPages(self) -> None:
        """
        A discard that does not cover whole host pages is refused (QEMU's
        C{ram_block_discard_range} refuses it too; a QEMU source rounds its
        discards to host pages in C{postcopy_chunk_hostpages}).
        """
        for start, length in ((PAGE, HUGE), (0, PAGE), (0, HUGE + PAGE)):
            error = self.assertRaises(RemoteProtocolError, self.placer.discard, "mem", start, length)
            self.assertIn("Unaligned discard", str(error))

    def test_recordOffsetsInTargetPages(self) -> None:
        """
        Records are target-page aligned; past the end is refused.
        """
        self.assertRaises(RemoteProtocolError, self.placer.page, "mem", 100, _target(0))
        self.assertRaises(RemoteProtocolError, self.placer.page, "mem", 2 * HUGE, _target(0))


class HugetlbfsBlockTests(SynchronousTestCase):
    """
    A real hugetlbfs RAMBlock before LISTEN: precopy records written where
    they belong (hugetlbfs has no C{pwrite}), discards punch host pages.
    """

    def setUp(self) -> None:
        """
        A 4 MiB hugetlbfs block (2 huge pages reserved for the test).
        """
        reserveHugePages(self, 2)
        self.block = RAMBlock("mem", 2 * HUGE, HUGE, "hugetlbfs")
        self.addCleanup(self.block.close)
        self.placer = PagePlacer({"mem": self.block})

    def test_precopyTargetPages(self) -> None:
        """
        Target-page records (PAGE and ZERO) before LISTEN land at their
        offsets, the host pages they touch are received; a host-page
        discard makes its page missing again and reads as zeros.
        """
        self.placer.page("mem", PAGE, _target(1))
        self.placer.page("mem", 2 * PAGE, _target(2))
        self.placer.page("mem", HUGE + 3 * PAGE, _target(3))
        self.placer.zero("mem", 2 * PAGE, 0)
        self.placer.flush()
        self.assertEqual(os.pread(self.block.fd, 3 * PAGE, 0), bytes(PAGE) + _target(1) + bytes(PAGE))
        self.assertEqual(os.pread(self.block.fd, PAGE, HUGE + 3 * PAGE), _target(3))
        self.assertEqual((self.block.receivedMap.test(0), self.block.receivedMap.test(1)), (True, True))
        self.placer.discard("mem", HUGE, HUGE)
        self.assertFalse(self.block.receivedMap.test(1))
        self.assertEqual(os.pread(self.block.fd, PAGE, HUGE + 3 * PAGE), bytes(PAGE))

    def test_writeChecksRange(self) -> None:
        """
        A write must be whole target pages inside the block.
        """
        self.assertRaises(RAMBlockError, self.block.write, 100, bytes(PAGE))
        self.assertRaises(RAMBlockError, self.block.write, 2 * HUGE - PAGE, bytes(2 * PAGE))


def _hugeFill(vm: Any, seed: int) -> None:
    """
    Write a pattern into every third target page of every block (so that
    huge pages mix PAGE and ZERO records).

    @param vm: an L{OutgoingTestVM}.
    @param seed: varies the pattern.
    """
    for index, block in enumerate(vm.blocks):
        for offset in range(0, block.length, 3 * PAGE):
            vm.write(index, offset, struct.pack(">QQ", seed, offset) * 8)


def gateAtRun(dst: Callable[[], MigrationManager], destination: WorkerGuestVM) -> None:
    """
    Prepare L{faultOnMissingPage}: the guest waits for its C{gate}, and the
    destination stops reading its main channel as it handles POSTCOPY_RUN
    (whatever part of its last read follows RUN is still handled, at most
    one huge page).

    @param dst: returns the destination manager.
    @param destination: its guest, before the migration starts.
    """
    destination.gate = Deferred()
    destination.onRun = lambda: dst().destinationFactory.main.transport.pauseProducing()


@inlineCallbacks
def faultOnMissingPage(dst: MigrationManager, destination: WorkerGuestVM) -> Any:
    """
    Make the destination guest fault on a huge page that cannot arrive
    first, without relying on timing: the main channel stopped being read
    at POSTCOPY_RUN (L{gateAtRun}); choose a huge page not received yet,
    let the guest touch it first, and wait until the fault service waits
    for it (its request is then on the return path).

    @param dst: the destination manager (its main connection is paused).
    @param destination: its guest, prepared with L{gateAtRun}.
    @return: (a Deferred firing with) the paused transport and the page.
    """
    yield waitUntil(reactor, lambda: "run" in destination.events or "failed" in destination.events)
    if "run" not in destination.events:
        raise AssertionError(f"the incoming migration failed: {destination.failure}")
    transport = dst.destinationFactory.main.transport
    transport.pauseProducing()
    block = destination.blocks["mem"]
    missing = [page for page in range(block.pages) if not block.receivedMap.test(page)]
    destination.touchFirst = [missing[-1]]
    destination.gate.callback(None)
    yield waitUntil(reactor, lambda: len(dst.incoming.faults.pending) > 0)
    return transport, missing[-1]


class HugePageLoopbackTests(TestCase):
    """
    Our source into our destination over loopback with a hugetlbfs block
    on both sides: the page sizes travel in RAM START, the destination's
    guest (a real worker process on the production fault service) faults
    on 2 MiB pages, each requested whole and placed with one C{UFFDIO_COPY}.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        A source of a 32 MiB hugetlbfs block and a 128 KiB 4 KiB-page
        block; huge pages for both sides.
        """
        reserveHugePages(self, 2 * 16)
        requireUserfaultfd(hugetlb=True, hugePages=1)
        self.source = OutgoingTestVM({"mem": 32 * MiB, "pc.rom": 128 * 1024}, device=b"",
                                     pageSizes={"mem": HUGE})
        _hugeFill(self.source, 3)

    def managers(self, destination: Any) -> tuple[MigrationManager, MigrationManager]:
        """
        @param destination: the incoming VM.
        @return: (source, destination) managers with postcopy-ram on.
        """
        src = MigrationManager(reactor, self.source)
        dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        return src, dst

    @inlineCallbacks
    def test_postcopyHugePages(self) -> None:
        """
        Postcopy starts while most huge pages are still missing; the guest
        first touches one that cannot have arrived (L{faultOnMissingPage}),
        so it is requested (a whole 2 MiB page) and placed with one
        UFFDIO_COPY; then it reads all its RAM.  The memory arrives equal
        to the source's and query-migrate reports C{ram.page-size}
        2097152.
        """
        destination = WorkerGuestVM(reactor)
        self.addCleanup(destination.close)
        src, dst = self.managers(destination)
        gateAtRun(lambda: dst, destination)
        src.setParameters({"max-bandwidth": 64 * 1024})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield src.whenStatus("active")
        self.source.write(0, HUGE + 5 * PAGE, b"late write" * 100)
        src.startPostcopy()
        transport, page = yield faultOnMissingPage(dst, destination)
        yield waitUntil(reactor, lambda: src.queryMigrate()["ram"]["postcopy-requests"] > 0)
        requests = src.queryMigrate()["ram"]["postcopy-requests"]
        transport.resumeProducing()
        yield destination.touchedFirst
        self.assertTrue(destination.blocks["mem"].receivedMap.test(page))
        status = yield src.whenStatus("completed", "failed")
        dstStatus = yield dst.whenStatus("completed", "failed")
        digests = yield destination.done
        self.assertEqual((status, dstStatus), ("completed", "completed"))
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)
        self.assertEqual(destination.blocks["mem"].pageSize, HUGE)
        self.assertEqual(destination.blocks["mem"].backing, "hugetlbfs")
        self.assertGreater(requests, 0)
        info = src.queryMigrate()
        self.assertEqual(info["ram"]["page-size"], HUGE)
        self.assertEqual(destination.service.missingPages(), 0)


class HugePagesOptionTests(SynchronousTestCase):
    """
    C{--hugepages} of C{twistd postcopy} and C{postcopy demo}.
    """

    def test_tapOption(self) -> None:
        """
        C{--hugepages} makes the guest's RAM a 2 MiB-page block; C{--ram}
        must then be a multiple of 2M.
        """
        from twisted.python.usage import UsageError

        from twisted_postcopy.tap import Options, guestSpec

        options = Options()
        options.parseOptions(["--control", "unix:/tmp/hugepages/x.sock", "--hugepages", "--ram", "64M"])
        spec = guestSpec(options)
        self.assertEqual(spec.pageSize, HUGE)
        self.assertEqual(guestSpec(self._options("64M")).pageSize, PAGE)
        error = self.assertRaises(UsageError, Options().parseOptions,
                                  ["--control", "unix:/tmp/hugepages/x.sock", "--hugepages", "--ram", "3M"])
        self.assertIn("multiple of 2M", str(error))

    def test_tapCannotReserve(self) -> None:
        """
        A daemon whose huge pages cannot be reserved exits at start with
        the reservation's error, which names C{/proc/sys/vm/nr_hugepages}.
        """
        from twisted.internet.testing import MemoryReactor

        from twisted_postcopy.errors import UffdUnavailableError
        from twisted_postcopy.ram import support
        from twisted_postcopy.tap import Options, makeService

        def refuse(pages: int) -> Any:
            raise UffdUnavailableError(f"{pages} page(s): /proc/sys/vm/nr_hugepages could not be raised")

        self.patch(support, "reserveHugePages", refuse)
        options = Options()
        options.parseOptions(["--control", "unix:/tmp/hugepages/x.sock", "--hugepages", "--ram", "64M"])
        error = self.assertRaises(SystemExit, makeService, options, MemoryReactor())
        self.assertIn("32 page(s): /proc/sys/vm/nr_hugepages", str(error))

    def _options(self, ram: str) -> Any:
        """
        @param ram: the C{--ram} value.
        @return: parsed options without C{--hugepages}.
        """
        from twisted_postcopy.tap import Options

        options = Options()
        options.parseOptions(["--control", "unix:/tmp/hugepages/x.sock", "--ram", ram])
        return options

    def test_demoOption(self) -> None:
        """
        C{postcopy demo --hugepages} passes C{--hugepages} to both daemons.
        """
        from twisted_postcopy import demo
        from twisted_postcopy.cli import buildParser

        args = buildParser().parse_args(["demo", "--hugepages", "--ram", "32M"])
        for role in ("source", "destination"):
            self.assertEqual(demo.daemonArguments(args, role)[-1], "--hugepages")
        self.assertNotIn("--hugepages", demo.daemonArguments(buildParser().parse_args(["demo"]), "source"))

    def test_guestPageSizeMismatch(self) -> None:
        """
        A destination guest refuses a source whose block has another page
        size, naming the option.
        """
        from twisted_postcopy.errors import MigrationError
        from twisted_postcopy.guests.guest import GuestSpec, IncomingGuest

        guest = IncomingGuest(None, GuestSpec("stress", blocks=(("ram", 4 * MiB),)), "/nonexistent")
        error = self.assertRaises(MigrationError, guest.ramBlocksListed, [("ram", 4 * MiB, HUGE)])
        self.assertIn("--hugepages", str(error))


class DemoHugePagesTests(SynchronousTestCase):
    """
    C{postcopy demo --hugepages --json}: two real daemons whose guests'
    RAM is on hugetlbfs.
    """

    def setUp(self) -> None:
        """
        The destination needs userfaultfd on hugetlbfs; the demo reserves
        its huge pages itself (and gives them back).
        """
        requireUserfaultfd(hugetlb=True, hugePages=0)

    def test_demoJSON(self) -> None:
        """
        The migration completes through postcopy on both sides, the
        destination guest verifies its memory, and query-migrate reports
        C{ram.page-size} 2097152.
        """
        report = demoReport(self, "--hugepages", "--ram", "32M", "--postcopy-after", "0")
        self.assertEqual((report["source"]["status"], report["destination"]["status"]),
                         ("completed", "completed"))
        self.assertTrue(report["verified"], report["guest"])
        self.assertTrue(report["hugepages"])
        self.assertEqual(report["source"]["ram"]["page-size"], HUGE)
        self.assertIn("postcopy-active", report["source-statuses"])


class HugePageRecoveryTests(TestCase):
    """
    Postcopy of a hugetlbfs block paused by a real cut of the connection
    and recovered: the destination's received bitmap is whole host pages,
    incomplete host pages are dropped at the pause and sent again whole,
    and the guest's memory arrives equal to the source's.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        A 32 MiB hugetlbfs block and a 4 KiB-page one; the destination's
        guest is a worker process on the production fault service.
        """
        reserveHugePages(self, 2 * 16)
        requireUserfaultfd(hugetlb=True, hugePages=1)
        self.source = OutgoingTestVM({"mem": 32 * MiB, "pc.rom": 128 * 1024}, device=b"",
                                     pageSizes={"mem": HUGE})
        _hugeFill(self.source, 7)
        self.destination = WorkerGuestVM(reactor)
        gateAtRun(lambda: self.dst, self.destination)
        self.addCleanup(self.destination.close)
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination, self.destination.faultServiceFactory)
        for manager in (self.src, self.dst):
            manager.setCapabilities({"postcopy-ram": True})
        self.src.setParameters({"max-bandwidth": 64 * 1024})

    @inlineCallbacks
    def test_cutAndRecover(self) -> None:
        """
        A cut while the guest waits for its first huge page pauses both
        sides; after C{migrate-recover} and C{migrate resume} (RECV_BITMAP
        answered in whole host pages) the migration completes with the
        guest's memory equal to the source's.
        """
        from twisted_postcopy.testing.relay import RecordingRelay

        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        self.src.migrate(relay.uri)
        yield self.src.whenStatus("active")
        self.src.startPostcopy()
        transport, _ = yield faultOnMissingPage(self.dst, self.destination)
        transport.resumeProducing()
        relay.cut()
        yield self.src.whenStatus("postcopy-paused")
        yield self.dst.whenStatus("postcopy-paused")
        self.assertEqual(self.dst.incoming.placer.temp, {})
        bitmap = self.dst.incoming.faults.receivedBitmap("mem")
        bits = int.from_bytes(bitmap, "little")
        for page in range(32 * MiB // HUGE):
            chunk = (bits >> (page * RATIO)) & ((1 << RATIO) - 1)
            self.assertIn(chunk, (0, (1 << RATIO) - 1), f"huge page {page} partly received")
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        recovery = RecordingRelay(("127.0.0.1", recoverPort.getHost().port))
        self.addCleanup(recovery.close)
        self.src.migrate(recovery.uri, resume=True)
        try:
            status = yield self.src.whenStatus("completed", "failed").addTimeout(60, reactor)
            dstStatus = yield self.dst.whenStatus("completed", "failed").addTimeout(60, reactor)
        except DeferredTimeout:
            self.fail(f"recovery stalled: source {self.src.queryMigrate()}, destination {self.dst.queryMigrate()}, "
                      f"pending {len(self.dst.incoming.faults.pending)}, temp {self.dst.incoming.placer.temp}, "
                      f"relay {[(len(c.forward), len(c.backward)) for c in recovery.connections]}, "
                      f"{self._sourceState()}")
        digests = yield self.destination.done
        self.assertEqual((status, dstStatus), ("completed", "completed"))
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)

    def _sourceState(self) -> str:
        """
        @return: the source's sending state, for a stalled recovery.
        """
        outgoing = self.src.outgoing
        transport = getattr(outgoing.write, "__self__", None)
        protocol = getattr(transport, "protocol", None)
        return (f"written={outgoing.written} stopped={outgoing.stopped} ending={outgoing.ending} "
                f"queue={len(outgoing.scheduler.queue)} transport={transport!r} "
                f"paused={getattr(protocol, 'paused', None)} pending={getattr(protocol, 'pending', None)} "
                f"limited={outgoing.limiter.limited()} bandwidth={outgoing.limiter.bandwidth} "
                f"producer={getattr(transport, 'producer', None)!r} "
                f"producerPaused={getattr(transport, 'producerPaused', None)}")


class SourceRAMStartTests(SynchronousTestCase):
    """
    Our source's RAM START follows QEMU's C{ram_save_setup} rule, and its
    pages, requests and counters are in host pages.
    """

    def setUp(self) -> None:
        """
        A VM of one 2 MiB hugetlbfs block and one 4 KiB-page block.
        """
        reserveHugePages(self, 1)
        self.vm = OutgoingTestVM({"mem": HUGE, "pc.rom": 4 * PAGE}, pageSizes={"mem": HUGE})

    def start(self, postcopy: bool) -> tuple[Any, list[Any]]:
        """
        @param postcopy: the C{postcopy-ram} capability.
        @return: the started migration and the decoded events of what it
            wrote.
        """
        from twisted.internet.task import Clock

        from twisted_postcopy.source.outgoing import OutgoingMigration
        from twisted_postcopy.wire import decodeAll

        chunks: list[bytes] = []
        parameters = {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300}
        migration = OutgoingMigration(self.vm, chunks.append, Clock().seconds, {"postcopy-ram": postcopy},
                                      parameters)
        migration.begin()
        migration.start()
        events = decodeAll(b"".join(chunks), pageSizeBlocks={"mem"} if postcopy else ())
        return migration, events

    def test_pageSizeWithPostcopy(self) -> None:
        """
        With postcopy-ram the huge page block's entry carries 2 MiB (and
        the ADVISE summary has the bit); the 4 KiB block's carries none.
        """
        from twisted_postcopy.wire.events import PostcopyAdvised, RAMBlockInfo, RAMBlocksListed

        migration, events = self.start(True)
        (advise,) = [event for event in events if isinstance(event, PostcopyAdvised)]
        self.assertEqual(advise.pageSizeSummary, HUGE | PAGE)
        (listed,) = [event for event in events if isinstance(event, RAMBlocksListed)]
        self.assertEqual(listed.blocks, (RAMBlockInfo("mem", HUGE, HUGE), RAMBlockInfo("pc.rom", 4 * PAGE)))
        self.assertEqual(migration.stats.pageSize, HUGE)

    def test_noPageSizeWithoutPostcopy(self) -> None:
        """
        Without postcopy-ram no entry carries a page size (a QEMU
        destination would not read one).
        """
        from twisted_postcopy.wire.events import RAMBlockInfo, RAMBlocksListed

        _, events = self.start(False)
        (listed,) = [event for event in events if isinstance(event, RAMBlocksListed)]
        self.assertEqual(listed.blocks, (RAMBlockInfo("mem", HUGE), RAMBlockInfo("pc.rom", 4 * PAGE)))

    def test_requestsInHostPages(self) -> None:
        """
        A request for part of a huge page is refused with QEMU's text; a
        whole one is queued and sent as its 512 target-page records, in
        order, before anything else.
        """
        from twisted_postcopy.source.sender import PageRequestError

        migration, _ = self.start(True)
        scheduler = migration.scheduler
        error = self.assertRaises(PageRequestError, scheduler.queueRequest, "mem", PAGE, PAGE)
        self.assertIn("Misaligned page request", str(error))
        scheduler.queueRequest("mem", 0, HUGE)
        out: list[Any] = []
        migration.records.gather(scheduler, out, 0, 0)
        from twisted_postcopy.wire.ram import RAMRecordDecoder
        from twisted_postcopy.wire.buffer import ReceiveBuffer

        buffer = ReceiveBuffer()
        buffer.feed(b"".join(bytes(piece) for piece in out) + struct.pack(">Q", 0x10))
        decoder = RAMRecordDecoder({"mem": HUGE, "pc.rom": 4 * PAGE})
        offsets = []
        while (event := decoder.nextRecord(buffer)).__class__.__name__ != "RAMSectionEOS":
            offsets.append((event.block, event.offset))
        self.assertEqual(offsets, [("mem", index * PAGE) for index in range(RATIO)])

    def test_discardsInHostPages(self) -> None:
        """
        At the switch to postcopy every dirty page is discarded in whole
        host pages (QEMU's C{postcopy_chunk_hostpages}): 2 MiB ranges for
        the huge page block.
        """
        migration, _ = self.start(True)
        commands = dict(migration.scheduler.discardCommands())
        self.assertEqual(commands["mem"], [(0, HUGE)])
        self.assertEqual(commands["pc.rom"], [(0, 4 * PAGE)])
