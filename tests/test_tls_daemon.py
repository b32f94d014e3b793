# -*- test-case-name: tests.test_tls_daemon -*-
"""
TLS through the daemon's surfaces (docs/tls.md): two real C{twistd
postcopy} daemons with built-in stress guests, given their credentials
with C{--object tls-creds-x509,...} and C{--parameter tls-creds=...},
migrate over TLS (precopy then postcopy) and the destination guest
verifies its memory; the C{postcopy} command line creates, lists and
deletes objects and sets the TLS parameters over AMP.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from twisted_postcopy.control import daemon
from twisted_postcopy.demo import daemonArguments, migrate
from twisted_postcopy.testing import pki


class DaemonTLSTests(TestCase):
    """
    Two daemons, real guests, TLS set up with the daemon's options.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        A work directory with one credentials directory for both ends.
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.workdir = Path(tempfile.mkdtemp(prefix="pc-tls-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.pki = str(self.workdir / "pki")
        pki.writeCredentials(self.pki)

    @defer.inlineCallbacks
    def start(self, role: str, arguments: list[str], ram: int = 16 << 20) -> Any:
        """
        Start one daemon with a stress guest.

        @param role: C{source} or C{destination}.
        @param arguments: more plugin options.
        @param ram: guest RAM.
        @return: a Deferred firing with the L{daemon.Daemon}.
        """
        options = argparse.Namespace(guest="stress", ram=ram, seed=7)
        started = yield defer.Deferred.fromCoroutine(daemon.startDaemon(
            self.reactor, role, self.workdir, [*daemonArguments(options, role), *arguments]))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(started.stop(self.reactor)))
        return started

    def postcopy(self, control: str, *argv: str) -> defer.Deferred:
        """
        Run C{postcopy ARGV --control CONTROL} in a child process.

        @param control: the daemon's control endpoint.
        @param argv: the subcommand and its arguments.
        @return: a Deferred firing with (output, error output, exit status).
        """
        from twisted.internet.utils import getProcessOutputAndValue

        args = ["-m", "twisted_postcopy.cli", argv[0], "--control", control, *argv[1:]]
        d = getProcessOutputAndValue(sys.executable, args, env=dict(os.environ),
                                     reactor=self.reactor)
        return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))

    @defer.inlineCallbacks
    def test_migrationOverTLS(self) -> None:
        """
        C{--object} and C{--parameter} give both daemons TLS; a migration
        switched to postcopy completes on both and the destination guest
        verifies every page.
        """
        def tls(endpoint: str) -> list[str]:
            return ["--object", f"tls-creds-x509,id=tls0,dir={self.pki},endpoint={endpoint}",
                    "--parameter", "tls-creds=tls0"]

        destination = yield self.start("destination", tls("server"))
        source = yield self.start("source", tls("client"))
        parameters = yield defer.Deferred.fromCoroutine(source.client.queryParameters())
        self.assertEqual(parameters["tls-creds"], "tls0")
        args = argparse.Namespace(guest="stress", ram=16 << 20, seed=7, timeout=90,
                                  postcopy_after=0.5)
        from twisted_postcopy.demo import Progress

        result = yield defer.Deferred.fromCoroutine(
            migrate(self.reactor, source, destination, args, Progress(io.StringIO(), args.ram)))
        self.assertEqual((result["source"]["status"], result["destination"]["status"]),
                         ("completed", "completed"), result)
        self.assertTrue(result["verified"], result["guest"])

    @defer.inlineCallbacks
    def test_commandLine(self) -> None:
        """
        C{object-add} in QEMU's C{-object} syntax, C{query-objects},
        C{migrate-set-parameters tls-...}, C{object-del}; a missing
        credentials directory is refused with QEMU's text.
        """
        source = yield self.start("source", [], ram=4 << 20)
        control = source.control
        out, err, status = yield self.postcopy(
            control, "object-add", f"tls-creds-x509,id=tls0,dir={self.pki},endpoint=client")
        self.assertEqual((out, err, status), ("", "", 0))
        _, _, status = yield self.postcopy(
            control, "object-add", "authz-simple,id=auth0,identity=O=Example,,CN=client")
        self.assertEqual(status, 0)
        out, _, _ = yield self.postcopy(control, "query-objects", "--json")
        self.assertEqual(json.loads(out), [
            {"qom-type": "authz-simple", "id": "auth0", "identity": "O=Example,CN=client"},
            {"qom-type": "tls-creds-x509", "id": "tls0", "dir": self.pki, "endpoint": "client",
             "verify-peer": True}])
        yield self.postcopy(control, "migrate-set-parameters", "tls-creds=tls0",
                            "tls-hostname=10")
        out, _, _ = yield self.postcopy(control, "query-migrate-parameters", "--json")
        self.assertEqual((json.loads(out)["tls-creds"], json.loads(out)["tls-hostname"]),
                         ("tls0", "10"))
        _, err, status = yield self.postcopy(
            control, "object-add", f"tls-creds-x509,id=bad,dir={self.workdir}/none,endpoint=server")
        self.assertEqual((err, status), (f"error: Unable to access credentials {self.workdir}/none"
                                         "/ca-cert.pem: No such file or directory\n", 1))
        _, _, status = yield self.postcopy(control, "object-del", "auth0")
        self.assertEqual(status, 0)
        out, _, _ = yield self.postcopy(control, "query-objects")
        self.assertEqual(out, f"tls-creds-x509,id=tls0,dir={self.pki},endpoint=client,"
                              "verify-peer=on\n")

    @defer.inlineCallbacks
    def test_snapshotCaptureTLS(self) -> None:
        """
        C{snapshot-capture --tls-creds} uses the daemon's objects: a
        missing id is refused with QEMU's text; server credentials make it
        listen, and a TLS client completes the handshake with it (the
        capture then waits for the stream).
        """
        snapd = yield self.start("snapshot", ["--role", "snapshot"], ram=4 << 20)
        _, err, status = yield self.postcopy(
            snapd.control, "snapshot-capture", "tcp:127.0.0.1:0", str(self.workdir / "s1"),
            "--tls-creds", "nothing")
        self.assertEqual((err, status), ("error: No TLS credentials with id 'nothing'\n", 1))
        yield self.postcopy(snapd.control, "object-add",
                            f"tls-creds-x509,id=tls0,dir={self.pki},endpoint=server")
        out, err, status = yield self.postcopy(
            snapd.control, "snapshot-capture", "tcp:127.0.0.1:0", str(self.workdir / "s2"),
            "--tls-creds", "tls0")
        self.assertEqual(status, 0, err)
        uri = out.split()[-1]
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol
        from twisted_postcopy.protocols.tls import connectMaybeTLS
        from twisted_postcopy.tlscreds import ObjectRegistry

        objects = ObjectRegistry()
        objects.add("tls-creds-x509", "c", dir=self.pki, endpoint="client")
        policy = objects.clientPolicy({"tls-creds": "c"}, "127.0.0.1")
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", int(uri.rpartition(":")[2]))
        protocol = yield connectMaybeTLS(endpoint, policy, Factory.forProtocol(Protocol))
        self.assertEqual(protocol.transport.peerIdentity,
                         "O=twisted-postcopy tests,CN=migration-server")
        protocol.transport.abortConnection()
