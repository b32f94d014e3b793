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

from attrs import define, field

from twisted_postcopy.errors import BadHeaderError, LimitExceededError
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.constants import (
    CONFIG_CAPABILITIES,
    CONFIG_TARGET_PAGE_BITS,
    CONFIG_UUID,
    MAX_CAPABILITIES,
    MAX_CONFIGURATION_SIZE,
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


@define
class ConfigurationReader:
    """
    Reads the configuration element at the buffer's position, one piece
    (name, subsection head, capability) at a time: each piece is consumed
    as it is read, so however the element arrives it is scanned once.

    @ivar limit: the most bytes the element may have (max-configuration-size).
    @ivar maxCapabilities: the largest capability count (max-capabilities).
    """

    limit: int = MAX_CONFIGURATION_SIZE
    maxCapabilities: int = MAX_CAPABILITIES
    _where: int = field(init=False, default=-1)
    _machine: str | None = field(init=False, default=None)
    _size: int = field(init=False, default=0)
    _subsections: bytearray = field(init=False, factory=bytearray)
    _capabilities: int = field(init=False, default=0)

    def step(self, buffer: ReceiveBuffer) -> ConfigurationReceived | NeedData:
        """
        Read on.

        @param buffer: the receive buffer.
        @return: the event, or L{NEED_DATA} (also while the byte after the
            element is not there yet: the subsection peek).
        @raise BadHeaderError: if the element is missing or malformed.
        @raise LimitExceededError: for an element over a limit.
        """
        if self._machine is None and self._name(buffer) is NEED_DATA:
            return NEED_DATA
        while True:
            if self._capabilities:
                if not buffer.ensure(1) or not buffer.ensure(1 + buffer.data[buffer.offset]):
                    return NEED_DATA
                self._take(buffer, 1 + buffer.data[buffer.offset])
                self._capabilities -= 1
                continue
            if not buffer.ensure(1):
                if buffer.closed and not len(buffer):
                    break
                return NEED_DATA
            if buffer.data[buffer.offset] != SectionType.SUBSECTION:
                break
            if self._subsection(buffer) is NEED_DATA:
                return NEED_DATA
        assert self._machine is not None
        return ConfigurationReceived(self._machine, bytes(self._subsections))

    def _name(self, buffer: ReceiveBuffer) -> None | NeedData:
        """
        Read the type byte and the machine type name.

        @param buffer: the receive buffer, at the element.
        @return: L{None}, or L{NEED_DATA}.
        """
        self._where = where = buffer.position
        if not buffer.ensure(5):
            return NEED_DATA
        if buffer.data[buffer.offset] != SectionType.CONFIGURATION:
            raise BadHeaderError("Configuration section missing (expected 0x07 after the version)", where)
        length = struct.unpack_from(">I", buffer.data, buffer.offset + 1)[0]
        if not 0 < length <= MAX_IDSTR_LENGTH:
            raise BadHeaderError(f"machine type name of {length} bytes (expected 1..255)", where + 1)
        if not buffer.ensure(5 + length):
            return NEED_DATA
        self._machine = decodeName(buffer.data[buffer.offset + 5:buffer.offset + 5 + length])
        self._size = 5 + length
        buffer.advance(5 + length)
        return None

    def _take(self, buffer: ReceiveBuffer, count: int) -> None:
        """
        Consume C{count} available bytes of subsections.

        @param buffer: the receive buffer.
        @param count: how many.
        @raise LimitExceededError: if the element grows over the limit.
        """
        self._size += count
        if self._size > self.limit:
            raise LimitExceededError(
                f"configuration of more than {self.limit} bytes", self._where, "max-configuration-size")
        self._subsections += buffer.view[buffer.offset:buffer.offset + count]
        buffer.advance(count)

    def _subsection(self, buffer: ReceiveBuffer) -> None | NeedData:
        """
        Read a subsection's head, and its body unless it is the capability
        list (whose entries are read one by one).

        @param buffer: the receive buffer, at the subsection.
        @return: L{None}, or L{NEED_DATA}.
        @raise BadHeaderError: for an unknown subsection.
        """
        where = buffer.position
        if not buffer.ensure(2):
            return NEED_DATA
        nameLength = buffer.data[buffer.offset + 1]
        head = 2 + nameLength + 4
        if not buffer.ensure(head):
            return NEED_DATA
        name = decodeName(buffer.data[buffer.offset + 2:buffer.offset + 2 + nameLength])
        if name in _FIXED_BODIES:
            if not buffer.ensure(head + _FIXED_BODIES[name]):
                return NEED_DATA
            self._take(buffer, head + _FIXED_BODIES[name])
            return None
        if name != CONFIG_CAPABILITIES:
            raise BadHeaderError(f"unknown configuration subsection {name!r}", where)
        if not buffer.ensure(head + 4):
            return NEED_DATA
        count = struct.unpack_from(">I", buffer.data, buffer.offset + head)[0]
        if count > self.maxCapabilities:
            raise LimitExceededError(
                f"configuration lists {count} capabilities (at most {self.maxCapabilities})",
                where + head, "max-capabilities")
        self._take(buffer, head + 4)
        self._capabilities = count
        return None


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
