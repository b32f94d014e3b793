# -*- test-case-name: tests.test_snapshot_workingset -*-
"""
A snapshot's working set: the pages a restored guest asked for first, in
order, kept in C{workingset.bin} beside the manifest (docs/prefetch.md).

The first postcopy restore of a snapshot with C{x-working-set-pages} on
records the page requests its source received
(L{twisted_postcopy.source.prefetch.RequestLog}) and stores them once the
restore completed; every later restore or clone of that snapshot sends
those pages before the rest of RAM, and appends the pages it was still
asked for (so the set grows towards what the guest touches first, up to
the limit).  See L{twisted_postcopy.snapshot.store.Snapshot.publishExtra}
for how the file is stored; delete it to record afresh.

Format (big-endian)::

    magic    8 bytes  b"TPCWSET1"
    count    u32      entries, at most MAX_PAGES
    crc32    u32      of the entries
    entries  count x (block index u16, reserved u16 = 0, page index u32)

A block index names the manifest's blocks in order; a page index counts
that block's pages (its C{page-size}).  Decoding is linear in the file,
checks every field and refuses the whole file on the first fault, with the
file and the reason in the message.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterable, Sequence

from twisted_postcopy.errors import SnapshotError
from twisted_postcopy.snapshot.store import Snapshot
from twisted_postcopy.source.prefetch import MAXIMA, WORKING_SET

#: The file's name in the snapshot directory.
NAME = "workingset.bin"
MAGIC = b"TPCWSET1"
_HEADER = struct.Struct(">8sII")
_ENTRY = struct.Struct(">HHI")
#: The most entries a file may hold (the parameter's maximum).
MAX_PAGES = MAXIMA[WORKING_SET]
#: The largest file read.
MAX_SIZE = _HEADER.size + MAX_PAGES * _ENTRY.size


class WorkingSetError(SnapshotError):
    """
    A working-set file that cannot be used: corrupt, truncated, or naming
    pages the snapshot does not have.
    """


def encode(entries: Sequence[tuple[int, int]]) -> bytes:
    """
    @param entries: (block index, page index) pairs, in order.
    @return: the file's bytes.
    @raise ValueError: more than L{MAX_PAGES} entries.
    """
    if len(entries) > MAX_PAGES:
        raise ValueError(f"{len(entries)} working-set pages: at most {MAX_PAGES}")
    body = b"".join(_ENTRY.pack(block, 0, page) for block, page in entries)
    return _HEADER.pack(MAGIC, len(entries), zlib.crc32(body)) + body


def decode(data: bytes, pageCounts: Sequence[int], where: str = NAME) -> list[tuple[int, int]]:
    """
    Check and decode a working-set file.

    @param data: its bytes.
    @param pageCounts: the snapshot's page count per block, in list order.
    @param where: the file's path, for messages.
    @return: (block index, page index) pairs, in order, each once.
    @raise WorkingSetError: anything wrong, saying what.
    """
    if len(data) < _HEADER.size:
        raise WorkingSetError(f"{where}: {len(data)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, count, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WorkingSetError(f"{where}: not a working-set file (magic {magic!r})")
    if count > MAX_PAGES:
        raise WorkingSetError(f"{where}: {count} entries, at most {MAX_PAGES}")
    if len(data) != _HEADER.size + count * _ENTRY.size:
        raise WorkingSetError(f"{where}: {len(data)} bytes, {count} entries need "
                              f"{_HEADER.size + count * _ENTRY.size} (truncated or padded)")
    body = memoryview(data)[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise WorkingSetError(f"{where}: crc32 mismatch (corrupt)")
    seen = [bytearray(pages) for pages in pageCounts]
    entries = []
    for number, (block, reserved, page) in enumerate(_ENTRY.iter_unpack(body)):
        if block >= len(seen) or reserved or page >= len(seen[block]):
            raise WorkingSetError(f"{where}: entry {number} (block {block}, page {page}) is not a page "
                                  "of this snapshot")
        if seen[block][page]:
            raise WorkingSetError(f"{where}: entry {number} repeats block {block} page {page}")
        seen[block][page] = 1
        entries.append((block, page))
    return entries


def pageCounts(snapshot: Snapshot) -> list[int]:
    """
    @param snapshot: an opened snapshot.
    @return: its page count per block, in list order.
    """
    return [block.length // block.pageSize for block in snapshot.blocks]


def readWorkingSet(snapshot: Snapshot, limit: int = MAX_PAGES) -> list[tuple[int, int]] | None:
    """
    @param snapshot: an opened snapshot.
    @param limit: the most entries used (C{x-working-set-pages}).
    @return: its first C{limit} working-set entries, or L{None} when it
        has no working set yet.
    @raise WorkingSetError: the file is there but unusable (delete it, or
        restore with C{x-working-set-pages} 0).
    """
    data = snapshot.readExtra(NAME, MAX_SIZE)
    if data is None:
        return None
    where = f"{snapshot.path}/{NAME}"
    return decode(data, pageCounts(snapshot), where)[:limit]


def writeWorkingSet(snapshot: Snapshot, entries: Iterable[tuple[int, int]], replace: bool = False) -> bool:
    """
    Store a working set.

    @param snapshot: an opened snapshot.
    @param entries: (block index, page index) pairs, in order, each once.
    @param replace: replace the snapshot's working set (else store only if
        it has none).
    @return: whether it was stored.
    @raise SnapshotError: as L{Snapshot.publishExtra}.
    """
    return snapshot.publishExtra(NAME, encode(list(entries)), replace)
