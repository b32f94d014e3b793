# -*- test-case-name: tests.test_preempt_source -*-
"""
Unit tests of the source's end of the preempt channel
(L{twisted_postcopy.protocols.preempt.PreemptSourceProtocol}) with an
L{OutgoingMigration} and Twisted's L{StringTransport}: attaching, closing
with the migration, reporting a broken channel, and the direct C{sendmsg}
path (through a stand-in socket that takes only part of a write, and a
L{StringTransport} with C{FileDescriptor}'s buffer attributes: said here
because neither is the real thing).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.protocols.preempt import PreemptSourceProtocol
from twisted_postcopy.source.outgoing import OutgoingMigration, PreemptPhase
from twisted_postcopy.state import MigrationStatus as S
from twisted_postcopy.testing.enginevm import PAGE, OutgoingTestVM


class PartialSocket:
    """
    A stand-in socket (not a real one) whose C{sendmsg} takes at most
    C{room} bytes.

    @ivar room: bytes it still takes.
    @ivar sent: what it took.
    """

    def __init__(self, room: int) -> None:
        """
        @param room: bytes it takes in all.
        """
        self.room = room
        self.sent = bytearray()

    def sendmsg(self, buffers: list[Any]) -> int:
        """
        @param buffers: what to send.
        @return: how much was taken.
        """
        data = b"".join(buffers)[:self.room]
        self.room -= len(data)
        self.sent += data
        return len(data)


def migration() -> OutgoingMigration:
    """
    @return: an outgoing migration with preempt on, connecting its channel.
    """
    vm = OutgoingTestVM({"pc.ram": 16 * PAGE})
    outgoing = OutgoingMigration(vm, lambda data: None, Clock().seconds,
                                 {"postcopy-ram": True, "postcopy-preempt": True},
                                 {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300})
    outgoing.begin()
    outgoing.start()
    outgoing.preemptConnecting()
    return outgoing


def connected(outgoing: OutgoingMigration) -> tuple[PreemptSourceProtocol, StringTransport]:
    """
    @param outgoing: the migration.
    @return: a connected channel protocol (not attached yet) and its
        transport.
    """
    protocol = PreemptSourceProtocol(outgoing)
    transport = StringTransport()
    # The buffer attributes of Twisted's FileDescriptor, empty.
    transport._tempDataLen, transport.dataBuffer, transport.offset = 0, b"", 0
    protocol.makeConnection(transport)
    return protocol, transport


class PreemptSourceProtocolTests(SynchronousTestCase):
    """
    L{PreemptSourceProtocol} attached to an outgoing migration.
    """

    def test_attach(self) -> None:
        """
        Attached while connecting: the migration's preempt channel is
        ready and writes to this transport.
        """
        outgoing = migration()
        protocol, transport = connected(outgoing)
        self.assertTrue(protocol.attach())
        self.assertEqual(outgoing.preemptPhase, PreemptPhase.READY)
        outgoing.writePreempt([b"ab", memoryview(b"cd")])
        self.assertEqual(transport.value(), b"abcd")
        self.assertEqual(protocol.bytesSent, 4)

    def test_lateConnectionDropped(self) -> None:
        """
        A channel that connects after the migration ended is dropped.
        """
        outgoing = migration()
        outgoing.cancel()
        protocol, transport = connected(outgoing)
        self.assertFalse(protocol.attach())
        self.assertTrue(transport.disconnecting)

    def test_closesWithMigration(self) -> None:
        """
        A pause aborts the channel (a recovery makes a new one); the old
        channel's loss then changes nothing.
        """
        outgoing = migration()
        protocol, transport = connected(outgoing)
        protocol.attach()
        outgoing.machine.moveTo(S.POSTCOPY_ACTIVE)
        outgoing.preemptDropped()
        outgoing.machine.moveTo(S.POSTCOPY_PAUSED)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionError("aborted")))
        self.assertEqual(outgoing.preemptPhase, PreemptPhase.OFF)
        self.assertIsNone(outgoing.preemptError)

    def test_completedClosesCleanly(self) -> None:
        """
        Completion closes the channel after what was written.
        """
        outgoing = migration()
        protocol, transport = connected(outgoing)
        protocol.attach()
        outgoing.machine.moveTo(S.COMPLETED)
        self.assertTrue(transport.disconnecting)

    def test_lossReported(self) -> None:
        """
        The loss of the channel the migration writes to is reported: its
        phase is failed, with the reason.
        """
        outgoing = migration()
        protocol, _ = connected(outgoing)
        protocol.attach()
        protocol.connectionLost(Failure(ConnectionError("reset by peer")))
        self.assertEqual(outgoing.preemptPhase, PreemptPhase.FAILED)
        self.assertIn("preempt channel lost", outgoing.preemptError)

    def test_directThenTransport(self) -> None:
        """
        Writes go straight to the socket while it takes them whole and the
        transport holds nothing; the rest of a partial write goes through
        the transport, and so does every later write while the transport
        holds data, so the order holds.
        """
        outgoing = migration()
        protocol, transport = connected(outgoing)
        protocol.attach()
        sock = PartialSocket(6)
        protocol.writer.socket = sock
        outgoing.writePreempt([b"abcd"])
        self.assertEqual((bytes(sock.sent), transport.value()), (b"abcd", b""))
        outgoing.writePreempt([b"efgh"])
        self.assertEqual((bytes(sock.sent), transport.value()), (b"abcdef", b"gh"))
        transport._tempDataLen = 2
        outgoing.writePreempt([b"ij"])
        self.assertEqual(transport.value(), b"ghij")
