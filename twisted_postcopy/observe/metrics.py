# -*- test-case-name: tests.test_observe_metrics -*-
"""
Prometheus metrics of one daemon (C{twistd postcopy --metrics
tcp:9100:interface=127.0.0.1}), served by C{prometheus-client}'s Twisted
resource from a registry of this daemon's own (never the process-global
one).  Names, labels and units: C{docs/observability.md}.

A scrape reads the engine's existing counters once (on the reactor thread:
the WSGI resource runs in a worker thread, which must not read state the
reactor is changing); nothing is counted per page for the metrics.

The endpoint goes through the daemon's access policy
(L{twisted_postcopy.access}): a Unix socket (0600, peers checked), plaintext
TCP on loopback only, or C{ssl:} with client certificates off this host.
"""

from __future__ import annotations

import queue
from typing import Any, Iterator

from twisted_postcopy.errors import PostcopyError
from twisted_postcopy.observe.counters import readCounters
from twisted_postcopy.observe.timeline import LATENCY_BUCKETS
from twisted_postcopy.state import MigrationStatus

#: The extra that brings C{prometheus-client}.
EXTRA = "metrics"

#: Seconds a scrape waits for the reactor thread to read the counters.
READ_TIMEOUT = 5.0
#: Every status name of QEMU 7.2's C{MigrationStatus} that our engines use.
STATUSES = tuple(status.value for status in MigrationStatus)


class MetricsError(PostcopyError):
    """
    The C{--metrics} option cannot be honoured (a missing extra, an
    endpoint off this host).
    """


def requirePrometheus() -> Any:
    """
    @return: the C{prometheus_client} module.
    @raise MetricsError: it is not installed (naming the extra).
    """
    try:
        import prometheus_client
    except ImportError:
        raise MetricsError(
            "--metrics needs prometheus-client: install the 'metrics' extra "
            "(python3 -m pip install 'twisted-postcopy[metrics]')") from None
    return prometheus_client


def checkMetricsEndpoint(description: str) -> None:
    """
    Check a C{--metrics} endpoint description against the daemon's access
    policy (L{twisted_postcopy.access.parseListening}).  The page only
    reads, so plaintext TCP is accepted on a loopback interface; off this
    host it must be C{ssl:} with C{caCerts=} (clients present
    certificates), as for every endpoint of the daemon.

    @param description: e.g. C{tcp:9100:interface=127.0.0.1}.
    @raise MetricsError: the endpoint is refused, saying what to use.
    """
    from twisted_postcopy.access import _isLoopback, _splitDescription, parseListening
    from twisted_postcopy.errors import AccessError

    try:
        kind, args, options = _splitDescription(description)
    except (ValueError, KeyError) as e:
        raise MetricsError(f"--metrics {description!r}: {e}") from None
    interface = options.get("interface", "")
    if kind in ("tcp", "tcp6") and not (args and args[0].isdigit()):
        raise MetricsError(f"--metrics {description!r}: expected tcp:PORT:interface=127.0.0.1")
    if kind in ("tcp", "tcp6") and not _isLoopback(interface):
        raise MetricsError(
            f"--metrics {description!r} would listen on {interface or 'every interface'}: "
            "plaintext metrics are served on loopback only (add interface=127.0.0.1); off this "
            "host use ssl:PORT:privateKey=KEY:certKey=CERT:caCerts=CA (scrapers present "
            "client certificates)")
    try:
        parseListening(description, True, "metrics endpoint")
    except AccessError as e:
        raise MetricsError(str(e)) from None


def metricsEndpoint(reactor: Any, description: str) -> Any:
    """
    The server endpoint of a checked C{--metrics} description.

    @param reactor: the reactor.
    @param description: see L{checkMetricsEndpoint}.
    @return: the server endpoint (through L{twisted_postcopy.access}).
    @raise MetricsError: the endpoint is refused.
    """
    from twisted_postcopy.access import listeningEndpoint

    checkMetricsEndpoint(description)
    return listeningEndpoint(reactor, description, True, "metrics endpoint")


class MigrationCollector:
    """
    A C{prometheus-client} collector over one daemon's migration.

    @ivar manager: the L{twisted_postcopy.manager.MigrationManager}.
    @ivar timeline: the daemon's
        L{twisted_postcopy.observe.timeline.MigrationTimeline}, or L{None}.
    @ivar snapshots: the daemon's snapshot jobs, or L{None}.
    @ivar reactor: the reactor whose thread owns that state.
    """

    def __init__(self, manager: Any, timeline: Any = None, snapshots: Any = None,
                 reactor: Any = None) -> None:
        """
        @param manager: the manager.
        @param timeline: the timeline (request latencies, recovery counts).
        @param snapshots: the snapshot jobs.
        @param reactor: the reactor (default: the global one).
        """
        if reactor is None:
            from twisted.internet import reactor
        self.manager, self.timeline, self.snapshots, self.reactor = manager, timeline, snapshots, reactor

    def read(self) -> dict[str, Any]:
        """
        Read everything a scrape shows (call on the reactor thread).

        @return: C{counters}, C{latency} (L{twisted_postcopy.observe.timeline.RequestLatencies} figures or
            L{None}), C{entered} (status -> count), C{throughput} (bytes/s
            of the last full window) and C{snapshots} (kind, status pairs).
        """
        timeline = self.timeline
        latencies = timeline.latencies if timeline is not None else None
        counters = readCounters(self.manager, latencies.count if latencies is not None else 0)
        latency = None
        if latencies is not None:
            latency = {"count": latencies.count, "sum": latencies.total,
                       "buckets": list(latencies.buckets)}
        throughput = 0.0
        if timeline is not None and timeline.windows:
            throughput = timeline.windows[-1][0] / timeline.window
        jobs: list[tuple[str, str]] = []
        if self.snapshots is not None:
            info = self.snapshots.query()
            if info.get("capture") is not None:
                jobs.append(("capture", info["capture"].get("status", "?")))
            jobs.extend(("restore", job.get("status", "?")) for job in info.get("restores", ()))
        return {"counters": counters, "latency": latency, "throughput": throughput,
                "entered": dict(timeline.entered) if timeline is not None else {},
                "snapshots": jobs}

    def _readOnReactor(self) -> dict[str, Any]:
        """
        L{MigrationCollector.read} on the reactor thread, waited for from
        the worker thread for at most L{READ_TIMEOUT} seconds (so a scrape
        during shutdown cannot hold the thread pool's join forever).

        @return: what L{MigrationCollector.read} returns.
        @raise MetricsError: the reactor did not answer in time.
        """
        from twisted.python.failure import Failure
        from twisted.python.threadable import isInIOThread

        if isInIOThread() or not getattr(self.reactor, "running", False):
            return self.read()
        answer: queue.Queue = queue.Queue(1)

        def read() -> None:
            """
            Read on the reactor thread and hand the result over.
            """
            try:
                answer.put(self.read())
            except Exception:
                answer.put(Failure())

        self.reactor.callFromThread(read)
        try:
            result = answer.get(timeout=READ_TIMEOUT)
        except queue.Empty:
            raise MetricsError(f"the reactor did not answer within {READ_TIMEOUT} s") from None
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def collect(self) -> Iterator[Any]:
        """
        The metric families (C{prometheus-client}'s collector protocol).

        @return: an iterator of metric families.
        """
        from prometheus_client.core import (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily)

        data = self._readOnReactor()
        counters = data["counters"]
        status = GaugeMetricFamily("postcopy_migration_status",
                                   "1 for the migration's current status (QEMU's names), 0 for the others",
                                   labels=["status"])
        for name in STATUSES:
            status.add_metric([name], 1.0 if counters["status"] == name else 0.0)
        yield status
        yield InfoMetricFamily("postcopy_migration", "This daemon's side of the migration",
                               value={"role": counters["role"]})
        pages = CounterMetricFamily("postcopy_ram_pages", "RAM pages by direction and kind "
                                    "(normal, zero, urgent on a source; all, urgent on a destination)",
                                    labels=["direction", "kind"])
        size = CounterMetricFamily("postcopy_ram_bytes", "RAM bytes those pages cover",
                                   labels=["direction", "kind"])
        for direction, kinds in counters["pages"].items():
            for kind, value in kinds.items():
                pages.add_metric([direction, kind], value)
                size.add_metric([direction, kind], counters["bytes"][direction][kind])
        yield pages
        yield size
        wire = CounterMetricFamily("postcopy_transferred_bytes",
                                   "Bytes written on the main migration channel, by phase "
                                   "(query-migrate's precopy-bytes, downtime-bytes, postcopy-bytes)",
                                   labels=["phase"])
        for phase in ("precopy", "downtime", "postcopy"):
            if phase in counters["transferred"]:
                wire.add_metric([phase], counters["transferred"][phase])
        yield wire
        yield CounterMetricFamily("postcopy_requests", "Postcopy page requests (received by a "
                                  "source, sent by a destination)", value=counters["postcopy-requests"])
        yield GaugeMetricFamily("postcopy_throughput_bytes_per_second",
                                "Bytes moved in the last full timeline window, per second",
                                value=data["throughput"])
        latency = data["latency"]
        if latency is not None:
            cumulative, buckets = 0, []
            for bound, count in zip(list(LATENCY_BUCKETS) + [float("inf")], latency["buckets"]):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            yield HistogramMetricFamily(
                "postcopy_page_request_latency_seconds",
                "Destination: from a guest thread's first fault on a missing page to its placement",
                buckets=buckets, sum_value=latency["sum"])
        if counters["blocktime-ms"] is not None:
            yield GaugeMetricFamily("postcopy_blocktime_seconds",
                                    "Postcopy blocktime: time every vCPU was blocked at once "
                                    "(query-migrate's postcopy-blocktime)",
                                    value=counters["blocktime-ms"] / 1000)
            vcpu = GaugeMetricFamily("postcopy_vcpu_blocktime_seconds",
                                     "Postcopy blocktime of each vCPU (guest thread)",
                                     labels=["vcpu", "thread"])
            threads = counters["vcpu-threads"]
            for index, value in enumerate(counters["vcpu-blocktime-ms"]):
                thread = str(threads[index]) if index < len(threads) else ""
                vcpu.add_metric([str(index), thread], value / 1000)
            yield vcpu
        entered = data["entered"]
        yield CounterMetricFamily("postcopy_recovery_attempts",
                                  "Times a paused postcopy migration entered postcopy-recover",
                                  value=entered.get("postcopy-recover", 0))
        yield CounterMetricFamily("postcopy_pauses", "Times a postcopy migration was paused "
                                  "(postcopy-paused)", value=entered.get("postcopy-paused", 0))
        jobs = GaugeMetricFamily("postcopy_snapshot_jobs", "Snapshot jobs by kind and status",
                                 labels=["kind", "status"])
        tally: dict[tuple[str, str], int] = {}
        for job in data["snapshots"]:
            tally[job] = tally.get(job, 0) + 1
        for (kind, state), count in sorted(tally.items()):
            jobs.add_metric([kind, state], count)
        yield jobs


def metricsSite(manager: Any, timeline: Any = None, snapshots: Any = None, reactor: Any = None) -> Any:
    """
    A Twisted web site serving this daemon's metrics at C{/metrics}.

    @param manager: the manager.
    @param timeline: the timeline.
    @param snapshots: the snapshot jobs.
    @param reactor: the reactor.
    @return: a L{twisted.web.server.Site}.
    @raise MetricsError: C{prometheus-client} is missing.
    """
    requirePrometheus()
    from prometheus_client import CollectorRegistry
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    registry = CollectorRegistry()
    registry.register(MigrationCollector(manager, timeline, snapshots, reactor))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    return Site(root)
