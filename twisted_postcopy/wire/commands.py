# -*- test-case-name: tests.test_wire_commands -*-
"""
C{QEMU_VM_COMMAND} elements: C{u8 0x08, be16 cmd, be16 len, payload}.

Fixed lengths are checked against L{COMMAND_LENGTHS} before the payload
is read; the variable ones (ADVISE, DISCARD, RECV_BITMAP) by their parsers,
as QEMU's handlers do.  The body of PACKAGED follows the command and is
handled by the stream decoder.
"""

from __future__ import annotations

import struct
from typing import Callable, Final, Union

from twisted_postcopy.errors import (
    BadLengthError,
    BadRAMRecordError,
    LimitExceededError,
    LocalProtocolError,
    UnknownElementError,
    UnsupportedFeatureError,
)
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.constants import (
    COMMAND_LENGTHS,
    POSTCOPY_RAM_DISCARD_VERSION,
    Command,
    SectionType,
)
from twisted_postcopy.wire.events import (
    NEED_DATA,
    DiscardReceived,
    ListenReceived,
    NeedData,
    PackageReceived,
    PingReceived,
    PostcopyAdvised,
    RecvBitmapRequested,
    ResumeReceived,
    ReturnPathOpened,
    RunReceived,
)
from twisted_postcopy.wire.strings import checkFixedLength, checkStr8Length, decodeName, encodeStr8

_commandHeader = struct.Struct(">BHH")
_lengths = struct.Struct(">HH")

#: Events of commands.
CommandEvent = Union[
    ReturnPathOpened, PingReceived, PostcopyAdvised, ListenReceived, RunReceived,
    DiscardReceived, PackageReceived, ResumeReceived, RecvBitmapRequested,
]


def checkCommandHeader(cmd: int, length: int, where: int) -> Command:
    """
    Check a command's number and length before its payload is read.

    @param cmd: the C{be16} command number.
    @param length: the C{be16} payload length.
    @param where: the stream offset of the element.
    @return: the command.
    @raise UnknownElementError: for cmd 0 or an unknown number.
    @raise UnsupportedFeatureError: for ENABLE_COLO.
    @raise BadLengthError: for a wrong fixed length.
    """
    if cmd not in COMMAND_LENGTHS:
        raise UnknownElementError(f"MIG_CMD 0x{cmd:x} unknown (expected 1..10)", where)
    command = Command(cmd)
    if command is Command.ENABLE_COLO:
        raise UnsupportedFeatureError(
            "MIG_CMD_ENABLE_COLO is not supported: switch off the x-colo capability", where)
    checkFixedLength(COMMAND_LENGTHS, command, length, command.name, where)
    return command


def _advise(payload: bytes, where: int) -> PostcopyAdvised:
    """
    @param payload: the POSTCOPY_ADVISE payload.
    @param where: the element's stream offset.
    @return: the event.
    @raise BadLengthError: unless the payload is 0 or 16 bytes.
    """
    if len(payload) == 0:
        return PostcopyAdvised(None, None)
    if len(payload) != 16:
        raise BadLengthError(f"POSTCOPY_ADVISE with length {len(payload)} (expected 16 or 0)", where)
    return PostcopyAdvised(*struct.unpack(">QQ", payload))


def _discard(payload: bytes, where: int) -> DiscardReceived:
    """
    @param payload: the POSTCOPY_RAM_DISCARD payload.
    @param where: the element's stream offset.
    @return: the event.
    @raise BadLengthError: for a payload that is not C{3 + n + 16 N}, N >= 1.
    @raise UnknownElementError: for a version other than 0 or a missing NUL.
    """
    if len(payload) < 20:
        raise BadLengthError(
            f"POSTCOPY_RAM_DISCARD with length {len(payload)} (expected at least 20)", where)
    if payload[0] != POSTCOPY_RAM_DISCARD_VERSION:
        raise UnknownElementError(
            f"POSTCOPY_RAM_DISCARD version {payload[0]} (expected 0)", where + 5)
    length = payload[1]
    checkStr8Length(length, "RAMBlock", where + 6)
    if len(payload) < 3 + length:
        raise BadLengthError(
            f"POSTCOPY_RAM_DISCARD idstr of {length} bytes overruns its {len(payload)}-byte payload", where + 6)
    if payload[2 + length] != 0:
        raise BadLengthError("POSTCOPY_RAM_DISCARD idstr is not followed by a NUL", where + 7 + length)
    body = len(payload) - 3 - length
    if body <= 0 or body % 16:
        raise BadLengthError(
            f"POSTCOPY_RAM_DISCARD ranges of {body} bytes (expected a positive multiple of 16)", where)
    values = struct.unpack_from(f">{body // 8}Q", payload, 3 + length)
    ranges = tuple(zip(values[0::2], values[1::2]))
    return DiscardReceived(decodeName(payload[2:2 + length]), ranges)


def _recvBitmap(payload: bytes, where: int) -> RecvBitmapRequested:
    """
    @param payload: the RECV_BITMAP payload.
    @param where: the element's stream offset.
    @return: the event.
    @raise BadLengthError: unless the payload is exactly one C{str8}.
    """
    if not payload:
        raise BadLengthError("RECV_BITMAP with length 0 (expected 1 + name length)", where)
    checkStr8Length(payload[0], "RAMBlock", where + 5)
    if len(payload) != 1 + payload[0]:
        raise BadLengthError(
            f"RECV_BITMAP with length {len(payload)} (expected {1 + payload[0]})", where)
    return RecvBitmapRequested(decodeName(payload[1:]))


_PARSERS: dict[Command, Callable[[bytes, int], CommandEvent]] = {
    Command.OPEN_RETURN_PATH: lambda payload, where: ReturnPathOpened(),
    Command.PING: lambda payload, where: PingReceived(int.from_bytes(payload, "big")),
    Command.POSTCOPY_ADVISE: _advise,
    Command.POSTCOPY_LISTEN: lambda payload, where: ListenReceived(),
    Command.POSTCOPY_RUN: lambda payload, where: RunReceived(),
    Command.POSTCOPY_RAM_DISCARD: _discard,
    Command.POSTCOPY_RESUME: lambda payload, where: ResumeReceived(),
    Command.RECV_BITMAP: _recvBitmap,
}


def decodeCommand(command: Command, payload: bytes, where: int) -> CommandEvent:
    """
    Decode a command's payload (PACKAGED is the stream decoder's).

    @param command: a command accepted by L{checkCommandHeader}.
    @param payload: its payload.
    @param where: the element's stream offset.
    @return: the event.
    """
    return _PARSERS[command](payload, where)


def readCommand(buffer: ReceiveBuffer, maxPackageSize: int) -> CommandEvent | NeedData:
    """
    Read the command element at the buffer's position.

    @param buffer: the receive buffer.
    @param maxPackageSize: the largest PACKAGED body accepted.
    @return: its event (PACKAGED with the package bytes), or L{NEED_DATA}.
    @raise LimitExceededError: for a package over the limit.
    """
    if not buffer.ensure(5):
        return NEED_DATA
    where = buffer.position
    cmd, length = _lengths.unpack_from(buffer.data, buffer.offset + 1)
    command = checkCommandHeader(cmd, length, where)
    if not buffer.ensure(5 + length):
        return NEED_DATA
    payload = bytes(buffer.view[buffer.offset + 5:buffer.offset + 5 + length])
    if command is not Command.PACKAGED:
        event = decodeCommand(command, payload, where)
        buffer.advance(5 + length)
        return event
    size = int.from_bytes(payload, "big")
    if size > maxPackageSize:
        raise LimitExceededError(f"package of {size} bytes exceeds the limit {maxPackageSize}", where,
                                 "max-package-size")
    if not buffer.ensure(9 + size):
        return NEED_DATA
    data = bytes(buffer.view[buffer.offset + 9:buffer.offset + 9 + size])
    buffer.advance(9 + size)
    return PackageReceived(data)


def checkDiscardRanges(event: DiscardReceived, lengths: dict[str, int], where: int) -> None:
    """
    Check a discard against the START block list (when there is one).

    @param event: the decoded discard.
    @param lengths: used length of each listed block (empty: unchecked).
    @param where: the element's stream offset.
    @raise BadRAMRecordError: for an unknown block or a range beyond it.
    """
    if not lengths:
        return
    if event.block not in lengths:
        raise BadRAMRecordError(f"POSTCOPY_RAM_DISCARD of unknown RAMBlock {event.block!r}", where)
    for start, length in event.ranges:
        if start + length > lengths[event.block]:
            raise BadRAMRecordError(
                f"discard range (0x{start:x}, 0x{length:x}) beyond block {event.block!r} "
                f"of length 0x{lengths[event.block]:x}", where)


def encodeCommand(command: Command, payload: bytes = b"") -> bytes:
    """
    @param command: the command.
    @param payload: its payload (at most 65535 bytes).
    @return: the C{QEMU_VM_COMMAND} element.
    @raise LocalProtocolError: for a payload over 65535 bytes.
    """
    if len(payload) > 0xFFFF:
        raise LocalProtocolError(f"{Command(command).name} payload of {len(payload)} bytes exceeds 65535")
    return _commandHeader.pack(SectionType.COMMAND, command, len(payload)) + payload


def encodeDiscard(block: str, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> bytes:
    """
    @param block: the RAMBlock idstr.
    @param ranges: C{(start, length)} byte ranges, at least one.
    @return: one POSTCOPY_RAM_DISCARD command.
    @raise LocalProtocolError: for no range.
    """
    if not ranges:
        raise LocalProtocolError("POSTCOPY_RAM_DISCARD needs at least one range")
    body = b"".join(struct.pack(">QQ", start, length) for start, length in ranges)
    payload = bytes((POSTCOPY_RAM_DISCARD_VERSION,)) + encodeStr8(block) + b"\x00" + body
    return encodeCommand(Command.POSTCOPY_RAM_DISCARD, payload)


def encodeAdvise(pageSizeSummary: int | None, targetPageSize: int | None) -> bytes:
    """
    @param pageSizeSummary: OR of the block page sizes (L{None}: 0-byte form).
    @param targetPageSize: the target page size (L{None}: 0-byte form).
    @return: the POSTCOPY_ADVISE command.
    """
    if pageSizeSummary is None or targetPageSize is None:
        return encodeCommand(Command.POSTCOPY_ADVISE)
    return encodeCommand(Command.POSTCOPY_ADVISE, struct.pack(">QQ", pageSizeSummary, targetPageSize))


def encodePackaged(data: bytes) -> bytes:
    """
    @param data: the package (a header-less stream).
    @return: the PACKAGED command followed by the package.
    """
    return encodeCommand(Command.PACKAGED, struct.pack(">I", len(data))) + data


def encodeCommandEvent(event: CommandEvent) -> bytes:
    """
    Re-encode a decoded command event.

    @param event: the event.
    @return: its bytes.
    """
    if isinstance(event, PingReceived):
        return encodeCommand(Command.PING, struct.pack(">I", event.value))
    if isinstance(event, PostcopyAdvised):
        return encodeAdvise(event.pageSizeSummary, event.targetPageSize)
    if isinstance(event, DiscardReceived):
        return encodeDiscard(event.block, event.ranges)
    if isinstance(event, PackageReceived):
        return encodePackaged(event.data)
    if isinstance(event, RecvBitmapRequested):
        return encodeCommand(Command.RECV_BITMAP, encodeStr8(event.block))
    return encodeCommand(_EMPTY[type(event)])


_EMPTY: dict[type, Command] = {
    ReturnPathOpened: Command.OPEN_RETURN_PATH,
    ListenReceived: Command.POSTCOPY_LISTEN,
    RunReceived: Command.POSTCOPY_RUN,
    ResumeReceived: Command.POSTCOPY_RESUME,
}


#: The PING value QEMU 7.2 sends inside a package, between the device state
#: and POSTCOPY_RUN.
PACKAGE_PING_VALUE: Final = 3
#: The first bytes of every 7.2 package: POSTCOPY_LISTEN.
PACKAGE_HEAD: Final = encodeCommand(Command.POSTCOPY_LISTEN)
#: The last bytes of every 7.2 package: PING(3), POSTCOPY_RUN.
PACKAGE_TAIL: Final = (encodeCommand(Command.PING, struct.pack(">I", PACKAGE_PING_VALUE))
                       + encodeCommand(Command.POSTCOPY_RUN))


def encodePackageBody(devices: bytes) -> bytes:
    """
    @param devices: the device sections (FULL) to load at RUN.
    @return: a package as QEMU 7.2 lays it out: LISTEN, the device
        sections, PING(3), RUN (to wrap in L{encodePackaged}).
    """
    return PACKAGE_HEAD + devices + PACKAGE_TAIL
