# -*- test-case-name: tests.test_destination_placer -*-
"""
Putting received pages into the destination's RAMBlocks.

Consecutive pages of one block are gathered into one run, written or
placed with one call when the run is broken or L{PagePlacer.flush} is
called (the protocol does so after each chunk of received data).  Before
LISTEN (precopy) a run is written with C{pwrite} on the block's memfd and
ZERO pages punch a hole, so the daemon never reads guest RAM.  Precopy runs
go through the block's C{write} (L{twisted_postcopy.ram.block.RAMBlock.write}),
which keeps its received bitmap; a hole stays unreceived there, so a fault
on it reaches the page source, which fills it with a zero page.  From LISTEN
on, runs go through the fault service (UFFDIO_COPY / UFFDIO_ZEROPAGE).
"""

from __future__ import annotations

import errno
from typing import Any, Mapping

from attrs import define, field

from twisted_postcopy.errors import RemoteProtocolError

#: Largest run gathered before it is placed, in bytes.
MAX_RUN = 1 << 20

#: C{received} value of a page that precopy received as ZERO (a hole in
#: the memfd: a MISSING fault there must be answered with a zero page).
HOLE = 2


@define
class PagePlacer:
    """
    Writes precopy pages, places postcopy pages.

    @ivar blocks: idstr -> RAMBlock of the incoming VM (C{length},
        C{pageSize}, C{write(offset, data)}, C{discard(offset, length)}).
    @ivar faults: the fault service once postcopy listens, else L{None}
        (C{placePages(block, offset, data)}, C{placeZero(block, offset,
        length)}).
    @ivar received: idstr -> bytearray, one byte per page, 1 once received,
        L{HOLE} if received as ZERO in precopy (so a page sent twice after
        LISTEN is caught before the kernel's EEXIST).
    @ivar run: the pending run's bytes.
    @ivar runBlock: the pending run's block idstr.
    @ivar runOffset: the pending run's start offset.
    @ivar pagesPlaced: pages placed or written.
    """

    blocks: Mapping[str, Any]
    faults: Any = None
    received: dict[str, bytearray] = field(init=False)
    run: bytearray = field(factory=bytearray)
    runBlock: str | None = None
    runOffset: int = 0
    pagesPlaced: int = 0

    def __attrs_post_init__(self) -> None:
        """
        Start with nothing received.
        """
        self.received = {
            name: bytearray(block.length // block.pageSize) for name, block in self.blocks.items()
        }

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

    def _markReceived(self, idstr: str, block: Any, offset: int, length: int) -> None:
        """
        Record pages as received; in postcopy a page may arrive only once.

        @param idstr: the block name.
        @param block: the RAMBlock.
        @param offset: byte offset.
        @param length: byte length.
        @raise RemoteProtocolError: a postcopy page arrived twice.
        """
        bits = self.received[idstr]
        first, last = offset // block.pageSize, (offset + length) // block.pageSize
        if self.faults is not None and any(bits[first:last]):
            raise RemoteProtocolError(f"page {idstr}:{offset:x} sent twice after LISTEN")
        bits[first:last] = b"\x01" * (last - first)
        self.pagesPlaced += last - first

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
        bits = self.received[idstr]
        first, last = start // block.pageSize, (start + length) // block.pageSize
        bits[first:last] = bytes(last - first)

    def page(self, idstr: str, offset: int, data: bytes | memoryview) -> None:
        """
        A PAGE record (the hot path: one call per received page).

        @param idstr: the block.
        @param offset: byte offset.
        @param data: the page bytes (may be a view into a receive buffer;
            they are copied or written before this returns).
        @raise RemoteProtocolError: unknown block, bad offset, or a page
            sent twice after LISTEN.
        """
        size = len(data)
        block = self.blocks.get(idstr)
        if block is None or offset % block.pageSize or offset + size > block.length:
            self._block(idstr, offset, size)
        bits = self.received[idstr]
        index = offset // block.pageSize
        if self.faults is not None and bits[index] == 1:
            raise RemoteProtocolError(f"page {idstr}:{offset:x} sent twice after LISTEN")
        bits[index] = 1
        self.pagesPlaced += 1
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
        self._markReceived(idstr, block, offset, length)
        self.flush()
        if self.faults is None:
            block.discard(offset, length)
            self.received[idstr][offset // block.pageSize] = HOLE
            return
        self.faults.placeZero(idstr, offset, length)

    def fillHole(self, idstr: str, offset: int) -> bool:
        """
        After LISTEN a guest faulted on a page: if precopy received it as a
        ZERO page (a hole), place a zero page now, as nothing will come.

        @param idstr: the block.
        @param offset: page-aligned byte offset.
        @return: whether the page was a hole (and is now placed).
        """
        block = self.blocks[idstr]
        page = offset // block.pageSize
        if self.received[idstr][page] != HOLE:
            return False
        self.received[idstr][page] = 1
        try:
            self.faults.placeZero(idstr, offset, block.pageSize)
        except OSError as error:
            if error.errno != errno.EEXIST:
                raise
        return True

    def fillAllHoles(self) -> None:
        """
        Before the fault service stops, place zero pages over every hole
        left from precopy (one call per run), so guests that registered
        their own mappings never fault after completion.
        """
        for idstr, bits in self.received.items():
            size, index = self.blocks[idstr].pageSize, 0
            while (start := bits.find(HOLE, index)) >= 0:
                end = start
                while end < len(bits) and bits[end] == HOLE:
                    end += 1
                bits[start:end] = b"\x01" * (end - start)
                self.faults.placeZero(idstr, start * size, (end - start) * size)
                index = end

    def flush(self) -> None:
        """
        Place the pending run, if any.
        """
        if self.run:
            if self.faults is None:
                self.blocks[self.runBlock].write(self.runOffset, self.run)
                self.run.clear()
            else:
                data, self.run = bytes(self.run), bytearray()
                self.faults.placePages(self.runBlock, self.runOffset, data)
        self.runBlock = None

    def missingPages(self) -> int:
        """
        @return: how many pages have not been received.
        """
        return sum(bits.count(0) for bits in self.received.values())
