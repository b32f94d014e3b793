# -*- test-case-name: tests.test_service -*-
"""
Tests for L{twisted_postcopy.service}: the daemon service listens on its
control endpoint (a real Unix socket) and starts the incoming migration.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from twisted_postcopy import errors
from twisted_postcopy.control.client import connectControl
from twisted_postcopy.guests.guest import GuestSpec
from twisted_postcopy.interfaces import IOutgoingVM
from twisted_postcopy.testing.real import requireWriteTracking
from twisted_postcopy.service import (
    START_TIMEOUT, IncomingGuestService, MigrationService, OutgoingGuestService)
from tests.test_control_server import FakeManager


def socketPath(case: Any) -> str:
    """
    A Unix socket path in a fresh temporary directory removed after the
    test (short, and outside the working tree).

    @param case: the test case, for the cleanup.
    @return: the path.
    """
    directory = tempfile.mkdtemp(prefix="pc-test-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "control.sock")


class MigrationServiceTests(TestCase):
    """
    Tests for L{MigrationService} on the real reactor.
    """

    def setUp(self) -> None:
        """
        Prepare a fake manager and a socket path.
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.manager = FakeManager()
        self.path = socketPath(self)

    def startService(self, **kwargs: Any) -> MigrationService:
        """
        Start a service on C{self.path}, stopped at cleanup.

        @param kwargs: extra L{MigrationService} arguments.
        @return: the running service.
        """
        service = MigrationService(self.reactor, self.manager, "unix:" + self.path, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def test_controlListener(self) -> Any:
        """
        Once started, the control API answers on the endpoint.
        """
        self.manager.info = {"status": "none"}
        self.startService()
        client = yield connectControl(self.reactor, "unix:" + self.path)
        self.addCleanup(client.transport.loseConnection)
        info = yield defer.Deferred.fromCoroutine(client.queryMigrate())
        self.assertEqual(info, {"status": "none"})

    @defer.inlineCallbacks
    def test_snapshotJobs(self) -> Any:
        """
        Every daemon answers the snapshot commands from its own
        L{MigrationService.snapshots}.
        """
        service = self.startService()
        client = yield connectControl(self.reactor, "unix:" + self.path)
        self.addCleanup(client.transport.loseConnection)
        info = yield defer.Deferred.fromCoroutine(client.querySnapshot())
        self.assertEqual(info, {"capture": None, "restores": []})
        self.assertEqual(service.snapshots.query(), info)

    @defer.inlineCallbacks
    def test_barePath(self) -> Any:
        """
        L{connectControl} takes a bare absolute path as a Unix endpoint.
        """
        self.startService()
        client = yield connectControl(self.reactor, os.path.abspath(self.path))
        self.addCleanup(client.transport.loseConnection)
        caps = yield defer.Deferred.fromCoroutine(client.queryCapabilities())
        self.assertIn("postcopy-ram", caps)

    @defer.inlineCallbacks
    def test_stopRemovesSocket(self) -> Any:
        """
        Stopping the service stops listening and removes the socket file.
        """
        service = MigrationService(self.reactor, self.manager, "unix:" + self.path)
        service.startService()
        self.assertTrue(os.path.exists(self.path))
        yield service.stopService()
        self.assertFalse(os.path.exists(self.path))

    def test_incoming(self) -> None:
        """
        With C{incoming}, the service calls C{migrate-incoming} at start,
        like QEMU's C{-incoming}.
        """
        service = self.startService(incoming="tcp:127.0.0.1:4444")
        self.assertEqual(self.manager.calls, [("migrateIncoming", ("tcp:127.0.0.1:4444",))])
        self.assertIsNone(self.successResultOf(service.incomingStarted))

    def test_incomingFails(self) -> None:
        """
        A failing C{migrate-incoming} is logged; the daemon stays up.
        """
        self.manager.failure = errors.MigrationError("Failed to bind")
        service = self.startService(incoming="tcp:127.0.0.1:4444")
        self.assertEqual(len(self.flushLoggedErrors(errors.MigrationError)), 1)
        self.assertTrue(service.running)

    def test_busyEndpoint(self) -> None:
        """
        A second daemon on the same control socket fails at start-up
        rather than running deaf.
        """
        self.startService()
        second = MigrationService(self.reactor, FakeManager(), "unix:" + self.path)
        self.assertRaises(CannotListenError, second.startService)

    def test_guestStartedFirst(self) -> None:
        """
        The guest service is a child, running once the daemon runs.
        """
        guest = Service()
        service = self.startService(guest=guest)
        self.assertIs(guest.parent, service)
        self.assertTrue(guest.running)


class GuestServiceTests(TestCase):
    """
    Tests for L{OutgoingGuestService} and L{IncomingGuestService} with the
    real stress guest.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Make a short directory for the attach socket.
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.directory = tempfile.mkdtemp(prefix="pc-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.spec = GuestSpec("stress", workers=1, blocks=(("ram", 1 << 20),),
                              arguments=("--working-set", "256"))

    @defer.inlineCallbacks
    def test_outgoing(self) -> Any:
        """
        The source guest's workers start with the service; meanwhile the
        VM refuses to be used; C{query-guest} reports it running; stopping
        the service kills the workers.
        """
        requireWriteTracking()
        service = OutgoingGuestService(self.reactor, self.spec, os.path.join(self.directory, "a.sock"))
        self.assertRaises(errors.MigrationError, service.stop)
        self.assertRaises(errors.MigrationError, getattr, service, "blocks")
        service.startService()
        yield service.started
        self.assertTrue(verifyObject(IOutgoingVM, service))
        self.assertEqual(service.query(), {"name": "stress", "role": "source", "ram": 1 << 20,
                                           "workers": 1, "running": True,
                                           "info": {"stress-0": {}}})
        self.assertEqual([block.idstr for block in service.blocks], ["ram"])
        yield service.stopService()
        self.assertTrue(all(p.ended.called for p in service.guest.host.processes.values()))

    @defer.inlineCallbacks
    def test_incomingBeforeAndAfterFailure(self) -> Any:
        """
        Before the migration ends the destination guest's C{verified} is
        L{None}; after a failure it is false, with the reason.
        """
        service = IncomingGuestService(self.reactor, self.spec, os.path.join(self.directory, "b.sock"))
        info = yield defer.ensureDeferred(service.query())
        self.assertEqual((info["verified"], info["outcome"], info["role"]), (None, None, "destination"))
        service.guest.failed("connection lost")
        info = yield defer.ensureDeferred(service.query())
        self.assertFalse(info["verified"])
        self.assertIn("connection lost", info["outcome"])


class CapabilityTests(TestCase):
    """
    Start-up capabilities (C{--capability}).
    """

    def test_setBeforeIncoming(self) -> None:
        """
        Capabilities are set before C{migrate-incoming} runs.
        """
        from twisted.internet import reactor

        manager = FakeManager()
        service = MigrationService(reactor, manager, "unix:" + socketPath(self),
                                   incoming="tcp:127.0.0.1:4444", capabilities={"postcopy-ram": True})
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([name for name, _ in manager.calls], ["setCapabilities", "migrateIncoming"])

    def test_refused(self) -> None:
        """
        A refused capability fails the start-up with the manager's error.
        """
        from twisted.internet import reactor

        manager = FakeManager()
        manager.failure = errors.MigrationError("Capability 'xbzrle' is not supported")
        service = MigrationService(reactor, manager, "unix:" + socketPath(self),
                                   capabilities={"xbzrle": True})
        self.assertRaises(errors.MigrationError, service.startService)


class IncomingGuestStartTests(SynchronousTestCase):
    """
    C{query-guest} on a destination whose migration completed waits for
    the workers to start, within a bound.
    """

    def setUp(self) -> None:
        """
        An incoming guest service on a fake clock whose migration completed.
        """
        self.clock = MemoryReactorClock()
        spec = GuestSpec("stress", workers=1, blocks=(("ram", 1 << 20),))
        self.service = IncomingGuestService(self.clock, spec, "/nonexistent/a.sock")
        self.service.guest.completed()

    def test_workersNeverStart(self) -> None:
        """
        Workers that never start give a L{errors.GuestError} after
        L{START_TIMEOUT}, not a hang.
        """
        d = defer.ensureDeferred(self.service.query())
        self.assertNoResult(d)
        self.clock.advance(START_TIMEOUT + 1)
        self.assertIn("not running", str(self.failureResultOf(d, errors.GuestError).value))

    def test_workersFailed(self) -> None:
        """
        Workers that failed to start give a L{errors.GuestError} naming why.
        """
        d = defer.ensureDeferred(self.service.query())
        self.service.guest.running.errback(errors.GuestError("worker stress-0 exited"))
        self.assertIn("worker stress-0 exited", str(self.failureResultOf(d, errors.GuestError).value))
