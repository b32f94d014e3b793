# -*- test-case-name: tests.test_observe_watch -*-
"""
Tests for L{twisted_postcopy.observe.watch} (C{postcopy watch}): the loop
with a scripted client, the rich display, and C{--qmp} against a real
QEMU 7.2 migration (the C{--control} path against real daemons is in
C{test_observe_daemons}).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.cli import buildParser
from twisted_postcopy.observe import watch
from twisted_postcopy.testing.real import missingReal

#: A source's C{query-migrate} answers through a postcopy migration.
ANSWERS = [
    {},
    {"status": "active", "total-time": 10, "setup-time": 2, "expected-downtime": 300,
     "ram": {"transferred": 1 << 20, "remaining": 3 << 20, "total": 4 << 20, "mbps": 80.0,
             "postcopy-requests": 0, "normal": 256, "duplicate": 0}},
    {"status": "postcopy-active", "total-time": 20, "setup-time": 2, "expected-downtime": 300,
     "ram": {"transferred": 3 << 20, "remaining": 1 << 20, "total": 4 << 20, "mbps": 90.0,
             "postcopy-requests": 4, "normal": 768, "duplicate": 0}},
    {"status": "completed", "total-time": 30, "setup-time": 2, "downtime": 5,
     "ram": {"transferred": 4 << 20, "remaining": 0, "total": 4 << 20, "mbps": 95.0,
             "postcopy-requests": 7, "normal": 1000, "duplicate": 24}},
]


class ScriptedClient:
    """
    Stand-in for a control or QMP connection (unit tests only): answers
    C{query-migrate} from a list and sends the events it was told to.

    @ivar answers: the answers still to give.
    @ivar events: statuses to send as C{MIGRATION} events at subscription.
    """

    def __init__(self, answers: list[dict[str, Any]], events: list[str] = ()) -> None:
        """
        @param answers: the answers, in order (the last is repeated).
        @param events: event statuses.
        """
        self.answers = list(answers)
        self.events = list(events)

    async def subscribe(self, onStatus: Any) -> None:
        """
        @param onStatus: gets each event's status.
        """
        for status in self.events:
            onStatus(status)

    async def queryMigrate(self) -> dict[str, Any]:
        """
        @return: the next answer.
        """
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


async def _noSleep(seconds: float) -> None:
    """
    Sleep not at all.

    @param seconds: ignored.
    """


def _args(*argv: str) -> Any:
    """
    @param argv: C{postcopy watch} arguments.
    @return: the parsed arguments.
    """
    return buildParser().parse_args(["watch", *argv])


class _Terminal(io.StringIO):
    """
    A string buffer that says it is a terminal.
    """

    def isatty(self) -> bool:
        """
        @return: L{True}.
        """
        return True


class WatchLoopTests(SynchronousTestCase):
    """
    Tests for L{watch.watchMigration}.
    """

    def _watch(self, client: ScriptedClient, display: Any, out: io.StringIO) -> int:
        """
        Run the loop to its end under asyncio.

        @param client: the client.
        @param display: the display.
        @param out: the output.
        @return: the exit status.
        """
        return asyncio.run(watch.watchMigration(client, _noSleep, display, 0.0, out, "unix:/x"))

    def test_plain(self) -> None:
        """
        Without a terminal: a plain line at each status change, then the
        source's report as C{postcopy demo} prints it; exit 0 on
        completion.
        """
        out = io.StringIO()
        status = self._watch(ScriptedClient(ANSWERS), watch.makeDisplay(_args("--plain"), out), out)
        self.assertEqual(status, 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], "postcopy watch: waiting for a migration on unix:/x")
        del lines[0]
        self.assertEqual(len([l for l in lines if l.startswith("source ") and "[" in l]), 3)
        self.assertIn("postcopy-active", lines[1])
        self.assertIn("25.0%", lines[0])
        self.assertEqual(lines[3:], [
            "postcopy watch: unix:/x",
            "source       completed: total 30 ms, setup 2 ms, downtime 5 ms",
            "             sent 4.0 MiB at 95 Mbps: 1000 pages, 24 zero pages, 7 postcopy requests",
            "             statuses: active -> postcopy-active -> completed",
        ])

    def test_eventsGiveEveryStatus(self) -> None:
        """
        Statuses from events come first, polled ones do not repeat them.
        """
        out = io.StringIO()
        client = ScriptedClient(ANSWERS, events=["setup", "active"])
        self._watch(client, watch.PlainDisplay(out), out)
        self.assertIn("statuses: setup -> active -> postcopy-active -> completed", out.getvalue())

    def test_destinationFailed(self) -> None:
        """
        A destination's report is its blocktime line; a failed migration
        exits 1.
        """
        out = io.StringIO()
        answers = [{"status": "active"}, {"status": "failed"}]
        self.assertEqual(self._watch(ScriptedClient(answers), watch.PlainDisplay(out), out), 1)
        self.assertIn("destination  failed: postcopy blocktime - ms", out.getvalue())
        self.assertIn("statuses: active -> failed", out.getvalue())

    def test_rich(self) -> None:
        """
        On a terminal the rich display draws a bar with the status,
        throughput and requests; the report follows.
        """
        try:
            import rich  # noqa: F401
        except ImportError:
            missingReal("rich (the 'watch' extra) is not installed")
        out = _Terminal()
        display = watch.makeDisplay(_args(), out)
        self.assertIsInstance(display, watch.RichDisplay)
        self.assertEqual(self._watch(ScriptedClient(ANSWERS), display, out), 0)
        text = out.getvalue()
        self.assertIn("completed", text)
        self.assertIn("7 requests", text)
        self.assertIn("downtime 5 ms", text)
        self.assertIn("\x1b[", text)
        self.assertIn("source       completed: total 30 ms", text)

    def test_richMissing(self) -> None:
        """
        On a terminal without rich the error names the extra and
        C{--plain}.
        """
        saved = sys.modules.get("rich.progress")
        sys.modules["rich.progress"] = None  # type: ignore[assignment]
        self.addCleanup(lambda: sys.modules.__setitem__("rich.progress", saved) if saved
                        else sys.modules.pop("rich.progress", None))
        error = self.assertRaises(watch.WatchError, watch.makeDisplay, _args(), _Terminal())
        self.assertIn("'watch' extra", str(error))
        self.assertIn("--plain", str(error))


class ArgumentTests(SynchronousTestCase):
    """
    Tests for the C{postcopy watch} arguments.
    """

    def test_qmpAddress(self) -> None:
        """
        C{unix:PATH}, a bare path and C{tcp:HOST:PORT} are accepted.
        """
        self.assertEqual(watch.qmpAddress("unix:/run/q.sock"), "/run/q.sock")
        self.assertEqual(watch.qmpAddress("/run/q.sock"), "/run/q.sock")
        self.assertEqual(watch.qmpAddress("tcp:127.0.0.1:4444"), ("127.0.0.1", 4444))
        self.assertRaises(watch.WatchError, watch.qmpAddress, "tcp:nowhere")

    def test_exclusive(self) -> None:
        """
        C{--control} and C{--qmp} exclude each other.
        """
        self.patch(sys, "stderr", io.StringIO())
        self.assertRaises(SystemExit, _args, "--control", "unix:/a", "--qmp", "unix:/b")

    def test_noEndpoint(self) -> None:
        """
        Without an endpoint: exit 2 and say so.
        """
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "POSTCOPY_CONTROL"})
        err = io.StringIO()
        self.assertEqual(watch.run(_args(), io.StringIO(), err), 2)
        self.assertIn("no endpoint", err.getvalue())

    def test_unreachable(self) -> None:
        """
        A QMP socket nobody listens on: exit 1 naming it.
        """
        try:
            import qemu.qmp  # noqa: F401
        except ImportError:
            missingReal("qemu.qmp (a test extra) is not installed")
        err = io.StringIO()
        self.assertEqual(watch.run(_args("--qmp", "unix:/nonexistent/q.sock"), io.StringIO(), err), 1)
        self.assertIn("/nonexistent/q.sock", err.getvalue())


class QEMUWatchTests(SynchronousTestCase):
    """
    C{postcopy watch --qmp} on a real QEMU 7.2 source migrating by postcopy
    to another QEMU (TCG): the same QMP protocol our endpoint speaks.
    """

    def test_watchQEMU(self) -> None:
        """
        The watch prints plain lines through postcopy and ends with the
        source's report, whose figures are QEMU's final C{query-migrate}.
        """
        from twisted_postcopy.testing.qemu import qemuSkipReason, startBootedQEMU
        from twisted_postcopy.testing.qemubaseline import preparePostcopy, startPostcopyAfter

        reason = qemuSkipReason()
        if reason:
            missingReal(reason)
        directory = tempfile.mkdtemp(prefix="obsq")
        self.addCleanup(shutil.rmtree, directory, True)
        monitor = os.path.join(directory, "watch.qmp")
        source = startBootedQEMU(self, "source", ["-qmp", f"unix:{monitor},server=on,wait=off"])
        destination = startBootedQEMU(self, "destination", ["-incoming", "defer"])
        host, port = preparePostcopy(source, destination, 4 << 10, 0)
        source.waitSerial(1)
        # Postcopy from the start, slow enough to be seen (the guest's RAM
        # is mostly zero pages: a precopy would converge at once).
        source.setParameters(max_postcopy_bandwidth=2 << 20)
        # Precopy at 4 KiB/s leaves nearly every page to postcopy (at 4 MiB/s
        # the first rate-limit window took almost all of this mostly-zero
        # RAM, and postcopy once lasted less than one poll of the watch);
        # with the events capability every status also comes as a
        # MIGRATION event.
        source.setCapabilities(events=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "twisted_postcopy.cli", "watch", "--qmp", f"unix:{monitor}",
             "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        first = process.stdout.readline()
        self.assertEqual(first, f"postcopy watch: waiting for a migration on unix:{monitor}\n")
        source.migrate(f"tcp:{host}:{port}")
        startPostcopyAfter(source, 0, 60)
        final = source.waitMigration(["completed"], 60)
        destination.waitMigration(["completed"], 60)
        out, err = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, err)
        lines = out.splitlines()
        self.assertTrue(any(l.startswith("source ") and "postcopy-active" in l for l in lines), out)
        ram = final["ram"]
        self.assertIn(f"postcopy watch: unix:{monitor}", lines)
        self.assertIn(f"source       completed: total {final['total-time']} ms, "
                      f"setup {final['setup-time']} ms, downtime {final['downtime']} ms", lines)
        self.assertIn(f"{ram['normal']} pages, {ram['duplicate']} zero pages, "
                      f"{ram['postcopy-requests']} postcopy requests", out)
        statuses = [l for l in lines if "statuses:" in l][0]
        self.assertTrue(statuses.endswith("postcopy-active -> completed"), statuses)
