# -*- test-case-name: tests.test_ram_dirty -*-
"""
Dirty page tracking of guest processes with userfaultfd C{WP_ASYNC} and
C{PAGEMAP_SCAN} (Linux 6.7+).

Each guest process registers its mapping of a block (a shared memfd)
C{MODE_WP} on its own userfaultfd with C{WP_ASYNC|WP_UNPOPULATED} and
write-protects it (L{registerWriteTracking}); a write then simply drops
the protection of that page in that process, with no message.  The daemon
keeps the process's userfaultfd open (closing it ends tracking) and scans
C{/proc/PID/pagemap} with C{PAGEMAP_SCAN}: pages reported C{WRITTEN} are
dirty, and C{PM_SCAN_WP_MATCHING} protects them again in the same pass.
A page written by any attached process of a block counts dirty.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Iterable, Mapping

from attrs import define, field
from twisted.logger import Logger
from zope.interface import implementer

from twisted_postcopy.errors import DirtyTrackingUnavailableError, UffdError
from twisted_postcopy.interfaces import IDirtyTracker
from twisted_postcopy.ram import uffd
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.bitmap import PageBitmap
from twisted_postcopy.ram.clients import ClientMapping, validateMappings

_log = Logger()

#: The features write tracking needs.
TRACKING_FEATURES = uffd.UFFD_FEATURE_WP_ASYNC | uffd.UFFD_FEATURE_WP_UNPOPULATED

#: Regions returned per C{PAGEMAP_SCAN} call.
SCAN_REGIONS = 1024


def checkWriteTracking() -> int:
    """
    @return: the kernel's userfaultfd feature bits.
    @raise DirtyTrackingUnavailableError: no userfaultfd, or no C{WP_ASYNC}
        / C{WP_UNPOPULATED} / shmem write protection (Linux 6.7+ needed).
    """
    try:
        features = uffd.probeFeatures()
    except UffdError as error:
        raise DirtyTrackingUnavailableError(f"dirty tracking needs userfaultfd: {error}") from None
    needed = TRACKING_FEATURES | uffd.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    if features & needed != needed:
        raise DirtyTrackingUnavailableError(
            "dirty tracking needs userfaultfd WP_ASYNC, WP_UNPOPULATED and WP_HUGETLBFS_SHMEM "
            f"(Linux 6.7+ with CONFIG_PTE_MARKER_UFFD_WP); this kernel offers features {features:#x}"
        )
    return features


def registerWriteTracking(address: int, length: int, uffdFd: int | None = None) -> int:
    """
    Guest side: start write tracking of one's own mapping.

    @param address: the mapping's page-aligned start (in this process).
    @param length: its length.
    @param uffdFd: a tracking userfaultfd from an earlier call (to put
        several mappings on one), or L{None} for a new one.
    @return: the userfaultfd to hand to the daemon (e.g. over SCM_RIGHTS).
    @raise DirtyTrackingUnavailableError: the kernel cannot do it.
    @raise UffdError: registration failed.
    """
    fd = uffdFd
    if fd is None:
        checkWriteTracking()
        fd = uffd.openWithFeatures(TRACKING_FEATURES)
    try:
        uffd.register(fd, address, length, uffd.UFFDIO_REGISTER_MODE_WP)
        uffd.writeProtect(fd, address, length)
    except BaseException:
        if uffdFd is None:
            os.close(fd)
        raise
    return fd


def scanWritten(pagemapFd: int, start: int, end: int, reprotect: bool = True) -> list[tuple[int, int]]:
    """
    C{PAGEMAP_SCAN} a range for written pages.

    @param pagemapFd: an open C{/proc/PID/pagemap}.
    @param start: page-aligned start address in that process.
    @param end: end address.
    @param reprotect: protect the reported pages again (C{WP_MATCHING}).
    @return: (start, end) address ranges that were written.
    @raise DirtyTrackingUnavailableError: the kernel has no C{PAGEMAP_SCAN}.
    @raise UffdError: the scan failed (C{EPERM}: the range is not under
        async write protection).
    """
    flags = lib.PM_SCAN_CHECK_WPASYNC | (lib.PM_SCAN_WP_MATCHING if reprotect else 0)
    vector = ffi.new("struct tp_page_region[]", SCAN_REGIONS)
    walkEnd = ffi.new("uint64_t *")
    written: list[tuple[int, int]] = []
    while start < end:
        count = lib.tp_pagemap_scan(pagemapFd, start, end, flags, vector, SCAN_REGIONS,
                                    lib.PAGE_IS_WRITTEN, lib.PAGE_IS_WRITTEN, walkEnd)
        if count in (-errno.ENOTTY, -errno.EOPNOTSUPP):
            raise DirtyTrackingUnavailableError("PAGEMAP_SCAN is not supported by this kernel (Linux 6.7+)")
        uffd.check(count, "PAGEMAP_SCAN")
        written.extend((vector[i].start, vector[i].end) for i in range(count))
        if walkEnd[0] <= start:
            break
        start = walkEnd[0]
    return written


@define(eq=False)
class TrackedProcess:
    """
    One guest process under write tracking.

    @ivar pid: its process id.
    @ivar uffd: its tracking userfaultfd (kept open: closing ends tracking).
    @ivar pagemap: its open C{/proc/PID/pagemap}.
    @ivar mappings: its mapping table.
    """

    pid: int
    uffd: int
    pagemap: int
    mappings: list[ClientMapping] = field(factory=list)

    def close(self) -> None:
        """
        Close both descriptors.
        """
        os.close(self.pagemap)
        os.close(self.uffd)


@implementer(IDirtyTracker)
class DirtyTracker:
    """
    Dirty tracking of the guest processes mapping a set of RAMBlocks.

    @ivar blocks: idstr -> RAMBlock (C{length}, C{pageSize}).
    @ivar processes: the tracked processes.
    """

    def __init__(self, blocks: Mapping[str, Any] | Iterable[Any]) -> None:
        """
        @param blocks: the RAMBlocks (or idstr -> RAMBlock).
        @raise DirtyTrackingUnavailableError: the kernel cannot track.
        """
        checkWriteTracking()
        values = blocks.values() if isinstance(blocks, Mapping) else blocks
        self.blocks = {block.idstr: block for block in values}
        self.processes: list[TrackedProcess] = []

    def addProcess(self, uffdFd: int, mappings: Iterable[Any], pid: int) -> TrackedProcess:
        """
        Track a guest process that called L{registerWriteTracking} on each
        of its mappings (all on the one C{uffdFd}).

        @param uffdFd: its tracking userfaultfd; the tracker owns it now.
        @param mappings: its mapping table (as for the fault service).
        @param pid: its process id.
        @return: the tracked process.
        @raise MappingTableError: the table does not fit the blocks.
        """
        table = validateMappings(self.blocks, mappings)
        pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        process = TrackedProcess(pid, uffdFd, pagemap, table)
        self.processes.append(process)
        return process

    def _collect(self, reprotect: bool) -> dict[str, PageBitmap]:
        """
        Scan every process.  A process that is gone is dropped with a log,
        and every page it mapped counts dirty (what it wrote since the last
        scan cannot be known any more).

        @param reprotect: protect reported pages again.
        @return: idstr -> bitmap of written pages.
        """
        dirty = {idstr: PageBitmap(block.pages) for idstr, block in self.blocks.items()}
        for process in list(self.processes):
            try:
                for mapping in process.mappings:
                    self._collectMapping(process, mapping, reprotect, dirty[mapping.block])
            except UffdError as error:
                _log.warn("dirty tracking: dropped process {pid} ({error}); all its pages count dirty",
                          pid=process.pid, error=error)
                self.processes.remove(process)
                process.close()
                for mapping in process.mappings:
                    dirty[mapping.block].set(mapping.offset // mapping.pageSize, mapping.length // mapping.pageSize)
        return dirty

    def _collectMapping(self, process: TrackedProcess, mapping: ClientMapping, reprotect: bool,
                        bitmap: PageBitmap) -> None:
        """
        Scan one mapping into its block's bitmap.

        @param process: the process.
        @param mapping: one of its mappings.
        @param reprotect: protect reported pages again.
        @param bitmap: the block's written pages.
        """
        size = mapping.pageSize
        for start, end in scanWritten(process.pagemap, mapping.base, mapping.base + mapping.length, reprotect):
            first = (mapping.offset + start - mapping.base) // size
            bitmap.set(first, (end - start + size - 1) // size)

    def start(self) -> None:
        """
        Everything counts as clean from now on (written pages are protected
        again).
        """
        self._collect(True)

    def sync(self) -> dict[str, list[tuple[int, int]]]:
        """
        Collect the pages written since L{start} or the previous C{sync}.

        @return: idstr -> (offset, length) byte ranges, in order.
        """
        ranges = {}
        for idstr, bitmap in self._collect(True).items():
            size = self.blocks[idstr].pageSize
            ranges[idstr] = [(page * size, count * size) for page, count in bitmap.runs()]
        return ranges

    def stop(self) -> None:
        """
        End tracking: close every process's userfaultfd and pagemap.
        """
        for process in self.processes:
            process.close()
        self.processes = []
