# -*- test-case-name: tests.test_preempt_protocols -*-
"""
The postcopy preempt channel's connections (capability
C{postcopy-preempt}, return-path-preempt-recovery.md section 3): a second
connection to the same address, source to destination only, carrying the
requested ("urgent") pages as raw RAM records up to one EOS record.

The protocols only move bytes: the source side encodes with
L{PreemptEncoder}, the destination side decodes with L{PreemptDecoder} and
hands the pages to the incoming migration (C{page}, C{zero}, C{flush}),
which places them through the same placer and fault service as the main
channel's pages.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_postcopy.errors import LimitExceededError, RemoteProtocolError
from twisted_postcopy.protocols.deadlink import (
    DEFAULT_LINK_TIMEOUT_MS, LINK_TIMEOUT, lostReason, noLinkWatch, stopWatching, watchLink)
from twisted_postcopy.protocols.receive import PreallocatedReceiver
from twisted_postcopy.protocols.sockets import GatheredWriter
from twisted_postcopy.protocols.tls import connectMaybeTLS
from twisted_postcopy.source.outgoing import PreemptPhase
from twisted_postcopy.state import MigrationStatus as S
from twisted_postcopy.wire.constants import DEFAULT_MAX_PREEMPT_HELD, TARGET_PAGE_SIZE
from twisted_postcopy.wire.events import PageReceived, RAMBlockInfo, RAMSectionEOS, ZeroPageReceived
from twisted_postcopy.wire.preempt import PreemptDecoder, PreemptEncoder

_log = Logger()


class PreemptSourceProtocol(Protocol):
    """
    The source's end of the preempt channel: writes one whole host page
    per request, at once, naming its block in every record.

    Attached to an outgoing migration (C{migration}), it is the channel
    the engine writes urgent pages and the final EOS to
    (L{writeBuffers}); it closes itself when the migration pauses or ends,
    and tells the migration when it breaks.

    @ivar migration: the outgoing migration, or L{None} (a bare channel).
    @ivar encoder: the channel's record encoder (for L{sendHostPage}).
    @ivar recordsSent: RAM records written by L{sendHostPage}.
    @ivar bytesSent: bytes written.
    @ivar ended: whether EOS was written.
    @ivar writer: sends urgent pages at once (C{sendmsg} from guest
        memory, no reactor turn) while the transport holds nothing
        (L{GatheredWriter}), once connected.
    """

    def __init__(self, migration: Any = None, reactor: Any = None) -> None:
        """
        @param migration: the outgoing migration this channel serves.
        @param reactor: watches the link for a silent cut once attached
            (L{twisted_postcopy.protocols.deadlink}), or L{None}.
        """
        self.migration = migration
        self.reactor = reactor
        self.watchdog: Any = None
        self.encoder = PreemptEncoder()
        self.recordsSent = 0
        self.bytesSent = 0
        self.ended = False
        self.writer: GatheredWriter | None = None

    def connectionMade(self) -> None:
        """
        Tell the factory (if a L{PreemptSourceFactory}) the channel is up.
        """
        self.writer = GatheredWriter(self.transport)
        factory = getattr(self, "factory", None)
        if isinstance(factory, PreemptSourceFactory) and not factory.connected.called:
            factory.connected.callback(self)

    def attach(self) -> bool:
        """
        Become the migration's preempt channel, unless the migration ended
        or paused while this connection was being made.

        @return: whether attached (else the connection is dropped).
        """
        migration = self.migration
        if migration.preemptPhase is not PreemptPhase.CONNECTING or not migration.machine.inProgress:
            self.transport.abortConnection()
            return False
        migration.machine.observers.append(self._statusChanged)
        if self.reactor is not None:
            self.watchdog = watchLink(self.reactor, self.transport, lambda: migration.parameters.get(
                LINK_TIMEOUT, DEFAULT_LINK_TIMEOUT_MS))
        migration.preemptConnected(self.writeBuffers)
        return True

    def _current(self) -> bool:
        """
        @return: whether the migration writes to this channel.
        """
        return self.migration is not None and self.migration.writePreempt == self.writeBuffers

    def _statusChanged(self, status: S) -> None:
        """
        Close with the migration: abort when it pauses (the recovery makes
        a new channel) or fails, close cleanly once it completed.

        @param status: the migration's new status.
        """
        if status in (S.POSTCOPY_PAUSED, S.FAILED, S.CANCELLED, S.CANCELLING):
            self.migration.machine.observers.remove(self._statusChanged)
            stopWatching(self.watchdog)
            self.transport.abortConnection()
        elif status == S.COMPLETED:
            self.migration.machine.observers.remove(self._statusChanged)
            stopWatching(self.watchdog)
            self.transport.loseConnection()

    def writeBuffers(self, buffers: list[Any]) -> None:
        """
        Write gathered records at once (the engine's urgent pages, or EOS).

        @param buffers: bytes and views of guest RAM, in order.
        """
        self.bytesSent += sum(map(len, buffers))
        if self.writer is None:
            self.transport.write(b"".join(buffers))
            return
        self.writer.writeBuffers(buffers)

    def sendHostPage(self, block: str, offset: int, data: bytes | memoryview,
                     targetPageSize: int = TARGET_PAGE_SIZE) -> None:
        """
        Write one host page as target-page records, flushed at once.

        @param block: the RAMBlock idstr.
        @param offset: the host page's byte offset in the block.
        @param data: the whole host page's bytes.
        @param targetPageSize: the target page size.
        """
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        for start in range(0, len(view), targetPageSize):
            pieces.extend(self.encoder.page(block, offset + start, view[start:start + targetPageSize]))
            self.recordsSent += 1
        self.writeBuffers(pieces)

    def sendEOS(self) -> None:
        """
        End the channel: one EOS record (after the main channel's END/EOF).
        """
        if not self.ended:
            self.ended = True
            self.writeBuffers([self.encoder.eos()])

    def dataReceived(self, data: bytes) -> None:
        """
        The channel is one-way: bytes from the destination are a protocol error.

        @param data: the unexpected bytes.
        """
        _log.warn("preempt channel: {count} unexpected byte(s) from the destination", count=len(data))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        """
        A channel that breaks while the migration still writes to it is
        a channel failure (in postcopy the migration pauses).

        @param reason: why.
        """
        stopWatching(self.watchdog)
        if self._current():
            why = lostReason(self.watchdog, reason)
            self.migration.preemptFailed(f"preempt channel lost: {why}")


class PreemptSourceFactory(Factory):
    """
    Builds the source's L{PreemptSourceProtocol}; C{connected} fires with
    it once the connection is made.

    @ivar migration: the outgoing migration the channel serves, or L{None}.
    @ivar connected: fires with the protocol when it is connected.
    """

    protocol = PreemptSourceProtocol

    def __init__(self, migration: Any = None, reactor: Any = None) -> None:
        """
        @param migration: the outgoing migration the channel serves.
        @param reactor: watches the channel's link (see
            L{PreemptSourceProtocol}), or L{None}.
        """
        self.migration = migration
        self.reactor = reactor
        self.connected: Deferred = Deferred()

    def buildProtocol(self, addr: Any) -> Protocol:
        """
        @param addr: the peer.
        @return: the protocol (C{connected} fires when it is connected).
        """
        protocol = PreemptSourceProtocol(self.migration, self.reactor)
        protocol.factory = self
        return protocol


def preemptConnector(reactor: Any, uri: str, endpoint: Any, tls: Any, migration: Any) -> Callable[[], Deferred]:
    """
    How an outgoing migration connects its preempt channel: to the main
    channel's address, over TLS when the main channel is (QEMU's
    C{postcopy_preempt_setup}, run after each new main connection).

    @param reactor: the reactor.
    @param uri: the migration URI (C{tcp:} or C{unix:}), for messages.
    @param endpoint: the client endpoint of C{uri} (the main channel's;
        connected once more for each preempt channel).
    @param tls: the source's L{twisted_postcopy.tlscreds.TLSPolicy}, or
        L{None} for plaintext.
    @param migration: the outgoing migration.
    @return: a callable starting one connect; its Deferred fires with the
        attached protocol, or with L{None} when the connect failed (the
        migration was told through C{preemptFailed}).
    """
    def connect() -> Deferred:
        """
        @return: see L{preemptConnector}.
        """
        migration.preemptConnecting()

        def connected(protocol: PreemptSourceProtocol) -> PreemptSourceProtocol | None:
            """
            @param protocol: the connected channel.
            @return: it, once attached, or L{None}.
            """
            return protocol if protocol.attach() else None

        def failed(reason: Failure) -> None:
            """
            @param reason: the connect (or TLS) failure.
            """
            message = f"Failed to connect to '{uri}': {reason.getErrorMessage()}"
            _log.error("postcopy preempt channel: {message}", message=message)
            if migration.preemptPhase is PreemptPhase.CONNECTING:
                migration.preemptFailed(message)

        connecting = connectMaybeTLS(endpoint, tls, PreemptSourceFactory(migration, reactor))
        return connecting.addCallbacks(connected, failed)

    return connect


#: The preempt channel's receive buffer (Twisted's default read size):
#: it carries requested host pages only.
PREEMPT_RECEIVE_CHUNK = 1 << 16


class PreemptDestinationProtocol(PreallocatedReceiver, Protocol):
    """
    The destination's end of the preempt channel: decodes RAM records and
    hands them to the incoming migration, until EOS.  Over a port of
    L{twisted_postcopy.protocols.receive} it reads with C{recv_into} into
    one preallocated buffer of L{PREEMPT_RECEIVE_CHUNK} bytes.

    Bytes arriving before the block list is known are held (a 7.2 source
    only writes here in postcopy, after RAM START).

    @ivar incoming: the incoming migration (C{placer} with C{blocks},
        C{page}, C{zero}, C{flush}, C{failed}).
    @ivar decoder: the channel decoder, once the blocks are known.
    @ivar held: bytes received before the decoder existed.
    @ivar heldBytes: their length, at most C{maxHeld} (max-preempt-held).
    @ivar recordsReceived: RAM records received.
    @ivar bytesReceived: bytes received.
    @ivar ended: fires with None at EOS, or fails if the channel breaks
        before its EOS.  A channel closed without a byte while the incoming
        migration (its C{machine}) never entered postcopy is how a QEMU 7.2
        source ends it after a migration that completed in precopy: that
        fires C{ended} with None too.
    """

    receiveSize = PREEMPT_RECEIVE_CHUNK

    def __init__(self, incoming: Any, watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param incoming: the incoming migration.
        @param watch: starts the channel's dead-link check
            (L{twisted_postcopy.protocols.deadlink.linkWatch}).
        """
        self.incoming = incoming
        self.watch = watch
        self.decoder: PreemptDecoder | None = None
        self.held: list[bytes] = []
        self.heldBytes = 0
        self.maxHeld = DEFAULT_MAX_PREEMPT_HELD
        self.recordsReceived = 0
        self.bytesReceived = 0
        self.ended: Deferred = Deferred()
        self.watchdog: Any = None

    def connectionMade(self) -> None:
        """
        Tell the incoming migration its EOS is now awaited; watch the
        channel for a dead link (L{twisted_postcopy.protocols.deadlink}).
        """
        self.incoming.preemptOpened()
        self.watchdog = self.watch(self.transport)

    def _decoder(self) -> PreemptDecoder | None:
        """
        @return: the decoder, made from the placer's blocks once known.
        """
        if self.decoder is None:
            placer = getattr(self.incoming, "placer", None)
            if placer is None:
                return None
            blocks = [RAMBlockInfo(name, block.length) for name, block in placer.blocks.items()]
            self.decoder = PreemptDecoder(blocks)
        return self.decoder

    def received(self, data: bytes | memoryview, borrowed: bool) -> None:
        """
        Decode and place what arrived (held until the block list is known).

        @param data: bytes from the source.
        @param borrowed: whether C{data} is the receive buffer's, to be read
            into again once this returns.
        """
        self.bytesReceived += len(data)
        decoder = self._decoder()
        if decoder is None:
            if self.heldBytes + len(data) > self.maxHeld:
                self.held = []
                self._fail(LimitExceededError(
                    f"more than {self.maxHeld} bytes on the preempt channel before the RAM block list",
                    self.heldBytes, "max-preempt-held"))
                return
            self.heldBytes += len(data)
            self.held.append(bytes(data))
            return
        held, self.held, self.heldBytes = self.held, [], 0
        try:
            for chunk in held:
                decoder.receiveData(chunk)
            (decoder.receiveBorrowed if borrowed else decoder.receiveData)(data)
            try:
                self._consume(decoder)
            finally:
                decoder.releaseBorrowed()
        except RemoteProtocolError as e:
            self._fail(e)

    def _consume(self, decoder: PreemptDecoder) -> None:
        """
        Hand each decoded record to the incoming migration, then flush.

        @param decoder: the channel decoder.
        """
        incoming = self.incoming
        for event in decoder.events():
            kind = event.__class__
            if kind is PageReceived:
                incoming.page(event.block, event.offset, event.data, 1)
            elif kind is ZeroPageReceived:
                incoming.zero(event.block, event.offset, event.fill, 1)
            else:
                continue
            self.recordsReceived += 1
        self.incoming.flush()
        if decoder.complete and not self.ended.called:
            stopWatching(self.watchdog)
            self.incoming.preemptEnded()
            self.ended.callback(None)

    def _fail(self, reason: RemoteProtocolError) -> None:
        """
        Bad input: fail the incoming migration and drop the channel.

        @param reason: the decoding error.
        """
        _log.warn("preempt channel: bad input: {reason}", reason=reason)
        self.incoming.failed(reason)
        if not self.ended.called:
            self.ended.errback(reason)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        """
        The channel closed: without its EOS that is an error for C{ended},
        unless it was never used (see L{ended}), and the incoming
        migration is told (C{preemptLost}): while postcopy runs it pauses,
        and this protocol then shuts the main channel too, so that the
        source pauses as well.

        @param reason: why.
        """
        stopWatching(self.watchdog)
        if self.ended.called:
            return
        machine = getattr(self.incoming, "machine", None)
        if not self.bytesReceived and machine is not None and not machine.inPostcopy:
            _log.info("preempt channel closed unused: the migration did not enter postcopy")
            self.ended.callback(None)
            return
        why = lostReason(self.watchdog, reason)
        error = RemoteProtocolError(f"preempt channel closed before its EOS record: {why}")
        main = self.incoming.channel
        if self.incoming.preemptLost(error) and main is not None:
            main.transport.abortConnection()
        self.ended.errback(error)


class PreemptDestinationFactory(Factory):
    """
    Builds the destination's L{PreemptDestinationProtocol}.

    @ivar incoming: the incoming migration.
    @ivar watch: starts the channel's dead-link check.
    @ivar preempt: the protocol, once accepted.
    @ivar accepted: fires with it when it connects.
    """

    def __init__(self, incoming: Any, watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param incoming: the incoming migration.
        @param watch: see L{watch}.
        """
        self.incoming = incoming
        self.watch = watch
        self.preempt: PreemptDestinationProtocol | None = None
        self.accepted: Deferred = Deferred()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        @param addr: the peer.
        @return: the preempt protocol, or None (logged) for a later one.
        """
        if self.preempt is not None:
            _log.info("Extra incoming migration connection; ignoring")
            return None
        self.preempt = PreemptDestinationProtocol(self.incoming, self.watch)
        self.accepted.callback(self.preempt)
        return self.preempt
