# -*- test-case-name: tests.test_manager -*-
"""
L{MigrationManager}: the QMP-like surface of one daemon (docs/design.md,
"manager.py"; return-path-preempt-recovery.md section 5).

A manager over an L{IOutgoingVM} is a source (C{migrate},
C{migrate-start-postcopy}, C{migrate-cancel}); one over an L{IIncomingVM}
(or a callable returning one) is a destination (C{migrate-incoming}).
Errors carry QEMU's texts.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred, succeed

from twisted_postcopy.autorecover import (
    AUTO_RECOVER, DEFAULT_RECOVER_DEADLINE_MS, RECOVER_DEADLINE, DestinationAutoRecovery,
    SourceAutoRecovery)
from twisted_postcopy.blocktime import BlocktimeContext
from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.errors import MigrationError
from twisted_postcopy.interfaces import IIncomingVM, IOutgoingVM
from twisted_postcopy.protocols.recovery import RecoveryListener, migratePause, resumeOutgoing
from twisted_postcopy.protocols.factories import (
    DestinationFactory, SourceFactory, clientEndpoint, parseURI, serverEndpoint)
from twisted_postcopy.protocols.deadlink import (
    DEFAULT_LINK_TIMEOUT_MS, LINK_TIMEOUT, checkLinkTimeout, linkWatch)
from twisted_postcopy.protocols.preempt import preemptConnector
from twisted_postcopy.protocols.tls import connectMaybeTLS, wrapServer
from twisted_postcopy.access import checkMigrationListener, warnPlaintextMigration
from twisted_postcopy.tlscreds import ObjectRegistry, TLSError
from twisted_postcopy.state import FINISHED, POSTCOPY, MigrationStatus as S
from twisted_postcopy.source.outgoing import OutgoingMigration
from twisted_postcopy.source import prefetch

#: QEMU 7.2's capabilities, in enum order.
CAPABILITIES = (
    "xbzrle rdma-pin-all auto-converge zero-blocks compress events postcopy-ram x-colo "
    "release-ram block return-path pause-before-switchover multifd dirty-bitmaps "
    "postcopy-blocktime late-block-activate x-ignore-shared validate-uuid "
    "background-snapshot zero-copy-send postcopy-preempt"
).split() + [AUTO_RECOVER]
#: The capabilities this engine implements.
SUPPORTED = frozenset({"events", "postcopy-ram", "return-path", "postcopy-blocktime", "postcopy-preempt",
                       AUTO_RECOVER})
#: Parameters and their QEMU defaults (and this engine's C{x-} ones).
PARAMETERS = {"max-bandwidth": 134217728, "max-postcopy-bandwidth": 0, "downtime-limit": 300,
              LINK_TIMEOUT: DEFAULT_LINK_TIMEOUT_MS, RECOVER_DEADLINE: DEFAULT_RECOVER_DEADLINE_MS,
              **prefetch.DEFAULTS}
#: The TLS parameters (strings, QEMU's defaults; docs/tls.md).
TLS_PARAMETERS = {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}
_IN_PROGRESS = "There's a migration process in progress"


def checkParameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """
    Check migration parameters as C{migrate-set-parameters} does.

    @param parameters: name -> value.
    @return: the parameters (TLS ones in their stored form).
    @raise MigrationError: unknown name or value out of range (QEMU's text).
    """
    parameters = _tlsParameters(parameters)
    for name, value in parameters.items():
        if name in TLS_PARAMETERS:
            continue
        if name not in PARAMETERS:
            raise MigrationError(f"Parameter '{name}' is unexpected")
        if not isinstance(value, int) or value < 0:
            raise MigrationError(f"Parameter '{name}' expects a non-negative integer")
        if name == "downtime-limit" and value > 2000000:
            raise MigrationError(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")
        refused = prefetch.checkParameter(name, value)
        if refused:
            raise MigrationError(refused)
        if name == LINK_TIMEOUT:
            try:
                checkLinkTimeout(value)
            except ValueError as error:
                raise MigrationError(str(error))
    return parameters


class MigrationManager:
    """
    One daemon's migration commands.

    @ivar reactor: the reactor.
    @ivar vm: the VM migrated out, or the incoming VM (or its factory).
    @ivar faultServiceFactory: C{(blocks, pageSource) -> fault service},
        used by a destination at LISTEN (default:
        L{twisted_postcopy.ram.faults.FaultService}).
    @ivar capabilities: capability name -> state.
    @ivar parameters: parameter name -> value.
    @ivar outgoing: the current outgoing migration, if any.
    @ivar incoming: the current incoming migration, if any.
    @ivar blocktime: the blocktime context of the incoming migration.
    @ivar destinationFactory: the factory accepting the incoming
        connection(s).
    @ivar recovery: the destination's recovery connections
        (C{migrate-recover}).
    @ivar faultServiceHooks: callables given each fault service the
        destination starts (observers attach there, e.g. the timeline's
        request latencies).
    @ivar timeline: the daemon's
        L{twisted_postcopy.observe.timeline.MigrationTimeline}, if it keeps
        one (C{x-query-migrate-timeline}).
    @ivar objects: the C{object-add} objects (TLS credentials, authz).
    @ivar tlsRefused: the reasons of refused incoming TLS handshakes.
    @ivar insecureMigration: plaintext migration listeners off the host
        are allowed (the daemon's C{--insecure-migration}); see
        L{twisted_postcopy.access.checkMigrationListener}.
    """

    def __init__(self, reactor: Any, vm: Any, faultServiceFactory: Callable[..., Any] | None = None) -> None:
        """
        @param reactor: the reactor.
        @param vm: an L{IOutgoingVM}, an L{IIncomingVM}, or a callable
            returning an L{IIncomingVM}.
        @param faultServiceFactory: the destination's fault service factory.
        """
        self.reactor = reactor
        self.vm = vm
        self.faultServiceFactory = faultServiceFactory
        self.capabilities = {name: False for name in CAPABILITIES}
        self.parameters = dict(PARAMETERS)
        self.parameters.update(TLS_PARAMETERS)
        self.objects = ObjectRegistry()
        self.tlsRefused: list[str] = []
        self.insecureMigration = False
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self.blocktime: BlocktimeContext | None = None
        self._subscribers: list[Callable[[dict[str, Any]], object]] = []
        self._passSubscribers: list[Callable[[dict[str, Any]], object]] = []
        self._waiters: list[tuple[frozenset[str], Deferred]] = []
        self._listening: Any = None
        self._preemptListening: Any = None
        self.destinationFactory: DestinationFactory | None = None
        self.recovery: RecoveryListener | None = None
        self.faultServiceHooks: list[Callable[[Any], object]] = []
        self.timeline: Any = None
        self.autoRecovery: SourceAutoRecovery | DestinationAutoRecovery | None = None
        self._incomingURI: str | None = None

    @property
    def status(self) -> S:
        """
        The status of this side's current migration.
        """
        current = self.outgoing or self.incoming
        if current is None:
            return S.NONE
        return current.machine.status if self.outgoing else current.machine.status.status

    def _busy(self) -> bool:
        """
        @return: whether a migration is in progress.
        """
        return self.status not in FINISHED

    def setCapabilities(self, capabilities: dict[str, bool]) -> None:
        """
        C{migrate-set-capabilities}.

        @param capabilities: name -> state.
        @raise MigrationError: unknown or unsupported capability, an
            outgoing migration runs, or an incoming one began loading.
        """
        if self._loading():
            raise MigrationError(_IN_PROGRESS)
        for name, state in capabilities.items():
            if name not in self.capabilities:
                raise MigrationError(f"Parameter 'capability' does not accept value '{name}'")
            if state and name not in SUPPORTED:
                raise MigrationError(f"Capability '{name}' is not supported by twisted-postcopy")
        wanted = {**self.capabilities, **{name: bool(state) for name, state in capabilities.items()}}
        if wanted["postcopy-preempt"] and not wanted["postcopy-ram"]:
            raise MigrationError("Postcopy preempt requires postcopy-ram")
        self.capabilities = wanted
        if self.incoming is not None:
            self.incoming.postcopyEnabled = self.capabilities["postcopy-ram"]
            self.incoming.machine.preemptEnabled = self.capabilities["postcopy-preempt"]

    def _preemptEnabled(self) -> bool:
        """
        @return: whether C{postcopy-preempt} is on (the destination's
            factories read it as connections arrive).
        """
        return self.capabilities["postcopy-preempt"]

    def _loading(self) -> bool:
        """
        Whether capabilities are frozen: an outgoing migration runs, or an
        incoming one left C{setup} (a destination may still change them
        after C{migrate-incoming}, as QEMU 7.2 only checks its outgoing
        state).

        @return: whether C{migrate-set-capabilities} must be refused.
        """
        if self.incoming is not None and self.outgoing is None:
            return self.status not in FINISHED and self.status != S.SETUP
        return self._busy()

    def queryCapabilities(self) -> dict[str, bool]:
        """
        @return: C{query-migrate-capabilities}.
        """
        return dict(self.capabilities)

    def setParameters(self, parameters: dict[str, int]) -> None:
        """
        C{migrate-set-parameters}; bandwidths apply at once.

        @param parameters: name -> value.
        @raise MigrationError: unknown name or value out of range.
        """
        self.parameters.update(checkParameters(parameters))

    def queryParameters(self) -> dict[str, Any]:
        """
        @return: C{query-migrate-parameters} (the relevant ones).
        """
        return dict(self.parameters)

    def subscribe(self, callback: Callable[[dict[str, Any]], object]) -> Callable[[], None]:
        """
        @param callback: called with C{{"event": "MIGRATION", "data": {"status": ...}}}.
        @return: a callable that unsubscribes.
        """
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def whenStatus(self, *statuses: str) -> Deferred:
        """
        @param statuses: QMP status names.
        @return: a Deferred firing with the first of them reached (at once
            if current; otherwise on a later reactor turn, so waiters never
            run inside a state transition).
        """
        if self.status.value in statuses:
            return succeed(self.status.value)
        waiter: Deferred = Deferred()
        self._waiters.append((frozenset(statuses), waiter))
        return waiter

    def _emit(self, status: S) -> None:
        """
        Publish a status change.

        @param status: the new status.
        """
        event = {"event": "MIGRATION", "data": {"status": status.value}}
        for callback in list(self._subscribers):
            callback(event)
        ready = [(s, d) for s, d in self._waiters if status.value in s]
        self._waiters = [(s, d) for s, d in self._waiters if status.value not in s]
        for _, waiter in ready:
            self.reactor.callLater(0, waiter.callback, status.value)

    def _publish(self, data: dict[str, Any]) -> None:
        """
        Publish a C{MIGRATION} event that is not a status change (an
        automatic recovery attempt): subscribers see it, status waiters
        do not.

        @param data: the event's data (with the current C{status}).
        """
        event = {"event": "MIGRATION", "data": data}
        for callback in list(self._subscribers):
            callback(event)

    def migrate(self, uri: str, resume: bool = False) -> None:
        """
        C{migrate}: connect and start; returns at once.

        @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
        @param resume: resume a paused postcopy migration (a failed
            connect leaves it paused).
        @raise MigrationError: running already, bad URI, not a source, or
            nothing paused to resume.
        """
        if resume:
            warnPlaintextMigration(uri, self._tlsClient(uri), "migrate resume")
            resumeOutgoing(self.reactor, self.outgoing, uri, self._tlsClient(uri))
            if isinstance(self.autoRecovery, SourceAutoRecovery):
                self.autoRecovery.uri = uri
                self.autoRecovery.unsuspend()
            return
        if self._busy():
            raise MigrationError(_IN_PROGRESS)
        if not IOutgoingVM.providedBy(self.vm):
            raise MigrationError("this daemon has no outgoing VM")
        endpoint = clientEndpoint(self.reactor, uri)
        tls = self._tlsClient(uri)
        warnPlaintextMigration(uri, tls)
        migration = OutgoingMigration(self.vm, None, self.reactor.seconds,
                                      dict(self.capabilities), self.parameters)
        migration.machine.observers.append(self._emit)
        migration.onPass = self._emitPass
        self.autoRecovery = SourceAutoRecovery(
            self.reactor, migration, uri, lambda: self.capabilities[AUTO_RECOVER],
            lambda: self.parameters[RECOVER_DEADLINE], lambda: self.parameters[LINK_TIMEOUT],
            self._publish, lambda reactor, outgoing, where: resumeOutgoing(
                reactor, outgoing, where, self._tlsClient(where)))
        migration.machine.observers.append(self.autoRecovery.statusChanged)
        self.outgoing = migration
        migration.begin()
        connectPreempt = preemptConnector(self.reactor, uri, endpoint, tls, migration) if migration.preemptWanted else None
        connecting = connectMaybeTLS(endpoint, tls, SourceFactory(migration, self.reactor, connectPreempt))
        connecting.addErrback(lambda f: migration.fail(MigrationError(
            f"Failed to connect to '{uri}': {f.getErrorMessage()}")))

    def startPostcopy(self) -> None:
        """
        C{migrate-start-postcopy}.

        @raise MigrationError: QEMU's texts when postcopy-ram is off or no
            migration was started.
        """
        if not self.capabilities["postcopy-ram"]:
            raise MigrationError("Enable postcopy with migrate_set_capability before the start of migration")
        if self.outgoing is None:
            raise MigrationError("Postcopy must be started after migration has been started")
        self.outgoing.postcopyRequested = True

    def cancel(self) -> None:
        """
        C{migrate_cancel}: always succeeds.
        """
        if self.outgoing is not None:
            self.outgoing.cancel()

    def migrateIncoming(self, uri: str) -> Deferred:
        """
        C{migrate-incoming}: listen for the source.

        @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
        @return: a Deferred firing with the listening port.
        @raise MigrationError: already started, bad URI.
        """
        if self.incoming is not None:
            raise MigrationError("The incoming migration has already been started")
        parseURI(uri)
        tls = self._tlsServer()
        checkMigrationListener(uri, tls, self.insecureMigration)
        vm = self.vm if IIncomingVM.providedBy(self.vm) else self.vm()
        incoming = IncomingMigration(vm, None, self.capabilities["postcopy-ram"],
                                     self._faultService)
        self.incoming = incoming
        incoming.machine.preemptEnabled = self.capabilities["postcopy-preempt"]
        incoming.machine.status.observers.append(self._emit)
        incoming.machine.setup()
        watch = linkWatch(self.reactor, lambda: self.parameters[LINK_TIMEOUT])
        self.recovery = RecoveryListener(self.reactor, incoming, self._emit, tls, self._refusedTLS,
                                         self._preemptEnabled, watch)
        self.destinationFactory = DestinationFactory(incoming, self.recovery.factory,
                                                     preemptEnabled=self._preemptEnabled, watch=watch)
        incoming.machine.status.observers.append(self._closePreempt)
        self._incomingURI = uri
        self.autoRecovery = DestinationAutoRecovery(
            self.reactor, self.recovery, lambda: self.capabilities[AUTO_RECOVER],
            self.recoveryURI, self._publish)
        incoming.machine.status.observers.append(self.autoRecovery.statusChanged)
        listening = serverEndpoint(self.reactor, uri).listen(
            wrapServer(tls, self.destinationFactory, self._refusedTLS))

        def listened(port: Any) -> Any:
            """
            Remember the listening port.

            @param port: it.
            @return: C{port}.
            """
            self._listening = port
            self._incomingURI = _boundURI(uri, port)
            incoming.machine.status.observers.append(self._stopListening)
            return port

        return listening.addCallback(listened)

    def _incomingAddress(self) -> dict[str, Any]:
        """
        QEMU 7.2's answer while an incoming migration listens: only the
        C{socket-address} list (no C{status} yet), with the real port when
        listening on port 0 and, for TCP, C{ipv4} or C{ipv6} as QEMU sets
        them.

        @return: the C{query-migrate} answer, C{{}} before the listener is up.
        """
        if self._listening is None:
            return {}
        host = self._listening.getHost()
        if hasattr(host, "port"):
            family = "ipv6" if isinstance(host, IPv6Address) else "ipv4"
            address = {"type": "inet", "host": host.host, "port": str(host.port), family: True}
        else:
            address = {"type": "unix", "path": host.name.decode() if isinstance(host.name, bytes) else host.name}
        return {"socket-address": [address]}

    def _stopListening(self, status: S) -> None:
        """
        Stop accepting connections once the incoming migration started.

        @param status: the new status.
        """
        if status == S.ACTIVE and self._listening is not None:
            listening, self._listening = self._listening, None
            factory = self.destinationFactory
            if factory is not None and factory.awaitingPreempt:
                self._preemptListening = listening
                factory.preempt.accepted.addCallback(self._preemptAccepted)
                return
            listening.stopListening()
        elif status in FINISHED or status == S.POSTCOPY_PAUSED:
            self._preemptAccepted(None)

    def _preemptAccepted(self, protocol: Any) -> Any:
        """
        The preempt channel was accepted, or the migration ended or paused
        before it came (a recovery's preempt channel comes through the
        recovery listener): stop the original listener kept open for it.

        @param protocol: the preempt channel's protocol, or L{None}.
        @return: C{protocol} (C{accepted} keeps firing with it).
        """
        listening, self._preemptListening = self._preemptListening, None
        if listening is not None:
            listening.stopListening()
        return protocol

    def _closePreempt(self, status: S) -> None:
        """
        A paused destination drops its preempt channels (a new one comes
        after the new main connection).

        @param status: the incoming migration's new status.
        """
        if status != S.POSTCOPY_PAUSED or self.recovery is None:
            return
        factory = self.destinationFactory.preempt if self.destinationFactory is not None else None
        original = [factory.preempt] if factory is not None and factory.preempt is not None else []
        self.recovery.factory.closePreempt(original)

    def recoveryURI(self) -> str | None:
        """
        The destination's automatic recovery URI: the C{migrate-incoming}
        URI with the port actually bound.

        @return: it, or L{None} while the original listener is still up
            (it hands later connections to recovery).
        """
        return None if self._listening is not None else self._incomingURI

    def _faultService(self, blocks: dict[str, Any], pageSource: Any) -> Any:
        """
        Start the fault service at LISTEN, with blocktime observers when
        the capability is on.

        @param blocks: idstr -> RAMBlock.
        @param pageSource: where faults are requested from.
        @return: the fault service.
        """
        factory = self.faultServiceFactory or self._ramFaultService
        service = factory(blocks, pageSource)
        if self.capabilities["postcopy-blocktime"] and hasattr(service, "addFaultObserver"):
            threads = getattr(self.incoming.vm, "vcpuThreads", [])
            self.blocktime = BlocktimeContext(threads, self.reactor.seconds)
            service.addFaultObserver(self.blocktime.faultBegan)
            service.addPlacementObserver(self.blocktime.pagePlaced)
        for hook in list(self.faultServiceHooks):
            hook(service)
        return service

    def _ramFaultService(self, blocks: dict[str, Any], pageSource: Any) -> Any:
        """
        The default fault service: L{twisted_postcopy.ram.faults.FaultService}
        over the incoming VM's RAMBlocks.

        @param blocks: idstr -> L{twisted_postcopy.ram.block.RAMBlock}.
        @param pageSource: where faults are requested from.
        @return: the service.
        """
        from twisted_postcopy.ram.faults import FaultService

        return FaultService(self.reactor, pageSource, blocks)

    def migratePause(self) -> None:
        """
        C{migrate-pause}: shut the main connection down; both sides pause.

        @raise MigrationError: not in C{postcopy-active} (QEMU's text).
        """
        migratePause(self.outgoing or self.incoming)
        if self.autoRecovery is not None:
            self.autoRecovery.suspend()

    def migrateRecover(self, uri: str) -> Deferred:
        """
        C{migrate-recover}: listen for the source's new main connection
        (instead of the original address); emits C{setup}.

        @param uri: the new URI.
        @return: a Deferred firing with the listening port.
        @raise MigrationError: not paused (QEMU's text), bad URI.
        """
        if self.recovery is None:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        checkMigrationListener(uri, self.recovery.tls, self.insecureMigration, "migrate-recover")
        return self.recovery.recover(uri)

    def queryMigrate(self) -> dict[str, Any]:
        """
        @return: the C{query-migrate} answer of this side.
        """
        if self.outgoing is not None:
            out = self.outgoing
            return out.stats.query(out.machine.status, out.scheduler.remainingBytes,
                                   self.parameters["downtime-limit"])
        if self.incoming is None:
            return {}
        if self.status == S.SETUP:
            return self._incomingAddress()
        answer: dict[str, Any] = {"status": self.status.value}
        if self.status == S.COMPLETED and self.blocktime is not None:
            answer.update(self.blocktime.query())
        return answer

    def queryMigrateTimeline(self) -> dict[str, Any]:
        """
        C{x-query-migrate-timeline} (ours): the bounded timeline of the
        current or latest migration (docs/observability.md).

        @return: the timeline.
        @raise MigrationError: this daemon keeps no timeline.
        """
        if self.timeline is None:
            raise MigrationError("This daemon keeps no migration timeline")
        return self.timeline.query()

    def subscribePasses(self, callback: Callable[[dict[str, Any]], object]) -> Callable[[], None]:
        """
        Ask for QEMU's C{MIGRATION_PASS} events (one per dirty sync of an
        outgoing migration), kept apart from L{subscribe}'s C{MIGRATION}
        events.

        @param callback: called with C{{"event": "MIGRATION_PASS", "data":
            {"pass": N}}}.
        @return: a callable that unsubscribes.
        """
        self._passSubscribers.append(callback)
        return lambda: (self._passSubscribers.remove(callback)
                        if callback in self._passSubscribers else None)

    def _emitPass(self, count: int) -> None:
        """
        Publish a dirty sync.

        @param count: the dirty sync count (QEMU's pass number).
        """
        event = {"event": "MIGRATION_PASS", "data": {"pass": count}}
        for callback in list(self._passSubscribers):
            callback(event)

    def queryStatus(self) -> dict[str, Any]:
        """
        C{query-status}: the run state QEMU would report for this side's
        VM.  A source runs until it stops for switchover
        (C{finish-migrate}, also through postcopy), after a completed
        migration is C{postmigrate}, and runs again after a failed or
        cancelled one; a destination is C{inmigrate} until its guest runs
        (from C{postcopy-active}, or on completion); a daemon without a
        guest is C{prelaunch}.

        @return: C{{"status", "singlestep", "running"}}, as QEMU 7.2.
        """
        status = self.status
        if self.vm is None:
            state = "prelaunch"
        elif IOutgoingVM.providedBy(self.vm):
            state = "running"
            if self.outgoing is not None and status == S.COMPLETED:
                state = "postmigrate"
            elif self.outgoing is not None and (
                    status in POSTCOPY or (self.outgoing.stopped and status not in FINISHED)):
                state = "finish-migrate"
        elif status in POSTCOPY or status == S.COMPLETED:
            state = "running"
        else:
            state = "inmigrate"
        return {"status": state, "singlestep": False, "running": state == "running"}

    def objectAdd(self, qomType: str, id: str, **properties: Any) -> None:
        """
        C{object-add}: create a C{tls-creds-x509} or C{authz-simple}
        object (docs/tls.md).

        @param qomType: the object type.
        @param id: its id.
        @param properties: its properties (QEMU's names).
        @raise MigrationError: QEMU's texts for a bad object.
        """
        self.objects.add(qomType, id, **properties)

    def objectDel(self, id: str) -> None:
        """
        C{object-del}.

        @param id: the object's id.
        @raise MigrationError: no such object.
        """
        self.objects.remove(id)

    def _tlsClient(self, uri: str) -> Any:
        """
        @param uri: the migration URI (its host is the default
            C{tls-hostname}, as in QEMU).
        @return: the source's TLS policy, or None without C{tls-creds}.
        @raise MigrationError: unusable credentials (QEMU's texts).
        """
        kind, where, _ = parseURI(uri)
        return self.objects.clientPolicy(self.parameters, where if kind == "tcp" else None)

    def _tlsServer(self) -> Any:
        """
        @return: the destination's TLS policy, or None without
            C{tls-creds}.
        @raise MigrationError: unusable credentials or authz object.
        """
        return self.objects.serverPolicy(self.parameters)

    def _refusedTLS(self, error: TLSError) -> None:
        """
        An incoming connection failed TLS: log it (as QEMU reports it on
        stderr); the destination keeps waiting for its source.

        @param error: why.
        """
        from twisted.logger import Logger

        self.tlsRefused.append(str(error))
        Logger().error("incoming migration connection refused: {error}", error=str(error))


def _tlsParameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """
    Check the TLS parameters of a C{migrate-set-parameters} (strings; a
    JSON null resets one to empty, as in QEMU).

    @param parameters: name -> value.
    @return: the parameters, nulls replaced by C{""}.
    @raise MigrationError: a TLS parameter that is not a string.
    """
    checked = dict(parameters)
    for name in TLS_PARAMETERS:
        if name in checked:
            if checked[name] is None:
                checked[name] = ""
            if not isinstance(checked[name], str):
                raise MigrationError(f"Invalid parameter type for '{name}', expected: string")
    return checked


def _boundURI(uri: str, port: Any) -> str:
    """
    @param uri: a C{migrate-incoming} URI (its port may be 0).
    @param port: the listening port made for it.
    @return: the URI with the port actually bound (C{unix:} URIs as given).
    """
    kind, host, _ = parseURI(uri)
    if kind != "tcp":
        return uri
    host = f"[{host}]" if ":" in host else host
    return f"tcp:{host}:{port.getHost().port}"
