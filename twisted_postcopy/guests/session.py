# -*- test-case-name: tests.test_guests_attach -*-
"""
The daemon's side of one attach connection (see C{docs/attach.md}):
answers C{hello} with the RAMBlocks' memfds, hands the guest's
userfaultfd and mapping table to the fault service (C{fault} mode) or the
dirty tracker (C{track} mode), then carries run-control requests and
their replies.  Any protocol error gets C{error {message}} and a close;
the host drops the worker without harming the others.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.logger import Logger
from zope.interface import implementer

from twisted_postcopy.errors import AttachProtocolError, GuestError, MappingTableError
from twisted_postcopy.guests.attach import MessageReader, checkUserfaultfd, encodeMessage
from twisted_postcopy.ram.clients import validateMappings

_log = Logger()

#: The most entries a client's mapping table may have.
MAX_MAPPINGS = 4096

#: Control requests and the reply each expects.
REPLIES = {"run": "running", "stop": "stopped", "save": "state", "load": "loaded", "verify": "verified",
           "digest": "digested"}


def clientTable(mappings: Any) -> list[dict[str, Any]]:
    """
    Translate a wire mapping table to the fault service's field names.

    @param mappings: the C{mappings} list of a C{uffd}/C{track} message.
    @return: dicts with C{base}, C{block}, C{offset}, C{length}, C{pageSize}.
    @raise MappingTableError: not a list of objects with those fields.
    """
    if not isinstance(mappings, list) or len(mappings) > MAX_MAPPINGS:
        raise MappingTableError(f"mapping table is not a list of at most {MAX_MAPPINGS} entries")
    try:
        table = [{"base": m["base"], "block": m["idstr"], "offset": m["offset"], "length": m["length"],
                  "pageSize": m["page_size"]} for m in mappings]
    except (KeyError, TypeError) as error:
        raise MappingTableError(f"bad mapping table entry: {error!r}") from None
    for entry in table:
        for name in ("base", "offset", "length", "pageSize"):
            value = entry[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
                raise MappingTableError(f"bad mapping table entry: {name} {value!r:.40} is not an "
                                        "integer in [0, 2**64)")
        if not isinstance(entry["block"], str):
            raise MappingTableError(f"bad mapping table entry: idstr {entry['block']!r:.40} is not a string")
    return table


class AttachHost(Protocol):
    """
    What a connection needs from the daemon side that accepted it
    (L{twisted_postcopy.guests.host.GuestHost}, which imports this module).
    """

    workers: dict[str, Any]
    blocks: Any
    mode: str
    faultService: Any
    dirtyTracker: Any

    def workerAttached(self, worker: AttachProtocol) -> None:
        """
        @param worker: a connection whose attachment completed.
        """

    def workerThreads(self, worker: AttachProtocol) -> None:
        """
        @param worker: a connection that reported its thread ids.
        """

    def workerLost(self, worker: AttachProtocol) -> None:
        """
        @param worker: a connection that closed.
        """


@implementer(IFileDescriptorReceiver)
class AttachProtocol(protocol.Protocol):
    """
    One attached guest process.

    @ivar host: the L{AttachHost} (a L{twisted_postcopy.guests.host.GuestHost}).
    @ivar guest: the guest name from C{hello}.
    @ivar worker: the worker name from C{hello}.
    @ivar pid: the process id from C{hello} (the peer's, checked).
    @ivar peer: the peer's L{twisted_postcopy.access.PeerCredentials}
        (set by the attach socket before the connection is made).
    @ivar client: the fault service client or tracked process.
    @ivar attached: whether the attachment completed.
    @ivar info: fields of the last C{info} message (e.g. a kv port).
    @ivar threads: the native thread ids of the last C{threads} message.
    """

    def __init__(self, host: AttachHost) -> None:
        """
        @param host: the host.
        """
        self.host = host
        self.reader = MessageReader()
        self.guest = self.worker = ""
        self.pid = 0
        self.peer: Any = None
        self.client: Any = None
        self.attached = False
        self.info: dict[str, Any] = {}
        self.threads: list[int] = []
        self._replies: list[tuple[str, Deferred]] = []

    def fileDescriptorReceived(self, descriptor: int) -> None:
        """
        @param descriptor: an fd that came with the next bytes.
        """
        self.reader.feed(b"", (descriptor,))

    def dataReceived(self, data: bytes) -> None:
        """
        Parse and handle messages; a protocol error closes the connection.

        @param data: bytes.
        """
        try:
            self.reader.feed(data)
            for message in self.reader.messages():
                self._handle(message)
        except (AttachProtocolError, MappingTableError, OSError) as error:
            self.fail(str(error))
        except Exception as error:
            # A client must never reach past its own connection: whatever
            # its message broke is its error, not the daemon's.
            _log.failure("attach: unexpected error handling {worker}'s message", worker=self.worker)
            self.fail(f"malformed message: {error.__class__.__name__}: {error}")

    def fail(self, reason: str) -> None:
        """
        Send C{error} and close.

        @param reason: the message.
        """
        reason = reason[:2000]
        _log.warn("attach: dropping {worker} (pid {pid}): {reason}", worker=self.worker, pid=self.pid, reason=reason)
        self.transport.write(encodeMessage("error", message=reason))
        self.transport.loseConnection()

    def send(self, kind: str, fds: Iterable[int] = (), **fields: Any) -> None:
        """
        @param kind: the message type.
        @param fds: descriptors to attach (still owned by the caller).
        @param fields: its fields.
        """
        fds = list(fds)
        for fd in fds:
            self.transport.sendFileDescriptor(fd)
        if fds:
            fields["fds"] = len(fds)
        self.transport.write(encodeMessage(kind, **fields))

    def _handle(self, message: Any) -> None:
        """
        @param message: one received message.
        @raise AttachProtocolError: unexpected here.
        """
        if message.kind not in ("uffd", "track", "mapped"):
            for fd in message.fds:
                os.close(fd)
        if message.kind == "hello" and not self.worker:
            guest, worker, pid = _hello(message)
            self.host.checkHello(self.peer, worker, pid)
            self.guest, self.worker, self.pid = guest, worker, pid
            blocks = self.host.blocks
            self.send("blocks", [b.fd for b in blocks], mode=self.host.mode,
                      blocks=[{"idstr": b.idstr, "length": b.length, "page_size": b.pageSize} for b in blocks])
        elif message.kind in ("uffd", "track", "mapped") and self.worker and not self.attached:
            self._attach(message)
        elif message.kind == "info" and self.attached:
            self.info = dict(message.fields)
        elif message.kind == "threads" and self.attached:
            self.threads = _threadIds(message)
            self.host.workerThreads(self)
        elif message.kind == "error" and self._replies:
            self._replies.pop(0)[1].errback(GuestError(f"guest worker {self.worker}: {message.fields.get('message')}"))
            self.transport.loseConnection()
        elif self.attached and self._replies and message.kind == self._replies[0][0]:
            self._replies.pop(0)[1].callback(message.fields)
        else:
            if message.kind in ("uffd", "track", "mapped"):
                for fd in message.fds:
                    os.close(fd)
            raise AttachProtocolError(f"unexpected {message.kind} message")

    def _attach(self, message: Any) -> None:
        """
        Hand the client's userfaultfd and table to the fault service or
        dirty tracker.

        @param message: C{uffd}, C{track} or C{mapped}.
        @raise AttachProtocolError: the message does not fit the mode.
        @raise MappingTableError: bad table.
        """
        expected = {"fault": "uffd", "track": "track", "plain": "mapped"}[self.host.mode]
        if message.kind != expected or len(message.fds) != (0 if expected == "mapped" else 1):
            for fd in message.fds:
                os.close(fd)
            raise AttachProtocolError(f"{self.host.mode} mode wants one {expected} message, got {message.kind}")
        try:
            table = clientTable(message["mappings"])
            if message.fds:
                checkUserfaultfd(message.fds[0])
            if self.host.mode == "fault":
                self.client = self.host.faultService.addClient(message.fds[0], table, self.pid)
            elif self.host.mode == "track":
                self.client = self.host.dirtyTracker.addProcess(message.fds[0], table, self.pid)
            else:
                validateMappings({b.idstr: b for b in self.host.blocks}, table)
        except BaseException:
            if message.fds and self.client is None:
                os.close(message.fds[0])
            raise
        self.attached = True
        self.send("attached")
        self.host.workerAttached(self)

    def request(self, kind: str, **fields: Any) -> Deferred:
        """
        Send a control request.

        @param kind: C{run}, C{stop}, C{save}, C{load} or C{verify}.
        @param fields: its fields.
        @return: a Deferred firing with the reply's fields.
        """
        reply: Deferred = Deferred()
        self._replies.append((REPLIES[kind], reply))
        self.send(kind, **fields)
        return reply

    def connectionLost(self, reason: Any) -> None:
        """
        The worker went away: fail its requests, release what it held.

        @param reason: why.
        """
        self.reader.close()
        replies, self._replies = self._replies, []
        for _, reply in replies:
            reply.errback(GuestError(f"guest worker {self.worker} (pid {self.pid}) disconnected"))
        self.host.workerLost(self)


def _hello(message: Any) -> tuple[str, str, int]:
    """
    @param message: a C{hello} message.
    @return: its guest name, worker name and process id.
    @raise AttachProtocolError: a field is missing or of the wrong type.
    """
    guest, worker, pid = message["guest"], message["worker"], message["pid"]
    if not (isinstance(guest, str) and isinstance(worker, str) and worker and len(worker) <= 256
            and isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 31):
        raise AttachProtocolError(f"bad hello: guest {guest!r:.80}, worker {worker!r:.80}, pid {pid!r:.40}")
    return guest, worker, pid


#: The most thread ids one C{threads} message may list.
MAX_THREADS = 4096


def _threadIds(message: Any) -> list[int]:
    """
    @param message: a C{threads} message.
    @return: its thread ids.
    @raise AttachProtocolError: not a list of at most L{MAX_THREADS}
        positive integers.
    """
    threads = message["threads"]
    if not (isinstance(threads, list) and len(threads) <= MAX_THREADS
            and all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in threads)):
        raise AttachProtocolError(f"bad threads message: {threads!r:.200}")
    return threads
