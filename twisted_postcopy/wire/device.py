# -*- test-case-name: tests.test_wire_stream -*-
"""
Where an unframed device-section payload ends.

A VMState payload carries no length; only its schema says where it ends.
Our own guests' sections (idstr prefix C{twisted-postcopy/}) are framed as
C{be32 len} + blob and are parsed exactly.  For all others this module
applies a documented heuristic: the payload ends at the first footer
C{7e <be32 section_id>} that is followed by a plausible next element:

  - the end of the input (EOF fed, e.g. the end of a package);
  - C{QEMU_VM_EOF} followed by C{QEMU_VM_VMDESCRIPTION} or end of input;
  - a START/FULL header whose idstr is 1..255 printable ASCII bytes and
    whose instance and version ids are below 65536;
  - a PART/END header naming a section id already announced;
  - a command with a known number and, if fixed, the right length.

The search is resumable (no byte is scanned twice) and bounded by the
maximum device section size.
"""

from __future__ import annotations

import struct
from typing import Container

from twisted_postcopy.wire.constants import (
    COMMAND_LENGTHS,
    FULL_HEADER_KINDS,
    SHORT_HEADER_KINDS,
    SectionType,
)
from twisted_postcopy.wire.strings import isPlausibleIdstr

#: Longest element prefix the plausibility test looks at.
LOOKAHEAD = 1 + 4 + 1 + 255 + 8
_PLAUSIBLE, _IMPLAUSIBLE, _UNDECIDED = True, False, None


def footerBytes(sectionId: int) -> bytes:
    """
    @param sectionId: a section id.
    @return: the section's footer.
    """
    return struct.pack(">BI", SectionType.SECTION_FOOTER, sectionId)


def plausibleNext(data: bytes | bytearray, at: int, closed: bool,
                  knownIds: Container[int]) -> bool | None:
    """
    Whether C{data[at:]} starts like a top-level element.

    @param data: the bytes searched.
    @param at: where the candidate next element starts.
    @param closed: whether no more bytes will follow C{data}.
    @param knownIds: section ids already announced by a START/FULL.
    @return: L{True}, L{False}, or L{None} if more bytes are needed.
    """
    available = len(data) - at
    if available == 0:
        return _PLAUSIBLE if closed else _UNDECIDED
    kind = data[at]
    if kind == SectionType.EOF:
        if available == 1:
            return _PLAUSIBLE if closed else _UNDECIDED
        return data[at + 1] == SectionType.VMDESCRIPTION
    if kind in FULL_HEADER_KINDS:
        return _fullHeader(data, at, closed)
    if kind in SHORT_HEADER_KINDS or kind == SectionType.COMMAND:
        if available < 5:
            return _IMPLAUSIBLE if closed else _UNDECIDED
        if kind == SectionType.COMMAND:
            cmd, length = struct.unpack_from(">HH", data, at + 1)
            return cmd in COMMAND_LENGTHS and COMMAND_LENGTHS[cmd] in (None, length)
        return struct.unpack_from(">I", data, at + 1)[0] in knownIds
    return _IMPLAUSIBLE


def _fullHeader(data: bytes | bytearray, at: int, closed: bool) -> bool | None:
    """
    @param data: the bytes searched.
    @param at: where a START/FULL header may start.
    @param closed: whether no more bytes will follow C{data}.
    @return: whether it looks like one, or L{None} if more bytes are needed.
    """
    available = len(data) - at
    if available < 6:
        return _IMPLAUSIBLE if closed else _UNDECIDED
    length = data[at + 5]
    if available < 14 + length:
        if not isPlausibleIdstr(data[at + 6:at + 6 + min(length, available - 6)]) and available > 6:
            return _IMPLAUSIBLE
        return _IMPLAUSIBLE if closed else _UNDECIDED
    instanceId, versionId = struct.unpack_from(">II", data, at + 6 + length)
    return (isPlausibleIdstr(data[at + 6:at + 6 + length])
            and instanceId < 0x10000 and versionId < 0x10000)


def findPayloadEnd(data: bytes | bytearray, start: int, sectionId: int, closed: bool,
                   knownIds: Container[int]) -> tuple[int | None, int]:
    """
    Search C{data} for the footer that ends a device section.

    @param data: the section bytes received so far (from its header).
    @param start: where to (re)start the search.
    @param sectionId: the section's id.
    @param closed: whether no more bytes will follow C{data}.
    @param knownIds: section ids already announced.
    @return: C{(end, resume)}: C{end} is the index just after the footer,
        or L{None} if not found yet; then C{resume} is where to search
        again once more bytes have arrived.
    """
    footer = footerBytes(sectionId)
    at = start
    while True:
        at = data.find(footer, at)
        if at < 0:
            return None, max(start, len(data) - len(footer) + 1)
        verdict = plausibleNext(data, at + len(footer), closed, knownIds)
        if verdict:
            return at + len(footer), at
        if verdict is None:
            return None, at
        at += 1
