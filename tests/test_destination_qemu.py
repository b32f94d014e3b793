# -*- test-case-name: tests.test_destination_qemu -*-
"""
A REAL QEMU 7.2 source (TCG, running the boot-sector guest that keeps
writing its RAM) migrating to our destination: precopy, and postcopy with
pages placed by the production fault service while a guest worker process
reads all of its RAM through its own userfaultfd.  After completion our
RAM equals the stopped source's RAM byte for byte, and so does what the
guest read.
"""

from __future__ import annotations

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.test_migration_loopback import skipWithoutUserfaultfd
from tests.test_source_qemu import RAM_RANGES
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.testing.qemu import QEMUInstance, qemuSkipReason, startBootedQEMU
from twisted_postcopy.testing.waiting import waitUntil

#: QEMU's postcopy background until our guest worker faulted: 10 bytes/s
#: leave one byte per 100 ms window, so QEMU sends one page per window
#: (docs/testing.md) and the worker, reading all of RAM from RUN on,
#: surely reaches a page QEMU has not sent; then the limit is lifted (0).
CRAWL = 10


def qemuStatus(qemu: QEMUInstance, statuses: set[str], interval: float = 0.05) -> Deferred:
    """
    Poll QEMU's C{query-migrate} from the reactor.

    @return: a Deferred firing with the first answer whose status is in
        C{statuses} (or C{failed}).
    """
    done: Deferred = Deferred()

    def poll() -> None:
        """
        Query QEMU; fire or poll again.
        """
        info = qemu.queryMigrate()
        if info.get("status") in statuses | {"failed"}:
            done.callback(info)
        else:
            reactor.callLater(interval, poll)

    poll()
    return done


class QEMUSourceTests(TestCase):
    """
    Source: C{qemu-system-x86_64}.  Destination: ours.
    """

    skip = qemuSkipReason()
    timeout = 60

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        self.qemu = startBootedQEMU(self, "source")
        self.vm = WorkerGuestVM(reactor)
        self.addCleanup(self.vm.close)
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)

    @inlineCallbacks
    def _migrate(self, postcopy: bool):
        """
        Run one migration and check both ends; fires with QEMU's final query-migrate.
        """
        if postcopy:
            skipWithoutUserfaultfd()
            self.qemu.setCapabilities(**{"postcopy-ram": True})
            self.manager.setCapabilities({"postcopy-ram": True})
            self.qemu.setParameters(**{"max-bandwidth": 100000, "max-postcopy-bandwidth": CRAWL})
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        port = listening.getHost().port
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{port}")
        if postcopy:
            yield qemuStatus(self.qemu, {"active"})
            yield self.vm.ready
            self.qemu.qmp("migrate-start-postcopy")
            yield waitUntil(reactor, lambda: self.vm.service is not None and self.vm.service.faultCount > 0, 30)
            self.qemu.setParameters(**{"max-postcopy-bandwidth": 0})
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
        self.assertEqual(len(self.vm.devices), 1)
        digests = yield self.vm.done
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        return info

    @inlineCallbacks
    def test_precopyFromQEMU(self) -> None:
        """
        Precopy from a running QEMU guest completes on both sides.
        """
        yield self._migrate(False)
        self.assertEqual(self.vm.events, ["run", "completed"])

    @inlineCallbacks
    def test_postcopyFromQEMU(self) -> None:
        """
        Postcopy from a running QEMU guest: DISCARD, package, postcopy
        pages through UFFDIO_COPY; QEMU completes on our SHUT(0).  The
        guest worker faults by construction (QEMU's background crawls at
        one page per window until it did), and its faults became page
        requests QEMU served.
        """
        info = yield self._migrate(True)
        service = self.vm.service
        self.assertEqual(service.missingPages(), 0)
        self.assertEqual(service.uffd, -1, "the fault service stops once every page is placed")
        self.assertGreater(service.faultCount, 0, "the guest worker read its RAM through its userfaultfd")
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
        self.assertGreater(info["ram"]["postcopy-requests"], 0)
