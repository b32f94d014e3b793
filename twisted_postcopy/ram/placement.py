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

from twisted_postcopy.errors import RAMBlockError, UffdError
from twisted_postcopy.ram import uffd
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.support import unavailableError

#: How often a placement is retried after draining events (C{EAGAIN}).
PLACE_RETRIES = 8


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
        done, retries = 0, 0
        keep = None if data is None else ffi.from_buffer(data)
        source = 0 if keep is None else int(ffi.cast("uintptr_t", keep))
        placed = self._placed
        while True:
            result = lib.tp_uffd_place(self.uffd, ram.address + offset + done, source and source + done,
                                       length - done, ram.pageSize, 0, placed, placed + 1)
            done += placed[0]
            if result != -errno.EAGAIN or retries >= PLACE_RETRIES:
                break
            retries += 1
            self._drain()
        if result >= 0:
            return done, None
        operation = "UFFDIO_ZEROPAGE" if data is None else "UFFDIO_COPY"
        where = f"{ram.idstr}:{offset + done:#x}"
        return done, UffdError(-result, f"{operation} of {where}: {os.strerror(-result)}")

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
