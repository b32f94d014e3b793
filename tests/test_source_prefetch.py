# -*- test-case-name: tests.test_source_prefetch -*-
"""
Tests for L{twisted_postcopy.source.prefetch} and the prefetch policies of
L{twisted_postcopy.source.sender.PageScheduler}: readahead, the scan
following faults, working-set prefetch; no page ever handed out twice.
"""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.source.outgoing import DONE, OutgoingMigration
from twisted_postcopy.source.prefetch import (
    FIRST_WINDOW, READAHEAD, SCAN_FOLLOWS_FAULTS, STREAMS, Readahead, RequestLog, checkParameter)
from twisted_postcopy.source.sender import PageScheduler
from twisted_postcopy.testing.enginevm import PAGE, OutgoingTestVM
from twisted_postcopy.wire import decodeAll
from twisted_postcopy.wire import events as e


def _scheduler(**parameters: int) -> PageScheduler:
    """
    @return: a scheduler over a 64-page and a 16-page block.
    """
    return PageScheduler.forBlocks([("pc.ram", 64 * PAGE, PAGE), ("pc.rom", 16 * PAGE, PAGE)], parameters)


def _drain(scheduler: PageScheduler) -> list[tuple[str, int, bool]]:
    """
    @param scheduler: a scheduler.
    @return: (block, page, urgent) of every page handed out until nothing
        is dirty.
    """
    pages = []
    while (page := scheduler.nextPage()) is not None:
        pages.append((page.block, page.offset // PAGE, page.urgent))
    return pages


class ReadaheadTests(SynchronousTestCase):
    """
    The window follows what the requests show.
    """

    def test_sequentialGrows(self) -> None:
        """
        Each request continuing a stream doubles its window, from
        L{FIRST_WINDOW} up to the limit; the first request reads nothing
        ahead.
        """
        readahead = Readahead({READAHEAD: 16})
        windows, page = [], 0
        for _ in range(6):
            window = readahead.requested(0, page, page + 1)
            windows.append(window)
            page += 1 + window
        self.assertEqual(windows, [0, FIRST_WINDOW, 8, 16, 16, 16])

    def test_insideWindowStillSequential(self) -> None:
        """
        A guest faulting on a readahead page (it had not arrived yet)
        continues its stream.
        """
        readahead = Readahead({READAHEAD: 64})
        readahead.requested(0, 0, 1)
        self.assertEqual(readahead.requested(0, 1, 2), FIRST_WINDOW)
        self.assertEqual(readahead.requested(0, 3, 4), 8)

    def test_randomNone(self) -> None:
        """
        Scattered requests never read ahead.
        """
        readahead = Readahead({READAHEAD: 512})
        pages = random.Random(1).sample(range(0, 1 << 20, 1000), 200)
        self.assertEqual({readahead.requested(0, page, page + 1) for page in pages}, {0})
        self.assertLessEqual(len(readahead.streams), STREAMS)

    def test_interleavedStreams(self) -> None:
        """
        Two threads reading sequentially, their requests interleaved, each
        keep their own growing window.
        """
        readahead = Readahead({READAHEAD: 32})
        a, b, windows = 0, 10000, []
        for _ in range(4):
            window = readahead.requested(0, a, a + 1)
            a += 1 + window
            windows.append(window)
            window = readahead.requested(0, b, b + 1)
            b += 1 + window
            windows.append(window)
        self.assertEqual(windows, [0, 0, 4, 4, 8, 8, 16, 16])

    def test_otherBlockNotSequential(self) -> None:
        """
        The same page index in another block starts a new stream.
        """
        readahead = Readahead({READAHEAD: 32})
        readahead.requested(0, 0, 1)
        self.assertEqual(readahead.requested(1, 1, 2), 0)

    def test_off(self) -> None:
        """
        A limit of 0 (the default) never reads ahead.
        """
        readahead = Readahead({})
        self.assertEqual([readahead.requested(0, page, page + 1) for page in range(10)], [0] * 10)

    def test_checkParameter(self) -> None:
        """
        Values above the documented maxima are refused with QEMU-style text.
        """
        self.assertIsNone(checkParameter(READAHEAD, 512))
        self.assertIsNone(checkParameter("max-bandwidth", 1 << 40))
        self.assertEqual(checkParameter(SCAN_FOLLOWS_FAULTS, 2),
                         "Parameter 'x-scan-follows-faults' expects an integer in the range of 0 to 1")


class RequestLogTests(SynchronousTestCase):
    """
    The working set: first request first, each page once, bounded.
    """

    def test_orderOnceBounded(self) -> None:
        """
        Pages are kept in request order, a repeated page once, and no more
        than the limit.
        """
        log = RequestLog.forBlocks([8, 4], limit=5)
        log.add(0, 5, 6)
        log.add(1, 2, 4)
        log.add(0, 5, 6)
        log.add(0, 0, 3)
        self.assertEqual(log.entries(), [(0, 5), (1, 2), (1, 3), (0, 0), (0, 1)])
        self.assertEqual(len(log), 5)


class SchedulerPolicyTests(SynchronousTestCase):
    """
    The policies change the order pages go in, never the set.
    """

    def test_readaheadFollowsRequest(self) -> None:
        """
        With readahead on, the pages after a sequential request go right
        after it, urgent like it; then the sweep continues after them; every
        page goes exactly once.
        """
        scheduler = _scheduler(**{READAHEAD: 8})
        scheduler.queueRequest("pc.ram", 10 * PAGE, PAGE)
        scheduler.queueRequest("pc.ram", 11 * PAGE, PAGE)
        pages = _drain(scheduler)
        self.assertEqual(pages[:6], [("pc.ram", page, True) for page in range(10, 16)])
        self.assertEqual(pages[6], ("pc.ram", 16, False))
        self.assertEqual(sorted((b, p) for b, p, _ in pages),
                         sorted([("pc.ram", p) for p in range(64)] + [("pc.rom", p) for p in range(16)]))
        self.assertEqual(scheduler.readahead.sent, FIRST_WINDOW)

    def test_readaheadSkipsSent(self) -> None:
        """
        Readahead never hands out a page already sent, and stops at the
        block's end.
        """
        scheduler = _scheduler(**{READAHEAD: 64})
        scheduler.queueRequest("pc.rom", 12 * PAGE, PAGE)
        self.assertEqual(_drain(scheduler)[0], ("pc.rom", 12, True))
        scheduler.markDirty("pc.rom", 0, 16 * PAGE)
        scheduler.blocks[1].dirty[14] = 0
        scheduler.dirtyBytes -= PAGE
        scheduler.queueRequest("pc.rom", 12 * PAGE, PAGE)
        scheduler.queueRequest("pc.rom", 13 * PAGE, PAGE)
        self.assertEqual([scheduler.nextUrgent().offset // PAGE for _ in range(3)], [12, 13, 15])
        self.assertIsNone(scheduler.nextUrgent())

    def test_scanFollowsFaults(self) -> None:
        """
        By default (QEMU 7.2's way) the sweep continues after the requested
        page.
        """
        scheduler = _scheduler()
        scheduler.nextBackgroundRun(4)
        scheduler.queueRequest("pc.ram", 40 * PAGE, PAGE)
        self.assertEqual(scheduler.nextUrgent().offset, 40 * PAGE)
        self.assertEqual(scheduler.nextBackground().offset, 41 * PAGE)

    def test_scanKeepsItsPlace(self) -> None:
        """
        With C{x-scan-follows-faults} 0 the sweep resumes where it was
        before the requested pages, and still sends each page once.
        """
        scheduler = _scheduler(**{SCAN_FOLLOWS_FAULTS: 0})
        scheduler.nextBackgroundRun(4)
        scheduler.queueRequest("pc.ram", 40 * PAGE, PAGE)
        self.assertEqual(scheduler.nextUrgent().offset, 40 * PAGE)
        self.assertEqual(scheduler.nextBackgroundRun(2), ("pc.ram", 4 * PAGE, 2, PAGE))
        rest = [(b, p) for b, p, _ in _drain(scheduler)]
        self.assertNotIn(("pc.ram", 40), rest)
        self.assertEqual(len(rest), 80 - 4 - 1 - 2)

    def test_prefetchFirst(self) -> None:
        """
        Working-set pages go before the sweep, in their order, consecutive
        ones as one run; pages already sent are skipped; the sweep then
        starts where it was.
        """
        scheduler = _scheduler()
        scheduler.prefetchFirst([(0, 30), (0, 31), (0, 32), (1, 3), (0, 5), (0, 30)])
        scheduler.queueRequest("pc.ram", 5 * PAGE, PAGE)
        self.assertEqual(scheduler.nextUrgent().offset, 5 * PAGE)
        scheduler.restartScan()
        self.assertEqual(scheduler.nextBackgroundRun(8), ("pc.ram", 30 * PAGE, 3, PAGE))
        self.assertEqual(scheduler.nextBackgroundRun(8), ("pc.rom", 3 * PAGE, 1, PAGE))
        self.assertEqual(scheduler.nextBackgroundRun(8), ("pc.ram", 0, 5, PAGE))
        self.assertEqual(scheduler.prefetch, type(scheduler.prefetch)())

    def test_recoveryForgetsReadahead(self) -> None:
        """
        Clearing the queue (a pause) drops readahead ranges too.
        """
        scheduler = _scheduler(**{READAHEAD: 8})
        scheduler.queueRequest("pc.ram", 0, PAGE)
        scheduler.queueRequest("pc.ram", PAGE, PAGE)
        scheduler.queue.clear()
        self.assertEqual(len(scheduler.queue), 0)
        self.assertIsNone(scheduler.nextUrgent())

    def test_randomNeverTwice(self) -> None:
        """
        Random requests, readahead, working set and re-dirtied pages mixed
        in any order: a page goes out once per time it was dirty, never
        twice for one dirtying.
        """
        for seed in range(20):
            rng = random.Random(seed)
            scheduler = _scheduler(**{READAHEAD: rng.choice([0, 4, 64]),
                                      SCAN_FOLLOWS_FAULTS: rng.choice([0, 1])})
            scheduler.prefetchFirst([(rng.randrange(2), rng.randrange(16)) for _ in range(20)])
            dirty = {("pc.ram", p) for p in range(64)} | {("pc.rom", p) for p in range(16)}
            sent: list[tuple[str, int]] = []
            while True:
                action = rng.random()
                if action < 0.3:
                    block, pages = rng.choice([("pc.ram", 64), ("pc.rom", 16)])
                    page = rng.randrange(pages)
                    scheduler.queueRequest(block, page * PAGE, PAGE)
                    continue
                if action < 0.35 and len(sent) < 100:
                    page = rng.randrange(64)
                    scheduler.markDirty("pc.ram", page * PAGE, PAGE)
                    dirty.add(("pc.ram", page))
                    continue
                if action < 0.7:
                    page = scheduler.nextUrgent()
                    out = [] if page is None else [(page.block, page.offset // PAGE)]
                else:
                    run = scheduler.nextBackgroundRun(rng.randrange(1, 6))
                    if run is None:
                        break
                    idstr, offset, count, _ = run
                    out = [(idstr, offset // PAGE + i) for i in range(count)]
                for page in out:
                    self.assertIn(page, dirty, f"seed {seed}: {page} sent while not dirty")
                    dirty.discard(page)
                    sent.append(page)
            self.assertEqual(dirty, set(), f"seed {seed}")
            self.assertEqual(scheduler.remainingBytes, 0)


class OutgoingPrefetchTests(SynchronousTestCase):
    """
    The policies through the engine: the stream carries each page once,
    with the source's bytes.
    """

    def test_streamWithReadahead(self) -> None:
        """
        A postcopy migration, throttled so the background stream cannot
        keep up, whose destination asks for pages sequentially: readahead
        pages follow each requested one, and the stream carries every page
        exactly once with its contents.
        """
        vm = OutgoingTestVM({"pc.ram": 256 * PAGE})
        for page in range(256):
            vm.write(0, page * PAGE, b"page %d" % page)
        clock = Clock()
        chunks: list[bytes] = []
        parameters = {"max-bandwidth": 0, "max-postcopy-bandwidth": 8 * PAGE * 10,
                      "downtime-limit": 300, READAHEAD: 32}
        migration = OutgoingMigration(vm, chunks.append, clock.seconds, {"postcopy-ram": True}, parameters)
        migration.begin()
        migration.start()
        migration.postcopyRequested = True
        migration.step()
        self.assertEqual(migration.step(), 0.0)
        self.assertEqual(migration.machine.status.value, "postcopy-active")
        page = 100
        for _ in range(6):
            migration.pagesRequested("pc.ram", page * PAGE, PAGE)
            migration.step()
            page += 1 + migration.scheduler.readahead.streams[-1].window
        while migration.step() != DONE:
            clock.advance(0.1)
        events = decodeAll(b"".join(chunks))
        pages = [event for event in events if isinstance(event, e.PageReceived)]
        self.assertEqual(sorted(event.offset // PAGE for event in pages), list(range(256)))
        contents = vm.contents()["pc.ram"]
        for event in pages:
            self.assertEqual(bytes(event.data), contents[event.offset:event.offset + PAGE])
        order = [event.offset // PAGE for event in pages]
        self.assertEqual(order[order.index(101):order.index(101) + 5], [101, 102, 103, 104, 105])
        self.assertEqual(migration.scheduler.readahead.sent, 4 + 8 + 16 + 32 + 32)
