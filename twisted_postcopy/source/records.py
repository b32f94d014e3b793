# -*- test-case-name: tests.test_source_outgoing -*-
"""
RAM records from guest memory: the source's hot loop.

L{RecordWriter} turns runs of pages into QEMU 7.2 RAM records
(migration-stream.md 3.1-3.2) with the wire's encoder
(L{twisted_postcopy.wire.ram.RAMRecordEncoder.pageRun}): a PAGE record
with the page as a memoryview of the block (gathered, not copied, until
the step joins its buffers), or a ZERO record when the page is all zero;
the block name only when the block differs from the previous record's
(CONTINUE otherwise).  It chooses the pages (urgent first) and counts.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field

from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE
from twisted_postcopy.wire.ram import RAMRecordEncoder

#: The target page: one RAM record each.
TARGET_PAGE = TARGET_PAGE_SIZE
#: Batch cost of a page whose content is unknown in advance.
PAGE_COST = 4096
#: What a record costs at least against a step's batch, so a step of ZERO
#: records stays short and page requests are read between steps.
MIN_RECORD_COST = 128


@define
class RecordWriter:
    """
    Gathers RAM records of one outgoing stream, encoded by the wire's
    L{RAMRecordEncoder.pageRun} (zero copy, CONTINUE tracking), and counts
    them.

    @ivar views: idstr -> memoryview of the block's RAM (the source reads
        its own guest RAM; nothing here runs on a destination).
    @ivar stats: counts C{normal} and C{duplicate} pages.
    @ivar encoder: the channel's RAM record encoder (its C{lastBlock} is
        QEMU's C{last_sent_block}).
    """

    views: dict[str, memoryview]
    stats: Any
    encoder: RAMRecordEncoder = field(factory=RAMRecordEncoder)

    @property
    def lastBlock(self) -> str | None:
        """
        The block of the previous record; set to L{None} to make the next
        record name its block (after the switch to postcopy, recovery).
        """
        return self.encoder.lastBlock

    @lastBlock.setter
    def lastBlock(self, block: str | None) -> None:
        self.encoder.lastBlock = block

    def write(self, idstr: str, offset: int, count: int, size: int, out: list[Any]) -> int:
        """
        Append the records of a run of host pages of one block, one record
        per target page.

        @param idstr: the block.
        @param offset: the first page's offset.
        @param count: how many host pages.
        @param size: the host page size.
        @param out: the buffers being gathered.
        @return: the run's cost against the batch (see L{MIN_RECORD_COST}).
        """
        end = offset + count * size
        pages = (end - offset) // TARGET_PAGE
        normal = self.encoder.pageRun(idstr, self.views[idstr], offset, end, out)
        self.stats.normal += normal
        self.stats.duplicate += pages - normal
        return normal * TARGET_PAGE + (pages - normal) * MIN_RECORD_COST

    def gather(self, scheduler: Any, out: list[Any], budget: float, batch: int) -> None:
        """
        Append RAM records to C{out}: every urgent page, then background
        pages until C{budget} bytes are used.

        @param scheduler: the L{twisted_postcopy.source.sender.PageScheduler}.
        @param out: the buffers being gathered.
        @param budget: bytes of background pages allowed.
        @param batch: the most bytes of one background run.
        """
        while True:
            page = scheduler.nextUrgent()
            if page is not None:
                size = scheduler.blocks[scheduler.position[0]].pageSize
                budget -= self.write(page.block, page.offset, 1, size, out)
                continue
            if budget <= 0:
                break
            run = scheduler.nextBackgroundRun(max(1, int(min(budget, batch) // PAGE_COST)))
            if run is None:
                break
            budget -= self.write(*run, out)
