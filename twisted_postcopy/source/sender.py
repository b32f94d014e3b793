# -*- test-case-name: tests.test_source_sender -*-
"""
Page scheduling on the source (QEMU's C{ram_find_and_save_block},
C{get_queued_page}, C{ram_save_queue_pages}, C{migration_rate_limit}).

L{PageScheduler} keeps one dirty map per RAMBlock (one byte per target
page, so C{bytearray.find} scans in C).  It hands out pages in QEMU's
order: queued page requests first (a request moves the background scan to
the requested page), then the background sweep in block-list order, offsets
upward.  A page's dirty bit clears as it is handed out, so after LISTEN no
page is ever sent twice.

The policies of L{twisted_postcopy.source.prefetch} (docs/prefetch.md)
change only the order: readahead pages follow the requested ones, a
snapshot's working set goes before the sweep, and C{x-scan-follows-faults}
decides whether a request moves the sweep; every page still goes through
the same dirty maps.

L{RateLimiter} is QEMU's 100 ms window budget; L{converged} is its
completion test.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Mapping

from attrs import define, field, frozen

from twisted_postcopy.errors import LimitExceededError, MigrationError
from twisted_postcopy.source.prefetch import ZERO_WINDOW, Readahead, RequestLog, scanFollowsFaults
from twisted_postcopy.wire.constants import DEFAULT_MAX_QUEUED_REQUESTS, MAX_DISCARDS_PER_COMMAND

#: QEMU's C{BUFFER_DELAY}: the rate limiting window, in seconds.
WINDOW = 0.1
#: The most readahead ranges waiting at once (the oldest are dropped).
MAX_AHEAD_RANGES = 64


@frozen
class ScheduledPage:
    """
    One host page the source is to send.

    @ivar block: the RAMBlock's idstr.
    @ivar offset: byte offset in the block.
    @ivar urgent: whether it answers a page request.
    """

    block: str
    offset: int
    urgent: bool = False


class PageRequestError(MigrationError):
    """
    A REQ_PAGES/REQ_PAGES_ID the source must refuse; the message is QEMU's.
    """


@define
class _BlockMap:
    """
    The dirty map of one RAMBlock.

    @ivar idstr: the block name.
    @ivar length: used length in bytes.
    @ivar pageSize: host page size in bytes.
    @ivar dirty: one byte per page, 1 = still to send.
    @ivar queued: one byte per page, 1 = in the request queue.
    @ivar skipped: one byte per page, 1 = known to be zero and not sent
        (L{PageScheduler.skipZero}), or L{None} when nothing was skipped.
    """

    idstr: str
    length: int
    pageSize: int
    dirty: bytearray = field(init=False)
    queued: bytearray = field(init=False)
    skipped: bytearray | None = None

    def __attrs_post_init__(self) -> None:
        """
        Every page starts dirty (QEMU's first bitmap is all ones) and
        unrequested.
        """
        self.dirty = bytearray(b"\x01") * (self.length // self.pageSize)
        self.queued = bytearray(len(self.dirty))

    def unskip(self, first: int, end: int) -> list[tuple[int, int]]:
        """
        Make the skipped pages among C{first} to C{end} (excluded) dirty
        again.

        @return: the runs of pages that became dirty, as (first, end).
        """
        skipped, dirty = self.skipped, self.dirty
        runs: list[tuple[int, int]] = []
        if skipped is None:
            return runs
        start = skipped.find(1, first, end)
        while start >= 0:
            stop = skipped.find(0, start, end)
            stop = end if stop < 0 else stop
            runs.append((start, stop))
            dirty[start:stop] = b"\x01" * (stop - start)
            skipped[start:stop] = bytes(stop - start)
            start = skipped.find(1, stop, end)
        return runs

    def maskSkipped(self) -> None:
        """
        Clear the dirty bit of every skipped page (after a recovery
        rebuilt the dirty map from the destination's received bitmap).
        """
        if self.skipped is not None:
            dirty = int.from_bytes(self.dirty, "little") & ~int.from_bytes(self.skipped, "little")
            self.dirty = bytearray(dirty.to_bytes(len(self.dirty), "little"))

    def runs(self) -> Iterator[tuple[int, int]]:
        """
        @return: the runs of dirty pages as (start, length) in bytes.
        """
        dirty, size, index = self.dirty, self.pageSize, 0
        while True:
            start = dirty.find(1, index)
            if start < 0:
                return
            end = dirty.find(0, start)
            end = len(dirty) if end < 0 else end
            yield start * size, (end - start) * size
            index = end


@define
class RequestQueue:
    """
    Page requests not yet answered, as ranges of pages, de-duplicated and
    capped: a range is queued only if one of its pages is still dirty and
    not already queued, so a burst of requests for the same pages costs a
    C{bytearray.find} each (in C), not a queue entry per page.

    @ivar blocks: the block maps (whose C{queued} bytes this keeps).
    @ivar limit: the most ranges queued at once (max-queued-requests).
    @ivar ranges: (block index, first page, end page) in arrival order.
    @ivar ahead: readahead ranges, sent after every requested page (at
        most L{MAX_AHEAD_RANGES}; they do not count against C{limit}).
    """

    blocks: list[_BlockMap]
    limit: int = DEFAULT_MAX_QUEUED_REQUESTS
    ranges: deque[tuple[int, int, int]] = field(factory=deque)
    ahead: deque[tuple[int, int, int]] = field(factory=lambda: deque(maxlen=MAX_AHEAD_RANGES))

    def __len__(self) -> int:
        """
        @return: the number of queued ranges, readahead included.
        """
        return len(self.ranges) + len(self.ahead)

    def add(self, index: int, first: int, end: int) -> None:
        """
        Queue the pages C{first} to C{end} (excluded) of a block.

        @param index: the block index.
        @param first: the first page.
        @param end: the page after the last.
        @raise LimitExceededError: if C{limit} ranges are already queued.
        """
        block = self.blocks[index]
        if block.queued.find(0, first, end) < 0 or block.dirty.find(1, first, end) < 0:
            return
        if len(self.ranges) >= self.limit:
            raise LimitExceededError(
                f"more than {self.limit} page requests queued on the source", limit="max-queued-requests")
        block.queued[first:end] = b"\x01" * (end - first)
        self.ranges.append((index, first, end))

    def pop(self) -> tuple[int, int] | None:
        """
        @return: the first queued page still dirty, as (block index, page),
            or L{None}; pages sent meanwhile are skipped.
        """
        ranges = self.ranges
        while ranges:
            index, first, end = ranges[0]
            block = self.blocks[index]
            page = block.dirty.find(1, first, end)
            if page < 0:
                ranges.popleft()
                block.queued[first:end] = bytes(end - first)
                continue
            block.queued[first:page + 1] = bytes(page + 1 - first)
            if page + 1 < end:
                ranges[0] = (index, page + 1, end)
            else:
                ranges.popleft()
            return index, page
        return None

    def addAhead(self, index: int, first: int, end: int) -> None:
        """
        Queue readahead pages, sent after the requested ones.

        @param index: the block index.
        @param first: the first page.
        @param end: the page after the last.
        """
        if self.blocks[index].dirty.find(1, first, end) >= 0:
            self.ahead.append((index, first, end))

    def popAhead(self) -> tuple[int, int] | None:
        """
        @return: the first readahead page still dirty, as (block index,
            page), or L{None}.
        """
        ahead = self.ahead
        while ahead:
            index, first, end = ahead[0]
            page = self.blocks[index].dirty.find(1, first, end)
            if page < 0:
                ahead.popleft()
                continue
            if page + 1 < end:
                ahead[0] = (index, page + 1, end)
            else:
                ahead.popleft()
            return index, page
        return None

    def clear(self) -> None:
        """
        Forget every request (the destination asks again after recovery).
        """
        for index, first, end in self.ranges:
            self.blocks[index].queued[first:end] = bytes(end - first)
        self.ranges.clear()
        self.ahead.clear()


@define
class PageScheduler:
    """
    The source's dirty maps, request queue and scan position.

    @ivar blocks: the block maps, in list order.
    @ivar queue: pending requests (a L{RequestQueue}).
    @ivar position: the background scan's (block index, page index).
    @ivar lastRequestBlock: the block of the previous REQ_PAGES_ID.
    @ivar dirtyBytes: bytes of the pages still dirty.
    @ivar parameters: the migration's parameters (live), read for the
        policies of L{twisted_postcopy.source.prefetch}.
    @ivar readahead: sizes the readahead after each request.
    @ivar log: records requested pages (a snapshot's working set), or
        L{None}.
    @ivar prefetch: pages to send before the background sweep, as
        (block index, page) in order (a snapshot's working set).
    @ivar scanResume: where the sweep resumes once requested pages are
        out, when requests do not move it (C{x-scan-follows-faults} 0).
    """

    blocks: list[_BlockMap]
    queue: RequestQueue = field(default=None)
    position: tuple[int, int] = (0, 0)
    lastRequestBlock: int | None = None
    dirtyBytes: int = 0
    parameters: Mapping[str, int] = field(factory=dict)
    readahead: Readahead = field(default=None)
    log: RequestLog | None = None
    prefetch: deque[tuple[int, int]] = field(factory=deque)
    scanResume: tuple[int, int] | None = None

    def __attrs_post_init__(self) -> None:
        """
        Count the dirty bytes; make the request queue and the readahead.
        """
        if self.queue is None:
            self.queue = RequestQueue(self.blocks)
        if self.readahead is None:
            self.readahead = Readahead(self.parameters)
        self.dirtyBytes = sum(len(b.dirty) * b.pageSize for b in self.blocks)

    @classmethod
    def forBlocks(cls, blocks: Iterable[tuple[str, int, int]],
                  parameters: Mapping[str, int] | None = None) -> PageScheduler:
        """
        @param blocks: (idstr, used length, page size) in QEMU's list order.
        @param parameters: the migration's parameters (live), for the
            prefetch policies; L{None} for their defaults.
        @return: a scheduler with every page dirty.
        """
        return cls([_BlockMap(idstr, length, pageSize) for idstr, length, pageSize in blocks],
                   parameters={} if parameters is None else parameters)

    def _index(self, idstr: str) -> int:
        """
        @param idstr: a block name.
        @return: its index.
        @raise KeyError: no such block.
        """
        for index, block in enumerate(self.blocks):
            if block.idstr == idstr:
                return index
        raise KeyError(idstr)

    @property
    def remainingBytes(self) -> int:
        """
        Bytes still dirty (QEMU's C{ram_bytes_remaining}).
        """
        return self.dirtyBytes

    def markDirty(self, idstr: str, offset: int, length: int) -> None:
        """
        Pages were written (a dirty sync reported them).

        @param idstr: the block.
        @param offset: byte offset of the written range.
        @param length: byte length of the written range.
        """
        block = self.blocks[self._index(idstr)]
        first = offset // block.pageSize
        last = min(len(block.dirty), -(-(offset + length) // block.pageSize))
        if last > first:
            self.dirtyBytes += (last - first - block.dirty.count(1, first, last)) * block.pageSize
            block.dirty[first:last] = b"\x01" * (last - first)

    def queueRequest(self, idstr: str | None, start: int, length: int, revive: bool = True) -> None:
        """
        Validate and queue a page request (C{migrate_handle_rp_req_pages},
        C{ram_save_queue_pages}).

        @param idstr: the named block (REQ_PAGES_ID), or L{None} for the
            previously named one (REQ_PAGES).
        @param start: byte offset.
        @param length: byte length.
        @param revive: send skipped zero pages the destination asks for
            (L{skipZero}); off once the stream is written to its end.
        @raise PageRequestError: with QEMU's text, for a request QEMU
            refuses.
        """
        if idstr is None:
            if self.lastRequestBlock is None:
                raise PageRequestError("ram_save_queue_pages no previous block")
            index = self.lastRequestBlock
        else:
            try:
                index = self._index(idstr)
            except KeyError:
                raise PageRequestError(f"ram_save_queue_pages no block '{idstr}'") from None
            self.lastRequestBlock = index
        block = self.blocks[index]
        if start % block.pageSize or length % block.pageSize or length <= 0:
            raise PageRequestError(
                "migrate_handle_rp_req_pages: Misaligned page request, "
                f"start: {start:x} len: {length:x}"
            )
        if start + length > block.length:
            raise PageRequestError(
                f"ram_save_queue_pages request overrun start={start:x} "
                f"len={length:x} blocklen={block.length:x}"
            )
        first = start // block.pageSize
        end = first + length // block.pageSize
        if revive and block.skipped is not None:
            self._revive(index, first, end)
        self.queue.add(index, first, end)
        if self.log is not None:
            self.log.add(index, first, end)
        window = self.readahead.requested(index, first, end)
        if window:
            self.queue.addAhead(index, end, min(len(block.dirty), end + window))

    @property
    def anySkipped(self) -> bool:
        """
        Whether some page is still left out as a known zero (L{skipZero}):
        never sent, so only a request would bring it.
        """
        return any(block.skipped is not None and 1 in block.skipped for block in self.blocks)

    def skipZero(self, idstr: str, offset: int, length: int) -> None:
        """
        Pages known to be zero that the destination already holds as
        zeros (after POSTCOPY_ADVISE its RAM is empty): they are not sent
        unless asked for.  Only whole host pages inside the range are
        skipped.

        @param idstr: the block.
        @param offset: byte offset.
        @param length: byte length.
        """
        block = self.blocks[self._index(idstr)]
        first = -(-offset // block.pageSize)
        end = min(len(block.dirty), (offset + length) // block.pageSize)
        if end <= first:
            return
        if block.skipped is None:
            block.skipped = bytearray(len(block.dirty))
        dirty = block.dirty.count(1, first, end)
        self.dirtyBytes -= dirty * block.pageSize
        block.dirty[first:end] = bytes(end - first)
        block.skipped[first:end] = b"\x01" * (end - first)

    def _revive(self, index: int, first: int, end: int) -> None:
        """
        The destination asked for pages, some of them skipped: those, and
        the skipped pages of the L{ZERO_WINDOW} around them, are sent after
        all (the guest is using that zero memory; ZERO records are cheap).

        @param index: the block index.
        @param first: the first requested page.
        @param end: the page after the last.
        """
        block = self.blocks[index]
        window = max(1, ZERO_WINDOW // block.pageSize)
        low = first - first % window
        for start, stop in block.unskip(low, min(len(block.dirty), max(end, low + window))):
            self.dirtyBytes += (stop - start) * block.pageSize
            self.queue.addAhead(index, start, stop)

    def prefetchFirst(self, pages: Iterable[tuple[int, int]]) -> None:
        """
        Send these pages before the background sweep (a working set).

        @param pages: (block index, page) pairs, in order, each within its
            block (checked by whoever read them).
        """
        self.prefetch.extend(pages)

    def _take(self, index: int, page: int, urgent: bool) -> ScheduledPage:
        """
        Clear a page's dirty bit and hand it out.

        @param index: block index.
        @param page: page index.
        @param urgent: whether a request asked for it.
        @return: the page.
        """
        block = self.blocks[index]
        block.dirty[page] = 0
        self.dirtyBytes -= block.pageSize
        self.position = (index, page + 1)
        return ScheduledPage(block.idstr, page * block.pageSize, urgent)

    def nextUrgent(self) -> ScheduledPage | None:
        """
        @return: the first queued page still dirty, then the first
            readahead page still dirty, or L{None}; requested pages already
            sent are dropped silently.  Readahead pages are urgent too (they
            go where the requested ones go).
        """
        queued = self.queue.pop()
        if queued is None:
            queued = self.queue.popAhead()
            if queued is None:
                return None
            self.readahead.sent += 1
        if self.scanResume is None and not scanFollowsFaults(self.parameters):
            self.scanResume = self.position
        return self._take(*queued, True)

    def _resumeScan(self) -> None:
        """
        Put the sweep back where requests took it from, if they do not
        move it.
        """
        if self.scanResume is not None:
            self.position, self.scanResume = self.scanResume, None

    def _prefetchRun(self, maxPages: int) -> tuple[str, int, int, int] | None:
        """
        Hand out the next pages of L{prefetch} still dirty: consecutive
        ones of one block together, up to C{maxPages}; the sweep's position
        stays.

        @param maxPages: the most pages to take.
        @return: (idstr, first offset, page count, page size), or L{None}
            once L{prefetch} is used up.
        """
        prefetch = self.prefetch
        while prefetch:
            index, first = prefetch.popleft()
            block = self.blocks[index]
            dirty = block.dirty
            if not dirty[first]:
                continue
            end = first + 1
            while prefetch and end - first < maxPages and prefetch[0] == (index, end) and dirty[end]:
                prefetch.popleft()
                end += 1
            dirty[first:end] = bytes(end - first)
            self.dirtyBytes -= (end - first) * block.pageSize
            return block.idstr, first * block.pageSize, end - first, block.pageSize
        return None

    def nextBackground(self) -> ScheduledPage | None:
        """
        @return: the next page of L{prefetch} still dirty, else the next
            dirty page from the scan position, wrapping around once, or
            L{None} when nothing is dirty.
        """
        if self.prefetch:
            run = self._prefetchRun(1)
            if run is not None:
                return ScheduledPage(run[0], run[1])
        self._resumeScan()
        start, page = self.position
        count = len(self.blocks)
        for step in range(count + 1):
            index = (start + step) % count
            begin = page if step == 0 else 0
            found = self.blocks[index].dirty.find(1, begin)
            if found >= 0:
                return self._take(index, found, False)
        return None

    def nextBackgroundRun(self, maxPages: int) -> tuple[str, int, int, int] | None:
        """
        Hand out up to C{maxPages} consecutive dirty pages of one block from
        the scan position (wrapping around once), clearing their bits.

        @param maxPages: the most pages to take.
        @return: (idstr, first offset, page count, page size), or L{None}
            when nothing is dirty.
        """
        if self.prefetch:
            run = self._prefetchRun(maxPages)
            if run is not None:
                return run
        page = self.nextBackground()
        if page is None:
            return None
        index, first = self.position[0], self.position[1] - 1
        block = self.blocks[index]
        dirty = block.dirty
        end = dirty.find(0, first + 1, first + maxPages)
        end = min(len(dirty), first + maxPages) if end < 0 else end
        dirty[first + 1 : end] = bytes(end - first - 1)
        self.dirtyBytes -= (end - first - 1) * block.pageSize
        self.position = (index, end)
        return block.idstr, page.offset, end - first, block.pageSize

    def nextPage(self) -> ScheduledPage | None:
        """
        @return: the next page to send: urgent first, then background.
        """
        return self.nextUrgent() or self.nextBackground()

    def restartScan(self) -> None:
        """
        Move the scan to the start of RAM (at the switch to postcopy).
        """
        self.position = (0, 0)
        self.scanResume = None

    def discardCommands(self) -> Iterator[tuple[str, list[tuple[int, int]]]]:
        """
        The POSTCOPY_RAM_DISCARD commands for every page still dirty: per
        block in list order, at most L{MAX_DISCARDS_PER_COMMAND} ranges
        each, no empty command.

        @return: an iterator of (idstr, [(start, length), ...]).
        """
        for block in self.blocks:
            ranges = list(block.runs())
            for first in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
                yield block.idstr, ranges[first : first + MAX_DISCARDS_PER_COMMAND]


@define
class RateLimiter:
    """
    QEMU's rate limit: a budget of C{bandwidth / 10} bytes per 100 ms
    window; a bandwidth of 0 means unlimited.

    @ivar now: returns the time in seconds.
    @ivar bandwidth: bytes per second, 0 for unlimited.
    @ivar windowStart: when the current window began.
    @ivar used: bytes accounted in the current window.
    """

    now: Callable[[], float]
    bandwidth: int = 0
    windowStart: float = field(default=None)
    used: int = 0

    def _roll(self) -> None:
        """
        Start a new window if the current one is over.
        """
        now = self.now()
        if self.windowStart is None or now - self.windowStart >= WINDOW:
            self.windowStart = now
            self.used = 0

    def account(self, size: int) -> None:
        """
        Count bytes written.

        @param size: how many.
        """
        self._roll()
        self.used += size

    def limited(self) -> bool:
        """
        @return: whether the window's budget is spent.
        """
        self._roll()
        return self.bandwidth > 0 and self.used >= self.bandwidth * WINDOW

    def allowance(self) -> float:
        """
        @return: bytes left in the current window (infinite if unlimited).
        """
        self._roll()
        if self.bandwidth <= 0:
            return float("inf")
        return max(0.0, self.bandwidth * WINDOW - self.used)

    def delay(self) -> float:
        """
        @return: seconds until the next window begins.
        """
        return max(0.0, self.windowStart + WINDOW - self.now())


def converged(remaining: int, bandwidth: float, downtimeLimitMs: int) -> bool:
    """
    QEMU's completion test: the remaining dirty data fits in the downtime
    at the measured bandwidth.

    @param remaining: dirty bytes left.
    @param bandwidth: measured bytes per second.
    @param downtimeLimitMs: the C{downtime-limit} parameter.
    @return: whether the source may stop and finish.
    """
    return remaining <= bandwidth * downtimeLimitMs / 1000

