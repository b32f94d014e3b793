# -*- test-case-name: tests.test_ram_faults -*-
"""
Guest processes attached to the fault service: their mapping tables and
the reactor descriptors that read their userfaultfds and pidfds.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable, Iterable, Mapping

from attrs import define, field, frozen
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_postcopy.errors import MappingTableError


@frozen
class ClientMapping:
    """
    One entry of a guest process's mapping table.

    @ivar base: the start address of the mapping in the guest process.
    @ivar block: the RAMBlock idstr it maps.
    @ivar offset: the byte offset in the block where the mapping starts.
    @ivar length: the mapping's length in bytes.
    @ivar pageSize: the mapping's page size.
    """

    base: int
    block: str
    offset: int
    length: int
    pageSize: int = 4096

    @classmethod
    def coerce(cls, entry: ClientMapping | Mapping[str, Any]) -> ClientMapping:
        """
        @param entry: a L{ClientMapping}, or a dict with its field names.
        @return: a L{ClientMapping}.
        @raise MappingTableError: a dict with missing or non-integer fields.
        """
        if isinstance(entry, cls):
            return entry
        try:
            return cls(int(entry["base"]), str(entry["block"]), int(entry["offset"]), int(entry["length"]),
                       int(entry.get("pageSize", 4096)))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise MappingTableError(f"bad mapping table entry {entry!r}: {error}") from None


@implementer(IReadDescriptor)
@define(eq=False)
class Readable:
    """
    An C{IReadDescriptor} over one fd that calls back when readable.

    @ivar fd: the descriptor.
    @ivar readable: called with no arguments from C{doRead}.
    @ivar name: the log prefix.
    """

    fd: int
    readable: Callable[[], None]
    name: str

    def fileno(self) -> int:
        """
        @return: the descriptor.
        """
        return self.fd

    def doRead(self) -> None:
        """
        The descriptor is readable.
        """
        self.readable()

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the descriptor; the service closes it.

        @param reason: why.
        """

    def logPrefix(self) -> str:
        """
        @return: the log prefix.
        """
        return self.name


@define(eq=False)
class FaultClient:
    """
    A guest process attached to the fault service.

    @ivar fd: its userfaultfd (owned by the service from now on).
    @ivar mappings: its mapping table, sorted by base address.
    @ivar pid: its process id, if known.
    @ivar pidfd: a pidfd of it (readable when it exits), or -1.
    @ivar readers: the reactor readers of C{fd} and C{pidfd}.
    @ivar faults: how many fault messages were read from it.
    @ivar alive: whether it is still attached.
    """

    fd: int
    mappings: list[ClientMapping]
    pid: int | None = None
    pidfd: int = -1
    readers: list[Readable] = field(factory=list)
    faults: int = 0
    alive: bool = True
    _bases: list[int] = field(init=False)

    def __attrs_post_init__(self) -> None:
        """
        Index the mapping table.
        """
        self._bases = [mapping.base for mapping in self.mappings]

    def find(self, address: int) -> ClientMapping | None:
        """
        @param address: an address in the guest process.
        @return: the mapping holding it, or L{None}.
        """
        index = bisect_right(self._bases, address) - 1
        if index >= 0:
            mapping = self.mappings[index]
            if address < mapping.base + mapping.length:
                return mapping
        return None

    def __repr__(self) -> str:
        """
        @return: a short description for logs.
        """
        return f"<FaultClient pid={self.pid} uffd={self.fd}>"


def validateMappings(blocks: Mapping[str, Any], mappings: Iterable[Any]) -> list[ClientMapping]:
    """
    Check a client's mapping table against the service's blocks.

    @param blocks: idstr -> RAMBlock.
    @param mappings: the table's entries (L{ClientMapping} or dicts).
    @return: the entries, sorted by base address.
    @raise MappingTableError: the table is empty, names an unknown block,
        is misaligned, runs past its block, or has overlapping entries.
    """
    table = sorted((ClientMapping.coerce(entry) for entry in mappings), key=lambda m: m.base)
    if not table:
        raise MappingTableError("empty mapping table")
    for mapping in table:
        block = blocks.get(mapping.block)
        if block is None:
            raise MappingTableError(f"mapping table names unknown RAMBlock {mapping.block!r}")
        size = block.pageSize
        if mapping.pageSize != size:
            raise MappingTableError(f"mapping of {mapping.block} has page size {mapping.pageSize}, block has {size}")
        if mapping.base % size or mapping.offset % size or mapping.length % size or mapping.length <= 0:
            raise MappingTableError(f"mapping {mapping} is not aligned to the page size {size}")
        if mapping.offset < 0 or mapping.offset + mapping.length > block.length:
            raise MappingTableError(f"mapping {mapping} runs past the {block.length:#x} bytes of {mapping.block}")
    for before, after in zip(table, table[1:]):
        if before.base + before.length > after.base:
            raise MappingTableError(f"mappings {before} and {after} overlap")
    return table
