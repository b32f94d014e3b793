# -*- test-case-name: tests.test_control_client -*-
"""
Small asynchronous helpers over the control API, for the C{postcopy}
command line, the demo and tests.

L{connectControl} opens a control connection from an endpoint description
(C{unix:/run/postcopy.sock}, C{tcp:host=127.0.0.1:port=7000}) and returns a
L{ControlClient}, whose methods are named after the QMP commands.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.protocols.amp import AMP
from twisted.python.failure import Failure

from twisted_postcopy.control import commands
from twisted_postcopy.control.server import capabilitiesFromList, capabilitiesToList
from twisted_postcopy.snapshot.jobs import MAX_READ

#: Statuses after which an outgoing or incoming migration does not move.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class ControlClient(AMP):
    """
    The client end of a control connection.

    @ivar observers: callables given C{(event, data)} for each event the
        server pushes after L{subscribe}.
    """

    def __init__(self) -> None:
        """
        Make an unconnected client.
        """
        super().__init__()
        self.observers: list[Callable[[str, dict], None]] = []
        self._disconnected: list[Deferred] = []

    def whenDisconnected(self) -> Deferred:
        """
        Wait for the connection to end.

        @return: a Deferred firing with L{None} once the connection is lost.
        """
        d: Deferred = Deferred()
        self._disconnected.append(d)
        return d

    def connectionLost(self, reason: Any) -> None:
        """
        Fail outstanding calls and fire L{whenDisconnected} waiters.

        @param reason: why the connection ended.
        """
        super().connectionLost(reason)
        waiters, self._disconnected = self._disconnected, []
        for d in waiters:
            d.callback(None)

    @commands.MigrationEvent.responder
    def migrationEvent(self, event: str, data: dict) -> dict:
        """
        Pass a pushed event to every observer.

        @param event: the QMP event name (C{MIGRATION}).
        @param data: the event's data.
        @return: the empty response.
        """
        for observer in list(self.observers):
            observer(event, data)
        return {}

    async def subscribe(self, observer: Callable[[str, dict], None]) -> None:
        """
        Receive events from now on.

        @param observer: called with C{(event, data)} for each event.
        """
        self.observers.append(observer)
        await self.callRemote(commands.Subscribe)

    async def setCapabilities(self, capabilities: dict[str, bool]) -> None:
        """
        C{migrate-set-capabilities}.

        @param capabilities: capability name to state.
        """
        await self.callRemote(
            commands.SetCapabilities, capabilities=capabilitiesToList(capabilities)
        )

    async def queryCapabilities(self) -> dict[str, bool]:
        """
        C{query-migrate-capabilities}.

        @return: capability name to state.
        """
        answer = await self.callRemote(commands.QueryCapabilities)
        return capabilitiesFromList(answer["capabilities"])

    async def setParameters(self, parameters: dict[str, Any]) -> None:
        """
        C{migrate-set-parameters}.

        @param parameters: QEMU parameter names to values.
        """
        await self.callRemote(commands.SetParameters, parameters=parameters)

    async def queryParameters(self) -> dict[str, Any]:
        """
        C{query-migrate-parameters}.

        @return: parameter names to values.
        """
        return (await self.callRemote(commands.QueryParameters))["parameters"]

    async def objectAdd(self, qomType: str, id: str, props: dict[str, Any] | None = None) -> None:
        """
        C{object-add} (docs/tls.md).

        @param qomType: C{tls-creds-x509} or C{authz-simple}.
        @param id: the new object's id.
        @param props: its properties, QEMU's names.
        """
        await self.callRemote(commands.ObjectAdd, qom_type=qomType, id=id, props=props or {})

    async def objectDel(self, id: str) -> None:
        """
        C{object-del}.

        @param id: the object's id.
        """
        await self.callRemote(commands.ObjectDel, id=id)

    async def queryObjects(self) -> list[dict[str, Any]]:
        """
        C{query-objects}, with each object's properties.

        @return: the objects.
        """
        return (await self.callRemote(commands.QueryObjects))["objects"]

    async def migrate(self, uri: str, resume: bool = False) -> None:
        """
        C{migrate}.

        @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
        @param resume: resume a paused postcopy migration.
        """
        await self.callRemote(commands.Migrate, uri=uri, resume=resume)

    async def migrateIncoming(self, uri: str) -> None:
        """
        C{migrate-incoming}.

        @param uri: where to listen.
        """
        await self.callRemote(commands.MigrateIncoming, uri=uri)

    async def migrateRecover(self, uri: str) -> None:
        """
        C{migrate-recover}.

        @param uri: where to listen for the reconnecting source.
        """
        await self.callRemote(commands.MigrateRecover, uri=uri)

    async def migratePause(self) -> None:
        """
        C{migrate-pause}.
        """
        await self.callRemote(commands.MigratePause)

    async def startPostcopy(self) -> None:
        """
        C{migrate-start-postcopy}.
        """
        await self.callRemote(commands.StartPostcopy)

    async def cancel(self) -> None:
        """
        C{migrate-cancel}.
        """
        await self.callRemote(commands.CancelMigration)

    async def queryMigrate(self) -> dict[str, Any]:
        """
        C{query-migrate}.

        @return: QMP's MigrationInfo object.
        """
        return (await self.callRemote(commands.QueryMigrate))["info"]

    async def queryGuest(self) -> dict[str, Any]:
        """
        C{query-guest} (twisted-postcopy's own command).

        @return: the guest's state.
        """
        return (await self.callRemote(commands.QueryGuest))["info"]

    async def snapshotCapture(self, uri: str, path: str, postcopy: bool = True,
                              machine: str | None = None, qmp: str | None = None,
                              tls: dict[str, str] | None = None) -> str:
        """
        C{snapshot-capture}.

        @param uri: where the daemon listens for QEMU's migration.
        @param path: the snapshot directory (absolute: the daemon's working
            directory is not the caller's).
        @param postcopy: accept postcopy.
        @param machine: the machine type recorded, or L{None} for QEMU 7.2's.
        @param qmp: the QEMU source's QMP socket, to recover it after a cut.
        @param tls: C{tls-creds} (and C{tls-authz}) naming the daemon's
            objects, to accept the source over TLS.
        @return: the URI listened on.
        """
        options: dict[str, Any] = {"machine": machine} if machine else {}
        if qmp:
            options["qmp"] = qmp
        options.update({name.replace("-", "_"): value for name, value in (tls or {}).items()})
        answer = await self.callRemote(commands.SnapshotCapture, uri=uri, dir=path,
                                       postcopy=postcopy, **options)
        return answer["uri"]

    async def snapshotRestore(self, path: str, uris: list[str], postcopy: bool = True,
                              bandwidth: int = 0, verify: bool = True,
                              qmp: list[str] | None = None,
                              tls: dict[str, str] | None = None, preempt: bool = False,
                              parameters: dict[str, int] | None = None) -> None:
        """
        C{snapshot-restore}.

        @param path: the snapshot directory.
        @param uris: the destinations (one clone each).
        @param postcopy: restore by postcopy.
        @param bandwidth: bytes/s per destination, 0 for unlimited.
        @param verify: check the hashes first.
        @param qmp: per destination, its QEMU's QMP socket (C{""}: none),
            to recover it after a cut.
        @param tls: C{tls-creds} (and C{tls-hostname}) naming the daemon's
            objects, to migrate over TLS.
        @param preempt: use a postcopy preempt channel.
        @param parameters: more migration parameters for every destination
            (e.g. C{x-working-set-pages}).
        """
        options: dict[str, Any] = {"qmp": list(qmp)} if qmp else {}
        if preempt:
            options["postcopy_preempt"] = True
        if parameters:
            options["parameters"] = dict(parameters)
        options.update({name.replace("-", "_"): value for name, value in (tls or {}).items()})
        await self.callRemote(commands.SnapshotRestore, dir=path, uris=list(uris),
                              postcopy=postcopy, max_bandwidth=bandwidth, verify=verify, **options)

    async def snapshotVerify(self, path: str) -> dict[str, Any]:
        """
        C{snapshot-verify}.

        @param path: the snapshot directory.
        @return: the snapshot's info once every hash matched.
        """
        return (await self.callRemote(commands.SnapshotVerify, dir=path))["info"]

    async def snapshotInfo(self, path: str) -> dict[str, Any]:
        """
        C{snapshot-info}.

        @param path: the snapshot directory.
        @return: the snapshot's info.
        """
        return (await self.callRemote(commands.SnapshotInfo, dir=path))["info"]

    async def snapshotRead(self, path: str, block: str, offset: int, length: int,
                           chunk: int = MAX_READ) -> bytes:
        """
        C{snapshot-read}, split into calls of at most C{chunk} bytes.

        @param path: the snapshot directory, or C{""} for the live capture.
        @param block: the RAM block.
        @param offset: byte offset.
        @param length: byte count (any size).
        @param chunk: bytes per call.
        @return: the bytes.
        """
        parts = []
        starts = range(offset, offset + length, chunk) if length > 0 else [offset]
        for start in starts:
            size = min(chunk, offset + length - start)
            answer = await self.callRemote(commands.SnapshotRead, dir=path, block=block,
                                           offset=start, length=size)
            parts.append(answer["data"])
        return b"".join(parts)

    async def querySnapshot(self) -> dict[str, Any]:
        """
        C{query-snapshot}.

        @return: C{capture} and C{restores}.
        """
        return (await self.callRemote(commands.QuerySnapshot))["info"]

    async def queryMigrateTimeline(self) -> dict[str, Any]:
        """
        C{x-query-migrate-timeline}.

        @return: the daemon's migration timeline.
        """
        return (await self.callRemote(commands.QueryMigrateTimeline))["timeline"]


def runMain(main: Callable[[Any], Awaitable[int]]) -> int:
    """
    Run the global reactor around one coroutine, for command-line entry
    points (like L{twisted.internet.task.react}, but returning the status
    instead of exiting).

    @param main: a coroutine function taking the reactor and returning an
        exit status.
    @return: its exit status (1 if it failed; the failure is printed).
    """
    from twisted.internet import reactor

    status: list[int] = []

    def done(result: Any) -> None:
        """
        Record the status and stop the reactor.

        @param result: the exit status or a Failure.
        """
        if isinstance(result, Failure):
            result.printTraceback()
            result = 1
        status.append(int(result or 0))
        if reactor.running:
            reactor.stop()

    Deferred.fromCoroutine(main(reactor)).addBoth(done)
    if not status:
        reactor.run()
    return status[0] if status else 1


def connectControl(reactor: Any, description: str) -> Deferred:
    """
    Connect to a daemon's control endpoint.

    @param reactor: the reactor.
    @param description: a client endpoint description; a bare path is
        taken as C{unix:PATH}.
    @return: a Deferred firing with a connected L{ControlClient}.
    """
    if description.startswith("/"):
        description = "unix:" + description
    endpoint = clientFromString(reactor, description)
    return connectProtocol(endpoint, ControlClient())
