# -*- test-case-name: tests.test_wire_preempt -*-
"""
The postcopy preempt channel: raw RAM records (no header, sections or
commands) up to one EOS record, with its own CONTINUE "last block".
"""

from __future__ import annotations

from typing import Iterable

from attrs import define, field

from twisted_postcopy.errors import RemoteProtocolError, TruncatedStreamError, UnknownElementError
from twisted_postcopy.wire.buffer import BufferedDecoder, ReceiveBuffer
from twisted_postcopy.wire.events import NEED_DATA, NeedData, RAMBlockInfo, RAMSectionEOS
from twisted_postcopy.wire.ram import RAMChannelEncoder, RAMEvent, RAMRecordDecoder


@define
class PreemptDecoder(BufferedDecoder[RAMEvent]):
    """
    Incremental decoder of a preempt channel (C{receiveData},
    C{nextEvent}, C{events} from L{BufferedDecoder}).

    @ivar blocks: the RAMBlocks (from the main stream's START list).
    @ivar offset: the stream offset of the first byte fed.
    """

    blocks: tuple[RAMBlockInfo, ...] = field(converter=tuple)
    offset: int = 0
    _buffer: ReceiveBuffer = field(init=False)
    _ram: RAMRecordDecoder = field(init=False, factory=RAMRecordDecoder)
    _ended: bool = field(init=False, default=False)
    _error: RemoteProtocolError | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        """
        Create the buffer and learn the block lengths.
        """
        self._buffer = ReceiveBuffer(self.offset)
        self._ram.lengths.update((block.idstr, block.length) for block in self.blocks)

    @property
    def complete(self) -> bool:
        """
        @return: whether the EOS record was decoded.
        """
        return self._ended

    def _next(self) -> RAMEvent | NeedData:
        """
        @return: the next event, or L{NEED_DATA}.
        """
        buffer = self._buffer
        if self._ended:
            if len(buffer):
                raise UnknownElementError("data after the preempt channel's EOS (expected the end)",
                                          buffer.position)
            return NEED_DATA
        event = self._ram.nextRecord(buffer)
        if event is NEED_DATA:
            if buffer.closed:
                raise TruncatedStreamError("preempt channel ended before its EOS record", buffer.position)
            return NEED_DATA
        if isinstance(event, RAMSectionEOS):
            self._ended = True
        return event


@define
class PreemptEncoder(RAMChannelEncoder):
    """
    Encodes a preempt channel: urgent pages, then EOS (C{page},
    C{zeroPage}, C{eos}, C{resetLastBlock} from L{RAMChannelEncoder}).

    @ivar alwaysNameBlock: never use CONTINUE (what QEMU 7.2 effectively
        does: it names the block after every channel switch).
    """

    alwaysNameBlock: bool = True

    def encodeEvents(self, events: Iterable[RAMEvent]) -> bytes:
        """
        Re-encode decoded events exactly.

        @param events: page, zero page and EOS events.
        @return: the bytes.
        """
        return b"".join(piece for event in events for piece in self._ram.encode(event))
