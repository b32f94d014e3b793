# -*- test-case-name: tests.test_snapshot_qmprecovery -*-
"""
Recovery of snapshot jobs whose peer is a real QEMU 7.2 (docs/recovery.md,
"Capture and restore"): when our side of a capture or a restore pauses,
the job drives QEMU's own recovery through QEMU's QMP socket, since QEMU
neither notices a silent cut nor recovers by itself.

 - Restore (QEMU is the destination): C{migrate-pause} on QEMU if it has
   not paused, then C{migrate-recover} on the URI it was restored to; our
   source's automatic recovery (C{x-postcopy-auto-recover}) keeps
   retrying that URI and resumes.
 - Capture (QEMU is the source): C{migrate-pause} on QEMU if needed; our
   destination listens again by itself; once the QEMU host answers again
   (a TCP connect to its address is accepted or refused, not lost), QEMU's
   C{migrate} with C{resume} to our recovery URI, repeated while QEMU stays
   paused.

The QMP exchanges are blocking and short; they run in the reactor's
thread pool.  A small QMP client is here so that the daemon needs no QMP
library.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twisted_postcopy.errors import PostcopyError

#: Seconds a QMP exchange may take.
QMP_TIMEOUT = 10.0
#: Seconds between polls of QEMU's status.
POLL = 0.05
#: Seconds QEMU is given to leave C{postcopy-paused} after a resume
#: before it is asked again.
RESUME_WAIT = 3.0
#: The port a reachability probe connects to (nothing listens there: a
#: refusal proves the host answers).
PROBE_PORT = 1

log = Logger()


class QMPError(PostcopyError):
    """
    QEMU answered a QMP command with an error, or the monitor went away.
    """


class QMPClient:
    """
    A blocking QMP client over a UNIX socket (QEMU's C{-qmp unix:PATH}).

    @ivar sock: the connection.
    """

    def __init__(self, path: str, timeout: float = QMP_TIMEOUT) -> None:
        """
        Connect and leave capabilities negotiation mode.

        @param path: the QMP socket.
        @param timeout: seconds per read.
        @raise OSError: no connection.
        @raise QMPError: a bad greeting.
        """
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        if "QMP" not in self._read():
            raise QMPError(f"{path} is not a QMP monitor")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        """
        @return: the next message.
        @raise QMPError: the monitor closed.
        """
        line = self.file.readline(1 << 20)
        if not line:
            raise QMPError("the QMP monitor closed the connection")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """
        @param command: a QMP command.
        @param arguments: its arguments.
        @return: its C{return} value (events in between are skipped).
        @raise QMPError: QEMU's error text.
        """
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            answer = self._read()
            if "error" in answer:
                raise QMPError(f"{command}: {answer['error'].get('desc')}")
            if "return" in answer:
                return answer["return"]

    def status(self) -> str:
        """
        @return: QEMU's migration status.
        """
        return self.execute("query-migrate").get("status", "none")

    def close(self) -> None:
        """
        Disconnect.
        """
        self.file.close()
        self.sock.close()


def _waitStatus(client: QMPClient, statuses: frozenset[str], deadline: float) -> str | None:
    """
    @param client: the monitor.
    @param statuses: statuses awaited.
    @param deadline: C{time.monotonic()} limit.
    @return: the status reached, or L{None} at the deadline.
    """
    while time.monotonic() < deadline:
        status = client.status()
        if status in statuses:
            return status
        time.sleep(POLL)
    return None


def pauseQEMU(client: QMPClient, deadline: float) -> str:
    """
    Make sure QEMU's migration is paused (QEMU 7.2 does not notice a silent
    cut): C{migrate-pause} while it is C{postcopy-active}.

    @param client: the monitor.
    @param deadline: C{time.monotonic()} limit.
    @return: QEMU's status (C{postcopy-paused}, or a final one).
    @raise QMPError: still not paused at the deadline.
    """
    status = client.status()
    if status == "postcopy-active":
        client.execute("migrate-pause")
    reached = _waitStatus(client, frozenset({"postcopy-paused", "completed", "failed", "cancelled"}), deadline)
    if reached is None:
        raise QMPError(f"QEMU did not pause (status {client.status()})")
    return reached


def reachable(host: str, timeout: float = 0.5) -> bool:
    """
    @param host: an IPv4 or IPv6 address.
    @param timeout: seconds to wait for an answer.
    @return: whether the host answers a TCP connect (accepts or refuses).
    """
    try:
        with socket.create_connection((host, PROBE_PORT), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def recoverQEMUDestination(path: str, uri: str, deadline: float) -> str:
    """
    A QEMU destination: pause it if needed, then C{migrate-recover}.

    @param path: its QMP socket.
    @param uri: the URI it listens on again.
    @param deadline: C{time.monotonic()} limit.
    @return: what was done.
    """
    client = QMPClient(path)
    try:
        if pauseQEMU(client, deadline) != "postcopy-paused":
            return "QEMU finished"
        client.execute("migrate-recover", uri=uri)
        return f"QEMU listens on {uri}"
    finally:
        client.close()


def resumeQEMUSource(path: str, uri: str, peer: str | None, deadline: float) -> str:
    """
    A QEMU source: pause it if needed, wait until the path works, then
    C{migrate} with C{resume} until it leaves C{postcopy-paused}.

    @param path: its QMP socket.
    @param uri: our recovery URI.
    @param peer: QEMU's host address (probed), or L{None}.
    @param deadline: C{time.monotonic()} limit.
    @return: what was done.
    @raise QMPError: QEMU still paused at the deadline.
    """
    client = QMPClient(path)
    try:
        if pauseQEMU(client, deadline) != "postcopy-paused":
            return "QEMU finished"
        while time.monotonic() < deadline:
            if peer is not None and not reachable(peer):
                time.sleep(0.1)
                continue
            try:
                client.execute("migrate", uri=uri, resume=True)
            except QMPError as error:
                log.warn("QEMU resume: {error}", error=error)
            if _waitStatus(client, frozenset({"postcopy-recover", "postcopy-active", "completed"}),
                           min(deadline, time.monotonic() + RESUME_WAIT)) is not None:
                return f"QEMU resumed to {uri}"
        raise QMPError("QEMU stayed postcopy-paused")
    finally:
        client.close()


class QEMURecovery:
    """
    Drives a QEMU peer's recovery each time our side of a snapshot job
    pauses.

    @ivar reactor: the reactor (its thread pool runs the QMP exchanges).
    @ivar manager: our side's L{twisted_postcopy.manager.MigrationManager}.
    @ivar recover: C{deadline -> str}, the blocking recovery of the peer.
    @ivar running: whether a recovery is under way.
    """

    def __init__(self, reactor: Any, manager: Any, recover: Callable[[float], str]) -> None:
        """
        @param reactor: the reactor.
        @param manager: our side's manager.
        @param recover: the peer's recovery.
        """
        self.reactor = reactor
        self.manager = manager
        self.recover = recover
        self.running = False
        manager.subscribe(self._event)

    def _event(self, event: dict[str, Any]) -> None:
        """
        @param event: a manager event; a change to C{postcopy-paused}
            starts the peer's recovery.
        """
        data = event.get("data", {})
        if data != {"status": "postcopy-paused"} or self.running:
            return
        self.running = True
        deadline = time.monotonic() + self.manager.parameters["x-recover-deadline-ms"] / 1000.0
        log.info("postcopy recovery: driving the QEMU peer through QMP")
        working = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.recover, deadline)
        working.addCallbacks(lambda done: log.info("postcopy recovery: {done}", done=done),
                             lambda failure: log.error("postcopy recovery of the QEMU peer failed: {e}",
                                                       e=failure.getErrorMessage()))
        working.addBoth(self._ended)

    def _ended(self, _: Any) -> None:
        """
        Ready for the next pause.
        """
        self.running = False


def recoverRestore(reactor: Any, manager: Any, qmp: str, uri: str) -> QEMURecovery:
    """
    A restore into a QEMU destination recovers through its QMP socket.

    @param reactor: the reactor.
    @param manager: the restore's source manager.
    @param qmp: the QEMU destination's QMP socket.
    @param uri: the URI it was restored to (and listens on again).
    @return: the driver.
    """
    return QEMURecovery(reactor, manager, lambda deadline: recoverQEMUDestination(qmp, uri, deadline))


def recoverCapture(reactor: Any, manager: Any, qmp: str) -> QEMURecovery:
    """
    A capture from a QEMU source recovers through its QMP socket.

    @param reactor: the reactor.
    @param manager: the capture's destination manager.
    @param qmp: the QEMU source's QMP socket.
    @return: the driver.
    """
    peer: list[str] = []
    factory = manager.destinationFactory
    if factory is not None:
        factory.accepted.addCallback(lambda protocol: peer.append(protocol.transport.getPeer().host) or protocol)

    def recover(deadline: float) -> str:
        uri = manager.recoveryURI()
        if uri is None:
            raise QMPError("no recovery URI")
        return resumeQEMUSource(qmp, uri, peer[0] if peer else None, deadline)

    return QEMURecovery(reactor, manager, recover)
