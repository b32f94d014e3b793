# -*- test-case-name: tests.test_blocktime -*-
"""
Tests for L{twisted_postcopy.blocktime}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.blocktime import BlocktimeContext


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
