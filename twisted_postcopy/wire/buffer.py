# -*- test-case-name: tests.test_wire_buffer -*-
"""
The receive buffer shared by the decoders.

Like h11's C{ReceiveBuffer} it never copies the whole buffer per element
(no O(n^2)), but it keeps the received chunks as immutable L{bytes} instead
of one growing C{bytearray}: an element that lies inside one chunk is
parsed in place, so a page's memoryview is a zero-copy slice of the chunk
that stays valid however long it is held (a C{bytearray} with exported
views could not be resized).  Only an element that straddles two chunks is
copied, once it is complete: a join takes just what the element lacks, so
once the element is consumed parsing is back in the next chunk itself
(joining more would leave the next element straddling the joined piece,
and small records would then be joined one by one to the chunk's end);
from the third join of one element on, a join takes at least as many of
the pending bytes as are already joined, so an element a parser asks for
in many growing steps is still joined O(log n) times.
Parsers of elements made of many entries consume each entry as they read
it, so no element grows while its bytes trickle in.

A connection that reads into one preallocated buffer (C{recv_into}, see
L{twisted_postcopy.protocols.receive}) lends its bytes instead
(L{ReceiveBuffer.borrow}): they are parsed in place like a received chunk,
and when the caller is done with the events, L{ReceiveBuffer.release}
copies just the unconsumed rest, so the buffer can be read into again.

L{BufferedDecoder} is the feeding and pulling API every decoder shares.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Iterator, TypeVar

from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.wire.events import NEED_DATA, NeedData

_EventT = TypeVar("_EventT")


class ReceiveBuffer:
    """
    Bytes received but not yet consumed.

    The parser reads C{data} from C{offset} after L{ensure} said enough
    contiguous bytes are there, then calls L{advance}.

    @ivar data: the current contiguous chunk (immutable, or lent by
        L{borrow}).
    @ivar view: a memoryview of C{data}.
    @ivar offset: the index of the first unconsumed byte in C{data}.
    @ivar position: the stream offset of C{data[offset]}.
    @ivar closed: whether EOF (C{b""}) was received.
    """

    def __init__(self, position: int = 0) -> None:
        """
        @param position: the stream offset of the first byte to be fed.
        """
        self.data: bytes | memoryview = b""
        self.view = memoryview(self.data)
        self.offset = 0
        self.position = position
        self.closed = False
        self._pending: deque[tuple[bytes | memoryview, int]] = deque()
        self._pendingLength = 0
        self._joins = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """
        Add received bytes; C{b""} means EOF.

        @param data: the bytes (copied only if mutable).
        """
        if not data:
            self.closed = True
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        self._pending.append((data, 0))
        self._pendingLength += len(data)

    def borrow(self, view: memoryview) -> None:
        """
        Parse straight from the caller's memory (a connection's
        preallocated receive buffer): no copy, until L{release}.  Every
        event decoded meanwhile may hold views of that memory (a page's
        data); the caller acts on them before it releases the buffer and
        reads into it again.

        @param view: a non-empty memoryview of the received bytes.
        """
        self._pending.append((view, 0))
        self._pendingLength += len(view)

    def release(self) -> None:
        """
        The caller's memory is about to be reused: copy the unconsumed
        bytes lent by L{borrow} (at most the element still incomplete, and
        the chunks not parsed yet), so nothing here refers to it any more.
        Owned chunks are L{bytes}; lent ones are the only memoryviews.
        """
        if isinstance(self.data, memoryview):
            self._replace(bytes(self.data[self.offset:]), 0)
        pending = self._pending
        if any(isinstance(chunk, memoryview) for chunk, _ in pending):
            self._pending = deque((bytes(chunk[start:]), 0) if isinstance(chunk, memoryview) else (chunk, start)
                                  for chunk, start in pending)

    def __len__(self) -> int:
        """
        @return: the number of unconsumed bytes.
        """
        return len(self.data) - self.offset + self._pendingLength

    def ensure(self, count: int) -> bool:
        """
        Make C{count} unconsumed bytes contiguous in C{data} from C{offset}.

        @param count: how many bytes the parser needs.
        @return: whether that many bytes are available.
        """
        here = len(self.data) - self.offset
        if here >= count:
            return True
        if here + self._pendingLength < count:
            return False
        if here == 0:
            chunk, start = self._pending[0]
            if len(chunk) - start >= count:
                self._pending.popleft()
                self._pendingLength -= len(chunk) - start
                self._replace(chunk, start)
                return True
        # Join what the element lacks; an element asked for a third time
        # or more takes at least as many new bytes as are already here (or
        # all pending ones), so one that grows step by step causes O(log n)
        # joins, not one per step, and the copying stays linear.
        self._joins += 1
        want = count - here if self._joins < 3 else max(count - here, here)
        pieces = [memoryview(self.data)[self.offset:]]
        pieces.extend(self._take(min(self._pendingLength, want)))
        self._replace(b"".join(pieces), 0)
        return True

    def _replace(self, data: bytes, offset: int) -> None:
        """
        Make C{data} the current chunk.

        @param data: the chunk.
        @param offset: its first unconsumed byte.
        """
        self.data, self.view, self.offset = data, memoryview(data), offset

    def _take(self, count: int) -> list[memoryview]:
        """
        Remove C{count} bytes from the pending chunks.

        @param count: at most the pending length.
        @return: views of the removed bytes, in order.
        """
        pieces = []
        while count > 0:
            chunk, start = self._pending[0]
            available = len(chunk) - start
            if available <= count:
                pieces.append(memoryview(chunk)[start:])
                self._pending.popleft()
                taken = available
            else:
                pieces.append(memoryview(chunk)[start:start + count])
                self._pending[0] = (chunk, start + count)
                taken = count
            self._pendingLength -= taken
            count -= taken
        return pieces

    def advance(self, count: int) -> None:
        """
        Consume C{count} bytes (that L{ensure} made available).

        @param count: the number of bytes.
        """
        self.offset += count
        self.position += count
        self._joins = 0

    def takeUpTo(self, limit: int) -> list[memoryview]:
        """
        Consume up to C{limit} bytes, whatever their chunking.

        @param limit: the most bytes to take.
        @return: views of the consumed bytes, in order.
        """
        here = len(self.data) - self.offset
        pieces = []
        if here:
            count = min(here, limit)
            pieces.append(memoryview(self.data)[self.offset:self.offset + count])
            limit -= count
            self.advance(count)
        count = min(limit, self._pendingLength)
        pieces.extend(self._take(count))
        self.position += count
        return pieces

    def unread(self, data: bytes) -> None:
        """
        Put bytes back in front of the unconsumed ones (after L{takeUpTo}).

        @param data: the bytes, which must be the last ones taken.
        """
        if not data:
            return
        here = len(self.data) - self.offset
        if here:
            self._pending.appendleft((self.data, self.offset))
            self._pendingLength += here
        self._replace(data, 0)
        self.position -= len(data)


class BufferedDecoder(Generic[_EventT]):
    """
    The sans-IO API of a decoder: bytes in with L{receiveData}, events out
    with L{nextEvent} or L{events} (or both at once with L{decodeWhole}); the first protocol error is kept and
    raised again by every later call.

    A subclass (an attrs class) holds C{_buffer}, a L{ReceiveBuffer}, and
    C{_error} (L{None} until a failure), and decodes one element in
    C{_next}.
    """

    __slots__ = ()
    _buffer: ReceiveBuffer
    _error: RemoteProtocolError | None

    @property
    def position(self) -> int:
        """
        @return: the stream offset of the next byte to decode.
        """
        return self._buffer.position

    def receiveData(self, data: bytes | bytearray | memoryview) -> None:
        """
        Buffer received bytes (nothing is parsed here).

        @param data: the bytes; C{b""} means the input ended.
        """
        self._buffer.feed(data)

    def receiveBorrowed(self, view: memoryview) -> None:
        """
        Buffer received bytes that stay in the caller's memory until
        L{releaseBorrowed} (L{ReceiveBuffer.borrow}).

        @param view: the bytes (not empty).
        """
        self._buffer.borrow(view)

    def releaseBorrowed(self) -> None:
        """
        Copy what is still unconsumed of the borrowed bytes: the caller
        reuses its memory next.
        """
        self._buffer.release()

    def events(self) -> Iterator[_EventT]:
        """
        @return: an iterator of the events decodable now.
        """
        while (event := self.nextEvent()) is not NEED_DATA:
            yield event  # type: ignore[misc]

    def nextEvent(self) -> _EventT | NeedData:
        """
        Decode the next event.

        @return: the event, or L{NEED_DATA} (after EOF was fed: the end).
        @raise RemoteProtocolError: a subclass naming the offset and what
            was expected; the decoder then stays failed.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as e:
            self._error = e
            raise

    def decodeWhole(self, data: bytes | bytearray | memoryview) -> list[_EventT]:
        """
        Decode a complete input: feed it and its end, take every event.

        @param data: all the bytes (a recording, a package).
        @return: all its events.
        @raise RemoteProtocolError: for bad input, including a truncation.
        """
        self.receiveData(data)
        self.receiveData(b"")
        return list(self.events())

    def _next(self) -> _EventT | NeedData:
        """
        @return: the next event, or L{NEED_DATA}.
        """
        raise NotImplementedError(f"{type(self).__name__} must decode in _next")
