# -*- test-case-name: tests.test_destination_qemu -*-
"""
A REAL QEMU 7.2 source (TCG, running the boot-sector guest that keeps
writing its RAM) migrating to our destination: precopy, and postcopy with
pages placed through a real userfaultfd.  After completion our RAM equals
the stopped source's RAM byte for byte.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from tests.enginevm import IncomingTestVM
from tests.test_source_qemu import RAM_RANGES, _freePort
from tests.uffdguest import FaultService, uffdOpen
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.qemu import QEMUInstance, qemuSkipReason, startBootedQEMU


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
        self.vm = IncomingTestVM()
        self.services: list[FaultService] = []
        self.manager = MigrationManager(reactor, self.vm, self._faults)

    def _faults(self, blocks, pageSource):
        """
        The destination's fault service factory (the test's real-kernel one).
        """
        service = FaultService(reactor, blocks, pageSource)
        self.services.append(service)
        return service

    @inlineCallbacks
    def _migrate(self, postcopy: bool):
        """
        Run one migration and check both ends; fires with QEMU's final query-migrate.
        """
        port = _freePort()
        if postcopy:
            try:
                os.close(uffdOpen())
            except OSError as error:
                raise SkipTest(f"userfaultfd unavailable: {error}")
            self.qemu.setCapabilities(**{"postcopy-ram": True})
            self.manager.setCapabilities({"postcopy-ram": True})
            self.qemu.setParameters(**{"max-bandwidth": 100000})
        listening = yield self.manager.migrateIncoming(f"tcp:127.0.0.1:{port}")
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{port}")
        if postcopy:
            yield qemuStatus(self.qemu, {"active"})
            self.qemu.qmp("migrate-start-postcopy")
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
        self.assertEqual(len(self.vm.devices), 1)
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
        pages through UFFDIO_COPY; QEMU completes on our SHUT(0).
        """
        info = yield self._migrate(True)
        self.assertEqual(self.services[0].uffd is not None, True)
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
