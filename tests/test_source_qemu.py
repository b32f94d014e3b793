# -*- test-case-name: tests.test_source_qemu -*-
"""
Our source migrating to a REAL QEMU 7.2 destination (TCG, C{-S} so the
guest does not change RAM afterwards): precopy and postcopy both complete
on QEMU, and QEMU's guest RAM equals ours byte for byte.
"""

from __future__ import annotations

import struct

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from twisted_postcopy.testing.enginevm import OutgoingTestVM, PAGE
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.qemu import qemuSkipReason, startBootedQEMU
from twisted_postcopy.testing.qemuguest import listenIncoming
from twisted_postcopy.testing.waiting import waitUntil

MiB = 1 << 20
#: Guest-physical ranges of pc.ram that read as RAM (below the VGA hole,
#: and from 1 MiB up).
RAM_RANGES = ((0, 0xA0000), (0x100000, 32 * MiB - 0x100000))


class OurSourceIntoQEMU:
    """
    Shared by the test cases whose source is ours and whose destination is
    C{qemu-system-x86_64 -incoming defer -S}: a 32 MiB patterned source VM,
    the migration, and RAM compared with QEMU's C{pmemsave}.  A mixin for
    L{TestCase}; L{prepareMigration} is the hook for what a case adds
    (TLS, for example).
    """

    def startSourceAndQEMU(self) -> None:
        """
        Start the QEMU destination; make our source VM with a pattern and
        its manager.
        """
        self.qemu = startBootedQEMU(self, "destination", ["-S", "-incoming", "defer"])
        self.vm = OutgoingTestVM({"pc.ram": 32 * MiB})
        for offset in range(0, 32 * MiB, 3 * PAGE):
            self.vm.write(0, offset, struct.pack(">Q", offset) * 64)
        self.manager = MigrationManager(reactor, self.vm)
        self.manager.setParameters({"max-bandwidth": 0})

    def prepareMigration(self) -> None:
        """
        Called before the capabilities are set: nothing by default.
        """

    @inlineCallbacks
    def _migrate(self, postcopy: bool, preempt: bool = False):
        """
        Migrate to QEMU, wait for both ends, compare RAM.

        @param postcopy: switch to postcopy at once.
        @param preempt: with C{postcopy-preempt} on both ends.
        """
        self.prepareMigration()
        if postcopy:
            capabilities = {"postcopy-ram": True, **({"postcopy-preempt": True} if preempt else {})}
            self.qemu.setCapabilities(**capabilities)
            self.manager.setCapabilities(capabilities)
        else:
            self.manager.setCapabilities({"return-path": True})
        host, port = listenIncoming(self.qemu)
        self.manager.migrate(f"tcp:{host}:{port}")
        if postcopy:
            self.manager.startPostcopy()
        status = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(status, "completed",
                         f"{self.manager.queryMigrate().get('error-desc')} {self.qemu.stderrTail()}")
        info = self.qemu.waitMigration(["completed"], timeout=30)
        self.assertEqual(info["status"], "completed")
        ram = self.vm.blocks[0].map
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])


class QEMUDestinationTests(OurSourceIntoQEMU, TestCase):
    """
    Source: ours.  Destination: C{qemu-system-x86_64 -incoming defer -S}.
    """

    skip = qemuSkipReason()
    timeout = 60

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        self.startSourceAndQEMU()

    def test_precopyToQEMU(self) -> None:
        """
        Precopy with a return path: QEMU sends SHUT(0), we complete, RAM
        matches.
        """
        return self._migrate(False)

    def test_postcopyToQEMU(self) -> None:
        """
        Immediate postcopy: DISCARD, package, PARTs, END, EOF are accepted
        by QEMU and all pages are placed.
        """
        return self._migrate(True)

    @inlineCallbacks
    def test_postcopyPreemptToQEMU(self) -> None:
        """
        Immediate postcopy with C{postcopy-preempt}: QEMU 7.2 waits for
        both connections before loading (it tells them apart by accept
        order only), takes our second one as its preempt channel, reads
        its EOS after the main stream's EOF, completes, and its RAM equals
        ours.
        """
        yield self._migrate(True, preempt=True)
        self.assertEqual(self.manager.outgoing.preemptPhase.value, "ended")

    @inlineCallbacks
    def test_preemptOffAtQEMU(self) -> None:
        """
        C{postcopy-preempt} on our source only: QEMU 7.2 loads from the
        first connection and drops the second ("Extra incoming migration
        connection"), so the switch to postcopy fails with a clear error
        naming the capability, and our guest runs on.
        """
        self.qemu.setCapabilities(**{"postcopy-ram": True})
        self.manager.setCapabilities({"postcopy-ram": True, "postcopy-preempt": True})
        host, port = listenIncoming(self.qemu)
        self.manager.migrate(f"tcp:{host}:{port}")
        yield waitUntil(reactor, lambda: self.manager.outgoing.preemptPhase.value == "failed")
        self.manager.startPostcopy()
        status = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(status, "failed")
        error = self.manager.queryMigrate()["error-desc"]
        self.assertIn("postcopy preempt channel", error)
        self.assertIn("needs the postcopy-preempt capability too", error)
        self.assertTrue(self.vm.running)
