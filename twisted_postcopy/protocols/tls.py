# -*- test-case-name: tests.test_tls -*-
"""
TLS on the migration channels (docs/tls.md), the way QEMU 7.2 runs it: the
source is the TLS client and the destination the TLS server, on the main
connection (whose return path is the same TLS session) and on the preempt
and recovery connections alike.

A connection's migration protocol is only built once the handshake
completed and the peer passed every check of its
L{twisted_postcopy.tlscreds.TLSPolicy}: until then a placeholder
(L{_PendingTLS}) holds the place, so a peer that fails TLS never becomes the
destination's main channel and never gets a byte of the stream.  A refused
handshake is reported through C{refused} with QEMU's text.  Failures after
that (an alert in the middle of the stream) reach the migration protocol's
C{connectionLost} as a L{TLSError} with a readable reason.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import (
    IHandshakeListener, IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_postcopy.tlscreds import TLSError, TLSPolicy, sslErrorText

log = Logger()

#: Seconds a connection may take to complete its TLS handshake and checks
#: before it is dropped (a peer that connects and says nothing must not
#: hold a connection for ever).
HANDSHAKE_TIMEOUT = 30.0

#: Application bytes handed to OpenSSL per C{SSL_write} (OpenSSL splits
#: them into 16 KiB records).
WRITE_BATCH = 1 << 18


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class _ConnectionCreator:
    """
    Makes the pyOpenSSL connection of each TLS migration connection.

    @ivar policy: the side's policy.
    """

    def __init__(self, policy: TLSPolicy) -> None:
        """
        @param policy: the side's policy.
        """
        self.policy = policy

    def _connection(self, tlsProtocol: Any) -> Any:
        """
        @param tlsProtocol: the L{MigrationTLSProtocol}.
        @return: its connection; chain verification errors are recorded
            on C{tlsProtocol.verifyError}.
        """
        def record(reason: str) -> None:
            """
            @param reason: QEMU's text for the refused chain.
            """
            tlsProtocol.verifyError = reason

        connection = self.policy.connection(record)
        connection.set_app_data(tlsProtocol)
        return connection

    clientConnectionForTLS = _connection
    serverConnectionForTLS = _connection


class MigrationTLSProtocol(TLSMemoryBIOProtocol):
    """
    The TLS layer of one migration connection: reports TLS failures as a
    L{TLSError} naming the reason rather than OpenSSL's error list.

    Writes are not aggregated (unlike Twisted's default
    C{BufferingTLSTransport}): a return-path page request leaves at once,
    the source's writes are large already, and C{transport.write} stays a
    method of the transport (the recovery code identifies a migration's
    current connection by it).

    @ivar verifyError: why the peer's chain was refused, if it was.
    @ivar peerIdentity: the verified peer certificate's distinguished
        name (as C{tls-authz} compares it: see
        L{twisted_postcopy.tlscreds.distinguishedName}), once the handshake
        passed; None without C{verify-peer}.
    """

    verifyError: str | None = None
    peerIdentity: str | None = None

    def _write(self, data: Any) -> None:
        """
        Encrypt application bytes in large batches: up to L{WRITE_BATCH}
        bytes per C{SSL_write} (OpenSSL cuts the records), given as a
        memoryview (no copy of the caller's buffer), and the whole send
        BIO drained at once, instead of Twisted's one 16 KiB slice (a
        copy) and one 32 KiB BIO read per record.

        @param data: bytes or a buffer.
        """
        from OpenSSL.SSL import Error, WantReadError

        if self._lostTLSConnection:
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += self._tlsConnection.send(view[done : done + WRITE_BATCH])
            except WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            self._drainSendBIO()

    def _flushReceiveBIO(self) -> None:
        """
        Decrypt every complete record received and hand the plaintext to
        the protocol in one call (Twisted's loop calls C{dataReceived}
        once per 16 KiB record, which quadruples the per-call work of the
        stream decoder and the page placer); end-of-TLS and errors are
        handled as Twisted does, after delivering what came before them.
        """
        from OpenSSL.SSL import Error, WantReadError, ZeroReturnError

        chunks: list[bytes] = []
        ended: Failure | None = None
        closed = False
        while not self._lostTLSConnection and ended is None and not closed:
            try:
                chunks.append(self._tlsConnection.recv(1 << 16))
            except WantReadError:
                break
            except ZeroReturnError:
                closed = True
            except Error:
                ended = Failure()
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, b"".join(chunks))
        if closed:
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        elif ended is not None:
            self._tlsShutdownFinished(ended)
        self._drainSendBIO()

    def _drainSendBIO(self) -> None:
        """
        Write everything OpenSSL produced to the underlying transport.
        """
        from OpenSSL.SSL import WantReadError

        while True:
            try:
                chunk = self._tlsConnection.bio_read(WRITE_BATCH + (WRITE_BATCH >> 4))
            except WantReadError:
                return
            self.transport.write(chunk)

    def _shutdownTLS(self) -> None:
        """
        Send TLS's close_notify and close the connection at once, without
        waiting for the peer's (a migration reads nothing after it ended;
        QEMU 7.2 just closes its socket), so a migration connection closes
        as promptly as a plain one.
        """
        from OpenSSL import SSL

        try:
            self._tlsConnection.shutdown()
        except SSL.Error:
            pass
        self._drainSendBIO()
        self.transport.loseConnection()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        """
        Turn an OpenSSL error into a L{TLSError}.

        @param reason: why the TLS connection ended, if by an error.
        """
        from OpenSSL import SSL

        original = reason
        super()._tlsShutdownFinished(reason)
        if (original is not None and self._reason is original
                and isinstance(original.value, SSL.Error)
                and not isinstance(original.value, (SSL.ZeroReturnError, SSL.SysCallError))):
            text = self.verifyError or sslErrorText(original.value)
            side = "client" if self.factory._isClient else "server"
            self._reason = Failure(TLSError(f"TLS handshake failed ({side}): {text}"))


class MigrationTLSFactory(TLSMemoryBIOFactory):
    """
    Wraps a migration factory in TLS, building its protocols only after a
    verified handshake.

    @ivar policy: the side's policy.
    @ivar refused: called with a L{TLSError} for each connection refused
        before its protocol was built.
    @ivar connected: called with each migration protocol once it is
        connected (after the verified handshake).
    @ivar handshakeTimeout: seconds allowed for the handshake.
    """

    handshakeTimeout = HANDSHAKE_TIMEOUT

    protocol = MigrationTLSProtocol

    def __init__(self, policy: TLSPolicy, wrappedFactory: Any,
                 refused: Callable[[TLSError], object] | None = None,
                 clock: Any = None,
                 connected: Callable[[Any], object] | None = None) -> None:
        """
        @param policy: the side's policy.
        @param wrappedFactory: the migration factory.
        @param refused: reports refused handshakes (default: log them).
        @param clock: the reactor's clock (default: the reactor).
        @param connected: told of each connected migration protocol.
        """
        self.policy = policy
        self.connected = connected
        self._isClient = policy.isClient
        self.migrationFactory = wrappedFactory
        self.refused = refused or (lambda error: log.warn(
            "TLS migration connection refused: {error}", error=error))
        super().__init__(_ConnectionCreator(policy), policy.isClient,
                         _PendingFactory(self), clock)


class _PendingFactory(Factory):
    """
    Builds the placeholder protocol of each TLS connection.

    @ivar tls: the L{MigrationTLSFactory}.
    """

    def __init__(self, tls: MigrationTLSFactory) -> None:
        """
        @param tls: the TLS factory.
        """
        self.tls = tls

    def buildProtocol(self, addr: Any) -> Protocol:
        """
        @param addr: the peer.
        @return: a placeholder.
        """
        return _PendingTLS(self.tls, addr)


@implementer(IHandshakeListener)
class _PendingTLS(Protocol):
    """
    Stands in for the migration protocol until the handshake completed
    and the peer passed the checks, then hands the connection over.

    @ivar tls: the L{MigrationTLSFactory}.
    @ivar addr: the peer's address.
    @ivar finished: whether the connection was handed over or refused.
    """

    def __init__(self, tls: MigrationTLSFactory, addr: Any) -> None:
        """
        @param tls: the TLS factory.
        @param addr: the peer.
        """
        self.tls = tls
        self.addr = addr
        self.finished = False
        self._early: list[bytes] = []
        self._timeout: Any = None

    def connectionMade(self) -> None:
        """
        Start the handshake timer.
        """
        self._timeout = self.tls._clock.callLater(self.tls.handshakeTimeout, self._timedOut)

    def _timedOut(self) -> None:
        """
        The handshake took too long: drop the connection.
        """
        self._timeout = None
        self._refuse(TLSError(f"TLS handshake timed out after {self.tls.handshakeTimeout:g} s"))
        self.transport.abortConnection()

    def _stopTimer(self) -> None:
        """
        Cancel the handshake timer, if running.
        """
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None

    def handshakeCompleted(self) -> None:
        """
        Check the peer; build and connect the migration protocol.
        """
        self._stopTimer()
        transport = self.transport
        try:
            transport.peerIdentity = self.tls.policy.checkPeer(transport.getPeerCertificate())
        except TLSError as error:
            self._refuse(error)
            transport.abortConnection()
            return
        protocol = self.tls.migrationFactory.buildProtocol(self.addr)
        self.finished = True
        if protocol is None:
            transport.loseConnection()
            return
        transport.wrappedProtocol = protocol
        protocol.makeConnection(transport)
        if self.tls.connected is not None:
            self.tls.connected(protocol)
        if self._early:
            protocol.dataReceived(b"".join(self._early))

    def dataReceived(self, data: bytes) -> None:
        """
        Nothing arrives before the handshake; keep it if it does.

        @param data: bytes.
        """
        self._early.append(data)

    def connectionLost(self, reason: Failure) -> None:
        """
        The connection ended during the handshake or its checks.

        @param reason: why.
        """
        self._stopTimer()
        if not self.finished:
            value = reason.value
            if not isinstance(value, TLSError):
                value = TLSError(f"TLS handshake failed ({'client' if self.tls.policy.isClient else 'server'}): "
                                 f"{reason.getErrorMessage()}")
            self._refuse(value)

    def _refuse(self, error: TLSError) -> None:
        """
        Report a refused connection once.

        @param error: why.
        """
        if not self.finished:
            self.finished = True
            self.tls.refused(error)


def wrapServer(policy: TLSPolicy | None, factory: Any,
               refused: Callable[[TLSError], object] | None = None) -> Any:
    """
    @param policy: the destination's policy, or None for plaintext.
    @param factory: the migration factory.
    @param refused: reports refused handshakes (default: log them).
    @return: the factory to listen with.
    """
    return factory if policy is None else MigrationTLSFactory(policy, factory, refused)


def connectMaybeTLS(endpoint: Any, policy: TLSPolicy | None, factory: Any) -> Any:
    """
    Connect a migration factory, over TLS when a policy is given.

    @param endpoint: a client endpoint.
    @param policy: the source's policy, or None for plaintext.
    @param factory: the migration factory.
    @return: a Deferred firing with the migration protocol once it is
        built (after a verified handshake), or failing with the connect
        error or the L{TLSError}.
    """
    from twisted.internet.defer import Deferred

    if policy is None:
        return endpoint.connect(factory)
    ready: Deferred = Deferred()

    def connected(protocol: Any) -> None:
        """
        @param protocol: the connected migration protocol.
        """
        if not ready.called:
            ready.callback(protocol)

    def refused(error: TLSError) -> None:
        """
        @param error: why the handshake failed.
        """
        if not ready.called:
            ready.errback(error)

    def failed(reason: Failure) -> None:
        """
        @param reason: the connect failure.
        """
        if not ready.called:
            ready.errback(reason)

    endpoint.connect(MigrationTLSFactory(policy, factory, refused, connected=connected)
                     ).addErrback(failed)
    return ready
