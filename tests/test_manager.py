# -*- test-case-name: tests.test_manager -*-
"""
Tests for L{twisted_postcopy.manager}: QEMU's texts and shapes, and
cancellation / failure scenarios over real loopback TCP.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM, PAGE
from twisted_postcopy.errors import MigrationError
from twisted_postcopy.manager import CAPABILITIES, MigrationManager
from twisted_postcopy.testing.real import requireUserfaultfd

MiB = 1 << 20


class SurfaceTests(SynchronousTestCase):
    """
    Capabilities, parameters and command errors, as QEMU words them.
    """

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        self.vm = OutgoingTestVM({"pc.ram": 4 * PAGE})
        self.manager = MigrationManager(MemoryReactorClock(), self.vm)

    def test_capabilities(self) -> None:
        """
        All 7.2 capabilities are listed off; supported ones can be set;
        others are refused; unknown names are refused; postcopy-preempt
        needs postcopy-ram (QEMU's text), in the same call or before.
        """
        self.assertEqual(list(self.manager.queryCapabilities()), CAPABILITIES)
        error = self.assertRaises(MigrationError, self.manager.setCapabilities, {"postcopy-preempt": True})
        self.assertEqual(str(error), "Postcopy preempt requires postcopy-ram")
        self.assertFalse(self.manager.queryCapabilities()["postcopy-preempt"])
        self.manager.setCapabilities({"postcopy-ram": True, "events": True})
        self.assertTrue(self.manager.queryCapabilities()["postcopy-ram"])
        for name in ("xbzrle", "nope"):
            self.assertRaises(MigrationError, self.manager.setCapabilities, {name: True})
        self.manager.setCapabilities({"postcopy-preempt": True})
        self.assertTrue(self.manager.queryCapabilities()["postcopy-preempt"])

    def test_parameters(self) -> None:
        """
        Defaults are QEMU's (and ours for the x- ones); downtime-limit and
        x-link-timeout-ms are bounded.
        """
        self.assertEqual(self.manager.queryParameters(),
                         {"max-bandwidth": 134217728, "max-postcopy-bandwidth": 0,
                          "downtime-limit": 300, "x-link-timeout-ms": 2000,
                          "x-recover-deadline-ms": 600000,
                          "x-readahead-pages": 0, "x-scan-follows-faults": 1,
                          "x-working-set-pages": 0, "x-skip-known-zero": 1,
                          "tls-creds": "", "tls-hostname": "", "tls-authz": ""})
        self.manager.setParameters({"x-link-timeout-ms": 0})
        self.manager.setParameters({"x-link-timeout-ms": 5000})
        self.assertEqual(self.manager.queryParameters()["x-link-timeout-ms"], 5000)
        error = self.assertRaises(MigrationError, self.manager.setParameters, {"x-link-timeout-ms": 100})
        self.assertEqual(str(error), "Parameter 'x-link-timeout-ms' expects 0 (off) or an integer "
                         "in the range of 1500 to 3600000 ms")
        self.manager.setParameters({"max-bandwidth": 0})
        self.assertEqual(self.manager.queryParameters()["max-bandwidth"], 0)
        error = self.assertRaises(MigrationError, self.manager.setParameters, {"downtime-limit": 2000001})
        self.assertEqual(str(error), "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")
        self.assertRaises(MigrationError, self.manager.setParameters, {"max-bandwidth": -1})
        error = self.assertRaises(MigrationError, self.manager.setParameters, {"x-readahead-pages": 513})
        self.assertEqual(str(error), "Parameter 'x-readahead-pages' expects an integer in the range of 0 to 512")
        self.manager.setParameters({"x-readahead-pages": 32, "x-scan-follows-faults": 0})
        self.assertEqual(self.manager.queryParameters()["x-readahead-pages"], 32)

    def test_startPostcopyErrors(self) -> None:
        """
        Without the capability, and before migrate, QEMU's texts.
        """
        error = self.assertRaises(MigrationError, self.manager.startPostcopy)
        self.assertEqual(str(error), "Enable postcopy with migrate_set_capability before the start of migration")
        self.manager.setCapabilities({"postcopy-ram": True})
        error = self.assertRaises(MigrationError, self.manager.startPostcopy)
        self.assertEqual(str(error), "Postcopy must be started after migration has been started")

    def test_migrateTwiceAndBadURI(self) -> None:
        """
        A second migrate while one runs is refused; a bad URI is refused.
        """
        self.assertRaises(MigrationError, self.manager.migrate, "ftp:x")
        self.manager.migrate("tcp:127.0.0.1:1")
        self.assertEqual(self.manager.queryMigrate()["status"], "setup")
        error = self.assertRaises(MigrationError, self.manager.migrate, "tcp:127.0.0.1:1")
        self.assertEqual(str(error), "There's a migration process in progress")
        error = self.assertRaises(MigrationError, self.manager.setCapabilities, {"events": True})
        self.assertEqual(str(error), "There's a migration process in progress")

    def test_destinationCapabilitiesUntilLoading(self) -> None:
        """
        After C{migrate-incoming} a destination still takes
        C{migrate-set-capabilities} (postcopy-ram reaches the incoming
        migration) until loading starts; then it is refused.
        """
        manager = MigrationManager(MemoryReactorClock(), IncomingTestVM())
        manager.migrateIncoming("tcp:127.0.0.1:0")
        self.assertEqual(manager.status.value, "setup")
        manager.setCapabilities({"postcopy-ram": True, "postcopy-blocktime": True})
        self.assertTrue(manager.incoming.postcopyEnabled)
        self.assertTrue(manager.queryCapabilities()["postcopy-blocktime"])
        manager.incoming.connected()
        self.assertEqual(manager.status.value, "active")
        error = self.assertRaises(MigrationError, manager.setCapabilities, {"postcopy-ram": False})
        self.assertEqual(str(error), "There's a migration process in progress")
        self.assertTrue(manager.incoming.postcopyEnabled)

    def test_queryBeforeMigrate(self) -> None:
        """
        Before any migration query-migrate is empty.
        """
        self.assertEqual(self.manager.queryMigrate(), {})

    def test_cancelInSetup(self) -> None:
        """
        Cancel before the connection is made: cancelling, cancelled; the VM
        runs; events say so.
        """
        events = []
        self.manager.subscribe(lambda e: events.append(e["data"]["status"]))
        self.manager.migrate("tcp:127.0.0.1:1")
        self.manager.cancel()
        self.assertEqual(events, ["setup", "cancelling", "cancelled"])
        self.assertEqual(self.manager.queryMigrate(), {"status": "cancelled"})
        self.assertTrue(self.vm.running)


class ScenarioTests(TestCase):
    """
    Real loopback TCP: cancel in each phase, a destination dying, and
    migrate-start-postcopy after completion.
    """

    timeout = 60

    @inlineCallbacks
    def setUpPair(self, postcopy: bool = False, bandwidth: int = 2 * MiB):
        """
        Start a source and a destination, migrate, and wait until precopy runs.
        """
        self.source = OutgoingTestVM({"pc.ram": 16 * MiB})
        for offset in range(0, 16 * MiB, PAGE):
            self.source.write(0, offset, b"%d" % offset)
        self.before = self.source.contents()
        self.destination = IncomingTestVM()
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination)
        if postcopy:
            self.src.setCapabilities({"postcopy-ram": True})
            self.dst.setCapabilities({"postcopy-ram": True})
        self.src.setParameters({"max-bandwidth": bandwidth})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        self.src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield self.src.whenStatus("active")
        yield deferLater(reactor, 0.2, lambda: None)

    @inlineCallbacks
    def test_incomingOnPortZero(self) -> None:
        """
        C{migrate-incoming tcp:127.0.0.1:0} listens on a port the kernel
        picks; C{query-migrate} reports it in C{socket-address} (as QEMU
        does) and a migration to it completes.
        """
        self.source = OutgoingTestVM({"pc.ram": 1 * MiB})
        self.source.write(0, 0, b"port zero")
        self.destination = IncomingTestVM()
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination)
        self.assertEqual(self.dst.queryMigrate(), {})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        info = self.dst.queryMigrate()
        self.assertEqual(info, {"socket-address": [
            {"type": "inet", "host": "127.0.0.1", "port": str(port.getHost().port), "ipv4": True}]})
        (address,) = info["socket-address"]
        self.assertNotEqual(address["port"], "0")
        self.src.migrate(f"tcp:{address['host']}:{address['port']}")
        self.assertEqual((yield self.src.whenStatus("completed", "failed")), "completed")
        self.assertEqual((yield self.dst.whenStatus("completed", "failed")), "completed")
        self.assertEqual(self.destination.contents(), self.source.contents())

    @inlineCallbacks
    def test_destinationCapabilityAfterIncoming(self) -> None:
        """
        Postcopy enabled on the destination only after C{migrate-incoming}
        (QEMU's C{-incoming defer} order is not required): ADVISE is
        accepted and the postcopy migration completes with equal RAM.
        """
        self.source = OutgoingTestVM({"pc.ram": 4 * MiB})
        for offset in range(0, 4 * MiB, PAGE):
            self.source.write(0, offset, b"%d" % offset)
        self.destination = IncomingTestVM()
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination)
        self.src.setCapabilities({"postcopy-ram": True})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        self.dst.setCapabilities({"postcopy-ram": True})
        self.src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        self.src.startPostcopy()
        self.assertEqual((yield self.src.whenStatus("completed", "failed")), "completed")
        self.assertEqual((yield self.dst.whenStatus("completed", "failed")), "completed")
        self.assertEqual(self.destination.contents(), self.source.contents())

    @inlineCallbacks
    def test_cancelInPrecopy(self) -> None:
        """
        Cancel during precopy: the source ends cancelled, its guest runs
        with RAM unchanged; the destination fails.
        """
        yield self.setUpPair(postcopy=True)
        self.src.cancel()
        self.assertEqual(self.src.queryMigrate(), {"status": "cancelled"})
        self.assertTrue(self.source.running)
        self.assertEqual(self.source.contents(), self.before)
        status = yield self.dst.whenStatus("failed", "completed")
        self.assertEqual(status, "failed")
        self.source.write(0, 0, b"still alive")

    @inlineCallbacks
    def test_destinationDies(self) -> None:
        """
        A destination that drops the connection mid-precopy leaves the
        source failed with its guest running.
        """
        yield self.setUpPair()
        self.dst.destinationFactory.main.transport.abortConnection()
        status = yield self.src.whenStatus("failed", "completed")
        self.assertEqual(status, "failed")
        self.assertIn("connection lost", self.src.queryMigrate()["error-desc"])
        self.assertTrue(self.source.running)
        self.assertEqual(self.source.contents(), self.before)

    @inlineCallbacks
    def test_cancelInPostcopy(self) -> None:
        """
        Cancel in postcopy, as QEMU 7.2 behaves (the same outcome is checked
        against real QEMUs in C{tests/test_qemu_cancel.py}): the source is
        C{cancelled} and its guest stays stopped; the destination, whose
        guest already runs there, goes to C{postcopy-paused} (waiting for a
        C{migrate-recover}), never completes, and every page it received
        before the cut holds the source's bytes.
        """
        requireUserfaultfd()
        yield self.setUpPair(postcopy=True, bandwidth=1 * MiB)
        self.src.setParameters({"max-postcopy-bandwidth": 1 * MiB})
        self.src.startPostcopy()
        yield self.src.whenStatus("postcopy-active")
        yield self.dst.whenStatus("postcopy-active")
        self.src.cancel()
        self.assertEqual(self.src.queryMigrate(), {"status": "cancelled"})
        self.assertFalse(self.source.running)
        status = yield self.dst.whenStatus("postcopy-paused", "failed", "completed")
        self.assertEqual(status, "postcopy-paused")
        self.assertEqual(self.dst.queryMigrate()["status"], "postcopy-paused")
        self.assertEqual(self.destination.events, ["run"])
        (block,) = self.destination.blocks.values()
        received = list(block.receivedMap.runs())
        self.assertTrue(received)
        self.assertLess(block.receivedMap.count(), block.pages)
        expected = self.before["pc.ram"]
        for first, count in received:
            start, length = first * PAGE, count * PAGE
            self.assertEqual(os.pread(block.fd, length, start), expected[start : start + length])

    @inlineCallbacks
    def test_startPostcopyAfterCompletion(self) -> None:
        """
        migrate-start-postcopy after a completed precopy is harmless.
        """
        yield self.setUpPair(postcopy=True, bandwidth=0)
        yield self.src.whenStatus("completed")
        self.src.startPostcopy()
        self.assertEqual(self.src.queryMigrate()["status"], "completed")
        yield self.dst.whenStatus("completed")
        self.assertEqual(self.destination.contents(), self.source.contents())


DESTINATION = r"""
import sys
sys.path.insert(0, sys.argv[1])
from twisted.internet import reactor
from twisted_postcopy.testing.enginevm import IncomingTestVM
from twisted_postcopy.manager import MigrationManager

manager = MigrationManager(reactor, IncomingTestVM())

def listening(port):
    print(port.getHost().port, flush=True)

manager.migrateIncoming("tcp:127.0.0.1:0").addCallback(listening)
reactor.run()
"""


class _Destination(ProcessProtocol):
    """
    A destination daemon in its own process; C{port} fires with its
    listening port.
    """

    def __init__(self) -> None:
        """
        Nothing received yet.
        """
        self.port: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        """
        The first line is the port.
        """
        if not self.port.called:
            self.port.callback(int(data.split()[0]))

    def processEnded(self, reason) -> None:
        """
        The process is gone.
        """
        self.ended.callback(None)


class KilledDestinationTests(TestCase):
    """
    A destination process killed with SIGKILL in the middle of precopy.
    """

    timeout = 30

    @inlineCallbacks
    def test_sourceSurvives(self) -> None:
        """
        The source fails (connection lost), its guest runs again with RAM
        untouched, and a new migration can be started.
        """
        source = OutgoingTestVM({"pc.ram": 16 * MiB})
        for offset in range(0, 16 * MiB, PAGE):
            source.write(0, offset, b"%d" % offset)
        before = source.contents()
        manager = MigrationManager(reactor, source)
        manager.setParameters({"max-bandwidth": 4 * MiB})
        destination = _Destination()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        process = reactor.spawnProcess(destination, sys.executable,
                                       [sys.executable, "-c", DESTINATION, root], env=None)
        port = yield destination.port
        manager.migrate(f"tcp:127.0.0.1:{port}")
        yield manager.whenStatus("active")
        yield deferLater(reactor, 0.3, lambda: None)
        process.signalProcess("KILL")
        status = yield manager.whenStatus("failed", "completed")
        yield destination.ended
        self.assertEqual(status, "failed")
        self.assertTrue(source.running)
        self.assertEqual(source.contents(), before)
        source.write(0, 0, b"guest still runs")
        self.assertEqual(manager.queryMigrate()["status"], "failed")
