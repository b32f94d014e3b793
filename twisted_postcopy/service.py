# -*- test-case-name: tests.test_service -*-
"""
The daemon: one L{MigrationService} per process, holding the guest, the
MigrationManager and the control listener.  It is what C{twistd postcopy}
runs (see L{twisted_postcopy.tap}).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from twisted_postcopy.control.server import ControlFactory


class MigrationService(MultiService):
    """
    A migration daemon: the guest (a child service, started first), the
    control listener, and, on a destination started with C{--incoming},
    the incoming migration (QEMU's C{-incoming URI}).

    @ivar reactor: the reactor.
    @ivar manager: the MigrationManager the control API acts on.
    @ivar control: the control endpoint description (C{unix:PATH}, ...).
    @ivar incoming: the migration URI to listen on at start, or L{None}.
    @ivar guest: the guest's service, or L{None}; it answers C{query-guest}
        through its C{query()} method.
    @ivar controlService: the child service listening on C{control}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        manager: Any,
        control: str,
        incoming: str | None = None,
        guest: IService | None = None,
    ) -> None:
        """
        @param reactor: the reactor.
        @param manager: the MigrationManager.
        @param control: the control endpoint description.
        @param incoming: a migration URI to listen on once started.
        @param guest: the guest's service, if any.
        """
        super().__init__()
        self.reactor = reactor
        self.manager = manager
        self.control = control
        self.incoming = incoming
        self.guest = guest
        if guest is not None:
            guest.setServiceParent(self)
        endpoint = serverFromString(reactor, control)
        self.controlService = StreamServerEndpointService(endpoint, ControlFactory(manager, guest))
        # Fail twistd's start-up, rather than log, when the endpoint is busy.
        self.controlService._raiseSynchronously = True
        self.controlService.setServiceParent(self)
        self.incomingStarted: Deferred | None = None

    def startService(self) -> None:
        """
        Start the guest and the control listener, then listen for the
        incoming migration if one was given.
        """
        super().startService()
        if self.incoming is not None:
            self.incomingStarted = maybeDeferred(self.manager.migrateIncoming, self.incoming)
            self.incomingStarted.addErrback(self._incomingFailed)

    def _incomingFailed(self, failure: Any) -> None:
        """
        Log why C{migrate-incoming} failed at start-up; the daemon stays up
        so the control API can report and retry.

        @param failure: the failure.
        """
        self.log.failure("migrate-incoming {uri} failed", failure, uri=self.incoming)
