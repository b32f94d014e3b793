# -*- test-case-name: tests.test_wire_stream -*-
"""
Helpers shared by the wire codec tests: hex vectors and decoding with
every chunking.
"""

from __future__ import annotations

from typing import Any, Callable


def unhex(text: str) -> bytes:
    """
    @param text: hex digits with any whitespace.
    @return: the bytes.
    """
    return bytes.fromhex("".join(text.split()))


def decodeChunked(makeDecoder: Callable[[], Any], data: bytes, size: int, close: bool = True) -> list:
    """
    Feed C{data} in chunks of C{size} bytes, collecting events after each.

    @param makeDecoder: builds a fresh decoder.
    @param data: the input.
    @param size: the chunk size.
    @param close: whether to feed EOF at the end.
    @return: the events.
    """
    decoder = makeDecoder()
    events = []
    for start in range(0, len(data), size):
        decoder.receiveData(data[start:start + size])
        events.extend(decoder.events())
    if close:
        decoder.receiveData(b"")
        events.extend(decoder.events())
    return events


def decodeSplit(makeDecoder: Callable[[], Any], data: bytes, cuts: list[int]) -> list:
    """
    Feed C{data} split at the given offsets.

    @param makeDecoder: builds a fresh decoder.
    @param data: the input.
    @param cuts: split offsets (any order, any values within the data).
    @return: the events.
    """
    decoder = makeDecoder()
    events = []
    previous = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if cut <= previous:
            continue
        decoder.receiveData(data[previous:cut])
        events.extend(decoder.events())
        previous = cut
    decoder.receiveData(b"")
    events.extend(decoder.events())
    return events


def pageBytes(events: list) -> list:
    """
    Make events comparable: page views become bytes.

    @param events: decoded events.
    @return: a list of comparable tuples.
    """
    result = []
    for event in events:
        data = getattr(event, "data", None)
        result.append((event, bytes(data) if isinstance(data, memoryview) else None))
    return result


def globalstatePayload(state: bytes = b"running") -> bytes:
    """
    @param state: the run state name.
    @return: a C{globalstate} VMState payload (vector 7.J).
    """
    return (len(state) + 1).to_bytes(4, "big") + state.ljust(100, b"\x00")


def buildPostcopyStream(pages: int = 4) -> tuple[bytes, bytes]:
    """
    Build a postcopy main stream shaped like a QEMU 7.2 one (section 5.2 of
    migration-stream.md) with the encoder: commands, RAM START, a precopy
    PART, discards, a package (LISTEN, device sections, PING, RUN), a
    postcopy PART and END, EOF.

    @param pages: normal pages per RAM part.
    @return: the stream and its package.
    """
    from twisted_postcopy.wire.constants import SectionType
    from twisted_postcopy.wire.encoder import StreamEncoder
    from twisted_postcopy.wire.events import RAMBlockInfo

    encoder = StreamEncoder()
    blocks = [RAMBlockInfo("pc.ram", 0x100000), RAMBlockInfo("pc.bios", 0x40000)]
    ram = memoryview(bytes(range(256)) * 16 * pages)
    parts = [encoder.header("pc-i440fx-7.2"), encoder.openReturnPath(), encoder.ping(1),
             encoder.postcopyAdvise(), encoder.ramStart(2, blocks),
             encoder.sectionHeader(SectionType.SECTION_PART, 2)]
    for i in range(pages):
        parts.extend(encoder.page("pc.ram", i * 0x1000, ram[i * 4096:(i + 1) * 4096]))
    parts += [encoder.zeroPage("pc.ram", pages * 0x1000), encoder.zeroPage("pc.bios", 0),
              encoder.eos(), encoder.sectionFooter(2)]
    parts += [encoder.discard("pc.ram", [(0x10000, 0x1000), (0x20000, 0x3000)]),
              encoder.discard("pc.bios", [(0, 0x40000)]), encoder.ping(2)]
    timer = (encoder.sectionHeader(SectionType.SECTION_FULL, 0, "timer", 0, 2)
             + b"\x00" * 8 + unhex("7e 00 00 00 00 ff") + b"\x01" * 10 + encoder.sectionFooter(0))
    globalstate = (encoder.sectionHeader(SectionType.SECTION_FULL, 45, "globalstate", 0, 1)
                   + globalstatePayload() + encoder.sectionFooter(45))
    own = encoder.ownDeviceSection(46, "stress", b"\x7e\x00\x00\x00\x2e\x04 blob")
    package = encoder.listen() + timer + own + globalstate + encoder.ping(3) + encoder.run()
    parts += [encoder.packaged(package), encoder.ping(4)]
    encoder.resetLastBlock()
    parts.append(encoder.sectionHeader(SectionType.SECTION_PART, 2))
    for i in range(pages):
        parts.extend(encoder.page("pc.ram", 0x10000 + i * 0x1000, ram[i * 4096:(i + 1) * 4096]))
    parts += [encoder.eos(), encoder.sectionFooter(2), encoder.sectionHeader(SectionType.SECTION_END, 2),
              encoder.zeroPage("pc.bios", 0x1000), encoder.eos(), encoder.sectionFooter(2), encoder.eof()]
    return b"".join(bytes(part) for part in parts), package
