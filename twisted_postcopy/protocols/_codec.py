# -*- test-case-name: tests.test_protocols_codec -*-
"""
Interim wire codec of the engine: the subset of QEMU 7.2's main stream and
return path the engine needs, until C{twisted_postcopy.wire} lands (then
the protocols switch to it and this module goes away).

Encoding follows migration-stream.md sections 1-4 and
return-path-preempt-recovery.md 1.2-1.3.  Decoding is a generator parser:
each grammar step yields how many bytes it needs and receives exactly those
bytes, so input may arrive in chunks of any size (down to one byte) and at
most one element is buffered.
"""

from __future__ import annotations

import struct
from typing import Generator, Iterable

from twisted_postcopy.errors import RemoteProtocolError, UnsupportedFeatureError

MAGIC, VERSION = 0x5145564D, 3
EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIGURATION, COMMAND = range(9)
FOOTER = 0x7E
(CMD_OPEN_RETURN_PATH, CMD_PING, CMD_ADVISE, CMD_LISTEN, CMD_RUN, CMD_DISCARD,
 CMD_PACKAGED) = range(1, 8)
ZERO, MEM_SIZE, PAGE, EOS, CONTINUE = 0x2, 0x4, 0x8, 0x10, 0x20
RP_SHUT, RP_PONG, RP_REQ_PAGES_ID, RP_REQ_PAGES = 1, 2, 3, 4
PAGE_MASK = ~0xFFF
#: The 14 bytes every 7.2 package ends with: PING(3), RUN.
PACKAGE_TAIL = bytes.fromhex("0800020004000000030800050000")
_LISTEN = bytes.fromhex("0800040000")
_RP_MAX = 512

Parser = Generator[int, bytes, None]


def str8(text: str) -> bytes:
    """
    @param text: an id string.
    @return: its C{str8} encoding.
    """
    raw = text.encode()
    return bytes([len(raw)]) + raw


def command(cmd: int, payload: bytes = b"") -> bytes:
    """
    @param cmd: the MIG_CMD number.
    @param payload: its payload.
    @return: the QEMU_VM_COMMAND element.
    """
    return struct.pack(">BHH", COMMAND, cmd, len(payload)) + payload


def header(machine: str) -> bytes:
    """
    @param machine: the machine type name.
    @return: magic, version and the configuration section.
    """
    name = machine.encode()
    return struct.pack(">IIBI", MAGIC, VERSION, CONFIGURATION, len(name)) + name


def sectionHeader(kind: int, sectionId: int, idstr: str = "", instance: int = 0,
                  version: int = 0) -> bytes:
    """
    @param kind: START, PART, END or FULL.
    @param sectionId: the section id.
    @param idstr: START/FULL only: the device name.
    @param instance: START/FULL only: the instance id.
    @param version: START/FULL only: the version id.
    @return: the section header bytes.
    """
    if kind in (PART, END):
        return struct.pack(">BI", kind, sectionId)
    return struct.pack(">BI", kind, sectionId) + str8(idstr) + struct.pack(">II", instance, version)


def footer(sectionId: int) -> bytes:
    """
    @param sectionId: the section id.
    @return: the section footer.
    """
    return struct.pack(">BI", FOOTER, sectionId)


def ramList(blocks: Iterable[tuple[str, int]]) -> bytes:
    """
    @param blocks: (idstr, used length) in list order.
    @return: the RAM START payload (MEM_SIZE list and EOS).
    """
    blocks = list(blocks)
    body = [struct.pack(">Q", sum(length for _, length in blocks) | MEM_SIZE)]
    body += [str8(name) + struct.pack(">Q", length) for name, length in blocks]
    body.append(struct.pack(">Q", EOS))
    return b"".join(body)


def recordHeader(offset: int, flags: int, idstr: str | None) -> bytes:
    """
    @param offset: byte offset in the block.
    @param flags: RAM_SAVE_FLAG_* (CONTINUE is added when C{idstr} is None).
    @param idstr: the block name, or None for CONTINUE.
    @return: the record word and optional name.
    """
    if idstr is None:
        return struct.pack(">Q", offset | flags | CONTINUE)
    return struct.pack(">Q", offset | flags) + str8(idstr)


def discard(idstr: str, ranges: Iterable[tuple[int, int]]) -> bytes:
    """
    @param idstr: the block.
    @param ranges: (start, length) byte ranges (at most 12).
    @return: a POSTCOPY_RAM_DISCARD command.
    """
    body = b"\x00" + str8(idstr) + b"\x00"
    body += b"".join(struct.pack(">QQ", start, length) for start, length in ranges)
    return command(CMD_DISCARD, body)


def rpMessage(kind: int, payload: bytes) -> bytes:
    """
    @param kind: MIG_RP_MSG_* number.
    @param payload: its payload.
    @return: the return-path message.
    """
    return struct.pack(">HH", kind, len(payload)) + payload


def _be(data: bytes) -> int:
    """
    @param data: big-endian bytes.
    @return: their value.
    """
    return int.from_bytes(data, "big")


def returnPathParser(handler: object) -> Parser:
    """
    Parse the return path on the source.

    @param handler: has C{shut(value)}, C{pong(value)},
        C{pagesRequested(idstr or None, start, length)}.
    @return: a parser generator.
    """
    while True:
        kind, length = struct.unpack(">HH", (yield 4))
        if length > _RP_MAX:
            raise RemoteProtocolError(f"RP: Received invalid message 0x{kind:04x} length 0x{length:04x}")
        payload = (yield length) if length else b""
        if kind in (RP_SHUT, RP_PONG) and length != 4:
            raise RemoteProtocolError(f"RP: Received message 0x{kind:04x} with incorrect length {length} expecting 4")
        if kind == RP_SHUT:
            handler.shut(_be(payload))
        elif kind == RP_PONG:
            handler.pong(_be(payload))
        elif kind == RP_REQ_PAGES and length == 12:
            handler.pagesRequested(None, _be(payload[:8]), _be(payload[8:12]))
        elif kind == RP_REQ_PAGES_ID and length >= 13 and length == 13 + payload[12]:
            handler.pagesRequested(payload[13:].decode(), _be(payload[:8]), _be(payload[8:12]))
        else:
            raise RemoteProtocolError(f"RP: Received invalid message 0x{kind:04x} length 0x{length:04x}")


class ParserDriver:
    """
    Feeds a parser generator from chunks of any size.

    @ivar parser: the generator.
    @ivar buffer: bytes received and not yet consumed.
    @ivar need: how many bytes the parser waits for.
    @ivar finished: whether the parser returned.
    """

    def __init__(self, parser: Parser) -> None:
        """
        @param parser: a fresh parser generator.
        """
        self.parser = parser
        self.buffer = bytearray()
        self.finished = False
        self.need = next(parser)

    def receiveData(self, data: bytes) -> None:
        """
        Parse as much as C{data} completes.

        @param data: the next bytes.
        @raise twisted_postcopy.errors.ProtocolError: the bytes are invalid,
            or arrived after the end.
        """
        if self.finished:
            if data:
                raise RemoteProtocolError("data after the end of the stream")
            return
        buffer = self.buffer
        buffer += data
        position = 0
        try:
            while len(buffer) - position >= self.need:
                chunk = buffer[position : position + self.need]
                position += self.need
                self.need = self.parser.send(chunk)
        except StopIteration:
            self.finished = True
        finally:
            del buffer[:position]
