# -*- test-case-name: tests.test_wire_ram -*-
"""
RAM records (C{migration/ram.c}): the payload of the C{"ram"} section and
of the postcopy preempt channel.

A record is C{be64 offset|flags}, a C{str8} RAMBlock idstr unless CONTINUE
is set, then per-flag bytes (ZERO: C{u8 fill}; PAGE: 4096 bytes).  Each
side keeps a "last block" for CONTINUE that persists across sections.

The per-page loops run in C (C{ram/_uffd_build.py}, through cffi): on
the encoding side the zero-page test (QEMU's C{buffer_is_zero}) and the
record words of a run of guest pages (L{RAMRecordEncoder.pageRun}), on
the decoding side, when asked for (C{batch}), the scan of a run of
CONTINUE records into one L{RAMRecordsReceived}.
"""

from __future__ import annotations

import struct
from typing import Any, Container, Iterable, Union

from attrs import Factory, define, field

from twisted_postcopy.errors import (
    BadRAMRecordError,
    DuplicateRAMBlockError,
    LimitExceededError,
    LocalProtocolError,
    UnsupportedFeatureError,
)
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.constants import (
    DEFAULT_MAX_BLOCK_LIST_SIZE,
    DEFAULT_MAX_RAM_BLOCKS,
    DEFAULT_MAX_TOTAL_RAM,
    MAX_PAGE_SIZE,
    RAM_EOS_WORD,
    RAM_FLAGS_MASK,
    TARGET_PAGE_SIZE,
    UNSUPPORTED_RAM_FLAGS,
    RAMFlag,
)
from twisted_postcopy.wire.events import (
    NEED_DATA,
    NeedData,
    PageReceived,
    RAMBlockInfo,
    RAMBlocksListed,
    RAMRecordsReceived,
    RAMSectionEOS,
    ZeroPageReceived,
)
from twisted_postcopy.wire.strings import checkStr8Length, decodeName, encodeStr8

_unpackWord = struct.Struct(">Q").unpack_from
_packWord = struct.Struct(">Q").pack
_PAGE, _ZERO, _CONTINUE = int(RAMFlag.PAGE), int(RAMFlag.ZERO), int(RAMFlag.CONTINUE)
_PAGE_CONTINUE = _PAGE | _CONTINUE
_ZERO_CONTINUE = _ZERO | _CONTINUE
#: A zero page: a page is compared with it only when its first byte is 0,
#: and as bytes (a memoryview comparison is element by element).
_ZERO_PAGE = bytes(TARGET_PAGE_SIZE)
_PAGE_RECORD = 8 + TARGET_PAGE_SIZE
_UNSUPPORTED_MASK = sum(int(flag) for flag in UNSUPPORTED_RAM_FLAGS)

#: What a RAM record decodes to.
RAMEvent = Union[PageReceived, ZeroPageReceived, RAMRecordsReceived, RAMSectionEOS]
#: Buffers for C{socket.sendmsg}: header bytes and guest memory views.
Buffers = list[Union[bytes, memoryview]]


def _unsupported(flags: int, offset: int) -> UnsupportedFeatureError:
    """
    @param flags: record flags with at least one unsupported bit.
    @param offset: the record's stream offset.
    @return: the error naming the flag and the capability to switch off.
    """
    for flag, capability in UNSUPPORTED_RAM_FLAGS.items():
        if flags & flag:
            return UnsupportedFeatureError(
                f"RAM record flag {flag.name} (0x{int(flag):x}) is not supported: "
                f"switch off the {capability} capability on the source", offset)
    raise AssertionError(flags)


@define
class RAMRecordDecoder:
    """
    Decodes RAM records of one channel.

    @ivar lengths: used length of each known RAMBlock, by idstr (from the
        START block list, or given for a recovery or preempt channel).
    @ivar lastBlock: the block of the previous record (CONTINUE).
    @ivar listed: whether a block list was decoded (there is one only).
    @ivar batch: the most records of one L{RAMRecordsReceived}; 0 (the
        default): one event per record.
    """

    lengths: dict[str, int] = Factory(dict)
    lastBlock: str | None = None
    listed: bool = False
    _list: _BlockListReader | None = None
    batch: int = 0
    _scratch: tuple[Any, Any, Any] | None = field(default=None, init=False, repr=False)

    def nextRecord(self, buffer: ReceiveBuffer) -> RAMEvent | NeedData:
        """
        Decode one record.

        @param buffer: the receive buffer, at a record boundary.
        @return: the event, or C{NEED_DATA}.
        @raise BadRAMRecordError: for a malformed record.
        @raise UnsupportedFeatureError: for XBZRLE, COMPRESS_PAGE, HOOK, 0x200.
        """
        if not buffer.ensure(8):
            return NEED_DATA
        word = _unpackWord(buffer.data, buffer.offset)[0]
        flags = word & RAM_FLAGS_MASK
        if self.batch and (flags == _PAGE_CONTINUE or flags == _ZERO_CONTINUE) and self.lastBlock is not None:
            records = self._scan(buffer)
            if records is not None:
                return records
        if flags == _PAGE_CONTINUE and self.lastBlock is not None:
            if not buffer.ensure(_PAGE_RECORD):
                return NEED_DATA
            offset = word - flags
            block = self.lastBlock
            if offset >= self.lengths[block]:
                raise self._outside(block, offset, buffer.position)
            start = buffer.offset + 8
            buffer.advance(_PAGE_RECORD)
            return PageReceived(block, offset, buffer.view[start:start + TARGET_PAGE_SIZE], True)
        return self._slowRecord(buffer, word, flags)

    def _scan(self, buffer: ReceiveBuffer) -> RAMRecordsReceived | None:
        """
        Scan, in C, the CONTINUE records that lie whole in the buffer's
        current chunk (at most C{batch}).

        @param buffer: the receive buffer, at a CONTINUE PAGE or ZERO record.
        @return: their event, or L{None} when the first one is not whole
            in the chunk or is bad (the record decoder then reads it, and
            names the error).
        """
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = (
                ffi.new("uint64_t[]", self.batch), ffi.new("uint32_t[]", self.batch), ffi.new("uint64_t *"))
        words, payloads, consumed = scratch
        block = self.lastBlock
        assert block is not None
        start = buffer.offset
        count = lib.tp_ram_scan(ffi.from_buffer(buffer.data) + start, len(buffer.data) - start,
                                self.lengths[block], self.batch, words, payloads, consumed)
        if not count:
            return None
        used = consumed[0]
        buffer.advance(used)
        return RAMRecordsReceived(
            block, buffer.view[start:start + used], memoryview(ffi.buffer(words, 8 * count)[:]).cast("Q"),
            memoryview(ffi.buffer(payloads, 4 * count)[:]).cast("I"))

    def _slowRecord(self, buffer: ReceiveBuffer, word: int, flags: int) -> RAMEvent | NeedData:
        """
        Decode any record but a CONTINUE page.

        @param buffer: the receive buffer, with the word available.
        @param word: the record word.
        @param flags: its flag bits.
        @return: the event, or C{NEED_DATA}.
        """
        where = buffer.position
        if flags & _UNSUPPORTED_MASK:
            raise _unsupported(flags, where)
        if flags & RAMFlag.EOS:
            if word != RAM_EOS_WORD:
                raise BadRAMRecordError(f"EOS record with extra bits 0x{word:x} (expected 0x10)", where)
            buffer.advance(8)
            return RAMSectionEOS()
        kind = flags & ~_CONTINUE
        if kind not in (_PAGE, _ZERO):
            raise BadRAMRecordError(
                f"unknown RAM record flags 0x{flags:x} (expected ZERO or PAGE, optionally with CONTINUE)",
                where)
        size = 8
        if flags & _CONTINUE:
            block = self.lastBlock
            if block is None:
                raise BadRAMRecordError("CONTINUE record with no previous block", where)
        else:
            if not buffer.ensure(9):
                return NEED_DATA
            length = buffer.data[buffer.offset + 8]
            checkStr8Length(length, "RAMBlock", where + 8)
            size = 9 + length
            if not buffer.ensure(size):
                return NEED_DATA
            block = decodeName(buffer.view[buffer.offset + 9:buffer.offset + size])
            if block not in self.lengths:
                raise BadRAMRecordError(f"unknown RAMBlock {block!r} (not in the START list)", where)
        total = size + (TARGET_PAGE_SIZE if kind == _PAGE else 1)
        if not buffer.ensure(total):
            return NEED_DATA
        offset = word - flags
        if offset >= self.lengths[block]:
            raise self._outside(block, offset, where)
        self.lastBlock = block
        start = buffer.offset + size
        continued = bool(flags & _CONTINUE)
        if kind == _PAGE:
            event: RAMEvent = PageReceived(
                block, offset, buffer.view[start:start + TARGET_PAGE_SIZE], continued)
        else:
            event = ZeroPageReceived(block, offset, buffer.data[start], continued)
        buffer.advance(total)
        return event

    def _outside(self, block: str, offset: int, where: int) -> BadRAMRecordError:
        """
        @param block: a block idstr.
        @param offset: an offset beyond its length.
        @param where: the record's stream offset.
        @return: the "Illegal RAM offset" error.
        """
        return BadRAMRecordError(
            f"RAM offset 0x{offset:x} outside block {block!r} of length 0x{self.lengths[block]:x}",
            where)

    def nextBlockList(
        self, buffer: ReceiveBuffer, pageSizeBlocks: Container[str] = (),
        ignoreShared: bool = False, limit: int = DEFAULT_MAX_BLOCK_LIST_SIZE,
        maxBlocks: int = DEFAULT_MAX_RAM_BLOCKS, maxTotalRAM: int = DEFAULT_MAX_TOTAL_RAM,
        pageSizeSummary: int = 0,
    ) -> RAMBlocksListed | NeedData:
        """
        Decode the MEM_SIZE record that opens a RAM START payload, entry by
        entry (each is consumed as it is read, so the list is scanned once
        however it arrives).

        @param buffer: the receive buffer, at the record (or where the
            previous call stopped).
        @param pageSizeBlocks: blocks whose entry carries C{be64 page_size}.
        @param ignoreShared: whether entries carry C{be64 mr_addr}.
        @param limit: the most bytes the record may have (max-block-list-size).
        @param maxBlocks: the most entries (max-ram-blocks).
        @param maxTotalRAM: the largest MEM_SIZE total (max-total-ram).
        @param pageSizeSummary: the POSTCOPY_ADVISE page size summary (0:
            no ADVISE); see L{_BlockListReader.carriesPageSize}.
        @return: the event, or C{NEED_DATA}.
        @raise BadRAMRecordError: if the record is not MEM_SIZE or its
            lengths do not add up.
        @raise DuplicateRAMBlockError: if a block is listed twice, or a
            list was already decoded (a second RAM START).
        @raise LimitExceededError: if the list is over a limit.
        """
        if self._list is None:
            if self.listed:
                raise DuplicateRAMBlockError(
                    "second RAM block list (QEMU 7.2 sends one RAM START)", buffer.position)
            self._list = _BlockListReader(pageSizeBlocks, ignoreShared, limit, maxBlocks, maxTotalRAM,
                                          pageSizeSummary)
        event = self._list.step(buffer)
        if event is NEED_DATA:
            return NEED_DATA
        self._list = None
        self.listed = True
        self.lengths.update((block.idstr, block.length) for block in event.blocks)
        return event


@define
class _BlockListReader:
    """
    The state of a RAM block list being read (see
    L{RAMRecordDecoder.nextBlockList}).

    @ivar summary: the POSTCOPY_ADVISE page size summary (OR of the
        source's block page sizes), or 0.
    """

    pageSizeBlocks: Container[str]
    ignoreShared: bool
    limit: int
    maxBlocks: int
    maxTotalRAM: int
    summary: int = 0
    _where: int = -1
    _total: int = -1
    _remaining: int = 0
    _size: int = 0
    _blocks: list[RAMBlockInfo] = Factory(list)
    _names: set[str] = Factory(set)

    def step(self, buffer: ReceiveBuffer) -> RAMBlocksListed | NeedData:
        """
        Read on.

        @param buffer: the receive buffer.
        @return: the event once the list is complete, or C{NEED_DATA}.
        """
        if self._total < 0:
            self._where = where = buffer.position
            if not buffer.ensure(8):
                return NEED_DATA
            word = _unpackWord(buffer.data, buffer.offset)[0]
            if word & RAM_FLAGS_MASK != RAMFlag.MEM_SIZE:
                raise BadRAMRecordError(
                    f"RAM START payload begins with flags 0x{word & RAM_FLAGS_MASK:x} (expected MEM_SIZE)", where)
            self._total = self._remaining = word & ~RAM_FLAGS_MASK
            if self._total > self.maxTotalRAM:
                raise LimitExceededError(
                    f"RAM START lists 0x{self._total:x} bytes of RAM (at most 0x{self.maxTotalRAM:x})",
                    where, "max-total-ram")
            self._size = 8
            buffer.advance(8)
        while self._remaining > 0:
            event = self._entry(buffer)
            if event is NEED_DATA:
                return NEED_DATA
        return RAMBlocksListed(self._blocks)

    def _entry(self, buffer: ReceiveBuffer) -> None | NeedData:
        """
        Read one entry.

        @param buffer: the receive buffer, at the entry.
        @return: L{None}, or C{NEED_DATA}.
        """
        where = buffer.position
        if not buffer.ensure(1):
            return NEED_DATA
        length = buffer.data[buffer.offset]
        checkStr8Length(length, "RAMBlock", where)
        if not buffer.ensure(1 + length):
            return NEED_DATA
        idstr = decodeName(buffer.data[buffer.offset + 1:buffer.offset + 1 + length])
        hasPageSize = self.carriesPageSize(buffer, idstr, length)
        if hasPageSize is NEED_DATA:
            return NEED_DATA
        extra = hasPageSize + self.ignoreShared
        entry = 1 + length + 8 * (1 + extra)
        if self._size + entry > self.limit:
            raise LimitExceededError(f"RAM block list longer than {self.limit} bytes", self._where,
                                     "max-block-list-size")
        if not buffer.ensure(entry):
            return NEED_DATA
        if idstr in self._names:
            raise DuplicateRAMBlockError(f"RAMBlock {idstr!r} listed twice in the RAM START", where)
        if len(self._blocks) >= self.maxBlocks:
            raise LimitExceededError(f"RAM START lists more than {self.maxBlocks} RAMBlocks", where,
                                     "max-ram-blocks")
        fields = struct.unpack_from(f">{1 + extra}Q", buffer.data, buffer.offset + 1 + length)
        pageSize = fields[1] if hasPageSize else None
        if pageSize is not None and (pageSize < TARGET_PAGE_SIZE or pageSize > MAX_PAGE_SIZE
                                     or pageSize & (pageSize - 1)):
            raise BadRAMRecordError(f"RAMBlock {idstr!r} page size 0x{pageSize:x} (expected a power of two "
                                    f"from 0x{TARGET_PAGE_SIZE:x} to 0x{MAX_PAGE_SIZE:x})", where)
        self._blocks.append(RAMBlockInfo(idstr, fields[0], pageSize, fields[-1] if self.ignoreShared else None))
        self._names.add(idstr)
        self._remaining -= fields[0]
        if self._remaining < 0:
            raise BadRAMRecordError(
                f"RAM block lengths exceed the MEM_SIZE total 0x{self._total:x}", self._where)
        self._size += entry
        buffer.advance(entry)
        return None

    def carriesPageSize(self, buffer: ReceiveBuffer, idstr: str, length: int) -> bool | NeedData:
        """
        Whether an entry carries C{be64 page_size}.  A QEMU destination
        decides by its own block (C{postcopy_advised && postcopy-ram &&
        page_size != qemu_host_page_size}); this destination creates its
        blocks from the list, so it reads the page sizes off the wire:
        blocks in L{pageSizeBlocks} always carry one, and when the ADVISE
        summary has a bit above the target page size, an entry carries one
        exactly when the next 8 bytes are such a page size.  That is
        unambiguous: the next entry begins with a nonzero idstr length, and
        the list is followed by the EOS word C{0x10}.  With
        C{x-ignore-shared} (an C{mr_addr} follows) only L{pageSizeBlocks}
        count.

        @param buffer: the receive buffer, at the entry.
        @param idstr: its block name.
        @param length: the idstr's length.
        @return: the answer, or C{NEED_DATA}.
        """
        if idstr in self.pageSizeBlocks:
            return True
        huge = self.summary & ~(2 * TARGET_PAGE_SIZE - 1)
        if not huge or self.ignoreShared:
            return False
        at = 1 + length + 8
        if not buffer.ensure(at + 8):
            return NEED_DATA
        candidate = _unpackWord(buffer.data, buffer.offset + at)[0]
        return bool(candidate & huge) and not candidate & (candidate - 1)


def _continueRun(view: memoryview, start: int, count: int, out: list[Any]) -> int:
    """
    Append the CONTINUE records of C{count} pages of a block from C{start}:
    C{tp_ram_encode} tests each page for zero and writes every record word
    (and ZERO fill byte) into one buffer; the buffers appended are its
    pieces between the pages' data (L{bytes}), and the pages' data as
    views of C{view} (not copied).  A run of zero pages is one piece.

    @param view: the whole block's memory.
    @param start: the first page's offset (page aligned).
    @param count: the number of pages (inside the block).
    @param out: the buffers to append to.
    @return: how many PAGE records.
    """
    headers = ffi.new("char[]", 9 * count)
    splits = ffi.new("uint32_t[]", count)
    pages = ffi.new("uint32_t[]", count)
    written = ffi.new("uint64_t *")
    normal = lib.tp_ram_encode(ffi.from_buffer(view), start, count, headers, splits, pages, written)
    if normal < 0:
        raise LocalProtocolError(f"page offset 0x{start:x} is not page aligned")
    stream = ffi.buffer(headers, written[0])[:]
    append = out.append
    previous = 0
    for split, page in zip(ffi.unpack(splits, normal), ffi.unpack(pages, normal)):
        append(stream[previous:split])
        offset = start + page * TARGET_PAGE_SIZE
        append(view[offset:offset + TARGET_PAGE_SIZE])
        previous = split
    if previous < written[0]:
        append(stream[previous:])
    return normal


@define
class RAMRecordEncoder:
    """
    Encodes RAM records of one channel, keeping the CONTINUE "last block".

    @ivar alwaysNameBlock: never set CONTINUE (valid, only larger).
    @ivar lastBlock: the block of the last page record written.
    """

    alwaysNameBlock: bool = False
    lastBlock: str | None = None
    _names: dict[str, bytes] = field(factory=dict, repr=False)

    def reset(self) -> None:
        """
        Forget the last block (QEMU does at the switch to postcopy, after
        recovery and when it changes channel), so the next record names it.
        """
        self.lastBlock = None

    def _header(self, block: str, offset: int, flag: int, continued: bool | None) -> bytes:
        """
        @param block: the RAMBlock idstr.
        @param offset: the page's offset in it.
        @param flag: C{PAGE} or C{ZERO}.
        @param continued: force CONTINUE on or off; L{None}: from memory.
        @return: the record word and, unless CONTINUE, the idstr.
        @raise LocalProtocolError: for an unaligned offset.
        """
        if offset & RAM_FLAGS_MASK or offset < 0:
            raise LocalProtocolError(f"page offset 0x{offset:x} is not page aligned")
        if continued is None:
            continued = block == self.lastBlock and not self.alwaysNameBlock
        self.lastBlock = block
        if continued:
            return _packWord(offset | flag | _CONTINUE)
        name = self._names.get(block)
        if name is None:
            name = self._names[block] = encodeStr8(block)
        return _packWord(offset | flag) + name

    def page(self, block: str, offset: int, data: bytes | memoryview,
             continued: bool | None = None) -> Buffers:
        """
        Encode a PAGE record without copying the page.

        @param block: the RAMBlock idstr.
        @param offset: the page's byte offset in the block.
        @param data: the 4096 page bytes (e.g. a view of guest RAM).
        @param continued: force CONTINUE (re-encoding); default: automatic.
        @return: C{[header, data]} for C{socket.sendmsg}.
        @raise LocalProtocolError: if C{data} is not one page.
        """
        if len(data) != TARGET_PAGE_SIZE:
            raise LocalProtocolError(f"a page is {TARGET_PAGE_SIZE} bytes, not {len(data)}")
        return [self._header(block, offset, _PAGE, continued), data]

    def pageRun(self, block: str, view: memoryview, start: int, end: int, out: list[Any]) -> int:
        """
        Encode the target pages C{start} to C{end} (byte offsets) of a
        block from its memory, zero copy: a ZERO record for an all-zero
        page, else a PAGE record whose data is a view of C{view} (not
        copied until the caller joins or sends its buffers); the block is
        named in the first record only if it differs from the last one
        (CONTINUE after).  This is the source's hot loop.

        @param block: the RAMBlock idstr.
        @param view: the whole block's memory.
        @param start: the first page's offset (target-page aligned).
        @param end: the offset after the last page.
        @param out: the buffers to append to (for C{socket.sendmsg}).
        @return: how many PAGE (not ZERO) records were appended.
        @raise LocalProtocolError: for an unaligned C{start}.
        """
        if start & RAM_FLAGS_MASK or start < 0:
            raise LocalProtocolError(f"page offset 0x{start:x} is not page aligned")
        if start >= end:
            return 0
        if end > len(view):
            raise LocalProtocolError(f"pages up to 0x{end:x} outside the block's 0x{len(view):x} bytes")
        append = out.append
        normal = 0
        offset = start
        if block != self.lastBlock or self.alwaysNameBlock:
            stop = end if self.alwaysNameBlock else start + TARGET_PAGE_SIZE
            for offset in range(start, stop, TARGET_PAGE_SIZE):
                data = view[offset:offset + TARGET_PAGE_SIZE]
                if lib.tp_buffer_is_zero(ffi.from_buffer(data), TARGET_PAGE_SIZE):
                    append(self._header(block, offset, _ZERO, False) + b"\x00")
                else:
                    append(self._header(block, offset, _PAGE, False))
                    append(data)
                    normal += 1
            offset = stop
        if offset < end:
            normal += _continueRun(view, offset, (end - offset) // TARGET_PAGE_SIZE, out)
        return normal

    def zeroPage(self, block: str, offset: int, fill: int = 0, continued: bool | None = None) -> bytes:
        """
        Encode a ZERO record.

        @param block: the RAMBlock idstr.
        @param offset: the page's byte offset in the block.
        @param fill: the fill byte (QEMU sends 0).
        @param continued: force CONTINUE (re-encoding); default: automatic.
        @return: the record.
        """
        return self._header(block, offset, _ZERO, continued) + bytes((fill,))

    def eos(self) -> bytes:
        """
        @return: the EOS record.
        """
        return _packWord(RAM_EOS_WORD)

    def encode(self, event: RAMEvent) -> Buffers:
        """
        Re-encode a decoded RAM event exactly (CONTINUE as received).

        @param event: a page, zero page or EOS event.
        @return: its buffers.
        """
        if isinstance(event, PageReceived):
            return self.page(event.block, event.offset, event.data, event.continued)
        if isinstance(event, ZeroPageReceived):
            return [self.zeroPage(event.block, event.offset, event.fill, event.continued)]
        if isinstance(event, RAMRecordsReceived):
            self.lastBlock = event.block
            return [bytes(event.data)]
        return [self.eos()]


@define
class RAMChannelEncoder:
    """
    The RAM record methods shared by the encoder of each channel that
    carries RAM records (the main stream and the preempt channel): pages,
    zero pages and EOS, with the channel's own CONTINUE "last block".

    @ivar alwaysNameBlock: never use CONTINUE (valid, only larger).
    """

    alwaysNameBlock: bool = False
    _ram: RAMRecordEncoder = field(init=False)

    def __attrs_post_init__(self) -> None:
        """
        Create the RAM record encoder.
        """
        self._ram = RAMRecordEncoder(self.alwaysNameBlock)

    def page(self, block: str, offset: int, data: bytes | memoryview) -> Buffers:
        """
        @param block: the RAMBlock idstr.
        @param offset: the page's byte offset in the block.
        @param data: the 4096 page bytes (not copied).
        @return: C{[header, data]}.
        """
        return self._ram.page(block, offset, data)

    def zeroPage(self, block: str, offset: int, fill: int = 0) -> bytes:
        """
        @param block: the RAMBlock idstr.
        @param offset: the page's byte offset in the block.
        @param fill: the fill byte.
        @return: the ZERO record.
        """
        return self._ram.zeroPage(block, offset, fill)

    def eos(self) -> bytes:
        """
        @return: the EOS record (ending a RAM payload or the preempt channel).
        """
        return self._ram.eos()

    def resetLastBlock(self) -> None:
        """
        Forget the CONTINUE block (at the switch to postcopy, after recovery).
        """
        self._ram.reset()


def wirePageSize(pageSize: int, postcopyRam: bool) -> int | None:
    """
    QEMU's C{ram_save_setup} rule for a RAM START entry's C{be64
    page_size}: written when C{postcopy-ram} is on and the block's page
    size differs from the host page size (the target page size, 4 KiB, on
    x86).

    @param pageSize: the block's page size.
    @param postcopyRam: the source's C{postcopy-ram} capability.
    @return: the page size to write, or L{None}.
    """
    return pageSize if postcopyRam and pageSize != TARGET_PAGE_SIZE else None


def blockListFor(blocks: Iterable[Any], postcopyRam: bool) -> list[RAMBlockInfo]:
    """
    The RAM START entries of a source's blocks.

    @param blocks: objects with C{idstr}, C{length} and C{pageSize}.
    @param postcopyRam: the source's C{postcopy-ram} capability.
    @return: the entries, page sizes as L{wirePageSize} says.
    """
    return [RAMBlockInfo(b.idstr, b.length, wirePageSize(b.pageSize, postcopyRam)) for b in blocks]


def encodeBlockList(blocks: Iterable[RAMBlockInfo]) -> bytes:
    """
    Encode the MEM_SIZE record of a RAM START payload.

    @param blocks: the blocks, in wire order; C{pageSize}/C{mrAddr} are
        written when not L{None}.
    @return: the record (without the EOS that follows it).
    """
    blocks = list(blocks)
    parts = [_packWord(sum(block.length for block in blocks) | RAMFlag.MEM_SIZE)]
    for block in blocks:
        parts.append(encodeStr8(block.idstr) + _packWord(block.length))
        for extra in (block.pageSize, block.mrAddr):
            if extra is not None:
                parts.append(_packWord(extra))
    return b"".join(parts)
