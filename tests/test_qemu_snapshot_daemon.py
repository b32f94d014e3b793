# -*- test-case-name: tests.test_qemu_snapshot_daemon -*-
"""
A C{twistd postcopy --role snapshot} daemon, driven over its control
API, captures a real QEMU 7.2 (TCG, 32 MiB, the boot-sector counting guest)
migrating by postcopy, serves live reads of the capture during postcopy
(through AMP and through C{postcopy snapshot read --control}), then
restores the snapshot by postcopy into a fresh QEMU, which must run
consistently.

The daemon is a child process, so the test may call QEMU's QMP
synchronously; its own waits on the daemon are polled with C{deferLater}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.snapshotqemu import LAYOUT, TIMEOUT, bootImage, requireQEMU, restoreTarget, runningSource
from twisted_postcopy.control.daemon import startDaemon
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.testing.qemubaseline import stopAndCheck

#: Seconds between polls.
POLL = 0.05


class SnapshotDaemonTests(TestCase):
    """
    Capture, live read and restore through a snapshot daemon.
    """

    timeout = 120

    def setUp(self) -> Deferred:
        """
        A short work directory (Unix socket paths are short), the boot
        image, and a running snapshot daemon.

        @return: a Deferred firing once the daemon answers.
        """
        requireQEMU()
        self.workdir = tempfile.mkdtemp(prefix="pcsd-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.image = bootImage(self.workdir)
        self.target = os.path.join(self.workdir, "snap")
        started = Deferred.fromCoroutine(
            startDaemon(reactor, "snapd", Path(self.workdir), ["--role", "snapshot"]))
        return started.addCallback(self._started)

    def _started(self, daemon: Any) -> None:
        """
        Keep the daemon and stop it at the end.

        @param daemon: the started L{Daemon}.
        """
        self.daemon, self.client = daemon, daemon.client
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop(reactor)))

    @inlineCallbacks
    def poll(self, check: Any, what: str) -> Any:
        """
        Call C{check()} until it returns something true.

        @param check: returns a value or a Deferred of one.
        @param what: what is awaited, for the failure message.
        @return: (a Deferred firing with) the first true value.
        """
        for _ in range(int(TIMEOUT / POLL)):
            value = yield check()
            if value:
                return value
            yield deferLater(reactor, POLL, lambda: None)
        self.fail(f"never reached: {what}")

    def captureStatus(self, *statuses: str, pageRequests: bool = False) -> Deferred:
        """
        @param statuses: capture statuses accepted.
        @param pageRequests: also require live reads to request pages.
        @return: a Deferred firing with the capture's C{query-snapshot}
            entry when it matches, else L{None}; a failed capture fails.
        """

        def check(info: dict) -> Any:
            capture = info["capture"]
            self.assertNotEqual(capture["status"], "failed", capture)
            if capture["status"] in statuses and (capture["page-requests"] or not pageRequests):
                return capture
            return None

        return Deferred.fromCoroutine(self.client.querySnapshot()).addCallback(check)

    def sourceStatus(self, source: Any, status: str) -> Any:
        """
        @param source: the QEMU source.
        @param status: the status awaited.
        @return: its C{query-migrate} once it has C{status}, else L{None}.
        """
        info = source.queryMigrate()
        self.assertNotEqual(info.get("status"), "failed", info)
        return info if info.get("status") == status else None

    def readThroughCommand(self, offset: int, length: int) -> bytes:
        """
        Run C{postcopy snapshot read --control} against the daemon.

        @param offset: byte offset in C{pc.ram}.
        @param length: byte count.
        @return: its standard output.
        """
        process = subprocess.run(
            [sys.executable, "-m", "twisted_postcopy.cli", "snapshot", "read", "--control",
             self.daemon.control, self.target, "pc.ram", hex(offset), str(length)],
            capture_output=True, timeout=TIMEOUT)
        self.assertEqual(process.returncode, 0, process.stderr.decode())
        return process.stdout

    @inlineCallbacks
    def test_captureLiveReadRestore(self) -> None:
        """
        The daemon captures a postcopy migration; live reads of pages not
        yet received equal the paused source's memory and made QEMU serve
        page requests; the stored snapshot holds the same bytes; the
        daemon's postcopy restore into a fresh QEMU completes and the guest
        runs consistently.
        """
        source = runningSource(self.workdir, self.image)
        self.addCleanup(source.kill)
        uri = yield Deferred.fromCoroutine(
            self.client.snapshotCapture("tcp:127.0.0.1:0", self.target))
        source.setCapabilities(**{"postcopy-ram": True, "return-path": True})
        source.setParameters(**{"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 1 << 20})
        source.migrate(uri)
        yield self.poll(lambda: self.sourceStatus(source, "active"), "source active")
        source.qmp("migrate-start-postcopy")
        yield self.poll(lambda: self.sourceStatus(source, "postcopy-active"), "postcopy-active")
        yield self.poll(lambda: self.captureStatus("postcopy-active", pageRequests=True),
                        "capture requests pages")
        offset, length = LAYOUT.end - 16 * 4096, 3 * 4096 + 100
        data = yield Deferred.fromCoroutine(
            self.client.snapshotRead(self.target, "pc.ram", offset, length))
        self.assertEqual(data, source.pmemsave(offset, length))
        self.assertGreater(source.queryMigrate()["ram"]["postcopy-requests"], 0)
        other = LAYOUT.end - 64 * 4096
        self.assertEqual(self.readThroughCommand(other, 4096), source.pmemsave(other, 4096))
        source.setParameters(**{"max-postcopy-bandwidth": 0})
        yield self.poll(lambda: self.captureStatus("completed"), "capture stored")
        yield self.poll(lambda: self.sourceStatus(source, "completed"), "source completed")
        self.assertEqual(openSnapshot(self.target).read("pc.ram", offset, length), data)
        yield self.restoreAndCheck()

    @inlineCallbacks
    def restoreAndCheck(self) -> Any:
        """
        Restore the capture by postcopy through the daemon into a fresh
        QEMU and check it completes and runs consistently.

        @return: a Deferred firing when checked.
        """
        qemu, uri = restoreTarget(self.workdir, "restored", self.image, True)
        self.addCleanup(qemu.kill)
        yield Deferred.fromCoroutine(self.client.snapshotRestore(self.target, [uri]))

        def restored() -> Deferred:
            def check(info: dict) -> Any:
                job = info["restores"][0]
                self.assertNotEqual(job["status"], "failed", job)
                return job if job["status"] == "completed" else None

            return Deferred.fromCoroutine(self.client.querySnapshot()).addCallback(check)

        job = yield self.poll(restored, "restore completed")
        self.assertEqual([clone["status"] for clone in job["clones"]], ["completed"])
        qemu.waitMigration(["completed"], TIMEOUT)
        qemu.waitSerial(len(qemu.serialOutput()) + 2, TIMEOUT)
        stopAndCheck(qemu, LAYOUT)
