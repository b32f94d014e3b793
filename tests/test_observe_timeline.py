# -*- test-case-name: tests.test_observe_timeline -*-
"""
Tests for L{twisted_postcopy.observe.timeline} and
L{twisted_postcopy.observe.counters}, on a deterministic clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.blocktime import BlocktimeContext
from twisted_postcopy.observe import timeline as T
from twisted_postcopy.observe.counters import readCounters
from twisted_postcopy.state import MigrationStatus as S
from twisted_postcopy.source.stats import TransferStats


class _Outgoing:
    """
    Stand-in for an outgoing migration (unit tests only): just its stats.
    """

    def __init__(self, clock: Clock) -> None:
        """
        @param clock: the clock.
        """
        self.stats = TransferStats(clock.seconds, 1 << 20)


class StandInManager:
    """
    Stand-in for L{twisted_postcopy.manager.MigrationManager} (unit tests
    only): the attributes the timeline reads, and its event subscription.
    """

    def __init__(self, clock: Clock) -> None:
        """
        @param clock: the clock.
        """
        self.status = S.NONE
        self.outgoing: Any = None
        self.incoming: Any = None
        self.blocktime: Any = None
        self.faultServiceHooks: list = []
        self.subscribers: list = []
        self.clock = clock

    def subscribe(self, callback: Any) -> Any:
        """
        @param callback: gets events.
        @return: an unsubscriber.
        """
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def move(self, status: S) -> None:
        """
        Change status and emit the event.

        @param status: the new status.
        """
        self.status = status
        for callback in list(self.subscribers):
            callback({"event": "MIGRATION", "data": {"status": status.value}})


class _FaultService:
    """
    Stand-in for a fault service (unit tests only): keeps its
    address-keyed observers.
    """

    def __init__(self) -> None:
        """
        No observer yet.
        """
        self.onFault: list = []
        self.onPlaced: list = []

    def addFaultObserver(self, callback: Any) -> None:
        """
        @param callback: gets (thread id, address, received).
        """
        self.onFault.append(callback)

    def addPlacementObserver(self, callback: Any) -> None:
        """
        @param callback: gets the address.
        """
        self.onPlaced.append(callback)


class TimelineTests(SynchronousTestCase):
    """
    Tests for L{T.MigrationTimeline}.
    """

    def setUp(self) -> None:
        """
        A source manager with a timeline attached.
        """
        self.clock = Clock()
        self.manager = StandInManager(self.clock)
        self.manager.outgoing = _Outgoing(self.clock)
        self.timeline = T.MigrationTimeline(self.clock, self.manager)
        self.timeline.attach()
        self.addCleanup(self.timeline.detach)

    def test_windows(self) -> None:
        """
        Bytes written during each 100 ms window land in that window;
        requests too; sampling stops at the final status.
        """
        stats = self.manager.outgoing.stats
        self.manager.move(S.SETUP)
        self.manager.move(S.ACTIVE)
        for sent, requests in ((1000, 0), (0, 0), (5000, 3)):
            stats.transferred += sent
            stats.precopyBytes += sent
            stats.postcopyRequests += requests
            self.clock.advance(0.1)
        self.manager.move(S.COMPLETED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        answer = self.timeline.query()
        self.assertEqual(answer["bytes"], [1000, 0, 5000])
        self.assertEqual(answer["requests"], [0, 0, 3])
        self.assertEqual(answer["window-ms"], 100.0)
        self.assertEqual(answer["role"], "source")
        self.assertEqual([s for _, s in answer["statuses"]], ["setup", "active", "completed"])
        self.assertAlmostEqual(answer["statuses"][-1][0], 0.3)
        self.assertEqual(answer["counters"]["transferred"]["total"], 6000)
        json.dumps(answer)

    def test_merge(self) -> None:
        """
        When the windows are full, pairs merge and the window doubles: the
        total stays exact.
        """
        self.timeline.maxWindows = 4
        stats = self.manager.outgoing.stats
        self.manager.move(S.SETUP)
        for step in range(9):
            stats.transferred += 10 ** step
            self.clock.advance(0.1)
        answer = self.timeline.query()
        self.assertEqual(answer["window-ms"], 400.0)
        total = sum(answer["bytes"]) + answer["pending-window"]["bytes"]
        self.assertEqual(total, sum(10 ** step for step in range(9)))
        self.assertEqual(answer["bytes"][0], 1 + 10 + 100 + 1000)

    def test_newMigrationResets(self) -> None:
        """
        A migration after a finished one starts a new timeline; the
        recovery and pause counts (C{entered}) stay.
        """
        self.manager.move(S.SETUP)
        self.manager.move(S.POSTCOPY_ACTIVE)
        self.manager.move(S.POSTCOPY_PAUSED)
        self.manager.move(S.POSTCOPY_RECOVER)
        self.manager.move(S.FAILED)
        self.clock.advance(1)
        self.manager.outgoing = _Outgoing(self.clock)
        self.manager.move(S.SETUP)
        answer = self.timeline.query()
        self.assertEqual([s for _, s in answer["statuses"]], ["setup"])
        self.assertEqual(self.timeline.entered["postcopy-recover"], 1)
        self.assertEqual(self.timeline.entered["setup"], 2)

    def test_statusesBounded(self) -> None:
        """
        At most L{T.MAX_STATUSES} status changes are kept; the rest are
        counted.
        """
        self.manager.move(S.SETUP)
        for _ in range(T.MAX_STATUSES):
            self.manager.move(S.POSTCOPY_PAUSED)
        answer = self.timeline.query()
        self.assertEqual(len(answer["statuses"]), T.MAX_STATUSES)
        self.assertEqual(answer["dropped-statuses"], 1)

    def test_faultServiceHook(self) -> None:
        """
        A fault service the manager starts gets the timeline's latency
        observer.
        """
        service = _FaultService()
        for hook in self.manager.faultServiceHooks:
            hook(service)
        self.assertEqual((service.onFault, service.onPlaced),
                         ([self.timeline.latencies.faultBegan], [self.timeline.latencies.pagePlaced]))

    def test_detach(self) -> None:
        """
        Detaching stops sampling and observing.
        """
        self.manager.move(S.SETUP)
        self.timeline.detach()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.manager.subscribers, [])
        self.assertEqual(self.manager.faultServiceHooks, [])


class LatencyTests(SynchronousTestCase):
    """
    Tests for L{T.RequestLatencies}.
    """

    def test_faultToPlacement(self) -> None:
        """
        A page's latency runs from its first fault to its placement; a
        second fault on it does not restart the clock; a placement nobody
        waited for, and a fault on a page already received, are not
        counted.
        """
        now = [0]
        latencies = T.RequestLatencies(clock=lambda: now[0])
        now[0] = 1_000_000
        latencies.faultBegan(1, 0x1000)
        now[0] = 2_000_000
        latencies.faultBegan(2, 0x1000)
        latencies.faultBegan(2, 0x3000, True)
        now[0] = 4_000_000
        latencies.pagePlaced(0x1000)
        latencies.pagePlaced(0x2000)
        latencies.pagePlaced(0x3000)
        answer = latencies.query()
        self.assertEqual(answer["count"], 1)
        self.assertEqual(answer["samples-us"], [3000])
        self.assertEqual(answer["max-ms"], 3.0)
        self.assertEqual(dict((b, n) for b, n in answer["buckets"] if n), {5.0: 1})

    def test_reservoirBounded(self) -> None:
        """
        The samples stay at most C{maxSamples}; count, sum and buckets are
        exact.
        """
        latencies = T.RequestLatencies(maxSamples=10)
        for i in range(1000):
            latencies.record(i / 1e6)
        answer = latencies.query()
        self.assertEqual(len(answer["samples-us"]), 10)
        self.assertEqual(answer["count"], 1000)
        self.assertEqual(sum(n for _, n in answer["buckets"]), 1000)
        self.assertAlmostEqual(answer["sum-ms"], sum(range(1000)) / 1000, places=3)
        self.assertTrue(set(answer["samples-us"]) <= set(range(1000)))


class CountersTests(SynchronousTestCase):
    """
    Tests for L{readCounters}.
    """

    def test_source(self) -> None:
        """
        A source's pages by kind, wire bytes by phase and requests come
        from its L{TransferStats}.
        """
        clock = Clock()
        manager = StandInManager(clock)
        manager.outgoing = _Outgoing(clock)
        manager.status = S.POSTCOPY_ACTIVE
        stats = manager.outgoing.stats
        stats.normal, stats.duplicate, stats.urgent, stats.postcopyRequests = 10, 5, 2, 3
        stats.transferred, stats.precopyBytes, stats.postcopyBytes = 300, 100, 200
        counters = readCounters(manager)
        self.assertEqual(counters["role"], "source")
        self.assertEqual(counters["status"], "postcopy-active")
        self.assertEqual(counters["pages"], {"sent": {"normal": 10, "zero": 5, "urgent": 2}})
        self.assertEqual(counters["bytes"]["sent"]["normal"], 10 * 4096)
        self.assertEqual(counters["transferred"],
                         {"total": 300, "precopy": 100, "downtime": 0, "postcopy": 200})
        self.assertEqual(counters["postcopy-requests"], 3)
        self.assertIsNone(counters["blocktime-ms"])

    def test_destination(self) -> None:
        """
        A destination's received pages come from its received bitmaps, its
        requests from its fault service, its blocktime from its context.
        """

        class Block:
            pageSize = 4096

        class Placer:
            blocks = {"ram": Block()}
            received = {"ram": bytearray(b"\x01\x00\x02\x01")}

        class Pending:
            requestCount = 7

        class Faults:
            pending = Pending()

        class Incoming:
            placer = Placer()
            faults = Faults()

        clock = Clock()
        manager = StandInManager(clock)
        manager.incoming = Incoming()
        manager.blocktime = BlocktimeContext([11, 12], clock.seconds)
        manager.blocktime.vcpuTotal[1] = 40
        counters = readCounters(manager, urgentReceived=2)
        self.assertEqual(counters["role"], "destination")
        self.assertEqual(counters["pages"], {"received": {"all": 3, "urgent": 2}})
        self.assertEqual(counters["bytes"]["received"], {"all": 3 * 4096, "urgent": 2 * 4096})
        self.assertEqual(counters["postcopy-requests"], 7)
        self.assertEqual(counters["vcpu-blocktime-ms"], [0, 40])
        self.assertEqual(counters["vcpu-threads"], [11, 12])


class ReceivedMapTests(SynchronousTestCase):
    """
    L{readCounters} on a destination whose placer keeps no received table:
    the RAMBlocks' received bitmaps count.
    """

    def test_blocksReceivedMap(self) -> None:
        """
        Real L{twisted_postcopy.ram.block.RAMBlock}s with pages written.
        """
        from twisted_postcopy.ram.block import RAMBlock

        block = RAMBlock("ram", 16 * 4096)
        self.addCleanup(block.close)
        block.receivedMap.set(2, 3)

        class Placer:
            blocks = {"ram": block}

        class Incoming:
            placer = Placer()
            faults = None
            returnPath = None

        manager = StandInManager(Clock())
        manager.incoming = Incoming()
        counters = readCounters(manager)
        self.assertEqual(counters["pages"]["received"]["all"], 3)
        self.assertEqual(counters["bytes"]["received"]["all"], 3 * 4096)


class ChunkedJSONTests(SynchronousTestCase):
    """
    Tests for L{twisted_postcopy.control.commands.ChunkedJSON}: the
    timeline crosses AMP's 64 KiB value limit in chunks.
    """

    def test_roundTrip(self) -> None:
        """
        A 300 KB answer is serialised in several values, none over AMP's
        limit, and parsed back equal.
        """
        from twisted.protocols import amp

        from twisted_postcopy.control.commands import ChunkedJSON, QueryMigrateTimeline

        big = {"bytes": list(range(60000)), "name": "x" * 1000}
        box = QueryMigrateTimeline.makeResponse({"timeline": big}, None)
        wire = box.serialize()
        [parsed] = amp.parseString(wire)
        self.assertGreater(int(parsed[b"timeline"]), 3)
        self.assertTrue(all(len(v) <= ChunkedJSON.CHUNK for v in parsed.values()))
        self.assertEqual(QueryMigrateTimeline.parseResponse(parsed, None)["timeline"], big)

    def test_tooManyChunks(self) -> None:
        """
        A peer announcing more than C{MAX_CHUNKS} chunks is refused before
        anything is joined.
        """
        from twisted_postcopy.control.commands import ChunkedJSON

        self.assertRaises(ValueError, ChunkedJSON().fromBox, b"timeline",
                          {b"timeline": str(ChunkedJSON.MAX_CHUNKS + 1).encode()}, {}, None)
        self.assertRaises(ValueError, ChunkedJSON().fromBox, b"timeline", {b"timeline": b"0"}, {}, None)
