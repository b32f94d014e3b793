# -*- test-case-name: tests.test_protocols_stream -*-
"""
Connecting and listening for migrations: C{tcp:HOST:PORT} and
C{unix:PATH} URIs (QEMU's spelling) to Twisted endpoints, and the factories
that build the main-connection protocols.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol

from twisted_postcopy.errors import MigrationError
from twisted_postcopy.protocols.stream import DestinationProtocol, SourceProtocol


def parseURI(uri: str) -> tuple[str, str, int]:
    """
    @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
    @return: (kind, host or path, port or 0).
    @raise MigrationError: any other URI (QEMU's text).
    """
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return kind, rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return kind, host.strip("[]"), int(port)
    raise MigrationError(f"Parameter 'uri' expects a valid migration protocol: {uri!r}")


def clientEndpoint(reactor: Any, uri: str) -> Any:
    """
    @param reactor: the reactor.
    @param uri: a migration URI.
    @return: a client endpoint for it.
    """
    kind, where, port = parseURI(uri)
    if kind == "unix":
        return UNIXClientEndpoint(reactor, where)
    return TCP4ClientEndpoint(reactor, where, port)


def serverEndpoint(reactor: Any, uri: str) -> Any:
    """
    @param reactor: the reactor.
    @param uri: a migration URI.
    @return: a server endpoint for it (a Unix socket is 0600 and takes
        only root's and the daemon user's connections: see
        L{twisted_postcopy.access}).
    """
    kind, where, port = parseURI(uri)
    if kind == "unix":
        from twisted_postcopy.access import SocketPolicy, UNIXAccessEndpoint

        return UNIXAccessEndpoint(reactor, where, SocketPolicy(what="migration socket"))
    return TCP4ServerEndpoint(reactor, port, interface=where)


class SourceFactory(Factory):
    """
    Builds the L{SourceProtocol} of one outgoing migration.

    @cvar protocol: the protocol class built (a subclass for recovery).
    @ivar migration: the outgoing migration.
    @ivar reactor: the reactor.
    @ivar connectPreempt: connects the preempt channel after the main
        connection (C{postcopy-preempt}), or L{None}.
    """

    protocol = SourceProtocol

    def __init__(self, migration: Any, reactor: Any, connectPreempt: Any = None) -> None:
        """
        @param migration: the outgoing migration.
        @param reactor: the reactor.
        @param connectPreempt: see
            L{twisted_postcopy.protocols.preempt.preemptConnector}.
        """
        self.migration = migration
        self.reactor = reactor
        self.connectPreempt = connectPreempt

    def buildProtocol(self, addr: Any) -> Protocol:
        """
        @param addr: the peer.
        @return: the source protocol.
        """
        return self.protocol(self.migration, self.reactor, self.connectPreempt)


class DestinationFactory(Factory):
    """
    Accepts the connections of one incoming migration by order, as QEMU
    7.2 does: the first is the main channel; with C{postcopy-preempt} the
    second is the preempt channel (built by C{preempt}); later ones go to
    C{recovery} or are refused.

    @ivar incoming: the incoming migration.
    @ivar main: the main connection's protocol, once accepted.
    @ivar accepted: fires with the main protocol when it connects.
    @ivar recovery: builds the protocol of any later connection (a
        recovery main channel while postcopy is paused), or L{None} to
        refuse them.
    @ivar preempt: the preempt channel's factory (a
        L{twisted_postcopy.protocols.preempt.PreemptDestinationFactory})
        when the capability is on, else L{None}.
    """

    def __init__(self, incoming: Any) -> None:
        """
        @param incoming: the incoming migration.
        """
        self.incoming = incoming
        self.main: DestinationProtocol | None = None
        self.accepted: Deferred = Deferred()
        self.recovery: Factory | None = None
        self.preempt: Any = None

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        @param addr: the peer.
        @return: the main protocol for the first connection, else None.
        """
        if self.main is not None:
            if self.preempt is not None and self.preempt.preempt is None:
                return self.preempt.buildProtocol(addr)
            return None if self.recovery is None else self.recovery.buildProtocol(addr)
        self.main = DestinationProtocol(self.incoming)
        self.accepted.callback(self.main)
        return self.main
