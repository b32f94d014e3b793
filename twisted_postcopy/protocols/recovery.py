# -*- test-case-name: tests.test_recovery_loopback -*-
"""
The connections of a postcopy recovery (return-path-preempt-recovery.md
section 4.3-4.4): the source's new main connection (C{migrate} with
C{resume}), the destination's (C{migrate-recover}, or the original
listener while paused), and C{migrate-pause}.

The protocols only move bytes: the handshakes are
L{twisted_postcopy.source.recovery.SourceResume} and
L{twisted_postcopy.destination.recovery.DestinationResume}.  Once resumed,
each connection carries on as an ordinary main connection.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.destination.recovery import DestinationResume, checkRecover
from twisted_postcopy.errors import MigrationError, PostcopyError
from twisted_postcopy.protocols.deadlink import noLinkWatch
from twisted_postcopy.protocols.preempt import PreemptDestinationProtocol, preemptConnector
from twisted_postcopy.protocols.dispatch import IncomingStreamReader, ReturnPathReader
from twisted_postcopy.protocols.factories import ChannelSorter, SourceFactory, clientEndpoint, serverEndpoint
from twisted_postcopy.protocols.sockets import readInLargeChunks, sendAtOnce, transportSocket
from twisted_postcopy.protocols.tls import connectMaybeTLS, wrapServer
from twisted_postcopy.protocols.stream import DestinationProtocol, SourceProtocol
from twisted_postcopy.state import FINISHED, MigrationStatus as S
from twisted_postcopy.source.recovery import SourceResume, checkResume, currentTransport
from twisted_postcopy.wire import StreamDecoder
from twisted_postcopy.wire import events as e
from twisted_postcopy.wire.constants import RAM_SECTION_ID, SectionType


log = Logger()

#: The first byte of a recovery main channel (a C{QEMU_VM_COMMAND}:
#: RECV_BITMAP).
_RECOVERY_PREFIX = bytes([SectionType.COMMAND])


class RecoveryReturnPathReader(ReturnPathReader):
    """
    The source's return path on a recovery connection: RECV_BITMAP and
    RESUME_ACK go to the handshake, page requests and SHUT as usual (one
    dispatch table, the base reader's with these entries).

    @ivar resume: the handshake.
    @ivar resumed: called once RESUME_ACK moved the migration back to
        C{postcopy-active}.
    """

    def __init__(self, outgoing: Any, resume: SourceResume) -> None:
        """
        @param outgoing: the outgoing migration.
        @param resume: the handshake.
        """
        super().__init__(outgoing)
        self.resume = resume
        self.resumed: Callable[[], object] = lambda: None
        del self._calls[e.PongReceived]
        self._calls.update({
            e.RecvBitmapReceived: lambda ev: resume.bitmapReceived(ev.block, ev.bitmap),
            e.ResumeAckReceived: self._resumeAcked,
        })

    def _resumeAcked(self, event: e.ResumeAckReceived) -> None:
        """
        RESUME_ACK: the handshake decides whether postcopy resumes.

        @param event: the message.
        """
        if self.resume.resumeAcked():
            self.resumed()


class RecoverySourceProtocol(SourceProtocol):
    """
    The source's new main connection: the handshake, then the ordinary
    postcopy stream.

    @ivar resume: the handshake.
    """

    def __init__(self, migration: Any, reactor: Any, connectPreempt: Any = None) -> None:
        """
        @param migration: the paused outgoing migration.
        @param reactor: an L{twisted.internet.interfaces.IReactorTime}.
        @param connectPreempt: connects the new preempt channel after this
            connection (C{postcopy-preempt}), or L{None}.
        """
        super().__init__(migration, reactor, connectPreempt)
        self.resume = SourceResume(migration, lambda data: self.writeBuffers([data]))
        self.returnPath = RecoveryReturnPathReader(migration, self.resume)
        self.returnPath.resumed = self._resumed

    def connectionMade(self) -> None:
        """
        Take over the migration's writes and send the bitmap requests;
        with C{postcopy-preempt}, only once the new preempt channel is up
        too (QEMU 7.2's source waits for it, and its destination enters
        C{postcopy-recover} only with both channels).
        """
        if self.migration.machine.status != S.POSTCOPY_PAUSED:
            self.transport.abortConnection()
            return
        self._attach()
        self.postcopyStarted()
        if self.connectPreempt is None or not self.migration.preemptWanted:
            self.resume.start()
            return
        self.connectPreempt().addCallback(self._preemptConnected)

    def _preemptConnected(self, preempt: Any) -> None:
        """
        The new preempt channel connected (or failed: then this connection
        is dropped and the migration stays paused for another C{migrate}
        with C{resume}).

        @param preempt: the attached preempt protocol, or L{None}.
        """
        if preempt is None or self.migration.machine.status != S.POSTCOPY_PAUSED or (
                not self.transport.connected):
            if preempt is None:
                self.migration.stats.error = self.migration.preemptError
            self.transport.abortConnection()
            return
        self.resume.start()

    def dataReceived(self, data: bytes) -> None:
        """
        Return-path bytes; a bad reply during the handshake pauses again
        (7.2 would wait forever) after recording the error.

        @param data: what arrived.
        """
        if self.migration.machine.status != S.POSTCOPY_RECOVER:
            super().dataReceived(data)
            return
        try:
            self.returnPath.receiveData(data)
        except PostcopyError as error:
            log.error("postcopy recovery: {error}", error=error)
            self.migration.stats.error = str(error)
            self.transport.abortConnection()

    def _resumed(self) -> None:
        """
        RESUME_ACK: pages flow again.
        """
        self._schedule(0)


class RecoverySourceFactory(SourceFactory):
    """
    Builds the L{RecoverySourceProtocol} of a resumed migration.
    """

    protocol = RecoverySourceProtocol


def resumeOutgoing(reactor: Any, migration: Any, uri: str, tls: Any = None) -> Deferred:
    """
    C{migrate} with C{resume}: connect; a failed connect leaves the
    migration paused (retry later), as in QEMU.

    @param reactor: the reactor.
    @param migration: the outgoing migration, or L{None}.
    @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
    @param tls: the source's L{twisted_postcopy.tlscreds.TLSPolicy}, or
        None for plaintext.
    @return: the connect Deferred (never fails).
    @raise MigrationError: no paused migration, bad URI.
    """
    checkResume(migration)
    endpoint = clientEndpoint(reactor, uri)

    def failed(reason: Any) -> None:
        """
        @param reason: the connect failure.
        """
        cancelled = reason.check(ConnectingCancelledError) is not None
        message = "timed out (cancelled)" if cancelled else reason.getErrorMessage()
        migration.stats.error = f"Failed to connect to '{uri}': {message}"
        log.error("{error}", error=migration.stats.error)

    connectPreempt = preemptConnector(reactor, uri, endpoint, tls, migration) if migration.preemptWanted else None
    factory = RecoverySourceFactory(migration, reactor, connectPreempt)
    return connectMaybeTLS(endpoint, tls, factory).addErrback(failed)


class RecoveryStreamReader(IncomingStreamReader):
    """
    The destination's recovery main channel: no header; RECV_BITMAP and
    POSTCOPY_RESUME go to the handshake.
    """

    def __init__(self, incoming: Any, resume: DestinationResume) -> None:
        """
        @param incoming: the incoming migration.
        @param resume: the handshake.
        """
        super().__init__(incoming)
        blocks = [e.RAMBlockInfo(idstr, block.length) for idstr, block in incoming.placer.blocks.items()]
        # SECTION_PARTs after a recovery carry 7.2's RAM section id without
        # a new SECTION_START.
        self.decoder = StreamDecoder(header=False, blocks=blocks, ramSectionId=RAM_SECTION_ID)
        self._calls[e.RecvBitmapRequested] = lambda ev: resume.recvBitmap(ev.block)
        self._calls[e.ResumeReceived] = lambda ev: resume.resume()


class RecoveryDestinationProtocol(DestinationProtocol):
    """
    The destination's new main connection of a paused migration.

    @ivar driver: the recovery stream reader, once this connection took
        over (L{None} for a dropped extra connection).
    @ivar tookOver: called once this connection took over as the main
        channel (its factory then awaits the new preempt channel).
    """

    def __init__(self, incoming: Any, tookOver: Callable[[], object] = lambda: None,
                 watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param incoming: the paused incoming migration.
        @param tookOver: see L{tookOver}.
        @param watch: starts the connection's dead-link check.
        """
        Protocol.__init__(self)
        self.incoming = incoming
        self.tookOver = tookOver
        self.watch = watch
        self.driver: Any = None
        self.watchdog: Any = None

    def connectionMade(self) -> None:
        """
        Enter C{postcopy-recover}, or drop the connection when the
        migration is not paused (QEMU ignores extra connections).
        """
        if self.incoming.machine.status.status != S.POSTCOPY_PAUSED:
            log.warn("Extra incoming migration connection; ignoring")
            self.transport.abortConnection()
            return
        sendAtOnce(self.transport)
        readInLargeChunks(self.transport)
        resume = DestinationResume(self.incoming, self)
        self.driver = RecoveryStreamReader(self.incoming, resume)
        self.watchdog = self.watch(self.transport)
        self.incoming.machine.status.observers.append(self._endWatch)
        self.tookOver()
        resume.start()

    def received(self, data: bytes | memoryview, borrowed: bool) -> None:
        """
        Main-stream bytes (only once this connection was accepted).

        @param data: what arrived.
        @param borrowed: see L{DestinationProtocol.received}.
        """
        if self.incoming.channel is self:
            super().received(data, borrowed)

    def connectionLost(self, reason: Any) -> None:
        """
        A connection that never took over changes nothing.

        @param reason: why.
        """
        if self.driver is not None:
            super().connectionLost(reason)


class RecoveryDestinationFactory(Factory):
    """
    Builds a L{RecoveryDestinationProtocol} per connection; with
    C{postcopy-preempt}, the connection after a new main one is the new
    preempt channel (return-path-preempt-recovery.md section 4.7: a 7.2
    source connects main, then preempt, and waits for both).  As for the
    first connections (L{DestinationFactory}), the roles are told apart
    by content while paused with C{postcopy-preempt} on (under TLS the
    preempt channel's handshake may complete first): a recovery main
    channel starts with a command (RECV_BITMAP), the preempt channel is
    silent until the migration resumed.

    @ivar incoming: the incoming migration.
    @ivar preempt: returns whether the C{postcopy-preempt} capability is on.
    @ivar awaitingPreempt: a new main connection took over and its preempt
        channel has not come yet.
    @ivar preemptChannels: the preempt channels accepted here.
    @ivar pendingChannels: connections waiting for their role (at most
        two), in the order they were made.
    """

    def __init__(self, incoming: Any, preempt: Callable[[], bool] = lambda: False,
                 watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param incoming: the incoming migration.
        @param preempt: see L{preempt}.
        @param watch: starts each connection's dead-link check
            (L{twisted_postcopy.protocols.deadlink.linkWatch}).
        """
        self.incoming = incoming
        self.preempt = preempt
        self.watch = watch
        self.awaitingPreempt = False
        self.preemptChannels: list[PreemptDestinationProtocol] = []
        self.pendingChannels: list[ChannelSorter] = []

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        @param addr: the peer.
        @return: the new preempt channel, or a recovery protocol (it drops
            itself unless paused), or while paused with C{postcopy-preempt}
            a L{ChannelSorter} until the new main channel is known (None
            beyond two of them).
        """
        if self.awaitingPreempt:
            self.awaitingPreempt = False
            channel = PreemptDestinationProtocol(self.incoming, self.watch)
            self.preemptChannels.append(channel)
            return channel
        if self.preempt() and self.incoming.machine.status.status == S.POSTCOPY_PAUSED:
            if len(self.pendingChannels) >= 2:
                return None
            return ChannelSorter(self, addr, _RECOVERY_PREFIX)
        return self._buildMain()

    def _buildMain(self) -> RecoveryDestinationProtocol:
        """
        @return: a recovery main channel's protocol.
        """
        return RecoveryDestinationProtocol(self.incoming, self._mainTookOver, self.watch)

    def _mainTookOver(self) -> None:
        """
        A new main channel took over: with C{postcopy-preempt} the next
        connection is its preempt channel.
        """
        if self.preempt():
            self.awaitingPreempt = True

    def sortChannel(self, sorter: ChannelSorter, isMain: bool) -> None:
        """
        A waiting connection's first bytes arrived: a command makes it the
        new main channel (and another waiting connection its preempt
        channel); so does anything else on the first waiting connection
        (its decoder reports it); other bytes on a later one drop it.

        @param sorter: the connection.
        @param isMain: whether its first byte is a command.
        """
        pending = self.pendingChannels
        first = pending[0] is sorter
        pending.remove(sorter)
        if not (isMain or first):
            sorter.become(None)
            return
        sorter.become(self._buildMain())
        for other in list(pending):
            pending.remove(other)
            other.become(self.buildProtocol(other.addr))

    def closePreempt(self, others: list[Any]) -> None:
        """
        The migration paused: drop every preempt channel (the source opens
        a new one after its new main connection), without reporting their
        missing EOS.

        @param others: preempt channels accepted elsewhere (the original).
        """
        self.awaitingPreempt = False
        for channel in [*others, *self.preemptChannels]:
            channel.ended.addErrback(lambda failure: None)
            transport = channel.transport
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()


class RecoveryListener:
    """
    The destination's recovery connections: the C{migrate-recover}
    listener (closed when the migration ends).  Unlike QEMU, the original
    C{migrate-incoming} listener is released once loading started, so a
    recovery always needs C{migrate-recover}.

    @ivar reactor: the reactor.
    @ivar incoming: the incoming migration.
    @ivar emit: publishes a status event (C{migrate-recover} emits
        C{setup} without changing the status).
    @ivar port: the current recovery listening port, if any.
    @ivar factory: builds the recovery protocols.
    @ivar tls: the destination's L{twisted_postcopy.tlscreds.TLSPolicy}
        for recovery connections, or None for plaintext.
    @ivar refused: reports a refused TLS handshake, if set.
    """

    def __init__(self, reactor: Any, incoming: Any, emit: Callable[[S], object], tls: Any = None,
                 refused: Callable[[Any], object] | None = None,
                 preemptEnabled: Callable[[], bool] = lambda: False,
                 watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param reactor: the reactor.
        @param incoming: the incoming migration.
        @param emit: the manager's event publisher.
        @param tls: see L{tls}.
        @param refused: see L{refused}.
        @param preemptEnabled: returns whether C{postcopy-preempt} is on
            (a new preempt channel then follows each new main connection).
        @param watch: starts each connection's dead-link check.
        """
        self.reactor = reactor
        self.incoming = incoming
        self.emit = emit
        self.port: Any = None
        self.factory = RecoveryDestinationFactory(incoming, preemptEnabled, watch)
        self.tls = tls
        self.refused = refused
        incoming.machine.status.observers.append(self._statusChanged)

    def _statusChanged(self, status: S) -> None:
        """
        At the end stop listening.

        @param status: the new status.
        """
        if status in FINISHED:
            self.close()

    def _listen(self, endpoint: Any) -> Deferred:
        """
        @param endpoint: a server endpoint.
        @return: a Deferred firing with the listening port (remembered).
        """

        def listened(port: Any) -> Any:
            """
            @param port: the new listening port.
            @return: it.
            """
            self.port = port
            return port

        return endpoint.listen(wrapServer(self.tls, self.factory, self.refused)).addCallback(listened)

    def recover(self, uri: str) -> Deferred:
        """
        C{migrate-recover}: replace the recovery listener.

        @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
        @return: a Deferred firing with the listening port.
        @raise MigrationError: not paused, bad URI.
        """
        checkRecover(self.incoming)
        endpoint = serverEndpoint(self.reactor, uri)
        self.close()
        self.emit(S.SETUP)
        return self._listen(endpoint)

    def listenAgain(self, uri: str) -> Deferred:
        """
        Automatic recovery (L{twisted_postcopy.autorecover}): listen on
        C{uri}, with no C{setup} event.

        @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
        @return: a Deferred firing with the listening port.
        """
        return self._listen(serverEndpoint(self.reactor, uri))

    def close(self) -> None:
        """
        Stop the recovery listener, if any.
        """
        if self.port is not None:
            self.port.stopListening()
            self.port = None


def migratePause(migration: Any) -> None:
    """
    C{migrate-pause}: shut the main connection down; both sides then pause
    as on a network failure.

    @param migration: the outgoing or incoming migration, or L{None}.
    @raise MigrationError: not in C{postcopy-active} (QEMU's text).
    """
    machine = getattr(migration, "machine", None)
    status = getattr(machine, "status", None)
    status = getattr(status, "status", status)
    if status != S.POSTCOPY_ACTIVE:
        raise MigrationError("migrate-pause is currently only supported during postcopy-active state")
    channel = getattr(migration, "channel", None) if isinstance(migration, IncomingMigration) else None
    transport = currentTransport(migration) if channel is None else channel.transport
    transportSocket(transport).shutdown(socket.SHUT_RDWR)
