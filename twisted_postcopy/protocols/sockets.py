# -*- test-case-name: tests.test_tls -*-
"""
The socket under a migration connection's transport.

Over TLS a protocol's transport is a
L{twisted.protocols.tls.TLSMemoryBIOProtocol}, whose C{getHandle()} is the
C{OpenSSL.SSL.Connection}, not the socket; socket options (buffer sizes,
keepalive, C{TCP_USER_TIMEOUT}) and C{shutdown()} must go to the socket
below.  L{transportSocket} finds it through any number of wrapping layers.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.protocols.policies import ProtocolWrapper


def transportSocket(transport: Any) -> Any:
    """
    @param transport: a connection's transport, plain or wrapped (TLS).
    @return: the socket object of the underlying TCP or Unix connection,
        or L{None} when there is none (a closed connection, a test's
        string transport).
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return None
    try:
        sock = handle()
    except AttributeError:  # a closed TCP connection has no socket left
        return None
    return sock if hasattr(sock, "setsockopt") else None


def sendAtOnce(transport: Any) -> None:
    """
    Switch off Nagle's algorithm (C{TCP_NODELAY}) on a migration
    connection: a small write (a return-path page request, an urgent page
    with its header) leaves at once instead of waiting for the ACK of the
    previous one, which the peer may delay by up to 40 ms.  Large writes
    are unaffected.  Other sockets (Unix, a test's string transport) are
    left alone.

    @param transport: the connection's transport, plain or wrapped (TLS).
    """
    sock = transportSocket(transport)
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # a socket closing under us: nothing left to speed up


#: Bytes asked of the kernel per read on a destination's main channel.
#: Twisted reads C{recv(transport.bufferSize)}, 64 KiB by default: one
#: string, one C{dataReceived} and one decoder pass per 64 KiB.  1 MiB
#: reads cut the destination's samples of a 1 GiB postcopy by about a
#: third (bench/migrate.py, py-spy); a requested page on the main channel
#: waits at most for one such read to be decoded and placed.
RECEIVE_CHUNK = 1 << 20


def readInLargeChunks(transport: Any) -> None:
    """
    Make a destination's main-channel connection read up to
    L{RECEIVE_CHUNK} bytes at a time (its transport's public
    C{bufferSize}, through any TLS wrapper).  The destination registers no
    producer on these connections, so the write-buffer threshold that
    C{bufferSize} also sets changes nothing for it.

    @param transport: the connection's transport.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = RECEIVE_CHUNK


#: Buffers per C{sendmsg} (Linux's C{UIO_MAXIOV}).
IOV_MAX = 1024


class GatheredWriter:
    """
    Writes gathered buffers (bytes and views of guest RAM) to a
    connection (Nagle's algorithm off: L{sendAtOnce}), the one place that
    does: straight to the socket with
    C{sendmsg} (no copy in Python) while the transport holds nothing,
    through C{transport.write} otherwise, always in order.  Over TLS (a
    L{ProtocolWrapper}) or without a socket, buffers are joined and
    written.

    Whether the transport holds nothing is the one thing Twisted has no
    public question for: L{queued} reads C{FileDescriptor}'s buffer
    attributes, here and nowhere else.  (Its C{bufferSize} cannot be set
    to 0 to make every queued byte pause the producer: C{tcp.Connection}
    also reads with C{recv(bufferSize)}.)

    @ivar transport: the connection's transport.
    @ivar socket: its socket for C{sendmsg}, or L{None}.
    """

    def __init__(self, transport: Any) -> None:
        """
        @param transport: the connection's transport.
        """
        self.transport = transport
        self.socket = None
        sendAtOnce(transport)
        if not isinstance(transport, ProtocolWrapper) and hasattr(transport, "dataBuffer"):
            sock = transportSocket(transport)
            self.socket = sock if hasattr(sock, "sendmsg") else None

    @property
    def queued(self) -> bool:
        """
        Whether the transport still holds bytes to send.
        """
        transport = self.transport
        return bool(transport._tempDataLen or len(transport.dataBuffer) > transport.offset)

    def writeBuffers(self, buffers: list[Any]) -> None:
        """
        @param buffers: bytes and memoryviews, in order.
        """
        if self.socket is None or self.queued:
            self.transport.write(b"".join(buffers))
            return
        for first in range(0, len(buffers), IOV_MAX):
            batch = buffers[first : first + IOV_MAX]
            try:
                sent = self.socket.sendmsg(batch)
            except OSError:
                sent = 0
            if sent == sum(map(len, batch)):
                continue
            rest = buffers[first:]
            for index, buffer in enumerate(rest):
                if sent < len(buffer):
                    rest = [memoryview(buffer)[sent:], *rest[index + 1 :]]
                    break
                sent -= len(buffer)
            self.transport.write(b"".join(rest))
            return
