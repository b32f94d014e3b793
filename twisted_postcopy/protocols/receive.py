# -*- test-case-name: tests.test_protocols_receive -*-
"""
Reading a connection into a preallocated buffer (C{recv_into}).

Twisted's TCP and Unix transports read with C{socket.recv(bufferSize)}: a
new string per read, allocated, filled, shrunk and freed once decoded.  A
destination's main channel reads a mebibyte at a time, hundreds of times a
second, and every byte read is placed (C{UFFDIO_COPY} or C{pwrite}) before
the read returns, so one buffer per connection can take every read.

A protocol providing L{IBufferedReceiver} (the shape of asyncio's
C{BufferedProtocol}) lends the transport a buffer with C{getBuffer()}; the
transport fills it with C{recv_into} and reports the count with
C{bufferUpdated(count)}.  The protocol must be done with those bytes when
C{bufferUpdated} returns (copying what it keeps: see
L{twisted_postcopy.wire.buffer.ReceiveBuffer.borrow}).  C{getBuffer()}
returning L{None} (a connection whose role is not decided yet) gets the
usual C{dataReceived} for that read.  Any other protocol (a TLS wrapper,
for one) is read the usual way.

Only listening ports built here read like this: L{BufferedListening}
stands for a reactor in a server endpoint, and makes C{listenTCP} and
C{listenUNIX} build ports whose connections are L{ReceivingTCPServer} and
L{ReceivingUNIXServer}.  (Twisted chooses a port's connection class by the
port's C{transport} attribute; nothing else of Twisted's is changed.)
"""

from __future__ import annotations

from errno import EWOULDBLOCK
from typing import Any

from twisted.internet import main, tcp, unix
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import Interface, implementer


class IBufferedReceiver(Interface):
    """
    A protocol that lends its transport the buffer to read into.
    """

    def getBuffer() -> Any:
        """
        @return: a writable buffer (a C{memoryview} of a C{bytearray}) the
            next read fills from its start, or L{None} to get this read
            through C{dataReceived}.
        """

    def bufferUpdated(count: int) -> None:
        """
        The first C{count} bytes of the buffer C{getBuffer} returned hold
        what arrived; the buffer is read into again after this returns.

        @param count: at least 1 (the end of the input is
            C{connectionLost}, as usual).
        """


@implementer(IBufferedReceiver)
class PreallocatedReceiver:
    """
    A protocol mixin: one receive buffer of L{receiveSize} bytes, made at
    the first read, lent for every read; bytes read into it go to
    C{received(view, True)}, bytes from C{dataReceived} (TLS) to
    C{received(data, False)}.

    @cvar receiveSize: the buffer's size, the most bytes one read takes.
    @ivar receiveBuffer: the buffer, once made.
    """

    receiveSize = 1 << 16
    receiveBuffer: memoryview | None = None

    def getBuffer(self) -> memoryview:
        """
        @return: the receive buffer.
        """
        if self.receiveBuffer is None:
            self.receiveBuffer = memoryview(bytearray(self.receiveSize))
        return self.receiveBuffer

    def bufferUpdated(self, count: int) -> None:
        """
        @param count: how many bytes arrived in the receive buffer.
        """
        self.received(self.getBuffer()[:count], True)

    def dataReceived(self, data: bytes) -> None:
        """
        @param data: bytes read the usual way.
        """
        self.received(data, False)

    def received(self, data: bytes | memoryview, borrowed: bool) -> None:
        """
        Act on what arrived.

        @param data: the bytes.
        @param borrowed: whether they are the receive buffer's, read into
            again once this returns (copy what is kept).
        """
        raise NotImplementedError(f"{type(self).__name__} must act on received bytes")


class _ReadsIntoBuffer:
    """
    A connection's C{doRead} with C{recv_into} for an L{IBufferedReceiver}
    protocol (mixed in before Twisted's connection class).
    """

    socket: Any
    protocol: Any

    def doRead(self) -> Any:
        """
        Read once: into the protocol's buffer when it lends one, else the
        usual way.

        @return: what C{doRead} returns (L{None}, or why the connection
            ended).
        """
        protocol = self.protocol
        buffer = protocol.getBuffer() if IBufferedReceiver.providedBy(protocol) else None
        if buffer is None:
            return super().doRead()  # type: ignore[misc]
        try:
            count = self.socket.recv_into(buffer)
        except OSError as error:
            if error.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        protocol.bufferUpdated(count)
        return None


class ReceivingTCPServer(_ReadsIntoBuffer, tcp.Server):
    """
    An accepted TCP connection read into its protocol's buffer.
    """


class ReceivingUNIXServer(_ReadsIntoBuffer, unix.Server):
    """
    An accepted Unix connection read into its protocol's buffer.
    """


class ReceivingTCPPort(tcp.Port):
    """
    A TCP port whose connections are L{ReceivingTCPServer}s.
    """

    transport = ReceivingTCPServer


class ReceivingUNIXPort(unix.Port):
    """
    A Unix port whose connections are L{ReceivingUNIXServer}s.
    """

    transport = ReceivingUNIXServer


class BufferedListening:
    """
    The C{listenTCP} and C{listenUNIX} of a reactor, with ports built here
    (for a server endpoint such as C{TCP4ServerEndpoint}, or
    L{twisted_postcopy.access.listenUNIX}).  A reactor that is not a
    POSIX reactor (a test's C{MemoryReactor}) listens its own way.

    @ivar reactor: the reactor the ports run on.
    """

    def __init__(self, reactor: Any) -> None:
        """
        @param reactor: the reactor.
        """
        self.reactor = reactor

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """
        @return: the listening port (see C{IReactorTCP.listenTCP}).
        """
        if not isinstance(self.reactor, PosixReactorBase):
            return self.reactor.listenTCP(port, factory, backlog, interface)
        listening = ReceivingTCPPort(port, factory, backlog, interface, self.reactor)
        listening.startListening()
        return listening

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666,
                   wantPID: int = 0) -> Any:
        """
        @return: the listening port (see C{IReactorUNIX.listenUNIX}).
        """
        if not isinstance(self.reactor, PosixReactorBase):
            return self.reactor.listenUNIX(address, factory, backlog, mode, wantPID)
        listening = ReceivingUNIXPort(address, factory, backlog, mode, self.reactor, wantPID)
        listening.startListening()
        return listening
