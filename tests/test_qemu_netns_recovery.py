# -*- test-case-name: tests.test_qemu_netns_recovery -*-
"""
Capture and restore across a silent cut, with real QEMU 7.2 peers in
network namespaces (L{twisted_postcopy.testing.netns}): a C{twistd postcopy
--role snapshot} daemon in one namespace captures a QEMU source running in
the other, the path is cut during postcopy, and the daemon recovers both
ends by itself (our destination listens again; the job resumes QEMU
through its QMP socket); then the daemon restores the snapshot into a
fresh QEMU across the same path, which is cut again during postcopy (our
source retries; the job pauses QEMU and issues its C{migrate-recover}).
No recovery command is issued by the test.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.snapshotqemu import LAYOUT, MEMORY_MIB, TIMEOUT, bootImage, requireQEMU
from twisted_postcopy.control.daemon import logTail, startDaemon
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.testing import netns
from twisted_postcopy.testing.cuts import sleep
from twisted_postcopy.testing.qemu import QEMUInstance, machineArguments
from twisted_postcopy.testing.qemubaseline import stopAndCheck

#: Bytes/s in postcopy: 32 MiB last several seconds, time for a cut.
BANDWIDTH = 4 << 20
#: Bytes/s of the restore: its RAM is mostly zero pages, cheap to send,
#: and requested pages go at once, so the background must be slower.
RESTORE_BANDWIDTH = 4 << 20
#: Seconds the path stays down (longer than the 2 s link timeout).
HOLD = 3.5


class QEMUNetnsRecoveryTests(TestCase):
    """
    A snapshot daemon and QEMU peers on either side of a cut path.
    """

    timeout = 240

    def setUp(self) -> Deferred:
        """
        The path, a short work directory, the boot image, the daemon in
        the destination namespace.
        """
        requireQEMU()
        self.path = netns.makePath()
        self.addCleanup(self.path.remove)
        self.workdir = tempfile.mkdtemp(prefix="pcnr-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.image = bootImage(self.workdir)
        self.rng = random.Random(11)
        started = Deferred.fromCoroutine(startDaemon(
            reactor, "snapd", Path(self.workdir), ["--role", "snapshot", "--insecure-migration"],
            wrapper=self.path.execIn(self.path.destination)))

        def keep(daemon: Any) -> None:
            self.daemon, self.client = daemon, daemon.client
            self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop(reactor)))

        return started.addCallback(keep)

    def qemu(self, name: str, *extra: str) -> tuple[QEMUInstance, str]:
        """
        Start a QEMU in the source namespace (the one the daemon is not in),
        with a second QMP monitor for the daemon's job (a QMP socket takes
        one client at a time, and the test holds the first).

        @param name: its name.
        @param extra: more QEMU arguments.
        @return: the running QEMU (killed at the end) and the job's QMP
            socket path.
        """
        home = os.path.join(self.workdir, name)
        os.makedirs(home)
        monitor = os.path.join(home, "job.sock")
        arguments = [*machineArguments(self.image, MEMORY_MIB), *extra,
                     "-qmp", f"unix:{monitor},server=on,wait=off"]
        qemu = QEMUInstance.start(home, arguments, name, wrapper=self.path.execIn(self.path.source))
        self.addCleanup(qemu.kill)
        return qemu, monitor

    async def until(self, check: Any, what: str, timeout: float = TIMEOUT) -> Any:
        """
        @param check: returns (a Deferred of, or an awaitable of) a value.
        @param what: for the failure message.
        @param timeout: seconds.
        @return: the first true value.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if hasattr(value, "__await__") or isinstance(value, Deferred):
                value = await value
            if value:
                return value
            await sleep(reactor, 0.05)
        what = what() if callable(what) else what
        snapshots = await self.client.querySnapshot()
        self.fail(f"timed out waiting for {what}; jobs {snapshots}; daemon log:\n{logTail(self.daemon.log, 40)}")

    async def cut(self, ours: Any, wait: bool = True) -> float:
        """
        Cut the path at a random moment for L{HOLD} seconds.

        @param ours: returns (an awaitable of) our side's migration status.
        @param wait: cut after a random 0.1 to 0.6 s (else at once).
        @return: seconds from the cut to our side's C{postcopy-paused}.
        """
        if wait:
            await sleep(reactor, self.rng.uniform(0.1, 0.6))
        before = ours()
        self.assertEqual(await before if hasattr(before, "__await__") else before, "postcopy-active",
                         "the migration left postcopy before the cut")
        self.path.cut()
        cutAt = time.monotonic()
        try:
            await self.until(lambda: _equals(ours(), "postcopy-paused"), "our side to pause", HOLD)
            paused = time.monotonic() - cutAt
            await sleep(reactor, max(0.0, HOLD - paused))
        finally:
            await deferToThread(self.path.restore)
        return paused

    def test_captureThenRestore(self) -> Deferred:
        """
        Both cuts are noticed by our side within the timeout and recovered
        with no command; the capture equals the QEMU source's RAM byte for
        byte, and the restored guest runs consistently.
        """
        return Deferred.fromCoroutine(self._captureThenRestore())

    async def _captureThenRestore(self) -> None:
        target = os.path.join(self.workdir, "snap")
        source, monitor = self.qemu("source")
        await deferToThread(source.waitSerial, 1, TIMEOUT)
        uri = await self.client.snapshotCapture(f"tcp:{netns.DESTINATION_ADDRESS}:4444", target,
                                                qmp=monitor)
        source.setCapabilities(**{"postcopy-ram": True, "return-path": True})
        source.setParameters(**{"max-bandwidth": BANDWIDTH, "max-postcopy-bandwidth": BANDWIDTH})
        source.migrate(uri)
        source.qmp("migrate-start-postcopy")
        await self.until(lambda: source.queryMigrate()["status"] == "postcopy-active", "QEMU postcopy")

        async def captureStatus() -> str:
            return (await self.client.querySnapshot())["capture"]["migration"].get("status")

        paused = await self.cut(captureStatus)
        self.assertLess(paused, 2.0 + 1.5)
        await self.until(lambda: source.queryMigrate()["status"] == "completed", "QEMU completed", 120)
        await self.until(lambda: _equals(self.client.querySnapshot(), "completed", "capture", "status"),
                         "capture stored")
        size = MEMORY_MIB << 20
        self.assertEqual(openSnapshot(target).read("pc.ram", 0, size), source.pmemsave(0, size))
        source.kill()

        destination, monitor = self.qemu("restored", "-incoming", "defer")
        destination.setCapabilities(**{"postcopy-ram": True})
        restoreURI = f"tcp:{netns.SOURCE_ADDRESS}:5555"
        destination.migrateIncoming(restoreURI)
        await self.client.snapshotRestore(target, [restoreURI], bandwidth=RESTORE_BANDWIDTH,
                                          qmp=[monitor])
        await self.until(lambda: destination.queryMigrate()["status"] == "postcopy-active", "restore postcopy")

        async def cloneStatus() -> str:
            return (await self.client.querySnapshot())["restores"][-1]["clones"][0].get("status")

        paused = await self.cut(cloneStatus, wait=False)
        self.assertLess(paused, 2.0 + 1.5)
        await self.until(lambda: destination.queryMigrate()["status"] == "completed",
                         lambda: f"restore completed: QEMU {destination.queryMigrate()}", 120)
        await self.until(lambda: _equals(self.client.querySnapshot(), "completed", "restores", -1, "status"),
                         "restore job completed")
        await deferToThread(destination.waitSerial, len(destination.serialOutput()) + 2, TIMEOUT)
        stopAndCheck(destination, LAYOUT)


async def _equals(value: Any, wanted: Any, *keys: Any) -> bool:
    """
    @param value: an awaitable.
    @param wanted: the expected value.
    @param keys: indexes into the awaited value.
    @return: whether it equals C{wanted}.
    """
    found = await value
    for key in keys:
        found = found[key]
    return found == wanted
