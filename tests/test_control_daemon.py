# -*- test-case-name: tests.test_control_daemon -*-
"""
Tests for L{twisted_postcopy.control.daemon}: spawning C{twistd postcopy}
child processes.
"""

from __future__ import annotations

import json
import os
import sys
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.control import daemon
from twisted_postcopy.errors import DaemonError


class EnvironmentTests(SynchronousTestCase):
    """
    Tests for L{daemon.pluginEnvironment} and L{daemon.logTail}.
    """

    def test_checkoutFirst(self) -> None:
        """
        The checkout holding the plugin comes first on C{PYTHONPATH}, before
        what was there.
        """
        env = daemon.pluginEnvironment({"PYTHONPATH": "/elsewhere", "HOME": "/root"})
        self.assertEqual(env["PYTHONPATH"], f"{daemon.CHECKOUT}{os.pathsep}/elsewhere")
        self.assertEqual(env["HOME"], "/root")

    def test_logTail(self) -> None:
        """
        The last lines of a log, or a note when there is none.
        """
        workdir = Path(tempfile.mkdtemp(prefix="pc-test-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        path = workdir / "source.log"
        path.write_text("".join(f"line {i}\n" for i in range(30)))
        self.assertEqual(daemon.logTail(path, 2), "line 28\nline 29")
        self.assertEqual(daemon.logTail(workdir / "missing.log"), "(no log)")


class StartDaemonTests(TestCase):
    """
    Tests for L{daemon.startDaemon} with real child processes.
    """

    def setUp(self) -> None:
        """
        Make a short work directory (Unix socket paths are short).
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.workdir = Path(tempfile.mkdtemp(prefix="pc-test-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    @defer.inlineCallbacks
    def test_usageError(self) -> Any:
        """
        A daemon that exits at once raises L{DaemonError} carrying its
        complaint.
        """
        d = defer.Deferred.fromCoroutine(
            daemon.startDaemon(self.reactor, "source", self.workdir, ["--role", "middle"])
        )
        error = yield self.assertFailure(d, DaemonError)
        self.assertIn("source daemon exited with status", str(error))
        self.assertIn("middle", str(error))


class RealDaemonTests(TestCase):
    """
    The C{postcopy} command line, run as a child process, against a real
    C{twistd postcopy} daemon (with the real MigrationManager) over a Unix
    socket.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        """
        Start a source daemon without a guest.
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.workdir = Path(tempfile.mkdtemp(prefix="pc-test-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.daemon = yield defer.Deferred.fromCoroutine(
            daemon.startDaemon(reactor, "source", self.workdir, ["--guest", "none"])
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.daemon.stop(reactor)))

    def postcopy(self, *argv: str) -> defer.Deferred:
        """
        Run C{postcopy ARGV --control ...} in a child process.

        @param argv: the subcommand and its arguments.
        @return: a Deferred firing with (output, error output, exit status).
        """
        from twisted.internet.utils import getProcessOutputAndValue

        args = ["-m", "twisted_postcopy.cli", argv[0], "--control", self.daemon.control, *argv[1:]]
        d = getProcessOutputAndValue(sys.executable, args, env=dict(os.environ), reactor=self.reactor)
        return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))

    @defer.inlineCallbacks
    def test_session(self) -> Any:
        """
        Capabilities and parameters set with the CLI read back; an idle
        daemon's C{query-migrate} is C{{}} (as QEMU's); refused commands
        print QEMU's text and exit 1.
        """
        out, err, status = yield self.postcopy("migrate-set-capabilities", "postcopy-ram=on")
        self.assertEqual((out, err, status), ("", "", 0))
        out, _, _ = yield self.postcopy("query-migrate-capabilities", "--json")
        self.assertTrue(json.loads(out)["postcopy-ram"])
        yield self.postcopy("migrate-set-parameters", "downtime-limit=100")
        out, _, _ = yield self.postcopy("query-migrate-parameters", "--json")
        self.assertEqual(json.loads(out)["downtime-limit"], 100)
        out, _, status = yield self.postcopy("query-migrate", "--json")
        self.assertEqual((json.loads(out), status), ({}, 0))
        _, err, status = yield self.postcopy("migrate-start-postcopy")
        self.assertEqual(
            (err, status), ("error: Postcopy must be started after migration has been started\n", 1)
        )
        _, err, status = yield self.postcopy("migrate-set-capabilities", "xbzrle=maybe")
        self.assertEqual(status, 2)
        self.assertIn("expected on or off", err)
