# -*- test-case-name: tests.test_migration_access -*-
"""
Tests for the migration listener rule of L{twisted_postcopy.access}
(docs/security.md, "Migration listeners"): nothing accepts a migration
from off the host without TLS and client authentication unless the
operator opted in with C{--insecure-migration}; a plaintext migration to
another host is logged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python import usage
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy import access
from twisted_postcopy.access import INSECURE_MIGRATION, checkMigrationListener, warnPlaintextMigration
from twisted_postcopy.errors import MigrationError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.tap import Options, makeService
from twisted_postcopy.testing import pki
from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM
from twisted_postcopy.tlscreds import TLSCredsX509, TLSPolicy

#: Addresses off this host, or every address (never connected to here).
OFF_HOST = ["tcp:0.0.0.0:4444", "tcp:10.1.2.3:4444", "tcp:[::]:0", "tcp:[2001:db8::1]:4444",
            "tcp:migration.example:4444"]
#: Loopback and Unix URIs.
LOCAL = ["tcp:127.0.0.1:0", "tcp:127.0.0.2:4444", "tcp:[::1]:0", "tcp:localhost:4444", "unix:/run/p.sock"]


def logged(test: SynchronousTestCase) -> list[dict[str, Any]]:
    """
    @param test: the test (the module logger is restored after it).
    @return: the events the access module logs from now on.
    """
    events: list[dict[str, Any]] = []
    test.patch(access, "_log", Logger(namespace="access", observer=events.append))
    return events


def serverPolicy(verifyPeer: bool) -> TLSPolicy:
    """
    @param verifyPeer: the credentials' C{verify-peer}.
    @return: a destination's TLS policy (credentials not loaded: the rule
        only reads C{verify-peer}).
    """
    return TLSPolicy(TLSCredsX509("tls0", "/nonexistent", "server", verifyPeer))


class ListenerRuleTests(SynchronousTestCase):
    """
    L{checkMigrationListener} and L{warnPlaintextMigration}.
    """

    def test_local(self) -> None:
        """
        Loopback and Unix listeners need nothing.
        """
        events = logged(self)
        for uri in LOCAL:
            checkMigrationListener(uri, None, False)
        self.assertEqual(events, [])

    def test_offHostRefused(self) -> None:
        """
        A plaintext listener on another address, or on every address, is
        refused with a message naming the ways out.
        """
        for uri in OFF_HOST:
            error = self.assertRaises(MigrationError, checkMigrationListener, uri, None, False)
            self.assertIn(f"migrate-incoming: {uri} would accept a migration in plaintext", str(error))
            for way in ("tls-creds", "verify-peer=on", "unix:PATH", INSECURE_MIGRATION):
                self.assertIn(way, str(error))

    def test_tls(self) -> None:
        """
        TLS whose server checks client certificates is enough; TLS with
        C{verify-peer=off} authenticates nobody and is refused.
        """
        checkMigrationListener("tcp:10.1.2.3:4444", serverPolicy(True), False)
        error = self.assertRaises(MigrationError, checkMigrationListener, "tcp:10.1.2.3:4444",
                                  serverPolicy(False), False, "migrate-recover")
        self.assertIn("migrate-recover: tcp:10.1.2.3:4444 would accept a migration over TLS without "
                      "client authentication (tls-creds 'tls0' has verify-peer=off)", str(error))

    def test_insecure(self) -> None:
        """
        With the operator's opt-in the listener is allowed, with a warning.
        """
        events = logged(self)
        checkMigrationListener("tcp:10.1.2.3:4444", None, True)
        (event,) = events
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(event["uri"], "tcp:10.1.2.3:4444")

    def test_outgoingWarning(self) -> None:
        """
        A migration to another host without TLS is logged; to loopback,
        Unix or over TLS it is not.
        """
        events = logged(self)
        self.assertTrue(warnPlaintextMigration("tcp:10.1.2.3:4444", None))
        for uri in LOCAL:
            self.assertFalse(warnPlaintextMigration(uri, None))
        self.assertFalse(warnPlaintextMigration("tcp:10.1.2.3:4444", object()))
        self.assertEqual([e["uri"] for e in events], ["tcp:10.1.2.3:4444"])


class ManagerTests(SynchronousTestCase):
    """
    The manager's C{migrate-incoming}, C{migrate-recover} and C{migrate}
    apply the rule.
    """

    def test_incomingRefused(self) -> None:
        """
        C{migrate-incoming} off the host is refused before anything is
        set up: nothing listens and a loopback address still works after.
        """
        reactor = MemoryReactorClock()
        manager = MigrationManager(reactor, IncomingTestVM())
        self.assertRaises(MigrationError, manager.migrateIncoming, "tcp:0.0.0.0:4444")
        self.assertIsNone(manager.incoming)
        self.assertEqual(reactor.tcpServers, [])
        manager.migrateIncoming("tcp:127.0.0.1:0")
        self.assertEqual([(port, host) for port, _, _, host in reactor.tcpServers], [(0, "127.0.0.1")])
        error = self.assertRaises(MigrationError, manager.migrateRecover, "tcp:10.1.2.3:4444")
        self.assertIn("migrate-recover: tcp:10.1.2.3:4444", str(error))

    def test_insecureMigration(self) -> None:
        """
        With C{insecureMigration} (the daemon's C{--insecure-migration})
        the plaintext listener is made.
        """
        reactor = MemoryReactorClock()
        manager = MigrationManager(reactor, IncomingTestVM())
        manager.insecureMigration = True
        logged(self)
        manager.migrateIncoming("tcp:10.1.2.3:4444")
        self.assertEqual([(port, host) for port, _, _, host in reactor.tcpServers], [(4444, "10.1.2.3")])

    def test_tlsWithClientCertificates(self) -> None:
        """
        Server credentials with C{verify-peer} on (the default) make an
        off-host listener acceptable; with it off they do not.
        """
        directory = self.mktemp()
        pki.writeCredentials(directory)
        for verifyPeer, allowed in (("on", True), ("off", False)):
            reactor = MemoryReactorClock()
            manager = MigrationManager(reactor, IncomingTestVM())
            manager.objectAdd("tls-creds-x509", "tls0", dir=directory, endpoint="server",
                              **{"verify-peer": verifyPeer})
            manager.setParameters({"tls-creds": "tls0"})
            if allowed:
                manager.migrateIncoming("tcp:10.1.2.3:4444")
                self.assertEqual(len(reactor.tcpServers), 1)
            else:
                self.assertRaises(MigrationError, manager.migrateIncoming, "tcp:10.1.2.3:4444")
                self.assertEqual(reactor.tcpServers, [])

    def test_outgoingWarned(self) -> None:
        """
        C{migrate} to another host in plaintext goes ahead, logged.
        """
        reactor = MemoryReactorClock()
        manager = MigrationManager(reactor, OutgoingTestVM({"pc.ram": 1 << 20}))
        events = logged(self)
        manager.migrate("tcp:10.1.2.3:4444")
        self.assertEqual([e["uri"] for e in events], ["tcp:10.1.2.3:4444"])
        self.assertEqual(len(reactor.tcpClients), 1)


class DaemonOptionTests(SynchronousTestCase):
    """
    C{twistd postcopy --insecure-migration}.
    """

    def test_incomingRefused(self) -> None:
        """
        C{--incoming} off the host without TLS is a usage error unless
        C{--insecure-migration} is given.
        """
        base = ["--role", "destination", "--guest", "none", "--control", "unix:/nonexistent/c.sock",
                "--incoming", "tcp:0.0.0.0:4444"]
        error = self.assertRaises(usage.UsageError, Options().parseOptions, base)
        self.assertIn(INSECURE_MIGRATION, str(error))
        Options().parseOptions([*base, INSECURE_MIGRATION])
        Options().parseOptions([*base, "--parameter", "tls-creds=tls0"])

    def test_reachesManagerAndJobs(self) -> None:
        """
        The option reaches the daemon's manager and its snapshot jobs
        (captures listen through their own managers).
        """
        for arguments, expected in (([], False), ([INSECURE_MIGRATION], True)):
            options = Options()
            options.parseOptions(["--role", "snapshot", "--control", "unix:/nonexistent/c.sock", *arguments])
            service = makeService(options, MemoryReactorClock())
            self.assertEqual((service.manager.insecureMigration, service.snapshots.insecureMigration),
                             (expected, expected))

    def test_captureRefused(self) -> None:
        """
        A daemon's C{snapshot-capture} off the host is refused; its
        directory is not left behind.
        """
        import os

        from twisted_postcopy.snapshot.jobs import SnapshotJobs

        jobs = SnapshotJobs(MemoryReactorClock())
        target = os.path.abspath(self.mktemp())
        self.assertRaises(MigrationError, jobs.startCapture, "tcp:0.0.0.0:4444", target)
        self.assertIsNone(jobs.capture)
        self.assertFalse(os.path.exists(target))


class RealDaemonTests(TestCase):
    """
    A real C{twistd postcopy} daemon refuses off-host plaintext listeners
    over its control API (the namespace tests show the opt-in working:
    C{tests/test_recovery_netns.py}, C{tests/test_qemu_netns_recovery.py}).
    """

    timeout = 60

    def test_refusedOverControl(self) -> Deferred:
        """
        C{migrate-incoming} and C{snapshot-capture} on every address are
        refused with the rule's message, and the daemon serves on.
        """
        return Deferred.fromCoroutine(self._refusedOverControl())

    async def _refusedOverControl(self) -> None:
        import os
        import shutil
        import tempfile
        from pathlib import Path

        from twisted.internet import reactor

        from twisted_postcopy.control.daemon import startDaemon

        workdir = tempfile.mkdtemp(prefix="pc-acc-")
        self.addCleanup(shutil.rmtree, workdir, True)
        daemon = await startDaemon(reactor, "dst", Path(workdir), ["--role", "destination", "--guest", "none"])
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop(reactor)))
        for call in (lambda: daemon.client.migrateIncoming("tcp:0.0.0.0:0"),
                     lambda: daemon.client.snapshotCapture("tcp:0.0.0.0:0", os.path.join(workdir, "snap"))):
            try:
                await call()
            except MigrationError as error:
                self.assertIn("would accept a migration in plaintext", str(error))
                self.assertIn(INSECURE_MIGRATION, str(error))
            else:
                self.fail("an off-host plaintext listener was accepted")
        self.assertFalse(os.path.exists(os.path.join(workdir, "snap")))
        self.assertEqual((await daemon.client.queryMigrate()).get("status", "none"), "none")
