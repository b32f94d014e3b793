# -*- test-case-name: tests.test_ram_faults -*-
"""
The daemon's own placement userfaultfd.

Each destination RAMBlock's daemon mapping is registered (MISSING) on one
userfaultfd that only this module uses; pages are placed there with
C{UFFDIO_COPY} / C{UFFDIO_ZEROPAGE}, one ioctl per contiguous run.  The
block is a memfd, so a placed page is in the page cache for every process
mapping it.  The descriptor stays open until L{Placer.close}: closing the
last reference to a userfaultfd turns its missing pages into zero pages.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted_postcopy.errors import RAMBlockError, RemoteProtocolError, UffdError
from twisted_postcopy.ram import uffd
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.support import unavailableError

#: How often a placement is retried after draining events (C{EAGAIN}).
PLACE_RETRIES = 8
#: Runs reported by one C{tp_write_records} call.
_WRITE_RUNS = 64
_PAGE_FLAG = 0x08
_FLAGS_MASK = 0xFFF
_TARGET_PAGE = 4096


class Placer:
    """
    Places pages into registered RAMBlocks.

    @ivar uffd: the placement userfaultfd (-1 once closed).
    @ivar blocks: idstr -> registered RAMBlock.
    """

    def __init__(self) -> None:
        """
        Open the placement userfaultfd.

        @raise UffdUnavailableError: userfaultfd could not be opened (the
            message names the fix).
        """
        try:
            self.uffd = uffd.openWithFeatures(0)
        except UffdError as error:
            raise unavailableError(error) from None
        self.blocks: dict[str, Any] = {}
        self._drainBuffer = uffd.MessageBuffer(16)
        self._placed = ffi.new("uint64_t[2]")

    def register(self, block: Any) -> None:
        """
        Register the daemon's mapping of C{block} (MISSING) and mark the
        block C{registered} (no more C{pwrite}).

        @param block: a L{twisted_postcopy.ram.block.RAMBlock}.
        @raise RAMBlockError: a block of that idstr is already registered.
        @raise UffdError: the registration failed.
        """
        if block.idstr in self.blocks:
            raise RAMBlockError(f"RAMBlock {block.idstr} is already registered with the fault service")
        uffd.register(self.uffd, block.address, block.length)
        block.registered = True
        self.blocks[block.idstr] = block

    def find(self, idstr: str, offset: int) -> Any:
        """
        @param idstr: a block name.
        @param offset: any byte offset in it.
        @return: the registered RAMBlock.
        @raise RAMBlockError: unknown block, or the offset is outside it.
        """
        block = self.blocks.get(idstr)
        if block is None:
            raise RAMBlockError(f"RAMBlock {idstr!r} is not registered with the fault service")
        if not 0 <= offset < block.length:
            raise RAMBlockError(f"RAMBlock {idstr}: offset {offset:#x} outside its {block.length:#x} bytes")
        return block

    def block(self, idstr: str, offset: int, length: int) -> Any:
        """
        @param idstr: a block name.
        @param offset: page-aligned byte offset.
        @param length: whole pages.
        @return: the registered RAMBlock.
        @raise RAMBlockError: unknown block, misaligned or outside it.
        """
        block = self.find(idstr, max(offset, 0))
        block.checkRange(offset, length)
        return block

    def place(self, ram: Any, offset: int, data: memoryview | None, length: int) -> tuple[int, UffdError | None]:
        """
        Place a run, draining events and retrying on C{EAGAIN} (one
        C{tp_uffd_place} call, from C{data} itself: no copy, no slice).

        @param ram: the RAMBlock.
        @param offset: byte offset.
        @param data: the bytes, or L{None} for zero pages.
        @param length: the run's length.
        @return: (bytes placed from C{offset}, the error that stopped the
            rest or L{None}).
        """
        if data is None:
            result, done = self._placeFrom(ram, offset, 0, length)
        else:
            # Released on the way out even if draining raises (a from_buffer
            # object left in a traceback's cycle upsets the collector).
            with ffi.from_buffer(data) as keep:
                result, done = self._placeFrom(ram, offset, int(ffi.cast("uintptr_t", keep)), length)
        if result >= 0:
            return done, None
        operation = "UFFDIO_ZEROPAGE" if data is None else "UFFDIO_COPY"
        where = f"{ram.idstr}:{offset + done:#x}"
        return done, UffdError(-result, f"{operation} of {where}: {os.strerror(-result)}")

    def _placeFrom(self, ram: Any, offset: int, source: int, length: int) -> tuple[int, int]:
        """
        The placement loop of L{place}.

        @param ram: the RAMBlock.
        @param offset: byte offset.
        @param source: the address of the bytes, or 0 for zero pages.
        @param length: the run's length.
        @return: (0 or C{-errno} where it stopped, bytes placed).
        """
        done, retries = 0, 0
        placed = self._placed
        while True:
            result = lib.tp_uffd_place(self.uffd, ram.address + offset + done, source and source + done,
                                       length - done, ram.pageSize, 0, placed, placed + 1)
            done += placed[0]
            if result != -errno.EAGAIN or retries >= PLACE_RETRIES:
                return result, done
            retries += 1
            self._drain()

    def drain(self) -> None:
        """
        Read (and drop) whatever is queued on the placement userfaultfd
        (before retrying a placement refused with C{EAGAIN}).
        """
        self._drain()

    def _drain(self) -> None:
        """
        Read (and drop) whatever is queued on the placement userfaultfd, so
        a placement refused with C{EAGAIN} can proceed.
        """
        while self._drainBuffer.read(self.uffd) is not None:
            pass

    def close(self) -> None:
        """
        Close the placement userfaultfd (idempotent).
        """
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1


def writeRecords(block: Any, records: Any) -> None:
    """
    Precopy on the destination: write a run of decoded RAM records
    (a L{twisted_postcopy.wire.events.RAMRecordsReceived}) into a block of
    4 KiB pages straight from the receive buffer, with no copy and no
    Python work per page: C{tp_write_records} writes each run of PAGE
    records with consecutive offsets with one C{pwritev} of the pages in
    place; the received bits are set once per run, and a run of ZERO
    records is one L{RAMBlock.writeZero} (a hole).  A ZERO record with a
    non-zero fill byte is written as a page of that byte.

    @param block: the L{twisted_postcopy.ram.block.RAMBlock} (4 KiB
        pages, a memfd, not registered with userfaultfd).
    @param records: the records.
    @raise RemoteProtocolError: a record past the block's end.
    @raise RAMBlockError: the block cannot be written (registered).
    @raise OSError: the kernel refused a write.
    @raise ValueError: records whose pages lie outside their data (not
        made by the decoder).
    """
    if block.registered:
        raise RAMBlockError(f"RAMBlock {block.idstr}: write after userfaultfd registration; "
                            "place pages through the fault service")
    # The buffers are released before anything is raised: a from_buffer
    # object caught in a traceback's reference cycle with its memoryview
    # would be torn down by the garbage collector in the wrong order.
    with ffi.from_buffer(records.data) as data, ffi.from_buffer("uint64_t[]", records.words) as words, \
            ffi.from_buffer("uint32_t[]", records.payloads) as payloads:
        error = _writeRecords(block, records, data, words, payloads)
    if error is not None:
        raise error


def _writeRecords(block: Any, records: Any, data: Any, words: Any, payloads: Any) -> Exception | None:
    """
    The loop of L{writeRecords}.

    @param block: the RAMBlock.
    @param records: the records.
    @param data: C{records.data} as a C pointer.
    @param words: C{records.words} as a C pointer.
    @param payloads: C{records.payloads} as a C pointer.
    @return: the error to raise, or L{None}.
    """
    runs = ffi.new("uint64_t[]", 2 * _WRITE_RUNS)
    out = ffi.new("uint64_t[3]")
    received, holes = block.receivedMap, block.holeMap
    index, count = 0, len(records.words)
    if len(records.payloads) != count:
        return ValueError(f"{count} RAM record words but {len(records.payloads)} payload offsets")
    while index < count:
        result = lib.tp_write_records(block.fd, data, len(records.data), words, payloads, index, count,
                                      block.length, runs, _WRITE_RUNS, out, out + 1, out + 2)
        for run in range(out[0]):
            first, pages = runs[2 * run] // _TARGET_PAGE, runs[2 * run + 1] // _TARGET_PAGE
            received.set(first, pages)
            holes.clear(first, pages)
        index = out[1]
        if result == -errno.EINVAL:
            return ValueError("RAM records whose pages lie outside their data")
        if result == -errno.ERANGE:
            offset = records.words[index] & ~_FLAGS_MASK
            return RemoteProtocolError(f"Illegal RAM offset {offset:x} in block {block.idstr}")
        if result < 0:
            return OSError(-result, f"pwritev into RAMBlock {block.idstr}: {os.strerror(-result)}")
        if index < count and not records.words[index] & _PAGE_FLAG:
            offset = records.words[index] & ~_FLAGS_MASK
            zeros = out[2]
            if offset + max(zeros, 1) * _TARGET_PAGE > block.length:
                return RemoteProtocolError(f"Illegal RAM offset {offset:x} in block {block.idstr}")
            if zeros:
                block.writeZero(offset, zeros * _TARGET_PAGE)
                index += zeros
            else:
                block.write(offset, bytes((records.data[records.payloads[index]],)) * _TARGET_PAGE)
                index += 1
    return None
