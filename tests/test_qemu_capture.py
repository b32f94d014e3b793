# -*- test-case-name: tests.test_qemu_capture -*-
"""
Capture a running real QEMU 7.2 (TCG, 32 MiB, the boot-sector counting
guest) with C{postcopy snapshot capture}: plain precopy, and precopy
switched to postcopy by C{migrate-start-postcopy}.

QEMU's source is paused once its migration completed, so a C{pmemsave} of
it then is exactly what the snapshot must hold.  Each captured snapshot is
then restored the other way into a fresh QEMU, which must run consistently.

L{LiveReadTests} captures in-process (real reactor; QMP calls are short and
waits are polled with C{deferLater}) and reads a page of the live capture
during postcopy, which must come from the QEMU source by REQ_PAGES.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.snapshotqemu import (
    LAYOUT, MEMORY_MIB, TIMEOUT, bootImage, finish, requireQEMU, restoreTarget, runningSource,
    snapshotCommand, startCapture, summaries,
)
from twisted_postcopy.snapshot.capture import captureSnapshot
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.testing.bootsector import checkCounterPattern
from twisted_postcopy.testing.qemubaseline import MIB, stopAndCheck


class CaptureTests(SynchronousTestCase):
    """
    A real QEMU source migrating into our capture.
    """

    def setUp(self) -> None:
        """
        A directory, the boot image and a running source guest.
        """
        requireQEMU()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.image = bootImage(self.directory)
        self.source = runningSource(self.directory, self.image)
        self.addCleanup(self.source.kill)
        self.target = os.path.join(self.directory, "snapshot")

    def capture(self, postcopy: bool, returnPath: bool = False) -> dict:
        """
        Migrate the source into a capture, switching to postcopy
        mid-precopy when asked.

        @param postcopy: use postcopy (and the return path).
        @param returnPath: open the return path in precopy.
        @return: the source's final C{query-migrate}.
        """
        process, uri = startCapture(self.directory, self.target, postcopy)
        self.addCleanup(finish, process, 5)
        if returnPath:
            self.source.setCapabilities(**{"return-path": True})
        if postcopy:
            self.source.setCapabilities(**{"postcopy-ram": True, "return-path": True})
            # Precopy crawls, so migrate-start-postcopy always comes
            # before it could finish; postcopy then goes at full speed.
            self.source.setParameters(**{"max-bandwidth": 64 << 10})
        self.source.migrate(uri)
        if postcopy:
            self.source.waitMigration(["active"], TIMEOUT)
            self.source.qmp("migrate-start-postcopy")
        info = self.source.waitMigration(["completed"], TIMEOUT)
        code, _, err = finish(process)
        self.assertEqual(code, 0, err.decode())
        return info

    def assertMatchesSource(self) -> None:
        """
        The stored C{pc.ram} equals the paused source's memory above 1 MiB
        (below it, PAM and ROM shadowing make guest-physical differ from
        the block), and holds a consistent counter pattern.
        """
        snapshot = openSnapshot(self.target)
        snapshot.verify()
        stored = snapshot.read("pc.ram", 0, MEMORY_MIB * MIB)
        memory = self.source.pmemsave(0, MEMORY_MIB * MIB)
        self.assertTrue(stored[MIB:] == memory[MIB:], "captured RAM differs from the source")
        checkCounterPattern(stored, LAYOUT)

    def restoreInto(self, postcopy: bool) -> None:
        """
        Restore the capture into a fresh QEMU and check it runs
        consistently.

        @param postcopy: restore by postcopy.
        """
        qemu, uri = restoreTarget(self.directory, "restored", self.image, postcopy)
        self.addCleanup(qemu.kill)
        code, out, err = finish(snapshotCommand("restore", self.target, "--to", uri,
                                                *(["--postcopy"] if postcopy else [])))
        self.assertEqual(code, 0, err.decode())
        self.assertEqual([s["status"] for s in summaries(out)], ["completed"])
        qemu.waitMigration(["completed"], TIMEOUT)
        qemu.waitSerial(len(qemu.serialOutput()) + 2, TIMEOUT)
        stopAndCheck(qemu, LAYOUT)

    def test_precopy(self) -> None:
        """
        A precopy capture stores the device tail (form C{precopy}) and RAM
        equal to the source; it restores by postcopy.
        """
        info = self.capture(False)
        self.assertEqual(info["ram"]["postcopy-bytes"], 0)
        self.assertMatchesSource()
        self.assertEqual(openSnapshot(self.target).form, "precopy")
        self.restoreInto(True)

    def test_precopyReturnPath(self) -> None:
        """
        A precopy capture with QEMU's return path open completes on both
        sides (the capture answers PING and sends SHUT) and stores RAM
        equal to the source.
        """
        self.capture(False, returnPath=True)
        self.assertMatchesSource()

    def test_cancelled(self) -> None:
        """
        A migration cancelled on the QEMU side fails the capture: exit
        status 1, and no manifest (so no snapshot) is left behind.
        """
        process, uri = startCapture(self.directory, self.target)
        self.addCleanup(finish, process, 5)
        self.source.setParameters(**{"max-bandwidth": 1 << 20})
        self.source.migrate(uri)
        self.source.waitMigration(["active"], TIMEOUT)
        self.source.qmp("migrate_cancel")
        self.source.waitMigration(["cancelled"], TIMEOUT)
        code, _, err = finish(process)
        self.assertEqual(code, 1, err.decode())
        self.assertFalse(os.path.exists(os.path.join(self.target, "manifest.json")))

    def test_postcopy(self) -> None:
        """
        A capture switched to postcopy stores the package's device state
        (form C{package}) and RAM equal to the source; it restores by
        precopy.
        """
        info = self.capture(True)
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
        self.assertMatchesSource()
        self.assertEqual(openSnapshot(self.target).form, "package")
        self.restoreInto(False)


class LiveReadTests(TestCase):
    """
    Reading a capture while QEMU's postcopy is still sending.
    """

    timeout = 120

    @inlineCallbacks
    def waitStatus(self, qemu, status: str):
        """
        Poll C{query-migrate} without blocking the reactor.

        @param qemu: the QEMU source.
        @param status: the status awaited.
        @return: (a Deferred firing with) the matching answer.
        """
        for _ in range(int(TIMEOUT / 0.05)):
            info = qemu.queryMigrate()
            if info.get("status") == status:
                return info
            self.assertNotEqual(info.get("status"), "failed", info)
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"source never reached {status}")

    @inlineCallbacks
    def test_readLiveRequestsPages(self) -> None:
        """
        A live read of pages not yet received during postcopy makes QEMU's
        source serve page requests; the bytes equal the paused source's
        memory, and the stored snapshot holds the same bytes.
        """
        requireQEMU()
        directory = self.mktemp()
        os.makedirs(directory)
        source = runningSource(directory, bootImage(directory))
        self.addCleanup(source.kill)
        listening, vm = captureSnapshot(reactor, "tcp:127.0.0.1:0", os.path.join(directory, "snap"))
        port = yield listening
        source.setCapabilities(**{"postcopy-ram": True, "return-path": True})
        source.setParameters(**{"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 1 << 20})
        source.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield self.waitStatus(source, "active")
        source.qmp("migrate-start-postcopy")
        yield self.waitStatus(source, "postcopy-active")
        while not vm.inPostcopy():
            yield deferLater(reactor, 0.01, lambda: None)
        offset = LAYOUT.end - 16 * 4096
        data = yield vm.readLive("pc.ram", offset, 3 * 4096 + 100)
        self.assertEqual(data, source.pmemsave(offset, 3 * 4096 + 100))
        self.assertGreater(source.queryMigrate()["ram"]["postcopy-requests"], 0)
        source.setParameters(**{"max-postcopy-bandwidth": 0})
        snapshot = yield vm.stored
        yield self.waitStatus(source, "completed")
        self.assertEqual(snapshot.read("pc.ram", offset, len(data)), data)
