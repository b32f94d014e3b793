# -*- test-case-name: tests.test_migration_loopback -*-
"""
Small VMs for the engine's tests and benchmarks: an outgoing VM over
memfd-backed blocks that the test fills before (and writes during)
migration, and an incoming VM over production
L{twisted_postcopy.ram.block.RAMBlock}s whose blocks the test reads with
C{pread} only after completion.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

from zope.interface import implementer

from twisted_postcopy.interfaces import IDirtyTracker, IIncomingVM, IOutgoingVM
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
PAGE = TARGET_PAGE_SIZE


class MemBlock:
    """
    A source-side block over a memfd with the test's own shared mapping
    (the test writes the guest's RAM through C{map}).

    @ivar idstr: the block name.
    @ivar length: bytes.
    @ivar pageSize: 4096, or 2 MiB for a hugetlbfs memfd.
    @ivar fd: the memfd.
    @ivar map: the shared mapping.
    """

    def __init__(self, idstr: str, length: int, pageSize: int = PAGE) -> None:
        """
        @param idstr: the name.
        @param length: the size in bytes.
        @param pageSize: 4096, or 2 MiB (C{MFD_HUGETLB}; huge pages must
            be free).
        """
        self.idstr, self.length, self.pageSize = idstr, length, pageSize
        self.fd = os.memfd_create(idstr.replace("/", "_"), 0 if pageSize == PAGE else os.MFD_HUGETLB)
        os.ftruncate(self.fd, length)
        self.map = mmap.mmap(self.fd, length, mmap.MAP_SHARED)

    def view(self) -> memoryview:
        """
        @return: a view of the mapping (source side only).
        """
        return memoryview(self.map)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """
        Write whole pages with C{pwrite} (the destination's precopy path;
        through the mapping on hugetlbfs, which has no C{pwrite}).

        @param offset: bytes.
        @param data: the pages.
        """
        if self.pageSize != PAGE:
            self.map[offset:offset + len(data)] = data
            return
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def discard(self, offset: int, length: int) -> None:
        """
        Punch a hole.

        @param offset: bytes.
        @param length: bytes.
        """
        if _libc.fallocate(self.fd, _PUNCH, ctypes.c_long(offset), ctypes.c_long(length)):
            raise OSError(ctypes.get_errno(), "fallocate")

    def read(self) -> bytes:
        """
        @return: the whole content, read with pread.
        """
        return os.pread(self.fd, self.length, 0)

    def close(self) -> None:
        """
        Release the mapping and the fd.
        """
        self.map.close()
        os.close(self.fd)


@implementer(IDirtyTracker)
class WriteLog:
    """
    A dirty tracker fed by the test's own writes (L{OutgoingTestVM.write}).
    """

    def __init__(self) -> None:
        """
        Set up the instance.
        """
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        self.running = False

    def start(self) -> None:
        """
        Begin tracking: forget earlier writes.
        """
        self.running = True
        self.ranges = {}

    def sync(self) -> dict[str, list[tuple[int, int]]]:
        """
        @return: the ranges written since the previous sync, by block.
        """
        ranges, self.ranges = self.ranges, {}
        return ranges

    def stop(self) -> None:
        """
        Stop (no further effect on pages already placed).
        """
        self.running = False


@implementer(IOutgoingVM)
class OutgoingTestVM:
    """
    An outgoing VM over L{MemBlock}s; the test writes its RAM.
    """

    machine = "pc-i440fx-7.2"

    def __init__(self, sizes: dict[str, int], device: bytes = b"",
                 pageSizes: dict[str, int] | None = None) -> None:
        """
        Set up the instance.

        @param sizes: block name -> length.
        @param device: the device sections.
        @param pageSizes: block name -> page size for huge page blocks
            (hugetlbfs memfds; the others have 4 KiB pages).
        """
        pageSizes = pageSizes or {}
        self.blocks = [MemBlock(name, size, pageSizes.get(name, PAGE)) for name, size in sizes.items()]
        self.dirtyTracker = WriteLog()
        self.device = device
        self.running = True
        self.resumed = 0

    def write(self, block: int, offset: int, data: bytes) -> None:
        """
        The guest writes (refused while stopped).
        """
        assert self.running, "guest write while stopped"
        self.blocks[block].map[offset : offset + len(data)] = data
        if self.dirtyTracker.running:
            self.dirtyTracker.ranges.setdefault(self.blocks[block].idstr, []).append(
                (offset, len(data)))

    def stop(self) -> None:
        """
        Stop (no further effect on pages already placed).
        """
        self.running = False

    def deviceState(self) -> bytes:
        """
        @return: this VM's device sections.
        """
        return self.device

    def resume(self) -> None:
        """
        Let the guest run again.
        """
        self.running = True
        self.resumed += 1

    def contents(self) -> dict[str, bytes]:
        """
        @return: idstr -> the block's bytes (read with pread).
        """
        return {b.idstr: bytes(b.map) for b in self.blocks}


@implementer(IIncomingVM)
class IncomingTestVM:
    """
    An incoming VM that creates a production L{RAMBlock} per listed block.
    """

    def __init__(self) -> None:
        """
        Set up the instance.
        """
        self.blocks: dict[str, RAMBlock] = {}
        self.devices: list[bytes] = []
        self.events: list[str] = []
        self.failure: Any = None

    def ramBlocksListed(self, blocks: Any) -> dict[str, RAMBlock]:
        """
        Create one memfd RAMBlock per listed block (hugetlbfs for a block
        listed with a page size other than 4 KiB).

        @param blocks: (idstr, length, pageSize or None) each.
        @return: idstr -> block.
        """
        self.blocks = {name: RAMBlock(name, length, pageSize or PAGE,
                                      "memfd" if pageSize in (None, PAGE) else "hugetlbfs")
                       for name, length, pageSize in blocks}
        return self.blocks

    def deviceStateReceived(self, raw: bytes) -> None:
        """
        Record device bytes.

        @param raw: the device sections.
        """
        self.devices.append(raw)

    def run(self) -> None:
        """
        The guest starts here.
        """
        self.events.append("run")

    def completed(self) -> None:
        """
        Record completion.
        """
        self.events.append("completed")

    def failed(self, reason: Any) -> None:
        """
        Record the failure.

        @param reason: why.
        """
        self.events.append("failed")
        self.failure = reason

    def contents(self) -> dict[str, bytes]:
        """
        @return: idstr -> the block's bytes (read with pread).
        """
        return {name: os.pread(block.fd, block.length, 0) for name, block in self.blocks.items()}
