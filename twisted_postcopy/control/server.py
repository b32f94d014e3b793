# -*- test-case-name: tests.test_control_server -*-
"""
The server side of the control API: L{ControlAMP} answers the commands of
L{twisted_postcopy.control.commands} by delegating to a MigrationManager
(see C{docs/design.md}, "manager.py"), the way QEMU's QMP handlers call
into C{migration/migration.c}.

Responders hold no logic: they translate AMP arguments to the manager's
call and its result back to AMP.  Manager methods may return a value or a
Deferred; errors they raise cross the connection typed.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.protocol import ServerFactory
from twisted.protocols.amp import AMP

from twisted_postcopy.control import commands
from twisted_postcopy.errors import MigrationError, SnapshotError
from twisted_postcopy.errors import LimitExceededError
from twisted_postcopy.wire.constants import MAX_AMP_BOX_SIZE
from twisted.logger import Logger

_log = Logger()


def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    """
    Call a manager method and answer AMP with an empty response.

    @param method: the bound manager method.
    @param args: its positional arguments.
    @param kwargs: its keyword arguments.
    @return: a Deferred firing with C{{}} once the method's result (or its
        Deferred) succeeded, or failing with its error.
    """
    return maybeDeferred(method, *args, **kwargs).addCallback(lambda _: {})


def capabilitiesToList(capabilities: dict[str, bool]) -> list[dict[str, Any]]:
    """
    Convert a capability mapping to QMP's list of C{{capability, state}}.

    @param capabilities: capability name to state.
    @return: the list, sorted by name.
    """
    return [
        {"capability": name, "state": bool(state)}
        for name, state in sorted(capabilities.items())
    ]


def capabilitiesFromList(capabilities: list[dict[str, Any]]) -> dict[str, bool]:
    """
    Convert QMP's list of C{{capability, state}} to a mapping.

    @param capabilities: the list.
    @return: capability name to state.
    """
    return {each["capability"]: each["state"] for each in capabilities}


class ControlAMP(AMP):
    """
    One control connection (what a QMP monitor is to QEMU).

    @ivar manager: the daemon's MigrationManager.
    @ivar guest: the daemon's guest (with a C{query()} method returning a
        mapping or a Deferred of one), or L{None}.
    @ivar snapshots: the daemon's
        L{twisted_postcopy.snapshot.jobs.SnapshotJobs}, or L{None}.
    """

    def __init__(self, manager: Any, guest: Any = None, snapshots: Any = None) -> None:
        """
        @param manager: the MigrationManager the commands act on.
        @param guest: the guest answering C{query-guest}, if any.
        @param snapshots: what the C{snapshot-*} commands act on, if any.
        """
        super().__init__()
        self.manager = manager
        self.guest = guest
        self.snapshots = snapshots
        self._unsubscribe: Callable[[], None] | None = None

    @commands.SetCapabilities.responder
    def setCapabilities(self, capabilities: list[dict[str, Any]]) -> Deferred:
        """
        C{migrate-set-capabilities}.

        @param capabilities: QMP's list of C{{capability, state}}.
        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.setCapabilities, capabilitiesFromList(capabilities))

    @commands.QueryCapabilities.responder
    def queryCapabilities(self) -> Deferred:
        """
        C{query-migrate-capabilities}.

        @return: a Deferred firing with the capability list.
        """
        d = maybeDeferred(self.manager.queryCapabilities)
        return d.addCallback(lambda caps: {"capabilities": capabilitiesToList(caps)})

    @commands.SetParameters.responder
    def setParameters(self, parameters: dict[str, Any]) -> Deferred:
        """
        C{migrate-set-parameters}.

        @param parameters: QEMU parameter names to values.
        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.setParameters, parameters)

    @commands.QueryParameters.responder
    def queryParameters(self) -> Deferred:
        """
        C{query-migrate-parameters}.

        @return: a Deferred firing with the parameters.
        """
        d = maybeDeferred(self.manager.queryParameters)
        return d.addCallback(lambda parameters: {"parameters": parameters})

    @commands.Migrate.responder
    def migrate(self, uri: str, resume: bool | None = None) -> Deferred:
        """
        C{migrate}.

        @param uri: where to send the migration.
        @param resume: resume a paused postcopy migration.
        @return: a Deferred firing with the empty response once started.
        """
        return _call(self.manager.migrate, uri, resume=bool(resume))

    @commands.MigrateIncoming.responder
    def migrateIncoming(self, uri: str) -> Deferred:
        """
        C{migrate-incoming}.

        @param uri: where to listen.
        @return: a Deferred firing with the empty response once listening.
        """
        return _call(self.manager.migrateIncoming, uri)

    @commands.MigrateRecover.responder
    def migrateRecover(self, uri: str) -> Deferred:
        """
        C{migrate-recover}.

        @param uri: where to listen for the reconnecting source.
        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.migrateRecover, uri)

    @commands.MigratePause.responder
    def migratePause(self) -> Deferred:
        """
        C{migrate-pause}.

        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.migratePause)

    @commands.StartPostcopy.responder
    def startPostcopy(self) -> Deferred:
        """
        C{migrate-start-postcopy}.

        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.startPostcopy)

    @commands.CancelMigration.responder
    def cancel(self) -> Deferred:
        """
        C{migrate-cancel}.

        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.cancel)

    @commands.QueryMigrate.responder
    def queryMigrate(self) -> Deferred:
        """
        C{query-migrate}.

        @return: a Deferred firing with C{{"info": <QMP MigrationInfo>}}.
        """
        return maybeDeferred(self.manager.queryMigrate).addCallback(
            lambda info: {"info": info}
        )

    @commands.QueryGuest.responder
    def queryGuest(self) -> Deferred:
        """
        C{query-guest}.

        @return: a Deferred firing with C{{"info": <guest state>}}.
        """
        if self.guest is None:
            return fail(MigrationError("This daemon runs no guest"))
        return maybeDeferred(self.guest.query).addCallback(lambda info: {"info": info})

    def _snapshots(self) -> Any:
        """
        @return: the snapshot jobs.
        @raise SnapshotError: this daemon runs none.
        """
        if self.snapshots is None:
            raise SnapshotError("This daemon does not run snapshot jobs")
        return self.snapshots

    @commands.SnapshotCapture.responder
    def snapshotCapture(self, uri: str, dir: str, postcopy: bool | None = None,
                        machine: str | None = None, qmp: str | None = None,
                        tls_creds: str | None = None, tls_authz: str | None = None) -> Deferred:
        """
        C{snapshot-capture}.

        @param uri: where to listen.
        @param dir: the snapshot directory.
        @param postcopy: accept postcopy (default: yes).
        @param machine: the machine type recorded (default: QEMU 7.2's pc).
        @param qmp: the QEMU source's QMP socket, to recover it after a cut.
        @param tls_creds: accept the source over TLS with these server
            credentials (an C{object-add} object).
        @param tls_authz: and only the client this C{authz-simple} allows.
        @return: a Deferred firing with C{{"uri": <listened on>}}.
        """
        options: dict[str, Any] = {"machine": machine} if machine else {}
        if qmp:
            options["qmp"] = qmp
        options.update(self._tls({"tls-creds": tls_creds, "tls-authz": tls_authz}))
        d = maybeDeferred(lambda: self._snapshots().startCapture(
            uri, dir, postcopy is not False, **options))
        return d.addCallback(lambda listened: {"uri": listened})

    @commands.SnapshotRestore.responder
    def snapshotRestore(self, dir: str, uris: list[str], postcopy: bool | None = None,
                        max_bandwidth: int | None = None, verify: bool | None = None,
                        qmp: list[str] | None = None, tls_creds: str | None = None,
                        tls_hostname: str | None = None, postcopy_preempt: bool | None = None,
                        parameters: dict[str, Any] | None = None) -> Deferred:
        """
        C{snapshot-restore}.

        @param dir: the snapshot directory.
        @param uris: the destinations.
        @param postcopy: restore by postcopy (default: yes).
        @param max_bandwidth: bytes/s per destination (default: unlimited).
        @param verify: check the hashes first (default: yes).
        @param qmp: per destination, its QEMU's QMP socket (C{""}: none).
        @param tls_creds: migrate over TLS with these client credentials
            (an C{object-add} object).
        @param tls_hostname: the name the destinations' certificates carry.
        @param postcopy_preempt: use a postcopy preempt channel.
        @param parameters: more migration parameters for every destination.
        @return: a Deferred firing with the empty response once started.
        """
        options: dict[str, Any] = {"qmp": qmp} if qmp else {}
        options.update(preempt=bool(postcopy_preempt), parameters=parameters)
        options.update(self._tls({"tls-creds": tls_creds, "tls-hostname": tls_hostname}))
        return _call(lambda: self._snapshots().startRestore(
            dir, uris, postcopy is not False, max_bandwidth or 0, verify is not False, **options))

    def _tls(self, parameters: dict[str, str | None]) -> dict[str, Any]:
        """
        @param parameters: the TLS parameters a snapshot command was given.
        @return: C{{}} without C{tls-creds}, else the keyword arguments
            giving the job the daemon's objects and the parameters.
        """
        given = {name: value for name, value in parameters.items() if value}
        if not given.get("tls-creds"):
            return {}
        return {"objects": self.manager.objects, "tls": given}

    @commands.SnapshotVerify.responder
    def snapshotVerify(self, dir: str) -> Deferred:
        """
        C{snapshot-verify}.

        @param dir: the snapshot directory.
        @return: a Deferred firing with C{{"info": <snapshot info>}}.
        """
        d = maybeDeferred(lambda: self._snapshots().verify(dir))
        return d.addCallback(lambda info: {"info": info})

    @commands.SnapshotInfo.responder
    def snapshotInfo(self, dir: str) -> Deferred:
        """
        C{snapshot-info}.

        @param dir: the snapshot directory.
        @return: a Deferred firing with C{{"info": <snapshot info>}}.
        """
        d = maybeDeferred(lambda: self._snapshots().info(dir))
        return d.addCallback(lambda info: {"info": info})

    @commands.SnapshotRead.responder
    def snapshotRead(self, dir: str, block: str, offset: int, length: int) -> Deferred:
        """
        C{snapshot-read}.

        @param dir: the snapshot directory, or C{""} for the live capture.
        @param block: the RAM block.
        @param offset: byte offset.
        @param length: byte count.
        @return: a Deferred firing with C{{"data": <bytes>}}.
        """
        d = maybeDeferred(lambda: self._snapshots().read(dir, block, offset, length))
        return d.addCallback(lambda data: {"data": bytes(data)})

    @commands.QuerySnapshot.responder
    def querySnapshot(self) -> Deferred:
        """
        C{query-snapshot}.

        @return: a Deferred firing with C{{"info": {capture, restores}}}.
        """
        return maybeDeferred(lambda: self._snapshots().query()).addCallback(
            lambda info: {"info": info})

    @commands.QueryMigrateTimeline.responder
    def queryMigrateTimeline(self) -> Deferred:
        """
        C{x-query-migrate-timeline}.

        @return: a Deferred firing with C{{"timeline": <timeline>}}.
        """
        return maybeDeferred(self.manager.queryMigrateTimeline).addCallback(
            lambda timeline: {"timeline": timeline})

    @commands.Subscribe.responder
    def subscribe(self) -> dict:
        """
        Start pushing events to this connection; subscribing twice is the
        same as once.

        @return: the empty response.
        """
        if self._unsubscribe is None:
            self._unsubscribe = self.manager.subscribe(self.eventEmitted)
        return {}

    def eventEmitted(self, event: dict[str, Any]) -> None:
        """
        Forward one manager event to the subscribed client.

        @param event: C{{"event": NAME, "data": {...}}}, as QMP emits it.
        """
        self.callRemote(
            commands.MigrationEvent, event=event["event"], data=event.get("data", {})
        )

    #: Bytes of keys and values in the box being received (see
    #: L{twisted_postcopy.wire.constants.MAX_AMP_BOX_SIZE}).
    _boxBytes = 0

    def proto_init(self, string: bytes) -> str:
        """
        The first key of a box: start counting its bytes.

        @param string: the key.
        @return: the next state.
        """
        self._boxBytes = 0
        return super().proto_init(string)

    def proto_key(self, string: bytes) -> str:
        """
        A key (or the empty key ending the box), counted against
        C{MAX_AMP_BOX_SIZE}.

        @param string: the key.
        @return: the next state; C{"done"} (the connection is closed) for a
            box over the limit.
        """
        self._boxBytes += len(string) + 2
        if self._boxBytes > MAX_AMP_BOX_SIZE:
            return self._boxTooLarge()
        return super().proto_key(string)

    def proto_value(self, string: bytes) -> str:
        """
        A value, counted against C{MAX_AMP_BOX_SIZE}.

        @param string: the value.
        @return: the next state (C{"done"} for a box over the limit).
        """
        self._boxBytes += len(string) + 2
        if self._boxBytes > MAX_AMP_BOX_SIZE:
            return self._boxTooLarge()
        return super().proto_value(string)

    def proto_done(self, string: bytes) -> str:
        """
        Anything after an oversized box is ignored while the connection
        closes.

        @param string: ignored.
        @return: C{"done"}.
        """
        return "done"

    def _boxTooLarge(self) -> str:
        """
        An AMP box grew over the limit: drop it and the connection.

        @return: C{"done"}.
        """
        self._currentBox = None
        self.boxTooLarge = LimitExceededError(
            f"AMP box of more than {MAX_AMP_BOX_SIZE} bytes", self._boxBytes, "max-amp-box")
        _log.warn("control connection closed: {error}", error=self.boxTooLarge)
        return "done"

    @commands.ObjectAdd.responder
    def objectAdd(self, qom_type: str, id: str, props: dict[str, Any] | None = None) -> Deferred:
        """
        C{object-add} (docs/tls.md).

        @param qom_type: C{tls-creds-x509} or C{authz-simple}.
        @param id: the new object's id.
        @param props: its properties, QEMU's names.
        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.objectAdd, qom_type, id, **(props or {}))

    @commands.ObjectDel.responder
    def objectDel(self, id: str) -> Deferred:
        """
        C{object-del}.

        @param id: the object's id.
        @return: a Deferred firing with the empty response.
        """
        return _call(self.manager.objectDel, id)

    @commands.QueryObjects.responder
    def queryObjects(self) -> dict[str, Any]:
        """
        C{query-objects}, with each object's properties.

        @return: C{{"objects": [...]}}.
        """
        return {"objects": self.manager.objects.describe()}

    def connectionLost(self, reason: Any) -> None:
        """
        Stop forwarding events once the client is gone.

        @param reason: why the connection was lost.
        """
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            unsubscribe()
        super().connectionLost(reason)


class ControlFactory(ServerFactory):
    """
    Builds a L{ControlAMP} per control connection, all sharing one manager.

    @ivar manager: the daemon's MigrationManager.
    @ivar guest: the daemon's guest, or L{None}.
    @ivar snapshots: the daemon's snapshot jobs, or L{None}.
    """

    def __init__(self, manager: Any, guest: Any = None, snapshots: Any = None) -> None:
        """
        @param manager: the MigrationManager.
        @param guest: the guest answering C{query-guest}, if any.
        @param snapshots: what the C{snapshot-*} commands act on, if any.
        """
        self.manager = manager
        self.guest = guest
        self.snapshots = snapshots

    def buildProtocol(self, addr: Any) -> ControlAMP:
        """
        Build a connection's protocol.

        @param addr: the peer address.
        @return: a L{ControlAMP} for the manager.
        """
        protocol = ControlAMP(self.manager, self.guest, self.snapshots)
        protocol.factory = self
        return protocol

