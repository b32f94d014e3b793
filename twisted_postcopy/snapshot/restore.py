# -*- test-case-name: tests.test_snapshot_restore -*-
"""
Restore: an L{IOutgoingVM} over a stored snapshot, and the driver that
feeds one snapshot to one or more destinations (clones), each over its own
connection, by precopy or postcopy.

A snapshot never changes, so there is no dirty tracker and C{stop} and
C{resume} do nothing.  Its RAM is read through read-only mappings of the
sparse block files: holes read as zeros and go out as ZERO records, or,
with postcopy-ram, are not sent at all (L{SnapshotVM.knownZero},
C{x-skip-known-zero} in docs/prefetch.md).
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from zope.interface import implementer

from twisted_postcopy.errors import MigrationFailed, SnapshotError
from twisted_postcopy.interfaces import IOutgoingVM
from twisted_postcopy.snapshot.mapping import BlockMapping
from twisted_postcopy.snapshot.store import Snapshot, openSnapshot
from twisted_postcopy.snapshot.workingset import pageCounts, readWorkingSet, writeWorkingSet
from twisted_postcopy.source import prefetch
from twisted_postcopy.source.prefetch import WORKING_SET
from twisted_postcopy.wire.config import encodeHeader

_EMPTY = memoryview(b"")
_log = Logger()


@define
class SnapshotBlock:
    """
    One stored RAMBlock as the source reads it.

    @ivar idstr: QEMU's block name.
    @ivar length: bytes.
    @ivar pageSize: the page size.
    @ivar mapping: its read-only mapping (L{None} when empty).
    @ivar _view: the view handed out (one per block).
    """

    idstr: str
    length: int
    pageSize: int
    mapping: BlockMapping | None
    _view: memoryview | None = None

    def view(self) -> memoryview:
        """
        @return: the stored bytes, read-only (never copied).
        """
        if self.mapping is None:
            return _EMPTY
        if self._view is None:
            self._view = self.mapping.view()
        return self._view


@implementer(IOutgoingVM)
@define
class SnapshotVM:
    """
    A snapshot as an outgoing VM.

    @ivar snapshot: the opened snapshot.
    @ivar blocks: its blocks in list order.
    @ivar machine: the machine type name.
    @ivar configuration: the stored configuration section after its type
        byte (for an engine that sends it verbatim).
    @ivar dirtyTracker: always L{None}.
    """

    snapshot: Snapshot
    blocks: list[SnapshotBlock] = field(init=False)
    machine: str = field(init=False)
    configuration: bytes = field(init=False)
    dirtyTracker: None = None

    def __attrs_post_init__(self) -> None:
        """
        Map every block and check the configuration can be reproduced.

        @raise SnapshotError: the stored configuration has parts the
            engine's header does not send.
        """
        self.machine = self.snapshot.machine
        self.configuration = self.snapshot.configuration()
        if encodeHeader(self.machine)[9:] != self.configuration:
            raise SnapshotError(f"{self.snapshot.path}/configuration.bin: has subsections; "
                                "restore sends only the machine name")
        self.blocks = [SnapshotBlock(b.idstr, b.length, b.pageSize, self.snapshot.mapBlock(b))
                       for b in self.snapshot.blocks]

    def stop(self) -> None:
        """
        Nothing runs here.
        """

    def deviceState(self) -> bytes:
        """
        @return: the stored device sections.
        """
        return self.snapshot.deviceState()

    def resume(self) -> None:
        """
        Nothing to resume.
        """

    def knownZero(self) -> list[tuple[str, int, int]]:
        """
        The pages known to be zero without reading them: the holes of the
        sparse block files (a snapshot never changes, so they stay zero).

        @return: (idstr, offset, length) runs in bytes.
        """
        return [(block.idstr, offset, length) for block in self.blocks if block.mapping is not None
                for offset, length in block.mapping.holes]


def restoreOne(reactor: Any, vm: SnapshotVM, uri: str, postcopy: bool,
               bandwidth: int = 0, objects: Any = None,
               tls: dict[str, str] | None = None,
               parameters: dict[str, int] | None = None,
               workingSet: Any = None, preempt: bool = False) -> tuple[Any, Deferred]:
    """
    Start one restore.

    @param reactor: the reactor.
    @param vm: the snapshot VM.
    @param uri: the destination, C{tcp:HOST:PORT} or C{unix:PATH}.
    @param postcopy: switch to postcopy at once (the destination runs
        before its RAM arrives).
    @param bandwidth: bytes/s (precopy and postcopy), 0 for unlimited.
    @param objects: the L{twisted_postcopy.tlscreds.ObjectRegistry}
        holding the TLS objects named by C{tls}.
    @param tls: TLS parameters (C{tls-creds} naming client credentials,
        C{tls-hostname}) to migrate over TLS (docs/tls.md).
    @param parameters: more migration parameters (e.g. the C{x-} ones of
        docs/prefetch.md), set after the bandwidths.
    @param workingSet: the snapshot's L{WorkingSetPolicy}, or L{None}.
    @param preempt: with C{postcopy}, send requested pages on a
        C{postcopy-preempt} channel (the destination needs the capability
        too).
    @return: (the L{MigrationManager}, a Deferred firing with the final
        status string, C{completed} or C{failed}).
    @raise MigrationError: the source refuses the capabilities.
    """
    from twisted_postcopy.manager import MigrationManager
    from twisted_postcopy.snapshot.capture import _useTLS

    manager = MigrationManager(reactor, vm)
    manager.setCapabilities({"postcopy-ram": postcopy, "return-path": True, "x-postcopy-auto-recover": True,
                             "postcopy-preempt": postcopy and preempt})
    manager.setParameters({"max-bandwidth": bandwidth, "max-postcopy-bandwidth": bandwidth})
    if parameters:
        manager.setParameters(parameters)
    _useTLS(manager, objects, tls)
    done = manager.whenStatus("completed", "failed", "cancelled")
    manager.migrate(uri)
    if workingSet is not None and manager.outgoing is not None:
        workingSet.attach(manager.outgoing.scheduler, done if postcopy else None)
    if postcopy:
        manager.startPostcopy()
    return manager, done


def restoreSnapshot(reactor: Any, path: str, uris: Sequence[str], postcopy: bool = True,
                    verify: bool = True, bandwidth: int = 0,
                    root: str | None = None, objects: Any = None,
                    tls: dict[str, str] | None = None,
                    parameters: dict[str, int] | None = None,
                    preempt: bool = False) -> tuple[list[Any], Deferred]:
    """
    Restore one snapshot into every destination at once.

    @param reactor: the reactor.
    @param path: the snapshot directory.
    @param uris: one destination URI per clone.
    @param postcopy: restore by postcopy (else plain precopy).
    @param verify: check every sha256 first.
    @param bandwidth: bytes/s per destination, 0 for unlimited.
    @param root: the snapshot root C{path} must lie in, or L{None}.
    @param objects: the TLS objects named by C{tls} (see L{restoreOne}).
    @param tls: TLS parameters for every destination (see L{restoreOne}).
    @param parameters: more migration parameters for every destination;
        C{x-working-set-pages} (docs/prefetch.md) also decides whether the
        snapshot's working set is sent first, or recorded.
    @param preempt: use C{postcopy-preempt} (see L{restoreOne}).
    @return: (the managers, a Deferred firing with the list of final
        statuses, failing with L{MigrationFailed} if any clone failed).
    @raise SnapshotError: the snapshot is missing, truncated or tampered,
        or its working-set file is unusable (L{WorkingSetError}).
    """
    snapshot = openSnapshot(path, root)
    if verify:
        snapshot.verify()
    vm = SnapshotVM(snapshot)
    policy = WorkingSetPolicy.load(snapshot, _parameter(parameters, WORKING_SET))
    started = [restoreOne(reactor, vm, uri, postcopy, bandwidth, objects, tls, parameters, policy,
                           preempt)
               for uri in uris]
    managers = [manager for manager, _ in started]

    def gathered(results: list[tuple[bool, Any]]) -> list[str]:
        """
        @param results: the DeferredList's results.
        @return: the statuses.
        @raise MigrationFailed: a clone did not complete.
        """
        statuses = [value for _, value in results]
        failed = [uri for uri, status in zip(uris, statuses) if status != "completed"]
        if failed:
            raise MigrationFailed(f"restore failed towards {', '.join(failed)}")
        return statuses

    done = DeferredList([d for _, d in started], consumeErrors=True)
    return managers, done.addCallback(gathered)


def _parameter(parameters: dict[str, int] | None, name: str) -> int:
    """
    @param parameters: parameters given to a restore, or L{None}.
    @param name: one of the parameters of L{prefetch.DEFAULTS}.
    @return: its value for this restore.
    """
    return (parameters or {}).get(name, prefetch.DEFAULTS[name])


@define
class WorkingSetPolicy:
    """
    C{x-working-set-pages} for one restore of a snapshot and its clones:
    send the stored working set first, and record the page requests of
    each postcopy clone that the set lacks; once the first clone completed,
    store the set with them appended (the first set is created
    exclusively; later ones replace it), up to the limit.

    @ivar snapshot: the snapshot.
    @ivar limit: C{x-working-set-pages} (0: neither).
    @ivar entries: the stored working set, or L{None} when there is none.
    @ivar recorded: whether a working set was stored by this restore.
    """

    snapshot: Snapshot
    limit: int
    entries: list[tuple[int, int]] | None = None
    recorded: bool = False

    @classmethod
    def load(cls, snapshot: Snapshot, limit: int) -> WorkingSetPolicy | None:
        """
        @param snapshot: the snapshot.
        @param limit: C{x-working-set-pages}.
        @return: the policy, or L{None} when C{limit} is 0.
        @raise WorkingSetError: the file is there but unusable.
        """
        if not limit:
            return None
        return cls(snapshot, limit, readWorkingSet(snapshot, limit))

    def attach(self, scheduler: Any, done: Deferred | None) -> None:
        """
        Apply the policy to one clone's page scheduler.

        @param scheduler: its L{twisted_postcopy.source.sender.PageScheduler}.
        @param done: fires with its final status if the clone is by
            postcopy (so it may record), else L{None}.
        """
        known = self.entries or []
        scheduler.prefetchFirst(known)
        if done is None or len(known) >= self.limit:
            return
        scheduler.log = prefetch.RequestLog.forBlocks(pageCounts(self.snapshot), self.limit - len(known))
        scheduler.log.known(known)
        done.addCallback(self._finished, scheduler.log)

    def _finished(self, status: str, log: prefetch.RequestLog) -> str:
        """
        A recording clone ended: if it completed, store the working set
        with the pages it was asked for that the set lacked appended (the
        first clone to complete wins; a failure to store is logged, the
        restore itself succeeded).

        @param status: its final status.
        @param log: its request log.
        @return: C{status}.
        """
        if status == "completed" and len(log) and not self.recorded:
            try:
                self.recorded = writeWorkingSet(self.snapshot, (self.entries or []) + log.entries(),
                                                replace=self.entries is not None)
            except (SnapshotError, OSError, ValueError, struct.error) as error:
                _log.warn("working set not stored: {error}", error=error)
        return status


def _openVerified(path: str, root: str | None = None) -> Snapshot:
    """
    @param path: the snapshot directory.
    @param root: the snapshot root it must lie in, or L{None}.
    @return: the snapshot, every sha256 checked.
    @raise SnapshotError: missing, truncated or tampered.
    """
    snapshot = openSnapshot(path, root)
    snapshot.verify()
    return snapshot


def verifyInThread(reactor: Any, path: str, root: str | None = None) -> Deferred:
    """
    Open and verify a snapshot in the reactor's thread pool, so a daemon
    does not stop serving while gigabytes are hashed (only snapshot files
    are read; no guest memory is touched).

    @param reactor: the reactor.
    @param path: the snapshot directory.
    @param root: the snapshot root it must lie in, or L{None}.
    @return: a Deferred firing with the L{Snapshot}, or failing with
        L{SnapshotError}.
    """
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), _openVerified, path, root)
