# -*- test-case-name: tests.test_qemu_cancel -*-
"""
C{migrate_cancel} during postcopy against real QEMU 7.2 (TCG): what QEMU
does with two QEMUs, and that a QEMU destination fed by our source ends the
same way.  Our own destination's outcome is checked in
C{tests/test_manager.py} (C{ScenarioTests.test_cancelInPostcopy}).

QEMU 7.2's outcome: the source ends C{cancelled} with its VM stopped
(C{postmigrate}: the guest already runs on the destination); the
destination, which lost its source mid-postcopy, goes to
C{postcopy-paused} and waits for a C{migrate-recover}.
"""

from __future__ import annotations

import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_postcopy.testing.enginevm import OutgoingTestVM, PAGE
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.qemu import requireQEMU, startBootedQEMU
from twisted_postcopy.testing.qemubaseline import preparePostcopy
from twisted_postcopy.testing.qemuguest import MIB, guestPair, layoutFor, listenIncoming
from twisted_postcopy.testing.real import requireUserfaultfd

TIMEOUT = 30
MEMORY_MIB = 32


class CancelInPostcopyTests(TestCase):
    """
    C{migrate_cancel} in C{postcopy-active}, with a real QEMU destination.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Give up without QEMU or userfaultfd (QEMU's postcopy destination
        needs it).
        """
        requireQEMU()
        requireUserfaultfd()

    def test_qemuToQemu(self) -> None:
        """
        Two QEMUs: the source is C{cancelled} and stopped, the destination
        C{postcopy-paused} with its guest still running.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        with guestPair(directory, layoutFor(MEMORY_MIB), MEMORY_MIB) as (source, destination):
            host, port = preparePostcopy(source, destination, 4 * MIB, 256 * 1024)
            source.waitSerial(1, TIMEOUT)
            source.migrate(f"tcp:{host}:{port}")
            source.waitMigration(["active"], TIMEOUT)
            source.qmp("migrate-start-postcopy")
            source.waitMigration(["postcopy-active"], TIMEOUT)
            destination.waitMigration(["postcopy-active"], TIMEOUT)
            source.qmp("migrate_cancel")
            self.assertEqual(source.waitMigration(["cancelled"], TIMEOUT)["status"], "cancelled")
            self.assertEqual(source.status(), "postmigrate")
            info = destination.waitMigration(["postcopy-paused"], TIMEOUT)
            self.assertEqual(info["status"], "postcopy-paused")
            self.assertEqual(destination.status(), "running")

    @inlineCallbacks
    def test_oursToQemu(self):
        """
        Our source cancelled in postcopy: it reports C{cancelled} and keeps
        its guest stopped, and the QEMU destination goes to
        C{postcopy-paused} as it does with a QEMU source.
        """
        qemu = startBootedQEMU(self, "destination", ["-S", "-incoming", "defer"], MEMORY_MIB)
        vm = OutgoingTestVM({"pc.ram": MEMORY_MIB * MIB})
        for offset in range(0, MEMORY_MIB * MIB, 3 * PAGE):
            vm.write(0, offset, struct.pack(">Q", offset) * 64)
        manager = MigrationManager(reactor, vm)
        qemu.setCapabilities(**{"postcopy-ram": True})
        manager.setCapabilities({"postcopy-ram": True})
        manager.setParameters({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 256 * 1024})
        host, port = listenIncoming(qemu)
        manager.migrate(f"tcp:{host}:{port}")
        manager.startPostcopy()
        yield manager.whenStatus("postcopy-active")
        yield deferToThread(qemu.waitMigration, ["postcopy-active"], TIMEOUT)
        manager.cancel()
        self.assertEqual(manager.queryMigrate(), {"status": "cancelled"})
        self.assertFalse(vm.running)
        info = yield deferToThread(qemu.waitMigration, ["postcopy-paused"], TIMEOUT)
        self.assertEqual(info["status"], "postcopy-paused", qemu.stderrTail())
