# -*- test-case-name: tests.test_service -*-
"""
The daemon: one L{MigrationService} per process, holding the guest, the
MigrationManager and the control listener.  It is what C{twistd postcopy}
runs (see L{twisted_postcopy.tap}).

The guest is a child service: L{OutgoingGuestService} on a source (it is
also the manager's L{IOutgoingVM}), L{IncomingGuestService} on a
destination.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twisted_postcopy.access import listeningEndpoint
from twisted_postcopy.control.server import ControlFactory
from twisted_postcopy.errors import GuestError, MigrationError
from twisted_postcopy.guests.guest import MACHINE, Guest, GuestSpec, IncomingGuest
from twisted_postcopy.interfaces import IOutgoingVM
from twisted_postcopy.snapshot.jobs import SnapshotJobs


class MigrationService(MultiService):
    """
    A migration daemon: the guest (a child service, started first), the
    control listener, and, on a destination started with C{--incoming},
    the incoming migration (QEMU's C{-incoming URI}).

    @ivar reactor: the reactor.
    @ivar manager: the MigrationManager the control API acts on.
    @ivar control: the control endpoint description (C{unix:PATH}, ...).
    @ivar incoming: the migration URI to listen on at start, or L{None}.
    @ivar capabilities: capabilities set when the service starts.
    @ivar guest: the guest's service, or L{None}; it answers C{query-guest}
        through its C{query()} method.
    @ivar controlService: the child service listening on C{control}.
    @ivar snapshots: the daemon's snapshot jobs (every daemon serves the
        C{snapshot-*} commands).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        manager: Any,
        control: str,
        incoming: str | None = None,
        guest: IService | None = None,
        capabilities: dict[str, bool] | None = None,
        insecureControl: bool = False,
        snapshotRoot: str | None = None,
        insecureMigration: bool = False,
    ) -> None:
        """
        @param reactor: the reactor.
        @param manager: the MigrationManager.
        @param control: the control endpoint description.
        @param incoming: a migration URI to listen on once started.
        @param guest: the guest's service, if any.
        @param capabilities: capabilities to set at start, before
            C{incoming} is listened on.
        @param insecureControl: allow plaintext C{tcp:} control on a
            loopback interface (C{--insecure-control}).
        @param snapshotRoot: the directory the C{snapshot-*} commands
            cannot leave (C{--snapshot-root}), or L{None}.
        @param insecureMigration: allow migration listeners off the host
            without TLS authentication (C{--insecure-migration}).
        @raise twisted_postcopy.errors.AccessError: the control endpoint
            is refused by the access policy (see L{listeningEndpoint}).
        """
        super().__init__()
        self.capabilities = dict(capabilities or {})
        self.reactor = reactor
        self.manager = manager
        self.control = control
        self.incoming = incoming
        self.guest = guest
        if guest is not None:
            guest.setServiceParent(self)
        self.snapshots = SnapshotJobs(reactor, root=snapshotRoot, insecureMigration=insecureMigration)
        manager.insecureMigration = insecureMigration
        endpoint = listeningEndpoint(reactor, control, insecureControl)
        factory = ControlFactory(manager, guest, self.snapshots)
        self.controlService = StreamServerEndpointService(endpoint, factory)
        # Fail twistd's start-up, rather than log, when the endpoint is busy.
        self.controlService._raiseSynchronously = True
        self.controlService.setServiceParent(self)
        self.incomingStarted: Deferred | None = None

    def startService(self) -> None:
        """
        Set the start-up capabilities, start the guest and the control
        listener, then listen for the incoming migration if one was given.

        @raise twisted_postcopy.errors.MigrationError: a capability is
            refused (twistd then exits with the message).
        """
        if self.capabilities:
            self.manager.setCapabilities(self.capabilities)
        super().startService()
        if self.incoming is not None:
            self.incomingStarted = maybeDeferred(self.manager.migrateIncoming, self.incoming)
            self.incomingStarted.addErrback(self._incomingFailed)

    def serveQMP(self, endpoint: str, insecure: bool = False) -> None:
        """
        Also serve QMP on C{endpoint} (C{--qmp}), with the same manager and
        guest as the control API, through the same access policy as the
        control endpoint (L{listeningEndpoint}: a Unix socket is 0600 with
        its peers checked).

        @param endpoint: the endpoint description (C{unix:PATH}).
        @param insecure: C{--insecure-control} was given.
        @raise twisted_postcopy.errors.AccessError: the endpoint is refused
            by the access policy.
        """
        from twisted_postcopy.control.qmp import QMPFactory

        listening = listeningEndpoint(self.reactor, endpoint, insecure, what="QMP socket")
        self.qmpService = StreamServerEndpointService(listening, QMPFactory(self.manager, self.guest))
        self.qmpService._raiseSynchronously = True
        self.qmpService.setServiceParent(self)

    def _incomingFailed(self, failure: Any) -> None:
        """
        Log why C{migrate-incoming} failed at start-up; the daemon stays up
        so the control API can report and retry.

        @param failure: the failure.
        """
        self.log.failure("migrate-incoming {uri} failed", failure, uri=self.incoming)


@implementer(IOutgoingVM)
class OutgoingGuestService(Service):
    """
    The source daemon's guest: a L{Guest} created, and its worker
    processes spawned, when the service starts (after twistd forked), and
    killed when it stops.  It is the manager's L{IOutgoingVM}, delegating
    to the running guest.

    @ivar reactor: the reactor.
    @ivar spec: the guest's L{GuestSpec}.
    @ivar socketPath: the guest's attach socket.
    @ivar guest: the L{Guest} once started.
    @ivar started: a Deferred firing once every worker runs.
    """

    machine = MACHINE
    log = Logger()

    def __init__(self, reactor: Any, spec: GuestSpec, socketPath: str, access: Any = None) -> None:
        """
        @param reactor: the reactor.
        @param spec: what guest to run.
        @param socketPath: where its workers attach.
        @param access: the attach socket's
            L{twisted_postcopy.guests.host.AttachAccess} (default: only
            the spawned workers, mode 0600).
        """
        self.reactor, self.spec, self.socketPath, self.access = reactor, spec, socketPath, access
        self.guest: Guest | None = None
        self.started: Deferred | None = None

    def startService(self) -> None:
        """
        Create the guest and run its workers.
        """
        super().startService()
        self.guest = Guest(self.reactor, self.spec, self.socketPath, self.access)
        self.started = self.guest.start()
        self.started.addErrback(lambda f: self.log.failure("guest {name} did not start", f,
                                                           name=self.spec.name))

    def stopService(self) -> Deferred | None:
        """
        Kill the workers and release the RAM.

        @return: a Deferred firing when done.
        """
        super().stopService()
        return self.guest.close() if self.guest is not None else None

    def _running(self) -> Guest:
        """
        @return: the guest.
        @raise MigrationError: it has not been started.
        """
        if self.guest is None:
            raise MigrationError("The guest is not running")
        return self.guest

    @property
    def blocks(self) -> list[Any]:
        """
        The guest's RAMBlocks.
        """
        return self._running().blocks

    @property
    def dirtyTracker(self) -> Any:
        """
        The guest's dirty tracker.
        """
        return self._running().dirtyTracker

    def stop(self) -> Deferred:
        """
        @return: a Deferred firing once no worker can write.
        """
        return self._running().stop()

    def deviceState(self) -> Deferred:
        """
        @return: a Deferred firing with the guest's device section.
        """
        return self._running().deviceState()

    def resume(self) -> Deferred:
        """
        @return: a Deferred firing once the workers run again.
        """
        return self._running().resume()

    def query(self) -> dict[str, Any]:
        """
        C{query-guest} on the source.

        @return: the guest's name, role, RAM and whether it runs.
        """
        return {"name": self.spec.name, "role": "source", "ram": _ramSize(self.spec),
                "workers": self.spec.workers, "running": bool(self.started and self.started.called),
                "info": _workerInfo(self.guest.host if self.guest else None)}


#: Seconds C{query-guest} waits for a destination guest's workers to start.
START_TIMEOUT = 30.0


class IncomingGuestService(Service):
    """
    The destination daemon's guest: an L{IncomingGuest} waiting for its
    memory; C{query-guest} reports its workers' memory check once the
    migration completed.

    @ivar spec: the guest's L{GuestSpec}.
    @ivar guest: the L{IncomingGuest}.
    @ivar outcome: L{None} while migrating, then C{"completed"} or the
        failure's text.
    @ivar started: L{None} until the workers loaded the migrated state,
        then C{"running"} or why they failed.
    """

    def __init__(self, reactor: Any, spec: GuestSpec, socketPath: str, access: Any = None) -> None:
        """
        @param reactor: the reactor.
        @param spec: what guest to expect.
        @param socketPath: where its workers will attach.
        @param access: the attach socket's
            L{twisted_postcopy.guests.host.AttachAccess}, or L{None}.
        """
        self.reactor, self.spec = reactor, spec
        self.guest = IncomingGuest(reactor, spec, socketPath, access=access)
        self.outcome: str | None = None
        self.started: str | None = None
        self._startWaiters: list[Deferred] = []
        self.guest.done.addCallbacks(lambda _: self._ended("completed"),
                                     lambda f: self._ended(f.getErrorMessage()))
        self.guest.running.addCallbacks(lambda _: self._ran("running"),
                                        lambda f: self._ran(f.getErrorMessage()))

    def _ran(self, started: str) -> None:
        """
        Record whether the workers started with the migrated state, and
        wake L{query}s waiting for it.

        @param started: C{running} or why they did not start.
        """
        self.started = started
        waiters, self._startWaiters = self._startWaiters, []
        for waiter in waiters:
            waiter.callback(started)

    def _whenStarted(self) -> Deferred:
        """
        @return: a Deferred firing with L{started} once known, failing with
            L{GuestError} if the workers do not start within
            L{START_TIMEOUT} seconds.
        """
        if self.started is not None:
            return succeed(self.started)
        waiter: Deferred = Deferred()
        self._startWaiters.append(waiter)

        def timedOut(failure: Any) -> None:
            failure.trap(defer.TimeoutError)
            self._startWaiters.remove(waiter)
            raise GuestError(f"guest {self.spec.name}: workers not running after {START_TIMEOUT} s")

        return waiter.addTimeout(START_TIMEOUT, self.reactor).addErrback(timedOut)

    def _ended(self, outcome: str) -> None:
        """
        Record how the incoming migration ended.

        @param outcome: C{completed} or why it failed.
        """
        self.outcome = outcome

    def stopService(self) -> Deferred:
        """
        Kill the workers and release the RAM.

        @return: a Deferred firing when done.
        """
        super().stopService()
        return self.guest.close()

    async def query(self) -> dict[str, Any]:
        """
        C{query-guest} on the destination: once the migration completed,
        every worker checks its memory (C{verified} is true when all pass).

        @return: name, role, RAM, C{outcome}, C{verified} (L{None} before
            the end) and each worker's verdict.
        """
        info: dict[str, Any] = {"name": self.spec.name, "role": "destination",
                                "ram": _ramSize(self.spec), "outcome": self.outcome,
                                "verified": None}
        if self.outcome == "completed":
            started = await self._whenStarted()
            if started != "running":
                raise GuestError(f"guest {self.spec.name} did not start: {started}")
            verdicts = await self.guest.host.verify()
            info["info"] = _workerInfo(self.guest.host)
            info["workers"] = verdicts
            info["verified"] = all(verdict.get("ok") for verdict in verdicts.values())
        elif self.outcome is not None:
            info["verified"] = False
        return info


def _ramSize(spec: GuestSpec) -> int:
    """
    @param spec: a guest.
    @return: its total RAM in bytes.
    """
    return sum(length for _, length in spec.blocks)


def _workerInfo(host: Any) -> dict[str, dict[str, Any]]:
    """
    What each attached worker announced about itself (a kv worker: its
    TCP C{port}).

    @param host: a L{twisted_postcopy.guests.host.GuestHost}, or L{None}.
    @return: worker name -> its last C{info} fields.
    """
    if host is None:
        return {}
    return {name: dict(session.info) for name, session in sorted(host.workers.items())}
