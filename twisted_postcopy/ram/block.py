# -*- test-case-name: tests.test_ram_block -*-
"""
RAMBlock: one region of guest RAM, named by QEMU's idstr.

A block owns a memfd (C{backing="memfd"}, or C{"hugetlbfs"} for an
C{MFD_HUGETLB} memfd of 2 MiB pages) and the daemon's own C{MAP_SHARED}
mapping of it; guest processes map the same memfd (received over
SCM_RIGHTS), so a page placed through any mapping exists for all of them.
C{backing="anon"} is a private anonymous mapping with no fd (daemon-local
memory that no other process can attach).

Rules (see C{docs/userfaultfd.md}):

  - On the destination the daemon never reads or writes the mapping
    (L{RAMBlock.view} is for the source only; the one exception is a
    precopy write on hugetlbfs, which has no C{pwrite}, before any
    registration): touching a hole would
    create a zero page (a later C{UFFDIO_COPY} then gets C{EEXIST}), or,
    once registered, fault on the reactor thread and deadlock it.
  - Precopy pages go in with L{RAMBlock.write} (C{pwrite}) before any
    userfaultfd registration; after it, only the fault service places
    pages.
  - L{RAMBlock.discard} punches a hole in the memfd (C{MADV_DONTNEED} does
    not re-arm faults on shmem); the first discard marks the mapping
    C{MADV_NOHUGEPAGE}, as QEMU does in its Discard state.
"""

from __future__ import annotations

import os

from attrs import define, field

from twisted_postcopy.errors import RAMBlockError
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.bitmap import PageBitmap
from twisted_postcopy.ram.uffd import check

#: The backings a RAMBlock can have.
BACKINGS = ("memfd", "anon", "hugetlbfs")

#: The huge page size used for C{backing="hugetlbfs"}.
HUGE_PAGE_SIZE = 2 << 20


@define(eq=False)
class RAMBlock:
    """
    One RAMBlock: a memfd and the daemon's shared mapping of it.

    @ivar idstr: QEMU's block name (e.g. C{"pc.ram"}).
    @ivar length: the used length in bytes (a multiple of C{pageSize}).
    @ivar pageSize: the host page size: 4096, or 2 MiB for hugetlbfs.
    @ivar backing: C{"memfd"}, C{"anon"} or C{"hugetlbfs"}.
    @ivar fd: the memfd, or -1 for C{"anon"}.
    @ivar address: the daemon mapping's start address.
    @ivar receivedMap: QEMU's C{receivedmap}: pages written, placed, or
        received as ZERO before LISTEN.
    @ivar holeMap: pages received as ZERO before LISTEN and still holes in
        the memfd (a MISSING fault there needs a zero page).
    @ivar registered: set by the fault service once a userfaultfd
        registration covers the block; L{write} is refused from then on.
    """

    idstr: str
    length: int
    pageSize: int = 4096
    backing: str = "memfd"
    fd: int = field(init=False, default=-1)
    address: int = field(init=False, default=0)
    receivedMap: PageBitmap = field(init=False)
    holeMap: PageBitmap = field(init=False)
    registered: bool = field(init=False, default=False)
    _discarded: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        """
        Create the memfd and map it.

        @raise RAMBlockError: bad backing, page size or length.
        @raise OSError: the kernel refused (e.g. C{ENOMEM} for hugetlbfs
            without reserved huge pages).
        """
        self._validate()
        self.receivedMap = PageBitmap(self.length // self.pageSize)
        self.holeMap = PageBitmap(self.length // self.pageSize)
        flags = lib.MAP_SHARED
        if self.backing == "anon":
            flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS
        else:
            memfdFlags = lib.MFD_CLOEXEC | (lib.MFD_HUGETLB if self.backing == "hugetlbfs" else 0)
            self.fd = os.memfd_create(self.idstr[:200] or "ram", memfdFlags)
            try:
                os.ftruncate(self.fd, self.length)
            except OSError:
                os.close(self.fd)
                raise
        result = lib.tp_mmap(self.fd, self.length, flags)
        if result < 0:
            if self.fd >= 0:
                os.close(self.fd)
            message = f"mmap of RAMBlock {self.idstr}: {os.strerror(-result)}"
            if self.backing == "hugetlbfs":
                message += (f" ({self.length // HUGE_PAGE_SIZE} free 2 MiB huge page(s) needed: reserve them "
                            "through /proc/sys/vm/nr_hugepages)")
            raise OSError(-result, message)
        self.address = result

    def _validate(self) -> None:
        """
        @raise RAMBlockError: the arguments cannot describe a block.
        """
        if self.backing not in BACKINGS:
            raise RAMBlockError(f"RAMBlock {self.idstr}: unknown backing {self.backing!r}, expected one of {BACKINGS}")
        expected = HUGE_PAGE_SIZE if self.backing == "hugetlbfs" else 4096
        if self.pageSize != expected:
            raise RAMBlockError(f"RAMBlock {self.idstr}: page size {self.pageSize} for {self.backing} "
                                f"(must be {expected})")
        if self.length <= 0 or self.length % self.pageSize:
            raise RAMBlockError(f"RAMBlock {self.idstr}: length {self.length} is not a positive multiple "
                                f"of the page size {self.pageSize}")

    @property
    def pages(self) -> int:
        """
        @return: the number of host pages.
        """
        return self.length // self.pageSize

    def checkRange(self, offset: int, length: int) -> None:
        """
        @param offset: byte offset in the block.
        @param length: byte length.
        @raise RAMBlockError: not page aligned, empty or past the end.
        """
        if offset < 0 or length <= 0 or offset + length > self.length:
            raise RAMBlockError(f"RAMBlock {self.idstr}: range {offset:#x}+{length:#x} outside "
                                f"its {self.length:#x} bytes")
        if offset % self.pageSize or length % self.pageSize:
            raise RAMBlockError(f"RAMBlock {self.idstr}: range {offset:#x}+{length:#x} is not aligned "
                                f"to its page size {self.pageSize:#x}")

    def receivedBitmap(self, targetPageSize: int = 4096) -> bytes:
        """
        QEMU's received bitmap of this block for C{MIG_RP_MSG_RECV_BITMAP}:
        one bit per I{target} page, little-endian u64 words (the framing,
        size and end mark, is the return path codec's).

        @param targetPageSize: the target page size (4096 on x86).
        @return: the bitmap bytes.
        """
        factor = self.pageSize // targetPageSize
        return (self.receivedMap if factor == 1 else self.receivedMap.scaled(factor)).toBytes()

    def view(self) -> memoryview:
        """
        A memoryview of the daemon's mapping, B{for source-side reads only}
        (the destination must never touch its mapping).

        @return: a writable view of C{length} bytes.
        """
        return memoryview(ffi.buffer(ffi.cast("char *", self.address), self.length))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """
        Write pages with C{pwrite} (precopy on the destination); marks them
        received.  On hugetlbfs, which has no C{write}, the bytes are
        copied into the daemon's mapping instead (safe: nothing is
        registered yet), and any run of target pages is accepted (a QEMU
        source resends only the dirty target pages of a huge page in
        precopy); the host pages it touches are marked received.

        @param offset: page-aligned byte offset (target page aligned on
            hugetlbfs).
        @param data: whole pages (target pages on hugetlbfs).
        @raise RAMBlockError: bad range, an anonymous block, or the block is
            already registered with userfaultfd (the write would silently
            fill pages that faulting guests are waiting for).
        """
        length = len(data)
        if self.backing == "hugetlbfs":
            if offset < 0 or length <= 0 or offset + length > self.length or (offset | length) % 4096:
                raise RAMBlockError(f"RAMBlock {self.idstr}: range {offset:#x}+{length:#x} is not whole "
                                    f"target pages inside its {self.length:#x} bytes")
        else:
            self.checkRange(offset, length)
        if self.registered:
            raise RAMBlockError(f"RAMBlock {self.idstr}: write after userfaultfd registration; "
                                "place pages through the fault service")
        if self.fd < 0:
            raise RAMBlockError(f"RAMBlock {self.idstr}: anonymous blocks have no fd to pwrite")
        if self.backing == "hugetlbfs":
            ffi.memmove(ffi.cast("char *", self.address + offset), ffi.from_buffer(data), length)
        else:
            view = memoryview(data)
            at = offset
            while view:
                written = os.pwrite(self.fd, view, at)
                view, at = view[written:], at + written
        start = offset // self.pageSize
        count = -(-(offset + length) // self.pageSize) - start
        self.receivedMap.set(start, count)
        self.holeMap.clear(start, count)

    def writeZero(self, offset: int, length: int) -> None:
        """
        Zero pages received before LISTEN (QEMU's ZERO record): punch a
        hole (so they read as zeros without using memory) and mark them
        received and in L{holeMap}.

        @param offset: page-aligned byte offset.
        @param length: whole pages.
        @raise RAMBlockError: bad range, or the block is already registered
            with userfaultfd.
        @raise OSError: the kernel refused the hole punch.
        """
        if self.registered:
            raise RAMBlockError(f"RAMBlock {self.idstr}: zero page written after userfaultfd registration; "
                                "place pages through the fault service")
        self.discard(offset, length)
        self.receivedMap.set(offset // self.pageSize, length // self.pageSize)
        self.holeMap.set(offset // self.pageSize, length // self.pageSize)

    def discard(self, offset: int, length: int) -> None:
        """
        Drop a range so it is missing again (QEMU's C{ram_discard_range}):
        a hole punch on a memfd, C{MADV_DONTNEED} on anonymous memory.
        Clears the received and hole bits.

        @param offset: page-aligned byte offset.
        @param length: whole pages.
        @raise RAMBlockError: bad range.
        @raise OSError: the kernel refused.
        """
        self.checkRange(offset, length)
        if not self._discarded and self.backing != "hugetlbfs":
            check(lib.tp_madvise(self.address, self.length, lib.MADV_NOHUGEPAGE), "madvise(MADV_NOHUGEPAGE)")
        self._discarded = True
        if self.fd >= 0:
            check(lib.tp_punch_hole(self.fd, offset, length), "fallocate(PUNCH_HOLE)")
        else:
            check(lib.tp_madvise(self.address + offset, length, lib.MADV_DONTNEED), "madvise(MADV_DONTNEED)")
        self.receivedMap.clear(offset // self.pageSize, length // self.pageSize)
        self.holeMap.clear(offset // self.pageSize, length // self.pageSize)

    def close(self) -> None:
        """
        Unmap the daemon mapping and close the memfd (idempotent).
        """
        if self.address:
            lib.tp_munmap(self.address, self.length)
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
