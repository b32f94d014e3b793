# -*- test-case-name: tests.test_snapshot_capture -*-
"""
Tests for L{twisted_postcopy.snapshot.capture}: L{CaptureVM} driven by
hand, and L{captureSnapshot} receiving a migration from the engine's own
source over loopback TCP (the real-QEMU captures are in
C{tests/test_qemu_capture.py}).
"""

from __future__ import annotations

import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from twisted_postcopy.testing.enginevm import OutgoingTestVM
from twisted_postcopy.errors import MigrationError, SnapshotError
from twisted_postcopy.interfaces import IIncomingVM
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.snapshot.capture import MAX_RAM, CaptureVM, captureSnapshot
from twisted_postcopy.snapshot.store import MANIFEST

PAGE = 4096
BLOB = b"captured device"
DEVICE = (b"\x04" + struct.pack(">I", 3) + b"\x15twisted-postcopy/test" + struct.pack(">III", 0, 1, len(BLOB))
          + BLOB + b"\x7e" + struct.pack(">I", 3))


class CaptureVMTests(SynchronousTestCase):
    """
    L{CaptureVM} through the L{IIncomingVM} calls.
    """

    def setUp(self) -> None:
        """
        A capture of two blocks.
        """
        self.path = self.mktemp()
        self.vm = CaptureVM(self.path)
        self.blocks = self.vm.ramBlocksListed([("pc.ram", 4 * PAGE, None), ("pc.rom", PAGE, 4096)])

    def test_interface(self) -> None:
        """
        It provides L{IIncomingVM} and creates one memfd block per listed
        block, in list order.
        """
        self.assertTrue(verifyObject(IIncomingVM, self.vm))
        self.assertEqual([(b.idstr, b.length) for b in self.blocks.values()],
                         [("pc.ram", 4 * PAGE), ("pc.rom", PAGE)])

    def test_completedStores(self) -> None:
        """
        At completion the pages, the device sections (concatenated in
        arrival order) and the form are stored.
        """
        self.blocks["pc.ram"].write(PAGE, b"p" * PAGE)
        self.vm.deviceStateReceived(DEVICE)
        self.vm.deviceStateReceived(b"more")
        self.vm.run()
        self.vm.completed()
        snapshot = self.successResultOf(self.vm.stored)
        self.assertEqual(snapshot.read("pc.ram", 0, 2 * PAGE), bytes(PAGE) + b"p" * PAGE)
        self.assertEqual(snapshot.deviceState(), DEVICE + b"more")
        self.assertEqual(snapshot.form, "precopy")
        self.assertEqual(snapshot.machine, "pc-i440fx-7.2")

    def test_packageForm(self) -> None:
        """
        A capture that went through LISTEN records the C{package} form.
        """
        self.vm.inPostcopy = lambda: True
        self.vm.completed()
        self.assertEqual(self.successResultOf(self.vm.stored).form, "package")

    def test_configuration(self) -> None:
        """
        A configuration reported by the decoder replaces the default.
        """
        raw = struct.pack(">I", 6) + b"q35-72"
        self.vm.configurationReceived(raw, "q35-72")
        self.vm.completed()
        snapshot = self.successResultOf(self.vm.stored)
        self.assertEqual((snapshot.machine, snapshot.configuration()), ("q35-72", raw))

    def test_failedStoresNothing(self) -> None:
        """
        A failed migration stores nothing and fails L{CaptureVM.stored}.
        """
        self.vm.failed(MigrationError("boom"))
        self.failureResultOf(self.vm.stored, SnapshotError)
        self.assertFalse(os.path.exists(os.path.join(self.path, MANIFEST)))

    def test_storeError(self) -> None:
        """
        A directory that already holds a snapshot fails the capture.
        """
        self.vm.completed()
        self.successResultOf(self.vm.stored)
        second = CaptureVM(self.path)
        second.ramBlocksListed([("pc.ram", PAGE, None)])
        second.completed()
        self.failureResultOf(second.stored, SnapshotError)

    def test_read(self) -> None:
        """
        A live capture reads with C{pread}: missing pages as zeros; ranges
        outside a block and unknown blocks are refused.
        """
        self.blocks["pc.rom"].write(0, b"r" * PAGE)
        self.assertEqual(self.vm.read("pc.rom", 10, 5), b"rrrrr")
        self.assertEqual(self.vm.read("pc.ram", 0, 3), b"\0\0\0")
        self.assertRaises(SnapshotError, self.vm.read, "pc.rom", PAGE - 1, 2)
        self.assertRaises(SnapshotError, self.vm.read, "vga.vram", 0, 1)

    def test_storeInWriterReleases(self) -> None:
        """
        The writer stores the snapshot and then releases every block (a
        daemon's writer runs in a thread, so the reactor does not unmap and
        free the memfds); once the store began, reads are refused (the
        memfds are the writer's).
        """
        jobs: list = []
        self.vm.runWriter = lambda function, *args: jobs.append((function, args)) or Deferred()
        self.blocks["pc.rom"].write(0, b"r" * PAGE)
        self.vm.completed()
        self.assertRaises(SnapshotError, self.vm.read, "pc.rom", 0, 1)
        self.assertRaises(SnapshotError, self.vm.readLive, "pc.rom", 0, 1)
        ((function, args),) = jobs
        self.assertTrue(all(b.fd >= 0 for b in self.blocks.values()))
        snapshot = function(*args)
        self.assertEqual([(b.fd, b.address) for b in self.blocks.values()], [(-1, 0), (-1, 0)])
        self.assertEqual(snapshot.read("pc.rom", 0, PAGE), b"r" * PAGE)

    def test_limits(self) -> None:
        """
        Absurd RAM sizes and page sizes other than 4 KiB and 2 MiB are
        refused.
        """
        self.assertRaises(MigrationError, CaptureVM(self.mktemp()).ramBlocksListed,
                          [("pc.ram", MAX_RAM + PAGE, None)])
        self.assertRaises(MigrationError, CaptureVM(self.mktemp()).ramBlocksListed,
                          [("pc.ram", 1 << 30, 1 << 30)])


class LoopbackCaptureTests(TestCase):
    """
    L{captureSnapshot} receiving the engine's own precopy migration.
    """

    @inlineCallbacks
    def test_precopy(self) -> None:
        """
        The stored snapshot holds the source's RAM and device section.
        """
        source = OutgoingTestVM({"pc.ram": 16 * PAGE, "pc.rom": PAGE}, DEVICE)
        self.addCleanup(lambda: [os.close(block.fd) for block in source.blocks])
        source.write(0, 3 * PAGE, b"x" * PAGE)
        source.write(1, 0, b"y" * 100)
        path = self.mktemp()
        listening, vm = captureSnapshot(reactor, "tcp:127.0.0.1:0", path, postcopy=False)
        port = yield listening
        manager = MigrationManager(reactor, source)
        manager.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        snapshot = yield vm.stored
        self.assertEqual((yield manager.whenStatus("completed", "failed")), "completed")
        expected = source.contents()
        self.assertEqual({b.idstr: snapshot.read(b.idstr, 0, b.length) for b in snapshot.blocks},
                         expected)
        self.assertEqual(snapshot.deviceState(), DEVICE)
        snapshot.verify()
