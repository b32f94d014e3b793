# -*- test-case-name: tests.test_guests_host -*-
"""
The daemon's side of the attach protocol: L{GuestHost} listens on a Unix
socket, spawns guest worker processes, hands them the RAMBlocks' memfds,
attaches their userfaultfds to the fault service (destination) or the
dirty tracker (source), and drives them (C{run}, C{stop}, C{save},
C{load}).  See C{docs/attach.md}.
"""

from __future__ import annotations

import base64
import signal
import sys
from typing import Any

from attrs import field, frozen
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed

from twisted_postcopy.access import PeerCredentials, PeerPolicy, SocketPolicy, listenUNIX
from twisted_postcopy.childprocess import childEnvironment, pythonArguments
from twisted_postcopy.errors import AttachProtocolError, GuestError
from twisted_postcopy.guests.attach import MODES
from twisted_postcopy.guests.session import AttachProtocol

__all__ = ["AttachAccess", "AttachProtocol", "GuestHost", "WorkerProcess"]


@frozen
class AttachAccess:
    """
    Who may attach besides the worker processes the daemon spawned, and
    the attach socket's file group and mode.

    @ivar allow: the allow list of external guests (uids, gids, pids);
        empty by default: only spawned workers attach.
    @ivar group: the socket file's group, or L{None}.
    @ivar mode: the socket file's mode (0600; 0660 is the usual choice
        with a group).
    """

    allow: PeerPolicy = field(factory=PeerPolicy)
    group: int | None = None
    mode: int = 0o600


class _AttachPeers:
    """
    The attach socket's peer policy: a spawned worker process (checked by
    its pid, live) or a peer on the external allow list.

    @ivar host: the L{GuestHost}.
    @ivar allow: the external allow list.
    """

    def __init__(self, host: GuestHost, allow: PeerPolicy) -> None:
        """
        @param host: the host whose spawned workers may attach.
        @param allow: who else may.
        """
        self.host, self.allow = host, allow

    def allows(self, peer: PeerCredentials) -> bool:
        """
        @param peer: a connecting peer.
        @return: whether it is a running spawned worker or allowed.
        """
        return peer.pid in self.host.spawnedPids() or self.allow.allows(peer)

    def describe(self) -> str:
        """
        @return: who may attach.
        """
        pids = ", ".join(map(str, sorted(self.host.spawnedPids()))) or "none running"
        return f"spawned workers (pid {pids}); external: {self.allow.describe()}"

class WorkerProcess(protocol.ProcessProtocol):
    """
    A spawned worker process.

    @ivar name: the worker name.
    @ivar errors: its stderr (kept for messages).
    @ivar ended: fires with the exit reason.
    """

    def __init__(self, name: str) -> None:
        """
        @param name: the worker name.
        """
        self.name = name
        self.errors = b""
        self.ended: Deferred = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        @param childFD: 1 or 2.
        @param data: output bytes (the last 8 KiB are kept).
        """
        self.errors = (self.errors + data)[-8192:]

    def processEnded(self, reason: Any) -> None:
        """
        @param reason: the exit status.
        """
        self.ended.callback(reason.value)


class GuestHost(protocol.Factory):
    """
    Spawns a guest's worker processes and drives their attachments.

    @ivar reactor: the reactor.
    @ivar socketPath: the attach socket.
    @ivar blocks: the RAMBlocks handed to each worker.
    @ivar mode: C{fault}, C{track} or C{plain}.
    @ivar faultService: where C{fault} clients go.
    @ivar dirtyTracker: where C{track} clients go.
    @ivar workers: attached workers by name.
    @ivar processes: spawned processes by worker name.
    @ivar threads: the native thread ids every worker reported (C{threads}
        messages), in first-report order; only ever appended to, so an
        index keeps naming the same thread (blocktime's vCPU index).
    """

    def __init__(self, reactor: Any, socketPath: str, blocks: list[Any], mode: str = "plain",
                 faultService: Any = None, dirtyTracker: Any = None,
                 threads: list[int] | None = None, access: AttachAccess | None = None) -> None:
        """
        @param reactor: an C{IReactorUNIX} and C{IReactorProcess}.
        @param socketPath: where to listen.
        @param blocks: the RAMBlocks (memfd-backed).
        @param mode: the attachment mode.
        @param faultService: a L{twisted_postcopy.ram.faults.FaultService}.
        @param dirtyTracker: a L{twisted_postcopy.ram.dirty.DirtyTracker}.
        @param threads: the list L{threads} appends to (a new one if
            L{None}), so a caller can hand out a live view.
        @param access: who may attach besides the spawned workers, and the
            socket's group and mode (default: spawned workers only, 0600).
        @raise GuestError: unknown mode.
        """
        if mode not in MODES:
            raise GuestError(f"unknown attach mode {mode!r}")
        self.reactor, self.socketPath, self.blocks, self.mode = reactor, socketPath, blocks, mode
        self.faultService, self.dirtyTracker = faultService, dirtyTracker
        self.workers: dict[str, AttachProtocol] = {}
        self.processes: dict[str, WorkerProcess] = {}
        self.threads: list[int] = [] if threads is None else threads
        self._waiting: list[Deferred] = []
        self._killed: Deferred | None = None
        access = AttachAccess() if access is None else access
        self.access = access
        policy = SocketPolicy(access.mode, access.group, _AttachPeers(self, access.allow), "attach socket")
        self.port = listenUNIX(reactor, socketPath, self, policy)

    def spawnedPids(self) -> dict[int, str]:
        """
        @return: process id -> worker name of every spawned worker still
            running.
        """
        return {process.transport.pid: name for name, process in self.processes.items()
                if process.transport is not None and process.transport.pid is not None}

    def checkHello(self, peer: PeerCredentials | None, worker: str, pid: int) -> None:
        """
        Check a C{hello} against the connection's peer: its pid must be
        the peer's, a spawned worker may only use its own name, and no
        other peer may use a spawned worker's name.

        @param peer: the connection's peer (L{None}: not a Unix socket,
            only in unit tests).
        @param worker: the worker name claimed.
        @param pid: the process id claimed.
        @raise AttachProtocolError: it claims what it is not.
        """
        if worker in self.workers:
            raise AttachProtocolError(f"worker {worker} is already attached")
        if peer is None:
            return
        if pid != peer.pid:
            raise AttachProtocolError(f"hello says pid {pid}, the connection is from pid {peer.pid}")
        name = self.spawnedPids().get(peer.pid)
        if name is not None and name != worker:
            raise AttachProtocolError(f"pid {peer.pid} was spawned as worker {name}, not {worker}")
        if name is None and worker in self.processes:
            raise AttachProtocolError(f"worker name {worker} belongs to a worker process the daemon spawned")

    def buildProtocol(self, addr: Any) -> AttachProtocol:
        """
        @param addr: the peer address.
        @return: a new attachment.
        """
        return AttachProtocol(self)

    def spawn(self, module: str, guest: str, count: int, arguments: list[str] = ()) -> None:
        """
        Spawn C{count} workers: C{python -m MODULE --attach PATH --guest
        GUEST --worker NAME ARGUMENTS...}.

        @param module: the worker module (e.g. C{twisted_postcopy.guests.stress}).
        @param guest: the guest name.
        @param count: how many workers.
        @param arguments: more command-line arguments.
        """
        for index in range(count):
            name = f"{guest}-{len(self.processes)}"
            process = WorkerProcess(name)
            argv = [*pythonArguments("-m", module), "--attach", self.socketPath, "--guest", guest,
                    "--worker", name, *arguments]
            self.reactor.spawnProcess(process, sys.executable, argv, env=childEnvironment(),
                                      childFDs={0: "w", 1: "r", 2: "r"})
            self.processes[name] = process
            process.ended.addCallback(self._processEnded, name)

    def workerAttached(self, worker: AttachProtocol) -> None:
        """
        A worker completed its attachment.

        @param worker: its protocol.
        """
        self.workers[worker.worker] = worker
        self._check()

    def workerThreads(self, worker: AttachProtocol) -> None:
        """
        A worker reported its thread ids: add the new ones to L{threads}.

        @param worker: its protocol.
        """
        known = set(self.threads)
        self.threads.extend(tid for tid in worker.threads if tid not in known)

    def workerLost(self, worker: AttachProtocol) -> None:
        """
        A connection closed: drop its worker (others are unaffected); if
        it was one of ours, fail whoever waits for all workers.

        @param worker: its protocol.
        """
        ours = worker.worker in self.processes and self.workers.get(worker.worker) in (None, worker)
        if self.workers.get(worker.worker) is worker:
            del self.workers[worker.worker]
            if self.faultService is not None and worker.client is not None:
                self.faultService.removeClient(worker.client, "attach connection closed")
        if ours:
            self._failWaiting(worker.worker, "disconnected")

    def _processEnded(self, reason: Any, name: str) -> None:
        """
        A spawned worker exited; if it never attached, nobody will.

        @param reason: its exit status.
        @param name: its name.
        """
        if name not in self.workers:
            self._failWaiting(name, f"exited ({reason})")

    def _failWaiting(self, name: str, what: str) -> None:
        """
        Fail the L{whenAttached} waiters.

        @param name: the worker that went away.
        @param what: how.
        """
        process = self.processes.get(name)
        detail = process.errors.decode(errors="replace")[-2000:] if process else ""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(GuestError(f"guest worker {name} {what}: {detail}"))

    def _check(self) -> None:
        """
        Fire L{whenAttached} waiters once every spawned worker attached.
        """
        if all(name in self.workers for name in self.processes):
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(dict(self.workers))

    def whenAttached(self) -> Deferred:
        """
        @return: a Deferred firing with name -> L{AttachProtocol} once every
            spawned worker attached, or failing with L{GuestError} if one
            goes away first.
        """
        d: Deferred = Deferred()
        self._waiting.append(d)
        self._check()
        return d

    def _all(self, kind: str, fields: dict[str, dict[str, Any]] | None = None) -> Deferred:
        """
        Send one request to every attached worker.

        @param kind: the request.
        @param fields: worker name -> fields, or L{None} for none.
        @return: a Deferred firing with worker name -> reply fields.
        """
        names = sorted(self.workers)
        requests = [self.workers[name].request(kind, **(fields or {}).get(name, {})) for name in names]
        d = gatherResults(requests, consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure if hasattr(failure.value, "subFailure") else failure)
        return d.addCallback(lambda replies: dict(zip(names, replies)))

    def run(self) -> Deferred:
        """
        @return: a Deferred firing once every worker runs.
        """
        return self._all("run")

    def stop(self) -> Deferred:
        """
        Stop every worker: each stops writing before it answers
        C{stopped}.

        @return: a Deferred firing once every worker stopped.
        """
        return self._all("stop")

    def save(self) -> Deferred:
        """
        @return: a Deferred firing with worker name -> device state bytes.
        """
        d = self._all("save")
        return d.addCallback(lambda replies: {n: base64.b64decode(r["blob"]) for n, r in replies.items()})

    def load(self, states: dict[str, bytes]) -> Deferred:
        """
        @param states: worker name -> device state bytes.
        @return: a Deferred firing once every worker loaded its state.
        @raise GuestError: a worker has no state.
        """
        missing = set(self.workers) - set(states)
        if missing:
            raise GuestError(f"no device state for workers {sorted(missing)}")
        return self._all("load", {n: {"blob": base64.b64encode(states[n]).decode()} for n in self.workers})

    def verify(self) -> Deferred:
        """
        @return: a Deferred firing with worker name -> C{verified} fields.
        """
        return self._all("verify")

    def digest(self) -> Deferred:
        """
        @return: a Deferred firing with worker name -> SHA-256 hex digests
            of its mappings, in block order.
        """
        return self._all("digest").addCallback(lambda replies: {n: r["sha256"] for n, r in replies.items()})

    def kill(self) -> Deferred:
        """
        Kill every spawned worker and stop listening.

        @return: a Deferred firing once all have exited.
        """
        if self._killed is not None:
            return self._killed
        for process in self.processes.values():
            if not process.ended.called:
                try:
                    process.transport.signalProcess(signal.SIGKILL)
                except Exception:
                    pass
        for worker in list(self.workers.values()):
            worker.transport.loseConnection()
        ended = DeferredList([p.ended for p in self.processes.values()])
        stopped = self.port.stopListening() or succeed(None)
        self._killed = DeferredList([ended, stopped]).addCallback(lambda _: None)
        return self._killed
