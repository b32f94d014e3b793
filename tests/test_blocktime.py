# -*- test-case-name: tests.test_blocktime -*-
"""
Tests for L{twisted_postcopy.blocktime}.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.blocktime import BlocktimeContext
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.faults import FaultService
from twisted_postcopy.ram.guestworker import MemoryPageSource, spawnWorker
from twisted_postcopy.testing.real import requireUserfaultfd

PAGE = 4096


def _context(threads: list[int]) -> tuple[Clock, BlocktimeContext]:
    """
    @param threads: vCPU thread ids.
    @return: a clock and a context created at its time 0.
    """
    clock = Clock()
    return clock, BlocktimeContext(threads, clock.seconds)


class BlocktimeTests(SynchronousTestCase):
    """
    QEMU's blocktime algorithm.
    """

    def test_oneVcpu(self) -> None:
        """
        With one vCPU, the total equals the vCPU's figure.
        """
        clock, context = _context([100])
        clock.advance(1)
        context.faultBegan(100, 0x1000)
        clock.advance(0.25)
        context.pagePlaced(0x1000)
        self.assertEqual(context.query(), {"postcopy-blocktime": 250,
                                           "postcopy-vcpu-blocktime": [250]})

    def test_idleVcpuKeepsTotalZero(self) -> None:
        """
        A vCPU that never faults keeps the overall figure at 0.
        """
        clock, context = _context([1, 2])
        clock.advance(1)
        context.faultBegan(1, 0x2000)
        clock.advance(3.1)
        context.pagePlaced(0x2000)
        self.assertEqual(context.query(), {"postcopy-blocktime": 0,
                                           "postcopy-vcpu-blocktime": [3100, 0]})

    def test_allBlockedOverlap(self) -> None:
        """
        When both vCPUs are blocked, the placement that unblocks one adds the
        time since the latest fault start.
        """
        clock, context = _context([1, 2])
        clock.advance(0.01)
        context.faultBegan(1, 0x1000)
        clock.advance(0.1)
        context.faultBegan(2, 0x3000)
        clock.advance(0.05)
        context.pagePlaced(0x3000)
        clock.advance(0.05)
        context.pagePlaced(0x1000)
        self.assertEqual(context.total, 50)
        self.assertEqual(context.vcpuTotal, [200, 50])
        self.assertEqual(context.blockedCount, 0)

    def test_nonVcpuAndOtherAddresses(self) -> None:
        """
        Faults from other threads are ignored; placing another address ends
        no wait.
        """
        clock, context = _context([1])
        context.faultBegan(99, 0x1000)
        self.assertEqual(context.blockedCount, 0)
        context.faultBegan(1, 0x1000)
        clock.advance(1)
        context.pagePlaced(0x2000)
        self.assertEqual((context.blockedCount, context.vcpuTotal), (1, [0]))

    def test_timestampsAtLeastOne(self) -> None:
        """
        A fault at the origin is stamped 1 ms, as QEMU forces 0 to 1.
        """
        clock, context = _context([1])
        context.faultBegan(1, 0x1000)
        clock.advance(0.01)
        context.pagePlaced(0x1000)
        self.assertEqual(context.vcpuTotal, [9])

    def test_receivedRace(self) -> None:
        """
        A fault on a page already received is undone, and blocked_count is
        decremented as QEMU does.
        """
        clock, context = _context([1])
        clock.advance(0.5)
        context.faultBegan(1, 0x1000, received=True)
        self.assertEqual((context.blockedCount, context.faultAddress, context.lastFaultStart),
                         (0, [0], 500))


class DelayedPageSourceTests(TestCase):
    """
    Blocktime in a known scenario: a real guest process faulting through
    the production fault service on a page source that answers each
    request after a fixed delay.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Give up without userfaultfd (L{requireUserfaultfd}).
        """
        requireUserfaultfd()

    @inlineCallbacks
    def test_blocktimeIsFaultsTimesDelay(self):
        """
        One guest thread reads 20 missing pages in turn; each request is
        answered 50 ms later.  The thread (the only vCPU) is blocked about
        20 x 50 ms: at least that (less a millisecond of rounding per
        fault), at most the time its reads took; with one vCPU the overall
        figure equals the vCPU's.
        """
        pages, delay = 20, 0.05
        data = bytes(range(1, 256)) * (pages * PAGE // 255) + bytes(pages * PAGE % 255)
        block = RAMBlock("pc.ram", pages * PAGE)
        self.addCleanup(block.close)
        source = MemoryPageSource({"pc.ram": data}, reactor, delay)
        service = FaultService(reactor, source, [block])
        source.service = service
        self.addCleanup(service.stop)
        vcpus: list[int] = []

        def register(threadId: int, address: int, received: bool) -> None:
            """
            The guest's touch thread is its vCPU (known at its first fault,
            before the blocktime context sees that fault).
            """
            if threadId not in vcpus:
                vcpus.append(threadId)

        service.addFaultObserver(register)
        context = BlocktimeContext(vcpus, reactor.seconds)
        service.addFaultObserver(context.faultBegan)
        service.addPlacementObserver(context.pagePlaced)
        worker = spawnWorker(reactor, service, [block])
        self.addCleanup(lambda: worker.ended if worker.ended.called else worker.exit())
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=pages)
        self.assertEqual(answer["checksum"], sum(data[i * PAGE] for i in range(pages)))
        self.assertEqual(sorted(source.requests), [("pc.ram", i * PAGE) for i in range(pages)])
        self.assertEqual(vcpus, answer["tids"])
        figures = context.query()
        (vcpu,) = figures["postcopy-vcpu-blocktime"]
        self.assertEqual(figures["postcopy-blocktime"], vcpu)
        self.assertGreaterEqual(vcpu, pages * delay * 1000 - pages, figures)
        self.assertLessEqual(vcpu, answer["elapsed"] / 1e6 + pages, (figures, answer["elapsed"]))
