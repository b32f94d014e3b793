# -*- test-case-name: tests.test_demo -*-
"""
Tests for L{twisted_postcopy.demo}: its command line, the daemon options
it derives, failure reporting, and a whole C{postcopy demo --json} run.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy import demo
from twisted_postcopy.cli import buildParser
from twisted_postcopy.testing.real import requireUserfaultfd


class ArgumentTests(SynchronousTestCase):
    """
    Tests for the C{postcopy demo} arguments.
    """

    def test_defaults(self) -> None:
        """
        By default: a 256 MiB stress guest, postcopy after 1 s, a report.
        """
        args = buildParser().parse_args(["demo"])
        self.assertEqual((args.guest, args.ram, args.postcopy_after, args.json),
                         ("stress", 256 << 20, 0.2, False))

    def test_options(self) -> None:
        """
        C{--guest}, C{--ram}, C{--postcopy-after} and C{--json} are parsed.
        """
        args = buildParser().parse_args(
            ["demo", "--guest", "kv", "--ram", "64M", "--postcopy-after", "0.5", "--json"])
        self.assertEqual((args.guest, args.ram, args.postcopy_after, args.json),
                         ("kv", 64 << 20, 0.5, True))

    def test_daemonArguments(self) -> None:
        """
        Both daemons get the same guest, RAM and seed.
        """
        args = buildParser().parse_args(["demo", "--ram", "64M", "--seed", "7"])
        self.assertEqual(demo.daemonArguments(args, "source"),
                         ["--role", "source", "--guest", "stress", "--ram", f"{64 << 20}B",
                          "--seed", "7"])
        self.assertEqual(demo.daemonArguments(args, "destination")[:2], ["--role", "destination"])



class FailureTests(TestCase):
    """
    The demo reports a daemon that cannot start.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_daemonFails(self) -> Any:
        """
        When a daemon exits at start, the demo prints its complaint, says
        where the logs are, and exits 1.
        """
        from twisted.internet import reactor

        args = buildParser().parse_args(["demo", "--ram", "1B"])
        self.patch(demo, "daemonArguments", lambda args, role: ["--role", "nowhere"])
        out, err = io.StringIO(), io.StringIO()
        status = yield defer.Deferred.fromCoroutine(demo.runDemo(reactor, args, out, err))
        self.assertEqual(status, 1)
        self.assertIn("destination daemon exited with status 1", err.getvalue())
        self.assertIn("nowhere", err.getvalue())
        self.assertIn("daemon logs kept in", err.getvalue())
        self.assertEqual(out.getvalue(), "")
        workdir = err.getvalue().rsplit("daemon logs kept in ", 1)[1].split(")")[0]
        shutil.rmtree(workdir)


def demoReport(case: Any, *arguments: str) -> dict[str, Any]:
    """
    Run C{postcopy demo --json} as a user does (a child process, two real
    daemons) and check it succeeded.

    @param case: the test case (its assertion fails on a non-zero exit).
    @param arguments: more C{postcopy demo} arguments.
    @return: the demo's JSON report.
    """
    result = subprocess.run([sys.executable, "-m", "twisted_postcopy.cli", "demo", "--json", *arguments],
                            capture_output=True, text=True, timeout=120)
    case.assertEqual(result.returncode, 0, result.stderr)
    return json.loads(result.stdout)


class EndToEndTests(SynchronousTestCase):
    """
    C{postcopy demo} as a user runs it: two real daemons, a real guest,
    userfaultfd, loopback TCP.
    """

    def setUp(self) -> None:
        """
        The daemons' destination needs userfaultfd (L{requireUserfaultfd}).
        """
        requireUserfaultfd()

    def test_demoJSON(self) -> None:
        """
        C{postcopy demo --json --ram 64M --postcopy-after 0} completes on
        both sides, went through postcopy (its events say so), and the
        destination guest verified its memory.
        """
        report = demoReport(self, "--ram", "64M", "--postcopy-after", "0")
        self.assertEqual(report["source"]["status"], "completed")
        self.assertEqual(report["destination"]["status"], "completed")
        self.assertTrue(report["verified"], report["guest"])
        self.assertEqual(report["ram-bytes"], 64 << 20)
        host, port = report["uri"].removeprefix("tcp:").rsplit(":", 1)
        self.assertEqual(host, "127.0.0.1")
        self.assertGreater(int(port), 0)
        self.assertGreater(report["source"]["ram"]["transferred"], 0)
        self.assertEqual(report["source-statuses"][-1], "completed")
        self.assertIn("postcopy-active", report["source-statuses"])
        self.assertGreater(report["guest"]["workers"]["stress-0"]["pages"], 0)

    def test_defaultsReachPostcopy(self) -> None:
        """
        C{postcopy demo} on its defaults (the README's first command) goes
        through postcopy: its precopy bandwidth cannot send the default
        guest's RAM before C{--postcopy-after} asks for postcopy (at
        1 GiB/s it once converged first and the demo never showed
        postcopy).
        """
        report = demoReport(self)
        self.assertTrue(report["verified"], report["guest"])
        self.assertEqual(report["source-statuses"], ["setup", "active", "postcopy-active", "completed"])

    def test_demoPreempt(self) -> None:
        """
        C{postcopy demo --postcopy-preempt}: both daemons with
        C{postcopy-preempt}, the migration goes through postcopy and
        completes, and the guest's memory is verified.
        """
        report = demoReport(self, "--ram", "32M", "--postcopy-after", "0", "--postcopy-preempt")
        self.assertEqual((report["source"]["status"], report["destination"]["status"]),
                         ("completed", "completed"))
        self.assertTrue(report["verified"], report["guest"])
        self.assertIn("postcopy-active", report["source-statuses"])

    def test_demoReport(self) -> None:
        """
        Without C{--json} the demo prints its report, progress going to
        standard error as plain lines (not a terminal); a kv guest's
        entries, stored on the source, are all read back from the
        destination.
        """
        result = subprocess.run(
            [sys.executable, "-m", "twisted_postcopy.cli", "demo", "--ram", "16M", "--guest", "kv",
             "--postcopy-after", "0"],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("guest memory verified: yes", result.stdout)
        self.assertIn(f"read back from the destination: {2 * demo.KV_ENTRIES} of {2 * demo.KV_ENTRIES}",
                      result.stdout)
        self.assertIn("destination  completed", result.stdout)
        self.assertIn("completed", result.stderr)
        self.assertNotIn("\r", result.stderr)
