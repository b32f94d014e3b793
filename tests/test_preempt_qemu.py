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
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.test_destination_qemu import qemuStatus
from tests.test_migration_loopback import skipWithoutUserfaultfd
from tests.test_source_qemu import RAM_RANGES
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

    #: How many pages near the end of C{pc.ram} the guest reads first.
    URGENT_PAGES = 32
    #: ... one every this many pages, going down.
    URGENT_STRIDE = 16

    def setUp(self) -> None:
        """
        Start QEMU and our destination manager; our guest first reads the
        L{URGENT_PAGES} pages, L{URGENT_STRIDE} apart, going down from the
        end of its largest block (C{pc.ram}).
        """
        skipWithoutUserfaultfd()
        self.qemu = startBootedQEMU(self, "source")
        self.vm = WorkerGuestVM(reactor, touchFirst=[-1 - self.URGENT_STRIDE * n for n in range(self.URGENT_PAGES)])
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)

    @inlineCallbacks
    def test_postcopyPreemptFromQEMU(self) -> None:
        """
        Postcopy with preempt from a running QEMU guest: both connections
        accepted by order, requested pages arrive on the preempt channel
        (QEMU counts postcopy requests), the channel ends with EOS, QEMU
        completes, and our RAM equals the stopped source's.

        The faults are made by construction, not by timing: QEMU's scan
        walks RAM from its start, and both bandwidths are 1000 B/s (at
        most one page or about a dozen zero pages per 100 ms window), so
        neither precopy nor the background stream can reach the end of
        the 32 MiB C{pc.ram} during the test, however loaded the machine.
        The guest first reads pages there, going down with gaps (after a
        request QEMU's scan continues from the requested page upwards, so
        it sends the pages just above on the main channel, never the next
        one read): each faults, is requested and (QEMU sends requested
        pages on the preempt channel) arrives there.  QEMU drops a request
        for a page it already sent, which is why a guest reading where the
        stream is (or has just been) proves nothing.  Then the throttle is
        lifted and the rest arrives.
        """
        capabilities = {"postcopy-ram": True, "postcopy-preempt": True}
        self.qemu.setCapabilities(**capabilities)
        self.manager.setCapabilities(capabilities)
        self.qemu.setParameters(**{"max-bandwidth": 1000, "max-postcopy-bandwidth": 1000})
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        port = listening.getHost().port
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{port}")
        yield qemuStatus(self.qemu, {"active"})
        yield self.manager.destinationFactory.preempt.accepted
        yield self.vm.ready
        self.qemu.qmp("migrate-start-postcopy")
        touched = yield self.vm.touchedFirst
        preempt = self.manager.destinationFactory.preempt.preempt
        self.assertEqual(preempt.recordsReceived, self.URGENT_PAGES, touched)
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 1 << 30})
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        yield preempt.ended
        digests = yield self.vm.done
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        self.assertGreaterEqual(info["ram"]["postcopy-requests"], self.URGENT_PAGES)
        self.assertGreaterEqual(preempt.recordsReceived, self.URGENT_PAGES)
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])

    @inlineCallbacks
    def test_precopyOnlyPreemptEndsCleanly(self) -> None:
        """
        With C{postcopy-preempt} on but no switch to postcopy, QEMU 7.2
        opens the preempt channel at the start and closes it without a byte
        once precopy completed: our end of it ends without an error (no
        failure is left for nobody to observe), and our RAM is QEMU's.
        """
        capabilities = {"postcopy-ram": True, "postcopy-preempt": True}
        self.qemu.setCapabilities(**capabilities)
        self.manager.setCapabilities(capabilities)
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{listening.getHost().port}")
        preempt = yield self.manager.destinationFactory.preempt.accepted
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        yield preempt.ended
        self.assertEqual((preempt.bytesReceived, preempt.recordsReceived), (0, 0))
        digests = yield self.vm.done
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
