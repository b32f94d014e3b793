# -*- test-case-name: tests.test_ram_uffdmsg -*-
"""
Decoding of C{struct uffd_msg} records, in pure Python.

A C{read()} on a userfaultfd returns whole 32-byte records: C{event} (u8)
at 0, reserved bytes up to 8, then the C{arg} union.  The layouts are
checked against the C compiler's C{sizeof(struct uffd_msg)} at import.
"""

from __future__ import annotations

import struct
from typing import Iterator, Union

from attrs import frozen

from twisted_postcopy.ram._uffd import lib

#: Size of one C{struct uffd_msg}.
MESSAGE_SIZE = 32

UFFD_EVENT_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
UFFD_EVENT_FORK = lib.UFFD_EVENT_FORK
UFFD_EVENT_REMAP = lib.UFFD_EVENT_REMAP
UFFD_EVENT_REMOVE = lib.UFFD_EVENT_REMOVE
UFFD_EVENT_UNMAP = lib.UFFD_EVENT_UNMAP

UFFD_PAGEFAULT_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
UFFD_PAGEFAULT_FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
UFFD_PAGEFAULT_FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR

#: One record seen as (event, u64 @8, u64 @16, u64 @24).
_RECORD = struct.Struct("<B7xQQQ")

if lib.TP_UFFD_MSG_SIZE != MESSAGE_SIZE or _RECORD.size != MESSAGE_SIZE:  # pragma: no cover
    raise ImportError(f"struct uffd_msg is {lib.TP_UFFD_MSG_SIZE} bytes, expected {MESSAGE_SIZE}")


@frozen
class PageFault:
    """
    C{UFFD_EVENT_PAGEFAULT}.

    @ivar flags: C{UFFD_PAGEFAULT_FLAG_*} bits (WRITE, WP, MINOR).
    @ivar address: the faulting address (page aligned unless EXACT_ADDRESS).
    @ivar threadId: the faulting thread's id (THREAD_ID feature), else 0.
    """

    flags: int
    address: int
    threadId: int

    @property
    def write(self) -> bool:
        """
        @return: whether the fault was a write.
        """
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)


@frozen
class Fork:
    """
    C{UFFD_EVENT_FORK}: a new userfaultfd, already installed in the reader.

    @ivar uffd: the new file descriptor.
    """

    uffd: int


@frozen
class Remap:
    """
    C{UFFD_EVENT_REMAP}: C{mremap()} moved a registered range.

    @ivar source: the old start address.
    @ivar destination: the new start address.
    @ivar length: the length moved.
    """

    source: int
    destination: int
    length: int


@frozen
class Remove:
    """
    C{UFFD_EVENT_REMOVE}: C{MADV_DONTNEED}/C{MADV_REMOVE} in a registered range.

    @ivar start: first address.
    @ivar end: address past the range.
    """

    start: int
    end: int


@frozen
class Unmap:
    """
    C{UFFD_EVENT_UNMAP}: a registered range was unmapped.

    @ivar start: first address.
    @ivar end: address past the range.
    """

    start: int
    end: int


@frozen
class UnknownEvent:
    """
    An event number this module does not know (a newer kernel).

    @ivar event: the event number.
    """

    event: int


UffdMessage = Union[PageFault, Fork, Remap, Remove, Unmap, UnknownEvent]


def _decodeOne(event: int, first: int, second: int, third: int) -> UffdMessage:
    """
    Build the message object of one record.

    @param event: the event byte.
    @param first: the u64 at offset 8.
    @param second: the u64 at offset 16.
    @param third: the u64 at offset 24.
    @return: the decoded message.
    """
    if event == UFFD_EVENT_PAGEFAULT:
        return PageFault(first, second, third & 0xFFFFFFFF)
    if event == UFFD_EVENT_FORK:
        return Fork(first & 0xFFFFFFFF)
    if event == UFFD_EVENT_REMAP:
        return Remap(first, second, third)
    if event == UFFD_EVENT_REMOVE:
        return Remove(first, second)
    if event == UFFD_EVENT_UNMAP:
        return Unmap(first, second)
    return UnknownEvent(event)


def iterRecords(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """
    The raw fields of each record, without building objects (the fault
    service's fast path).

    @param data: a whole number of records.
    @return: an iterator of (event, u64 @8, u64 @16, u64 @24).
    @raise ValueError: C{data} is not a multiple of L{MESSAGE_SIZE}.
    """
    if len(data) % MESSAGE_SIZE:
        raise ValueError(f"{len(data)} bytes is not a whole number of uffd_msg records")
    return _RECORD.iter_unpack(data)


def decodeMessages(data: bytes | memoryview) -> list[UffdMessage]:
    """
    Decode records read from a userfaultfd.

    @param data: a whole number of 32-byte records.
    @return: one message object per record.
    @raise ValueError: C{data} is not a multiple of L{MESSAGE_SIZE}.
    """
    return [_decodeOne(*fields) for fields in iterRecords(data)]


def encodePageFault(address: int, flags: int = 0, threadId: int = 0) -> bytes:
    """
    Build a PAGEFAULT record (for tests of decoders and dispatchers).

    @param address: the faulting address.
    @param flags: C{UFFD_PAGEFAULT_FLAG_*} bits.
    @param threadId: the faulting thread id.
    @return: 32 bytes.
    """
    return _RECORD.pack(UFFD_EVENT_PAGEFAULT, flags, address, threadId)
