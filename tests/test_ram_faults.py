# -*- test-case-name: tests.test_ram_faults -*-
"""
Tests for L{twisted_postcopy.ram.faults}: real userfaultfds, guest worker
processes that fault from C threads, pages that arrive only through faults.
"""

from __future__ import annotations

import hashlib
import os
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.errors import RemoteProtocolError, MappingTableError, PostcopyPaused, RAMBlockError, UffdError
from twisted_postcopy.ram.block import HUGE_PAGE_SIZE, RAMBlock
from twisted_postcopy.ram import faults
from twisted_postcopy.ram.faults import ClientMapping, FaultService
from twisted_postcopy.ram.guestworker import MemoryPageSource, spawnWorker
from twisted_postcopy.testing.real import requireUserfaultfd, reserveHugePages

PAGE = 4096


def _skipUnlessUffd() -> None:
    """
    Give up (L{missingReal}) when userfaultfd is unusable here (the reason
    says why); any other error fails the test.
    """
    requireUserfaultfd()


def pageContents(pages: int, pageSize: int = PAGE, seed: int = 1) -> bytes:
    """
    @param pages: number of pages.
    @param pageSize: page size.
    @param seed: random seed.
    @return: random pages, with every third page all zero.
    """
    rng = random.Random(seed)
    return b"".join(bytes(pageSize) if i % 3 == 1 else rng.randbytes(pageSize) for i in range(pages))


def firstBytes(data: bytes, pageSize: int, first: int, count: int) -> int:
    """
    @return: the sum of the first byte of pages C{first..first+count}
        (what the worker's checksum reports for a read touch).
    """
    return sum(data[i * pageSize] for i in range(first, first + count))


class _Observer:
    """
    Address-keyed fault and placement observers recording calls (what
    blocktime uses); C{faulted} fires at the first fault.
    """

    def __init__(self, service: FaultService) -> None:
        """
        Observe C{service}.
        """
        self.began: list[tuple[int, int, bool]] = []
        self.placed: list[int] = []
        self.faulted: Deferred = Deferred()
        service.addFaultObserver(self.faultBegan)
        service.addPlacementObserver(self.placed.append)

    def faultBegan(self, threadId: int, address: int, received: bool) -> None:
        """
        Record a fault.
        """
        self.began.append((threadId, address, received))
        if not self.faulted.called:
            self.faulted.callback(None)


class _NeverSource:
    """
    A unit-test stand-in for the return path (the production fault service
    is tested against it): records requests and never answers.
    """

    def __init__(self) -> None:
        """
        No requests yet.
        """
        self.requests: list[tuple[str, int]] = []

    def requestPage(self, block: str, offset: int) -> None:
        """
        Record the request (fire-and-forget).
        """
        self.requests.append((block, offset))


class FaultServiceProcessTests(TestCase):
    """
    The fault service on the real reactor with worker processes.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Skip without userfaultfd.
        """
        _skipUnlessUffd()

    def makeService(self, contents: dict[str, bytes], pageSize: int = PAGE, backing: str = "memfd"):
        """
        @return: (service, source, blocks) with cleanups.
        """
        blocks = [RAMBlock(name, len(data), pageSize, backing) for name, data in contents.items()]
        source = MemoryPageSource(contents)
        service = FaultService(reactor, source, blocks)
        source.service = service
        self.addCleanup(lambda: [block.close() for block in blocks])
        self.addCleanup(service.stop)
        return service, source, blocks

    def spawn(self, service, blocks):
        """
        @return: a worker whose exit is awaited at cleanup.
        """
        worker = spawnWorker(reactor, service, blocks)
        self.addCleanup(lambda: worker.ended if worker.ended.called else worker.exit())
        return worker

    @inlineCallbacks
    def test_everyByteThroughFaults(self):
        """
        Pages (random and zero) arrive only through faults: every byte the
        guest reads matches, each page was requested once, and zero pages
        were placed as zero pages.
        """
        data = pageContents(96)
        service, source, blocks = self.makeService({"pc.ram": data})
        worker = self.spawn(service, blocks)
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=96)
        self.assertEqual(answer["checksum"], firstBytes(data, PAGE, 0, 96))
        digest = yield worker.command(op="digest", block=0)
        self.assertEqual(digest["digest"], hashlib.sha256(data).hexdigest())
        self.assertEqual(sorted(source.requests), [("pc.ram", i * PAGE) for i in range(96)])
        self.assertEqual(service.missingPages(), 0)

    @inlineCallbacks
    def test_strideAndMainThread(self):
        """
        A touch with a stride reads exactly every C{stride}-th page from
        C{first} (split between threads, or in the worker's main thread,
        whose id the ready line gave, with C{threads=0}).
        """
        data = pageContents(32, seed=5)
        service, source, blocks = self.makeService({"pc.ram": data})
        worker = self.spawn(service, blocks)
        yield worker.attached
        pages = [1, 8, 15, 22, 29]
        answer = yield worker.command(op="touch", block=0, first=1, count=5, stride=7, threads=2)
        self.assertEqual(answer["checksum"], sum(data[page * PAGE] for page in pages))
        self.assertEqual(sorted(source.requests), [("pc.ram", page * PAGE) for page in pages])
        answer = yield worker.command(op="touch", block=0, first=2, count=3, stride=10, threads=0)
        self.assertEqual(answer["tids"], [worker.tid])
        self.assertEqual(answer["checksum"], sum(data[page * PAGE] for page in (2, 12, 22)))

    @inlineCallbacks
    def test_samePageManyThreads(self):
        """
        Eight threads faulting on the same pages share one request per page
        and all read the placed bytes; their thread ids are reported.
        """
        data = pageContents(4, seed=2)
        service, source, blocks = self.makeService({"pc.ram": data})
        observer = _Observer(service)
        worker = self.spawn(service, blocks)
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=4, threads=8, shared=True)
        self.assertEqual(answer["checksum"], 8 * firstBytes(data, PAGE, 0, 4))
        self.assertEqual(len(source.requests), 4)
        self.assertTrue({began[0] for began in observer.began} <= set(answer["tids"]))
        pages = [blocks[0].address + i * PAGE for i in range(4)]
        self.assertEqual(sorted(observer.placed), pages)
        self.assertTrue({address for _, address, _ in observer.began} <= set(pages))
        self.assertEqual({address for _, address, received in observer.began if not received}, set(pages))

    @inlineCallbacks
    def test_brokenObserver(self):
        """
        An observer that raises is logged; faults are still served.
        """
        data = pageContents(2, seed=11)
        service, source, blocks = self.makeService({"pc.ram": data})
        service.addFaultObserver(lambda *args: 1 / 0)
        worker = self.spawn(service, blocks)
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=2)
        self.assertEqual(answer["checksum"], firstBytes(data, PAGE, 0, 2))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(len(source.requests), 2)

    @inlineCallbacks
    def test_sixteenThreads(self):
        """
        Sixteen threads faulting on distinct pages of one block (more
        threads than CPUs) all read the right bytes.
        """
        data = pageContents(512, seed=10)
        service, source, blocks = self.makeService({"pc.ram": data})
        worker = self.spawn(service, blocks)
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=512, threads=16)
        self.assertEqual(answer["checksum"], firstBytes(data, PAGE, 0, 512))
        self.assertEqual(len(set(answer["tids"])), 16)
        self.assertEqual(len(source.requests), 512)

    @inlineCallbacks
    def test_manyClients(self):
        """
        Four guest processes over two blocks fault concurrently; every page
        is requested once and every process reads the same bytes.
        """
        contents = {"pc.ram": pageContents(64, seed=3), "vga.vram": pageContents(16, seed=4)}
        service, source, blocks = self.makeService(contents)
        workers = [self.spawn(service, blocks) for _ in range(4)]
        for worker in workers:
            yield worker.attached
        answers = [worker.command(op="touch", block=0, first=0, count=64, threads=2) for worker in workers]
        answers += [worker.command(op="touch", block=1, first=0, count=16) for worker in workers]
        for answer, expected in zip(answers, [firstBytes(contents["pc.ram"], PAGE, 0, 64)] * 4
                                    + [firstBytes(contents["vga.vram"], PAGE, 0, 16)] * 4):
            self.assertEqual((yield answer)["checksum"], expected)
        self.assertEqual(len(source.requests), 80)
        self.assertEqual(len(set(source.requests)), 80)

    @inlineCallbacks
    def test_receivedPageWakesAtOnce(self):
        """
        Pages placed in the background before the guest touches them are
        never requested.
        """
        data = pageContents(8, seed=5)
        service, source, blocks = self.makeService({"pc.ram": data})
        service.placePages("pc.ram", 0, data)
        worker = self.spawn(service, blocks)
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=8)
        self.assertEqual(answer["checksum"], firstBytes(data, PAGE, 0, 8))
        self.assertEqual(source.requests, [])

    @inlineCallbacks
    def test_discardThenRefault(self):
        """
        After a discard (hole punch) the guest faults again and reads the
        newly placed bytes.
        """
        first, second = pageContents(8, seed=6), pageContents(8, seed=7)
        service, source, blocks = self.makeService({"pc.ram": first})
        worker = self.spawn(service, blocks)
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=8)
        self.assertEqual(answer["checksum"], firstBytes(first, PAGE, 0, 8))
        blocks[0].discard(2 * PAGE, 4 * PAGE)
        source.contents["pc.ram"] = second
        digest = yield worker.command(op="digest", block=0)
        expected = first[: 2 * PAGE] + second[2 * PAGE : 6 * PAGE] + first[6 * PAGE :]
        self.assertEqual(digest["digest"], hashlib.sha256(expected).hexdigest())
        self.assertEqual(source.requests[8:], [("pc.ram", i * PAGE) for i in range(2, 6)])

    @inlineCallbacks
    def test_clientDiesMidFault(self):
        """
        A guest killed while blocked on a fault is removed (its pidfd fires)
        and another guest of the same block is still served.
        """
        data = pageContents(4, seed=8)
        blocks = [RAMBlock("pc.ram", len(data))]
        self.addCleanup(blocks[0].close)
        never = _NeverSource()
        service = FaultService(reactor, never, blocks)
        self.addCleanup(service.stop)
        observer = _Observer(service)
        doomed = spawnWorker(reactor, service, blocks)
        yield doomed.attached
        doomed.command(op="touch", block=0, first=1, count=1).addErrback(lambda f: None)
        yield observer.faulted
        doomed.transport.signalProcess("KILL")
        yield doomed.ended
        while doomed.client.alive:
            yield _turn()
        self.assertEqual(service.clients, [])
        survivor = self.spawn(service, blocks)
        yield survivor.attached
        touched = survivor.command(op="touch", block=0, first=1, count=1)
        service.placePages("pc.ram", PAGE, data[PAGE : 2 * PAGE])
        self.assertEqual((yield touched)["checksum"], data[PAGE])
        self.assertEqual(never.requests, [("pc.ram", PAGE)])

    @inlineCallbacks
    def test_hugetlbfs(self):
        """
        2 MiB hugetlbfs pages are faulted in (zero pages by copy).
        """
        reserveHugePages(self, 4)
        requireUserfaultfd(hugetlb=True, hugePages=4)
        data = pageContents(2, HUGE_PAGE_SIZE, seed=9) + bytes(HUGE_PAGE_SIZE)
        service, source, blocks = self.makeService({"pc.ram": data}, HUGE_PAGE_SIZE, "hugetlbfs")
        worker = self.spawn(service, blocks)
        yield worker.attached
        digest = yield worker.command(op="digest", block=0)
        self.assertEqual(digest["digest"], hashlib.sha256(data).hexdigest())
        self.assertEqual(len(source.requests), 3)


def _turn() -> Deferred:
    """
    @return: a Deferred firing on the next reactor iteration.
    """
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)


class FaultServiceUnitTests(SynchronousTestCase):
    """
    The service's bookkeeping with a real userfaultfd but no guest.
    """

    def setUp(self) -> None:
        """
        A service over one 16-page block, on a memory reactor.
        """
        _skipUnlessUffd()
        self.block = RAMBlock("pc.ram", 16 * PAGE)
        self.addCleanup(self.block.close)
        self.source = _NeverSource()
        self.service = FaultService(MemoryReactor(), self.source, {"pc.ram": self.block})
        self.addCleanup(self.service.stop)

    def test_interface(self):
        """
        The fault service provides L{IFaultService}; its guest worker's
        in-process page source provides L{IPageSource}.
        """
        from zope.interface.verify import verifyObject

        from twisted_postcopy.interfaces import IFaultService, IPageSource

        self.assertTrue(verifyObject(IFaultService, self.service))
        self.assertTrue(verifyObject(IPageSource, MemoryPageSource({})))

    def test_requestPageShared(self):
        """
        Two waiters of one page make one request; placing it fires both.
        """
        first = self.service.requestPage("pc.ram", 3 * PAGE)
        second = self.service.requestPage("pc.ram", 3 * PAGE + 5)
        self.assertEqual(self.source.requests, [("pc.ram", 3 * PAGE)])
        self.assertNoResult(first)
        self.service.placePages("pc.ram", 2 * PAGE, os.urandom(2 * PAGE))
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(self.service.requestPage("pc.ram", 2 * PAGE)))

    def test_failAll(self):
        """
        C{failAll} fails outstanding waiters; C{rerequestPending} asks again.
        """
        waiting = self.service.requestPage("pc.ram", 0)
        self.service.failAll(PostcopyPaused("paused"))
        self.failureResultOf(waiting, PostcopyPaused)
        self.assertEqual(self.service.rerequestPending(), 1)
        self.assertEqual(self.source.requests, [("pc.ram", 0), ("pc.ram", 0)])

    def test_neverTwice(self):
        """
        A page arrives at most once after LISTEN: placing a range with a
        received page raises L{RemoteProtocolError} and places nothing.
        """
        self.service.placeZero("pc.ram", 0, 4 * PAGE)
        error = self.assertRaises(RemoteProtocolError, self.service.placePages, "pc.ram", 0, os.urandom(8 * PAGE))
        self.assertIn("page pc.ram:0 sent twice after LISTEN", str(error))
        self.assertRaises(RemoteProtocolError, self.service.placeZero, "pc.ram", 3 * PAGE, PAGE)
        self.assertEqual(self.service.missingPages(), 12)
        self.service.placePages("pc.ram", 4 * PAGE, os.urandom(4 * PAGE))
        self.assertEqual(self.service.missingPages(), 8)

    def test_rerequestEveryWantedPage(self):
        """
        Requests are fire-and-forget; after recovery C{rerequestPending}
        asks again for every page still wanted (and only those).
        """
        self.service.requestPage("pc.ram", 0)
        wanted = self.service.requestPage("pc.ram", 5 * PAGE)
        self.addCleanup(wanted.addErrback, lambda failure: None)
        self.service.placePages("pc.ram", 0, os.urandom(PAGE))
        self.assertEqual(self.service.rerequestPending(), 1)
        self.assertEqual(self.source.requests, [("pc.ram", 0), ("pc.ram", 5 * PAGE), ("pc.ram", 5 * PAGE)])

    def test_holes(self):
        """
        Pages received as ZERO before LISTEN are holes: received (no
        request, counted in the received bitmap), given a zero page when
        wanted, and filled by C{fillHoles}; a PAGE may still fill one.
        """
        block = RAMBlock("pc.rom", 8 * PAGE)
        self.addCleanup(block.close)
        block.write(0, os.urandom(PAGE))
        block.writeZero(PAGE, 4 * PAGE)
        service = FaultService(MemoryReactor(), self.source, [block])
        self.addCleanup(service.stop)
        self.assertEqual(service.receivedBitmap("pc.rom"), bytes.fromhex("1f00000000000000"))
        self.assertIsNone(self.successResultOf(service.requestPage("pc.rom", 2 * PAGE)))
        self.assertEqual([block.holeMap.test(page) for page in range(1, 5)], [True, False, True, True])
        service.placePages("pc.rom", 3 * PAGE, os.urandom(PAGE))
        self.assertRaises(RemoteProtocolError, service.placePages, "pc.rom", 3 * PAGE, os.urandom(PAGE))
        service.fillHoles()
        self.assertEqual(block.holeMap.count(), 0)
        self.assertEqual(service.missingPages(), 3)
        self.assertEqual(self.source.requests, [])
        self.assertEqual(service.receivedBitmap("pc.rom"), bytes.fromhex("1f00000000000000"))

    def test_fillUnsent(self):
        """
        C{fillUnsent} places zero pages over every page never received, in
        runs of at most L{faults.ZERO_CHUNK} bytes, and wakes a fault
        waiting on one of them; received pages keep their bytes.
        """
        self.patch(faults, "ZERO_CHUNK", 2 * PAGE)
        data = os.urandom(2 * PAGE)
        self.service.placePages("pc.ram", 3 * PAGE, data)
        waiting = self.service.requestPage("pc.ram", 9 * PAGE)
        zeros: list[tuple[str, int, int]] = []
        placeZero = self.service.placeZero
        self.patch(self.service, "placeZero", lambda *args: (zeros.append(args), placeZero(*args)))
        self.assertEqual(self.service.fillUnsent(), 14)
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(self.service.missingPages(), 0)
        self.assertEqual(zeros, [("pc.ram", 0, 2 * PAGE), ("pc.ram", 2 * PAGE, PAGE)]
                         + [("pc.ram", offset * PAGE, 2 * PAGE) for offset in range(5, 15, 2)]
                         + [("pc.ram", 15 * PAGE, PAGE)])
        self.assertEqual(os.pread(self.block.fd, 16 * PAGE, 0), bytes(3 * PAGE) + data + bytes(11 * PAGE))

    def test_badPlacement(self):
        """
        Placing into an unknown block, past the end or misaligned raises
        L{RAMBlockError}; a misaligned copy never reaches the kernel.
        """
        self.assertRaises(RAMBlockError, self.service.placePages, "nope", 0, bytes(PAGE))
        self.assertRaises(RAMBlockError, self.service.placeZero, "pc.ram", 15 * PAGE, 2 * PAGE)
        self.assertRaises(RAMBlockError, self.service.placePages, "pc.ram", 100, bytes(PAGE))

    def test_badMappingTable(self):
        """
        Mapping tables that do not fit the blocks raise L{MappingTableError}.
        """
        bad = [
            [],
            [ClientMapping(0x10000, "nope", 0, PAGE)],
            [ClientMapping(0x10001, "pc.ram", 0, PAGE)],
            [ClientMapping(0x10000, "pc.ram", 8 * PAGE, 9 * PAGE)],
            [ClientMapping(0x10000, "pc.ram", 0, PAGE, 2 << 20)],
            [ClientMapping(0x10000, "pc.ram", 0, 2 * PAGE), ClientMapping(0x11000, "pc.ram", 4 * PAGE, PAGE)],
            [{"base": 0x10000, "block": "pc.ram"}],
        ]
        for table in bad:
            self.assertRaises(MappingTableError, self.service.addClient, -1, table)

    def test_brokenClientRemoved(self):
        """
        A client whose userfaultfd cannot be read (no API handshake: EINVAL)
        is removed when its descriptor turns readable; its fd is closed.
        """
        from twisted_postcopy.ram import uffd

        fd = uffd.openUffd()
        client = self.service.addClient(fd, [ClientMapping(0x10000, "pc.ram", 0, 16 * PAGE)])
        self.assertEqual(self.service.reactor.getReaders(), client.readers)
        client.readers[0].doRead()
        self.assertFalse(client.alive)
        self.assertEqual((self.service.clients, self.service.reactor.getReaders()), ([], []))
        self.assertRaises(OSError, os.fstat, fd)

    def test_mappingOffsets(self):
        """
        Faults in a client mapping that starts inside a block are turned
        into block offsets; a fault outside the table is ignored; a fault
        on a received page makes no request.
        """
        from twisted_postcopy.ram import uffd

        fd = uffd.openWithFeatures()
        table = [ClientMapping(0x7F0000000000, "pc.ram", 4 * PAGE, 4 * PAGE),
                 ClientMapping(0x7F0000100000, "pc.ram", 12 * PAGE, 2 * PAGE)]
        client = self.service.addClient(fd, table)
        self.service._fault(client, 0x7F0000000000 + 2 * PAGE + 123, 7)
        self.service._fault(client, 0x7F0000100000 + PAGE, 7)
        self.service._fault(client, 0x7F0000200000, 7)
        self.assertEqual(self.source.requests, [("pc.ram", 6 * PAGE), ("pc.ram", 13 * PAGE)])
        self.service.placePages("pc.ram", 6 * PAGE, bytes(PAGE))
        self.service._fault(client, 0x7F0000000000 + 2 * PAGE, 8)
        self.assertEqual(len(self.source.requests), 2)
        self.assertEqual((client.alive, client.faults, self.service.faultCount), (True, 4, 4))

    def test_faultOnHole(self):
        """
        A client's fault on a page received as ZERO before LISTEN is
        answered inside the service with a zero page: no request reaches
        the page source (nothing re-enters the engine), the hole is gone.
        """
        from twisted_postcopy.ram import uffd

        block = RAMBlock("pc.rom", 4 * PAGE)
        self.addCleanup(block.close)
        block.writeZero(PAGE, PAGE)
        service = FaultService(MemoryReactor(), self.source, [block])
        self.addCleanup(service.stop)
        client = service.addClient(uffd.openWithFeatures(), [ClientMapping(0x7F0000000000, "pc.rom", 0, 4 * PAGE)])
        service._fault(client, 0x7F0000000000 + PAGE + 8, 7)
        self.assertEqual((self.source.requests, block.holeMap.count(), client.alive), ([], 0, True))
        service._fault(client, 0x7F0000000000 + 2 * PAGE, 7)
        self.assertEqual(self.source.requests, [("pc.rom", 2 * PAGE)])

    def test_duplicateBlock(self):
        """
        A block cannot be registered twice.
        """
        self.assertRaises(RAMBlockError, self.service.addBlock, self.block)

    def test_registeredBlockRefusesWrite(self):
        """
        Once registered, a block refuses C{pwrite} (which would silently
        fill pages behind the fault service).
        """
        self.assertRaises(RAMBlockError, self.block.write, 0, bytes(PAGE))

    def test_stoppedServiceFailsWaiters(self):
        """
        Stopping the service fails outstanding waiters and closes its uffd.
        """
        waiting = self.service.requestPage("pc.ram", 0)
        self.service.stop()
        self.failureResultOf(waiting)
        self.assertEqual(self.service.uffd, -1)
        self.assertRaises(UffdError, self.service.placeZero, "pc.ram", 0, PAGE)
