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
