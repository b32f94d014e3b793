# -*- test-case-name: tests.test_protocols_receive -*-
"""
Tests for L{twisted_postcopy.protocols.receive}: connections read with
C{recv_into} into their protocol's buffer, over real loopback TCP and Unix
sockets, and a real QEMU 7.2 stream loaded through one such buffer.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from twisted_postcopy.access import listenUNIX
from twisted_postcopy.protocols.factories import DestinationFactory, serverEndpoint
from twisted_postcopy.protocols.receive import (
    BufferedListening, IBufferedReceiver, ReceivingTCPServer, ReceivingUNIXServer)
from tests.test_destination_incoming import _expected, loadingCapture

#: Bytes each test client sends (many reads of the receiver's buffer).
SENT = bytes(range(251)) * 4000


@implementer(IBufferedReceiver)
class Recorder(Protocol):
    """
    Records how bytes arrive: into its small buffer, or by C{dataReceived}
    when it lends none.

    @ivar lend: whether L{getBuffer} returns the buffer.
    @ivar viaBuffer: bytes that came through the buffer, copied at once.
    @ivar viaData: bytes that came through C{dataReceived}.
    @ivar reads: the counts of L{bufferUpdated}.
    @ivar lost: fires at C{connectionLost}.
    @ivar reason: the reason it was given.
    """

    def __init__(self, lend: bool) -> None:
        """
        @param lend: see L{lend}.
        """
        self.lend = lend
        self.buffer = memoryview(bytearray(4096))
        self.viaBuffer = bytearray()
        self.viaData = bytearray()
        self.reads: list[int] = []
        self.lost: Deferred = Deferred()

    def getBuffer(self) -> memoryview | None:
        """
        @return: the buffer, if lent.
        """
        return self.buffer if self.lend else None

    def bufferUpdated(self, count: int) -> None:
        """
        Copy what arrived, then scribble over the buffer: the next read
        must not depend on it.

        @param count: bytes read.
        """
        self.reads.append(count)
        self.viaBuffer += self.buffer[:count]
        self.buffer[:count] = b"\xee" * count

    def dataReceived(self, data: bytes) -> None:
        """
        @param data: bytes read the usual way.
        """
        self.viaData += data

    def connectionLost(self, reason: object) -> None:
        """
        @param reason: why.
        """
        self.reason = reason
        self.lost.callback(None)


class _OneProtocol(Factory):
    """
    Builds one given protocol.
    """

    def __init__(self, protocol: Protocol) -> None:
        """
        @param protocol: the protocol to build.
        """
        self.built = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        """
        @return: the protocol.
        """
        return self.built


def _send(family: int, address: object, data: bytes) -> None:
    """
    Connect, send everything, close (the listener reads it later: the
    kernel's buffers hold it; sent from a thread the reactor does not wait
    for).

    @param family: the socket family.
    @param address: where to connect.
    @param data: what to send.
    """
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(address)
    client.sendall(data)
    client.close()


class ReceivingPortTests(TestCase):
    """
    Ports made by L{BufferedListening} read with C{recv_into}.
    """

    @inlineCallbacks
    def _roundTrip(self, lend: bool, unixSocket: bool):
        """
        Send L{SENT} to a L{Recorder} over a real socket.

        @param lend: whether the recorder lends its buffer.
        @param unixSocket: a Unix socket (else loopback TCP).
        @return: a Deferred firing with (recorder, reason of its loss).
        """
        recorder = Recorder(lend)
        factory = _OneProtocol(recorder)
        listening = BufferedListening(reactor)
        if unixSocket:
            path = os.path.join(tempfile.mkdtemp(), "s")
            port = listenUNIX(listening, path, factory)
            family, address = socket.AF_UNIX, path
        else:
            port = listening.listenTCP(0, factory, interface="127.0.0.1")
            family, address = socket.AF_INET, ("127.0.0.1", port.getHost().port)
        self.addCleanup(port.stopListening)
        sending = reactor.callInThread  # type: ignore[attr-defined]
        sending(_send, family, address, SENT)
        yield recorder.lost
        return recorder, recorder.reason

    @inlineCallbacks
    def test_tcpReadsIntoBuffer(self):
        """
        Over TCP every byte arrives through the protocol's buffer, in order,
        in reads no larger than it (the buffer is overwritten after each);
        the end of the input is a clean C{connectionLost}.
        """
        recorder, reason = yield self._roundTrip(True, False)
        self.assertIsInstance(recorder.transport, ReceivingTCPServer)
        self.assertEqual(bytes(recorder.viaBuffer), SENT)
        self.assertEqual(recorder.viaData, b"")
        self.assertGreater(len(recorder.reads), len(SENT) // 4096 - 1)
        self.assertLessEqual(max(recorder.reads), 4096)
        reason.trap(ConnectionDone)

    @inlineCallbacks
    def test_unixReadsIntoBuffer(self):
        """
        Over a Unix socket (made by L{twisted_postcopy.access.listenUNIX},
        peers checked) too.
        """
        recorder, reason = yield self._roundTrip(True, True)
        self.assertIsInstance(recorder.transport, ReceivingUNIXServer)
        self.assertEqual(bytes(recorder.viaBuffer), SENT)
        self.assertEqual(recorder.viaData, b"")
        reason.trap(ConnectionDone)

    @inlineCallbacks
    def test_noBufferMeansDataReceived(self):
        """
        A protocol whose C{getBuffer} returns L{None} gets its bytes through
        C{dataReceived}.
        """
        recorder, reason = yield self._roundTrip(False, False)
        self.assertEqual(bytes(recorder.viaData), SENT)
        self.assertEqual(recorder.reads, [])
        reason.trap(ConnectionDone)

    @inlineCallbacks
    def test_qemuStreamThroughReceiveBuffer(self):
        """
        A QEMU 7.2 precopy stream sent over loopback to a migration
        endpoint (L{serverEndpoint}) is read into the destination
        protocol's receive buffer and loads whole: RAM and device bytes
        equal the recording's, and the migration completes.
        """
        stream, vm, incoming = loadingCapture()
        factory = DestinationFactory(incoming)
        port = yield serverEndpoint(reactor, "tcp:127.0.0.1:0").listen(factory)
        self.addCleanup(port.stopListening)
        reactor.callInThread(_send, socket.AF_INET, ("127.0.0.1", port.getHost().port), stream)  # type: ignore[attr-defined]
        main = yield factory.accepted
        finished = Deferred()
        incoming.machine.status.observers.append(
            lambda status: finished.callback(status) if status.value in ("completed", "failed") else None)
        status = yield finished
        self.assertEqual(status.value, "completed")
        self.assertIsInstance(main.transport, ReceivingTCPServer)
        self.assertIsNotNone(main.receiveBuffer)
        memory, devices = _expected(stream)
        self.assertEqual(vm.contents(), {name: bytes(data) for name, data in memory.items()})
        self.assertEqual(vm.devices, [devices])


class FallbackTests(SynchronousTestCase):
    """
    A reactor that makes its own ports listens its own way.
    """

    def test_memoryReactor(self) -> None:
        """
        With a C{MemoryReactor}, C{listenTCP} and C{listenUNIX} are the
        reactor's own.
        """
        memory = MemoryReactor()
        listening = BufferedListening(memory)
        factory = Factory()
        listening.listenTCP(1234, factory, 7, "127.0.0.1")
        listening.listenUNIX("/x", factory, 8, 0o600, 1)
        self.assertEqual(memory.tcpServers[0][:4], (1234, factory, 7, "127.0.0.1"))
        self.assertEqual(memory.unixServers[0], ("/x", factory, 8, 0o600, 1))
