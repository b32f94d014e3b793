# -*- test-case-name: tests.test_snapshot_restore -*-
"""
Tests for L{twisted_postcopy.snapshot.restore}: the snapshot as an
L{IOutgoingVM}, and restoring one snapshot into two of the engine's own
destinations at once over loopback TCP (the real-QEMU restores are in
C{tests/test_qemu_restore.py}).
"""

from __future__ import annotations

import hashlib
import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from twisted_postcopy.testing.enginevm import IncomingTestVM
from twisted_postcopy.errors import MigrationFailed, SnapshotError
from twisted_postcopy.interfaces import IOutgoingVM
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.snapshot.restore import SnapshotVM, restoreSnapshot, verifyInThread
from twisted_postcopy.snapshot.store import openSnapshot, writeSnapshot

PAGE = 4096
MACHINE = "pc-i440fx-7.2"
CONFIG = struct.pack(">I", len(MACHINE)) + MACHINE.encode()
BLOB = b"device state " * 10
#: One of our own device sections (C{be32 len} + blob), section id 3.
DEVICE = (b"\x04" + struct.pack(">I", 3) + b"\x15twisted-postcopy/test" + struct.pack(">III", 0, 1, len(BLOB))
          + BLOB + b"\x7e" + struct.pack(">I", 3))


def makeSnapshot(path: str, configuration: bytes = CONFIG) -> dict[str, bytes]:
    """
    Store a two-block snapshot.

    @param path: the directory.
    @param configuration: the configuration bytes.
    @return: idstr -> the block's content.
    """
    contents = {"pc.ram": bytes(range(256)) * 16 * 8 + bytes(8 * PAGE), "pc.rom": b"r" * PAGE}
    return storeContents(path, contents, configuration, DEVICE)


def storeContents(path: str, contents: dict[str, bytes], configuration: bytes, device: bytes) -> dict[str, bytes]:
    """
    Store a precopy snapshot of 4 KiB-page blocks with these contents.

    @param path: the directory.
    @param contents: idstr -> the block's bytes.
    @param configuration: the configuration section's bytes.
    @param device: the device sections' bytes.
    @return: C{contents}.
    """
    fds = []
    for data in contents.values():
        fd = os.memfd_create("content")
        os.write(fd, data)
        fds.append(fd)
    try:
        writeSnapshot(path, MACHINE, configuration, "precopy", device,
                      [(name, len(data), PAGE, fd) for (name, data), fd in zip(contents.items(), fds)])
    finally:
        for fd in fds:
            os.close(fd)
    return contents


class SnapshotVMTests(SynchronousTestCase):
    """
    L{SnapshotVM}.
    """

    def test_outgoingVM(self) -> None:
        """
        It provides L{IOutgoingVM}: the stored machine, blocks whose views
        hold the stored bytes, no dirty tracker, the stored device state.
        """
        path = self.mktemp()
        contents = makeSnapshot(path)
        vm = SnapshotVM(openSnapshot(path))
        self.assertTrue(verifyObject(IOutgoingVM, vm))
        self.assertEqual(vm.machine, MACHINE)
        self.assertIsNone(vm.dirtyTracker)
        self.assertEqual({b.idstr: bytes(b.view()) for b in vm.blocks}, contents)
        self.assertEqual(vm.deviceState(), DEVICE)
        vm.stop()
        vm.resume()

    def test_configurationSubsections(self) -> None:
        """
        A stored configuration the engine cannot reproduce is refused by
        name rather than restored wrongly.
        """
        path = self.mktemp()
        makeSnapshot(path, CONFIG + b"\x05\x11target-page-bits")
        error = self.assertRaises(SnapshotError, SnapshotVM, openSnapshot(path))
        self.assertIn("configuration.bin", str(error))

    def test_tamperedRefused(self) -> None:
        """
        L{restoreSnapshot} verifies hashes before connecting anywhere.
        """
        path = self.mktemp()
        makeSnapshot(path)
        with open(os.path.join(path, "ram", "0001.ram"), "r+b") as f:
            f.write(b"X")
        error = self.assertRaises(SnapshotError, restoreSnapshot, None, path, ["tcp:127.0.0.1:1"])
        self.assertIn("0001.ram", str(error))


class LoopbackRestoreTests(TestCase):
    """
    One snapshot restored into two engine destinations at once.
    """

    @inlineCallbacks
    def destination(self):
        """
        @return: (a Deferred firing with) an incoming VM and its URI.
        """
        vm = IncomingTestVM()
        manager = MigrationManager(reactor, vm)
        port = yield manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(lambda: [block.close() for block in vm.blocks.values()])
        return vm, manager, f"tcp:127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def test_clonesByPrecopy(self) -> None:
        """
        Both clones complete with every block's bytes and the device
        sections exactly as stored.
        """
        path = self.mktemp()
        contents = makeSnapshot(path)
        targets = []
        for _ in range(2):
            targets.append((yield self.destination()))
        managers, done = restoreSnapshot(reactor, path, [uri for _, _, uri in targets], postcopy=False)
        statuses = yield done
        self.assertEqual(statuses, ["completed", "completed"])
        for vm, manager, _ in targets:
            yield manager.whenStatus("completed")
            self.assertEqual(vm.contents(), contents)
            self.assertEqual(b"".join(vm.devices), DEVICE)

    @inlineCallbacks
    def test_holesNotSentByPostcopy(self) -> None:
        """
        By postcopy the snapshot's holes are not sent
        (C{x-skip-known-zero}): a clone whose guest reads every page gets
        the holes it faults on (with their 2 MiB windows), a clone nobody
        touches makes them zero itself at completion; both end with every
        block's bytes.  With the parameter at 0 every page is sent.
        """
        from twisted_postcopy.testing.real import requireUserfaultfd
        from twisted_postcopy.testing.workerguest import WorkerGuestVM

        requireUserfaultfd()
        path = self.mktemp()
        data = os.urandom(1 << 20)
        contents = storeContents(path, {"pc.ram": data + bytes(4 << 20) + data, "pc.rom": b"r" * PAGE},
                                 CONFIG, DEVICE)
        holePages = (4 << 20) // PAGE
        reading = WorkerGuestVM(reactor, touchFirst=[300, 700])
        self.addCleanup(reading.close)
        touched = MigrationManager(reactor, reading, reading.faultServiceFactory)
        untouched = (yield self.destination())
        kept = (yield self.destination())
        uris = []
        for manager in (touched, untouched[1], kept[1]):
            manager.setCapabilities({"postcopy-ram": True})
            if manager is touched:
                port = yield manager.migrateIncoming("tcp:127.0.0.1:0")
                self.addCleanup(port.stopListening)
                uris.append(f"tcp:127.0.0.1:{port.getHost().port}")
        uris += [untouched[2], kept[2]]
        (skipping, done) = restoreSnapshot(reactor, path, uris[:2], postcopy=True, bandwidth=64 << 10)
        (sending, sent) = restoreSnapshot(reactor, path, uris[2:], postcopy=True,
                                          parameters={"x-skip-known-zero": 0})
        yield reading.touchedFirst
        for manager in skipping:
            manager.setParameters({"max-bandwidth": 0, "max-postcopy-bandwidth": 0})
        self.assertEqual((yield done), ["completed", "completed"])
        self.assertEqual((yield sent), ["completed"])
        digests = yield reading.done
        self.assertEqual(digests, [hashlib.sha256(block).hexdigest() for block in contents.values()])
        for vm, manager, _ in (untouched, kept):
            yield manager.whenStatus("completed")
            self.assertEqual(vm.contents(), contents)
        pages = sum(len(block) for block in contents.values()) // PAGE
        counts = [(info["ram"]["normal"], info["ram"]["duplicate"])
                  for info in (m.queryMigrate() for m in skipping + sending)]
        self.assertEqual(counts[1], (513, pages - holePages - 513))
        self.assertEqual(counts[2], (513, pages - 513))
        self.assertEqual(counts[0][0], 513)
        self.assertGreaterEqual(counts[0][1], 256 + 512)
        self.assertLessEqual(counts[0][1], holePages)

    @inlineCallbacks
    def test_unreachable(self) -> None:
        """
        A destination that does not listen fails the restore with
        L{MigrationFailed} naming it.
        """
        path = self.mktemp()
        makeSnapshot(path)
        _, done = restoreSnapshot(reactor, path, ["tcp:127.0.0.1:1"], postcopy=False)
        error = yield self.assertFailure(done, MigrationFailed)
        self.assertIn("tcp:127.0.0.1:1", str(error))


class VerifyInThreadTests(TestCase):
    """
    L{verifyInThread}.
    """

    @inlineCallbacks
    def test_verified(self) -> None:
        """
        An intact snapshot comes back opened; a tampered one fails with
        L{SnapshotError} naming the file.
        """
        path = self.mktemp()
        makeSnapshot(path)
        snapshot = yield verifyInThread(reactor, path)
        self.assertEqual(snapshot.machine, MACHINE)
        with open(os.path.join(path, "configuration.bin"), "r+b") as f:
            f.write(b"\1")
        error = yield self.assertFailure(verifyInThread(reactor, path), SnapshotError)
        self.assertIn("configuration.bin", str(error))
