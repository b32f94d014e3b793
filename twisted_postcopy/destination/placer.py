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
    """

    blocks: Mapping[str, Any]
    faults: Any = None
    run: bytearray = field(factory=bytearray)
    runBlock: str | None = None
    runOffset: int = 0

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
        if offset < 0 or offset + length > block.length or offset % block.pageSize:
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
        self.flush()
        block.discard(start, length)

    def page(self, idstr: str, offset: int, data: bytes | memoryview) -> None:
        """
        A PAGE record (the hot path: one call per received page).

        @param idstr: the block.
        @param offset: byte offset.
        @param data: the page bytes (may be a view into a receive buffer;
            they are copied or written before this returns).
        @raise RemoteProtocolError: unknown block or bad offset.
        """
        size = len(data)
        block = self.blocks.get(idstr)
        if block is None or offset % block.pageSize or offset + size > block.length or offset < 0:
            self._block(idstr, offset, size)
        run = self.run
        if self.runBlock != idstr or self.runOffset + len(run) != offset or len(run) >= MAX_RUN:
            self.flush()
            self.runBlock, self.runOffset = idstr, offset
            run = self.run
        run += data

    def zero(self, idstr: str, offset: int, fill: int, length: int) -> None:
        """
        A ZERO record.

        @param idstr: the block.
        @param offset: byte offset.
        @param fill: the fill byte (QEMU sends 0; a nonzero fill is honoured).
        @param length: the page size.
        """
        if fill:
            self.page(idstr, offset, bytes([fill]) * length)
            return
        block = self._block(idstr, offset, length)
        self.flush()
        if self.faults is None:
            block.writeZero(offset, length)
        else:
            self.faults.placeZero(idstr, offset, length)

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
