# -*- test-case-name: tests.test_wire_returnpath -*-
"""
The return path (destination to source): C{be16 type, be16 len, payload}.

RECV_BITMAP is the one message with bytes outside C{len}: C{be64 size},
C{size} bytes of little-endian bitmap and the end mark
C{0x0123456789abcdef}.
"""

from __future__ import annotations

import struct

from attrs import define, field

from twisted_postcopy.errors import (
    BadLengthError,
    BadRAMRecordError,
    LimitExceededError,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedStreamError,
    UnknownElementError,
)
from twisted_postcopy.wire.buffer import BufferedDecoder, ReceiveBuffer
from twisted_postcopy.wire.constants import (
    DEFAULT_MAX_RECV_BITMAP_SIZE,
    MAX_RP_MESSAGE_LEN,
    RECV_BITMAP_ENDING,
    RESUME_ACK_VALUE,
    RP_MESSAGE_LENGTHS,
    RPMessage,
)
from twisted_postcopy.wire.events import (
    NEED_DATA,
    NeedData,
    PagesRequested,
    PongReceived,
    RecvBitmapReceived,
    ResumeAckReceived,
    ReturnPathEvent,
    ShutReceived,
)
from twisted_postcopy.wire.strings import checkFixedLength, checkStr8Length, decodeName, encodeStr8

_rpHeader = struct.Struct(">HH")
_reqPages = struct.Struct(">QI")
_be64 = struct.Struct(">Q")


def encodeMessage(message: RPMessage, payload: bytes) -> bytes:
    """
    @param message: the message type.
    @param payload: its payload (at most 512 bytes).
    @return: the framed message.
    @raise LocalProtocolError: for a payload over 512 bytes.
    """
    if len(payload) > MAX_RP_MESSAGE_LEN:
        raise LocalProtocolError(f"{message.name} payload of {len(payload)} bytes exceeds 512")
    return _rpHeader.pack(message, len(payload)) + payload


@define
class ReturnPathDecoder(BufferedDecoder[ReturnPathEvent]):
    """
    Incremental decoder of return-path messages (run by the source;
    C{receiveData}, C{nextEvent}, C{events} from L{BufferedDecoder}).

    @ivar maxBitmapSize: the largest RECV_BITMAP body accepted.
    @ivar offset: the stream offset of the first byte fed.
    """

    maxBitmapSize: int = DEFAULT_MAX_RECV_BITMAP_SIZE
    offset: int = 0
    _buffer: ReceiveBuffer = field(init=False)
    _lastBlock: str | None = field(init=False, default=None)
    _error: RemoteProtocolError | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        """
        Create the buffer.
        """
        self._buffer = ReceiveBuffer(self.offset)

    def _next(self) -> ReturnPathEvent | NeedData:
        """
        @return: the next event, or L{NEED_DATA}.
        """
        buffer = self._buffer
        where = buffer.position
        if not buffer.ensure(4):
            return self._needData()
        kind, length = _rpHeader.unpack_from(buffer.data, buffer.offset)
        if kind not in RP_MESSAGE_LENGTHS:
            raise UnknownElementError(
                f"invalid return-path message 0x{kind:04x} length 0x{length:04x} (expected 1..6)", where)
        message = RPMessage(kind)
        if length > MAX_RP_MESSAGE_LEN:
            raise LimitExceededError(f"{message.name} message of length {length} (at most 512)", where)
        checkFixedLength(RP_MESSAGE_LENGTHS, message, length, f"{message.name} message", where)
        if not buffer.ensure(4 + length):
            return self._needData()
        payload = bytes(buffer.view[buffer.offset + 4:buffer.offset + 4 + length])
        if message is RPMessage.RECV_BITMAP:
            return self._recvBitmap(payload, where)
        event = self._decode(message, payload, where)
        buffer.advance(4 + length)
        return event

    def _decode(self, message: RPMessage, payload: bytes, where: int) -> ReturnPathEvent:
        """
        @param message: a message other than RECV_BITMAP.
        @param payload: its payload, of a checked length.
        @param where: its stream offset.
        @return: its event.
        """
        if message is RPMessage.REQ_PAGES_ID:
            if len(payload) < 13:
                raise BadLengthError(f"REQ_PAGES_ID with length {len(payload)} (expected 13 + name)", where)
            checkStr8Length(payload[12], "RAMBlock", where + 16)
            if len(payload) != 13 + payload[12]:
                raise BadLengthError(
                    f"REQ_PAGES_ID with length {len(payload)} (expected {13 + payload[12]})", where)
            self._lastBlock = decodeName(payload[13:])
            return PagesRequested(self._lastBlock, *_reqPages.unpack_from(payload), True)
        if message is RPMessage.REQ_PAGES:
            if self._lastBlock is None:
                raise BadRAMRecordError("REQ_PAGES with no previous REQ_PAGES_ID", where)
            return PagesRequested(self._lastBlock, *_reqPages.unpack_from(payload), False)
        value = int.from_bytes(payload, "big")
        if message is RPMessage.SHUT:
            return ShutReceived(value)
        if message is RPMessage.PONG:
            return PongReceived(value)
        if message is RPMessage.RESUME_ACK and value == RESUME_ACK_VALUE:
            return ResumeAckReceived(value)
        raise UnknownElementError(f"illegal RESUME_ACK value {value} (expected 1)", where)

    def _recvBitmap(self, payload: bytes, where: int) -> ReturnPathEvent | NeedData:
        """
        @param payload: the RECV_BITMAP payload (the block name).
        @param where: the message's stream offset.
        @return: the event once the trailing bitmap is in, or L{NEED_DATA}.
        """
        buffer = self._buffer
        if not payload or len(payload) != 1 + payload[0]:
            raise BadLengthError(f"RECV_BITMAP with length {len(payload)} (expected 1 + name)", where)
        checkStr8Length(payload[0], "RAMBlock", where + 4)
        head = 4 + len(payload)
        if not buffer.ensure(head + 8):
            return self._needData()
        size = _be64.unpack_from(buffer.data, buffer.offset + head)[0]
        if size > self.maxBitmapSize:
            raise LimitExceededError(f"RECV_BITMAP of {size} bytes exceeds {self.maxBitmapSize}", where,
                                     "max-recv-bitmap-size")
        if size % 8:
            raise BadLengthError(f"RECV_BITMAP size {size} is not a multiple of 8", where + head)
        if not buffer.ensure(head + 16 + size):
            return self._needData()
        start = buffer.offset + head + 8
        ending = _be64.unpack_from(buffer.data, start + size)[0]
        if ending != RECV_BITMAP_ENDING:
            raise BadLengthError(
                f"RECV_BITMAP end mark incorrect: 0x{ending:x} (expected 0x0123456789abcdef)",
                where + head + 8 + size)
        bitmap = bytes(buffer.view[start:start + size])
        buffer.advance(head + 16 + size)
        return RecvBitmapReceived(decodeName(payload[1:]), bitmap)

    def _needData(self) -> NeedData:
        """
        @return: L{NEED_DATA} unless the input ended mid-message.
        @raise TruncatedStreamError: if it did.
        """
        if self._buffer.closed and len(self._buffer):
            raise TruncatedStreamError("return path ended inside a message", self._buffer.position)
        return NEED_DATA


@define
class ReturnPathEncoder:
    """
    Encodes return-path messages (run by the destination); remembers the
    block of the last page request like QEMU's C{mis->last_rb}.
    """

    _lastBlock: str | None = field(init=False, default=None)

    def reset(self) -> None:
        """
        Forget the last requested block (at LISTEN and at POSTCOPY_RESUME),
        so the next request is a REQ_PAGES_ID.
        """
        self._lastBlock = None

    def shut(self, value: int) -> bytes:
        """
        @param value: 0 for success, 1 for an input error.
        @return: SHUT.
        """
        return encodeMessage(RPMessage.SHUT, struct.pack(">I", value))

    def pong(self, value: int) -> bytes:
        """
        @param value: the PING value.
        @return: PONG.
        """
        return encodeMessage(RPMessage.PONG, struct.pack(">I", value))

    def requestPages(self, block: str, start: int, length: int, named: bool | None = None) -> bytes:
        """
        @param block: the RAMBlock idstr.
        @param start: the byte offset in the block.
        @param length: the length in bytes (the block's page size).
        @param named: force REQ_PAGES_ID (L{True}) or REQ_PAGES (L{False});
            default: named only when the block differs from the last one.
        @return: REQ_PAGES_ID or REQ_PAGES.
        """
        if named is None:
            named = block != self._lastBlock
        self._lastBlock = block
        if named:
            return encodeMessage(RPMessage.REQ_PAGES_ID, _reqPages.pack(start, length) + encodeStr8(block))
        return encodeMessage(RPMessage.REQ_PAGES, _reqPages.pack(start, length))

    def recvBitmap(self, block: str, bitmap: bytes) -> bytes:
        """
        @param block: the RAMBlock idstr.
        @param bitmap: the little-endian received bitmap (multiple of 8 bytes).
        @return: RECV_BITMAP with its trailing size, bitmap and end mark.
        @raise LocalProtocolError: for a bitmap not a multiple of 8 bytes.
        """
        if len(bitmap) % 8:
            raise LocalProtocolError(f"a received bitmap is 64-bit words, not {len(bitmap)} bytes")
        return (encodeMessage(RPMessage.RECV_BITMAP, encodeStr8(block)) + _be64.pack(len(bitmap))
                + bytes(bitmap) + _be64.pack(RECV_BITMAP_ENDING))

    def resumeAck(self, value: int = RESUME_ACK_VALUE) -> bytes:
        """
        @param value: the value (QEMU accepts only 1).
        @return: RESUME_ACK.
        """
        return encodeMessage(RPMessage.RESUME_ACK, struct.pack(">I", value))

    def encode(self, event: ReturnPathEvent) -> bytes:
        """
        Re-encode a decoded event exactly.

        @param event: a return-path event.
        @return: its bytes.
        """
        if isinstance(event, PagesRequested):
            return self.requestPages(event.block, event.start, event.length, event.named)
        if isinstance(event, RecvBitmapReceived):
            return self.recvBitmap(event.block, event.bitmap)
        if isinstance(event, ShutReceived):
            return self.shut(event.value)
        if isinstance(event, PongReceived):
            return self.pong(event.value)
        return self.resumeAck(event.value)
