# -*- test-case-name: tests.test_ram_block -*-
"""
Tests for L{twisted_postcopy.ram.block}.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import RAMBlockError
from twisted_postcopy.ram.block import RAMBlock

PAGE = 4096


class RAMBlockTests(SynchronousTestCase):
    """
    Creation, precopy writes, discards and the source-side view (no
    userfaultfd involved).
    """

    def block(self, *args, **kwargs) -> RAMBlock:
        """
        @return: a block closed at cleanup.
        """
        block = RAMBlock(*args, **kwargs)
        self.addCleanup(block.close)
        return block

    def test_validation(self):
        """
        Unknown backings, wrong page sizes and lengths raise L{RAMBlockError}.
        """
        self.assertRaises(RAMBlockError, RAMBlock, "a", PAGE, backing="file")
        self.assertRaises(RAMBlockError, RAMBlock, "a", PAGE, pageSize=8192)
        self.assertRaises(RAMBlockError, RAMBlock, "a", PAGE + 1)
        self.assertRaises(RAMBlockError, RAMBlock, "a", 0)
        self.assertRaises(RAMBlockError, RAMBlock, "a", 2 << 20, 4096, "hugetlbfs")

    def test_writeAndView(self):
        """
        C{write} puts pages into the memfd (seen through the source-side
        view) and marks them received.
        """
        block = self.block("pc.ram", 8 * PAGE)
        data = os.urandom(2 * PAGE)
        block.write(3 * PAGE, data)
        self.assertEqual(bytes(block.view()[3 * PAGE : 5 * PAGE]), data)
        self.assertEqual(os.pread(block.fd, 2 * PAGE, 3 * PAGE), data)
        self.assertEqual(list(block.receivedMap.runs()), [(3, 2)])
        self.assertEqual(block.pages, 8)

    def test_receivedBitmap(self):
        """
        The received bitmap for the return path is QEMU's encoding of the
        received pages.
        """
        block = self.block("pc.ram", 130 * PAGE)
        block.write(64 * PAGE, bytes(PAGE))
        self.assertEqual(block.receivedBitmap(), bytes(8) + b"\x01" + bytes(15))

    def test_badRanges(self):
        """
        Unaligned or out-of-range writes and discards raise L{RAMBlockError}.
        """
        block = self.block("pc.ram", 8 * PAGE)
        self.assertRaises(RAMBlockError, block.write, 1, bytes(PAGE))
        self.assertRaises(RAMBlockError, block.write, 0, bytes(100))
        self.assertRaises(RAMBlockError, block.write, 8 * PAGE, bytes(PAGE))
        self.assertRaises(RAMBlockError, block.discard, 7 * PAGE, 2 * PAGE)

    def test_discardPunchesHole(self):
        """
        A discard on a memfd punches a hole: the data is gone, the file
        keeps its size, the received bits are cleared.
        """
        block = self.block("pc.ram", 8 * PAGE)
        block.write(0, b"\7" * (8 * PAGE))
        block.discard(2 * PAGE, 3 * PAGE)
        self.assertEqual(os.pread(block.fd, 8 * PAGE, 0), b"\7" * (2 * PAGE) + bytes(3 * PAGE) + b"\7" * (3 * PAGE))
        self.assertEqual(os.fstat(block.fd).st_size, 8 * PAGE)
        self.assertEqual(list(block.receivedMap.runs()), [(0, 2), (5, 3)])

    def test_writeZeroIsHole(self):
        """
        A precopy ZERO page punches a hole that counts as received and is
        marked in C{holeMap}; a later write or discard clears the hole bit;
        once registered the block refuses it.
        """
        block = self.block("pc.ram", 8 * PAGE)
        block.write(0, b"\7" * (4 * PAGE))
        block.writeZero(PAGE, 3 * PAGE)
        self.assertEqual(os.pread(block.fd, 4 * PAGE, 0), b"\7" * PAGE + bytes(3 * PAGE))
        self.assertEqual(list(block.receivedMap.runs()), [(0, 4)])
        self.assertEqual(list(block.holeMap.runs()), [(1, 3)])
        block.write(2 * PAGE, b"\1" * PAGE)
        block.discard(3 * PAGE, PAGE)
        self.assertEqual(list(block.holeMap.runs()), [(1, 1)])
        self.assertEqual(list(block.receivedMap.runs()), [(0, 3)])
        self.assertEqual(block.receivedBitmap(), bytes.fromhex("0700000000000000"))
        block.registered = True
        self.assertRaises(RAMBlockError, block.writeZero, 4 * PAGE, PAGE)

    def test_anonymous(self):
        """
        An anonymous block has no fd (no C{write}); a discard drops pages.
        """
        block = self.block("anon", 4 * PAGE, backing="anon")
        self.assertEqual(block.fd, -1)
        self.assertRaises(RAMBlockError, block.write, 0, bytes(PAGE))
        block.view()[:PAGE] = b"\3" * PAGE
        block.discard(0, PAGE)
        self.assertEqual(bytes(block.view()[:PAGE]), bytes(PAGE))

    def test_closeIdempotent(self):
        """
        C{close} releases the fd and mapping, and may be called twice.
        """
        block = RAMBlock("pc.ram", PAGE)
        fd = block.fd
        block.close()
        block.close()
        self.assertEqual((block.fd, block.address), (-1, 0))
        self.assertRaises(OSError, os.fstat, fd)
