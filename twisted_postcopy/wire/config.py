# -*- test-case-name: tests.test_wire_stream -*-
"""
The configuration element (C{vmstate_configuration}) and its subsections.

C{07, be32 len, machine name}, then zero or more subsections C{05, str8
name, be32 version_id, body}.  Like QEMU's VMState loader this peeks one
byte after the body to see whether a subsection follows, so the element
is complete only when the next byte (or the end of input) is there.
"""

from __future__ import annotations

import struct

from twisted_postcopy.errors import BadHeaderError
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.constants import (
    CONFIG_CAPABILITIES,
    CONFIG_TARGET_PAGE_BITS,
    CONFIG_UUID,
    MAX_IDSTR_LENGTH,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    SectionType,
)
from twisted_postcopy.wire.events import NEED_DATA, ConfigurationReceived, HeaderReceived, NeedData
from twisted_postcopy.wire.strings import decodeName, encodeName, encodeStr8

#: Fixed body sizes of the fixed-size configuration subsections.
_FIXED_BODIES = {CONFIG_TARGET_PAGE_BITS: 4, CONFIG_UUID: 16}


def parseHeader(buffer: ReceiveBuffer) -> HeaderReceived | NeedData:
    """
    Decode the magic and version at the buffer's position.

    @param buffer: the receive buffer.
    @return: the event, or L{NEED_DATA}.
    @raise BadHeaderError: for a bad magic or a version other than 3.
    """
    if not buffer.ensure(8):
        return NEED_DATA
    magic, version = struct.unpack_from(">II", buffer.data, buffer.offset)
    if magic != QEMU_VM_FILE_MAGIC:
        raise BadHeaderError(f"bad magic 0x{magic:08x} (expected 0x5145564d 'QEVM')", buffer.position)
    if version != QEMU_VM_FILE_VERSION:
        obsolete = " (obsolete)" if version == QEMU_VM_FILE_VERSION_COMPAT else ""
        raise BadHeaderError(f"stream version {version}{obsolete} (expected 3)", buffer.position + 4)
    buffer.advance(8)
    return HeaderReceived(version)


def parseConfiguration(buffer: ReceiveBuffer, limit: int) -> ConfigurationReceived | NeedData:
    """
    Decode the configuration element at the buffer's position.

    @param buffer: the receive buffer.
    @param limit: the most bytes the element may have.
    @return: the event, or L{NEED_DATA} (also while the byte after it is
        not there yet).
    @raise BadHeaderError: if the element is missing or malformed.
    """
    where = buffer.position
    if not buffer.ensure(5):
        return NEED_DATA
    if buffer.data[buffer.offset] != SectionType.CONFIGURATION:
        raise BadHeaderError("Configuration section missing (expected 0x07 after the version)", where)
    length = struct.unpack_from(">I", buffer.data, buffer.offset + 1)[0]
    if not 0 < length <= MAX_IDSTR_LENGTH:
        raise BadHeaderError(f"machine type name of {length} bytes (expected 1..255)", where + 1)
    used = 5 + length
    while True:
        if used > limit:
            raise BadHeaderError(f"configuration longer than {limit} bytes", where)
        if not buffer.ensure(used + 1):
            if buffer.closed and len(buffer) == used:
                break
            return NEED_DATA
        if buffer.data[buffer.offset + used] != SectionType.SUBSECTION:
            break
        size = _subsectionSize(buffer, used, where)
        if size is NEED_DATA:
            return NEED_DATA
        used += size
    at = buffer.offset
    event = ConfigurationReceived(
        decodeName(buffer.data[at + 5:at + 5 + length]), bytes(buffer.data[at + 5 + length:at + used]))
    buffer.advance(used)
    return event


def _subsectionSize(buffer: ReceiveBuffer, used: int, where: int) -> int | NeedData:
    """
    Measure the configuration subsection at C{used} bytes into the element.

    @param buffer: the receive buffer (element at its position).
    @param used: the subsection's index in the element.
    @param where: the element's stream offset.
    @return: its size, or L{NEED_DATA}.
    @raise BadHeaderError: for an unknown subsection.
    """
    if not buffer.ensure(used + 2):
        return NEED_DATA
    nameLength = buffer.data[buffer.offset + used + 1]
    head = 2 + nameLength + 4
    if not buffer.ensure(used + head):
        return NEED_DATA
    at = buffer.offset + used
    name = decodeName(buffer.data[at + 2:at + 2 + nameLength])
    if name in _FIXED_BODIES:
        return head + _FIXED_BODIES[name]
    if name != CONFIG_CAPABILITIES:
        raise BadHeaderError(f"unknown configuration subsection {name!r}", where + used)
    if not buffer.ensure(used + head + 4):
        return NEED_DATA
    count = struct.unpack_from(">I", buffer.data, buffer.offset + used + head)[0]
    size = head + 4
    for _ in range(count):
        if not buffer.ensure(used + size + 1):
            return NEED_DATA
        size += 1 + buffer.data[buffer.offset + used + size]
    return size


def encodeHeader(machine: str, subsections: bytes = b"", configuration: bytes | None = None) -> bytes:
    """
    @param machine: the machine type name, e.g. C{"pc-i440fx-7.2"}.
    @param subsections: raw configuration subsections (see
        L{encodeSubsection}).
    @param configuration: the configuration element's bytes after its type
        byte (be32 length, name, subsections) to send verbatim, as captured
        from a QEMU source; when given, C{machine} and C{subsections} are
        not used.
    @return: magic, version and the configuration element.
    """
    if configuration is None:
        name = encodeName(machine)
        configuration = struct.pack(">I", len(name)) + name + subsections
    return struct.pack(">IIB", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
                       SectionType.CONFIGURATION) + configuration


def encodeHeaderEvent(event: HeaderReceived) -> bytes:
    """
    @param event: a decoded header.
    @return: its 8 bytes.
    """
    return struct.pack(">II", QEMU_VM_FILE_MAGIC, event.version)


def encodeConfigurationEvent(event: ConfigurationReceived) -> bytes:
    """
    @param event: a decoded configuration.
    @return: its bytes.
    """
    name = encodeName(event.machine)
    return struct.pack(">BI", SectionType.CONFIGURATION, len(name)) + name + event.subsections


def encodeSubsection(name: str, body: bytes, versionId: int = 1) -> bytes:
    """
    @param name: e.g. C{"configuration/uuid"}.
    @param body: its fields.
    @param versionId: its version.
    @return: the VMState subsection.
    """
    return bytes((SectionType.SUBSECTION,)) + encodeStr8(name) + struct.pack(">I", versionId) + body


def encodeCapabilities(names: list[str]) -> bytes:
    """
    @param names: validated capability names (7.2: C{x-ignore-shared}).
    @return: the C{configuration/capabilities} subsection.
    """
    body = struct.pack(">I", len(names)) + b"".join(encodeStr8(name) for name in names)
    return encodeSubsection(CONFIG_CAPABILITIES, body)
