# -*- test-case-name: tests.test_protocols_stream -*-
"""
Twisted protocols of the main migration connection; they only move bytes
between the transport and the engine.

L{SourceProtocol} is an L{IPushProducer} for its transport: it writes one
step of the outgoing migration at a time, stops while the transport is
full or the rate limit says wait, and feeds return-path bytes to the
engine.  L{DestinationProtocol} feeds main-stream bytes to the parser of
the incoming migration and writes its return path.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.logger import Logger
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from twisted_postcopy.destination.recovery import channelLost as incomingChannelLost
from twisted_postcopy.protocols.deadlink import (
    DEFAULT_LINK_TIMEOUT_MS, LINK_TIMEOUT, lostReason, noLinkWatch, stopWatching, watchLink)
from twisted_postcopy.errors import MigrationFailed, PostcopyError
from twisted_postcopy.protocols.dispatch import IncomingStreamReader, ReturnPathReader
from twisted_postcopy.protocols.receive import PreallocatedReceiver
from twisted_postcopy.protocols.sockets import (
    RECEIVE_CHUNK, GatheredWriter, readInLargeChunks, sendAtOnce, transportSocket)
from twisted_postcopy.source.machine import FINISHED
from twisted_postcopy.source.outgoing import DONE
from twisted_postcopy.source.recovery import channelLost as outgoingChannelLost

#: The send buffer of the source socket during postcopy.  (The
#: destination's receive buffer is left alone: shrinking it on a
#: connection with data in flight made the kernel drop segments, and the
#: first fault after RUN waited some 180 ms for TCP's retransmission.)
POSTCOPY_SNDBUF = 1 << 17

_log = Logger()


@implementer(IPushProducer)
class SourceProtocol(Protocol):
    """
    The source end of the main connection.

    @ivar migration: the L{twisted_postcopy.source.outgoing.OutgoingMigration}.
    @ivar reactor: schedules steps.
    @ivar paused: whether the transport asked us to stop.
    @ivar pending: the scheduled next step, if any.
    @ivar connectPreempt: starts connecting the preempt channel (see
        L{twisted_postcopy.protocols.preempt.preemptConnector}), or
        L{None} without C{postcopy-preempt}.
    """

    def __init__(self, migration: Any, reactor: Any, connectPreempt: Any = None) -> None:
        """
        @param migration: the outgoing migration.
        @param reactor: an L{twisted.internet.interfaces.IReactorTime}.
        @param connectPreempt: connects the preempt channel once this
            connection is up, or L{None}.
        """
        self.migration = migration
        self.reactor = reactor
        self.connectPreempt = connectPreempt
        self.paused = False
        self.pending: Any = None
        self.returnPath = ReturnPathReader(migration)
        self.watchdog: Any = None
        self.writer: GatheredWriter | None = None

    def connectionMade(self) -> None:
        """
        Start the migration and the first step.
        """
        if self._attach():
            self._start()
            if self.connectPreempt is not None and self.migration.machine.inProgress:
                self.connectPreempt()

    def _attach(self) -> bool:
        """
        Make this connection the migration's main channel.

        @return: whether the migration is still in progress.
        """
        self.migration.attachChannel(self)
        if not self.migration.machine.inProgress:
            self.transport.abortConnection()
            return False
        self.transport.registerProducer(self, True)
        self.writer = GatheredWriter(self.transport)
        self.watchdog = watchLink(self.reactor, self.transport, self._linkTimeout)
        return True

    def preemptBroken(self) -> None:
        """
        The preempt channel broke in postcopy: drop this connection too, so
        the migration pauses and a recovery makes both again.
        """
        self.transport.abortConnection()

    def _linkTimeout(self) -> int:
        """
        @return: the migration's C{x-link-timeout-ms} (read live).
        """
        return self.migration.parameters.get(LINK_TIMEOUT, DEFAULT_LINK_TIMEOUT_MS)

    def _start(self) -> None:
        """
        Start the migration and the first step.
        """
        try:
            self.migration.start()
        except PostcopyError as error:
            self.migration.fail(error)
            return
        self._schedule(0)

    def writeBuffers(self, buffers: list[Any]) -> None:
        """
        Send gathered buffers, straight from guest RAM views when the
        socket takes them (L{GatheredWriter}).

        @param buffers: bytes and memoryviews, in order.
        """
        if self.writer is None:
            self.transport.write(b"".join(buffers))
            return
        self.writer.writeBuffers(buffers)

    def postcopyStarted(self) -> None:
        """
        Postcopy began: keep the kernel's send queue short, so a requested
        page is not stuck behind megabytes of background pages, with or
        without C{postcopy-preempt} (with it, the 4 GiB restore into QEMU
        took a median 2621 ms with the short queue against 3157 ms with
        the autotuned one, eight interleaved rounds each: docs/engine.md).
        """
        sock = transportSocket(self.transport)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POSTCOPY_SNDBUF)

    def _schedule(self, delay: float) -> None:
        """
        @param delay: seconds until the next step.
        """
        if self.pending is None and not self.paused:
            self.pending = self.reactor.callLater(delay, self._step)

    def wake(self) -> None:
        """
        Step at once (the stopped VM's device state is ready), replacing a
        later scheduled poll.
        """
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        self._schedule(0)

    def _step(self) -> None:
        """
        Run steps until the transport is full, the engine says wait, or
        the migration is written.
        """
        self.pending = None
        try:
            delay = self.migration.step()
        except (PostcopyError, OSError) as error:
            self.migration.fail(error)
            return
        if delay != DONE:
            self._schedule(delay)

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full.
        """
        self.paused = True
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def resumeProducing(self) -> None:
        """
        The transport drained.
        """
        self.paused = False
        self._schedule(0)

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        """
        Return-path bytes.

        @param data: what arrived.
        """
        try:
            self.returnPath.receiveData(data)
        except PostcopyError as error:
            self.migration.fail(error)
            return
        self._schedule(0)

    def finished(self) -> None:
        """
        The migration reached a final status: close.
        """
        stopWatching(self.watchdog)
        self.pauseProducing()
        if self.migration.machine.status.value == "completed":
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        """
        A connection lost before the end fails the migration.

        @param reason: why.
        """
        self.pauseProducing()
        stopWatching(self.watchdog)
        why = lostReason(self.watchdog, reason)
        if outgoingChannelLost(self.migration, self.transport, why):
            return
        self.migration.fail(MigrationFailed(f"migration connection lost: {why}"))


class DestinationProtocol(PreallocatedReceiver, Protocol):
    """
    The destination end of the main connection.  Over a port of
    L{twisted_postcopy.protocols.receive} it is read with C{recv_into}
    into one preallocated buffer of L{RECEIVE_CHUNK} bytes, its pages
    placed straight from there; otherwise (TLS) through C{dataReceived}.

    @ivar incoming: the L{twisted_postcopy.destination.incoming.IncomingMigration}.
    @ivar driver: decodes the stream and calls the incoming migration.
    @ivar watch: starts the connection's dead-link check
        (L{twisted_postcopy.protocols.deadlink.linkWatch}).
    """

    receiveSize = RECEIVE_CHUNK

    def __init__(self, incoming: Any, watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param incoming: the incoming migration.
        @param watch: see L{watch}.
        """
        self.incoming = incoming
        self.watch = watch
        self.driver = IncomingStreamReader(incoming)
        self.watchdog: Any = None

    def connectionMade(self) -> None:
        """
        Loading starts; this connection is the incoming migration's main
        channel (its return path is written here).
        """
        sendAtOnce(self.transport)
        readInLargeChunks(self.transport)
        self.incoming.attachChannel(self)
        self.watchdog = self.watch(self.transport)
        self.incoming.machine.status.observers.append(self._endWatch)
        self.incoming.connected()

    def returnPathReady(self) -> None:
        """
        The incoming migration has return-path bytes: write them.
        """
        data = self.incoming.dataToSend()
        if data:
            self.transport.write(data)

    def _endWatch(self, status: Any) -> None:
        """
        A finished migration needs no dead-link check, and its main
        connection closes: after SHUT(0) once it completed (in postcopy
        with C{postcopy-preempt} that is after the preempt channel's EOS,
        not at the main stream's EOF), at once when it failed.

        @param status: the incoming migration's new status.
        """
        if status in FINISHED:
            stopWatching(self.watchdog)
            if status.value == "completed":
                self.transport.loseConnection()
            else:
                self.transport.abortConnection()

    def received(self, data: bytes | memoryview, borrowed: bool) -> None:
        """
        Decode and act on main-stream bytes.

        @param data: what arrived.
        @param borrowed: whether C{data} is the receive buffer's, to be
            read into again once this returns.
        """
        try:
            self.driver.receiveData(data, borrowed)
            self.incoming.flush()
        except (PostcopyError, OSError) as error:
            _log.warn("incoming migration stream: {error}", error=error)
            if not incomingChannelLost(self.incoming, self, error):
                self.incoming.failed(error)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        """
        A connection lost before the end fails the incoming migration (or
        pauses it while postcopy runs).

        @param reason: why.
        """
        watchdog = getattr(self, "watchdog", None)
        stopWatching(watchdog)
        why = lostReason(watchdog, reason)
        if incomingChannelLost(self.incoming, self, why):
            return
        self.incoming.failed(MigrationFailed(f"migration connection lost: {why}"))
