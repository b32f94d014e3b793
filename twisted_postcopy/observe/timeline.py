# -*- test-case-name: tests.test_observe_timeline -*-
"""
A bounded timeline of one daemon's migration: throughput per 100 ms window,
page-request latencies, blocktime per vCPU, status changes.  It is what
C{x-query-migrate-timeline} answers and what C{postcopy report} draws.

Everything is bounded: the windows double their length (adjacent pairs
merged) when L{MAX_WINDOWS} are full, latencies are kept as exact
histogram buckets plus a uniform reservoir of L{MAX_LATENCY_SAMPLES},
statuses stop at L{MAX_STATUSES}.  The answer stays far below the control
API's box size (see L{twisted_postcopy.control.commands.ChunkedJSON}).

The timeline reads the engine's counters
(L{twisted_postcopy.observe.counters.readCounters}) once per window and
observes the fault service (its address-keyed observers, as blocktime
does) for latencies: a fault on a missing page starts a clock for that
page, its placement stops it.
"""

from __future__ import annotations

import bisect
import random
import time
from typing import Any, Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted_postcopy.observe.counters import movedBytes, readCounters
from twisted_postcopy.state import FINISHED, MigrationStatus

_log = Logger()

#: Seconds per throughput window (QEMU's rate-limit window).
WINDOW = 0.1
#: Windows kept; when full, pairs are merged and the window doubles.
MAX_WINDOWS = 1200
#: Latency samples kept (a uniform reservoir over all requests).
MAX_LATENCY_SAMPLES = 2000
#: Status changes kept.
MAX_STATUSES = 256
#: Faults awaiting their page at once, at most (more are not timed).
MAX_OUTSTANDING = 65536
#: Upper bounds (seconds) of the latency histogram buckets.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Statuses after which a migration does not move (QMP names).
FINAL = frozenset(status.value for status in FINISHED if status is not MigrationStatus.NONE)


class RequestLatencies:
    """
    Times each page a guest thread waited for, from its first fault to its
    placement.  It is fed by the fault service's address-keyed observers
    (the ones blocktime uses: C{addFaultObserver}, C{addPlacementObserver}),
    with C{CLOCK_MONOTONIC} read when each is called.

    @ivar count: pages timed.
    @ivar total: sum of their latencies (seconds).
    @ivar maximum: the longest latency (seconds).
    @ivar buckets: per L{LATENCY_BUCKETS} bound, how many were at most it
        (not cumulative); the last entry counts those above every bound.
    @ivar samples: a uniform reservoir of latencies (seconds).
    """

    def __init__(self, seed: int = 0, maxSamples: int = MAX_LATENCY_SAMPLES,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        """
        @param seed: seeds the reservoir's choices.
        @param maxSamples: the reservoir's size.
        @param clock: monotonic nanoseconds.
        """
        self.count = 0
        self.total = 0.0
        self.maximum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.samples: list[float] = []
        self.maxSamples = maxSamples
        self.clock = clock
        self._random = random.Random(seed)
        self._started: dict[int, int] = {}

    def attach(self, service: Any) -> bool:
        """
        Observe a fault service.

        @param service: it (with C{addFaultObserver} and
            C{addPlacementObserver}).
        @return: whether it could be observed.
        """
        if not (hasattr(service, "addFaultObserver") and hasattr(service, "addPlacementObserver")):
            return False
        service.addFaultObserver(self.faultBegan)
        service.addPlacementObserver(self.pagePlaced)
        return True

    def faultBegan(self, threadId: int, address: int, received: bool = False) -> None:
        """
        A thread faulted: start the clock of a missing page (the first
        fault on a page counts).

        @param threadId: the thread.
        @param address: the page's address in the daemon's mapping.
        @param received: whether the page was already there (no wait).
        """
        if not received and len(self._started) < MAX_OUTSTANDING:
            self._started.setdefault(address, self.clock())

    def pagePlaced(self, address: int) -> None:
        """
        A waited-for page was placed: record its latency.

        @param address: the page's address in the daemon's mapping.
        """
        began = self._started.pop(address, None)
        if began is not None:
            self.record(max(0, self.clock() - began) / 1e9)

    def record(self, latency: float) -> None:
        """
        Count one latency.

        @param latency: seconds.
        """
        self.count += 1
        self.total += latency
        self.maximum = max(self.maximum, latency)
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
        if len(self.samples) < self.maxSamples:
            self.samples.append(latency)
        else:
            slot = self._random.randrange(self.count)
            if slot < self.maxSamples:
                self.samples[slot] = latency

    def query(self) -> dict[str, Any]:
        """
        @return: C{count}, C{sum-ms}, C{max-ms}, C{buckets} ([bound ms or
            C{null} for +Inf, count] pairs, not cumulative) and
            C{samples-us} (the reservoir, in microseconds).
        """
        bounds: list[float | None] = [b * 1000 for b in LATENCY_BUCKETS] + [None]
        return {
            "count": self.count, "sum-ms": round(self.total * 1000, 3),
            "max-ms": round(self.maximum * 1000, 3),
            "buckets": [[bound, n] for bound, n in zip(bounds, self.buckets)],
            "samples-us": [round(s * 1e6) for s in self.samples],
        }


class MigrationTimeline:
    """
    The bounded timeline of a daemon's current (or latest) migration.

    @ivar reactor: the reactor (C{callLater}, C{seconds}).
    @ivar manager: the L{twisted_postcopy.manager.MigrationManager} observed.
    @ivar window: the current window length (seconds).
    @ivar windows: per window, C{[bytes moved, postcopy requests]} during it.
    @ivar blocktime: per window, C{[overall ms, [per vCPU ms]]} at its end
        (only while the destination measures blocktime).
    @ivar statuses: C{[seconds since start, status]} per change.
    @ivar latencies: the page-request latencies.
    @ivar start: reactor time of the migration's first status.
    @ivar wallStart: wall-clock time (Unix seconds) of the same instant.
    @ivar entered: status name -> how many times any migration of this
        daemon entered it (never reset: C{postcopy-recover} counts recovery
        attempts).
    """

    def __init__(self, reactor: Any, manager: Any, window: float = WINDOW,
                 maxWindows: int = MAX_WINDOWS) -> None:
        """
        @param reactor: the reactor.
        @param manager: the manager to observe.
        @param window: seconds per window.
        @param maxWindows: windows kept before they are merged.
        """
        self.reactor = reactor
        self.manager = manager
        self.baseWindow = window
        self.maxWindows = maxWindows
        self._loop: LoopingCall | None = None
        self._unsubscribe = None
        self.entered: dict[str, int] = {}
        self._reset(None)

    def _reset(self, start: float | None) -> None:
        """
        Forget the previous migration.

        @param start: reactor time the new one began, or L{None}.
        """
        self.window = self.baseWindow
        self.windows: list[list[int]] = []
        self.blocktime: list[list[Any]] = []
        self.statuses: list[list[Any]] = []
        self.droppedStatuses = 0
        self.latencies = RequestLatencies()
        self.start = start
        self.wallStart = time.time() if start is not None else None
        self._last = (0, 0)
        self._partial = [0, 0]
        self._partialTime = 0.0
        self._role = "none"

    # -- attaching ---------------------------------------------------------

    def attach(self) -> None:
        """
        Observe the manager's status events and each fault service it
        starts (for latencies).
        """
        self._unsubscribe = self.manager.subscribe(self._event)
        hooks = getattr(self.manager, "faultServiceHooks", None)
        if hooks is not None:
            hooks.append(self._faultServiceStarted)

    def detach(self) -> None:
        """
        Stop sampling and observing.
        """
        self._stopSampling()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        hooks = getattr(self.manager, "faultServiceHooks", None)
        if hooks is not None and self._faultServiceStarted in hooks:
            hooks.remove(self._faultServiceStarted)

    def _faultServiceStarted(self, service: Any) -> None:
        """
        A destination started its fault service: time its requests.

        @param service: the fault service.
        """
        if not self.latencies.attach(service):
            _log.warn("timeline: fault service {service!r} cannot be observed: no request latencies",
                      service=service)

    def _event(self, event: dict[str, Any]) -> None:
        """
        A manager event: record status changes, start sampling at the
        first, stop after the last.

        @param event: C{{"event": "MIGRATION", "data": {"status": ...}}}.
        """
        if event.get("event") != "MIGRATION":
            return
        status = event["data"]["status"]
        now = self.reactor.seconds()
        previous = self.statuses[-1][1] if self.statuses else None
        if self.start is None or (previous in FINAL and status not in FINAL):
            self._reset(now)
        self.sample()
        self.entered[status] = self.entered.get(status, 0) + 1
        if len(self.statuses) < MAX_STATUSES:
            self.statuses.append([round(now - self.start, 4), status])
        else:
            self.droppedStatuses += 1
        if status in FINAL:
            self._stopSampling()
        elif self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(self.window, now=False)

    def _stopSampling(self) -> None:
        """
        Stop the window clock.
        """
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    # -- sampling ----------------------------------------------------------

    def _tick(self) -> None:
        """
        One window ended.
        """
        self.sample()
        self._closeWindow()

    def sample(self) -> dict[str, Any]:
        """
        Read the counters and add what moved since the last read to the
        current window.

        @return: the counters read.
        """
        counters = readCounters(self.manager, self.latencies.count)
        if counters["role"] != "none":
            self._role = counters["role"]
        moved, requests = movedBytes(counters), counters["postcopy-requests"]
        lastMoved, lastRequests = self._last
        # A destination's received count drops at a discard: the pages
        # received again later count again.
        self._partial[0] += max(0, moved - lastMoved)
        self._partial[1] += max(0, requests - lastRequests)
        self._last = (moved, requests)
        self._counters = counters
        return counters

    def _closeWindow(self) -> None:
        """
        Append the current window (merging pairs when the table is full).
        """
        self._partialTime += self.baseWindow
        if self._partialTime + 1e-9 < self.window:
            return
        self._partialTime = 0.0
        self.windows.append(self._partial)
        self._partial = [0, 0]
        counters = self._counters
        if counters["blocktime-ms"] is not None:
            self.blocktime.append([len(self.windows) - 1, counters["blocktime-ms"],
                                   counters["vcpu-blocktime-ms"]])
        if len(self.windows) >= self.maxWindows:
            self._merge()

    def _merge(self) -> None:
        """
        Halve the resolution: adjacent windows are summed and the window
        length doubles (blocktime samples keep every other one).
        """
        windows = self.windows
        self.windows = [[a[0] + b[0], a[1] + b[1]] for a, b in zip(windows[0::2], windows[1::2])]
        if len(windows) % 2:
            self._partial = [self._partial[0] + windows[-1][0], self._partial[1] + windows[-1][1]]
            self._partialTime = self.window
        self.blocktime = [[index // 2, total, vcpus] for index, total, vcpus in self.blocktime
                          if index % 2 == 1]
        self.window *= 2

    # -- answering ---------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """
        C{x-query-migrate-timeline}.

        @return: the timeline (shape in C{docs/observability.md}): C{role},
            C{start} (Unix seconds), C{window-ms}, C{bytes} and
            C{requests} per window, C{statuses}, C{latency},
            C{blocktime}, and C{counters} (the latest read).
        """
        counters = self.sample() if self.start is not None else readCounters(self.manager)
        blocktime = None
        if self.blocktime or counters["blocktime-ms"] is not None:
            blocktime = {
                "vcpu-threads": counters["vcpu-threads"],
                "window": [index for index, _, _ in self.blocktime],
                "total-ms": [total for _, total, _ in self.blocktime],
                "vcpu-ms": [vcpus for _, _, vcpus in self.blocktime],
                "final-ms": counters["blocktime-ms"],
                "final-vcpu-ms": counters["vcpu-blocktime-ms"],
            }
        return {
            "version": 1,
            "role": self._role if self.start is not None else counters["role"],
            "start": self.wallStart,
            "window-ms": round(self.window * 1000, 3),
            "bytes": [w[0] for w in self.windows],
            "requests": [w[1] for w in self.windows],
            "pending-window": {"bytes": self._partial[0], "requests": self._partial[1]},
            "statuses": [list(s) for s in self.statuses],
            "dropped-statuses": self.droppedStatuses,
            "latency": self.latencies.query(),
            "blocktime": blocktime,
            "counters": counters,
        }
