# -*- test-case-name: tests.test_protocols_codec -*-
"""
Interim decoder of QEMU 7.2's main migration stream (destination side),
until C{twisted_postcopy.wire.StreamDecoder} lands.

L{streamParser} is a generator grammar (see L{twisted_postcopy.protocols._codec});
L{ParserDriver} feeds it bytes in chunks of any size.  Device sections are
taken as opaque bytes: inside a package everything between LISTEN and the
7.2 tail (PING 3, RUN); in precopy only our own C{twisted-postcopy/*}
sections (C{be32 len} + blob), since QEMU's own are not length-framed.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from twisted_postcopy.errors import LimitExceededError, RemoteProtocolError, UnsupportedFeatureError
from twisted_postcopy.protocols import _codec as c

#: Largest device blob accepted in precopy.
MAX_DEVICE = 1 << 28
_OWN = "twisted-postcopy/"


def _u(fmt: str, data: bytes) -> int:
    """
    @param fmt: a one-field struct format.
    @param data: its bytes.
    @return: the value.
    """
    return struct.unpack(fmt, data)[0]


def _str8() -> c.Parser:
    """
    @return: (as generator result) a decoded C{str8}.
    """
    length = (yield 1)[0]
    if not length:
        raise RemoteProtocolError("empty id string")
    return (yield length).decode()


def _footer(sectionId: int) -> c.Parser:
    """
    Read and check a section footer.

    @param sectionId: the expected id.
    """
    data = yield 5
    if data[0] != c.FOOTER:
        raise RemoteProtocolError("Missing section footer")
    if _u(">I", data[1:]) != sectionId:
        raise RemoteProtocolError("Mismatched section id in footer")


def _package(handler: Any, package: bytes) -> None:
    """
    Process a 7.2 package: LISTEN, device sections, PING(3), RUN.

    @param handler: the incoming migration.
    @param package: the package bytes.
    """
    if not (package.startswith(c._LISTEN) and package.endswith(c.PACKAGE_TAIL)):
        raise UnsupportedFeatureError("package does not have QEMU 7.2's LISTEN ... PING(3) RUN layout")
    handler.listen()
    raw = package[len(c._LISTEN) : -len(c.PACKAGE_TAIL)]
    if raw:
        handler.deviceState(raw)
    handler.ping(3)
    handler.run()


def _command(handler: Any) -> c.Parser:
    """
    One QEMU_VM_COMMAND after its type byte.

    @param handler: the incoming migration.
    """
    cmd, length = struct.unpack(">HH", (yield 4))
    payload = (yield length) if length else b""
    fixed = {c.CMD_OPEN_RETURN_PATH: 0, c.CMD_PING: 4, c.CMD_LISTEN: 0, c.CMD_RUN: 0,
             c.CMD_PACKAGED: 4, c.CMD_ADVISE: 16}
    if cmd in fixed and fixed[cmd] != length:
        raise RemoteProtocolError(f"MIG_CMD {cmd} with bad length {length}")
    if cmd == c.CMD_OPEN_RETURN_PATH:
        handler.openReturnPath()
    elif cmd == c.CMD_PING:
        handler.ping(_u(">I", payload))
    elif cmd == c.CMD_ADVISE:
        handler.advise(*struct.unpack(">QQ", payload))
    elif cmd == c.CMD_DISCARD:
        handler.discard(*_discardPayload(payload))
    elif cmd == c.CMD_LISTEN:
        handler.listen()
    elif cmd == c.CMD_RUN:
        handler.run()
    elif cmd == c.CMD_PACKAGED:
        _package(handler, bytes((yield _u(">I", payload))))
    else:
        raise RemoteProtocolError(f"MIG_CMD 0x{cmd:x} unknown")


def _discardPayload(payload: bytes) -> tuple[str, list[tuple[int, int]]]:
    """
    @param payload: a POSTCOPY_RAM_DISCARD payload.
    @return: (idstr, ranges).
    @raise RemoteProtocolError: malformed.
    """
    if len(payload) < 20 or payload[0] != 0:
        raise RemoteProtocolError("bad POSTCOPY_RAM_DISCARD")
    size = payload[1]
    rest = payload[2 + size :]
    if rest[:1] != b"\x00" or (len(rest) - 1) % 16:
        raise RemoteProtocolError("bad POSTCOPY_RAM_DISCARD ranges")
    ranges = [struct.unpack(">QQ", rest[i : i + 16]) for i in range(1, len(rest), 16)]
    return payload[2 : 2 + size].decode(), ranges


def _ramList(handler: Any) -> c.Parser:
    """
    The RAM START payload.

    @param handler: the incoming migration.
    """
    word = _u(">Q", (yield 8))
    if word & ~c.PAGE_MASK != c.MEM_SIZE:
        raise RemoteProtocolError("RAM START without MEM_SIZE")
    total, seen, blocks = word & c.PAGE_MASK, 0, []
    while seen < total:
        name = yield from _str8()
        length = _u(">Q", (yield 8))
        blocks.append((name, length, None))
        seen += length
    if _u(">Q", (yield 8)) != c.EOS:
        raise RemoteProtocolError("RAM START not ended by EOS")
    handler.ramBlocksListed(blocks)


def _ramRecords(handler: Any, last: list[str | None]) -> c.Parser:
    """
    RAM records up to EOS.

    @param handler: the incoming migration.
    @param last: one-element list holding the CONTINUE block (persists
        across sections).
    """
    while True:
        word = _u(">Q", (yield 8))
        flags, offset = word & ~c.PAGE_MASK, word & c.PAGE_MASK
        if flags == c.EOS:
            return
        if flags & c.CONTINUE:
            if last[0] is None:
                raise RemoteProtocolError("Ack, bad migration stream!")
        else:
            last[0] = yield from _str8()
        kind = flags & ~c.CONTINUE
        if kind == c.ZERO:
            handler.zero(last[0], offset, (yield 1)[0])
        elif kind == c.PAGE:
            handler.page(last[0], offset, (yield 4096))
        else:
            raise UnsupportedFeatureError(f"RAM record flags {flags:#x} (only PAGE, ZERO)")


def _section(handler: Any, kind: int, ramId: list[int | None], last: list[str | None]) -> c.Parser:
    """
    One section after its type byte.

    @param handler: the incoming migration.
    @param kind: START, PART, END or FULL.
    @param ramId: one-element list holding the RAM section id.
    @param last: the CONTINUE block holder.
    """
    sectionId = _u(">I", (yield 4))
    if kind in (c.PART, c.END):
        if sectionId != ramId[0]:
            raise RemoteProtocolError(f"Unknown section id {sectionId}")
        yield from _ramRecords(handler, last)
        yield from _footer(sectionId)
        return
    idstr = yield from _str8()
    instance, version = struct.unpack(">II", (yield 8))
    if idstr == "ram":
        if kind != c.START or version != 4:
            raise RemoteProtocolError("ram section must be START version 4")
        ramId[0] = sectionId
        yield from _ramList(handler)
        yield from _footer(sectionId)
        return
    if not idstr.startswith(_OWN):
        raise UnsupportedFeatureError(f"precopy device section {idstr!r} cannot be delimited")
    size = _u(">I", (yield 4))
    if size > MAX_DEVICE:
        raise LimitExceededError(f"device section of {size} bytes")
    blob = yield size
    yield from _footer(sectionId)
    head = c.sectionHeader(kind, sectionId, idstr, instance, version)
    handler.deviceState(head + struct.pack(">I", size) + bytes(blob) + c.footer(sectionId))


def streamParser(handler: Any, inPostcopy: Callable[[], bool]) -> c.Parser:
    """
    The whole main stream, header to EOF (and vmdesc in precopy).

    @param handler: the incoming migration.
    @param inPostcopy: tells whether LISTEN was processed.
    """
    magic, version, conf, size = struct.unpack(">IIBI", (yield 13))
    if magic != c.MAGIC or version != c.VERSION or conf != c.CONFIGURATION:
        raise RemoteProtocolError("bad stream header")
    yield size
    ramId: list[int | None] = [None]
    last: list[str | None] = [None]
    while True:
        kind = (yield 1)[0]
        if kind == c.COMMAND:
            yield from _command(handler)
        elif kind in (c.START, c.PART, c.END, c.FULL):
            yield from _section(handler, kind, ramId, last)
        elif kind == c.EOF:
            break
        else:
            raise RemoteProtocolError(f"Unknown savevm section type {kind}")
    if not inPostcopy():
        if (yield 1)[0] == c.VMDESC:
            yield _u(">I", (yield 4))
    handler.eof()
