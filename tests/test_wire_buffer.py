# -*- test-case-name: tests.test_wire_buffer -*-
"""
Tests for L{twisted_postcopy.wire.buffer}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.wire.buffer import ReceiveBuffer


class ReceiveBufferTests(SynchronousTestCase):
    """
    L{ReceiveBuffer} makes bytes contiguous only when an element straddles
    chunks, and tracks the stream position.
    """

    def test_ensureWithinOneChunkDoesNotCopy(self) -> None:
        """
        An element inside one fed chunk is parsed in that very chunk.
        """
        buffer = ReceiveBuffer()
        chunk = b"abcdefgh" * 4
        buffer.feed(chunk)
        self.assertTrue(buffer.ensure(10))
        self.assertIs(buffer.data, chunk)
        buffer.advance(10)
        self.assertEqual((buffer.offset, buffer.position, len(buffer)), (10, 10, 22))

    def test_ensureAcrossChunksJoinsOnlyWhatIsNeeded(self) -> None:
        """
        A straddling element is joined from the remainder and just enough of
        the next chunk; the rest of that chunk stays pending.
        """
        buffer = ReceiveBuffer(position=100)
        buffer.feed(b"0123")
        buffer.feed(b"456789")
        self.assertTrue(buffer.ensure(6))
        self.assertEqual(buffer.data[buffer.offset:], b"012345")
        buffer.advance(6)
        self.assertEqual(buffer.position, 106)
        self.assertTrue(buffer.ensure(4))
        self.assertEqual(bytes(buffer.data[buffer.offset:buffer.offset + 4]), b"6789")

    def test_ensureWithoutEnoughData(self) -> None:
        """
        L{ReceiveBuffer.ensure} returns L{False} and consumes nothing while
        too few bytes are there.
        """
        buffer = ReceiveBuffer()
        buffer.feed(b"ab")
        self.assertFalse(buffer.ensure(3))
        buffer.feed(b"c")
        self.assertTrue(buffer.ensure(3))
        self.assertEqual(len(buffer), 3)

    def test_emptyFeedCloses(self) -> None:
        """
        Feeding C{b""} marks the end of the input.
        """
        buffer = ReceiveBuffer()
        self.assertFalse(buffer.closed)
        buffer.feed(b"")
        self.assertTrue(buffer.closed)

    def test_mutableInputIsCopied(self) -> None:
        """
        A fed C{bytearray} is copied, so later changes to it do not reach
        views handed out by the decoder.
        """
        buffer = ReceiveBuffer()
        data = bytearray(b"xyz")
        buffer.feed(data)
        data[0] = 0
        buffer.ensure(3)
        self.assertEqual(bytes(buffer.view[:3]), b"xyz")

    def test_takeUpToAndUnread(self) -> None:
        """
        L{ReceiveBuffer.takeUpTo} consumes across chunks and
        L{ReceiveBuffer.unread} puts bytes back in front.
        """
        buffer = ReceiveBuffer()
        for piece in (b"ab", b"cd", b"ef"):
            buffer.feed(piece)
        buffer.ensure(1)
        taken = b"".join(bytes(p) for p in buffer.takeUpTo(5))
        self.assertEqual((taken, buffer.position, len(buffer)), (b"abcde", 5, 1))
        buffer.unread(b"de")
        self.assertEqual(buffer.position, 3)
        buffer.ensure(3)
        self.assertEqual(bytes(buffer.data[buffer.offset:buffer.offset + 3]), b"def")

    def test_byteByByteIsLinear(self) -> None:
        """
        Feeding a large element one byte at a time while asking for it each
        time does not copy the buffer per byte: the element is joined once.
        """
        buffer = ReceiveBuffer()
        size = 50_000
        joins = 0
        for i in range(size):
            buffer.feed(b"x")
            before = buffer.data
            if buffer.ensure(size) and buffer.data is not before:
                joins += 1
        self.assertEqual(joins, 1)

    def test_backInTheChunkAfterAStraddle(self) -> None:
        """
        A straddling element is joined with just what it lacks, so once it
        is consumed the next element is parsed in the next chunk itself
        (not in joined copies, element by element, to the chunk's end).
        """
        buffer = ReceiveBuffer()
        second = b"B" * 100
        buffer.feed(b"A" * 5)
        buffer.feed(second)
        self.assertTrue(buffer.ensure(8))
        self.assertTrue(buffer.ensure(9))
        self.assertEqual(bytes(buffer.data), b"A" * 5 + b"B" * 4)
        buffer.advance(9)
        self.assertTrue(buffer.ensure(9))
        self.assertIs(buffer.data, second)
        self.assertEqual(buffer.offset, 4)

    def test_growingElementJoinsDouble(self) -> None:
        """
        From its third join on, an element asked for in growing steps
        takes at least as many bytes as are joined already.
        """
        buffer = ReceiveBuffer()
        for _ in range(100):
            buffer.feed(b"x" * 10)
        for count in (11, 12, 13):
            self.assertTrue(buffer.ensure(count))
        self.assertEqual(len(buffer.data), 24)


class BorrowTests(SynchronousTestCase):
    """
    L{ReceiveBuffer.borrow} parses a connection's receive buffer in place;
    L{ReceiveBuffer.release} copies only what is left, so the buffer can be
    read into again (L{twisted_postcopy.protocols.receive}).
    """

    def test_parsedInPlace(self) -> None:
        """
        An element inside the lent bytes is parsed in them, not in a copy.
        """
        memory = bytearray(b"abcdefgh")
        buffer = ReceiveBuffer()
        buffer.borrow(memoryview(memory))
        self.assertTrue(buffer.ensure(4))
        self.assertIs(buffer.data.obj, memory)

    def test_releaseCopiesTheRest(self) -> None:
        """
        After L{ReceiveBuffer.release} the unconsumed lent bytes, current
        and pending, are the buffer's own: overwriting the lent memory
        changes nothing, and an element straddling the next read is whole.
        """
        memory = bytearray(8)
        view = memoryview(memory)
        buffer = ReceiveBuffer()
        memory[:] = b"01234567"
        buffer.borrow(view[:8])
        buffer.ensure(3)
        buffer.advance(3)
        buffer.release()
        memory[:] = b"ABCDEFGH"
        buffer.borrow(view[:4])
        buffer.borrow(view[4:8])
        self.assertTrue(buffer.ensure(6))
        self.assertEqual(bytes(buffer.data[buffer.offset:buffer.offset + 6]), b"34567A")
        buffer.advance(6)
        buffer.release()
        memory[:] = b"zzzzzzzz"
        self.assertTrue(buffer.ensure(7))
        self.assertEqual(bytes(buffer.data[buffer.offset:buffer.offset + 7]), b"BCDEFGH")
        self.assertNotIsInstance(buffer.data, memoryview)

    def test_streamThroughOneReusedBuffer(self) -> None:
        """
        A real QEMU 7.2 postcopy stream read through one small receive
        buffer, overwritten after every read, decodes to the same events as
        the whole recording, page data included.
        """
        import os

        from twisted_postcopy.wire import NEED_DATA, StreamDecoder
        from twisted_postcopy.wire import events as e
        from twisted_postcopy.wire.constants import RAM_FLAGS_MASK, TARGET_PAGE_SIZE, RAMFlag

        path = os.path.join(os.path.dirname(__file__), "data", "qemu72-postcopy-pc-32m.main.mig")
        with open(path, "rb") as f:
            stream = f.read()

        def owned(event):
            """
            @return: the event's records as (block, offset, page or fill)
                (a run's size depends on where reads end), or the event.
            """
            if isinstance(event, e.RAMRecordsReceived):
                data = event.data
                return [(event.block, word & ~RAM_FLAGS_MASK,
                         bytes(data[at:at + TARGET_PAGE_SIZE]) if word & RAMFlag.PAGE else data[at])
                        for word, at in zip(event.words, event.payloads)]
            if isinstance(event, e.PageReceived):
                return [(event.block, event.offset, bytes(event.data))]
            if isinstance(event, e.ZeroPageReceived):
                return [(event.block, event.offset, event.fill)]
            return [event]

        expected = [item for event in StreamDecoder(ramBatch=64).decodeWhole(stream) for item in owned(event)]
        memory = bytearray(10007)
        view = memoryview(memory)
        decoder = StreamDecoder(ramBatch=64)
        events = []
        for start in range(0, len(stream), len(memory)):
            piece = stream[start:start + len(memory)]
            memory[:len(piece)] = piece
            decoder.receiveBorrowed(view[:len(piece)])
            while (event := decoder.nextEvent()) is not NEED_DATA:
                events.extend(owned(event))
            decoder.releaseBorrowed()
            memory[:] = b"\xaa" * len(memory)
        decoder.receiveData(b"")
        events.extend(item for event in decoder.events() for item in owned(event))
        self.assertGreater(sum(isinstance(item, tuple) for item in expected), 1000)
        self.assertEqual(len(events), len(expected))
        self.assertEqual(events, expected)
