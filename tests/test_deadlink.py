# -*- test-case-name: tests.test_deadlink -*-
"""
Tests for L{twisted_postcopy.protocols.deadlink}: the kernel options set
on migration sockets, the kernel's silence measure on real loopback
sockets, and the watchdog's decisions on a L{Clock}.  Real silent cuts
(a veth link taken down between two network namespaces) are in
C{tests/test_recovery_netns.py}.
"""

from __future__ import annotations

import socket
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.protocols.deadlink import (
    LinkWatchdog, checkLinkTimeout, configureSocket, keepaliveSettings, silenceMs)


class _SocketTransport:
    """
    The part of a TCP transport the helpers use: C{getHandle} and
    C{abortConnection}.

    @ivar sock: the socket.
    @ivar aborted: whether C{abortConnection} was called.
    """

    def __init__(self, sock: socket.socket) -> None:
        """
        @param sock: the socket.
        """
        self.sock = sock
        self.aborted = False

    def getHandle(self) -> socket.socket:
        """
        @return: the socket.
        """
        return self.sock

    def abortConnection(self) -> None:
        """
        Record the abort.
        """
        self.aborted = True


def _pair(test: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """
    @param test: closes the sockets at its end.
    @return: a connected loopback TCP pair.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for each in (client, server):
        test.addCleanup(each.close)
    return client, server


class SocketOptionTests(SynchronousTestCase):
    """
    L{configureSocket} and L{keepaliveSettings}.
    """

    def test_settings(self) -> None:
        """
        The first probe comes after half the timeout (at least 1 s), and
        TCP_USER_TIMEOUT is the timeout.
        """
        self.assertEqual(keepaliveSettings(2000), {
            socket.TCP_KEEPIDLE: 1, socket.TCP_KEEPINTVL: 1, socket.TCP_KEEPCNT: 1,
            socket.TCP_USER_TIMEOUT: 2000})
        settings = keepaliveSettings(10000)
        self.assertEqual((settings[socket.TCP_KEEPIDLE], settings[socket.TCP_USER_TIMEOUT]), (5, 10000))

    def test_tcpSocket(self) -> None:
        """
        A TCP socket gets SO_KEEPALIVE and the TCP options, readable back.
        """
        client, _ = _pair(self)
        self.assertTrue(configureSocket(_SocketTransport(client), 3000))
        self.assertEqual(client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 3000)
        self.assertEqual(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 1)

    def test_notTCP(self) -> None:
        """
        A UNIX socket, a transport without a socket, or timeout 0: nothing
        is set.
        """
        unix, other = socket.socketpair()
        self.addCleanup(unix.close)
        self.addCleanup(other.close)
        self.assertFalse(configureSocket(_SocketTransport(unix), 2000))
        self.assertFalse(configureSocket(StringTransport(), 2000))
        client, _ = _pair(self)
        self.assertFalse(configureSocket(_SocketTransport(client), 0))
        self.assertEqual(client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        self.assertIsNone(silenceMs(StringTransport()))

    def test_range(self) -> None:
        """
        0 (off) or 1500 ms to one hour.
        """
        checkLinkTimeout(0)
        checkLinkTimeout(1500)
        self.assertRaises(ValueError, checkLinkTimeout, 1499)
        self.assertRaises(ValueError, checkLinkTimeout, 3600001)


class SilenceTests(SynchronousTestCase):
    """
    L{silenceMs} reads the kernel's time since anything arrived.
    """

    def test_silence(self) -> None:
        """
        Right after data arrived the silence is short; it grows while
        nothing arrives; it counts from the last data or ACK, not from
        when the application read it.
        """
        client, server = _pair(self)
        client.sendall(b"x")
        time.sleep(0.25)
        silent = silenceMs(_SocketTransport(server))
        self.assertGreaterEqual(silent, 200)
        self.assertLess(silent, 5000)
        client.sendall(b"y")
        time.sleep(0.02)
        self.assertLess(silenceMs(_SocketTransport(server)), silent)


class WatchdogTests(SynchronousTestCase):
    """
    L{LinkWatchdog} on a L{Clock} with a measured silence given by the test.
    """

    def setUp(self) -> None:
        """
        A watchdog over a fake transport, with a silence the test sets.
        """
        self.clock = Clock()
        self.silent = 0
        self.timeout = 2000
        self.dead: list[int] = []
        self.transport = _SocketTransport(None)  # type: ignore[arg-type]
        self.watchdog = LinkWatchdog(self.clock, self.transport, lambda: self.timeout,
                                     self.dead.append, lambda transport: self.silent)
        self.watchdog.start()

    def test_alive(self) -> None:
        """
        While something arrives, the check only reschedules, at the
        moment the deadline (the timeout less 100 ms) would expire.
        """
        self.silent = 500
        self.clock.advance(1.9)
        self.assertFalse(self.transport.aborted)
        self.assertAlmostEqual(self.watchdog.call.getTime(), 3.3)

    def test_dead(self) -> None:
        """
        Nothing received for the deadline: C{onDead}, then the abort.
        """
        self.silent = 1000
        self.clock.advance(1.9)
        self.silent = 1900
        self.clock.advance(0.9)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.dead, [1900])
        self.assertIsNone(self.watchdog.call)

    def test_live(self) -> None:
        """
        The timeout is read at each check; 0 turns the check off.
        """
        self.timeout = 0
        self.silent = 10 ** 6
        self.clock.advance(2.0)
        self.assertFalse(self.transport.aborted)
        self.timeout = 5000
        self.clock.advance(2.0)
        self.assertTrue(self.transport.aborted)

    def test_stop(self) -> None:
        """
        L{LinkWatchdog.stop} cancels the pending check.
        """
        self.watchdog.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lostReason(self) -> None:
        """
        After the watchdog dropped the connection, the reason names the
        silence; otherwise it is the connection's own.
        """
        from twisted.python.failure import Failure

        from twisted_postcopy.protocols.deadlink import lostReason

        reason = Failure(ConnectionError("reset"))
        self.assertEqual(lostReason(self.watchdog, reason), "reset")
        self.assertEqual(lostReason(None, reason), "reset")
        self.silent = 1950
        self.clock.advance(1.9)
        self.assertEqual(lostReason(self.watchdog, reason),
                         "nothing received from the peer for 1950 ms (dead link)")


class LateReactorTests(SynchronousTestCase):
    """
    A reactor that runs late (a loaded machine) must not take a live link
    for a dead one.
    """

    def test_unreadBytesCount(self) -> None:
        """
        The peer keeps sending while the application reads nothing for
        longer than the timeout (its reactor was busy): the kernel received
        the bytes, so the late check finds a short silence and the link is
        kept.
        """
        client, server = _pair(self)
        transport = _SocketTransport(server)
        clock = Clock()
        watchdog = LinkWatchdog(clock, transport, lambda: 1500)
        watchdog.start()
        for _ in range(9):
            client.sendall(b"x" * 100)
            time.sleep(0.2)
        clock.advance(1.8)
        self.assertFalse(transport.aborted)
        self.assertIsNotNone(watchdog.call)
        watchdog.stop()
