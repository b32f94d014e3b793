# -*- test-case-name: tests.test_protocols_stream -*-
"""
Connecting and listening for migrations: C{tcp:HOST:PORT} and
C{unix:PATH} URIs (QEMU's spelling) to Twisted endpoints, and the factories
that build the main-connection protocols.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_postcopy.errors import MigrationError
from twisted_postcopy.protocols.deadlink import noLinkWatch
from twisted_postcopy.protocols.preempt import PreemptDestinationFactory
from twisted_postcopy.protocols.receive import BufferedListening, IBufferedReceiver
from twisted_postcopy.protocols.stream import DestinationProtocol, SourceProtocol
from twisted_postcopy.wire.constants import QEMU_VM_FILE_MAGIC


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
        L{twisted_postcopy.access}); its connections read into their
        protocols' buffers (L{twisted_postcopy.protocols.receive}).
    """
    kind, where, port = parseURI(uri)
    if kind == "unix":
        from twisted_postcopy.access import SocketPolicy, UNIXAccessEndpoint

        return UNIXAccessEndpoint(BufferedListening(reactor), where, SocketPolicy(what="migration socket"))
    return TCP4ServerEndpoint(BufferedListening(reactor), port, interface=where)


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


#: The first bytes of a main channel (C{QEMU_VM_FILE_MAGIC}).
MAIN_MAGIC = struct.pack(">I", QEMU_VM_FILE_MAGIC)


@implementer(IBufferedReceiver)
class ChannelSorter(Protocol):
    """
    An incoming connection whose role (main or preempt channel) is not
    known yet: holds its bytes until its factory decides, then forwards
    everything to the protocol of that role (reads into that protocol's
    receive buffer, when it has one).

    The factory (a L{DestinationFactory}, or a recovery factory) keeps the
    undecided connections in C{pendingChannels} (in the order they were
    made) and decides in C{sortChannel(sorter, isMain)} once a
    connection's first bytes arrived.

    @ivar factory: the factory deciding.
    @ivar addr: the peer's address.
    @ivar prefix: what a main channel starts with.
    @ivar held: bytes received before the decision.
    @ivar inner: the protocol of its role, once decided (L{None} while
        undecided, or for a connection refused).
    @ivar decided: whether the factory decided (a refused connection
        ignores what still arrives).
    """

    def __init__(self, factory: Any, addr: Any, prefix: bytes = MAIN_MAGIC) -> None:
        """
        @param factory: the deciding factory.
        @param addr: the peer.
        @param prefix: see L{prefix}.
        """
        self.factory = factory
        self.addr = addr
        self.prefix = prefix
        self.held = b""
        self.inner: Protocol | None = None
        self.decided = False

    def connectionMade(self) -> None:
        """
        Wait for the first bytes (or for another connection to show it is
        the main one).
        """
        self.factory.pendingChannels.append(self)

    def become(self, protocol: Protocol | None) -> None:
        """
        The role is known: connect its protocol and give it what arrived.

        @param protocol: the protocol, or L{None} to drop the connection.
        """
        self.decided = True
        if protocol is None:
            self.transport.loseConnection()
            return
        self.inner = protocol
        protocol.makeConnection(self.transport)
        if self.held:
            held, self.held = self.held, b""
            protocol.dataReceived(held)

    def getBuffer(self) -> Any:
        """
        @return: the receive buffer of the decided role's protocol, or
            L{None} (undecided, or a protocol without one: the read then
            comes to L{dataReceived}).
        """
        inner = self.inner
        return inner.getBuffer() if IBufferedReceiver.providedBy(inner) else None

    def bufferUpdated(self, count: int) -> None:
        """
        Forward a read into the decided protocol's receive buffer.

        @param count: how many bytes arrived.
        """
        self.inner.bufferUpdated(count)

    def dataReceived(self, data: bytes) -> None:
        """
        Forward, or hold until L{prefix}'s length arrived and the factory
        decided.

        @param data: bytes from the peer.
        """
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.decided:
            return
        self.held += data
        if len(self.held) >= len(self.prefix):
            self.factory.sortChannel(self, self.held.startswith(self.prefix))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Forward the loss; an undecided connection is forgotten.

        @param reason: why.
        """
        if self in self.factory.pendingChannels:
            self.factory.pendingChannels.remove(self)
        if self.inner is not None:
            self.inner.connectionLost(reason)


class DestinationFactory(Factory):
    """
    Accepts the connections of one incoming migration, as QEMU 7.2 does:
    the first is the main channel; with C{postcopy-preempt} the second is
    the preempt channel (built by C{preempt}); later ones go to
    C{recovery} or are refused.

    With C{postcopy-preempt} the order in which connections reach this
    factory is not enough: under TLS a connection is built once its
    handshake completed, and a QEMU 7.2 source opens its preempt channel
    as soon as its own side of the main channel's handshake finished, so
    the preempt channel may complete first here.  The roles are then told
    apart by content: the main channel starts with the stream's magic at
    once, the preempt channel carries nothing before postcopy.  Until a
    connection showed the magic, connections wait (L{ChannelSorter});
    the one that shows it is the main channel and any other waiting one
    the preempt channel.  A first connection starting with other bytes is
    taken as the main channel (its decoder then reports the bad stream).

    @ivar incoming: the incoming migration.
    @ivar main: the main connection's protocol, once accepted.
    @ivar accepted: fires with the main protocol when it connects.
    @ivar recovery: builds the protocol of any later connection (a
        recovery main channel while postcopy is paused), or L{None} to
        refuse them.
    @ivar preempt: the preempt channel's factory (a
        L{twisted_postcopy.protocols.preempt.PreemptDestinationFactory}).
    @ivar preemptEnabled: returns whether the C{postcopy-preempt}
        capability is on (read when connections arrive: a destination may
        set capabilities after C{migrate-incoming}).
    @ivar watch: starts a connection's dead-link check
        (L{twisted_postcopy.protocols.deadlink.linkWatch}).
    @ivar pendingChannels: connections waiting for their role (at most
        two), in the order they were made.
    """

    def __init__(self, incoming: Any, recovery: Factory | None = None, preempt: Any = None,
                 preemptEnabled: Callable[[], bool] = lambda: False,
                 watch: Callable[[Any], Any] = noLinkWatch) -> None:
        """
        @param incoming: the incoming migration.
        @param recovery: see L{recovery}.
        @param preempt: see L{preempt} (default: a new
            L{twisted_postcopy.protocols.preempt.PreemptDestinationFactory}
            over C{incoming}).
        @param preemptEnabled: see L{preemptEnabled}.
        @param watch: see L{watch}.
        """
        self.incoming = incoming
        self.watch = watch
        self.main: DestinationProtocol | None = None
        self.accepted: Deferred = Deferred()
        self.recovery = recovery
        self.preempt = PreemptDestinationFactory(incoming, watch) if preempt is None else preempt
        self.preemptEnabled = preemptEnabled
        self.pendingChannels: list[ChannelSorter] = []

    @property
    def awaitingPreempt(self) -> bool:
        """
        Whether a preempt channel is still to be accepted here.
        """
        return self.preemptEnabled() and self.preempt.preempt is None

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        @param addr: the peer.
        @return: the main protocol for the first connection (with
            C{postcopy-preempt}: a L{ChannelSorter} for each connection
            until the main one is known), else the preempt channel's or a
            recovery protocol, or None.
        """
        if self.main is not None:
            if self.awaitingPreempt:
                return self.preempt.buildProtocol(addr)
            return None if self.recovery is None else self.recovery.buildProtocol(addr)
        if self.preemptEnabled():
            if len(self.pendingChannels) >= 2:
                return None
            return ChannelSorter(self, addr)
        return self._buildMain()

    def _buildMain(self) -> DestinationProtocol:
        """
        @return: the main channel's protocol (C{accepted} fires with it).
        """
        self.main = DestinationProtocol(self.incoming, self.watch)
        self.accepted.callback(self.main)
        return self.main

    def sortChannel(self, sorter: ChannelSorter, magic: bool) -> None:
        """
        A waiting connection's first bytes arrived: give it and the other
        waiting connections their roles, if now known.

        @param sorter: the connection.
        @param magic: whether its bytes start with the stream's magic.
        """
        pending = self.pendingChannels
        if self.main is None and (magic or sorter is pending[0]):
            pending.remove(sorter)
            sorter.become(self._buildMain())
            for other in list(pending):
                pending.remove(other)
                other.become(self.buildProtocol(other.addr))
            return
        if self.main is None:
            pending.remove(sorter)
            sorter.become(self.preempt.buildProtocol(sorter.addr) if self.preempt.preempt is None else None)
