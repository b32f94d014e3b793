# -*- test-case-name: tests.test_destination_preempt -*-
"""
Tests for the destination's preempt channel ordering and failures
(L{twisted_postcopy.destination.incoming}, L{twisted_postcopy.destination.machine},
L{twisted_postcopy.protocols.preempt}, L{twisted_postcopy.protocols.stream}):
a postcopy migration with C{postcopy-preempt} completes only after the
preempt channel's EOS and its pages were placed, as QEMU 7.2's listen
thread joins its preempt thread; a preempt channel that breaks while
postcopy runs pauses the migration like a broken main channel.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.destination.machine import IncomingMachine, PreemptChannelState
from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.protocols.preempt import PreemptDestinationProtocol
from twisted_postcopy.protocols.stream import DestinationProtocol
from twisted_postcopy.state import MigrationStatus as S
from twisted_postcopy.testing.enginevm import PAGE, IncomingTestVM
from twisted_postcopy.wire import ReturnPathEncoder
from twisted_postcopy.wire.preempt import PreemptEncoder

SHUT_0 = ReturnPathEncoder().shut(0)


class _Faults:
    """
    A unit-test stand-in for the fault service (the production one needs
    a userfaultfd): it records placements and counts the wanted pages not
    placed yet.

    @ivar wanted: (idstr, offset) of pages a guest waits for.
    @ivar placed: (idstr, offset, length) placed.
    @ivar stopped: whether L{stop} ran.
    """

    def __init__(self) -> None:
        """
        Nothing wanted or placed.
        """
        self.wanted: set[tuple[str, int]] = set()
        self.placed: list[tuple[str, int, int]] = []
        self.stopped = False

    def placePages(self, idstr: str, offset: int, data: Any) -> None:
        """
        @param idstr: the block.
        @param offset: the run's offset.
        @param data: the run.
        """
        self.placed.append((idstr, offset, len(data)))
        for start in range(offset, offset + len(data), PAGE):
            self.wanted.discard((idstr, start))

    def placeZero(self, idstr: str, offset: int, length: int) -> None:
        """
        @param idstr: the block.
        @param offset: the offset.
        @param length: the length.
        """
        self.placePages(idstr, offset, bytes(length))

    def fillHoles(self) -> None:
        """
        No precopy holes here.
        """

    def missingPages(self) -> int:
        """
        @return: wanted pages not placed.
        """
        return len(self.wanted)

    def fillUnsent(self) -> int:
        """
        Place a zero page over every wanted page.

        @return: how many.
        """
        wanted = sorted(self.wanted)
        for idstr, offset in wanted:
            self.placeZero(idstr, offset, PAGE)
        return len(wanted)

    def stop(self) -> None:
        """
        Stop.
        """
        self.stopped = True


class _StrictTransport(StringTransport):
    """
    A L{StringTransport} that, like a TLS transport after its
    C{close_notify}, drops what is written after C{loseConnection}.
    """

    def write(self, data: bytes) -> None:
        """
        @param data: kept only while the connection is not closing.
        """
        if not self.disconnecting:
            super().write(data)


def listeningIncoming(preempt: bool = True) -> tuple[IncomingMigration, _Faults, DestinationProtocol]:
    """
    @param preempt: the destination's C{postcopy-preempt} capability.
    @return: an incoming migration in postcopy RUNNING over one 16-page
        block, its fault service stand-in and its main protocol (on a
        L{StringTransport}).
    """
    faults = _Faults()
    incoming = IncomingMigration(IncomingTestVM(), None, True, lambda blocks, source: faults,
                                 checkUserfaultfd=lambda: None, tuneGarbageCollector=lambda: None)
    incoming.machine.preemptEnabled = preempt
    incoming.machine.setup()
    main = DestinationProtocol(incoming)
    main.makeConnection(_StrictTransport())
    incoming.openReturnPath()
    incoming.advise(PAGE, PAGE)
    incoming.ramBlocksListed([("pc.ram", 16 * PAGE, None)])
    incoming.listen()
    incoming.run()
    main.transport.clear()
    return incoming, faults, main


def preemptChannel(incoming: IncomingMigration) -> PreemptDestinationProtocol:
    """
    @param incoming: the incoming migration.
    @return: its preempt channel's protocol, connected to a L{StringTransport}.
    """
    channel = PreemptDestinationProtocol(incoming)
    channel.makeConnection(StringTransport())
    return channel


class CompletionOrderTests(SynchronousTestCase):
    """
    The main stream's EOF and the preempt channel's EOS, in either order.
    """

    def test_eofThenEOS(self) -> None:
        """
        EOF on the main stream first: the migration stays
        C{postcopy-active}, sends no SHUT and keeps its main connection
        open; a requested page arriving on the preempt channel after it is
        placed, and its EOS then completes the migration: SHUT(0) (written
        before the main connection closes), the main connection closed, the
        fault service stopped after the page.
        """
        incoming, faults, main = listeningIncoming()
        channel = preemptChannel(incoming)
        faults.wanted.add(("pc.ram", 5 * PAGE))
        incoming.eof()
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_ACTIVE)
        self.assertEqual((main.transport.value(), main.transport.disconnecting), (b"", False))
        self.assertFalse(faults.stopped)
        encoder = PreemptEncoder()
        channel.dataReceived(b"".join(encoder.page("pc.ram", 5 * PAGE, b"\x07" * PAGE)) + encoder.eos())
        self.assertEqual(faults.placed, [("pc.ram", 5 * PAGE, PAGE)])
        self.assertEqual(incoming.machine.status.status, S.COMPLETED)
        self.assertTrue(faults.stopped)
        self.assertEqual(main.transport.value(), SHUT_0)
        self.assertTrue(main.transport.disconnecting)
        self.assertIsNone(self.successResultOf(channel.ended))

    def test_eosThenEOF(self) -> None:
        """
        The preempt channel's EOS first: the main stream's EOF completes
        the migration at once.
        """
        incoming, faults, main = listeningIncoming()
        channel = preemptChannel(incoming)
        channel.dataReceived(PreemptEncoder().eos())
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_ACTIVE)
        self.assertEqual(incoming.machine.preempt, PreemptChannelState.ENDED)
        incoming.eof()
        self.assertEqual(incoming.machine.status.status, S.COMPLETED)
        self.assertEqual(main.transport.value(), SHUT_0)

    def test_channelNotYetAccepted(self) -> None:
        """
        With C{postcopy-preempt} on, a main stream that ends before the
        preempt channel was even accepted waits for it and its EOS.
        """
        incoming, faults, main = listeningIncoming()
        incoming.eof()
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_ACTIVE)
        channel = preemptChannel(incoming)
        channel.dataReceived(PreemptEncoder().eos())
        self.assertEqual(incoming.machine.status.status, S.COMPLETED)

    def test_withoutPreempt(self) -> None:
        """
        Without the capability, EOF completes postcopy at once.
        """
        incoming, faults, main = listeningIncoming(preempt=False)
        incoming.eof()
        self.assertEqual(incoming.machine.status.status, S.COMPLETED)
        self.assertEqual(main.transport.value(), SHUT_0)

    def test_missingPageAtEOS(self) -> None:
        """
        A page still wanted when both channels ended was never sent: at
        the preempt channel's EOS (not at the main stream's EOF) it gets a
        zero page, as on a QEMU destination, and the migration completes.
        """
        incoming, faults, main = listeningIncoming()
        channel = preemptChannel(incoming)
        faults.wanted.add(("pc.ram", 0))
        incoming.eof()
        self.assertEqual(faults.placed, [])
        channel.dataReceived(PreemptEncoder().eos())
        self.assertEqual(faults.placed, [("pc.ram", 0, PAGE)])
        self.assertEqual(incoming.machine.status.status, S.COMPLETED)
        self.assertTrue(faults.stopped)
        self.successResultOf(channel.ended)


class PreemptLostTests(SynchronousTestCase):
    """
    A preempt channel that closes before its EOS.
    """

    def test_pausesWhileRunning(self) -> None:
        """
        While postcopy runs, a broken preempt channel pauses the migration
        (C{postcopy-paused}, the preempt channel no longer awaited) and
        drops the main connection, so that the source pauses too; the main
        connection's own loss then changes nothing.
        """
        incoming, faults, main = listeningIncoming()
        channel = preemptChannel(incoming)
        channel.dataReceived(b"".join(PreemptEncoder().page("pc.ram", 0, b"\x01" * PAGE)))
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.assertEqual(incoming.machine.preempt, PreemptChannelState.NONE)
        self.assertTrue(main.transport.disconnected)
        self.failureResultOf(channel.ended, RemoteProtocolError)
        main.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.assertFalse(faults.stopped)

    def test_afterMainEOF(self) -> None:
        """
        A preempt channel lost while its EOS is awaited after the main
        stream's EOF pauses too (instead of completing with pages missing
        or waiting forever).
        """
        incoming, faults, main = listeningIncoming()
        channel = preemptChannel(incoming)
        incoming.eof()
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.failureResultOf(channel.ended, RemoteProtocolError)

    def test_failsBeforeRun(self) -> None:
        """
        Before postcopy runs (nothing to pause), a preempt channel that
        broke after carrying bytes fails the incoming migration.
        """
        faults = _Faults()
        incoming = IncomingMigration(IncomingTestVM(), None, True, lambda blocks, source: faults,
                                     checkUserfaultfd=lambda: None, tuneGarbageCollector=lambda: None)
        incoming.machine.preemptEnabled = True
        incoming.machine.setup()
        main = DestinationProtocol(incoming)
        main.makeConnection(StringTransport())
        incoming.ramBlocksListed([("pc.ram", 16 * PAGE, None)])
        channel = preemptChannel(incoming)
        channel.dataReceived(b"\0")
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(incoming.machine.status.status, S.FAILED)
        self.assertTrue(main.transport.disconnected)
        self.failureResultOf(channel.ended, RemoteProtocolError)


class MachineTests(SynchronousTestCase):
    """
    L{IncomingMachine.readyToComplete}.
    """

    def test_precopyNeverWaits(self) -> None:
        """
        A migration that never entered postcopy completes at the main
        stream's end even with C{postcopy-preempt} on.
        """
        machine = IncomingMachine(preemptEnabled=True)
        machine.preemptOpened()
        self.assertFalse(machine.readyToComplete)
        machine.mainEOF()
        self.assertTrue(machine.readyToComplete)

    def test_droppedEndedStaysEnded(self) -> None:
        """
        A pause after the preempt channel's EOS does not make the
        migration wait for another EOS.
        """
        machine = IncomingMachine(preemptEnabled=True)
        machine.preemptOpened()
        machine.preemptEnded()
        machine.preemptDropped()
        self.assertEqual(machine.preempt, PreemptChannelState.ENDED)


class ChannelRoleTests(SynchronousTestCase):
    """
    L{DestinationFactory} gives the main and preempt roles by content when
    C{postcopy-preempt} is on (under TLS the preempt channel's handshake
    may complete first).
    """

    def factory(self, preempt: bool = True) -> tuple[Any, IncomingMigration]:
        """
        @param preempt: whether the preempt channel is accepted.
        @return: a destination factory and its incoming migration.
        """
        from twisted_postcopy.protocols.factories import DestinationFactory
        from twisted_postcopy.protocols.preempt import PreemptDestinationFactory

        incoming = IncomingMigration(IncomingTestVM(), None, True)
        incoming.machine.setup()
        factory = DestinationFactory(incoming, preempt=PreemptDestinationFactory(incoming),
                                     preemptEnabled=lambda: preempt)
        return factory, incoming

    def connect(self, factory: Any) -> tuple[Any, StringTransport]:
        """
        @param factory: a destination factory.
        @return: the protocol it built for a new connection, and its transport.
        """
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_preemptFirst(self) -> None:
        """
        A silent connection made before the one that starts with the
        stream's magic is the preempt channel; the other is the main
        channel and gets every byte it sent.
        """
        factory, incoming = self.factory()
        first, _ = self.connect(factory)
        second, _ = self.connect(factory)
        self.assertNoResult(factory.accepted)
        header = bytes.fromhex("5145564d00000003")
        second.dataReceived(header[:2])
        self.assertNoResult(factory.accepted)
        second.dataReceived(header[2:])
        main = self.successResultOf(factory.accepted)
        self.assertIs(second.inner, main)
        self.assertIs(first.inner, factory.preempt.preempt)
        self.assertEqual(main.driver.decoder.position, len(header))
        self.assertEqual(incoming.machine.status.status, S.ACTIVE)
        self.assertEqual(incoming.machine.preempt, PreemptChannelState.OPEN)

    def test_mainFirst(self) -> None:
        """
        In connection order (the main channel first), the second
        connection becomes the preempt channel as soon as the first showed
        the magic.
        """
        factory, incoming = self.factory()
        first, _ = self.connect(factory)
        first.dataReceived(bytes.fromhex("5145564d00000003"))
        self.assertIs(first.inner, self.successResultOf(factory.accepted))
        second = factory.buildProtocol(None)
        self.assertIs(second, factory.preempt.preempt)

    def test_firstWithGarbage(self) -> None:
        """
        A first connection starting with anything else is still the main
        channel: its decoder fails the migration on the bad magic.
        """
        factory, incoming = self.factory()
        first, transport = self.connect(factory)
        first.dataReceived(b"QEVX\0\0\0\3")
        self.assertIs(first.inner, self.successResultOf(factory.accepted))
        self.assertEqual(incoming.machine.status.status, S.FAILED)
        self.assertTrue(transport.disconnecting)

    def test_thirdWaitingRefused(self) -> None:
        """
        At most two connections wait for their role.
        """
        factory, _ = self.factory()
        self.connect(factory)
        self.connect(factory)
        self.assertIsNone(factory.buildProtocol(None))

    def test_lostWhileWaiting(self) -> None:
        """
        A waiting connection that closes is forgotten.
        """
        factory, _ = self.factory()
        first, _ = self.connect(factory)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.pendingChannels, [])

    def test_withoutPreempt(self) -> None:
        """
        Without the preempt channel the first connection is the main one
        at once.
        """
        factory, _ = self.factory(preempt=False)
        protocol = factory.buildProtocol(None)
        self.assertIs(protocol, self.successResultOf(factory.accepted))


class RecoveryChannelRoleTests(SynchronousTestCase):
    """
    L{RecoveryDestinationFactory} tells a recovery's new main and preempt
    channels apart by content while paused with C{postcopy-preempt} on.
    """

    def pausedFactory(self) -> tuple[Any, IncomingMigration]:
        """
        @return: a recovery factory (preempt on) and its paused incoming
            migration.
        """
        from twisted_postcopy.protocols.recovery import RecoveryDestinationFactory

        incoming, faults, main = listeningIncoming()
        main.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        return RecoveryDestinationFactory(incoming, lambda: True), incoming

    def connect(self, factory: Any) -> Any:
        """
        @param factory: a recovery factory.
        @return: the protocol it built for a new connection (connected).
        """
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return protocol

    def test_preemptFirst(self) -> None:
        """
        A silent connection made before the one that starts with a command
        (RECV_BITMAP) is the new preempt channel; the other takes over as
        the main channel (C{postcopy-recover}).
        """
        from twisted_postcopy.protocols.recovery import RecoveryDestinationProtocol

        factory, incoming = self.pausedFactory()
        first = self.connect(factory)
        second = self.connect(factory)
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        second.dataReceived(b"\x08")
        self.assertIsInstance(second.inner, RecoveryDestinationProtocol)
        self.assertIs(incoming.channel, second.inner)
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_RECOVER)
        self.assertEqual(factory.preemptChannels, [first.inner])
        self.assertEqual(incoming.machine.preempt, PreemptChannelState.OPEN)

    def test_mainFirst(self) -> None:
        """
        In connection order, the connection after the new main channel is
        its preempt channel at once.
        """
        factory, incoming = self.pausedFactory()
        first = self.connect(factory)
        first.dataReceived(b"\x08")
        self.assertIs(incoming.channel, first.inner)
        second = factory.buildProtocol(None)
        self.assertEqual(factory.preemptChannels, [second])

    def test_notPaused(self) -> None:
        """
        Outside C{postcopy-paused} a connection is a recovery protocol at
        once (which drops itself).
        """
        from twisted_postcopy.protocols.recovery import RecoveryDestinationFactory, RecoveryDestinationProtocol

        incoming, faults, main = listeningIncoming()
        protocol = RecoveryDestinationFactory(incoming, lambda: True).buildProtocol(None)
        self.assertIsInstance(protocol, RecoveryDestinationProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertIs(incoming.channel, main)


class ListenerTests(TestCase):
    """
    The manager's original listener, kept open after loading started while
    the preempt channel is awaited.
    """

    @inlineCallbacks
    def test_closedWhenEndedWithoutPreempt(self) -> None:
        """
        A migration that fails (or completes, or pauses) before its preempt
        channel came does not leave the listener open.
        """
        from twisted.internet import reactor

        from twisted_postcopy.manager import MigrationManager

        manager = MigrationManager(reactor, IncomingTestVM())
        manager.setCapabilities({"postcopy-ram": True, "postcopy-preempt": True})
        port = yield manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(lambda: port.connected and port.stopListening())
        manager.incoming.connected()
        self.assertTrue(port.connected)
        manager.incoming.failed(RemoteProtocolError("cut"))
        yield deferLater(reactor, 0, lambda: None)
        self.assertFalse(port.connected)


class DeadPreemptLinkTests(SynchronousTestCase):
    """
    The preempt channel's dead-link watchdog.
    """

    def test_silentPreemptPauses(self) -> None:
        """
        When the watchdog finds the preempt channel silent for
        C{x-link-timeout-ms}, it drops it, and the migration pauses with a
        reason naming the dead link.
        """
        from twisted.internet.task import Clock

        from twisted_postcopy.protocols.deadlink import LinkWatchdog

        clock = Clock()
        incoming, faults, main = listeningIncoming()

        def watch(transport: Any) -> LinkWatchdog:
            """
            @param transport: the channel's transport.
            @return: a started watchdog measuring 5 s of silence.
            """
            dog = LinkWatchdog(clock, transport, lambda: 2000, silence=lambda transport: 5000)
            dog.start()
            return dog

        channel = PreemptDestinationProtocol(incoming, watch)
        channel.makeConnection(StringTransport())
        clock.advance(2)
        self.assertTrue(channel.transport.disconnecting)
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.assertIn("dead link", str(self.failureResultOf(channel.ended, RemoteProtocolError).value))


class PausedWhileWaitingTests(SynchronousTestCase):
    """
    The main connection lost after its EOF, while the preempt channel's
    EOS is awaited.
    """

    def test_eosWhilePaused(self) -> None:
        """
        The migration pauses; an EOS arriving on the old preempt channel
        then does not complete it (there is no main channel to send SHUT
        on), and the main stream's end is awaited anew from the recovered
        source.
        """
        incoming, faults, main = listeningIncoming()
        channel = preemptChannel(incoming)
        incoming.eof()
        main.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.assertFalse(incoming.machine.mainEnded)
        channel.dataReceived(PreemptEncoder().eos())
        self.assertEqual(incoming.machine.status.status, S.POSTCOPY_PAUSED)
        self.assertFalse(faults.stopped)
