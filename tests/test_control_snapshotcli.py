# -*- test-case-name: tests.test_control_snapshotcli -*-
"""
Tests for L{twisted_postcopy.control.snapshotcli}: each C{postcopy
snapshot-*} subcommand run against a control server on a real Unix socket
whose L{SnapshotJobs} act on real snapshot directories with the real
reactor.  (C{postcopy snapshot read --control}, which runs its own
reactor, is run as a child process against a real daemon in
L{tests.test_qemu_snapshot_daemon}.)
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from twisted_postcopy.cli import buildParser
from twisted_postcopy.control import cli
from twisted_postcopy.control.server import ControlFactory
from twisted_postcopy.control.snapshotcli import SNAPSHOT_COMMANDS
from twisted_postcopy.snapshot.jobs import SnapshotJobs
from tests.test_control_snapshot import PAGE, RAM_PAGES, storedSnapshot
from tests.test_service import socketPath


class SnapshotCommandLineTests(TestCase):
    """
    The snapshot subcommands against a control server.
    """

    def setUp(self) -> defer.Deferred:
        """
        A stored snapshot, and a server listening on a Unix socket.

        @return: a Deferred firing once listening.
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.snapshot = os.path.abspath(self.mktemp())
        self.ram = storedSnapshot(self.snapshot)
        self.jobs = SnapshotJobs(reactor)
        self.path = socketPath(self)
        d = UNIXServerEndpoint(reactor, self.path).listen(ControlFactory(None, None, self.jobs))
        return d.addCallback(lambda port: self.addCleanup(port.stopListening))

    async def runCommand(self, *argv: str) -> tuple[int, io.TextIOWrapper, str]:
        """
        Run one subcommand against the server.

        @param argv: the command line after C{postcopy}, without C{--control}.
        @return: the exit status, the output (text over a binary buffer)
            and the error output.
        """
        args = buildParser().parse_args([argv[0], "--control", "unix:" + self.path, *argv[1:]])
        handler = {name: handler for name, _, handler, _ in SNAPSHOT_COMMANDS}[args.command]
        out, err = io.TextIOWrapper(io.BytesIO(), write_through=True), io.StringIO()
        status = await cli.runHandler(self.reactor, handler, args, out, err)
        return status, out, err.getvalue()

    def run_(self, *argv: str) -> defer.Deferred:
        """
        @param argv: as L{runCommand}.
        @return: a Deferred of L{runCommand}'s result, the output as text.
        """
        d = defer.Deferred.fromCoroutine(self.runCommand(*argv))
        return d.addCallback(lambda r: (r[0], r[1].buffer.getvalue().decode(errors="replace"), r[2]))

    @defer.inlineCallbacks
    def test_info(self) -> Any:
        """
        C{snapshot-info --json} prints the snapshot's info; without
        C{--json}, C{name: value} lines naming each block.
        """
        status, out, _ = yield self.run_("snapshot-info", self.snapshot, "--json")
        self.assertEqual((status, json.loads(out)["machine"]), (0, "pc-i440fx-7.2"))
        status, out, _ = yield self.run_("snapshot-info", self.snapshot)
        self.assertEqual(status, 0)
        self.assertIn(f"blocks: pc.ram ({RAM_PAGES * PAGE} bytes)", out.splitlines())

    @defer.inlineCallbacks
    def test_verify(self) -> Any:
        """
        C{snapshot-verify} prints C{DIR: OK}; after tampering it exits 1
        and says why.
        """
        status, out, _ = yield self.run_("snapshot-verify", self.snapshot)
        self.assertEqual((status, out), (0, f"{self.snapshot}: OK\n"))
        name = json.loads((yield self.run_("snapshot-info", self.snapshot, "--json"))[1])
        with open(os.path.join(self.snapshot, name["blocks"][0]["file"]), "r+b") as f:
            f.write(b"X")
        status, out, err = yield self.run_("snapshot-verify", self.snapshot)
        self.assertEqual(status, 1)
        self.assertIn("sha256 mismatch", err)

    @defer.inlineCallbacks
    def test_read(self) -> Any:
        """
        C{snapshot-read} writes the exact stored bytes, however long.
        """
        d = defer.Deferred.fromCoroutine(self.runCommand(
            "snapshot-read", self.snapshot, "pc.ram", "0x10", str(30 * PAGE)))
        status, out, err = yield d
        self.assertEqual(status, 0, err)
        self.assertEqual(out.buffer.getvalue(), self.ram[0x10:0x10 + 30 * PAGE])

    @defer.inlineCallbacks
    def test_readBadBlock(self) -> Any:
        """
        C{snapshot-read} of an unknown block exits 1 with the error.
        """
        status, _, err = yield self.run_("snapshot-read", self.snapshot, "nope", "0", "1")
        self.assertEqual(status, 1)
        self.assertIn("nope", err)

    @defer.inlineCallbacks
    def test_captureAndQuery(self) -> Any:
        """
        C{snapshot-capture} prints the URI listened on (a real port);
        C{query-snapshot} reports the capture (JSON and text).
        """
        target = self.mktemp()
        status, out, err = yield self.run_("snapshot-capture", "tcp:127.0.0.1:0", target)
        self.addCleanup(self.jobs.capture.vm.failed, "test over")
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"^listening on tcp:127\.0\.0\.1:[1-9][0-9]*\n$")
        status, out, _ = yield self.run_("query-snapshot", "--json")
        capture = json.loads(out)["capture"]
        self.assertEqual((capture["dir"], capture["status"]), (os.path.abspath(target), "setup"))
        status, out, _ = yield self.run_("query-snapshot")
        self.assertIn("capture status: setup", out.splitlines())

    @defer.inlineCallbacks
    def test_restoreUnreachable(self) -> Any:
        """
        C{snapshot-restore} towards a port nobody listens on starts (exit
        0), then the restore is reported failed by C{query-snapshot}.
        """
        status, _, err = yield self.run_("snapshot-restore", self.snapshot, "--to",
                                         "unix:" + self.path + ".nobody")
        self.assertEqual(status, 0, err)
        for _ in range(200):
            if self.jobs.restores[0].outcome is not None:
                break
            yield deferLater(self.reactor, 0.02, lambda: None)
        status, out, _ = yield self.run_("query-snapshot", "--json")
        self.assertEqual(json.loads(out)["restores"][0]["status"], "failed")

    @defer.inlineCallbacks
    def test_restoreParameters(self) -> Any:
        """
        C{snapshot-restore --postcopy-preempt --parameter NAME=VALUE} gives
        the daemon's restore the capability and the parameter; a parameter
        the daemon refuses exits 1 with QEMU's text and starts nothing.
        """
        status, _, err = yield self.run_("snapshot-restore", self.snapshot, "--to", "unix:" + self.path + ".nobody",
                                         "--parameter", "x-no-such=1")
        self.assertEqual(status, 1)
        self.assertIn("Parameter 'x-no-such' is unexpected", err)
        self.assertEqual(self.jobs.restores, [])
        status, _, err = yield self.run_("snapshot-restore", self.snapshot, "--to", "unix:" + self.path + ".nobody",
                                         "--postcopy-preempt", "--parameter", "x-readahead-pages=8")
        self.assertEqual(status, 0, err)
        (manager,) = self.jobs.restores[0].managers
        self.assertTrue(manager.capabilities["postcopy-preempt"])
        self.assertTrue(manager.capabilities["postcopy-ram"])
        self.assertEqual(manager.parameters["x-readahead-pages"], 8)
