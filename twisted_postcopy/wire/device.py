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

from attrs import define, field, frozen

from twisted_postcopy.errors import (
    DeviceSectionBoundaryError,
    LimitExceededError,
    SectionMismatchError,
)
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.constants import (
    COMMAND_LENGTHS,
    FULL_HEADER_KINDS,
    OWN_SECTION_PREFIX,
    SHORT_HEADER_KINDS,
    SectionType,
)
from twisted_postcopy.wire.events import NEED_DATA, DeviceSectionReceived, NeedData
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


@frozen
class SectionInfo:
    """
    A section announced by a START or FULL header.

    @ivar idstr: its idstr.
    @ivar instanceId: its instance id.
    @ivar versionId: its version id.
    @ivar isRAM: whether it is the C{"ram"} section.
    """

    idstr: str
    instanceId: int
    versionId: int
    isRAM: bool


@define
class DeviceSectionReader:
    """
    Reads one device section whose header starts at the buffer's position.

    @ivar kind: its section type.
    @ivar sectionId: its id.
    @ivar section: what its START/FULL announced.
    @ivar headerLength: the length of its header.
    @ivar where: the stream offset of its header.
    @ivar maxSize: the largest section accepted (header and footer included).
    """

    kind: SectionType
    sectionId: int
    section: SectionInfo
    headerLength: int
    where: int
    maxSize: int
    _raw: bytearray = field(init=False, factory=bytearray)
    _resume: int = field(init=False, default=0)

    def step(self, buffer: ReceiveBuffer, knownIds: Container[int]) -> DeviceSectionReceived | NeedData:
        """
        Read on.

        @param buffer: the receive buffer.
        @param knownIds: section ids already announced.
        @return: the section's event, or L{NEED_DATA}.
        @raise LimitExceededError: if the section is over C{maxSize}.
        @raise DeviceSectionBoundaryError: if the input ended before its end.
        @raise SectionMismatchError: if our own section's footer is wrong.
        """
        if self.section.idstr.startswith(OWN_SECTION_PREFIX):
            return self._framed(buffer)
        return self._search(buffer, knownIds)

    def _event(self, raw: bytes) -> DeviceSectionReceived:
        """
        @param raw: the section's exact bytes.
        @return: its event.
        """
        section = self.section
        return DeviceSectionReceived(
            self.kind, self.sectionId, section.idstr, section.instanceId, section.versionId, raw)

    def _framed(self, buffer: ReceiveBuffer) -> DeviceSectionReceived | NeedData:
        """
        Read a twisted-postcopy guest section: payload C{be32 len} + blob.

        @param buffer: the receive buffer, at the section's header.
        @return: the event, or L{NEED_DATA}.
        """
        if not buffer.ensure(self.headerLength + 4):
            return NEED_DATA
        blobLength = struct.unpack_from(">I", buffer.data, buffer.offset + self.headerLength)[0]
        total = self.headerLength + 4 + blobLength + 5
        if total > self.maxSize:
            raise LimitExceededError(
                f"device section {self.section.idstr!r} of {total} bytes exceeds the limit {self.maxSize}",
                self.where, "max-device-section-size")
        if not buffer.ensure(total):
            return NEED_DATA
        raw = bytes(buffer.view[buffer.offset:buffer.offset + total])
        if raw[-5:] != footerBytes(self.sectionId):
            raise SectionMismatchError(
                f"section {self.section.idstr!r} blob is not followed by its footer", self.where + total - 5)
        buffer.advance(total)
        return self._event(raw)

    def _search(self, buffer: ReceiveBuffer, knownIds: Container[int]) -> DeviceSectionReceived | NeedData:
        """
        Take bytes from the buffer (in doubling steps, so little is taken
        back) and search on for the footer.

        @param buffer: the receive buffer.
        @param knownIds: section ids already announced.
        @return: the event, or L{NEED_DATA}.
        """
        raw, bound = self._raw, self.maxSize + LOOKAHEAD
        if not self._resume:
            self._resume = self.headerLength
        while True:
            for piece in buffer.takeUpTo(min(max(len(raw), 65536), bound - len(raw))):
                raw += piece
            closed = buffer.closed and not len(buffer)
            end, self._resume = findPayloadEnd(raw, self._resume, self.sectionId, closed, knownIds)
            if end is not None or not len(buffer) or len(raw) >= bound:
                break
        if (end is None and len(raw) >= bound) or (end is not None and end > self.maxSize):
            raise LimitExceededError(
                f"no end of device section {self.section.idstr!r} within {self.maxSize} bytes", self.where,
                "max-device-section-size")
        if end is None:
            if closed:
                raise DeviceSectionBoundaryError(
                    f"input ended before the footer of device section {self.section.idstr!r} "
                    f"(expected 7e {self.sectionId:08x} and a plausible next element)", self.where)
            return NEED_DATA
        buffer.unread(bytes(raw[end:]))
        return self._event(bytes(raw[:end]))
