# -*- test-case-name: tests.test_control_server -*-
"""
Tests for L{twisted_postcopy.control.server}: every command and every
declared error round-trips between a L{ControlClient} and a L{ControlAMP}
over an in-memory connection (L{twisted.test.iosim}), against a small fake
manager that follows the MigrationManager contract.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.protocols.amp import UnknownRemoteError
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import errors
from twisted_postcopy.control import commands
from twisted_postcopy.control.client import ControlClient
from twisted_postcopy.control.server import ControlAMP, ControlFactory


class FakeManager:
    """
    A MigrationManager stand-in that records calls and can be told to fail.

    @ivar calls: (method name, args) in call order.
    @ivar failure: an exception every state-changing method raises, or
        L{None}.
    @ivar subscribers: the subscribed callbacks.
    """

    def __init__(self) -> None:
        """
        Start with QEMU's defaults for a few capabilities and parameters.
        """
        self.calls: list[tuple[str, tuple]] = []
        self.failure: Exception | None = None
        self.subscribers: list[Callable[[dict], None]] = []
        self.capabilities = {"postcopy-ram": False, "postcopy-preempt": False}
        self.parameters = {"max-bandwidth": 134217728, "downtime-limit": 300}
        self.info: dict[str, Any] = {"status": "none"}

    def _record(self, name: str, *args: Any) -> None:
        """
        Record a call and raise L{failure} if set.

        @param name: the method name.
        @param args: its arguments.
        """
        self.calls.append((name, args))
        if self.failure is not None:
            raise self.failure

    def setCapabilities(self, capabilities: dict[str, bool]) -> None:
        """
        Record and apply.

        @param capabilities: name to state.
        """
        self._record("setCapabilities", capabilities)
        self.capabilities.update(capabilities)

    def queryCapabilities(self) -> Deferred:
        """
        @return: a fired Deferred of the capabilities (managers may answer
            asynchronously).
        """
        return succeed(dict(self.capabilities))

    def setParameters(self, parameters: dict[str, int]) -> None:
        """
        Record and apply.

        @param parameters: name to value.
        """
        self._record("setParameters", parameters)
        self.parameters.update(parameters)

    def queryParameters(self) -> dict[str, int]:
        """
        @return: the parameters.
        """
        return dict(self.parameters)

    def migrate(self, uri: str, resume: bool = False) -> None:
        """
        Record.

        @param uri: the URI.
        @param resume: resume flag.
        """
        self._record("migrate", uri, resume)

    def migrateIncoming(self, uri: str) -> None:
        """
        Record.

        @param uri: the URI.
        """
        self._record("migrateIncoming", uri)

    def migrateRecover(self, uri: str) -> None:
        """
        Record.

        @param uri: the URI.
        """
        self._record("migrateRecover", uri)

    def migratePause(self) -> None:
        """
        Record.
        """
        self._record("migratePause")

    def startPostcopy(self) -> None:
        """
        Record.
        """
        self._record("startPostcopy")

    def cancel(self) -> None:
        """
        Record.
        """
        self._record("cancel")

    def queryMigrate(self) -> dict[str, Any]:
        """
        @return: the info, or raise L{failure}.
        """
        self._record("queryMigrate")
        return self.info

    def subscribe(self, callback: Callable[[dict], None]) -> Callable[[], None]:
        """
        Add a subscriber.

        @param callback: called with each event.
        @return: the unsubscribe callable.
        """
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def emit(self, status: str) -> None:
        """
        Emit a MIGRATION event to every subscriber.

        @param status: the new status.
        """
        for callback in list(self.subscribers):
            callback({"event": "MIGRATION", "data": {"status": status}})


class ConnectedMixin:
    """
    Set up a L{ControlClient} connected in memory to a L{ControlAMP} over a
    L{FakeManager}.
    """

    def setUp(self) -> None:
        """
        Connect a client to a server in memory.
        """
        self.manager = FakeManager()
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: ControlAMP(self.manager), ControlClient
        )

    def call(self, coroutine: Any) -> Deferred:
        """
        Run a client coroutine and deliver the traffic.

        @param coroutine: a L{ControlClient} coroutine.
        @return: its Deferred, with the exchange done.
        """
        d = Deferred.fromCoroutine(coroutine)
        self.pump.flush()
        return d


class ControlRoundTripTests(ConnectedMixin, SynchronousTestCase):
    """
    Round trips of every command between client and server.
    """

    def test_setCapabilities(self) -> None:
        """
        C{migrate-set-capabilities} passes a name to state mapping.
        """
        self.successResultOf(self.call(self.client.setCapabilities({"postcopy-ram": True})))
        self.assertEqual(self.manager.calls, [("setCapabilities", ({"postcopy-ram": True},))])

    def test_queryCapabilities(self) -> None:
        """
        C{query-migrate-capabilities} returns every capability.
        """
        result = self.successResultOf(self.call(self.client.queryCapabilities()))
        self.assertEqual(result, {"postcopy-ram": False, "postcopy-preempt": False})

    def test_parameters(self) -> None:
        """
        C{migrate-set-parameters} then C{query-migrate-parameters} shows
        the new value.
        """
        self.successResultOf(self.call(self.client.setParameters({"max-bandwidth": 1 << 40})))
        result = self.successResultOf(self.call(self.client.queryParameters()))
        self.assertEqual(result, {"max-bandwidth": 1 << 40, "downtime-limit": 300})

    def test_migrate(self) -> None:
        """
        C{migrate} passes the URI and the resume flag (default false).
        """
        self.successResultOf(self.call(self.client.migrate("tcp:127.0.0.1:4444")))
        self.successResultOf(self.call(self.client.migrate("unix:/tmp/m", resume=True)))
        self.assertEqual(
            self.manager.calls,
            [("migrate", ("tcp:127.0.0.1:4444", False)), ("migrate", ("unix:/tmp/m", True))],
        )

    def test_uriCommands(self) -> None:
        """
        C{migrate-incoming} and C{migrate-recover} pass their URI.
        """
        self.successResultOf(self.call(self.client.migrateIncoming("tcp:0:4444")))
        self.successResultOf(self.call(self.client.migrateRecover("unix:/tmp/r")))
        self.assertEqual(
            self.manager.calls,
            [("migrateIncoming", ("tcp:0:4444",)), ("migrateRecover", ("unix:/tmp/r",))],
        )

    def test_argumentlessCommands(self) -> None:
        """
        C{migrate-pause}, C{migrate-start-postcopy} and C{migrate-cancel}
        call their manager method.
        """
        for method in (self.client.migratePause, self.client.startPostcopy, self.client.cancel):
            self.successResultOf(self.call(method()))
        names = [name for name, _ in self.manager.calls]
        self.assertEqual(names, ["migratePause", "startPostcopy", "cancel"])

    def test_queryMigrate(self) -> None:
        """
        C{query-migrate} returns the manager's QMP-shaped info unchanged.
        """
        self.manager.info = {
            "status": "postcopy-active",
            "total-time": 1200,
            "ram": {"transferred": 123456789, "postcopy-requests": 17},
            "postcopy-vcpu-blocktime": [3, 4],
        }
        result = self.successResultOf(self.call(self.client.queryMigrate()))
        self.assertEqual(result, self.manager.info)


class FakeGuest:
    """
    A guest answering C{query-guest}.
    """

    def query(self) -> dict[str, Any]:
        """
        @return: a verified guest's state.
        """
        return {"name": "stress", "verified": True}


class QueryGuestTests(SynchronousTestCase):
    """
    Tests for C{query-guest}.
    """

    def connect(self, guest: Any) -> tuple[ControlClient, iosim.IOPump]:
        """
        Connect a client to a server with the given guest.

        @param guest: the guest or L{None}.
        @return: the client and the pump.
        """
        client, _, pump = iosim.connectedServerAndClient(
            lambda: ControlFactory(FakeManager(), guest).buildProtocol(None), ControlClient
        )
        return client, pump

    def test_guest(self) -> None:
        """
        The guest's C{query()} answer reaches the client.
        """
        client, pump = self.connect(FakeGuest())
        d = Deferred.fromCoroutine(client.queryGuest())
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"name": "stress", "verified": True})

    def test_noGuest(self) -> None:
        """
        A daemon without a guest answers with a L{errors.MigrationError}.
        """
        client, pump = self.connect(None)
        d = Deferred.fromCoroutine(client.queryGuest())
        pump.flush()
        self.assertEqual(str(self.failureResultOf(d, errors.MigrationError).value),
                         "This daemon runs no guest")


class ControlErrorTests(ConnectedMixin, SynchronousTestCase):
    """
    Errors raised by the manager reach the client typed, with their text.
    """

    def test_everyDeclaredError(self) -> None:
        """
        Each class of L{commands.MIGRATION_ERRORS} arrives as itself, with
        its message (QEMU's text).
        """
        for cls in commands.MIGRATION_ERRORS:
            self.manager.failure = cls("There's a migration process in progress")
            d = self.call(self.client.migrate("tcp:127.0.0.1:1"))
            failure = self.failureResultOf(d, cls)
            self.assertIs(type(failure.value), cls)
            self.assertEqual(str(failure.value), "There's a migration process in progress")

    def test_undeclaredSubclass(self) -> None:
        """
        A subclass not in the map arrives as its nearest mapped base.
        """

        class StrangeError(errors.MigrationFailed):
            """
            Not declared in the map.
            """

        self.manager.failure = StrangeError("odd")
        d = self.call(self.client.startPostcopy())
        self.assertIs(type(self.failureResultOf(d).value), errors.MigrationFailed)

    def test_unknownError(self) -> None:
        """
        An error outside the hierarchy arrives as L{UnknownRemoteError} and
        is logged by the server.
        """
        self.manager.failure = ZeroDivisionError()
        d = self.call(self.client.cancel())
        self.failureResultOf(d, UnknownRemoteError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_queryFails(self) -> None:
        """
        A failing query answers with the error too.
        """
        self.manager.failure = errors.MigrationError("Migration is disabled")
        d = self.call(self.client.queryMigrate())
        self.assertEqual(str(self.failureResultOf(d, errors.MigrationError).value), "Migration is disabled")


class EventTests(ConnectedMixin, SynchronousTestCase):
    """
    Events pushed from the manager to subscribed clients.
    """

    def setUp(self) -> None:
        """
        Connect a client to a server in memory.
        """
        super().setUp()
        self.received: list[tuple[str, dict]] = []

    def subscribe(self) -> None:
        """
        Subscribe the client, recording events.
        """
        d = Deferred.fromCoroutine(self.client.subscribe(lambda *e: self.received.append(e)))
        self.pump.flush()
        self.successResultOf(d)

    def test_pushed(self) -> None:
        """
        After L{commands.Subscribe}, each MIGRATION event reaches the
        client in order.
        """
        self.subscribe()
        for status in ("setup", "active", "postcopy-active", "completed"):
            self.manager.emit(status)
        self.pump.flush()
        self.assertEqual(
            [data["status"] for event, data in self.received],
            ["setup", "active", "postcopy-active", "completed"],
        )
        self.assertEqual({event for event, _ in self.received}, {"MIGRATION"})

    def test_notSubscribed(self) -> None:
        """
        A connection that did not subscribe gets nothing.
        """
        self.assertEqual(self.manager.subscribers, [])

    def test_subscribeTwice(self) -> None:
        """
        Subscribing twice registers once, so events are not doubled.
        """
        self.subscribe()
        self.subscribe()
        self.assertEqual(len(self.manager.subscribers), 1)

    def test_unsubscribedOnDisconnect(self) -> None:
        """
        Losing the connection removes the subscription.
        """
        self.subscribe()
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.manager.subscribers, [])


class ControlFactoryTests(SynchronousTestCase):
    """
    Tests for L{ControlFactory}.
    """

    def test_buildProtocol(self) -> None:
        """
        Every protocol shares the factory's manager.
        """
        manager = FakeManager()
        factory = ControlFactory(manager)
        first, second = factory.buildProtocol(None), factory.buildProtocol(None)
        self.assertIsNot(first, second)
        self.assertIs(first.manager, manager)
        self.assertIs(second.factory, factory)
