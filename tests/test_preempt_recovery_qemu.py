# -*- test-case-name: tests.test_preempt_recovery_qemu -*-
"""
Postcopy recovery with the preempt channel: a REAL QEMU 7.2 source with
C{postcopy-preempt} migrating to our destination (a guest process faulting
through userfaultfd) is cut during postcopy; after our C{migrate-recover}
and QEMU's C{migrate resume}, our recovery listener takes QEMU's second new
connection as the new preempt channel (return-path-preempt-recovery.md
section 4.7), the pages awaited while paused are requested again (a
REQ_PAGES_ID right after RESUME_ACK), requested pages arrive on the new
preempt channel, and both sides complete with our RAM equal to the source's.
"""

from __future__ import annotations

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.test_destination_qemu import qemuStatus
from tests.test_migration_loopback import skipWithoutUserfaultfd
from tests.test_recovery_loopback import within
from tests.test_source_qemu import RAM_RANGES
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.qemu import qemuSkipReason, startBootedQEMU
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.testing.workerguest import WorkerGuestVM

#: RP RESUME_ACK(1).
RESUME_ACK = bytes.fromhex("0006 0004 00000001")


class QEMUPreemptRecoveryTests(TestCase):
    """
    Source: C{qemu-system-x86_64} with C{postcopy-preempt}.  Destination:
    ours, with a faulting guest process.
    """

    skip = qemuSkipReason()
    timeout = 90

    def setUp(self) -> None:
        """
        Start QEMU and our destination manager.
        """
        skipWithoutUserfaultfd()
        self.qemu = startBootedQEMU(self, "source")
        self.vm = WorkerGuestVM(reactor)
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)

    def relay(self, port: int) -> RecordingRelay:
        """
        @param port: our listening port.
        @return: a relay to it, closed at cleanup.
        """
        relay = RecordingRelay(("127.0.0.1", port))
        self.addCleanup(relay.close)
        return relay

    @inlineCallbacks
    def preemptPostcopy(self):
        """
        QEMU migrates into our destination through a relay with
        C{postcopy-preempt} on both sides and its streams throttled, and
        switches to postcopy.

        @return: a Deferred firing with (the relay, our accepted preempt
            channel's protocol).
        """
        capabilities = {"postcopy-ram": True, "postcopy-preempt": True}
        self.qemu.setCapabilities(**capabilities)
        self.manager.setCapabilities(capabilities)
        self.qemu.setParameters(**{"max-bandwidth": 100000, "max-postcopy-bandwidth": 50000})
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        first = self.relay(listening.getHost().port)
        self.qemu.migrate(first.uri)
        yield qemuStatus(self.qemu, {"active"})
        yield self.vm.ready
        self.qemu.qmp("migrate-start-postcopy")
        yield within(self.manager.whenStatus("postcopy-active"))
        original = yield within(self.manager.destinationFactory.preempt.accepted)
        return first, original

    @inlineCallbacks
    def test_preemptChannelAfterRecovery(self) -> None:
        """
        Cut both connections in postcopy; recover; the new preempt channel
        is accepted and carries pages; awaited pages are re-requested;
        both complete; RAM equal.
        """
        first, original = yield self.preemptPostcopy()
        yield deferLater(reactor, 0.1, lambda: None)
        first.cut()
        paused = yield within(self.manager.whenStatus("postcopy-paused", "failed", "completed"))
        self.assertEqual(paused, "postcopy-paused", (self.manager.queryMigrate(), str(self.vm.failure),
                                                     self.manager.incoming.machine.postcopy))
        yield qemuStatus(self.qemu, {"postcopy-paused"})
        for _ in range(1000):
            if len(self.manager.incoming.faults.pending) or self.vm.done.called:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(len(self.manager.incoming.faults.pending), "the paused guest has no fault waiting")
        port = yield self.manager.migrateRecover("tcp:127.0.0.1:0")
        second = self.relay(port.getHost().port)
        self.qemu.qmp("migrate", uri=second.uri, resume=True)
        yield within(self.manager.whenStatus("postcopy-active"), 30)
        channels = self.manager.recovery.factory.preemptChannels
        for _ in range(1000):
            if channels:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        (channel,) = channels
        self.assertIsNot(channel, original)
        for _ in range(2000):
            if channel.recordsReceived or self.vm.done.called:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertGreater(channel.recordsReceived, 0, "no page on the new preempt channel")
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 0})
        ours = yield within(self.manager.whenStatus("completed", "failed"), 60)
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        yield within(channel.ended)
        second.waitClosed(30)
        self.assertEqual(len(second.connections), 2)
        backward = bytes(second.connections[0].backward)
        after = backward[backward.index(RESUME_ACK) + len(RESUME_ACK):]
        self.assertEqual(after[:2], bytes.fromhex("0003"), "REQ_PAGES_ID after RESUME_ACK")
        digests = yield self.vm.done
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])

    @inlineCallbacks
    def test_preemptChannelCut(self) -> None:
        """
        Only the preempt channel is cut during postcopy: our destination
        notices it like a broken main channel (C{postcopy-paused}, and it
        shuts the main connection so that QEMU pauses too); after
        C{migrate-recover} and QEMU's C{migrate resume} a new preempt
        channel comes, both sides complete (ours only after that channel's
        EOS) and our RAM equals the source's.
        """
        first, original = yield self.preemptPostcopy()
        main, preempt = first.waitConnections(2)
        self.assertEqual(bytes(main.forward[:4]), b"QEVM")
        preempt.cut()
        paused = yield within(self.manager.whenStatus("postcopy-paused", "failed", "completed"))
        self.assertEqual(paused, "postcopy-paused", (self.manager.queryMigrate(), str(self.vm.failure)))
        self.assertTrue(original.ended.called)
        info = yield qemuStatus(self.qemu, {"postcopy-paused"})
        self.assertEqual(info["status"], "postcopy-paused", self.qemu.stderrTail())
        self.assertTrue(self.manager.destinationFactory.main.transport.disconnected,
                        "our destination did not shut the main connection")
        port = yield self.manager.migrateRecover("tcp:127.0.0.1:0")
        second = self.relay(port.getHost().port)
        self.qemu.qmp("migrate", uri=second.uri, resume=True)
        yield within(self.manager.whenStatus("postcopy-active"), 30)
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 0})
        ours = yield within(self.manager.whenStatus("completed", "failed"), 60)
        self.assertEqual(ours, "completed", str(self.vm.failure))
        (channel,) = self.manager.recovery.factory.preemptChannels
        self.assertTrue(channel.ended.called)
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        digests = yield self.vm.done
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
