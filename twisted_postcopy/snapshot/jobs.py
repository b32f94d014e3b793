# -*- test-case-name: tests.test_control_snapshot -*-
"""
The snapshot jobs of a daemon: what the control API's C{snapshot-*}
commands act on.

L{SnapshotJobs} runs at most one capture at a time (one listener for one
incoming QEMU migration, like QEMU's single C{-incoming}) and any number of
restores (each feeding one snapshot to one or more destinations).  Reads
of the capture in progress go through L{CaptureVM.readLive}: in postcopy a
page not yet received is requested from the QEMU source first.  Verifying
hashes whole snapshots and runs in the reactor's thread pool.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, succeed

from twisted_postcopy.errors import SnapshotBusyError, SnapshotError, SnapshotReadTooLargeError
from twisted_postcopy.manager import checkParameters
from twisted_postcopy.snapshot.capture import CaptureVM, captureSnapshot
from twisted_postcopy.snapshot.qmprecovery import recoverCapture, recoverRestore
from twisted_postcopy.access import checkMigrationListener
from twisted_postcopy.snapshot.restore import restoreSnapshot, verifyInThread
from twisted_postcopy.snapshot.store import insideRoot, openSnapshot, prepareDirectory

#: Seconds a live read waits for its pages from the QEMU source before
#: failing with L{SnapshotError} (the source stopped serving them).
LIVE_READ_TIMEOUT = 60.0

#: The most bytes one C{snapshot-read} returns: 15 pages, below AMP's
#: 65,535-byte value limit.
MAX_READ = 15 * 4096


def addressURI(address: Any) -> str:
    """
    Write a listening address the way QEMU writes migration URIs.

    @param address: an C{IPv4Address}, C{IPv6Address} or C{UNIXAddress}.
    @return: C{tcp:HOST:PORT}, C{tcp:[HOST]:PORT} or C{unix:PATH}.
    """
    if getattr(address, "type", None) == "TCP":
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"tcp:{host}:{address.port}"
    name = address.name
    return "unix:" + (name.decode() if isinstance(name, bytes) else name)


@define
class CaptureJob:
    """
    One capture: a listener, then a migration, then a stored snapshot.

    @ivar uri: the URI listened on (the real port once listening).
    @ivar path: the snapshot directory (absolute).
    @ivar postcopy: whether postcopy is accepted.
    @ivar vm: the L{CaptureVM}.
    @ivar outcome: L{None} while running, C{completed}, or C{failed}.
    @ivar error: why it failed, or L{None}.
    @ivar _waiters: Deferreds of L{whenEnded}.
    """

    uri: str
    path: str
    postcopy: bool
    vm: CaptureVM
    outcome: str | None = None
    error: str | None = None
    _waiters: list[Deferred] = field(factory=list)

    def ended(self, result: Any) -> None:
        """
        Record how the capture ended (the callback of C{vm.stored}) and
        wake L{whenEnded} waiters.

        @param result: the L{Snapshot} or a Failure.
        """
        if hasattr(result, "getErrorMessage"):
            self.outcome, self.error = "failed", result.getErrorMessage()
        else:
            self.outcome = "completed"
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.outcome)

    def whenEnded(self) -> Deferred:
        """
        @return: a Deferred firing with L{outcome} once the capture ended.
        """
        if self.outcome is not None:
            return succeed(self.outcome)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter

    def read(self, reactor: Any, idstr: str, offset: int, length: int,
             root: str | None = None) -> Deferred:
        """
        Read the capture's RAM: live while QEMU is sending, from the stored
        snapshot once its migration completed (waiting for the files to be
        written).

        @param reactor: the reactor (for L{LIVE_READ_TIMEOUT}).
        @param idstr: the RAM block.
        @param offset: byte offset.
        @param length: byte count.
        @param root: the snapshot root of the stored snapshot, or L{None}.
        @return: a Deferred firing with the bytes, failing with
            L{SnapshotError} if the pages do not arrive in time.
        @raise SnapshotError: bad block or range.
        """
        if self.outcome is None and self.query()["status"] != "storing":
            return _within(reactor, self.vm.readLive(idstr, offset, length), SnapshotError(
                f"live read of {idstr} at {offset:#x}: the source sent no page "
                f"within {LIVE_READ_TIMEOUT:g} s"))
        return self.whenEnded().addCallback(
            lambda _: openSnapshot(self.path, root).read(idstr, offset, length))

    def query(self) -> dict[str, Any]:
        """
        @return: C{uri}, C{dir}, C{postcopy}, C{status} (the incoming
            migration's QMP status, C{storing} between its end and the
            snapshot's, then C{completed} or C{failed}), C{error} when
            failed, C{page-requests} (true once LISTEN was processed: a
            live read then requests missing pages from the source), and
            C{migration} (the incoming side's C{query-migrate}).
        """
        migration = self.vm.migration.queryMigrate() if self.vm.migration is not None else {}
        status = self.outcome or migration.get("status", "setup")
        if status == "completed" and self.outcome is None:
            status = "storing"
        info = {"uri": self.uri, "dir": self.path, "postcopy": self.postcopy, "status": status,
                "page-requests": self.outcome is None and bool(self.vm.inPostcopy()),
                "migration": migration}
        if self.error is not None:
            info["error"] = self.error
        return info


def _within(reactor: Any, reading: Deferred, error: Exception) -> Deferred:
    """
    Give up waiting for a live read after L{LIVE_READ_TIMEOUT} seconds.
    The read itself is left alone: its pages are still wanted by the
    capture, and its late result is dropped.

    @param reactor: the reactor.
    @param reading: the read's Deferred.
    @param error: the error to fail with on timeout.
    @return: a Deferred firing with the read's result, or failing with
        C{error}.
    """
    result: Deferred = Deferred()

    def timedOut() -> None:
        """
        Fail the caller's Deferred.
        """
        result.errback(error)

    timer = reactor.callLater(LIVE_READ_TIMEOUT, timedOut)

    def done(outcome: Any) -> None:
        """
        Pass the read's outcome on, unless too late.

        @param outcome: the bytes or a Failure.
        """
        if timer.active():
            timer.cancel()
            result.callback(outcome)

    reading.addBoth(done)
    return result


@define
class RestoreJob:
    """
    One restore of a snapshot into one or more destinations.

    @ivar path: the snapshot directory.
    @ivar uris: the destinations.
    @ivar postcopy: restored by postcopy.
    @ivar managers: one MigrationManager per destination.
    @ivar outcome: L{None} while running, C{completed} or C{failed}.
    @ivar error: why it failed, or L{None}.
    """

    path: str
    uris: list[str]
    postcopy: bool
    managers: list[Any] = field(factory=list)
    outcome: str | None = None
    error: str | None = None

    def ended(self, result: Any) -> None:
        """
        Record how the restore ended.

        @param result: the statuses or a Failure.
        """
        if hasattr(result, "getErrorMessage"):
            self.outcome, self.error = "failed", result.getErrorMessage()
        else:
            self.outcome = "completed"

    def query(self) -> dict[str, Any]:
        """
        @return: C{dir}, C{postcopy}, C{status} (C{setup} while verifying,
            C{active}, C{completed} or C{failed}), C{error} when failed,
            and C{clones}: per destination its C{uri} and C{query-migrate}.
        """
        status = self.outcome or ("active" if self.managers else "setup")
        info: dict[str, Any] = {"dir": self.path, "postcopy": self.postcopy, "status": status,
                                "clones": [{"uri": uri, **manager.queryMigrate()}
                                           for uri, manager in zip(self.uris, self.managers)]}
        if self.error is not None:
            info["error"] = self.error
        return info


@define
class SnapshotJobs:
    """
    A daemon's snapshot captures and restores.

    @ivar reactor: the reactor.
    @ivar capture: the latest L{CaptureJob}, or L{None}.
    @ivar restores: every L{RestoreJob} started, oldest first.
    @ivar root: the daemon's C{--snapshot-root}: every directory the
        commands name must lie in it (a relative one is taken from it) and
        is reached without following links; L{None} for anywhere.
    @ivar insecureMigration: a capture may listen off the host without
        TLS authentication (the daemon's C{--insecure-migration}).
    """

    reactor: Any
    capture: CaptureJob | None = None
    restores: list[RestoreJob] = field(factory=list)
    root: str | None = None
    insecureMigration: bool = False

    def resolve(self, path: str) -> str:
        """
        Where a directory named by a command is.

        @param path: the directory as given.
        @return: its absolute path.
        @raise SnapshotError: it lies outside L{root}.
        """
        if self.root is None:
            return os.path.abspath(path)
        return insideRoot(self.root, path)

    def startCapture(self, uri: str, path: str, postcopy: bool = True,
                     machine: str = "pc-i440fx-7.2", qmp: str | None = None,
                     objects: Any = None, tls: dict[str, str] | None = None) -> Deferred:
        """
        C{snapshot-capture}: listen for one incoming migration and store
        it in C{path}.

        @param uri: C{tcp:HOST:PORT} (port 0 picks one) or C{unix:PATH}.
        @param path: the snapshot directory to create.
        @param postcopy: accept postcopy.
        @param machine: the machine type recorded.
        @param qmp: the QEMU source's QMP socket: after a cut, the job
            resumes QEMU through it.
        @param objects: TLS objects (see L{captureSnapshot}).
        @param tls: TLS parameters (see L{captureSnapshot}).
        @return: a Deferred firing with the URI listened on.
        @raise SnapshotBusyError: a capture is still running.
        """
        if self.capture is not None and self.capture.outcome is None:
            raise SnapshotBusyError(f"a capture into {self.capture.path} is still running")
        path = self.resolve(path)
        if not (tls or {}).get("tls-creds"):
            checkMigrationListener(uri, None, self.insecureMigration, "snapshot-capture")
        prepareDirectory(path, self.root)
        listening, vm = captureSnapshot(self.reactor, uri, path, postcopy, machine,
                                        objects=objects, tls=tls, insecure=self.insecureMigration)
        vm.root = self.root
        if qmp:
            recoverCapture(self.reactor, vm.migration, qmp)
        job = CaptureJob(uri, path, postcopy, vm)
        vm.stored.addBoth(lambda result: job.ended(result))
        self.capture = job

        def listened(port: Any) -> str:
            """
            @param port: the listening port.
            @return: its URI.
            """
            job.uri = addressURI(port.getHost())
            return job.uri

        def refused(failure: Any) -> Any:
            """
            @param failure: why listening failed.
            @return: C{failure}.
            """
            job.ended(failure)
            return failure

        return listening.addCallbacks(listened, refused)

    def startRestore(self, path: str, uris: Sequence[str], postcopy: bool = True,
                     bandwidth: int = 0, verify: bool = True,
                     qmp: Sequence[str] | None = None, objects: Any = None,
                     tls: dict[str, str] | None = None, preempt: bool = False,
                     parameters: dict[str, Any] | None = None) -> Deferred:
        """
        C{snapshot-restore}: feed a snapshot to every destination at once.

        @param path: the snapshot directory.
        @param uris: one destination URI per clone.
        @param postcopy: restore by postcopy.
        @param bandwidth: bytes/s per destination, 0 for unlimited.
        @param verify: check every sha256 first (in a thread).
        @param qmp: per destination, its QEMU's QMP socket (C{""}: none):
            after a cut, the job recovers that QEMU through it.
        @param objects: TLS objects (see L{restoreSnapshot}).
        @param tls: TLS parameters (see L{restoreSnapshot}).
        @param preempt: use a postcopy preempt channel (see
            L{restoreSnapshot}).
        @param parameters: more migration parameters for every destination.
        @return: a Deferred firing with L{None} once every connection is
            started (after verifying), failing with L{SnapshotError}.
        @raise SnapshotError: no destination given.
        @raise twisted_postcopy.errors.MigrationError: a parameter
            C{migrate-set-parameters} would refuse.
        """
        if not uris:
            raise SnapshotError("snapshot-restore needs at least one destination URI")
        parameters = checkParameters(dict(parameters or {}))
        job = RestoreJob(self.resolve(path), list(uris), postcopy)
        self.restores.append(job)
        checked = verifyInThread(self.reactor, job.path, self.root) if verify else succeed(None)

        def start(_: Any) -> None:
            """
            Connect to every destination.

            @param _: ignored.
            """
            managers, done = restoreSnapshot(self.reactor, job.path, job.uris, postcopy, False,
                                             bandwidth, root=self.root, objects=objects, tls=tls,
                                             parameters=parameters, preempt=preempt)
            job.managers = managers
            for manager, uri, monitor in zip(managers, job.uris, qmp or ()):
                if monitor:
                    recoverRestore(self.reactor, manager, monitor, uri)
            done.addBoth(job.ended)

        def refused(failure: Any) -> Any:
            """
            @param failure: why the restore could not start.
            @return: C{failure}.
            """
            job.ended(failure)
            return failure

        return checked.addCallback(start).addErrback(refused)

    def verify(self, path: str) -> Deferred:
        """
        C{snapshot-verify}: check sizes and sha256 (in a thread).

        @param path: the snapshot directory.
        @return: a Deferred firing with the snapshot's info, or failing
            with L{SnapshotError}.
        """
        return verifyInThread(self.reactor, self.resolve(path), self.root).addCallback(
            lambda snapshot: snapshot.info())

    def info(self, path: str) -> dict[str, Any]:
        """
        C{snapshot-info}.

        @param path: the snapshot directory.
        @return: the snapshot's info (C{Snapshot.info}).
        @raise SnapshotError: not a snapshot.
        """
        return openSnapshot(self.resolve(path), self.root).info()

    def read(self, path: str, idstr: str, offset: int, length: int) -> Deferred:
        """
        C{snapshot-read}: read RAM of a stored snapshot, or of the capture
        in progress when C{path} is its directory (or empty).

        @param path: the snapshot directory, or C{""} for the live capture.
        @param idstr: the RAM block.
        @param offset: byte offset.
        @param length: byte count, at most L{MAX_READ}.
        @return: a Deferred firing with the bytes.
        @raise SnapshotError: bad range or block, no such snapshot, or no
            capture running when C{path} is empty.
        @raise SnapshotReadTooLargeError: C{length} exceeds L{MAX_READ}.
        """
        if length > MAX_READ:
            raise SnapshotReadTooLargeError(
                f"snapshot-read of {length} bytes: at most {MAX_READ} per call")
        live = self.capture
        if live is not None and (not path or self.resolve(path) == live.path):
            return live.read(self.reactor, idstr, offset, length, self.root)
        if not path:
            raise SnapshotError("no capture is running; name a snapshot directory")
        return succeed(openSnapshot(self.resolve(path), self.root).read(idstr, offset, length))

    def query(self) -> dict[str, Any]:
        """
        C{query-snapshot}.

        @return: C{capture} (L{CaptureJob.query}, or L{None}) and
            C{restores} (L{RestoreJob.query} each).
        """
        return {"capture": self.capture.query() if self.capture is not None else None,
                "restores": [job.query() for job in self.restores]}
