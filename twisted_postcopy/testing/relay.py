# -*- test-case-name: tests.test_relay -*-
"""
A recording loopback TCP relay for tests.

L{RecordingRelay} listens on C{127.0.0.1}, and for every accepted connection
opens one to the target (for example a QEMU destination's C{-incoming}
port) and forwards both directions unchanged, recording each direction of
each connection in a L{RelayedConnection}.  Put it between a QEMU source and
a QEMU destination to capture a real migration stream (C{forward}) and its
return path (C{backward}); L{RecordingRelay.cut} drops every connection at
once, as a network failure would, for recovery tests.

It runs in plain threads with blocking sockets so that it works the same
whether or not a reactor runs in the test process.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from attrs import define, field

_CHUNK = 1 << 16


@define
class RelayedConnection:
    """
    One relayed connection and what crossed it.

    @ivar index: the accept order, from 0.
    @ivar forward: bytes sent by the connecting side (a migration source).
    @ivar backward: bytes sent back by the target (the return path).
    @ivar closed: set once both directions ended.
    @ivar dropped: bytes from the connecting side dropped by
        L{blackhole}.
    """

    index: int
    _client: socket.socket
    _server: socket.socket
    forward: bytearray = field(factory=bytearray)
    backward: bytearray = field(factory=bytearray)
    closed: threading.Event = field(factory=threading.Event)
    dropped: int = 0
    _dropping: threading.Event = field(factory=threading.Event)
    _lock: threading.Lock = field(factory=threading.Lock)
    _ended: int = 0
    _flowing: threading.Event = field(factory=threading.Event)

    def __attrs_post_init__(self) -> None:
        """
        Forward at once until L{hold}.
        """
        self._flowing.set()

    def hold(self) -> None:
        """
        Stop reading what the connecting side sends (the forward
        direction): its bytes back up in the kernel's buffers and then in
        the sender, as behind a saturated link, while the return direction
        still flows.  L{release} (or L{cut}) lets them go on.
        """
        self._flowing.clear()

    def release(self) -> None:
        """
        Forward again after L{hold}.
        """
        self._flowing.set()

    def start(self) -> None:
        """
        Start one pump thread per direction.
        """
        pumps = [
            (self._client, self._server, self.forward, self._flowing),
            (self._server, self._client, self.backward, None),
        ]
        for source, sink, record, flowing in pumps:
            threading.Thread(
                target=self._pump, args=(source, sink, record, flowing), daemon=True,
                name=f"relay-{self.index}",
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, record: bytearray,
        flowing: threading.Event | None = None,
    ) -> None:
        """
        Copy C{source} to C{sink}, recording, until EOF or an error; then
        half-close C{sink} so the other side sees the end of stream.

        @param source: the socket read from.
        @param sink: the socket written to.
        @param record: where the bytes are appended.
        @param flowing: waited for before each read (see L{hold}), or
            L{None}.
        """
        try:
            while True:
                if flowing is not None:
                    flowing.wait()
                data = source.recv(_CHUNK)
                if not data:
                    break
                if record is self.forward and self._dropping.is_set():
                    self.dropped += len(data)
                    continue
                record += data
                sink.sendall(data)
        except OSError:
            self.cut()
        finally:
            _quietly(sink.shutdown, socket.SHUT_WR)
            self._pumpEnded()

    def _pumpEnded(self) -> None:
        """
        Count finished directions; close both sockets after the second.
        """
        with self._lock:
            self._ended += 1
            last = self._ended == 2
        if last:
            _quietly(self._client.close)
            _quietly(self._server.close)
            self.closed.set()

    def blackhole(self) -> None:
        """
        From now on, read what the connecting side sends and drop it
        (counted in C{dropped}, not recorded): a path that went silent
        towards the target while the sender's writes still succeed.
        """
        self._dropping.set()

    def cut(self) -> None:
        """
        Drop the connection in both directions at once.
        """
        self._flowing.set()
        for sock in (self._client, self._server):
            _quietly(sock.shutdown, socket.SHUT_RDWR)


def _quietly(operation: object, *arguments: object) -> None:
    """
    Call a socket operation, ignoring the C{OSError} of a dead socket.

    @param operation: the callable.
    @param arguments: its arguments.
    """
    try:
        operation(*arguments)  # type: ignore[operator]
    except OSError:
        pass


@define
class RecordingRelay:
    """
    Listen on loopback and relay every connection to C{target}.

    @ivar target: the C{(host, port)} connected to for each accepted
        connection.
    @ivar connections: the relayed connections, in accept order.
    @ivar port: the loopback port the relay listens on.
    """

    target: tuple[str, int]
    connections: list[RelayedConnection] = field(factory=list)
    _listener: socket.socket = field(init=False)
    _accepted: threading.Condition = field(factory=threading.Condition)

    def __attrs_post_init__(self) -> None:
        """
        Bind the listening socket and start the accept thread.
        """
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._acceptLoop, daemon=True, name="relay").start()

    @property
    def port(self) -> int:
        """
        @return: the port to give the source, as C{tcp:127.0.0.1:PORT}.
        """
        return self._listener.getsockname()[1]

    @property
    def uri(self) -> str:
        """
        @return: the QEMU migration URI of the relay.
        """
        return f"tcp:127.0.0.1:{self.port}"

    def _acceptLoop(self) -> None:
        """
        Accept connections until L{close}; relay each one to the target.
        A refused target connection closes the accepted one.
        """
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._accepted:
                connection = RelayedConnection(len(self.connections), client, server)
                self.connections.append(connection)
                self._accepted.notify_all()
            connection.start()

    def waitConnections(self, count: int, timeout: float = 30.0) -> list[RelayedConnection]:
        """
        Wait until at least C{count} connections were accepted.

        @param count: the number of connections awaited.
        @param timeout: seconds to wait at most.
        @return: the connections so far.
        @raise TimeoutError: when fewer arrive in time.
        """
        with self._accepted:
            if not self._accepted.wait_for(
                lambda: len(self.connections) >= count, timeout
            ):
                raise TimeoutError(f"only {len(self.connections)} of {count} connections")
            return list(self.connections)

    def waitClosed(self, timeout: float = 30.0) -> None:
        """
        Wait until every connection so far has ended in both directions.

        @param timeout: seconds to wait at most (for each connection).
        @raise TimeoutError: when one is still open.
        """
        for connection in list(self.connections):
            if not connection.closed.wait(timeout):
                raise TimeoutError(f"relayed connection {connection.index} still open")

    def save(self, directory: str) -> list[str]:
        """
        Write each direction of each connection to its own file,
        C{connection-I{n}.forward} and C{connection-I{n}.backward}.

        @param directory: an existing directory.
        @return: the paths written, in connection order.
        """
        paths = []
        for connection in list(self.connections):
            for direction in ("forward", "backward"):
                path = os.path.join(directory, f"connection-{connection.index}.{direction}")
                with open(path, "wb") as record:
                    record.write(getattr(connection, direction))
                paths.append(path)
        return paths

    def cut(self) -> None:
        """
        Drop every current connection (the listener keeps accepting).
        """
        for connection in list(self.connections):
            connection.cut()

    def close(self) -> None:
        """
        Stop listening and drop every connection.
        """
        _quietly(self._listener.shutdown, socket.SHUT_RDWR)
        _quietly(self._listener.close)
        self.cut()


def relayFor(case: Any, target: tuple[str, int]) -> RecordingRelay:
    """
    @param case: a test case (the relay is closed at its cleanup).
    @param target: where to relay to.
    @return: a relay to C{target}.
    """
    relay = RecordingRelay(target)
    case.addCleanup(relay.close)
    return relay
