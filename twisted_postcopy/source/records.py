# -*- test-case-name: tests.test_source_outgoing -*-
"""
RAM records from guest memory: the source's hot loop.

L{RecordWriter} turns runs of pages into QEMU 7.2 RAM records
(migration-stream.md 3.1-3.2): a PAGE record with the page as a memoryview
of the block (gathered, not copied, until the step joins its buffers), or
a ZERO record when the page is all zero; the block name only when the
block differs from the previous record's (CONTINUE otherwise).
"""

from __future__ import annotations

import struct
from typing import Any

from attrs import define

from twisted_postcopy.wire.constants import RAMFlag
from twisted_postcopy.wire.strings import encodeStr8

#: The target page: one RAM record each.
TARGET_PAGE = 4096
#: Batch cost of a page whose content is unknown in advance.
PAGE_COST = 4096
#: What a record costs at least against a step's batch, so a step of ZERO
#: records stays short and page requests are read between steps.
MIN_RECORD_COST = 128
#: A zero page; a page is compared with it only when its first byte is 0,
#: and as bytes (a memoryview comparison is element by element).
_ZERO = bytes(TARGET_PAGE)
_WORD = struct.Struct(">Q")
_ZERO_CONTINUE = int(RAMFlag.ZERO | RAMFlag.CONTINUE)
_PAGE_CONTINUE = int(RAMFlag.PAGE | RAMFlag.CONTINUE)
_ZERO_FLAG, _PAGE_FLAG = int(RAMFlag.ZERO), int(RAMFlag.PAGE)


@define
class RecordWriter:
    """
    Encodes RAM records of one outgoing stream.

    @ivar views: idstr -> memoryview of the block's RAM (the source reads
        its own guest RAM; nothing here runs on a destination).
    @ivar stats: counts C{normal} and C{duplicate} pages.
    @ivar lastBlock: the block of the previous record (QEMU's
        C{last_sent_block}); L{None} makes the next record name its block.
    """

    views: dict[str, memoryview]
    stats: Any
    lastBlock: str | None = None

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
        view = self.views[idstr]
        append = out.append
        pack = _WORD.pack
        end = offset + count * size
        pages = (end - offset) // TARGET_PAGE
        normal = 0
        if idstr != self.lastBlock:
            self.lastBlock = idstr
            data = view[offset : offset + TARGET_PAGE]
            if not data[0] and data.tobytes() == _ZERO:
                append(pack(offset | _ZERO_FLAG) + encodeStr8(idstr) + b"\x00")
            else:
                append(pack(offset | _PAGE_FLAG) + encodeStr8(idstr))
                append(data)
                normal += 1
            offset += TARGET_PAGE
        for offset in range(offset, end, TARGET_PAGE):
            data = view[offset : offset + TARGET_PAGE]
            if not data[0] and data.tobytes() == _ZERO:
                append(pack(offset | _ZERO_CONTINUE) + b"\x00")
            else:
                append(pack(offset | _PAGE_CONTINUE))
                append(data)
                normal += 1
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
                self.stats.urgent += 1
                continue
            if budget <= 0:
                break
            run = scheduler.nextBackgroundRun(max(1, int(min(budget, batch) // PAGE_COST)))
            if run is None:
                break
            budget -= self.write(*run, out)
