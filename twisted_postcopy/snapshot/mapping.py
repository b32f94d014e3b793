# -*- test-case-name: tests.test_snapshot_mapping -*-
"""
Read-only mappings of stored RAMBlock files for the restore source.

A block file is sparse: its holes are zero pages.  Reading a hole through a
shared file mapping costs a page-cache allocation per page (about 3 s per
GiB here), so after mapping the file the holes (found with C{SEEK_DATA} /
C{SEEK_HOLE}) are replaced by private anonymous mappings, which read as the
kernel's shared zero page.  The whole mapping is 2 MiB aligned and the
hole mappings are C{MADV_HUGEPAGE}, so that where transparent huge pages
are on (C{always} or C{madvise}) a hole reads as the huge zero page: one
fault per 2 MiB instead of 512 (faulting in 1 GiB of holes took 185-245 ms
with 4 KiB zero pages here, 1-10 ms with the huge one).  The mapping is
read-only; nothing writes it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from contextlib import nullcontext
from typing import BinaryIO

from twisted_postcopy.snapshot.sparse import dataRuns

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_HUGEPAGE = 14
_MAP_NORESERVE = 0x4000
#: The huge page size the mapping is aligned to.
_HUGE = 2 << 20


def _mmap(address: int | None, length: int, flags: int, fd: int) -> int:
    """
    @param address: where (with C{MAP_FIXED}) or L{None}.
    @param length: bytes.
    @param flags: C{MAP_*}.
    @param fd: the file, or -1.
    @return: the mapping's address.
    @raise OSError: mmap failed.
    """
    result = _libc.mmap(address, length, mmap.PROT_READ, flags, fd, 0)
    if result == _MAP_FAILED or result is None:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap: {os.strerror(error)}")
    return result


def _alignedRange(length: int) -> int:
    """
    Reserve C{length} bytes of address space at a 2 MiB boundary (a PROT_NONE
    anonymous mapping the caller maps over with C{MAP_FIXED}).

    @param length: bytes.
    @return: the address.
    @raise OSError: mmap failed.
    """
    base = _libc.mmap(None, length + _HUGE, 0,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base == _MAP_FAILED or base is None:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap: {os.strerror(error)}")
    address = (base + _HUGE - 1) & ~(_HUGE - 1)
    if address > base:
        _libc.munmap(base, address - base)
    if base + _HUGE > address:
        _libc.munmap(address + length, base + _HUGE - address)
    return address


class BlockMapping:
    """
    A block file mapped read-only, its holes backed by the zero page.

    @ivar length: bytes mapped.
    @ivar address: the mapping's address (0 once closed).
    @ivar dataBytes: bytes backed by the file (the rest reads as zeros).
    @ivar holes: the file's holes, as (offset, length) runs in bytes.
    """

    def __init__(self, path: str, length: int, opened: BinaryIO | None = None) -> None:
        """
        @param path: the block file.
        @param length: its length (a multiple of the page size).
        @param opened: the file, already opened (then C{path} is only
            its name; the caller closes it).
        @raise OSError: the file cannot be opened or mapped.
        """
        self.length, self.dataBytes = length, 0
        self.holes: list[tuple[int, int]] = []
        with (nullcontext(opened) if opened is not None else open(path, "rb")) as f:
            self.address = _mmap(_alignedRange(length), length, mmap.MAP_SHARED | _MAP_FIXED, f.fileno())
            position = 0
            for start, size in dataRuns(f.fileno(), length):
                self._zero(position, start - position)
                self.dataBytes += size
                position = start + size
            self._zero(position, length - position)

    def _zero(self, offset: int, size: int) -> None:
        """
        Replace a hole of the file mapping by anonymous zero pages.

        @param offset: byte offset in the block.
        @param size: bytes (0 for nothing).
        """
        if size > 0:
            self.holes.append((offset, size))
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
            _mmap(self.address + offset, size, flags, -1)
            _libc.madvise(self.address + offset, size, _MADV_HUGEPAGE)

    def view(self) -> memoryview:
        """
        @return: a read-only byte view of the whole block (valid until
            L{close}).
        @raise ValueError: the mapping is closed.
        """
        if not self.address:
            raise ValueError("the block mapping is closed")
        array = (ctypes.c_ubyte * self.length).from_address(self.address)
        return memoryview(array).cast("B").toreadonly()

    def close(self) -> None:
        """
        Unmap (idempotent).  No view may be used afterwards.
        """
        if self.address:
            _libc.munmap(self.address, self.length)
            self.address = 0
