# -*- test-case-name: tests.test_observe_metrics -*-
"""
Tests for L{twisted_postcopy.observe.metrics} and the C{--metrics} option
(the end-to-end scrape of real daemons is in C{test_observe_daemons}).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from twisted.internet import defer, threads as threads_
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_observe_timeline import StandInManager, _Outgoing
from twisted_postcopy import tap
from twisted_postcopy.observe import metrics
from twisted_postcopy.observe.timeline import MigrationTimeline
from twisted_postcopy.state import MigrationStatus as S
from twisted_postcopy.testing.real import missingReal


def _options(*extra: str) -> tap.Options:
    """
    @param extra: more options.
    @return: parsed plugin options.
    """
    options = tap.Options()
    options.parseOptions(["--control", "unix:/tmp/observe-x.sock", "--guest", "none", *extra])
    return options


def _restoreModule(name: str, module: object) -> None:
    """
    Put a module back into C{sys.modules} (or forget it).

    @param name: its name.
    @param module: it, or L{None} if it was not imported.
    """
    if module is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = module  # type: ignore[assignment]


class EndpointTests(SynchronousTestCase):
    """
    Tests for L{metrics.metricsEndpoint}: the daemon's access policy, with
    plaintext TCP accepted on loopback (the page only reads).
    """

    def test_loopback(self) -> None:
        """
        TCP on 127.0.0.1, ::1 or localhost is accepted.
        """
        for interface in ("127.0.0.1", "127.0.0.9", r"\:\:1", "localhost"):
            endpoint = metrics.metricsEndpoint(Clock(), f"tcp:0:interface={interface}")
            self.assertEqual(endpoint._interface.replace("\\", ""), interface.replace("\\", ""))

    def test_offHostRefused(self) -> None:
        """
        No interface (every interface) or a non-loopback one is refused
        with a message naming the fix and the secure alternative.
        """
        for description in ("tcp:9100", "tcp:9100:interface=0.0.0.0", "tcp:9100:interface=10.1.2.3"):
            error = self.assertRaises(metrics.MetricsError, metrics.checkMetricsEndpoint, description)
            self.assertIn("interface=127.0.0.1", str(error))
            self.assertIn("caCerts=", str(error))

    def test_sslNeedsClientCertificates(self) -> None:
        """
        C{ssl:} without C{caCerts=} is refused, as for the control endpoint.
        """
        error = self.assertRaises(metrics.MetricsError, metrics.checkMetricsEndpoint,
                                  "ssl:9100:privateKey=k.pem:certKey=c.pem")
        self.assertIn("caCerts", str(error))

    def test_unixPrivate(self) -> None:
        """
        A Unix socket goes through the access policy: 0600 unless a mode is
        given.
        """
        from twisted_postcopy.access import UNIXAccessEndpoint

        endpoint = metrics.metricsEndpoint(Clock(), "unix:/tmp/observe-m.sock")
        self.assertIsInstance(endpoint, UNIXAccessEndpoint)
        self.assertEqual(endpoint.policy.mode, 0o600)
        self.assertEqual(metrics.metricsEndpoint(Clock(), "unix:/tmp/observe-m.sock:mode=640").policy.mode,
                         0o640)

    def test_garbage(self) -> None:
        """
        A bad port or an unknown kind is a L{metrics.MetricsError}.
        """
        for description in ("tcp:notaport:interface=127.0.0.1", "foo:1"):
            self.assertRaises(metrics.MetricsError, metrics.checkMetricsEndpoint, description)


class OptionTests(SynchronousTestCase):
    """
    The plugin's C{--metrics} option.
    """

    def test_refusedOffHost(self) -> None:
        """
        C{--metrics tcp:9100} is a usage error.
        """
        error = self.assertRaises(usage.UsageError, _options, "--metrics", "tcp:9100")
        self.assertIn("loopback", str(error))

    def test_accepted(self) -> None:
        """
        C{--metrics tcp:0:interface=127.0.0.1} is accepted.
        """
        self.assertEqual(_options("--metrics", "tcp:0:interface=127.0.0.1")["metrics"],
                         "tcp:0:interface=127.0.0.1")

    def test_missingExtra(self) -> None:
        """
        Without prometheus-client, C{--metrics} is a usage error naming the
        extra; without C{--metrics} the daemon is built as before.
        """
        saved = sys.modules.get("prometheus_client")
        sys.modules["prometheus_client"] = None  # type: ignore[assignment]
        self.addCleanup(_restoreModule, "prometheus_client", saved)
        error = self.assertRaises(usage.UsageError, _options, "--metrics", "tcp:0:interface=127.0.0.1")
        self.assertIn("'metrics' extra", str(error))
        service = tap.makeService(_options(), Clock())
        self.assertIsNotNone(service.manager.timeline)
        self.assertFalse(hasattr(service, "metricsService"))


class CollectorTests(SynchronousTestCase):
    """
    Tests for L{metrics.MigrationCollector} over a stand-in manager.
    """

    def setUp(self) -> None:
        """
        Need prometheus-client.
        """
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            missingReal("prometheus-client (the 'metrics' extra) is not installed")

    def _scrape(self, collector: metrics.MigrationCollector) -> dict[str, float]:
        """
        @param collector: the collector.
        @return: sample name with sorted labels -> value, from the text
            exposition of a registry holding only it.
        """
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        registry = CollectorRegistry()
        registry.register(collector)
        samples = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def test_source(self) -> None:
        """
        A source's status, pages, bytes, requests and recovery attempts.
        """
        clock = Clock()
        manager = StandInManager(clock)
        manager.outgoing = _Outgoing(clock)
        timeline = MigrationTimeline(clock, manager)
        timeline.attach()
        self.addCleanup(timeline.detach)
        manager.move(S.SETUP)
        manager.move(S.POSTCOPY_ACTIVE)
        manager.move(S.POSTCOPY_PAUSED)
        manager.move(S.POSTCOPY_RECOVER)
        manager.move(S.POSTCOPY_ACTIVE)
        stats = manager.outgoing.stats
        stats.normal, stats.duplicate, stats.urgent, stats.postcopyRequests = 10, 5, 2, 3
        stats.transferred, stats.precopyBytes, stats.postcopyBytes = 300, 100, 200
        samples = self._scrape(metrics.MigrationCollector(manager, timeline, None, clock))
        self.assertEqual(samples['postcopy_migration_status{status="postcopy-active"}'], 1)
        self.assertEqual(samples['postcopy_migration_status{status="active"}'], 0)
        self.assertEqual(len([k for k in samples if k.startswith("postcopy_migration_status")]), 10)
        self.assertEqual(samples['postcopy_migration_info{role="source"}'], 1)
        self.assertEqual(samples['postcopy_ram_pages_total{direction="sent",kind="urgent"}'], 2)
        self.assertEqual(samples['postcopy_ram_bytes_total{direction="sent",kind="zero"}'], 5 * 4096)
        self.assertEqual(samples['postcopy_transferred_bytes_total{phase="postcopy"}'], 200)
        self.assertEqual(samples["postcopy_requests_total{}"], 3)
        self.assertEqual(samples["postcopy_recovery_attempts_total{}"], 1)
        self.assertEqual(samples["postcopy_pauses_total{}"], 1)
        self.assertEqual(samples["postcopy_page_request_latency_seconds_count{}"], 0)

    def test_latencyHistogram(self) -> None:
        """
        Request latencies become a cumulative histogram in seconds.
        """
        clock = Clock()
        manager = StandInManager(clock)
        timeline = MigrationTimeline(clock, manager)
        for latency in (0.0002, 0.003, 0.003, 20.0):
            timeline.latencies.record(latency)
        samples = self._scrape(metrics.MigrationCollector(manager, timeline, None, clock))
        self.assertEqual(samples['postcopy_page_request_latency_seconds_bucket{le="0.00025"}'], 1)
        self.assertEqual(samples['postcopy_page_request_latency_seconds_bucket{le="0.005"}'], 3)
        self.assertEqual(samples['postcopy_page_request_latency_seconds_bucket{le="10.0"}'], 3)
        self.assertEqual(samples['postcopy_page_request_latency_seconds_bucket{le="+Inf"}'], 4)
        self.assertAlmostEqual(samples["postcopy_page_request_latency_seconds_sum{}"], 20.0062)

    def test_snapshotJobs(self) -> None:
        """
        Snapshot jobs are counted by kind and status.
        """

        class Jobs:
            def query(self) -> dict:
                return {"capture": {"status": "active"},
                        "restores": [{"status": "completed"}, {"status": "completed"}]}

        clock = Clock()
        samples = self._scrape(metrics.MigrationCollector(StandInManager(clock), None, Jobs(), clock))
        self.assertEqual(samples['postcopy_snapshot_jobs{kind="capture",status="active"}'], 1)
        self.assertEqual(samples['postcopy_snapshot_jobs{kind="restore",status="completed"}'], 2)


class ThreadTests(TestCase):
    """
    A scrape runs in the web server's worker thread; the counters are read
    on the reactor thread.
    """

    def setUp(self) -> None:
        """
        Need prometheus-client.
        """
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            missingReal("prometheus-client (the 'metrics' extra) is not installed")

    @defer.inlineCallbacks
    def test_readOnReactorThread(self) -> Any:
        """
        Collecting from a worker thread reads on the reactor thread.
        """
        from twisted.internet import reactor

        clock = Clock()
        collector = metrics.MigrationCollector(StandInManager(clock), None, None, reactor)
        threads = []
        read = collector.read
        self.patch(collector, "read", lambda: threads.append(threading.current_thread()) or read())
        families = yield threads_.deferToThread(lambda: list(collector.collect()))
        self.assertEqual(threads, [threading.main_thread()])
        self.assertIn("postcopy_migration_status", [f.name for f in families])

    def test_reactorSilent(self) -> None:
        """
        A reactor that never runs the read (shutting down) fails the scrape
        after L{metrics.READ_TIMEOUT} instead of holding the thread.
        """

        class Silent:
            running = True

            def callFromThread(self, f: Any, *a: Any) -> None:
                pass

        self.patch(metrics, "READ_TIMEOUT", 0.05)
        collector = metrics.MigrationCollector(StandInManager(Clock()), None, None, Silent())
        result: list = []

        def scrape() -> None:
            try:
                list(collector.collect())
            except metrics.MetricsError as e:
                result.append(e)

        worker = threading.Thread(target=scrape)
        worker.start()
        worker.join(5)
        self.assertEqual(len(result), 1)
        self.assertIn("did not answer", str(result[0]))
