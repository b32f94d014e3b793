# -*- test-case-name: tests.test_wire_stream -*-
"""
The events of the migration-stream, return-path and preempt decoders.

Every event is a frozen attrs value named in the past tense.  Together the
events of a stream carry everything needed to re-encode it byte for byte
(L{twisted_postcopy.wire.encoder.encodeEvents}): CONTINUE bits, the ZERO fill
byte, raw configuration subsections and raw device sections.

Id strings (machine type, section idstr, RAMBlock idstr) are L{str} decoded
as UTF-8 with C{surrogateescape}, so any bytes round-trip exactly.
"""

from __future__ import annotations

import enum
from typing import Literal, Union

from attrs import field, frozen

from twisted_postcopy.wire.constants import SectionType


class _Sentinel(enum.Enum):
    """
    The decoder's non-event answer.
    """

    NEED_DATA = "NEED_DATA"


#: Returned by C{nextEvent()} when more bytes are needed for the next event.
NEED_DATA: Literal[_Sentinel.NEED_DATA] = _Sentinel.NEED_DATA
#: The type of L{NEED_DATA}, for annotations.
NeedData = Literal[_Sentinel.NEED_DATA]


# -- main stream: header and sections ---------------------------------------


@frozen
class HeaderReceived:
    """
    The stream magic and version were read.

    @ivar version: the file version (always 3 for QEMU 7.2).
    """

    version: int


@frozen
class ConfigurationReceived:
    """
    The configuration element (C{QEMU_VM_CONFIGURATION}) was read.

    @ivar machine: the machine type name, e.g. C{"pc-i440fx-7.2"}.
    @ivar subsections: the raw bytes of its subsections (each C{0x05, str8
        name, be32 version, body}), empty by default.
    """

    machine: str
    subsections: bytes = b""


@frozen
class SectionStarted:
    """
    The header of a RAM section (idstr C{"ram"}) was read; its records follow.

    @ivar kind: C{SECTION_START}, C{SECTION_PART} or C{SECTION_END}.
    @ivar sectionId: the stream's section id.
    @ivar idstr: the section's idstr (resolved from the START for PART/END).
    @ivar instanceId: its instance id.
    @ivar versionId: its version id.
    """

    kind: SectionType
    sectionId: int
    idstr: str
    instanceId: int
    versionId: int


@frozen
class SectionEnded:
    """
    The footer of a RAM section was read and matched its header.

    @ivar kind: the kind of the section that ended.
    @ivar sectionId: its id.
    """

    kind: SectionType
    sectionId: int


@frozen
class RAMBlockInfo:
    """
    One entry of the RAM START block list.

    @ivar idstr: the RAMBlock's idstr.
    @ivar length: its used length in bytes.
    @ivar pageSize: its page size when the entry carries one (postcopy-ram
        with huge pages), else L{None}.
    @ivar mrAddr: its MemoryRegion address when the entry carries one
        (C{x-ignore-shared}), else L{None}.
    """

    idstr: str
    length: int
    pageSize: int | None = None
    mrAddr: int | None = None


@frozen
class RAMBlocksListed:
    """
    The MEM_SIZE record of the RAM START section was read.

    @ivar blocks: the listed blocks, in wire order.
    """

    blocks: tuple[RAMBlockInfo, ...] = field(converter=tuple)

    @property
    def totalBytes(self) -> int:
        """
        @return: the total the MEM_SIZE word carries.
        """
        return sum(block.length for block in self.blocks)


@frozen
class PageReceived:
    """
    A PAGE record: one target page of data.

    @ivar block: the RAMBlock idstr.
    @ivar offset: the byte offset in the block.
    @ivar data: the 4096 page bytes: a memoryview into the decoder's
        immutable receive chunk (not a copy).  It stays valid as long as it
        is referenced, and keeps that chunk alive: consume it promptly.
    @ivar continued: whether the record had CONTINUE (no idstr on the wire).
    """

    block: str
    offset: int
    data: memoryview = field(eq=False)
    continued: bool


@frozen
class ZeroPageReceived:
    """
    A ZERO record: one target page filled with one byte.

    @ivar block: the RAMBlock idstr.
    @ivar offset: the byte offset in the block.
    @ivar fill: the fill byte (QEMU always sends 0).
    @ivar continued: whether the record had CONTINUE.
    """

    block: str
    offset: int
    fill: int
    continued: bool


@frozen
class RAMRecordsReceived:
    """
    A run of CONTINUE records (PAGE or ZERO) of one block, scanned in C in
    one go; only a decoder made with C{ramBatch} set decodes these (its
    other RAM records still come as L{PageReceived} and
    L{ZeroPageReceived}).

    @ivar block: the RAMBlock idstr (every record has CONTINUE).
    @ivar data: the records' exact bytes: a memoryview into the decoder's
        immutable receive chunk (not a copy; consume it promptly).
    @ivar words: each record's word (C{offset | flags}), unsigned 64-bit.
    @ivar payloads: where each record's page (PAGE) or fill byte (ZERO)
        starts in C{data}, unsigned 32-bit.
    """

    block: str
    data: memoryview = field(eq=False)
    words: memoryview = field(eq=False)
    payloads: memoryview = field(eq=False)

    def __len__(self) -> int:
        """
        @return: how many records.
        """
        return len(self.words)

    def records(self) -> list[PageReceived | ZeroPageReceived]:
        """
        The same records one event each (for consumers that are not on
        the hot path: re-encoding, inspection).

        @return: the events, in order.
        """
        block, data, out = self.block, self.data, []
        for word, at in zip(self.words, self.payloads):
            flags = word & 0xFFF
            if flags & 0x08:
                out.append(PageReceived(block, word - flags, data[at:at + 4096], True))
            else:
                out.append(ZeroPageReceived(block, word - flags, data[at], True))
        return out


@frozen
class RAMSectionEOS:
    """
    The EOS record ending a RAM section's payload (or the preempt channel).
    """


@frozen
class DeviceSectionReceived:
    """
    A non-RAM section, kept as opaque bytes.

    @ivar kind: its section type.
    @ivar sectionId: its section id.
    @ivar idstr: its idstr (resolved from the START for PART/END).
    @ivar instanceId: its instance id.
    @ivar versionId: its version id.
    @ivar raw: the exact bytes: header, VMState payload and footer.
    """

    kind: SectionType
    sectionId: int
    idstr: str
    instanceId: int
    versionId: int
    raw: bytes

    @property
    def payload(self) -> bytes:
        """
        @return: the payload between the header and the footer.
        """
        if self.kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            headerLength = 14 + len(self.idstr.encode("utf-8", "surrogateescape"))
        else:
            headerLength = 5
        return self.raw[headerLength:-5]


# -- main stream: commands ---------------------------------------------------


@frozen
class ReturnPathOpened:
    """
    C{MIG_CMD_OPEN_RETURN_PATH}.
    """


@frozen
class PingReceived:
    """
    C{MIG_CMD_PING}.

    @ivar value: the C{be32} to echo in a PONG.
    """

    value: int


@frozen
class PostcopyAdvised:
    """
    C{MIG_CMD_POSTCOPY_ADVISE}.

    @ivar pageSizeSummary: OR of all RAMBlock page sizes, or L{None} for
        the 0-byte form (dirty bitmaps only).
    @ivar targetPageSize: the target page size, or L{None} (0-byte form).
    """

    pageSizeSummary: int | None
    targetPageSize: int | None


@frozen
class ListenReceived:
    """
    C{MIG_CMD_POSTCOPY_LISTEN}.
    """


@frozen
class RunReceived:
    """
    C{MIG_CMD_POSTCOPY_RUN}.
    """


@frozen
class DiscardReceived:
    """
    C{MIG_CMD_POSTCOPY_RAM_DISCARD}.

    @ivar block: the RAMBlock idstr.
    @ivar ranges: C{(start, length)} byte ranges in the block, at least one.
    """

    block: str
    ranges: tuple[tuple[int, int], ...] = field(converter=tuple)


@frozen
class PackageReceived:
    """
    C{MIG_CMD_PACKAGED} with its body.  Decode C{data} with a fresh
    C{StreamDecoder(header=False)} followed by EOF.

    @ivar data: the package bytes.
    """

    data: bytes


@frozen
class ResumeReceived:
    """
    C{MIG_CMD_POSTCOPY_RESUME}.
    """


@frozen
class RecvBitmapRequested:
    """
    C{MIG_CMD_RECV_BITMAP}.

    @ivar block: the RAMBlock idstr whose received bitmap is asked for.
    """

    block: str


@frozen
class EOFReceived:
    """
    C{QEMU_VM_EOF}.
    """


@frozen
class VMDescriptionReceived:
    """
    C{QEMU_VM_VMDESCRIPTION} after the final EOF of a precopy stream.

    @ivar json: the JSON bytes, unparsed.
    """

    json: bytes


# -- return path --------------------------------------------------------------


@frozen
class ShutReceived:
    """
    C{MIG_RP_MSG_SHUT}.

    @ivar value: 0 for success, non-zero if the destination saw an error.
    """

    value: int


@frozen
class PongReceived:
    """
    C{MIG_RP_MSG_PONG}.

    @ivar value: the PING value echoed.
    """

    value: int


@frozen
class PagesRequested:
    """
    C{MIG_RP_MSG_REQ_PAGES_ID} (C{named}) or C{MIG_RP_MSG_REQ_PAGES}.

    @ivar block: the RAMBlock idstr (resolved from the last REQ_PAGES_ID).
    @ivar start: byte offset in the block.
    @ivar length: length in bytes.
    @ivar named: whether the message named the block (REQ_PAGES_ID).
    """

    block: str
    start: int
    length: int
    named: bool


@frozen
class RecvBitmapReceived:
    """
    C{MIG_RP_MSG_RECV_BITMAP} with its trailing bitmap.

    @ivar block: the RAMBlock idstr.
    @ivar bitmap: the little-endian bitmap body (a multiple of 8 bytes).
    """

    block: str
    bitmap: bytes


@frozen
class ResumeAckReceived:
    """
    C{MIG_RP_MSG_RESUME_ACK}.

    @ivar value: always 1 (anything else is rejected by the decoder).
    """

    value: int


#: Any main-stream event.
StreamEvent = Union[
    HeaderReceived, ConfigurationReceived, SectionStarted, SectionEnded,
    RAMBlocksListed, PageReceived, ZeroPageReceived, RAMRecordsReceived, RAMSectionEOS,
    DeviceSectionReceived, ReturnPathOpened, PingReceived, PostcopyAdvised,
    ListenReceived, RunReceived, DiscardReceived, PackageReceived,
    ResumeReceived, RecvBitmapRequested, EOFReceived, VMDescriptionReceived,
]
#: Any return-path event.
ReturnPathEvent = Union[
    ShutReceived, PongReceived, PagesRequested, RecvBitmapReceived, ResumeAckReceived,
]
