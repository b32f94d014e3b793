# -*- test-case-name: tests.test_source_outgoing -*-
"""
The source's transfer counters and timings, shaped like QEMU's
C{query-migrate} answer (return-path-preempt-recovery.md 5.5).
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define

from twisted_postcopy.state import MigrationStatus as S, POSTCOPY
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE as PAGE_SIZE



@define
class TransferStats:
    """
    Counters of one outgoing migration.

    @ivar now: the clock (seconds).
    @ivar total: RAM bytes of the VM.
    @ivar startTime: when C{migrate} was called.
    @ivar setupTime: ms spent in setup.
    @ivar endTime: when the status became final.
    @ivar stopTime: when the VM was stopped for switchover.
    @ivar downtime: ms from stop until the guest could run again.
    @ivar transferred: bytes written on the main channel.
    @ivar normal: pages sent whole.
    @ivar duplicate: pages sent as ZERO.
    @ivar precopyBytes: bytes written while the source VM ran.
    @ivar downtimeBytes: bytes written while stopped outside postcopy.
    @ivar postcopyBytes: bytes written in postcopy.
    @ivar postcopyRequests: page requests received.
    @ivar urgent: pages sent in answer to page requests (ahead of the
        background scan).
    @ivar dirtySyncCount: dirty syncs done.
    @ivar error: the failure text, if any.
    @ivar pageSize: C{ram.page-size}: the largest host page size of the
        VM's blocks (QEMU 7.2 always reports its 4 KiB target page there;
        with huge pages this reports the host page that is the unit of
        postcopy's requests, discards and placements, e.g. 2 MiB).
    """

    now: Callable[[], float]
    total: int
    startTime: float = 0.0
    setupTime: int = 0
    endTime: float | None = None
    stopTime: float | None = None
    downtime: int | None = None
    transferred: int = 0
    normal: int = 0
    duplicate: int = 0
    precopyBytes: int = 0
    downtimeBytes: int = 0
    postcopyBytes: int = 0
    postcopyRequests: int = 0
    urgent: int = 0
    dirtySyncCount: int = 0
    error: str | None = None
    pageSize: int = PAGE_SIZE

    def began(self) -> None:
        """
        C{migrate} was called.
        """
        self.startTime = self.now()

    def setupDone(self) -> None:
        """
        The setup phase ended.
        """
        self.setupTime = int((self.now() - self.startTime) * 1000)

    def sent(self, size: int, status: S, stopped: bool) -> None:
        """
        Bytes were written.

        @param size: how many.
        @param status: the status they were written in.
        @param stopped: whether the VM was stopped.
        """
        self.transferred += size
        if status in POSTCOPY:
            self.postcopyBytes += size
        elif stopped:
            self.downtimeBytes += size
        else:
            self.precopyBytes += size

    def stopping(self) -> None:
        """
        The VM is about to stop for switchover.
        """
        self.stopTime = self.now()

    def switchedOver(self) -> None:
        """
        The package was sent: the downtime ends.
        """
        self.downtime = int((self.now() - self.stopTime) * 1000)

    def finished(self, status: S) -> None:
        """
        The status became final.

        @param status: the final status.
        """
        self.endTime = self.now()
        if self.downtime is None and self.stopTime is not None and status == S.COMPLETED:
            self.downtime = int((self.endTime - self.stopTime) * 1000)

    def elapsed(self) -> float:
        """
        @return: seconds since C{migrate}, up to the end.
        """
        end = self.endTime if self.endTime is not None else self.now()
        return max(end - self.startTime, 1e-9)

    def bandwidth(self) -> float:
        """
        @return: average bytes per second written so far; 0 during the
            first 100 ms (QEMU has no measurement before its first window
            either, so its threshold starts at 0).
        """
        elapsed = self.elapsed()
        if elapsed < 0.1:
            return 0.0
        return self.transferred / elapsed

    def query(self, status: S, remaining: int, downtimeLimit: int) -> dict[str, Any]:
        """
        @param status: the current status.
        @param remaining: dirty bytes left.
        @param downtimeLimit: the C{downtime-limit} parameter (ms).
        @return: the C{query-migrate} answer.
        """
        if status == S.NONE:
            return {}
        if status == S.CANCELLED:
            return {"status": status.value}
        if status == S.FAILED:
            answer = {"status": status.value}
            if self.error:
                answer["error-desc"] = self.error
            return answer
        bandwidth = self.bandwidth()
        answer: dict[str, Any] = {
            "status": status.value,
            "setup-time": self.setupTime,
            "total-time": int(self.elapsed() * 1000),
            "ram": self._ram(remaining if status != S.COMPLETED else 0, bandwidth),
        }
        if status == S.COMPLETED:
            answer["downtime"] = self.downtime or 0
        else:
            answer["expected-downtime"] = int(remaining / bandwidth * 1000) if bandwidth else downtimeLimit
        return answer

    def _ram(self, remaining: int, bandwidth: float) -> dict[str, int | float]:
        """
        @param remaining: dirty bytes left.
        @param bandwidth: bytes per second.
        @return: the C{ram} object.
        """
        return {
            "transferred": self.transferred, "remaining": remaining, "total": self.total,
            "duplicate": self.duplicate, "skipped": 0, "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE, "dirty-pages-rate": 0,
            "mbps": bandwidth * 8 / 1e6, "dirty-sync-count": self.dirtySyncCount,
            "postcopy-requests": self.postcopyRequests, "page-size": self.pageSize,
            "multifd-bytes": 0, "pages-per-second": 0, "precopy-bytes": self.precopyBytes,
            "downtime-bytes": self.downtimeBytes, "postcopy-bytes": self.postcopyBytes,
            "dirty-sync-missed-zero-copy": 0,
        }
