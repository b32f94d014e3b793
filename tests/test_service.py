# -*- test-case-name: tests.test_service -*-
"""
Tests for L{twisted_postcopy.service}: the daemon service listens on its
control endpoint (a real Unix socket) and starts the incoming migration.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import TestCase

from twisted_postcopy import errors
from twisted_postcopy.control.client import connectControl
from twisted_postcopy.service import MigrationService
from tests.test_control_server import FakeManager


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
        self.path = self.mktemp() + ".sock"

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
