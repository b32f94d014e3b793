# -*- test-case-name: tests.test_autorecover -*-
"""
Tests for L{twisted_postcopy.autorecover}: the source's retry schedule
and the destination's re-listening, on a L{Clock}, with the connects and
listens given by the test.  Real recoveries after silent cuts are in
C{tests/test_recovery_netns.py}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.autorecover import (
    AUTO_RECOVER, BACKOFF_MAX, REBIND_DELAY, DestinationAutoRecovery, SourceAutoRecovery, backoff)
from twisted_postcopy.manager import CAPABILITIES, SUPPORTED
from twisted_postcopy.source.machine import MigrationStatus as S, outgoingMachine


class _Migration:
    """
    An outgoing migration's status machine, nothing else.
    """

    def __init__(self) -> None:
        """
        A machine in C{postcopy-paused}.
        """
        self.machine = outgoingMachine()
        for status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED):
            self.machine.moveTo(status)


class SourceTests(SynchronousTestCase):
    """
    L{SourceAutoRecovery}.
    """

    def setUp(self) -> None:
        """
        A paused migration; each resume returns a Deferred the test fires.
        """
        self.clock = Clock()
        self.migration = _Migration()
        self.events: list[dict[str, Any]] = []
        self.connects: list[Deferred] = []
        self.enabled = True
        self.deadline = 10000
        self.auto = SourceAutoRecovery(
            self.clock, self.migration, "tcp:10.1.1.2:4444", lambda: self.enabled,
            lambda: self.deadline, lambda: 2000, self.events.append, self._resume, lambda: 0.0)

    def _resume(self, reactor: Any, migration: Any, uri: str) -> Deferred:
        """
        @return: a Deferred the test fires (None: the connect failed).
        """
        self.assertEqual(uri, "tcp:10.1.1.2:4444")
        connecting: Deferred = Deferred(lambda d: d.callback(None))
        self.connects.append(connecting)
        return connecting

    def test_backoff(self) -> None:
        """
        Doubling from 0.1 s, capped at 0.5 s, scaled into [0.5, 1).
        """
        self.assertEqual([backoff(n, 0.0) for n in (1, 2, 3, 4, 5)], [0.05, 0.1, 0.2, 0.25, 0.25])
        self.assertAlmostEqual(backoff(1, 0.999), 0.09995)
        self.assertEqual(backoff(30, 0.0), BACKOFF_MAX / 2)

    def test_retries(self) -> None:
        """
        The first attempt comes at once, each failed connect schedules the
        next after the backoff; every attempt is an event; success
        (C{postcopy-active}) ends the series.
        """
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        self.clock.advance(0)
        self.assertEqual(len(self.connects), 1)
        self.connects[-1].callback(None)
        self.clock.advance(0.049)
        self.assertEqual(len(self.connects), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.connects), 2)
        self.assertEqual([e["x-recover-attempt"] for e in self.events], [1, 2])
        self.assertEqual({e["status"] for e in self.events}, {"postcopy-paused"})
        self.connects[-1].callback(object())
        self.migration.machine.moveTo(S.POSTCOPY_RECOVER)
        self.migration.machine.moveTo(S.POSTCOPY_ACTIVE)
        self.auto.statusChanged(S.POSTCOPY_ACTIVE)
        self.assertEqual((self.auto.attempts, self.auto.pausedAt), (0, None))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handshakeFailed(self) -> None:
        """
        A connection that paused again (its handshake failed) leads to the
        next attempt after the backoff.
        """
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        self.clock.advance(0)
        self.connects[-1].callback(object())
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        self.clock.advance(0.05)
        self.assertEqual(len(self.connects), 2)

    def test_connectTimeout(self) -> None:
        """
        A connect still pending after max(0.5 s, a quarter of the link
        timeout) is cancelled, and the next attempt follows.
        """
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        self.clock.advance(0)
        self.clock.advance(0.49)
        self.assertFalse(self.connects[0].called)
        self.clock.advance(0.01)
        self.assertTrue(self.connects[0].called)
        self.clock.advance(0.05)
        self.assertEqual(len(self.connects), 2)

    def test_deadline(self) -> None:
        """
        Past the deadline the source gives up: an event says so and the
        migration stays paused.
        """
        self.deadline = 300
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        for _ in range(20):
            self.clock.advance(0)
            if self.connects and not self.connects[-1].called:
                self.connects[-1].callback(None)
            self.clock.advance(0.1)
        self.assertTrue(self.auto.gaveUp)
        self.assertTrue(self.events[-1]["x-recover-gave-up"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disabled(self) -> None:
        """
        Without the capability, or after C{migrate-pause} on this side,
        nothing is tried.
        """
        self.enabled = False
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        self.enabled = True
        self.auto.suspend()
        self.auto.statusChanged(S.POSTCOPY_PAUSED)
        self.clock.advance(1)
        self.assertEqual(self.connects, [])

    def test_capability(self) -> None:
        """
        The capability is listed after QEMU's and can be set.
        """
        self.assertEqual(CAPABILITIES[-1], AUTO_RECOVER)
        self.assertIn(AUTO_RECOVER, SUPPORTED)


class _Machine:
    """
    An incoming migration's status holder.
    """

    def __init__(self) -> None:
        """
        Paused.
        """
        self.status = type("Status", (), {"status": S.POSTCOPY_PAUSED})()


class _Listener:
    """
    A recovery listener whose binds the test decides.

    @ivar results: what each C{listenAgain} returns, in order.
    @ivar uris: the URIs asked for.
    """

    def __init__(self, results: list[Any]) -> None:
        """
        @param results: the Deferreds to return.
        """
        self.incoming = type("Incoming", (), {"machine": _Machine()})()
        self.port: Any = None
        self.results = results
        self.uris: list[str] = []

    def listenAgain(self, uri: str) -> Deferred:
        """
        @param uri: recorded.
        @return: the next result.
        """
        self.uris.append(uri)
        return self.results.pop(0)


class DestinationTests(SynchronousTestCase):
    """
    L{DestinationAutoRecovery}.
    """

    def test_relisten(self) -> None:
        """
        Paused: listen on the recovery URI; while the address is in use,
        try again every L{REBIND_DELAY}; an event says where it listens.
        """
        clock = Clock()
        listener = _Listener([fail(CannotListenError("10.1.1.2", 4444, OSError())), succeed(object())])
        events: list[dict[str, Any]] = []
        auto = DestinationAutoRecovery(clock, listener, lambda: True, lambda: "tcp:10.1.1.2:4444",
                                       events.append)
        auto.statusChanged(S.POSTCOPY_PAUSED)
        clock.advance(0)
        self.assertEqual(listener.uris, ["tcp:10.1.1.2:4444"])
        clock.advance(REBIND_DELAY)
        self.assertEqual(len(listener.uris), 2)
        self.assertEqual(events, [{"status": "postcopy-paused", "x-recover-listening": "tcp:10.1.1.2:4444"}])

    def test_alreadyListening(self) -> None:
        """
        A recovery listener that is up already (or the original one, the
        URI then being None) is kept.
        """
        clock = Clock()
        listener = _Listener([])
        listener.port = object()
        auto = DestinationAutoRecovery(clock, listener, lambda: True, lambda: "tcp:1.2.3.4:5", print)
        auto.statusChanged(S.POSTCOPY_PAUSED)
        clock.advance(0)
        listener.port = None
        auto2 = DestinationAutoRecovery(clock, listener, lambda: True, lambda: None, print)
        auto2.statusChanged(S.POSTCOPY_PAUSED)
        clock.advance(0)
        self.assertEqual(listener.uris, [])
