# -*- test-case-name: tests.test_source_sender -*-
"""
Tests for L{twisted_postcopy.source.sender}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.source.sender import (
    PageRequestError,
    PageScheduler,
    RateLimiter,
    ScheduledPage,
    converged,
)

P = 4096


def _scheduler() -> PageScheduler:
    """
    @return: a scheduler over a 4-page and a 2-page block.
    """
    return PageScheduler.forBlocks([("pc.ram", 4 * P, P), ("pc.rom", 2 * P, P)])


def _drain(scheduler: PageScheduler) -> list[tuple[str, int, bool]]:
    """
    @param scheduler: a scheduler.
    @return: every page it hands out until nothing is dirty.
    """
    pages = []
    while (page := scheduler.nextPage()) is not None:
        pages.append((page.block, page.offset // P, page.urgent))
    return pages


class PageSchedulerTests(SynchronousTestCase):
    """
    Scheduling order, dirty bits and page requests.
    """

    def test_sweep(self) -> None:
        """
        Without requests pages go out in block order, offsets upward, once.
        """
        scheduler = _scheduler()
        self.assertEqual(scheduler.remainingBytes, 6 * P)
        self.assertEqual([(b, o) for b, o, _ in _drain(scheduler)],
                         [("pc.ram", i) for i in range(4)] + [("pc.rom", 0), ("pc.rom", 1)])
        self.assertEqual(scheduler.remainingBytes, 0)
        self.assertIsNone(scheduler.nextPage())

    def test_requestMovesScan(self) -> None:
        """
        A requested page jumps the queue and the sweep continues after it,
        then wraps round to what it skipped.
        """
        scheduler = _scheduler()
        scheduler.queueRequest("pc.ram", 2 * P, P)
        self.assertEqual(_drain(scheduler), [
            ("pc.ram", 2, True), ("pc.ram", 3, False), ("pc.rom", 0, False),
            ("pc.rom", 1, False), ("pc.ram", 0, False), ("pc.ram", 1, False)])

    def test_requestForSentPageSkipped(self) -> None:
        """
        A request for a page already sent is dropped: no page is handed out
        twice.
        """
        scheduler = _scheduler()
        first = scheduler.nextPage()
        self.assertEqual(first, ScheduledPage("pc.ram", 0))
        scheduler.queueRequest("pc.ram", 0, 2 * P)
        self.assertEqual(scheduler.nextPage(), ScheduledPage("pc.ram", P, True))

    def test_reqPagesUsesPreviousBlock(self) -> None:
        """
        REQ_PAGES (no name) uses the block of the previous REQ_PAGES_ID and
        fails with QEMU's text when there is none.
        """
        scheduler = _scheduler()
        error = self.assertRaises(PageRequestError, scheduler.queueRequest, None, 0, P)
        self.assertEqual(str(error), "ram_save_queue_pages no previous block")
        scheduler.queueRequest("pc.rom", P, P)
        scheduler.nextPage()
        scheduler.queueRequest(None, 0, P)
        self.assertEqual(scheduler.nextPage(), ScheduledPage("pc.rom", 0, True))

    def test_badRequests(self) -> None:
        """
        Unknown blocks, misaligned and overrunning requests are refused
        with QEMU's texts.
        """
        scheduler = _scheduler()
        cases = [
            (("xyz", 0, P), "ram_save_queue_pages no block 'xyz'"),
            (("pc.ram", 1, P), "migrate_handle_rp_req_pages: Misaligned page request, "
                               "start: 1 len: 1000"),
            (("pc.ram", 4 * P, P), "ram_save_queue_pages request overrun start=4000 "
                                   "len=1000 blocklen=4000"),
        ]
        for args, text in cases:
            error = self.assertRaises(PageRequestError, scheduler.queueRequest, *args)
            self.assertEqual(str(error), text)

    def test_markDirtyAndDiscard(self) -> None:
        """
        Re-dirtied pages are sent again, and the discard commands list
        every dirty run per block, at most 12 ranges each.
        """
        scheduler = PageScheduler.forBlocks([("pc.ram", 40 * P, P), ("pc.rom", 2 * P, P)])
        for _ in range(40):
            scheduler.nextPage()
        for page in range(0, 40, 2):
            scheduler.markDirty("pc.ram", page * P, 1)
        commands = list(scheduler.discardCommands())
        self.assertEqual([(name, len(ranges)) for name, ranges in commands],
                         [("pc.ram", 12), ("pc.ram", 8), ("pc.rom", 1)])
        self.assertEqual(commands[0][1][:2], [(0, P), (2 * P, P)])
        self.assertEqual(commands[2][1], [(0, 2 * P)])


class SkipZeroTests(SynchronousTestCase):
    """
    L{PageScheduler.skipZero}: known-zero pages are not sent unless the
    destination asks for them.
    """

    def scheduler(self) -> PageScheduler:
        """
        @return: a scheduler over a 2048-page block (four zero windows) and
            a 2-page one, with pages 1 to 1999 of the first skipped.
        """
        scheduler = PageScheduler.forBlocks([("pc.ram", 2048 * P, P), ("pc.rom", 2 * P, P)])
        scheduler.skipZero("pc.ram", P, 1999 * P)
        return scheduler

    def test_skipped(self) -> None:
        """
        Skipped pages leave the remaining bytes and the sweep; only whole
        host pages inside the range are skipped.
        """
        scheduler = PageScheduler.forBlocks([("huge", 8 * 2 * P, 2 * P)])
        scheduler.skipZero("huge", P, 9 * P)
        self.assertEqual(scheduler.remainingBytes, 4 * 2 * P)
        self.assertEqual([page.offset // (2 * P) for page in iter(scheduler.nextPage, None)], [0, 5, 6, 7])
        scheduler = self.scheduler()
        self.assertEqual(scheduler.remainingBytes, 51 * P)
        self.assertEqual([(b, o) for b, o, _ in _drain(scheduler)],
                         [("pc.ram", 0)] + [("pc.ram", i) for i in range(2000, 2048)]
                         + [("pc.rom", 0), ("pc.rom", 1)])
        self.assertEqual(scheduler.remainingBytes, 0)

    def test_requestRevivesWindow(self) -> None:
        """
        A request for a skipped page sends it first, then the other skipped
        pages of its 2 MiB window as readahead; the rest stays skipped.
        """
        scheduler = self.scheduler()
        scheduler.queueRequest("pc.ram", 600 * P, 2 * P)
        self.assertEqual(scheduler.remainingBytes, (51 + 512) * P)
        sent = _drain(scheduler)
        self.assertEqual(sent[:2], [("pc.ram", 600, True), ("pc.ram", 601, True)])
        self.assertEqual(sent[2:512], [("pc.ram", page, True) for page in range(512, 1024) if page not in (600, 601)])
        self.assertEqual(sorted(page for block, page, urgent in sent if not urgent and block == "pc.ram"),
                         [0] + list(range(2000, 2048)))

    def test_hugePageWindow(self) -> None:
        """
        The window is 2 MiB whatever the page size: one 2 MiB host page
        brings no other with it.
        """
        huge = 2 << 20
        scheduler = PageScheduler.forBlocks([("huge", 8 * huge, huge)])
        scheduler.skipZero("huge", 0, 8 * huge)
        scheduler.queueRequest("huge", 3 * huge, huge)
        self.assertEqual(scheduler.remainingBytes, huge)
        self.assertEqual(_drain(scheduler), [("huge", 3 * huge // P, True)])

    def test_noReviveOnceWritten(self) -> None:
        """
        With C{revive} off (the stream is written to its end) a request for
        a skipped page queues nothing: the destination makes it zero.
        """
        scheduler = self.scheduler()
        _drain(scheduler)
        scheduler.queueRequest("pc.ram", 600 * P, P, revive=False)
        self.assertIsNone(scheduler.nextPage())
        self.assertEqual(scheduler.remainingBytes, 0)

    def test_reviveOnlySkipped(self) -> None:
        """
        Only the skipped pages of the window are revived and read ahead:
        the data pages around them go with the sweep, as without skipping.
        """
        scheduler = PageScheduler.forBlocks([("pc.ram", 1024 * P, P)])
        scheduler.skipZero("pc.ram", 0, P)
        scheduler.skipZero("pc.ram", 10 * P, 2 * P)
        scheduler.queueRequest("pc.ram", 300 * P, P)
        self.assertEqual(_drain(scheduler)[:4], [("pc.ram", 300, True), ("pc.ram", 0, True),
                                                 ("pc.ram", 10, True), ("pc.ram", 11, True)])

    def test_maskSkipped(self) -> None:
        """
        After a recovery rebuilt a dirty map from the destination's
        received bitmap, the skipped pages are cleared from it again;
        revived ones are not skipped any more.
        """
        scheduler = self.scheduler()
        scheduler.queueRequest("pc.ram", 600 * P, P)
        block = scheduler.blocks[0]
        block.dirty = bytearray(b"\x01") * 2048
        block.maskSkipped()
        self.assertEqual([page for page in range(2048) if block.dirty[page]],
                         [0] + list(range(512, 1024)) + list(range(2000, 2048)))


class RateLimiterTests(SynchronousTestCase):
    """
    QEMU's 100 ms window budget.
    """

    def test_budget(self) -> None:
        """
        A 10 000 B/s limit allows 1000 bytes per window and resets when the
        window ends.
        """
        clock = Clock()
        limiter = RateLimiter(clock.seconds, 10000)
        limiter.account(999)
        self.assertFalse(limiter.limited())
        limiter.account(1)
        self.assertTrue(limiter.limited())
        clock.advance(0.04)
        self.assertAlmostEqual(limiter.delay(), 0.06)
        clock.advance(0.06)
        self.assertFalse(limiter.limited())

    def test_unlimited(self) -> None:
        """
        A bandwidth of 0 never limits.
        """
        limiter = RateLimiter(Clock().seconds, 0)
        limiter.account(10**12)
        self.assertFalse(limiter.limited())

    def test_converged(self) -> None:
        """
        Remaining bytes at most bandwidth x downtime-limit converge.
        """
        self.assertTrue(converged(30_000, 100_000, 300))
        self.assertFalse(converged(30_001, 100_000, 300))
