# -*- test-case-name: tests.test_source_prefetch -*-
"""
Source-side policies that send pages before the destination asks for
them (docs/prefetch.md), each switched by an C{x-} migration parameter:

  - C{x-readahead-pages}: with a requested page, send up to this many
    following pages, the window sized by the recent requests
    (L{Readahead}: a request that continues a stream doubles its window,
    one that does not starts a new stream with none);
  - C{x-scan-follows-faults}: the background scan continues after the
    last requested page (QEMU 7.2's C{get_queued_page}) or, at 0, keeps
    its own position (what 7.2 does with postcopy-preempt);
  - C{x-working-set-pages}: a snapshot restore records the pages the
    restored guest asked for first, in order (L{RequestLog}), and the next
    restore or clone of that snapshot sends them before anything else
    (REAP's working-set prefetch; the file is
    L{twisted_postcopy.snapshot.workingset});
  - C{x-skip-known-zero}: with postcopy-ram, pages the VM knows are zero
    (a snapshot's holes) are not sent, since POSTCOPY_ADVISE emptied the
    destination's RAM; a request for one brings it and the other skipped
    pages of its L{ZERO_WINDOW} (C{PageScheduler.skipZero}).

Nothing here sends: L{twisted_postcopy.source.sender.PageScheduler} asks
these objects which pages to hand out, and its dirty maps make sure a page
the destination already has is never handed out again, whichever policy
chose it.
"""

from __future__ import annotations

from array import array
from typing import Iterable, Mapping

from attrs import define, field

#: The parameters' names.
READAHEAD = "x-readahead-pages"
SCAN_FOLLOWS_FAULTS = "x-scan-follows-faults"
WORKING_SET = "x-working-set-pages"
SKIP_KNOWN_ZERO = "x-skip-known-zero"
#: Their defaults (docs/prefetch.md has the measurements behind them).
DEFAULTS = {READAHEAD: 0, SCAN_FOLLOWS_FAULTS: 1, WORKING_SET: 0, SKIP_KNOWN_ZERO: 1}
#: The largest value each accepts.
MAXIMA = {READAHEAD: 512, SCAN_FOLLOWS_FAULTS: 1, WORKING_SET: 1 << 20, SKIP_KNOWN_ZERO: 1}
#: With a request for a skipped zero page, the skipped pages of its aligned
#: window of this many bytes are sent too (one host page at least).
ZERO_WINDOW = 2 << 20
#: The first window of a stream found sequential.
FIRST_WINDOW = 4
#: Request streams tracked at once (one per guest thread reading ahead).
STREAMS = 8


def checkParameter(name: str, value: int) -> str | None:
    """
    @param name: a parameter name.
    @param value: its new (non-negative integer) value.
    @return: QEMU-style error text if C{name} is one of ours and C{value}
        is out of range, else L{None}.
    """
    if name in MAXIMA and value > MAXIMA[name]:
        return f"Parameter '{name}' expects an integer in the range of 0 to {MAXIMA[name]}"
    return None


@define
class _Stream:
    """
    One run of requests that follow each other.

    @ivar block: the block index.
    @ivar next: the first page after what was requested and read ahead.
    @ivar window: the current readahead window, in host pages.
    """

    block: int
    next: int
    window: int


@define
class Readahead:
    """
    The readahead window: which pages to send after a requested range.

    A request is sequential when it starts at or shortly after the end of
    what a tracked stream asked for and read ahead (within one window, so
    that a guest that skipped a few pages still counts); its stream's
    window then doubles, from L{FIRST_WINDOW} up to the limit.  Any other
    request starts a new stream (replacing the least recent) with no
    readahead: random faults cost nothing extra.

    @ivar parameters: the migration's parameters (live).
    @ivar streams: the tracked streams, most recent last.
    @ivar sent: pages handed out by readahead (counted by the scheduler).
    """

    parameters: Mapping[str, int] = field(factory=dict)
    streams: list[_Stream] = field(factory=list)
    sent: int = 0

    @property
    def limit(self) -> int:
        """
        The largest window, C{x-readahead-pages}.
        """
        return self.parameters.get(READAHEAD, DEFAULTS[READAHEAD])

    def requested(self, block: int, first: int, end: int) -> int:
        """
        A request for pages C{first} to C{end} (excluded) of a block.

        @param block: the block index.
        @param first: the first requested page.
        @param end: the page after the last.
        @return: how many pages after C{end} to read ahead.
        """
        limit = self.limit
        if limit <= 0:
            return 0
        for index, stream in enumerate(self.streams):
            if stream.block == block and stream.next - stream.window <= first <= stream.next + max(
                    stream.window, FIRST_WINDOW):
                del self.streams[index]
                stream.window = min(limit, max(FIRST_WINDOW, stream.window * 2))
                break
        else:
            stream = _Stream(block, end, 0)
            if len(self.streams) >= STREAMS:
                del self.streams[0]
        stream.next = end + stream.window
        self.streams.append(stream)
        return stream.window

    def clear(self) -> None:
        """
        Forget the streams (after recovery the destination asks again).
        """
        self.streams.clear()


def scanFollowsFaults(parameters: Mapping[str, int]) -> bool:
    """
    @param parameters: the migration's parameters.
    @return: whether the background scan moves to a requested page.
    """
    return bool(parameters.get(SCAN_FOLLOWS_FAULTS, DEFAULTS[SCAN_FOLLOWS_FAULTS]))


def skipKnownZero(parameters: Mapping[str, int]) -> bool:
    """
    @param parameters: the migration's parameters.
    @return: whether pages known to be zero are left unsent in postcopy.
    """
    return bool(parameters.get(SKIP_KNOWN_ZERO, DEFAULTS[SKIP_KNOWN_ZERO]))


@define
class RequestLog:
    """
    The pages a destination asked for, first request first, each once,
    at most C{limit} (the working set a snapshot records).

    @ivar limit: the most pages kept.
    @ivar blocks: per block index, one byte per page: already logged.
    @ivar pages: (block index, page) pairs flattened, in request order.
    """

    limit: int
    blocks: list[bytearray]
    pages: array = field(factory=lambda: array("Q"))

    @classmethod
    def forBlocks(cls, pageCounts: Iterable[int], limit: int) -> RequestLog:
        """
        @param pageCounts: each block's page count, in list order.
        @param limit: the most pages kept.
        @return: an empty log.
        """
        return cls(limit, [bytearray(count) for count in pageCounts])

    def __len__(self) -> int:
        """
        @return: the pages logged.
        """
        return len(self.pages) // 2

    def add(self, block: int, first: int, end: int) -> None:
        """
        Log the pages C{first} to C{end} (excluded) of a block, those not
        logged yet, until the limit.

        @param block: the block index.
        @param first: the first page.
        @param end: the page after the last.
        """
        seen = self.blocks[block]
        for page in range(first, min(end, first + self.limit - len(self))):
            if not seen[page]:
                seen[page] = 1
                self.pages.extend((block, page))

    def known(self, pages: Iterable[tuple[int, int]]) -> None:
        """
        Pages never to log (already in the working set).

        @param pages: (block index, page) pairs.
        """
        for block, page in pages:
            self.blocks[block][page] = 1

    def entries(self) -> list[tuple[int, int]]:
        """
        @return: the logged (block index, page) pairs in order.
        """
        pages = self.pages
        return list(zip(pages[0::2], pages[1::2]))
