# -*- test-case-name: tests.test_inspect -*-
"""
C{postcopy inspect [--json] FILE}: summarize a recorded migration stream.

The file is streamed in chunks through L{StreamDecoder}; packages are
decoded with a nested header-less decoder.  It reads precopy streams
(C{migrate exec:cat > FILE}) and the main stream of a postcopy migration
recorded by a relay (no vmdesc).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, BinaryIO, Callable, Iterable, TextIO

from attrs import define, field

from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.wire.commands import CommandEvent
from twisted_postcopy.wire.constants import Command
from twisted_postcopy.wire.events import (
    ConfigurationReceived,
    DeviceSectionReceived,
    DiscardReceived,
    EOFReceived,
    HeaderReceived,
    ListenReceived,
    PackageReceived,
    PageReceived,
    PingReceived,
    PostcopyAdvised,
    RAMBlocksListed,
    RecvBitmapRequested,
    ResumeReceived,
    ReturnPathOpened,
    RunReceived,
    SectionStarted,
    StreamEvent,
    VMDescriptionReceived,
    ZeroPageReceived,
)
from twisted_postcopy.wire.stream import iterChunks

#: How many bytes are read from the file at a time.
CHUNK_SIZE = 1 << 20

_COMMAND_NAMES: dict[type, Command] = {
    ReturnPathOpened: Command.OPEN_RETURN_PATH, PingReceived: Command.PING,
    PostcopyAdvised: Command.POSTCOPY_ADVISE, ListenReceived: Command.POSTCOPY_LISTEN,
    RunReceived: Command.POSTCOPY_RUN, DiscardReceived: Command.POSTCOPY_RAM_DISCARD,
    PackageReceived: Command.PACKAGED, ResumeReceived: Command.POSTCOPY_RESUME,
    RecvBitmapRequested: Command.RECV_BITMAP,
}


@define
class StreamSummary:
    """
    What a stream contains, accumulated event by event.

    @ivar version: the file version, or L{None} without a header.
    @ivar machine: the machine type.
    @ivar ramBlocks: C{{id, length}} of the START list.
    @ivar zeroPages: the number of ZERO records.
    @ivar normalPages: the number of PAGE records.
    @ivar commands: command names in stream order, package contents included.
    @ivar sections: one C{{id, section_id, instance, version, type, in_package}}
        per section element.
    @ivar pings: PING values in order.
    @ivar discards: C{{block, ranges}} per DISCARD command.
    @ivar packages: C{{length, sections, commands}} per package.
    @ivar complete: whether QEMU_VM_EOF was seen.
    @ivar vmdescLength: the VMDESCRIPTION length, or L{None}.
    @ivar error: the decoding error, if any.
    """

    version: int | None = None
    machine: str | None = None
    ramBlocks: list[dict[str, Any]] = field(factory=list)
    zeroPages: int = 0
    normalPages: int = 0
    commands: list[str] = field(factory=list)
    sections: list[dict[str, Any]] = field(factory=list)
    pings: list[int] = field(factory=list)
    discards: list[dict[str, Any]] = field(factory=list)
    packages: list[dict[str, Any]] = field(factory=list)
    complete: bool = False
    vmdescLength: int | None = None
    error: str | None = None

    def observe(self, event: StreamEvent, package: dict[str, Any] | None = None) -> None:
        """
        Account for one event (one entry of L{_OBSERVERS} per event type;
        events nothing is counted for are ignored).

        @param event: a decoded event.
        @param package: the package summary when the event is inside one.
        """
        observer = _OBSERVERS.get(type(event))
        if observer is not None:
            observer(self, event, package)

    def _page(self, event: PageReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: a PAGE record.
        @param package: unused.
        """
        self.normalPages += 1

    def _zeroPage(self, event: ZeroPageReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: a ZERO record.
        @param package: unused.
        """
        self.zeroPages += 1

    def _header(self, event: HeaderReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: the file header.
        @param package: unused.
        """
        self.version = event.version

    def _configuration(self, event: ConfigurationReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: the configuration section.
        @param package: unused.
        """
        self.machine = event.machine

    def _ramBlocks(self, event: RAMBlocksListed, package: dict[str, Any] | None) -> None:
        """
        @param event: the RAM START block list.
        @param package: unused.
        """
        self.ramBlocks = [{"id": block.idstr, "length": block.length} for block in event.blocks]

    def _eof(self, event: EOFReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: QEMU_VM_EOF.
        @param package: the enclosing package, if any (a package's own EOF
            does not complete the stream).
        """
        if package is None:
            self.complete = True

    def _vmdesc(self, event: VMDescriptionReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: the VMDESCRIPTION.
        @param package: unused.
        """
        self.vmdescLength = len(event.json)

    def _command(self, event: CommandEvent, package: dict[str, Any] | None) -> None:
        """
        @param event: a command event.
        @param package: the enclosing package summary, if any.
        """
        name = _COMMAND_NAMES[type(event)].name
        self.commands.append(name)
        if package is not None:
            package["commands"].append(name)
        detail = _COMMAND_DETAILS.get(type(event))
        if detail is not None:
            detail(self, event)

    def _package(self, data: bytes) -> None:
        """
        Decode a package with a nested decoder.

        @param data: the package bytes.
        """
        package: dict[str, Any] = {"length": len(data), "sections": [], "commands": []}
        self.packages.append(package)
        for inner in iterChunks((data,), header=False):
            self.observe(inner, package)

    def _section(self, event: SectionStarted | DeviceSectionReceived, package: dict[str, Any] | None) -> None:
        """
        @param event: a RAM section header or a device section.
        @param package: the enclosing package summary, if any.
        """
        self.sections.append({
            "id": event.idstr, "section_id": event.sectionId, "instance": event.instanceId,
            "version": event.versionId, "type": event.kind.name.replace("SECTION_", ""),
            "in_package": package is not None})
        if package is not None:
            package["sections"].append(event.idstr)

    def toJSON(self) -> dict[str, Any]:
        """
        @return: the C{--json} object.
        """
        return {
            "version": self.version, "machine": self.machine, "ram_blocks": self.ramBlocks,
            "pages": {"zero": self.zeroPages, "normal": self.normalPages},
            "commands": self.commands, "sections": self.sections, "pings": self.pings,
            "discards": self.discards, "package": self.packages[0] if self.packages else None,
            "packages": self.packages, "postcopy": "POSTCOPY_LISTEN" in self.commands,
            "complete": self.complete, "vmdesc_length": self.vmdescLength, "error": self.error,
        }

    def render(self) -> str:
        """
        @return: the human-readable summary.
        """
        lines = [f"stream version {self.version}, machine {self.machine}"]
        lines.append(f"RAM blocks ({len(self.ramBlocks)}):")
        lines += [f"  {b['id']:<32} {b['length']:#12x}" for b in self.ramBlocks]
        lines.append(f"pages: {self.normalPages} normal, {self.zeroPages} zero")
        lines.append("commands: " + (" ".join(self.commands) or "none"))
        devices = [s for s in self.sections if s["id"] != "ram"]
        ram = len(self.sections) - len(devices)
        lines.append(f"sections: {ram} RAM, {len(devices)} device")
        for package in self.packages:
            lines.append(f"package: {package['length']} bytes, {len(package['sections'])} sections, "
                         f"commands {' '.join(package['commands'])}")
        if self.discards:
            ranges = sum(len(d["ranges"]) for d in self.discards)
            lines.append(f"discards: {len(self.discards)} commands, {ranges} ranges")
        lines.append(f"complete: {'yes' if self.complete else 'no'}"
                     + (f", vmdesc {self.vmdescLength} bytes" if self.vmdescLength is not None else ""))
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


#: What a command adds besides its name.
_COMMAND_DETAILS: dict[type, Callable[[StreamSummary, Any], None]] = {
    PingReceived: lambda summary, event: summary.pings.append(event.value),
    DiscardReceived: lambda summary, event: summary.discards.append(
        {"block": event.block, "ranges": [list(r) for r in event.ranges]}),
    PackageReceived: lambda summary, event: summary._package(event.data),
}

#: The summary's observer of each event type.
_OBSERVERS: dict[type, Callable[[StreamSummary, Any, dict[str, Any] | None], None]] = {
    PageReceived: StreamSummary._page,
    ZeroPageReceived: StreamSummary._zeroPage,
    SectionStarted: StreamSummary._section,
    DeviceSectionReceived: StreamSummary._section,
    HeaderReceived: StreamSummary._header,
    ConfigurationReceived: StreamSummary._configuration,
    RAMBlocksListed: StreamSummary._ramBlocks,
    EOFReceived: StreamSummary._eof,
    VMDescriptionReceived: StreamSummary._vmdesc,
    **{kind: StreamSummary._command for kind in _COMMAND_NAMES},
}


def summarize(chunks: Iterable[bytes], header: bool = True) -> StreamSummary:
    """
    Decode a stream and summarize it; a decoding error is recorded.

    @param chunks: the stream's bytes, in order.
    @param header: whether the stream starts with a header.
    @return: the summary.
    """
    summary = StreamSummary()
    try:
        for event in iterChunks(chunks, header=header):
            summary.observe(event)
    except RemoteProtocolError as e:
        summary.error = f"{type(e).__name__}: {e}"
    return summary


def readChunks(f: BinaryIO, size: int = CHUNK_SIZE) -> Iterable[bytes]:
    """
    @param f: a binary file.
    @param size: the chunk size.
    @return: an iterator of its chunks.
    """
    while chunk := f.read(size):
        yield chunk


def inspectCommand(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """
    Run C{postcopy inspect}.

    @param args: parsed arguments (C{file}, C{json}, C{no_header}).
    @param out: where to print.
    @return: 0, or 1 if the stream was malformed.
    """
    with open(args.file, "rb") as f:
        summary = summarize(readChunks(f), header=not args.no_header)
    if args.json:
        out.write(json.dumps(summary.toJSON()) + "\n")
    else:
        out.write(summary.render() + "\n")
    return 1 if summary.error else 0


def register(subparsers: Any) -> None:
    """
    Add the C{inspect} subcommand.

    @param subparsers: the C{postcopy} subparsers.
    """
    parser = subparsers.add_parser(
        "inspect", help="summarize a recorded QEMU 7.2 migration stream",
        description="Decode a migration stream file and summarize it.")
    parser.add_argument("file", metavar="FILE", help="the recorded main stream")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-header", action="store_true",
                        help="the file has no header (a package or a recovery channel)")
    parser.set_defaults(func=inspectCommand)
