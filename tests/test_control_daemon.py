# -*- test-case-name: tests.test_control_daemon -*-
"""
Tests for L{twisted_postcopy.control.daemon}: spawning C{twistd postcopy}
child processes.
"""

from __future__ import annotations

import os
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
