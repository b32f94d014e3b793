# -*- test-case-name: tests.test_wire_stream -*-
"""
The sans-IO decoder of QEMU 7.2's main migration stream.

Feed bytes with L{StreamDecoder.receiveData} (C{b""} = EOF) in any
chunking, then call L{StreamDecoder.nextEvent} until it returns
L{NEED_DATA}.  A package is decoded by a fresh C{StreamDecoder(header=False)}
fed the package bytes and then C{b""}; so is a recovery main channel (pass
it the C{blocks} and C{ramSectionId} known from the first connection).
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable, Iterator

from attrs import define, field

from twisted_postcopy.errors import (
    DuplicateRAMBlockError,
    LimitExceededError,
    RemoteProtocolError,
    SectionMismatchError,
    TruncatedStreamError,
    UnknownElementError,
)
from twisted_postcopy.wire.buffer import BufferedDecoder, ReceiveBuffer
from twisted_postcopy.wire.commands import checkDiscardRanges, readCommand
from twisted_postcopy.wire.config import ConfigurationReader, parseHeader
from twisted_postcopy.wire.constants import (
    DEFAULT_MAX_DEVICE_BYTES,
    DEFAULT_MAX_DEVICE_SECTION_SIZE,
    DEFAULT_MAX_PACKAGE_SIZE,
    DEFAULT_MAX_RAM_BLOCKS,
    DEFAULT_MAX_SECTIONS,
    DEFAULT_MAX_TOTAL_RAM,
    DEFAULT_MAX_VMDESC_SIZE,
    RAM_IDSTR,
    RAM_SECTION_VERSION,
    SectionType,
)
from twisted_postcopy.wire.device import DeviceSectionReader, SectionInfo
from twisted_postcopy.wire.events import (
    NEED_DATA,
    DiscardReceived,
    EOFReceived,
    NeedData,
    PostcopyAdvised,
    RAMBlockInfo,
    RAMSectionEOS,
    SectionEnded,
    SectionStarted,
    StreamEvent,
    VMDescriptionReceived,
)
from twisted_postcopy.wire.ram import RAMRecordDecoder
from twisted_postcopy.wire.strings import checkStr8Length, decodeName

_sectionId = struct.Struct(">I").unpack_from
_fullHeaderTail = struct.Struct(">II").unpack_from

# Decoder states (what the next bytes are).
_HEADER, _CONFIGURATION, _TOP, _BLOCK_LIST, _RAM, _FOOTER = (
    "header", "configuration", "top-level element", "RAM block list", "RAM record", "section footer")
_DEVICE, _AFTER_EOF, _DONE = "device section", "element after EOF", "end of stream"
#: States in which the input may end.
_CLEAN_ENDS = frozenset({_TOP, _AFTER_EOF, _DONE})


@define
class StreamDecoder(BufferedDecoder[StreamEvent]):
    """
    Incremental decoder of a main migration stream (or a package);
    C{receiveData}, C{nextEvent} and C{events} come from L{BufferedDecoder}.

    @ivar header: whether the stream starts with magic, version and
        configuration (L{False} for a package or a recovery channel).
    @ivar maxPackageSize: the largest PACKAGED body accepted.
    @ivar maxDeviceSectionSize: the largest device section accepted.
    @ivar maxVMDescriptionSize: the largest VMDESCRIPTION accepted.
    @ivar maxDeviceBytes: the most device-section bytes in all (held until
        RUN or EOF by a destination).
    @ivar maxRAMBlocks: the most RAMBlocks the RAM START may list.
    @ivar maxTotalRAM: the most RAM (bytes) the RAM START may list.
    @ivar maxSections: the most distinct section ids.
    @ivar pageSizeBlocks: RAMBlocks whose START entry carries C{be64
        page_size} once POSTCOPY_ADVISE was seen (huge page blocks of a
        postcopy destination); other entries carry one when the ADVISE
        page size summary says so and the bytes show one (see
        L{twisted_postcopy.wire.ram._BlockListReader.carriesPageSize}).
    @ivar ignoreShared: whether START entries carry C{be64 mr_addr}.
    @ivar blocks: RAMBlocks known before the stream (recovery, package).
    @ivar ramSectionId: the RAM section id known before the stream.
    @ivar offset: the stream offset of the first byte fed (for errors).
    @ivar inPackage: whether this decodes a package (see
        L{packageDecoder}): a RAM START there is a second one.
    @ivar ramBatch: decode runs of up to this many CONTINUE records in C,
        as one L{RAMRecordsReceived} each; 0 (the default): one event per
        record.
    """

    header: bool = True
    maxPackageSize: int = DEFAULT_MAX_PACKAGE_SIZE
    maxDeviceSectionSize: int = DEFAULT_MAX_DEVICE_SECTION_SIZE
    maxVMDescriptionSize: int = DEFAULT_MAX_VMDESC_SIZE
    maxDeviceBytes: int = DEFAULT_MAX_DEVICE_BYTES
    maxRAMBlocks: int = DEFAULT_MAX_RAM_BLOCKS
    maxTotalRAM: int = DEFAULT_MAX_TOTAL_RAM
    maxSections: int = DEFAULT_MAX_SECTIONS
    pageSizeBlocks: frozenset[str] = field(default=frozenset(), converter=frozenset)
    ignoreShared: bool = False
    blocks: tuple[RAMBlockInfo, ...] = field(default=(), converter=tuple)
    ramSectionId: int | None = None
    offset: int = 0
    inPackage: bool = False
    ramBatch: int = 0
    _buffer: ReceiveBuffer = field(init=False)
    _ram: RAMRecordDecoder = field(init=False, factory=RAMRecordDecoder)
    _state: str = field(init=False, default=_HEADER)
    _sections: dict[int, SectionInfo] = field(init=False, factory=dict)
    _current: tuple[SectionType, int] = field(init=False, default=(SectionType.EOF, 0))
    _device: DeviceSectionReader | None = field(init=False, default=None)
    _advised: bool = field(init=False, default=False)
    _pageSizeSummary: int = field(init=False, default=0)
    _configuration: ConfigurationReader = field(init=False, factory=ConfigurationReader)
    _deviceBytes: int = field(init=False, default=0)
    _error: RemoteProtocolError | None = field(init=False, default=None)
    _handlers: dict[str, Callable[[], StreamEvent | NeedData]] = field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        """
        Set up the buffer, the known blocks and the state handlers.
        """
        self._buffer = ReceiveBuffer(self.offset)
        self._ram.batch = self.ramBatch
        self._ram.lengths.update((block.idstr, block.length) for block in self.blocks)
        self._ram.listed = bool(self.blocks)
        if self.ramSectionId is not None:
            self._sections[self.ramSectionId] = SectionInfo(RAM_IDSTR, 0, RAM_SECTION_VERSION, True)
        if not self.header:
            self._state = _TOP
        self._handlers.update({
            _HEADER: self._header, _CONFIGURATION: self._configurationStep, _TOP: self._top,
            _BLOCK_LIST: self._blockList, _FOOTER: self._footer, _DEVICE: self._deviceStep,
            _AFTER_EOF: self._afterEOF, _DONE: self._done,
        })

    @property
    def complete(self) -> bool:
        """
        @return: whether C{QEMU_VM_EOF} was decoded.
        """
        return self._state in (_AFTER_EOF, _DONE)

    @property
    def ramBlockLengths(self) -> dict[str, int]:
        """
        @return: used length of each known RAMBlock, by idstr.
        """
        return dict(self._ram.lengths)

    def packageDecoder(self, data: bytes, heldDeviceBytes: int = 0) -> StreamDecoder:
        """
        A decoder for the body of the L{PackageReceived} just decoded.

        @param data: the package's bytes.
        @param heldDeviceBytes: device bytes already held from this stream
            (they count against C{maxDeviceBytes}).
        @return: a header-less decoder whose offsets count in this stream,
            with this decoder's limits and RAM blocks, refusing a RAM START.
        """
        return StreamDecoder(
            header=False, maxPackageSize=self.maxPackageSize, maxDeviceSectionSize=self.maxDeviceSectionSize,
            maxVMDescriptionSize=self.maxVMDescriptionSize,
            maxDeviceBytes=max(0, self.maxDeviceBytes - heldDeviceBytes), maxRAMBlocks=self.maxRAMBlocks,
            maxTotalRAM=self.maxTotalRAM, maxSections=self.maxSections,
            blocks=[RAMBlockInfo(name, length) for name, length in self._ram.lengths.items()],
            offset=self.position - len(data), inPackage=True)

    def _next(self) -> StreamEvent | NeedData:
        """
        Decode the next element of the current state (RAM records first:
        the per-page hot path).

        @return: the event, or L{NEED_DATA}.
        """
        if self._state is _RAM:
            event = self._ram.nextRecord(self._buffer)
            if event is NEED_DATA:
                return self._needData()
            if event.__class__ is RAMSectionEOS:
                self._state = _FOOTER
            return event
        return self._handlers[self._state]()

    def _needData(self) -> NeedData:
        """
        @return: L{NEED_DATA}, unless the input ended mid-element.
        @raise TruncatedStreamError: if it did.
        """
        buffer = self._buffer
        if buffer.closed and (len(buffer) or self._state not in _CLEAN_ENDS):
            raise TruncatedStreamError(f"input ended inside a {self._state}", buffer.position)
        return NEED_DATA

    def _header(self) -> StreamEvent | NeedData:
        """
        @return: L{HeaderReceived} once magic and version are in.
        """
        event = parseHeader(self._buffer)
        if event is NEED_DATA:
            return self._needData()
        self._state = _CONFIGURATION
        return event

    def _configurationStep(self) -> StreamEvent | NeedData:
        """
        @return: L{ConfigurationReceived} once the element and the byte
            after it are in (the subsection peek).
        """
        event = self._configuration.step(self._buffer)
        if event is NEED_DATA:
            return self._needData()
        self._state = _TOP
        return event

    def _top(self) -> StreamEvent | NeedData:
        """
        @return: the event of the top-level element that starts here.
        """
        buffer = self._buffer
        if not buffer.ensure(1):
            return self._needData()
        kind = buffer.data[buffer.offset]
        if kind == SectionType.EOF:
            buffer.advance(1)
            self._state = _AFTER_EOF
            return EOFReceived()
        if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            return self._fullSection(SectionType(kind))
        if kind in (SectionType.SECTION_PART, SectionType.SECTION_END):
            return self._shortSection(SectionType(kind))
        if kind == SectionType.COMMAND:
            return self._command()
        raise UnknownElementError(
            f"unknown section type 0x{kind:02x} (expected 0x00-0x04 or 0x08)", buffer.position)

    def _fullSection(self, kind: SectionType) -> StreamEvent | NeedData:
        """
        @param kind: START or FULL.
        @return: L{SectionStarted} for RAM, else the device section event.
        """
        buffer = self._buffer
        if not buffer.ensure(6):
            return self._needData()
        length = buffer.data[buffer.offset + 5]
        checkStr8Length(length, "section", buffer.position + 5)
        if not buffer.ensure(14 + length):
            return self._needData()
        at = buffer.offset
        sectionId = _sectionId(buffer.data, at + 1)[0]
        idstr = decodeName(buffer.data[at + 6:at + 6 + length])
        instanceId, versionId = _fullHeaderTail(buffer.data, at + 6 + length)
        isRAM = kind == SectionType.SECTION_START and idstr == RAM_IDSTR
        if isRAM and (self._ram.listed or self.inPackage or any(
                known.isRAM for known in self._sections.values())):
            where = "inside a package" if self.inPackage else "after the first"
            raise DuplicateRAMBlockError(f"second RAM START, {where} (QEMU 7.2 sends one)", buffer.position)
        if sectionId not in self._sections and len(self._sections) >= self.maxSections:
            raise LimitExceededError(f"more than {self.maxSections} section ids", buffer.position,
                                     "max-sections")
        section = self._sections[sectionId] = SectionInfo(idstr, instanceId, versionId, isRAM)
        if isRAM:
            buffer.advance(14 + length)
            self._current = (kind, sectionId)
            self._state = _BLOCK_LIST
            return SectionStarted(kind, sectionId, idstr, instanceId, versionId)
        return self._startDevice(kind, sectionId, section, 14 + length)

    def _shortSection(self, kind: SectionType) -> StreamEvent | NeedData:
        """
        @param kind: PART or END.
        @return: L{SectionStarted} for RAM, else the device section event.
        @raise SectionMismatchError: for an id no START announced.
        """
        buffer = self._buffer
        if not buffer.ensure(5):
            return self._needData()
        sectionId = _sectionId(buffer.data, buffer.offset + 1)[0]
        section = self._sections.get(sectionId)
        if section is None:
            raise SectionMismatchError(
                f"{kind.name} for section id {sectionId} that no START announced", buffer.position)
        if section.isRAM:
            buffer.advance(5)
            self._current = (kind, sectionId)
            self._state = _RAM
            return SectionStarted(kind, sectionId, section.idstr, section.instanceId, section.versionId)
        return self._startDevice(kind, sectionId, section, 5)

    def _blockList(self) -> StreamEvent | NeedData:
        """
        @return: L{RAMBlocksListed} (the first record of a RAM START).
        """
        event = self._ram.nextBlockList(
            self._buffer, self.pageSizeBlocks if self._advised else (), self.ignoreShared,
            maxBlocks=self.maxRAMBlocks, maxTotalRAM=self.maxTotalRAM,
            pageSizeSummary=self._pageSizeSummary if self._advised else 0)
        if event is NEED_DATA:
            return self._needData()
        self._state = _RAM
        return event

    def _footer(self) -> StreamEvent | NeedData:
        """
        @return: L{SectionEnded} once the RAM section's footer is in.
        @raise SectionMismatchError: if it is missing or names another id.
        """
        buffer = self._buffer
        if not buffer.ensure(5):
            return self._needData()
        kind, sectionId = self._current
        if buffer.data[buffer.offset] != SectionType.SECTION_FOOTER:
            raise SectionMismatchError(
                f"missing section footer (found 0x{buffer.data[buffer.offset]:02x}, expected 0x7e)",
                buffer.position)
        found = _sectionId(buffer.data, buffer.offset + 1)[0]
        if found != sectionId:
            raise SectionMismatchError(
                f"mismatched section id in footer: {found} (expected {sectionId})", buffer.position)
        buffer.advance(5)
        self._state = _TOP
        return SectionEnded(kind, sectionId)

    def _startDevice(self, kind: SectionType, sectionId: int, section: SectionInfo,
                     headerLength: int) -> StreamEvent | NeedData:
        """
        Begin a device section (its header is available in the buffer).

        @param kind: the section type.
        @param sectionId: its id.
        @param section: what its START/FULL announced.
        @param headerLength: the length of its header.
        @return: the device section event, or L{NEED_DATA}.
        """
        self._device = DeviceSectionReader(
            kind, sectionId, section, headerLength, self._buffer.position, self.maxDeviceSectionSize)
        self._state = _DEVICE
        return self._deviceStep()

    def _deviceStep(self) -> StreamEvent | NeedData:
        """
        @return: the current device section's event, or L{NEED_DATA}.
        """
        assert self._device is not None
        event = self._device.step(self._buffer, self._sections)
        if event is NEED_DATA:
            return self._needData()
        self._deviceBytes += len(event.raw)
        if self._deviceBytes > self.maxDeviceBytes:
            raise LimitExceededError(
                f"device sections of more than {self.maxDeviceBytes} bytes in all",
                self._device.where, "max-device-bytes")
        self._device = None
        self._state = _TOP
        return event

    def _command(self) -> StreamEvent | NeedData:
        """
        @return: the command's event (PACKAGED with its body).
        """
        where = self._buffer.position
        event = readCommand(self._buffer, self.maxPackageSize)
        if event is NEED_DATA:
            return self._needData()
        if isinstance(event, DiscardReceived):
            checkDiscardRanges(event, self._ram.lengths, where)
        elif isinstance(event, PostcopyAdvised):
            self._advised = True
            self._pageSizeSummary = event.pageSizeSummary or 0
        return event

    def _afterEOF(self) -> StreamEvent | NeedData:
        """
        @return: L{VMDescriptionReceived}, or L{NEED_DATA} at the end.
        @raise UnknownElementError: for anything but a VMDESCRIPTION.
        """
        buffer = self._buffer
        if not buffer.ensure(1):
            return self._needData()
        kind = buffer.data[buffer.offset]
        if kind != SectionType.VMDESCRIPTION:
            raise UnknownElementError(
                f"0x{kind:02x} after QEMU_VM_EOF (expected 0x06 VMDESCRIPTION or the end)", buffer.position)
        if not buffer.ensure(5):
            return self._needData()
        length = _sectionId(buffer.data, buffer.offset + 1)[0]
        if length > self.maxVMDescriptionSize:
            raise LimitExceededError(
                f"VMDESCRIPTION of {length} bytes exceeds the limit {self.maxVMDescriptionSize}",
                buffer.position, "max-vmdesc-size")
        if not buffer.ensure(5 + length):
            return self._needData()
        json = bytes(buffer.view[buffer.offset + 5:buffer.offset + 5 + length])
        buffer.advance(5 + length)
        self._state = _DONE
        return VMDescriptionReceived(json)

    def _done(self) -> StreamEvent | NeedData:
        """
        @return: L{NEED_DATA}: nothing may follow the VMDESCRIPTION.
        @raise UnknownElementError: if something does.
        """
        if self._buffer.ensure(1):
            raise UnknownElementError("data after VMDESCRIPTION (expected the end)", self._buffer.position)
        return self._needData()


def decodeAll(data: bytes, **options: object) -> list[StreamEvent]:
    """
    Decode a whole stream (or package) at once.

    @param data: the complete bytes.
    @param options: L{StreamDecoder} options (e.g. C{header=False}).
    @return: all its events.
    @raise RemoteProtocolError: for bad input, including a truncation.
    """
    return StreamDecoder(**options).decodeWhole(data)  # type: ignore[arg-type]


def iterChunks(chunks: Iterable[bytes], **options: object) -> Iterator[StreamEvent]:
    """
    Decode a stream arriving as chunks (e.g. a file read piecewise).

    @param chunks: the bytes, in order; EOF is fed after the last.
    @param options: L{StreamDecoder} options.
    @return: an iterator of the events.
    """
    decoder = StreamDecoder(**options)  # type: ignore[arg-type]
    for chunk in chunks:
        decoder.receiveData(chunk)
        yield from decoder.events()
    decoder.receiveData(b"")
    yield from decoder.events()
