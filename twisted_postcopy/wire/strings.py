# -*- test-case-name: tests.test_wire_ram -*-
"""
C{str8} id strings: a C{u8} length and that many bytes, no NUL; and the
length checks the decoders share.

Names are L{str} decoded as UTF-8 with C{surrogateescape}, so any byte
string round-trips exactly.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

from twisted_postcopy.errors import BadLengthError, LocalProtocolError
from twisted_postcopy.wire.constants import MAX_IDSTR_LENGTH

_KindT = TypeVar("_KindT")


def decodeName(raw: bytes | memoryview) -> str:
    """
    @param raw: the bytes of an id string.
    @return: the name.
    """
    return bytes(raw).decode("utf-8", "surrogateescape")


def encodeName(name: str) -> bytes:
    """
    @param name: a name.
    @return: its bytes.
    """
    return name.encode("utf-8", "surrogateescape")


def encodeStr8(name: str) -> bytes:
    """
    @param name: an id string.
    @return: its C{str8} encoding.
    @raise LocalProtocolError: if it is empty or longer than 255 bytes.
    """
    raw = encodeName(name)
    if not 1 <= len(raw) <= MAX_IDSTR_LENGTH:
        raise LocalProtocolError(f"id string {name!r} must be 1..255 bytes long")
    return bytes((len(raw),)) + raw


def checkStr8Length(length: int, what: str, offset: int) -> None:
    """
    Reject an empty id string, as QEMU's C{qemu_get_counted_string} does.

    @param length: the C{u8} length read.
    @param what: what the id string names, for the message.
    @param offset: the stream offset of the length byte.
    @raise BadLengthError: if C{length} is 0.
    """
    if length == 0:
        raise BadLengthError(f"empty {what} id string (expected 1..255 bytes)", offset)


def checkFixedLength(table: Mapping[_KindT, int | None], kind: _KindT, length: int,
                     what: str, offset: int) -> None:
    """
    Check a payload length against a table of fixed lengths (QEMU's
    C{mig_cmd_args} for commands, the return path's message lengths).

    @param table: the exact length of each kind, L{None} for variable.
    @param kind: the element's kind (a key of C{table}).
    @param length: the length read.
    @param what: the element's name, for the message.
    @param offset: the element's stream offset.
    @raise BadLengthError: if C{kind} has a fixed length other than
        C{length}.
    """
    expected = table[kind]
    if expected is not None and length != expected:
        raise BadLengthError(f"{what} with length {length} (expected {expected})", offset)


def isPlausibleIdstr(raw: bytes | memoryview) -> bool:
    """
    @param raw: the bytes of a candidate section idstr.
    @return: whether they are 1..255 printable ASCII characters.
    """
    return len(raw) > 0 and all(0x20 <= byte < 0x7F for byte in raw)
