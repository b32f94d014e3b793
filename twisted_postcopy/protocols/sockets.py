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
