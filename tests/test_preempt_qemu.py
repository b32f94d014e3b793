# -*- test-case-name: tests.test_preempt_qemu -*-
"""
A REAL QEMU 7.2 source with C{postcopy-preempt} migrating to our
destination: the second connection is accepted as the preempt channel, a
faulting guest process on our side (a guest worker on the production fault
service) makes QEMU send requested pages on it,
and after completion our RAM equals the stopped source's RAM.
"""

from __future__ import annotations

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.test_destination_qemu import qemuStatus
from tests.test_migration_loopback import skipWithoutUserfaultfd
from tests.test_source_qemu import RAM_RANGES, _freePort
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.testing.qemu import qemuSkipReason, startBootedQEMU


class QEMUPreemptSourceTests(TestCase):
    """
    Source: C{qemu-system-x86_64} with C{postcopy-preempt}.  Destination:
    ours, with a faulting guest process.
    """

    skip = qemuSkipReason()
    timeout = 60

    def setUp(self) -> None:
        """
        Start QEMU and our destination manager.
        """
        skipWithoutUserfaultfd()
        self.qemu = startBootedQEMU(self, "source")
        self.vm = WorkerGuestVM(reactor)
        self.addCleanup(self.vm.close)
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)

    @inlineCallbacks
    def test_postcopyPreemptFromQEMU(self) -> None:
        """
        Postcopy with preempt from a running QEMU guest: both connections
        accepted by order, requested pages arrive on the preempt channel
        (QEMU counts postcopy requests), the channel ends with EOS, QEMU
        completes, and our RAM equals the stopped source's.
        """
        port = _freePort()
        capabilities = {"postcopy-ram": True, "postcopy-preempt": True}
        self.qemu.setCapabilities(**capabilities)
        self.manager.setCapabilities(capabilities)
        self.qemu.setParameters(**{"max-bandwidth": 100000, "max-postcopy-bandwidth": 1000000})
        listening = yield self.manager.migrateIncoming(f"tcp:127.0.0.1:{port}")
        self.addCleanup(listening.stopListening)
        # The guest reads once QEMU's preempt channel is up, so that its
        # requests can only be answered there.
        preemptUp: Deferred = Deferred()
        self.manager.destinationFactory.preempt.accepted.addCallback(
            lambda protocol: (preemptUp.callback(None), protocol)[1])
        self.vm.gate = preemptUp
        self.qemu.migrate(f"tcp:127.0.0.1:{port}")
        yield qemuStatus(self.qemu, {"active"})
        yield self.vm.ready
        self.qemu.qmp("migrate-start-postcopy")
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        preempt = self.manager.destinationFactory.preempt.preempt
        self.assertIsNotNone(preempt)
        yield preempt.ended
        digests = yield self.vm.done
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        self.assertGreater(info["ram"]["postcopy-requests"], 0)
        self.assertGreater(preempt.recordsReceived, 0)
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
