# -*- test-case-name: tests.test_blocktime -*-
"""
Postcopy blocktime, QEMU 7.2's algorithm exactly
(C{migration/postcopy-ram.c: mark_postcopy_blocktime_begin/end}; spec
return-path-preempt-recovery.md section 6).

A vCPU is blocked from its latest unresolved fault until the placement of
the exact address it faulted on.  The overall figure adds, for each
placement that unblocks a vCPU while every vCPU was blocked, the time since
the latest fault start of any vCPU.  Timestamps are milliseconds since the
context was created, at least 1, kept as uint32.

The fault service feeds it through two observer callbacks:
L{BlocktimeContext.faultBegan} (each fault read on the main userfaultfd,
with the faulting thread id) and L{BlocktimeContext.pagePlaced} (each
successful placement, requested or background).
"""

from __future__ import annotations

from typing import Callable, Sequence

from attrs import define, field

_UINT32 = 0xFFFFFFFF


@define
class BlocktimeContext:
    """
    QEMU's C{PostcopyBlocktimeContext}.

    @ivar vcpuThreads: thread id of each vCPU, by vCPU index (a live
        sequence: vCPUs appended later are counted from then on).
    @ivar now: returns the current time in seconds (a reactor's
        C{seconds}).
    @ivar origin: the creation time, in seconds.
    @ivar faultStart: per vCPU, the start (ms) of its pending fault, 0 if
        none.
    @ivar faultAddress: per vCPU, the address it waits for, 0 if none.
    @ivar vcpuTotal: per vCPU, the accumulated blocked time (ms).
    @ivar blockedCount: how many vCPUs are blocked now.
    @ivar lastFaultStart: the start (ms) of the latest fault of any vCPU.
    @ivar total: the accumulated all-vCPUs-blocked time (ms).
    """

    vcpuThreads: Sequence[int]
    now: Callable[[], float]
    origin: float = field(default=None)
    faultStart: list[int] = field(init=False)
    faultAddress: list[int] = field(init=False)
    vcpuTotal: list[int] = field(init=False)
    blockedCount: int = 0
    lastFaultStart: int = 0
    total: int = 0

    def __attrs_post_init__(self) -> None:
        """
        Start the clock and zero the per-vCPU tables.
        """
        if self.origin is None:
            self.origin = self.now()
        count = len(self.vcpuThreads)
        self.faultStart = [0] * count
        self.faultAddress = [0] * count
        self.vcpuTotal = [0] * count

    def _timestamp(self) -> int:
        """
        @return: milliseconds since the origin, at least 1, as uint32.
        """
        elapsed = round((self.now() - self.origin) * 1000)
        return max(1, elapsed) & _UINT32

    def _grow(self) -> None:
        """
        Extend the per-vCPU tables to vCPUs registered since (a guest's
        threads may become known only when it runs).
        """
        missing = len(self.vcpuThreads) - len(self.faultStart)
        if missing > 0:
            for table in (self.faultStart, self.faultAddress, self.vcpuTotal):
                table.extend([0] * missing)

    def faultBegan(self, threadId: int, address: int, received: bool = False) -> None:
        """
        A userfault was read (C{mark_postcopy_blocktime_begin}).

        @param threadId: the faulting thread's id (C{uffd_msg.pagefault.feat.ptid}).
        @param address: the faulting address the kernel reported.
        @param received: whether that page was already placed (the race
            QEMU undoes).
        """
        try:
            vcpu = list(self.vcpuThreads).index(threadId)
        except ValueError:
            return
        self._grow()
        now = self._timestamp()
        if self.faultAddress[vcpu] == 0:
            self.blockedCount += 1
        self.lastFaultStart = now
        self.faultStart[vcpu] = now
        self.faultAddress[vcpu] = address
        if received:
            self.faultAddress[vcpu] = 0
            self.faultStart[vcpu] = 0
            self.blockedCount -= 1

    def pagePlaced(self, address: int) -> None:
        """
        A page was placed at C{address} (C{mark_postcopy_blocktime_end}).

        @param address: the host address of the placed page's start.
        """
        self._grow()
        now = self._timestamp()
        allBlocked = False
        unblocked = 0
        for vcpu, waited in enumerate(self.faultAddress):
            if waited != address or self.faultStart[vcpu] == 0:
                continue
            self.faultAddress[vcpu] = 0
            self.vcpuTotal[vcpu] = (self.vcpuTotal[vcpu] + now - self.faultStart[vcpu]) & _UINT32
            unblocked += 1
            if self.blockedCount == len(self.vcpuThreads):
                allBlocked = True
        self.blockedCount -= unblocked
        if allBlocked:
            self.total = (self.total + now - self.lastFaultStart) & _UINT32

    def query(self) -> dict[str, object]:
        """
        @return: the C{query-migrate} fields C{postcopy-blocktime} and
            C{postcopy-vcpu-blocktime}.
        """
        self._grow()
        return {
            "postcopy-blocktime": self.total,
            "postcopy-vcpu-blocktime": list(self.vcpuTotal),
        }
