# -*- test-case-name: tests.test_wire_encoder -*-
"""
The encoder of QEMU 7.2's main migration stream.

Methods return L{bytes}, except page records, which return a list of
buffers (the record header and the caller's page view, never copied) for
C{socket.sendmsg} / C{transport.writeSequence}.  The encoder keeps the
CONTINUE "last block" across sections like QEMU's C{last_sent_block}.

L{encodeEvents} re-encodes decoded events byte for byte.
"""

from __future__ import annotations

import struct
from typing import Iterable

from attrs import define

from twisted_postcopy.wire.commands import (
    encodeAdvise,
    encodeCommand,
    encodeCommandEvent,
    encodeDiscard,
    encodePackageBody,
    encodePackaged,
)
from twisted_postcopy.wire.config import encodeConfigurationEvent, encodeHeader, encodeHeaderEvent
from twisted_postcopy.wire.constants import (
    FULL_HEADER_KINDS,
    MAX_DISCARDS_PER_COMMAND,
    OWN_SECTION_PREFIX,
    RAM_IDSTR,
    RAM_SECTION_VERSION,
    Command,
    SectionType,
)
from twisted_postcopy.wire.device import footerBytes
from twisted_postcopy.wire.events import (
    ConfigurationReceived,
    DeviceSectionReceived,
    EOFReceived,
    HeaderReceived,
    PageReceived,
    RAMRecordsReceived,
    RAMBlockInfo,
    RAMBlocksListed,
    RAMSectionEOS,
    SectionEnded,
    SectionStarted,
    StreamEvent,
    VMDescriptionReceived,
    ZeroPageReceived,
)
from twisted_postcopy.errors import LocalProtocolError
from twisted_postcopy.wire.ram import Buffers, RAMChannelEncoder, encodeBlockList
from twisted_postcopy.wire.strings import encodeStr8


def encodeSectionHeader(kind: SectionType, sectionId: int, idstr: str = "",
                        instanceId: int = 0, versionId: int = 0) -> bytes:
    """
    @param kind: START, PART, END or FULL.
    @param sectionId: the section id.
    @param idstr: the idstr (START/FULL only).
    @param instanceId: the instance id (START/FULL only).
    @param versionId: the version id (START/FULL only).
    @return: the section header.
    """
    if kind in FULL_HEADER_KINDS:
        return (struct.pack(">BI", kind, sectionId) + encodeStr8(idstr)
                + struct.pack(">II", instanceId, versionId))
    return struct.pack(">BI", kind, sectionId)


@define
class StreamEncoder(RAMChannelEncoder):
    """
    Builds a main stream element by element; the RAM record methods
    (C{page}, C{zeroPage}, C{eos}, C{resetLastBlock}) come from
    L{RAMChannelEncoder}.

    @ivar alwaysNameBlock: never use CONTINUE (valid, only larger).
    """

    def header(self, machine: str, subsections: bytes = b"", configuration: bytes | None = None) -> bytes:
        """
        @param machine: the machine type name.
        @param subsections: raw configuration subsections.
        @param configuration: the configuration element after its type byte,
            sent verbatim instead of one built from C{machine}.
        @return: magic, version and configuration.
        """
        return encodeHeader(machine, subsections, configuration)

    def command(self, command: Command, payload: bytes = b"") -> bytes:
        """
        @param command: any command.
        @param payload: its payload.
        @return: the command element.
        """
        return encodeCommand(command, payload)

    def openReturnPath(self) -> bytes:
        """
        @return: OPEN_RETURN_PATH.
        """
        return encodeCommand(Command.OPEN_RETURN_PATH)

    def ping(self, value: int) -> bytes:
        """
        @param value: the value the PONG echoes.
        @return: PING.
        """
        return encodeCommand(Command.PING, struct.pack(">I", value))

    def postcopyAdvise(self, pageSizeSummary: int | None = 4096, targetPageSize: int | None = 4096) -> bytes:
        """
        @param pageSizeSummary: OR of all block page sizes (L{None}: 0-byte form).
        @param targetPageSize: the target page size.
        @return: POSTCOPY_ADVISE.
        """
        return encodeAdvise(pageSizeSummary, targetPageSize)

    def listen(self) -> bytes:
        """
        @return: POSTCOPY_LISTEN.
        """
        return encodeCommand(Command.POSTCOPY_LISTEN)

    def run(self) -> bytes:
        """
        @return: POSTCOPY_RUN.
        """
        return encodeCommand(Command.POSTCOPY_RUN)

    def discard(self, block: str, ranges: Iterable[tuple[int, int]],
                perCommand: int = MAX_DISCARDS_PER_COMMAND) -> bytes:
        """
        @param block: the RAMBlock idstr.
        @param ranges: C{(start, length)} byte ranges, at least one.
        @param perCommand: ranges per command (QEMU sends at most 12).
        @return: as many POSTCOPY_RAM_DISCARD commands as needed.
        """
        ranges = list(ranges)
        if not ranges:
            raise LocalProtocolError("POSTCOPY_RAM_DISCARD needs at least one range")
        return b"".join(encodeDiscard(block, ranges[i:i + perCommand])
                        for i in range(0, len(ranges), perCommand))

    def package(self, devices: bytes) -> bytes:
        """
        @param devices: the device sections to load at RUN.
        @return: the PACKAGED command carrying QEMU 7.2's package layout
            (LISTEN, the sections, PING(3), RUN).
        """
        return encodePackaged(encodePackageBody(devices))

    def packaged(self, package: bytes) -> bytes:
        """
        @param package: a header-less stream (LISTEN, FULL sections, PING, RUN).
        @return: PACKAGED followed by the package.
        """
        return encodePackaged(package)

    def resume(self) -> bytes:
        """
        @return: POSTCOPY_RESUME.
        """
        return encodeCommand(Command.POSTCOPY_RESUME)

    def recvBitmap(self, block: str) -> bytes:
        """
        @param block: the RAMBlock idstr.
        @return: RECV_BITMAP.
        """
        return encodeCommand(Command.RECV_BITMAP, encodeStr8(block))

    def sectionHeader(self, kind: SectionType, sectionId: int, idstr: str = "",
                      instanceId: int = 0, versionId: int = 0) -> bytes:
        """
        @param kind: START, PART, END or FULL.
        @param sectionId: the section id.
        @param idstr: the idstr (START/FULL).
        @param instanceId: the instance id (START/FULL).
        @param versionId: the version id (START/FULL).
        @return: the section header.
        """
        return encodeSectionHeader(kind, sectionId, idstr, instanceId, versionId)

    def sectionFooter(self, sectionId: int) -> bytes:
        """
        @param sectionId: the section id.
        @return: the footer C{7e be32 id}.
        """
        return footerBytes(sectionId)

    def ramStart(self, sectionId: int, blocks: Iterable[RAMBlockInfo]) -> bytes:
        """
        @param sectionId: the RAM section's id (QEMU uses 2 on C{pc}).
        @param blocks: the RAMBlocks to list.
        @return: the whole RAM START section (header, list, EOS, footer).
        """
        return (encodeSectionHeader(SectionType.SECTION_START, sectionId, RAM_IDSTR, 0, RAM_SECTION_VERSION)
                + encodeBlockList(blocks) + self._ram.eos() + footerBytes(sectionId))

    def ownDeviceSection(self, sectionId: int, guest: str, blob: bytes,
                         kind: SectionType = SectionType.SECTION_FULL) -> bytes:
        """
        @param sectionId: the section id.
        @param guest: the guest name (idstr C{twisted-postcopy/<guest>}).
        @param blob: the guest's device state.
        @param kind: the section type (FULL).
        @return: the section, payload C{be32 len} + blob.
        """
        return (encodeSectionHeader(kind, sectionId, OWN_SECTION_PREFIX + guest, 0, 1)
                + struct.pack(">I", len(blob)) + blob + footerBytes(sectionId))

    def eof(self) -> bytes:
        """
        @return: C{QEMU_VM_EOF}.
        """
        return bytes((SectionType.EOF,))

    def vmDescription(self, json: bytes = b"{}") -> bytes:
        """
        @param json: the JSON description.
        @return: C{QEMU_VM_VMDESCRIPTION}.
        """
        return struct.pack(">BI", SectionType.VMDESCRIPTION, len(json)) + json

    def encode(self, event: StreamEvent) -> Buffers:
        """
        Re-encode a decoded event exactly as it was received.

        @param event: any main-stream event.
        @return: its buffers.
        """
        if isinstance(event, (PageReceived, ZeroPageReceived, RAMRecordsReceived, RAMSectionEOS)):
            return self._ram.encode(event)
        return [self._encodeOther(event)]

    def _encodeOther(self, event: StreamEvent) -> bytes:
        """
        @param event: any event but a RAM record.
        @return: its bytes.
        """
        if isinstance(event, SectionStarted):
            return encodeSectionHeader(event.kind, event.sectionId, event.idstr,
                                       event.instanceId, event.versionId)
        if isinstance(event, RAMBlocksListed):
            return encodeBlockList(event.blocks)
        if isinstance(event, SectionEnded):
            return footerBytes(event.sectionId)
        if isinstance(event, DeviceSectionReceived):
            return event.raw
        if isinstance(event, HeaderReceived):
            return encodeHeaderEvent(event)
        if isinstance(event, ConfigurationReceived):
            return encodeConfigurationEvent(event)
        if isinstance(event, EOFReceived):
            return self.eof()
        if isinstance(event, VMDescriptionReceived):
            return self.vmDescription(event.json)
        return encodeCommandEvent(event)  # type: ignore[arg-type]


def encodeEvents(events: Iterable[StreamEvent]) -> bytes:
    """
    Re-encode decoded events; for the events of a stream this gives back
    its exact bytes.

    @param events: main-stream events.
    @return: the bytes.
    """
    encoder = StreamEncoder()
    return b"".join(piece for event in events for piece in encoder.encode(event))
