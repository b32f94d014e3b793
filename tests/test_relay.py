# -*- test-case-name: tests.test_relay -*-
"""
Tests for L{twisted_postcopy.testing.relay}, over real loopback sockets.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.relay import RecordingRelay


def receiveAll(sock: socket.socket) -> bytes:
    """
    Read until end of stream.

    @param sock: a connected socket with a timeout.
    @return: everything received.
    """
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class RecordingRelayTests(SynchronousTestCase):
    """
    Tests for L{RecordingRelay}.
    """

    def setUp(self) -> None:
        """
        Listen on a loopback target and put a relay in front of it.
        """
        self.target = socket.create_server(("127.0.0.1", 0))
        self.target.settimeout(10)
        self.addCleanup(self.target.close)
        self.relay = RecordingRelay(self.target.getsockname())
        self.addCleanup(self.relay.close)

    def connect(self) -> tuple[socket.socket, socket.socket]:
        """
        Open one connection through the relay.

        @return: the client socket and the target's accepted socket.
        """
        client = socket.create_connection(("127.0.0.1", self.relay.port), timeout=10)
        self.addCleanup(client.close)
        server, _ = self.target.accept()
        server.settimeout(10)
        self.addCleanup(server.close)
        return client, server

    def test_forwardsAndRecordsBothDirections(self) -> None:
        """
        Bytes flow unchanged both ways, each direction is recorded
        separately, and a half-close is forwarded so each side sees EOF.
        """
        client, server = self.connect()
        payload = bytes(range(256)) * 4096
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        self.assertEqual(receiveAll(server), payload)
        server.sendall(b"return path")
        server.shutdown(socket.SHUT_WR)
        self.assertEqual(receiveAll(client), b"return path")
        self.relay.waitClosed(10)
        (connection,) = self.relay.connections
        self.assertEqual(bytes(connection.forward), payload)
        self.assertEqual(bytes(connection.backward), b"return path")

    def test_connectionsInAcceptOrder(self) -> None:
        """
        Every connection is recorded on its own, indexed in accept order.
        """
        first, firstServer = self.connect()
        first.sendall(b"one")
        self.relay.waitConnections(1)
        second, secondServer = self.connect()
        second.sendall(b"two")
        connections = self.relay.waitConnections(2)
        for sock in (first, second, firstServer, secondServer):
            sock.close()
        self.relay.waitClosed(10)
        self.assertEqual([c.index for c in connections], [0, 1])
        self.assertEqual([bytes(c.forward) for c in connections], [b"one", b"two"])

    def test_cut(self) -> None:
        """
        L{RecordingRelay.cut} drops every connection: both ends see the
        stream end, and what crossed before the cut stays recorded.
        """
        client, server = self.connect()
        client.sendall(b"before")
        self.assertEqual(server.recv(6), b"before")
        self.relay.cut()
        self.assertEqual(receiveAll(server), b"")
        self.assertEqual(receiveAll(client), b"")
        self.relay.waitClosed(10)
        self.assertEqual(bytes(self.relay.connections[0].forward), b"before")

    def test_save(self) -> None:
        """
        L{RecordingRelay.save} writes each direction of each connection to
        its own file.
        """
        client, server = self.connect()
        client.sendall(b"main stream")
        self.assertEqual(server.recv(11), b"main stream")
        server.sendall(b"rp")
        self.assertEqual(client.recv(2), b"rp")
        client.close()
        server.close()
        self.relay.waitClosed(10)
        directory = self.mktemp()
        os.makedirs(directory)
        paths = self.relay.save(directory)
        contents = []
        for path in paths:
            with open(path, "rb") as record:
                contents.append((os.path.basename(path), record.read()))
        self.assertEqual(contents, [
            ("connection-0.forward", b"main stream"),
            ("connection-0.backward", b"rp"),
        ])

    def test_uri(self) -> None:
        """
        The relay's migration URI names its loopback port.
        """
        self.assertEqual(self.relay.uri, f"tcp:127.0.0.1:{self.relay.port}")

    def test_waitConnectionsTimeout(self) -> None:
        """
        Waiting for a connection that never comes raises L{TimeoutError}.
        """
        self.assertRaises(TimeoutError, self.relay.waitConnections, 1, 0.05)
