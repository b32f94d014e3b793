# -*- test-case-name: tests.test_protocols_stream -*-
"""
An independent builder of QEMU 7.2 wire bytes for tests (like the
C{FrameFactory} of Twisted's HTTP/2 tests): small functions written from
migration-stream.md, separate from L{twisted_postcopy.wire}, so that a bug
the product's encoder and decoder share cannot hide.
"""

from __future__ import annotations

import struct
from typing import Iterable




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


def ping(value: int) -> bytes:
    """
    @param value: the ping value.
    @return: a PING command.
    """
    return command(CMD_PING, struct.pack(">I", value))


def header(machine: str, configuration: bytes | None = None) -> bytes:
    """
    @param machine: the machine type name.
    @param configuration: the configuration section's bytes after its type
        byte (be32 length, name, subsections), sent verbatim; L{None} to
        build it from C{machine}.
    @return: magic, version and the configuration section.
    """
    if configuration is None:
        name = machine.encode("ascii")
        configuration = struct.pack(">I", len(name)) + name
    return struct.pack(">IIB", MAGIC, VERSION, CONFIGURATION) + configuration


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
