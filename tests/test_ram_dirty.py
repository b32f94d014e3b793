# -*- test-case-name: tests.test_ram_dirty -*-
"""
Tests for L{twisted_postcopy.ram.dirty}: guest worker processes write
pages of a shared memfd; the tracker reports exactly those pages.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from twisted_postcopy.errors import MappingTableError
from twisted_postcopy.interfaces import IDirtyTracker
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.dirty import DirtyTracker
from twisted_postcopy.ram.faults import ClientMapping
from twisted_postcopy.ram.guestworker import spawnWorker
from twisted_postcopy.testing.real import requireWriteTracking

PAGE = 4096


class DirtyTrackerTests(TestCase):
    """
    Write tracking across processes with WP_ASYNC and PAGEMAP_SCAN.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Two memfd blocks (one half written by the source beforehand) and a
        tracker; skip when the kernel cannot track.
        """
        requireWriteTracking()
        self.blocks = [RAMBlock("pc.ram", 1024 * PAGE), RAMBlock("vga.vram", 16 * PAGE)]
        self.blocks[0].write(0, b"\x01" * (512 * PAGE))
        for block in self.blocks:
            self.addCleanup(block.close)
        self.tracker = DirtyTracker(self.blocks)
        self.addCleanup(self.tracker.stop)

    def spawn(self):
        """
        @return: a tracked worker, exited at cleanup.
        """
        worker = spawnWorker(reactor, self.tracker, self.blocks, mode="track")
        self.addCleanup(lambda: worker.ended if worker.ended.called else worker.exit())
        return worker

    @inlineCallbacks
    def write(self, worker, block, pages):
        """
        Have C{worker} write one byte in each page of C{pages}.
        """
        for page in pages:
            yield worker.command(op="touch", block=block, first=page, count=1, write=True)

    def test_provides(self):
        """
        L{DirtyTracker} provides L{IDirtyTracker}.
        """
        self.assertTrue(IDirtyTracker.providedBy(self.tracker))

    @inlineCallbacks
    def test_exactPages(self):
        """
        Exactly the written pages (populated or holes, any process) are
        reported, merged into runs; a second sync reports nothing.
        """
        first, second = self.spawn(), self.spawn()
        yield first.attached
        yield second.attached
        self.tracker.start()
        self.assertEqual(self.tracker.sync(), {"pc.ram": [], "vga.vram": []})
        yield self.write(first, 0, [5, 77, 900, 901])
        yield self.write(second, 0, [78, 511, 512])
        yield self.write(second, 1, [15])
        self.assertEqual(self.tracker.sync(), {
            "pc.ram": [(5 * PAGE, PAGE), (77 * PAGE, 2 * PAGE), (511 * PAGE, 2 * PAGE), (900 * PAGE, 2 * PAGE)],
            "vga.vram": [(15 * PAGE, PAGE)],
        })
        self.assertEqual(self.tracker.sync(), {"pc.ram": [], "vga.vram": []})
        yield self.write(first, 0, [5])
        self.assertEqual(self.tracker.sync()["pc.ram"], [(5 * PAGE, PAGE)])

    @inlineCallbacks
    def test_processExits(self):
        """
        A process that exited is dropped at the next sync, and all the pages
        it mapped count dirty (its last writes cannot be known); the others
        are still tracked.
        """
        first, second = self.spawn(), self.spawn()
        yield first.attached
        yield second.attached
        self.tracker.start()
        yield self.write(first, 0, [3])
        yield first.exit()
        yield self.write(second, 0, [4])
        dirty = self.tracker.sync()
        self.assertEqual(dirty, {"pc.ram": [(0, 1024 * PAGE)], "vga.vram": [(0, 16 * PAGE)]})
        self.assertEqual(len(self.tracker.processes), 1)
        yield self.write(second, 0, [4])
        self.assertEqual(self.tracker.sync()["pc.ram"], [(4 * PAGE, PAGE)])

    def test_badTable(self):
        """
        A mapping table naming an unknown block is refused.
        """
        self.assertRaises(MappingTableError, self.tracker.addProcess, -1,
                          [ClientMapping(0x10000, "nope", 0, PAGE)], 1)
