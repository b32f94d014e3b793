# -*- test-case-name: tests.test_recovery_qemu -*-
"""
Postcopy recovery against a REAL QEMU 7.2 peer, both ways: the migration
goes through a relay, the relay is cut during postcopy, both sides pause,
C{migrate-recover} on the destination and C{migrate resume} on the source
recover, both complete and the destination RAM equals the source's byte
for byte.
"""

from __future__ import annotations

import hashlib

import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM, PAGE
from tests.test_recovery_loopback import WAIT, recvBitmapCommand, within
from tests.test_source_qemu import RAM_RANGES
from tests.test_migration_loopback import skipWithoutUserfaultfd
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.errors import QEMUError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.qemu import qemuSkipReason, startBootedQEMU
from twisted_postcopy.testing.qemuguest import incomingAddress, listenIncoming
from twisted_postcopy.testing.relay import relayFor
from twisted_postcopy.testing.waiting import waitUntil

MiB = 1 << 20
#: Seconds between two C{query-migrate} polls of QEMU.
POLL = 0.05


@inlineCallbacks
def qemuStatus(qemu, status: str):
    """
    Poll QEMU (without blocking the reactor for long) until it reports
    C{status}.

    @param qemu: a L{twisted_postcopy.testing.qemu.QEMUInstance}.
    @param status: the awaited migration status.
    @return: a Deferred firing with QEMU's C{query-migrate}.
    @raise AssertionError: not reached within L{WAIT} seconds.
    """
    for _ in range(int(WAIT / POLL)):
        info = qemu.queryMigrate()
        if info.get("status") == status:
            return info
        yield deferLater(reactor, POLL, lambda: None)
    raise AssertionError(f"QEMU never reached {status}: {qemu.stderrTail()}")


class QEMUDestinationRecoveryTests(TestCase):
    """
    Source: ours.  Destination: C{qemu-system-x86_64 -incoming defer -S}.
    """

    skip = qemuSkipReason()
    timeout = 60

    def setUp(self) -> None:
        """
        A QEMU destination, and our 32 MiB source with a page pattern.
        """
        self.qemu = startBootedQEMU(self, "destination", ["-S", "-incoming", "defer"])
        self.vm = OutgoingTestVM({"pc.ram": 32 * MiB})
        for offset in range(0, 32 * MiB, 3 * PAGE):
            self.vm.write(0, offset, struct.pack(">Q", offset) * 64)
        self.manager = MigrationManager(reactor, self.vm)
        self.manager.setCapabilities({"postcopy-ram": True})
        self.manager.setParameters({"max-bandwidth": 0, "max-postcopy-bandwidth": 4 * MiB})
        self.qemu.setCapabilities(**{"postcopy-ram": True})

    def test_cutAndRecoverIntoQEMU(self) -> None:
        """
        A cut during postcopy pauses both; after QEMU's C{migrate-recover}
        and our C{migrate resume} QEMU answers the RECV_BITMAP with a
        partial bitmap and RESUME_ACK, and completes with our RAM.
        """
        return self._cutAndRecover()

    @inlineCallbacks
    def test_cutAndRecoverPreemptIntoQEMU(self) -> None:
        """
        The same with C{postcopy-preempt} on both: the cut drops both
        connections; our resume opens a new main connection, then a new
        preempt connection (QEMU 7.2 enters C{postcopy-recover} only with
        both, and crashes on a bad one), the handshake runs, QEMU
        completes with our RAM, and the new preempt channel ends with EOS.
        """
        for side in (self.manager.setCapabilities, lambda c: self.qemu.setCapabilities(**c)):
            side({"postcopy-preempt": True})
        second = yield self._cutAndRecover()
        self.assertEqual(len(second.connections), 2)
        self.assertEqual(bytes(second.connections[1].forward[-8:]), bytes.fromhex("0000000000000010"))
        self.assertEqual(self.manager.outgoing.preemptPhase.value, "ended")

    @inlineCallbacks
    def _cutAndRecover(self):
        """
        Migrate through a relay, cut it in postcopy, recover through a
        second relay, check the handshake bytes and QEMU's RAM.

        @return: the second relay (via the Deferred).
        """
        first = relayFor(self, listenIncoming(self.qemu))
        self.manager.migrate(first.uri)
        self.manager.startPostcopy()
        yield within(self.manager.whenStatus("postcopy-active"))
        # PONG 3: QEMU ran POSTCOPY_RUN, so it pauses (before that a cut
        # fails it).
        yield waitUntil(reactor, lambda: self.manager.outgoing.destinationRunning, WAIT)
        first.cut()
        yield within(self.manager.whenStatus("postcopy-paused"))
        yield qemuStatus(self.qemu, "postcopy-paused")
        self.qemu.qmp("migrate-recover", uri="tcp:127.0.0.1:0")
        second = relayFor(self, incomingAddress(self.qemu))
        self.manager.migrate(second.uri, resume=True)
        status = yield within(self.manager.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed", self.qemu.stderrTail())
        info = self.qemu.waitMigration(["completed"], timeout=WAIT)
        self.assertEqual(info["status"], "completed")
        ram = self.vm.blocks[0].map
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
        forward = bytes(second.connections[0].forward)
        head = recvBitmapCommand("pc.ram") + bytes.fromhex("0800090000")
        self.assertEqual(forward[:len(head)], head)
        backward = bytes(second.connections[0].backward)
        self.assertEqual(backward[:15], bytes.fromhex("0005 0007 06") + b"pc.ram" + bytes(4))
        size = struct.unpack(">Q", backward[11:19])[0]
        self.assertEqual(size, 32 * MiB // 4096 // 8)
        bitmap = int.from_bytes(backward[19:19 + size], "little")
        self.assertTrue(0 < bitmap.bit_count() < 32 * MiB // 4096)
        ack = 19 + size + 8
        self.assertEqual(backward[ack:ack + 8], bytes.fromhex("0006 0004 00000001"))
        yield within(waitUntil(reactor, lambda: all(c.closed.is_set() for c in second.connections)))
        return second


    @inlineCallbacks
    def test_resumeAfterEverythingWritten(self) -> None:
        """
        The path goes silent towards QEMU while our source writes its last
        pages, END and EOF (all lost, no SHUT comes); after the pause and
        the recovery, the recovery connection carries every page QEMU's
        received bitmap lacks and the END and EOF again, and the migration
        completes with our RAM (the finding: after such a recovery our
        source stayed C{postcopy-active} writing nothing, and a restored
        QEMU guest waited for its pages forever).
        """
        first = relayFor(self, listenIncoming(self.qemu))
        self.manager.migrate(first.uri)
        self.manager.startPostcopy()
        yield within(self.manager.whenStatus("postcopy-active"))
        yield waitUntil(reactor, lambda: self.manager.outgoing.destinationRunning, WAIT)
        (connection,) = first.waitConnections(1)
        connection.blackhole()
        self.manager.setParameters({"max-postcopy-bandwidth": 0})
        yield waitUntil(reactor, lambda: self.manager.outgoing.written, WAIT)
        self.assertEqual(self.manager.queryMigrate()["ram"]["remaining"], 0)
        self.assertGreater(connection.dropped, 0)
        self.manager.migratePause()
        yield within(self.manager.whenStatus("postcopy-paused"))
        if self.qemu.queryMigrate()["status"] == "postcopy-active":
            try:
                self.qemu.qmp("migrate-pause")
            except QEMUError:
                # QEMU noticed the dead link itself in between (any other
                # refusal shows as the wait below timing out).
                pass
        yield qemuStatus(self.qemu, "postcopy-paused")
        self.qemu.qmp("migrate-recover", uri="tcp:127.0.0.1:0")
        second = relayFor(self, incomingAddress(self.qemu))
        before = self.manager.queryMigrate()["ram"]
        self.manager.migrate(second.uri, resume=True)
        status = yield within(self.manager.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed", self.qemu.stderrTail())
        self.assertEqual(self.qemu.waitMigration(["completed"], timeout=WAIT)["status"], "completed")
        backward = bytes(second.connections[0].backward)
        size = struct.unpack(">Q", backward[11:19])[0]
        received = int.from_bytes(backward[19:19 + size], "little").bit_count()
        missing = 32 * MiB // PAGE - received
        self.assertGreater(missing, 0)
        after = self.manager.queryMigrate()["ram"]
        sent = (after["normal"] + after["duplicate"]) - (before["normal"] + before["duplicate"])
        self.assertEqual(sent, missing)
        ram = self.vm.blocks[0].map
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])


class QEMUSourceRecoveryTests(TestCase):
    """
    Source: C{qemu-system-x86_64} running the boot-sector guest.
    Destination: ours, pages placed by the production fault service while
    a guest worker process reads all of its RAM through its userfaultfd.
    """

    skip = qemuSkipReason()
    timeout = 60

    def setUp(self) -> None:
        """
        A QEMU source, and our destination with postcopy on.
        """
        skipWithoutUserfaultfd()
        self.qemu = startBootedQEMU(self, "source")
        self.vm = WorkerGuestVM(reactor)
        self.addCleanup(self.vm.close)
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)
        self.manager.setCapabilities({"postcopy-ram": True})
        self.qemu.setCapabilities(**{"postcopy-ram": True})
        self.qemu.setParameters(**{"max-bandwidth": 100000, "max-postcopy-bandwidth": 40000})

    @inlineCallbacks
    def test_cutAndRecoverFromQEMU(self) -> None:
        """
        A cut during postcopy pauses QEMU and us while our guest worker
        waits on faults; after our C{migrate-recover} and QEMU's C{migrate
        resume} both complete, our RAM equals the stopped source's and the
        guest read exactly that.
        """
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        first = relayFor(self, ("127.0.0.1", listening.getHost().port))
        self.qemu.migrate(first.uri)
        yield qemuStatus(self.qemu, "active")
        self.qemu.qmp("migrate-start-postcopy")
        yield within(self.manager.whenStatus("postcopy-active"))
        yield deferLater(reactor, 0.5, lambda: None)
        first.cut()
        yield within(self.manager.whenStatus("postcopy-paused"))
        yield qemuStatus(self.qemu, "postcopy-paused")
        port = yield self.manager.migrateRecover("tcp:127.0.0.1:0")
        second = relayFor(self, ("127.0.0.1", port.getHost().port))
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 0})
        self.qemu.qmp("migrate", uri=second.uri, resume=True)
        ours = yield within(self.manager.whenStatus("completed", "failed"))
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, "completed")
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
        digests = yield within(self.vm.done)
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in self.vm.contents().values()])
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])
        forward = bytes(second.connections[0].forward)
        self.assertEqual(forward[:len(recvBitmapCommand("pc.ram"))], recvBitmapCommand("pc.ram"))
        backward = bytes(second.connections[0].backward)
        self.assertEqual(backward[:11], bytes.fromhex("0005 0007 06") + b"pc.ram")
