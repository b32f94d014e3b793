# -*- test-case-name: tests.test_observe_daemons -*-
"""
Observability of real daemons: two C{twistd postcopy} processes (a stress
guest, userfaultfd, loopback TCP) migrate while the test scrapes their
Prometheus endpoints over HTTP, reads their timelines with
C{x-query-migrate-timeline}, and runs C{postcopy watch} on the source.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, utils
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from twisted_postcopy.control.daemon import Daemon, pluginEnvironment, startDaemon
from twisted_postcopy.testing.real import missingReal

#: Guest RAM of the migration.
RAM = 64 << 20
#: Precopy bandwidth: slow enough that the test sees it move.
BANDWIDTH = 32 << 20
#: Postcopy background bandwidth: the rest of RAM takes seconds.
POSTCOPY_BANDWIDTH = 16 << 20


def _requireReal() -> None:
    """
    Give up unless userfaultfd and the test extras are there.
    """
    from twisted_postcopy.ram.support import checkUserfaultfd
    from twisted_postcopy.errors import UffdUnavailableError

    try:
        checkUserfaultfd()
    except UffdUnavailableError as e:
        missingReal(f"userfaultfd: {e}")
    for module, extra in (("prometheus_client", "metrics"), ("matplotlib", "report"), ("qemu.qmp", "watch")):
        try:
            __import__(module)
        except ImportError:
            missingReal(f"{module} (the '{extra}' extra) is not installed")


def metricsURL(daemon: Daemon) -> bytes:
    """
    Where a daemon serves its metrics, from its log.

    @param daemon: the daemon.
    @return: the URL.
    """
    found = re.search(r"metrics served at (http://\S+)", daemon.log.read_text())
    assert found is not None, daemon.log.read_text()
    return found.group(1).encode()


async def scrape(reactor: Any, url: bytes) -> dict[str, float]:
    """
    GET a metrics page and parse it.

    @param reactor: the reactor.
    @param url: the page.
    @return: C{name{label="value",...}} -> value, labels sorted.
    """
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.web.client import Agent

    response = await Agent(reactor).request(b"GET", url)
    assert response.code == 200, response.code
    collector = _Body()
    response.deliverBody(collector)
    body = (await collector.done).decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


class _Body(Protocol):
    """
    Collects a response body; L{done} fires with it.
    """

    def __init__(self) -> None:
        """
        Nothing yet.
        """
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        """
        @param data: more of the body.
        """
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        """
        The body is complete (C{ResponseDone}) or cut short.

        @param reason: why.
        """
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


class MetricsDuringMigrationTests(TestCase):
    """
    A real migration between two daemons, observed from outside.
    """

    timeout = 180

    def setUp(self) -> None:
        """
        Work in a short directory; start nothing yet.
        """
        _requireReal()
        from twisted.internet import reactor

        self.reactor = reactor
        base = Path("/tmp/observe") if Path("/tmp/observe").is_dir() else None
        self.workdir = Path(tempfile.mkdtemp(prefix="obs-", dir=base))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.daemons: list[Daemon] = []

    async def _start(self, role: str) -> Daemon:
        """
        Start one daemon with metrics on a loopback port chosen by the
        kernel.

        @param role: C{source} or C{destination}.
        @return: the daemon.
        """
        daemon = await startDaemon(self.reactor, role, self.workdir, [
            "--role", role, "--guest", "stress", "--ram", f"{RAM}B",
            "--metrics", "tcp:0:interface=127.0.0.1", "--qmp", f"unix:{self.workdir / role}.qmp"])
        self.daemons.append(daemon)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(daemon.stop(self.reactor)))
        return daemon

    async def _waitFor(self, daemon: Daemon, statuses: set[str], timeout: float = 60) -> dict:
        """
        Poll C{query-migrate} until one of C{statuses}.

        @param daemon: the daemon.
        @param statuses: the statuses.
        @param timeout: seconds.
        @return: the answer.
        """
        deadline = self.reactor.seconds() + timeout
        while True:
            info = await daemon.client.queryMigrate()
            if info.get("status") in statuses:
                return info
            if self.reactor.seconds() > deadline:
                self.fail(f"{daemon.name} still {info.get('status')!r}")
            await deferLater(self.reactor, 0.05, lambda: None)

    async def _timelineCommand(self, daemon: Daemon, expected: dict[str, Any]) -> None:
        """
        C{postcopy x-query-migrate-timeline} prints the timeline the AMP
        command answered; C{postcopy report} draws it.

        @param daemon: the daemon.
        @param expected: its timeline, as the AMP client got it.
        """
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "twisted_postcopy.cli", "x-query-migrate-timeline", "--control",
                             daemon.control], env=pluginEnvironment(), reactor=self.reactor)
        self.assertEqual(code, 0, err.decode())
        printed = json.loads(out)
        self.assertEqual((printed["role"], printed["statuses"], printed["latency"]),
                         (expected["role"], expected["statuses"], expected["latency"]))
        path = self.workdir / "timeline.json"
        path.write_bytes(out)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "twisted_postcopy.cli", "report", str(path), "-o",
                             str(self.workdir / "plots")], env=pluginEnvironment(), reactor=self.reactor)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len(out.split()), 3)

    async def _qmpTimeline(self, path: Path) -> dict[str, Any]:
        """
        C{x-query-migrate-timeline} over a daemon's QMP endpoint, with the
        C{qemu.qmp} client in a child process.

        @param path: the QMP socket.
        @return: the timeline.
        """
        script = ("import asyncio, json, sys\n"
                  "from qemu.qmp import QMPClient\n"
                  "async def main():\n"
                  "    qmp = QMPClient('test')\n"
                  "    await qmp.connect(sys.argv[1])\n"
                  "    print(json.dumps(await qmp.execute('x-query-migrate-timeline')))\n"
                  "    await qmp.disconnect()\n"
                  "asyncio.run(main())\n")
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-c", script, str(path)], env=pluginEnvironment(), reactor=self.reactor)
        self.assertEqual(code, 0, err.decode())
        return json.loads(out)

    @defer.inlineCallbacks
    def test_scrapeWatchTimeline(self) -> Any:
        """
        During precopy the source's scraped counters move; after a postcopy
        migration both daemons' metrics equal their C{query-migrate}; the
        timelines add up to the same figures; C{postcopy watch} on the
        source printed plain progress lines and the demo's report.
        """
        yield defer.Deferred.fromCoroutine(self._migrateObserved())

    async def _migrateObserved(self) -> None:
        """
        The body of L{test_scrapeWatchTimeline}.
        """
        destination = await self._start("destination")
        source = await self._start("source")
        sourceURL, destinationURL = metricsURL(source), metricsURL(destination)
        idle = await scrape(self.reactor, sourceURL)
        self.assertEqual(idle['postcopy_migration_status{status="none"}'], 1.0)

        while not (await source.client.queryGuest()).get("running"):
            await deferLater(self.reactor, 0.05, lambda: None)
        await source.client.setCapabilities({"postcopy-ram": True})
        await destination.client.setCapabilities({"postcopy-ram": True, "postcopy-blocktime": True})
        await destination.client.migrateIncoming("tcp:127.0.0.1:0")
        # The port the destination bound, as QEMU's query-migrate reports it.
        (address,) = (await destination.client.queryMigrate())["socket-address"]
        uri = f"tcp:{address['host']}:{address['port']}"
        # Background pages trickle in postcopy, so the guest surely faults.
        await source.client.setParameters({"max-bandwidth": BANDWIDTH,
                                           "max-postcopy-bandwidth": POSTCOPY_BANDWIDTH})
        watcher, destinationWatcher = _Watcher(), _Watcher()
        # The source is watched over AMP, the destination over its QMP endpoint.
        for each, where in ((watcher, ["--control", source.control]),
                            (destinationWatcher, ["--qmp", f"unix:{self.workdir / 'destination'}.qmp"])):
            self.reactor.spawnProcess(
                each, sys.executable, [sys.executable, "-m", "twisted_postcopy.cli", "watch",
                                       *where, "--interval", "0.1"],
                env=pluginEnvironment())
        # The destination listens already (status setup): its watch does not wait.
        destinationWatcher.waiting.addErrback(lambda _: None)
        await watcher.waiting
        await source.client.migrate(uri)

        await self._waitFor(source, {"active"})
        first = await scrape(self.reactor, sourceURL)
        await deferLater(self.reactor, 0.3, lambda: None)
        second = await scrape(self.reactor, sourceURL)
        self.assertEqual(second['postcopy_migration_status{status="active"}'], 1.0)
        self.assertEqual(second['postcopy_migration_info{role="source"}'], 1.0)
        key = 'postcopy_transferred_bytes_total{phase="precopy"}'
        self.assertGreater(second[key], first[key])
        self.assertGreater(second['postcopy_ram_pages_total{direction="sent",kind="normal"}'], 0)

        await source.client.startPostcopy()
        sourceInfo = await self._waitFor(source, {"completed", "failed"})
        destinationInfo = await self._waitFor(destination, {"completed", "failed"})
        self.assertEqual((sourceInfo["status"], destinationInfo["status"]), ("completed", "completed"))
        code = await watcher.ended
        out, err = watcher.out, watcher.err
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(await destinationWatcher.ended, 0, destinationWatcher.err.decode())
        vcpu = ", ".join(map(str, destinationInfo["postcopy-vcpu-blocktime"]))
        self.assertIn(f"destination  completed: postcopy blocktime {destinationInfo['postcopy-blocktime']} ms, "
                      f"per vCPU {vcpu} ms\n", destinationWatcher.out.decode())

        sent = await scrape(self.reactor, sourceURL)
        ram = sourceInfo["ram"]
        self.assertEqual(sent['postcopy_migration_status{status="completed"}'], 1.0)
        self.assertEqual(sent['postcopy_migration_status{status="active"}'], 0.0)
        self.assertEqual(sent['postcopy_ram_pages_total{direction="sent",kind="normal"}'], ram["normal"])
        self.assertEqual(sent['postcopy_ram_pages_total{direction="sent",kind="zero"}'], ram["duplicate"])
        self.assertEqual(sent['postcopy_ram_bytes_total{direction="sent",kind="normal"}'],
                         ram["normal-bytes"])
        self.assertEqual(sent["postcopy_requests_total{}"], ram["postcopy-requests"])
        for phase in ("precopy", "downtime", "postcopy"):
            self.assertEqual(sent[f'postcopy_transferred_bytes_total{{phase="{phase}"}}'],
                             ram[f"{phase}-bytes"])
        self.assertGreater(sent['postcopy_transferred_bytes_total{phase="postcopy"}'], 0)
        self.assertEqual(sent["postcopy_recovery_attempts_total{}"], 0)

        received = await scrape(self.reactor, destinationURL)
        self.assertEqual(received['postcopy_migration_info{role="destination"}'], 1.0)
        self.assertEqual(received['postcopy_migration_status{status="completed"}'], 1.0)
        self.assertEqual(received['postcopy_ram_bytes_total{direction="received",kind="all"}'], RAM)
        self.assertEqual(received["postcopy_blocktime_seconds{}"],
                         destinationInfo["postcopy-blocktime"] / 1000)
        vcpus = {k: v for k, v in received.items() if k.startswith("postcopy_vcpu_blocktime_seconds")}
        self.assertEqual(sorted(v * 1000 for v in vcpus.values()),
                         sorted(float(v) for v in destinationInfo["postcopy-vcpu-blocktime"]))
        requestsSent = received["postcopy_requests_total{}"]
        latencyCount = received["postcopy_page_request_latency_seconds_count{}"]
        self.assertEqual(received['postcopy_page_request_latency_seconds_bucket{le="+Inf"}'], latencyCount)
        self.assertEqual(received['postcopy_ram_pages_total{direction="received",kind="urgent"}'],
                         latencyCount)
        # Every request the source counted came from this destination, and
        # each was a guest thread's fault, timed until its page was placed.
        self.assertEqual(requestsSent, ram["postcopy-requests"])
        self.assertGreater(requestsSent, 0)
        self.assertGreater(latencyCount, 0)
        self.assertLessEqual(latencyCount, requestsSent)

        sourceTimeline = await source.client.queryMigrateTimeline()
        destinationTimeline = await destination.client.queryMigrateTimeline()
        self.assertEqual(sourceTimeline["role"], "source")
        statuses = [status for _, status in sourceTimeline["statuses"]]
        self.assertEqual(statuses[0], "setup")
        self.assertIn("postcopy-active", statuses)
        self.assertEqual(statuses[-1], "completed")
        moved = sum(sourceTimeline["bytes"]) + sourceTimeline["pending-window"]["bytes"]
        self.assertEqual(moved, ram["transferred"])
        self.assertGreater(len(sourceTimeline["bytes"]), 5)
        self.assertEqual(sum(sourceTimeline["requests"]) + sourceTimeline["pending-window"]["requests"],
                         ram["postcopy-requests"])
        self.assertEqual(destinationTimeline["role"], "destination")
        self.assertEqual(destinationTimeline["latency"]["count"], latencyCount)
        self.assertEqual(destinationTimeline["blocktime"]["final-ms"], destinationInfo["postcopy-blocktime"])
        received = sum(destinationTimeline["bytes"]) + destinationTimeline["pending-window"]["bytes"]
        # Every page arrived; pages discarded at the switch arrived twice.
        self.assertGreaterEqual(received, RAM)
        self.assertLessEqual(received, (ram["normal"] + ram["duplicate"]) * 4096)
        await self._timelineCommand(destination, destinationTimeline)
        overQMP = await self._qmpTimeline(self.workdir / "destination.qmp")
        self.assertEqual((overQMP["role"], overQMP["statuses"], overQMP["latency"]),
                         ("destination", destinationTimeline["statuses"], destinationTimeline["latency"]))

        lines = out.decode().splitlines()
        self.assertTrue(any(line.startswith("source") and "active" in line for line in lines), lines)
        self.assertTrue(any("postcopy-active" in line for line in lines), lines)
        self.assertIn(f"source       completed: total {sourceInfo['total-time']} ms", out.decode())
        self.assertIn(f"{ram['postcopy-requests']} postcopy requests", out.decode())
        self.assertIn("statuses: setup -> active -> postcopy-active -> completed", out.decode())
        self.assertNotIn("\r", out.decode())


class _Watcher(ProcessProtocol):
    """
    Runs C{postcopy watch}: L{waiting} fires once it said it waits for a
    migration, L{ended} with its exit code.
    """

    def __init__(self) -> None:
        """
        Nothing read yet.
        """
        self.out = self.err = b""
        self.waiting: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        """
        Collect standard output; notice the waiting line.

        @param data: the bytes.
        """
        self.out += data
        if b"waiting for a migration" in self.out and not self.waiting.called:
            self.waiting.callback(None)

    def errReceived(self, data: bytes) -> None:
        """
        Collect standard error.

        @param data: the bytes.
        """
        self.err += data

    def processEnded(self, reason: Any) -> None:
        """
        Fire L{ended} (and L{waiting}, failing, if it never waited).

        @param reason: why.
        """
        if not self.waiting.called:
            self.waiting.errback(RuntimeError(f"watch ended first: {self.err.decode()}"))
        self.ended.callback(reason.value.exitCode)
