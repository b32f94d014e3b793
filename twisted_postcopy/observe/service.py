# -*- test-case-name: tests.test_observe_metrics -*-
"""
The daemon's observability services: the migration timeline every daemon
keeps, and the Prometheus endpoint when C{--metrics} asks for one.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.logger import Logger

from twisted_postcopy.observe.timeline import MigrationTimeline

_log = Logger()


class TimelineService(Service):
    """
    Keeps a L{MigrationTimeline} of the manager's migrations while the
    daemon runs (and makes it the manager's C{timeline}).

    @ivar timeline: the timeline.
    """

    def __init__(self, reactor: Any, manager: Any) -> None:
        """
        @param reactor: the reactor.
        @param manager: the manager.
        """
        self.timeline = MigrationTimeline(reactor, manager)
        manager.timeline = self.timeline

    def startService(self) -> None:
        """
        Observe the manager.
        """
        super().startService()
        self.timeline.attach()

    def stopService(self) -> None:
        """
        Stop observing (and sampling).
        """
        super().stopService()
        self.timeline.detach()


class MetricsListener(StreamServerEndpointService):
    """
    Listens for metrics scrapes and logs where (the port, when C{tcp:0}
    chose one).
    """

    def privilegedStartService(self) -> None:
        """
        Listen, then log the address.
        """
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    @staticmethod
    def _listening(port: Any) -> Any:
        """
        Log the address.

        @param port: the listening port.
        @return: C{port}.
        """
        host = port.getHost()
        where = f"http://{host.host}:{host.port}/metrics" if hasattr(host, "port") else f"unix:{host.name}"
        _log.info("metrics served at {where}", where=where)
        return port


def addObservability(service: Any, metrics: str | None = None) -> None:
    """
    Give a L{twisted_postcopy.service.MigrationService} its timeline and,
    with C{metrics}, a Prometheus endpoint.

    @param service: the daemon's service.
    @param metrics: a server endpoint description, or L{None}.
    @raise twisted_postcopy.observe.metrics.MetricsError: the extra is
        missing or the endpoint is refused.
    """
    timeline = TimelineService(service.reactor, service.manager)
    timeline.setServiceParent(service)
    if metrics is None:
        return
    from twisted_postcopy.observe.metrics import metricsEndpoint, metricsSite

    endpoint = metricsEndpoint(service.reactor, metrics)
    site = metricsSite(service.manager, timeline.timeline, getattr(service, "snapshots", None),
                       service.reactor)
    listener = MetricsListener(endpoint, site)
    # Fail twistd's start-up, rather than log, when the port is busy.
    listener._raiseSynchronously = True
    listener.setServiceParent(service)
    service.metricsService = listener
