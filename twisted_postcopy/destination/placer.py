# -*- test-case-name: tests.test_destination_incoming -*-
"""
Putting received pages into the destination's RAMBlocks.

Consecutive pages of one block are gathered into one run, written or
placed with one call when the run is broken or L{PagePlacer.flush} is
called (the protocol does so after each chunk of received data).

Before LISTEN (precopy) a run is written with the block's C{write}
(C{pwrite} on its memfd, marking the pages received) and a ZERO page goes
to the block's C{writeZero} (a hole, marked received and a hole), so the
daemon never reads guest RAM.  From LISTEN on, runs go to the fault
service (L{twisted_postcopy.interfaces.IFaultService}: C{UFFDIO_COPY} /
C{UFFDIO_ZEROPAGE}), which owns the page state from then on: the placer
keeps none.

Huge pages (a block whose host page is larger than the 4 KiB target page
of a record, e.g. 2 MiB hugetlbfs): before LISTEN records are written
where they belong, each on its own.  From LISTEN on a host page can only
be placed whole and atomically, so, as QEMU's C{ram_load_postcopy} does
with its temporary page, the target-page records of one host page are
assembled in a L{TempHostPage} per channel (the main stream is channel 0,
the preempt channel 1) and the host page is placed with one
C{UFFDIO_COPY} once its last record arrived (C{placeZero} when every
record was a ZERO).  The source sends a host page's records together on
one channel: a record of another host page while one is incomplete is
refused (QEMU's "Non-same host page detected"), as is a target page sent
twice; an incomplete host page is held across reads, dropped at a pause
(QEMU's C{postcopy_pause_incoming}: the source resends it whole after
recovery), and refused at the end of the stream.
"""

from __future__ import annotations

from typing import Any, Mapping

from attrs import define, field

from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.placement import writeRecords
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE

#: Largest run gathered before it is placed, in bytes.
MAX_RUN = 1 << 20

#: One target page of zeros.
_ZERO_PAGE = bytes(TARGET_PAGE_SIZE)


@define
class TempHostPage:
    """
    QEMU's C{PostcopyTmpPage}: one host page being assembled from its
    target-page records on one channel.

    @ivar block: the block idstr.
    @ivar offset: the host page's byte offset.
    @ivar data: its bytes so far (zeros where nothing arrived).
    @ivar present: one byte per target page, 1 once it arrived.
    @ivar count: target pages arrived.
    @ivar allZero: whether every record so far was a ZERO of fill 0.
    """

    block: str
    offset: int
    data: bytearray
    present: bytearray
    count: int = 0
    allZero: bool = True

    def describe(self) -> str:
        """
        @return: the page and how far it is, for errors.
        """
        return f"{self.block}:{self.offset:#x} ({self.count} of {len(self.present)} target pages)"


@define
class PagePlacer:
    """
    Writes precopy pages, hands postcopy pages to the fault service.

    @ivar blocks: idstr -> RAMBlock of the incoming VM (C{length},
        C{pageSize}, C{write(offset, data)}, C{writeZero(offset, length)},
        C{discard(offset, length)}).
    @ivar faults: the L{twisted_postcopy.interfaces.IFaultService} once
        postcopy listens, else L{None}.
    @ivar run: the pending run's bytes.
    @ivar runBlock: the pending run's block idstr.
    @ivar runOffset: the pending run's start offset.
    @ivar temp: channel -> the L{TempHostPage} being assembled there.
    """

    blocks: Mapping[str, Any]
    faults: Any = None
    run: bytearray = field(factory=bytearray)
    runBlock: str | None = None
    runOffset: int = 0
    temp: dict[int, TempHostPage] = field(factory=dict)

    def _block(self, idstr: str, offset: int, length: int) -> Any:
        """
        @param idstr: a block name from the stream.
        @param offset: byte offset of a record.
        @param length: its byte length.
        @return: the RAMBlock.
        @raise RemoteProtocolError: unknown block or offset past its end.
        """
        block = self.blocks.get(idstr)
        if block is None:
            raise RemoteProtocolError(f"Can't find block {idstr}")
        if offset < 0 or offset + length > block.length or offset % TARGET_PAGE_SIZE:
            raise RemoteProtocolError(f"Illegal RAM offset {offset:x} in block {idstr}")
        return block

    def discard(self, idstr: str, start: int, length: int) -> None:
        """
        POSTCOPY_RAM_DISCARD: drop a range so it can be placed later.

        @param idstr: the block.
        @param start: byte offset.
        @param length: byte length.
        """
        block = self._block(idstr, start, length)
        if start % block.pageSize or length % block.pageSize or length <= 0:
            raise RemoteProtocolError(
                f"Unaligned discard {start:#x}+{length:#x} in block {idstr} "
                f"(its host page size is {block.pageSize:#x})")
        self.flush()
        block.discard(start, length)

    def page(self, idstr: str, offset: int, data: bytes | memoryview, channel: int = 0) -> None:
        """
        A PAGE record (the hot path: one call per received page).

        @param idstr: the block.
        @param offset: byte offset.
        @param data: the page bytes (may be a view into a receive buffer;
            they are copied or written before this returns).
        @param channel: 0 for the main stream, 1 for the preempt channel.
        @raise RemoteProtocolError: unknown block or bad offset, or a
            record that breaks the assembly of a huge page.
        """
        size = len(data)
        block = self.blocks.get(idstr)
        if block is None or offset % TARGET_PAGE_SIZE or offset + size > block.length or offset < 0:
            block = self._block(idstr, offset, size)
        if block.pageSize != TARGET_PAGE_SIZE and self.faults is not None:
            self._assemble(block, offset, data, channel, False)
            return
        run = self.run
        if self.runBlock != idstr or self.runOffset + len(run) != offset or len(run) >= MAX_RUN:
            self.flush()
            self.runBlock, self.runOffset = idstr, offset
            run = self.run
        run += data

    def zero(self, idstr: str, offset: int, fill: int, length: int = TARGET_PAGE_SIZE,
             channel: int = 0) -> None:
        """
        A ZERO record.

        @param idstr: the block.
        @param offset: byte offset.
        @param fill: the fill byte (QEMU sends 0; a nonzero fill is honoured).
        @param length: the record's size, the target page size.
        @param channel: 0 for the main stream, 1 for the preempt channel.
        """
        if fill:
            self.page(idstr, offset, bytes([fill]) * length, channel)
            return
        block = self._block(idstr, offset, length)
        if block.pageSize != TARGET_PAGE_SIZE:
            if self.faults is not None:
                self._assemble(block, offset, _ZERO_PAGE, channel, True)
            else:
                self.page(idstr, offset, _ZERO_PAGE[:length], channel)
            return
        self.flush()
        if self.faults is None:
            block.writeZero(offset, length)
        else:
            self.faults.placeZero(idstr, offset, length)

    def _assemble(self, block: Any, offset: int, data: bytes | memoryview, channel: int, zero: bool) -> None:
        """
        Add one target-page record to its channel's huge page; place the
        host page once it is whole.

        @param block: the RAMBlock (its page size above the target's).
        @param offset: the record's byte offset (target page aligned).
        @param data: the target page's bytes.
        @param channel: the channel it arrived on.
        @param zero: whether it was a ZERO record of fill 0.
        @raise RemoteProtocolError: a record of another host page while
            this channel's is incomplete, or a target page sent twice.
        """
        size = block.pageSize
        base = offset - offset % size
        temp = self.temp.get(channel)
        if temp is None:
            temp = self.temp[channel] = TempHostPage(block.idstr, base, bytearray(size),
                                                     bytearray(size // TARGET_PAGE_SIZE))
        elif temp.offset != base or temp.block != block.idstr:
            raise RemoteProtocolError(
                f"Non-same host page detected on channel {channel}: host page {temp.describe()} "
                f"is incomplete, received {block.idstr}:{offset:#x}")
        index = (offset - base) // TARGET_PAGE_SIZE
        if temp.present[index]:
            raise RemoteProtocolError(
                f"target page {block.idstr}:{offset:#x} sent twice within host page {temp.describe()}")
        temp.present[index] = 1
        temp.count += 1
        if not zero:
            temp.allZero = False
            start = index * TARGET_PAGE_SIZE
            temp.data[start:start + TARGET_PAGE_SIZE] = data
        if temp.count == len(temp.present):
            del self.temp[channel]
            if temp.allZero:
                self.faults.placeZero(temp.block, base, size)
            else:
                self.faults.placePages(temp.block, base, temp.data)

    def resetTempPages(self) -> None:
        """
        Drop the incomplete host pages (QEMU's C{postcopy_temp_page_reset}
        at a pause): none of their pages is received, so after recovery the
        source sends them again, whole.
        """
        self.temp.clear()

    def checkComplete(self) -> None:
        """
        @raise RemoteProtocolError: a host page is still incomplete (the
            stream ended in the middle of one).
        """
        if self.temp:
            pages = ", ".join(temp.describe() for temp in self.temp.values())
            raise RemoteProtocolError(f"stream ended inside huge page(s) {pages}")

    def flush(self) -> None:
        """
        Write or place the pending run, if any.
        """
        if self.run:
            if self.faults is None:
                self.blocks[self.runBlock].write(self.runOffset, self.run)
                self.run.clear()
            else:
                run, self.run = self.run, bytearray()
                self.faults.placePages(self.runBlock, self.runOffset, run)
        self.runBlock = None

    def records(self, idstr: str, records: Any) -> bool:
        """
        A run of CONTINUE records decoded in C (the main stream's hot path),
        into a block of 4 KiB pages straight from the receive buffer, with
        no copy and no call per page: before LISTEN written by
        L{writeRecords} (one C{pwritev} per run of consecutive pages, one
        hole per run of zero pages), from LISTEN on placed by the fault
        service's C{placeRecords} (one C{UFFDIO_COPY} per page).

        @param idstr: the block.
        @param records: a L{twisted_postcopy.wire.events.RAMRecordsReceived}.
        @return: whether they were taken; L{False} for any other block (or
            a fault service without C{placeRecords}): the caller then
            passes them record by record to L{page} and L{zero}.
        @raise RemoteProtocolError: a bad offset.
        """
        block = self.blocks.get(idstr)
        if not isinstance(block, RAMBlock) or block.pageSize != TARGET_PAGE_SIZE:
            return False
        if self.faults is None:
            self.flush()
            writeRecords(block, records)
            return True
        placeRecords = getattr(self.faults, "placeRecords", None)
        if placeRecords is None:
            return False
        self.flush()
        placeRecords(idstr, records)
        return True
