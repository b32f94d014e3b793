# -*- test-case-name: tests.test_ram_uffd -*-
"""
Thin wrappers over the userfaultfd C shims of C{twisted_postcopy.ram._uffd}.

Every function takes a file descriptor and plain integers, returns plain
integers and raises L{UffdError} (an L{OSError} with the kernel's errno)
on failure.  Nothing here reads or writes registered memory: C{src}
buffers of L{copy} are the caller's own bytes.

Typical use, in the process that owns the memory::

    fd = openUffd()                       # O_NONBLOCK | O_CLOEXEC
    features, _ = api(fd, UFFD_FEATURE_THREAD_ID)
    register(fd, address, length)         # MISSING mode
    ... hand fd to the daemon (SCM_RIGHTS), or read it here ...

Names are the kernel's (C{UFFDIO_*}) and QEMU's.
"""

from __future__ import annotations

import errno
import os

from twisted_postcopy.errors import UffdError
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.uffdmsg import MESSAGE_SIZE

UFFD_FEATURE_THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
UFFD_FEATURE_MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
UFFD_FEATURE_MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
UFFD_FEATURE_MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
UFFD_FEATURE_EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
UFFD_FEATURE_WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
UFFD_FEATURE_POISON = lib.UFFD_FEATURE_POISON
UFFD_FEATURE_MOVE = lib.UFFD_FEATURE_MOVE
UFFD_USER_MODE_ONLY = lib.UFFD_USER_MODE_ONLY

UFFDIO_REGISTER_MODE_MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
UFFDIO_REGISTER_MODE_WP = lib.UFFDIO_REGISTER_MODE_WP
UFFDIO_REGISTER_MODE_MINOR = lib.UFFDIO_REGISTER_MODE_MINOR
UFFDIO_COPY_MODE_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE

#: Bits of C{uffdio_register.ioctls} (1 << the ioctl's index).
UFFDIO_WAKE_BIT = 1 << 2
UFFDIO_COPY_BIT = 1 << 3
UFFDIO_ZEROPAGE_BIT = 1 << 4
UFFDIO_WRITEPROTECT_BIT = 1 << 6
UFFDIO_CONTINUE_BIT = 1 << 7

#: The flags every userfaultfd the reactor reads must have.
DEFAULT_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC


def check(result: int, operation: str) -> int:
    """
    Turn a shim's C{-errno} convention into an exception.

    @param result: what the shim returned.
    @param operation: the operation's name, for the message.
    @return: C{result} when it is not negative.
    @raise UffdError: C{result} is negative.
    """
    if result < 0:
        raise UffdError(-result, f"{operation}: {os.strerror(-result)}")
    return result


def openUffd(flags: int = DEFAULT_FLAGS) -> int:
    """
    Create a userfaultfd: the C{userfaultfd(2)} system call, or
    C{/dev/userfaultfd} with C{USERFAULTFD_IOC_NEW} when the call is refused.

    @param flags: C{O_NONBLOCK}, C{O_CLOEXEC}, C{UFFD_USER_MODE_ONLY}.
    @return: the new file descriptor (no handshake done yet).
    @raise UffdError: both ways failed (the system call's errno).
    """
    return check(lib.tp_uffd_open(flags), "userfaultfd")


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """
    The C{UFFDIO_API} handshake; allowed once per file descriptor.

    @param fd: a new userfaultfd.
    @param features: the C{UFFD_FEATURE_*} bits to enable.
    @return: (every feature the kernel supports, the generic ioctl bits).
    @raise UffdError: C{EINVAL} for an unknown feature or a second call.
    """
    outFeatures = ffi.new("uint64_t *")
    outIoctls = ffi.new("uint64_t *")
    check(lib.tp_uffd_api(fd, features, outFeatures, outIoctls), "UFFDIO_API")
    return outFeatures[0], outIoctls[0]


def openWithFeatures(features: int = 0, flags: int = DEFAULT_FLAGS) -> int:
    """
    Open a userfaultfd and do the handshake, closing it if that fails.

    @param features: the C{UFFD_FEATURE_*} bits to enable.
    @param flags: the open flags.
    @return: the ready file descriptor.
    @raise UffdError: opening or the handshake failed.
    """
    fd = openUffd(flags)
    try:
        api(fd, features)
    except BaseException:
        os.close(fd)
        raise
    return fd


def probeFeatures(flags: int = DEFAULT_FLAGS) -> int:
    """
    Learn the kernel's feature bits on a throwaway descriptor (the
    handshake works only once per descriptor).

    @param flags: the open flags (e.g. with C{UFFD_USER_MODE_ONLY}).
    @return: the supported C{UFFD_FEATURE_*} bits.
    @raise UffdError: userfaultfd cannot be opened.
    """
    fd = openUffd(flags)
    try:
        return api(fd, 0)[0]
    finally:
        os.close(fd)


def register(fd: int, address: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
    """
    C{UFFDIO_REGISTER} a page-aligned range.

    @param fd: the userfaultfd.
    @param address: start of the range.
    @param length: its length.
    @param mode: C{UFFDIO_REGISTER_MODE_*} bits.
    @return: the C{ioctls} bits the range supports.
    @raise UffdError: e.g. C{EBUSY} when another uffd registered the range.
    """
    outIoctls = ffi.new("uint64_t *")
    check(lib.tp_uffd_register(fd, address, length, mode, outIoctls), "UFFDIO_REGISTER")
    return outIoctls[0]


def unregister(fd: int, address: int, length: int) -> None:
    """
    C{UFFDIO_UNREGISTER} a range.

    @param fd: the userfaultfd.
    @param address: start of the range.
    @param length: its length.
    @raise UffdError: the kernel refused.
    """
    check(lib.tp_uffd_unregister(fd, address, length), "UFFDIO_UNREGISTER")


def wake(fd: int, address: int, length: int) -> None:
    """
    C{UFFDIO_WAKE}: release threads blocked on faults in the range.

    @param fd: the userfaultfd the threads faulted on.
    @param address: start of the range, in that uffd's address space.
    @param length: its length.
    @raise UffdError: the kernel refused.
    """
    check(lib.tp_uffd_wake(fd, address, length), "UFFDIO_WAKE")


def _sourceAddress(data: bytes | bytearray | memoryview) -> tuple[object, int]:
    """
    @param data: a contiguous buffer.
    @return: (a cdata keeping the buffer alive, its address).
    """
    keep = ffi.from_buffer(data)
    return keep, int(ffi.cast("uintptr_t", keep))


def copy(fd: int, address: int, data: bytes | bytearray | memoryview, mode: int = 0) -> int:
    """
    One C{UFFDIO_COPY} of C{data} to C{address}.

    @param fd: the userfaultfd of the destination range.
    @param address: page-aligned destination.
    @param data: whole pages (never registered memory).
    @param mode: C{UFFDIO_COPY_MODE_*} bits.
    @return: bytes copied (less than C{len(data)} on a partial copy).
    @raise UffdError: nothing was copied (C{EEXIST}, C{EAGAIN}, ...).
    """
    keep, source = _sourceAddress(data)
    return check(lib.tp_uffd_copy(fd, address, source, len(data), mode), "UFFDIO_COPY")


def zeropage(fd: int, address: int, length: int, mode: int = 0) -> int:
    """
    One C{UFFDIO_ZEROPAGE} (not on hugetlbfs).

    @param fd: the userfaultfd.
    @param address: page-aligned start.
    @param length: whole pages.
    @param mode: C{UFFDIO_ZEROPAGE_MODE_DONTWAKE} or 0.
    @return: bytes zeroed.
    @raise UffdError: nothing was placed.
    """
    return check(lib.tp_uffd_zeropage(fd, address, length, mode), "UFFDIO_ZEROPAGE")


def continuePages(fd: int, address: int, length: int, mode: int = 0) -> int:
    """
    C{UFFDIO_CONTINUE}: map pages already in the page cache (MINOR mode).

    @param fd: the userfaultfd.
    @param address: page-aligned start.
    @param length: whole pages.
    @param mode: C{UFFDIO_CONTINUE_MODE_*} bits.
    @return: bytes mapped.
    @raise UffdError: nothing was mapped.
    """
    return check(lib.tp_uffd_continue(fd, address, length, mode), "UFFDIO_CONTINUE")


def writeProtect(fd: int, address: int, length: int, protect: bool = True, wakeWriters: bool = True) -> None:
    """
    C{UFFDIO_WRITEPROTECT} a range registered with C{MODE_WP}.

    @param fd: the userfaultfd.
    @param address: page-aligned start.
    @param length: whole pages.
    @param protect: set (L{True}) or clear the protection.
    @param wakeWriters: when clearing, wake blocked writers.
    @raise UffdError: the kernel refused.
    """
    mode = lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    if not protect and not wakeWriters:
        mode |= lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    check(lib.tp_uffd_writeprotect(fd, address, length, mode), "UFFDIO_WRITEPROTECT")


def placeRun(fd: int, address: int, data: bytes | bytearray | memoryview | None, length: int,
             pageSize: int, mode: int = 0) -> tuple[int, int, int]:
    """
    Place one contiguous run with as few ioctls as possible: C{UFFDIO_COPY}
    of C{data}, or C{UFFDIO_ZEROPAGE} when C{data} is L{None}.  Partial
    copies are resumed; pages that already exist (C{EEXIST}) count as
    placed.

    @param fd: the userfaultfd of the destination range.
    @param address: page-aligned destination.
    @param data: the bytes, or L{None} for zero pages.
    @param length: the run's length (C{len(data)} when given).
    @param pageSize: the range's page size (the EEXIST skip step).
    @param mode: C{UFFDIO_COPY_MODE_*} / C{UFFDIO_ZEROPAGE_MODE_*} bits.
    @return: (0 or C{-errno} where it stopped, bytes done, bytes that
        already existed); C{-EAGAIN} means non-cooperative events must be
        read before the rest (from C{address + done}) can be placed.
    """
    placed = ffi.new("uint64_t[2]")
    if data is None:
        result = lib.tp_uffd_place(fd, address, 0, length, pageSize, mode, placed, placed + 1)
    else:
        keep = ffi.from_buffer(data)
        result = lib.tp_uffd_place(fd, address, ffi.cast("uintptr_t", keep), length, pageSize, mode,
                                   placed, placed + 1)
    return result, placed[0], placed[1]


class MessageBuffer:
    """
    A reusable C buffer for reading userfaultfd messages in batches.

    @ivar capacity: how many records one read can return.
    """

    def __init__(self, capacity: int = 64) -> None:
        """
        @param capacity: records per read.
        """
        self.capacity = capacity
        self._buffer = ffi.new("char[]", capacity * MESSAGE_SIZE)

    def read(self, fd: int) -> memoryview | None:
        """
        Read one batch.

        @param fd: a non-blocking userfaultfd.
        @return: the records read (a view valid until the next read), or
            L{None} when nothing is queued (C{EAGAIN}).
        @raise UffdError: the read failed otherwise.
        """
        count = lib.tp_uffd_read(fd, self._buffer, self.capacity)
        if count == -errno.EAGAIN:
            return None
        check(count, "read(userfaultfd)")
        return memoryview(ffi.buffer(self._buffer, count * MESSAGE_SIZE))


def monotonicNs() -> int:
    """
    @return: C{CLOCK_MONOTONIC} in nanoseconds, from C (the clock the
        touch helper uses).
    """
    return lib.tp_monotonic_ns()
