# -*- test-case-name: tests.test_ram_bitmap -*-
"""
Tests for L{twisted_postcopy.ram.bitmap}.
"""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import BitmapError
from twisted_postcopy.ram.bitmap import PageBitmap


def naiveRuns(bits: list[bool], value: bool = True) -> list[tuple[int, int]]:
    """
    @return: runs of C{value} in a list of booleans, the slow way.
    """
    runs, start = [], None
    for i, bit in enumerate(bits + [not value]):
        if bit == value and start is None:
            start = i
        elif bit != value and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


class PageBitmapTests(SynchronousTestCase):
    """
    Bits, runs and QEMU's encoding.
    """

    def test_setClearTest(self):
        """
        Setting and clearing ranges that straddle byte boundaries.
        """
        bitmap = PageBitmap(100)
        bitmap.set(3, 30)
        bitmap.clear(10, 2)
        self.assertEqual(bitmap.count(), 28)
        self.assertTrue(bitmap.test(3) and bitmap.test(32) and not bitmap.test(33) and not bitmap.test(10))
        self.assertEqual(list(bitmap.runs()), [(3, 7), (12, 21)])
        self.assertEqual(list(bitmap.runs(False)), [(0, 3), (10, 2), (33, 67)])

    def test_outOfRange(self):
        """
        Ranges outside the bitmap raise L{IndexError}.
        """
        self.assertRaises(IndexError, PageBitmap(10).set, 8, 3)
        self.assertRaises(IndexError, PageBitmap(10).clear, -1)

    def test_qemuEncoding(self):
        """
        Page C{i} is bit C{i % 64} of little-endian u64 word C{i // 64},
        padded to whole words.
        """
        bitmap = PageBitmap(130)
        for page in (0, 63, 64, 129):
            bitmap.set(page)
        words = struct.unpack("<3Q", bitmap.toBytes())
        self.assertEqual(words, (1 | 1 << 63, 1, 1 << 1))
        self.assertEqual(PageBitmap.fromBytes(130, bitmap.toBytes()), bitmap)

    def test_fromBytesLength(self):
        """
        A received bitmap of the wrong length raises L{BitmapError}; bits
        past the last page are ignored.
        """
        self.assertRaises(BitmapError, PageBitmap.fromBytes, 130, bytes(16))
        self.assertEqual(PageBitmap.fromBytes(3, b"\xff" * 8).count(), 3)

    def test_scaled(self):
        """
        Scaling turns each bit into C{factor} bits.
        """
        bitmap = PageBitmap(3)
        bitmap.set(1)
        finer = bitmap.scaled(512)
        self.assertEqual((finer.pages, list(finer.runs())), (1536, [(512, 512)]))

    @given(st.lists(st.booleans(), min_size=1, max_size=300))
    def test_runsMatchNaive(self, bits):
        """
        Run iteration and the encoding round trip agree with a naive model.
        """
        bitmap = PageBitmap(len(bits))
        for page, bit in enumerate(bits):
            if bit:
                bitmap.set(page)
        self.assertEqual(list(bitmap.runs()), naiveRuns(bits))
        self.assertEqual(list(bitmap.runs(False)), naiveRuns(bits, False))
        self.assertEqual(bitmap.count(), sum(bits))
        self.assertEqual(bitmap.all(), all(bits))
        self.assertEqual(PageBitmap.fromBytes(len(bits), bitmap.toBytes()), bitmap)

    @given(st.lists(st.booleans(), min_size=1, max_size=100), st.data())
    def test_anySetMatchesNaive(self, bits, data):
        """
        C{anySet} over any range agrees with a naive model; a range past
        the end raises L{IndexError}.
        """
        bitmap = PageBitmap(len(bits))
        for page, bit in enumerate(bits):
            if bit:
                bitmap.set(page)
        first = data.draw(st.integers(0, len(bits)))
        count = data.draw(st.integers(0, len(bits) - first))
        self.assertEqual(bitmap.anySet(first, count), any(bits[first : first + count]))
        self.assertRaises(IndexError, bitmap.anySet, first, len(bits) - first + 1)
