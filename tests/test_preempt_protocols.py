# -*- test-case-name: tests.test_preempt_protocols -*-
"""
Tests for L{twisted_postcopy.protocols.preempt}: the preempt channel's
protocols over real loopback TCP, pages placed by a real L{PagePlacer}.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from twisted_postcopy.destination.machine import IncomingMachine
from twisted_postcopy.destination.placer import PagePlacer
from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.protocols.preempt import (
    PreemptDestinationFactory,
    PreemptSourceFactory,
)
from twisted_postcopy.wire.events import RAMBlockInfo
from twisted_postcopy.wire.preempt import PreemptDecoder

PAGE = 4096
LENGTH = 64 * PAGE


@define
class MemoryBlock:
    """
    A RAMBlock in a bytearray (precopy-style writes only).

    @ivar length: its length.
    @ivar pageSize: its page size.
    @ivar memory: its bytes.
    """

    length: int = LENGTH
    pageSize: int = PAGE
    memory: bytearray = field(factory=lambda: bytearray(LENGTH))

    def write(self, offset: int, data: bytes | bytearray) -> None:
        """
        @param offset: byte offset.
        @param data: the bytes.
        """
        self.memory[offset:offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        """
        @param offset: byte offset.
        @param length: byte length.
        """
        self.memory[offset:offset + length] = bytes(length)


@define
class PlacingIncoming:
    """
    The part of L{IncomingMigration} the preempt protocol uses, placing
    through a real L{PagePlacer}.

    @ivar placer: the placer, or None before the block list.
    @ivar failures: what C{failed} was given.
    @ivar machine: its state machine, or None.
    """

    placer: PagePlacer | None = None
    failures: list[BaseException] = field(factory=list)
    machine: IncomingMachine | None = None
    channel: Any = None
    preemptEvents: list[str] = field(factory=list)

    def preemptOpened(self) -> None:
        """
        The channel was accepted.
        """
        self.preemptEvents.append("opened")

    def preemptEnded(self) -> None:
        """
        Its EOS arrived.
        """
        self.preemptEvents.append("ended")

    def preemptLost(self, reason: BaseException) -> bool:
        """
        It broke before its EOS.

        @param reason: why.
        @return: L{False}: nothing paused here.
        """
        self.preemptEvents.append("lost")
        return False

    def page(self, idstr: str, offset: int, data: Any, channel: int = 0) -> None:
        """
        @param idstr: block.
        @param offset: offset.
        @param data: page.
        @param channel: the channel.
        """
        self.placer.page(idstr, offset, data, channel)

    def zero(self, idstr: str, offset: int, fill: int, channel: int = 0) -> None:
        """
        @param idstr: block.
        @param offset: offset.
        @param fill: fill byte.
        @param channel: the channel.
        """
        self.placer.zero(idstr, offset, fill, PAGE, channel)

    def flush(self) -> None:
        """
        Flush the placer.
        """
        self.placer.flush()

    def failed(self, reason: BaseException) -> None:
        """
        @param reason: why.
        """
        self.failures.append(reason)


def pattern(index: int) -> bytes:
    """
    @param index: a page number.
    @return: a recognisable page.
    """
    return bytes([index % 251 + 1]) * PAGE


def whenLost(protocol: Any) -> Deferred:
    """
    @param protocol: a connected protocol.
    @return: a Deferred firing once its C{connectionLost} ran.
    """
    lost: Deferred = Deferred()
    original = protocol.connectionLost

    def connectionLost(reason: Any) -> None:
        original(reason)
        lost.callback(None)

    protocol.connectionLost = connectionLost
    return lost


class PreemptChannelTests(TestCase):
    """
    A source preempt protocol talks to a destination one over loopback TCP.
    """

    @inlineCallbacks
    def connectPair(self, incoming: PlacingIncoming) -> Any:
        """
        Listen with a L{PreemptDestinationFactory}, connect a source.

        @param incoming: the destination's incoming migration.
        @return: a Deferred firing with (source protocol, destination factory).
        """
        from twisted.internet import reactor

        destination = PreemptDestinationFactory(incoming)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(destination)
        self.addCleanup(port.stopListening)
        source = PreemptSourceFactory()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        protocol = yield endpoint.connect(source)
        sourceLost = whenLost(protocol)
        connected = yield source.connected
        self.assertIs(connected, protocol)
        accepted = yield destination.accepted
        destinationLost = whenLost(accepted)

        def close() -> Deferred:
            """
            Close both ends and wait until both saw it, so that nothing
            of this test (such as C{ended} failing when a channel that
            never sent its EOS closes) happens during a later one.  A
            test that did not wait for C{ended} does not care how it ended.

            @return: a Deferred firing once both ends are closed.
            """
            protocol.transport.loseConnection()
            accepted.transport.loseConnection()
            accepted.ended.addErrback(lambda failure: failure.trap(RemoteProtocolError))
            return gatherResults([sourceLost, destinationLost, accepted.ended])

        self.addCleanup(close)
        return protocol, destination

    @inlineCallbacks
    def test_pagesThenEOS(self) -> None:
        """
        Host pages written on the source are placed on the destination;
        EOS fires C{ended}; the counts agree.
        """
        block = MemoryBlock()
        incoming = PlacingIncoming(PagePlacer({"pc.ram": block}))
        source, destination = yield self.connectPair(incoming)
        for index in (5, 0, 63, 17):
            source.sendHostPage("pc.ram", index * PAGE, pattern(index))
        source.sendEOS()
        yield destination.preempt.ended
        for index in (5, 0, 63, 17):
            self.assertEqual(bytes(block.memory[index * PAGE:(index + 1) * PAGE]), pattern(index))
        self.assertEqual(bytes(block.memory[PAGE:2 * PAGE]), bytes(PAGE))
        self.assertEqual((source.recordsSent, destination.preempt.recordsReceived), (4, 4))
        self.assertEqual(incoming.failures, [])

    @inlineCallbacks
    def test_heldUntilBlocksKnown(self) -> None:
        """
        Records arriving before the block list are held, then placed with
        the next bytes once the placer exists.
        """
        block = MemoryBlock()
        incoming = PlacingIncoming()
        source, destination = yield self.connectPair(incoming)
        arrived: Deferred = Deferred()
        preempt = destination.preempt
        original = preempt.dataReceived

        def received(data: bytes) -> None:
            original(data)
            if not arrived.called:
                arrived.callback(None)

        preempt.dataReceived = received
        source.sendHostPage("pc.ram", 3 * PAGE, pattern(3))
        yield arrived
        self.assertTrue(preempt.held)
        incoming.placer = PagePlacer({"pc.ram": block})
        source.sendEOS()
        yield preempt.ended
        self.assertEqual(bytes(block.memory[3 * PAGE:4 * PAGE]), pattern(3))

    @inlineCallbacks
    def test_unknownBlockFails(self) -> None:
        """
        A record naming an unknown block fails the incoming migration and
        C{ended}, and the channel is dropped.
        """
        incoming = PlacingIncoming(PagePlacer({"pc.ram": MemoryBlock()}))
        source, destination = yield self.connectPair(incoming)
        source.sendHostPage("nope", 0, pattern(0))
        with self.assertRaises(RemoteProtocolError):
            yield destination.preempt.ended
        self.assertEqual(len(incoming.failures), 1)

    @inlineCallbacks
    def test_closedBeforeEOS(self) -> None:
        """
        A channel closed without EOS fails C{ended} with a specific error.
        """
        incoming = PlacingIncoming(PagePlacer({"pc.ram": MemoryBlock()}))
        source, destination = yield self.connectPair(incoming)
        source.transport.loseConnection()
        with self.assertRaises(RemoteProtocolError):
            yield destination.preempt.ended

    @inlineCallbacks
    def test_thirdConnectionDropped(self) -> None:
        """
        A second connection to the preempt factory (a third migration
        connection) is refused.
        """
        incoming = PlacingIncoming(PagePlacer({"pc.ram": MemoryBlock()}))
        _, destination = yield self.connectPair(incoming)
        first = destination.preempt
        self.assertIsNone(destination.buildProtocol(None))
        self.assertIs(destination.preempt, first)


class PreemptUnusedTests(TestCase):
    """
    A preempt channel closed without a byte.
    """

    def closedUnused(self, machine: IncomingMachine) -> Deferred:
        """
        @param machine: the incoming migration's state machine.
        @return: C{ended} of a destination channel closed without a byte.
        """
        incoming = PlacingIncoming(PagePlacer({"pc.ram": MemoryBlock()}))
        incoming.machine = machine
        protocol = PreemptDestinationFactory(incoming).buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionDone()))
        return protocol.ended

    def test_precopyOnly(self) -> None:
        """
        Before postcopy (QEMU 7.2 opens the channel at the start of every
        migration and closes it empty when it completed in precopy),
        C{ended} fires with None: nothing is left failing unobserved.
        """
        self.assertIsNone(self.successResultOf(self.closedUnused(IncomingMachine())))

    def test_inPostcopy(self) -> None:
        """
        Once LISTEN was processed, an empty close is still an error.
        """
        machine = IncomingMachine()
        machine.setup()
        machine.loadingStarted()
        machine.advise()
        machine.listen()
        self.failureResultOf(self.closedUnused(machine), RemoteProtocolError)


class PreemptEncodingTests(TestCase):
    """
    The source protocol's bytes.
    """

    def test_everyRecordNamesItsBlock(self) -> None:
        """
        Every record of a host page names its block (no CONTINUE), one
        record per target page, as QEMU 7.2 writes them.
        """
        written: list[bytes] = []

        class Transport:
            def write(self, data: bytes) -> None:
                written.append(data)

        factory = PreemptSourceFactory()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(Transport())
        protocol.sendHostPage("pc.ram", 0x200000, bytes(range(256)) * 32, PAGE)
        protocol.sendEOS()
        protocol.sendEOS()
        data = b"".join(written)
        self.assertEqual(len(data), 2 * (8 + 1 + 6 + PAGE) + 8)
        self.assertEqual(data[:15], bytes.fromhex("0000000000200008 06") + b"pc.ram")
        self.assertEqual(data[-8:], bytes.fromhex("0000000000000010"))
        events = PreemptDecoder([RAMBlockInfo("pc.ram", 0x400000)]).decodeWhole(data)
        self.assertEqual([getattr(e, "continued", None) for e in events], [False, False, None])
        self.assertTrue(factory.connected.called)
