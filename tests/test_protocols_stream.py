# -*- test-case-name: tests.test_protocols_stream -*-
"""
Tests for L{twisted_postcopy.protocols.stream} and the interim codec, with
L{StringTransport} and L{Clock}: the exact bytes a source writes (checked
against QEMU 7.2 capture vectors) and a destination fed one byte at a time.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM, PAGE
from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.errors import RemoteProtocolError
from tests import wirebytes as c
from twisted_postcopy.protocols.sockets import RECEIVE_CHUNK, readInLargeChunks, sendAtOnce
from twisted_postcopy.protocols.stream import POSTCOPY_SNDBUF, DestinationProtocol, SourceProtocol
from twisted_postcopy.source.outgoing import OutgoingMigration
from twisted_postcopy.wire.config import encodeCapabilities

#: migration-stream.md appendix A and B.
HEADER = bytes.fromhex("5145564d00000003070000000d70632d6934343066782d372e32")
RP_PING_ADVISE = bytes.fromhex(
    "0800010000" "080002000400000001" "0800030010" "0000000000001000" "0000000000001000")
#: Appendix H (PING 2).
PING2 = bytes.fromhex("080002000400000002")
#: Appendix K: END with EOS only, then EOF.
POSTCOPY_TAIL = bytes.fromhex("03000000020000000000000010" "7e00000002" "00")


def _source(capabilities: dict[str, bool], sizes: dict[str, int] | None = None,
            configuration: bytes | None = None):
    """
    @param configuration: the VM's optional C{configuration} attribute
        (left unset when L{None}).
    @return: (vm, migration, protocol, transport, clock) of a connected
        source.
    """
    vm = OutgoingTestVM(sizes or {"pc.ram": 16 * PAGE})
    if configuration is not None:
        vm.configuration = configuration
    vm.write(0, 3 * PAGE, b"x" * PAGE)
    clock = Clock()
    parameters = {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300}
    migration = OutgoingMigration(vm, None, clock.seconds, capabilities, parameters)
    migration.begin()
    protocol = SourceProtocol(migration, clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return vm, migration, protocol, transport, clock


def _run(clock: Clock, migration: OutgoingMigration) -> None:
    """
    Advance the clock until the migration wrote everything.
    """
    for _ in range(1000):
        if migration.written or not migration.machine.inProgress:
            return
        clock.advance(0.1)


class SourceBytesTests(SynchronousTestCase):
    """
    The source's bytes match QEMU 7.2's.
    """

    def test_postcopyPreamble(self) -> None:
        """
        With postcopy-ram the stream starts with the captured header,
        OPEN_RETURN_PATH, PING(1) and ADVISE(4096, 4096), then RAM START.
        """
        _, _, _, transport, _ = _source({"postcopy-ram": True})
        data = transport.value()
        self.assertEqual(data[: len(HEADER)], HEADER)
        rest = data[len(HEADER):]
        self.assertEqual(rest[: len(RP_PING_ADVISE)], RP_PING_ADVISE)
        start = rest[len(RP_PING_ADVISE):]
        self.assertEqual(start[:17], bytes.fromhex("01000000020372616d0000000000000004"))
        self.assertEqual(start[17:25], struct.pack(">Q", 16 * PAGE | c.MEM_SIZE))

    def test_postcopySwitch(self) -> None:
        """
        An immediate switch discards the whole block in one command, then
        PING 2, the package [LISTEN, PING 3, RUN], PING 4; the stream ends
        with END(EOS) and EOF, and completion waits for SHUT(0).
        """
        vm, migration, protocol, transport, clock = _source({"postcopy-ram": True})
        transport.clear()
        migration.postcopyRequested = True
        _run(clock, migration)
        data = transport.value()
        whole = c.discard("pc.ram", [(0, 16 * PAGE)])
        self.assertEqual(whole, bytes.fromhex("0800060019000670632e72616d00")
                         + struct.pack(">QQ", 0, 16 * PAGE))
        package = c._LISTEN + c.PACKAGE_TAIL
        expected = whole + PING2 + bytes.fromhex("0800070004") + struct.pack(">I", len(package))
        expected += package + bytes.fromhex("080002000400000004")
        self.assertEqual(data[: len(expected)], expected)
        first = data[len(expected):]
        self.assertEqual(first[:5], bytes.fromhex("0200000002"))
        self.assertEqual(first[5:13 + 7], struct.pack(">Q", c.ZERO) + c.str8("pc.ram"))
        self.assertTrue(data.endswith(POSTCOPY_TAIL))
        self.assertEqual(migration.machine.status.value, "postcopy-active")
        protocol.dataReceived(c.rpMessage(c.RP_SHUT, b"\0\0\0\0"))
        self.assertEqual(migration.machine.status.value, "completed")
        self.assertFalse(vm.running)

    def test_requestNotThrottled(self) -> None:
        """
        In postcopy, with background pages held by C{max-postcopy-bandwidth}
        (the step waits for the next window), a page request is answered at
        once: the requested page is written before the clock moves.
        """
        vm, migration, protocol, transport, clock = _source({"postcopy-ram": True},
                                                            {"pc.ram": 64 * PAGE})
        for page in range(64):
            vm.write(0, page * PAGE, b"background %d" % page)
        vm.write(0, 40 * PAGE, b"requested" * 400)
        migration.parameters["max-postcopy-bandwidth"] = 20 * PAGE
        migration.postcopyRequested = True
        for _ in range(20):
            clock.advance(0)
        self.assertEqual(migration.machine.status.value, "postcopy-active")
        self.assertTrue(migration.limiter.limited())
        self.assertTrue(clock.getDelayedCalls())
        self.assertNotIn(b"requested", transport.value())
        sent = len(transport.value())
        protocol.dataReceived(c.rpMessage(c.RP_REQ_PAGES_ID, struct.pack(">QI", 40 * PAGE, PAGE)
                                          + c.str8("pc.ram")))
        clock.advance(0)
        self.assertIn(b"requested" * 400, transport.value()[sent:])

    def test_precopyEnd(self) -> None:
        """
        A precopy stream without a return path ends with END, EOF and a
        vmdesc, and completes without waiting.
        """
        _, migration, _, transport, clock = _source({})
        _run(clock, migration)
        data = transport.value()
        vmdesc = b'{"page_size": 4096, "devices": []}'
        self.assertTrue(data.endswith(b"\x00\x06" + struct.pack(">I", len(vmdesc)) + vmdesc))
        self.assertEqual(migration.machine.status.value, "completed")
        self.assertTrue(transport.disconnecting)

    def test_badRequestFails(self) -> None:
        """
        A REQ_PAGES_ID naming no block fails the migration with QEMU's text
        and the source VM keeps running.
        """
        vm, migration, protocol, transport, _ = _source({"postcopy-ram": True})
        protocol.dataReceived(c.rpMessage(c.RP_REQ_PAGES_ID, struct.pack(">QI", 0, PAGE) + c.str8("xyz")))
        self.assertEqual(migration.machine.status.value, "failed")
        self.assertEqual(migration.stats.error, "ram_save_queue_pages no block 'xyz'")
        self.assertEqual(migration.stats.postcopyRequests, 1)
        self.assertTrue(vm.running)

    def test_returnPathGarbage(self) -> None:
        """
        An invalid return-path message type fails the migration.
        """
        _, migration, protocol, _, _ = _source({"return-path": True})
        protocol.dataReceived(c.rpMessage(7, b"\0\0\0\0"))
        self.assertEqual(migration.machine.status.value, "failed")

    def test_backpressure(self) -> None:
        """
        While the transport says pause, no step runs.
        """
        _, migration, protocol, transport, clock = _source({}, {"pc.ram": 1024 * PAGE})
        protocol.pauseProducing()
        size = len(transport.value())
        clock.advance(1)
        self.assertEqual(len(transport.value()), size)
        protocol.resumeProducing()
        clock.advance(0)
        self.assertGreater(len(transport.value()), size)


class DestinationByteByByteTests(SynchronousTestCase):
    """
    A destination fed one byte at a time.
    """

    def _feed(self, stream: bytes, postcopy: bool = False):
        """
        Feed C{stream} to a fresh destination one byte at a time.

        @return: (vm, incoming migration, return-path transport).
        """
        vm = IncomingTestVM()
        incoming = IncomingMigration(vm, None, postcopy)
        incoming.machine.setup()
        protocol = DestinationProtocol(incoming)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for i in range(len(stream)):
            protocol.dataReceived(stream[i : i + 1])
        return vm, incoming, transport

    def test_precopyStream(self) -> None:
        """
        A source's precopy stream with return path, fed byte by byte,
        fills the destination; the return path carries PONG(1) then SHUT(0).
        """
        src, migration, _, transport, clock = _source({"return-path": True})
        device = (c.sectionHeader(c.FULL, 9, "twisted-postcopy/x", 0, 1)
                  + struct.pack(">I", 3) + b"abc" + c.footer(9))
        src.device = device
        _run(clock, migration)
        vm, incoming, rp = self._feed(transport.value())
        self.assertEqual(vm.contents(), src.contents())
        self.assertEqual(vm.devices, [device])
        self.assertEqual(rp.value(), c.rpMessage(c.RP_PONG, b"\0\0\0\1") + c.rpMessage(c.RP_SHUT, b"\0\0\0\0"))
        self.assertEqual(incoming.machine.status.status.value, "completed")
        self.assertEqual(vm.events, ["run", "completed"])

    def test_pingWithoutReturnPath(self) -> None:
        """
        A PING before OPEN_RETURN_PATH fails the incoming migration.
        """
        vm, incoming, rp = self._feed(HEADER + bytes.fromhex("080002000400000001"))
        self.assertEqual(incoming.machine.status.status.value, "failed")
        self.assertIsInstance(vm.failure, RemoteProtocolError)
        self.assertTrue(rp.disconnecting)

    def test_adviseWithoutCapability(self) -> None:
        """
        ADVISE to a destination without postcopy-ram fails.
        """
        vm, incoming, _ = self._feed(HEADER + RP_PING_ADVISE)
        self.assertEqual(incoming.machine.status.status.value, "failed")

    def test_continueWithoutBlock(self) -> None:
        """
        A CONTINUE record with no previous block fails the migration (QEMU's
        "Ack, bad migration stream!").
        """
        start = c.sectionHeader(c.START, 2, "ram", 0, 4) + c.ramList([("pc.ram", PAGE)]) + c.footer(2)
        part = c.sectionHeader(c.PART, 2) + c.recordHeader(0, c.ZERO, None) + b"\0"
        vm, incoming, _ = self._feed(HEADER + start + part)
        self.assertIsInstance(vm.failure, RemoteProtocolError)
        self.assertIn("CONTINUE", str(vm.failure))

    def test_badMagic(self) -> None:
        """
        A stream that is not QEVM fails at once.
        """
        vm, incoming, _ = self._feed(b"QEVX" + HEADER[4:])
        self.assertEqual(vm.events, ["failed"])


class _PartialSocket:
    """
    A socket whose C{sendmsg} takes at most C{room} bytes per call.
    """

    def __init__(self, room: int) -> None:
        """
        @param room: bytes accepted per call.
        """
        self.room = room
        self.sent = b""

    def sendmsg(self, buffers) -> int:
        """
        Take up to C{room} bytes of the joined buffers.
        """
        data = b"".join(bytes(b) for b in buffers)[: self.room]
        self.sent += data
        return len(data)

    def setsockopt(self, *arguments: object) -> None:
        """
        Options are ignored.
        """


class _SocketTransport(StringTransport):
    """
    A L{StringTransport} whose C{getHandle} is a stand-in socket and with
    the buffer attributes of Twisted's C{FileDescriptor}, for
    L{SourceProtocol}'s C{sendmsg} path.
    """

    def __init__(self, room: int) -> None:
        """
        @param room: bytes the socket takes per call.
        """
        super().__init__()
        self.socket = _PartialSocket(room)
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0

    def getHandle(self) -> _PartialSocket:
        """
        @return: the stand-in socket.
        """
        return self.socket


class SendmsgTests(SynchronousTestCase):
    """
    The source's gathered writes keep the stream's order whatever the
    socket accepts.
    """

    def _protocol(self, room: int):
        """
        @param room: bytes the socket takes per call.
        @return: a connected source protocol and its transport.
        """
        vm = OutgoingTestVM({"pc.ram": 4 * PAGE})
        migration = OutgoingMigration(vm, None, Clock().seconds, {}, {
            "max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300})
        migration.begin()
        protocol = SourceProtocol(migration, Clock())
        transport = _SocketTransport(room)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_partialSend(self) -> None:
        """
        What the socket did not take goes to the transport, from the exact
        byte where it stopped, for every cut point.
        """
        buffers = [b"head", memoryview(b"A" * 100), b"mid", memoryview(b"B" * 50), b"tail"]
        whole = b"".join(bytes(b) for b in buffers)
        for room in (0, 1, 4, 5, 104, 107, 150, len(whole), len(whole) + 10):
            protocol, transport = self._protocol(room)
            transport.clear()
            transport.socket.sent = b""
            protocol.writeBuffers(list(buffers))
            self.assertEqual(transport.socket.sent + transport.value(), whole, room)

    def test_queuedDataKeepsOrder(self) -> None:
        """
        While the transport holds data, buffers are queued behind it.
        """
        protocol, transport = self._protocol(1000)
        transport._tempDataLen = 1
        transport.clear()
        transport.socket.sent = b""
        protocol.writeBuffers([b"x", memoryview(b"y")])
        self.assertEqual((transport.socket.sent, transport.value()), (b"", b"xy"))
        transport._tempDataLen = 0
        protocol.writeBuffers([b"z"])
        self.assertEqual((transport.socket.sent, transport.value()), (b"z", b"xy"))


class _ConfiguredIncomingVM(IncomingTestVM):
    """
    An incoming VM that records the configuration section it is given.

    @ivar configurations: C{(raw, machine)} per call.
    """

    def __init__(self) -> None:
        """
        Start with no configuration.
        """
        super().__init__()
        self.configurations: list[tuple[bytes, str]] = []

    def configurationReceived(self, raw: bytes, machine: str) -> None:
        """
        @param raw: the section after its type byte.
        @param machine: its machine name.
        """
        self.configurations.append((raw, machine))


class ConfigurationPassThroughTests(SynchronousTestCase):
    """
    The configuration section goes from an L{IOutgoingVM}'s optional
    C{configuration} to an L{IIncomingVM}'s optional C{configurationReceived}
    byte for byte.
    """

    def _migrate(self, configuration: bytes | None) -> tuple[bytes, _ConfiguredIncomingVM]:
        """
        Run a precopy migration from a source VM with C{configuration}
        (absent when L{None}) into a recording destination VM.

        @return: the source's stream and the destination VM.
        """
        _, migration, _, transport, clock = _source({}, configuration=configuration)
        _run(clock, migration)
        vm = _ConfiguredIncomingVM()
        incoming = IncomingMigration(vm, None)
        incoming.machine.setup()
        protocol = DestinationProtocol(incoming)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(transport.value())
        self.assertEqual(vm.events, ["run", "completed"])
        return transport.value(), vm

    def test_builtFromMachine(self) -> None:
        """
        A source VM without C{configuration} sends the section built from
        C{machine}; the destination VM gets it without the type byte.
        """
        stream, vm = self._migrate(None)
        self.assertEqual(stream[: len(HEADER)], HEADER)
        self.assertEqual(vm.configurations, [(HEADER[9:], "pc-i440fx-7.2")])

    def test_verbatim(self) -> None:
        """
        A source VM's C{configuration} with a subsection is sent verbatim
        and handed over verbatim, with the machine name decoded from it.
        """
        name = b"pc-q35-7.2"
        raw = struct.pack(">I", len(name)) + name + encodeCapabilities(["x-ignore-shared"])
        stream, vm = self._migrate(raw)
        self.assertEqual(stream[9 : 9 + len(raw)], raw)
        self.assertEqual(vm.configurations, [(raw, "pc-q35-7.2")])

    def test_vmWithoutMethod(self) -> None:
        """
        A destination VM without C{configurationReceived} is simply not
        told (the precopy migration still completes).
        """
        _, migration, _, transport, clock = _source({})
        _run(clock, migration)
        vm, incoming, _ = DestinationByteByByteTests()._feed(transport.value())
        self.assertFalse(hasattr(vm, "configurationReceived"))
        self.assertEqual(incoming.machine.status.status.value, "completed")


class _HandleTransport:
    """
    A stand-in transport (unit tests only) whose C{getHandle} is a real
    socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        """
        @param sock: the socket.
        """
        self.sock = sock

    def getHandle(self) -> socket.socket:
        """
        @return: the socket.
        """
        return self.sock


class SendAtOnceTests(SynchronousTestCase):
    """
    L{sendAtOnce} switches Nagle's algorithm off on TCP migration sockets.
    """

    def test_tcp(self) -> None:
        """
        A loopback TCP socket gets C{TCP_NODELAY}.
        """
        server = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(server.close)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        self.assertEqual(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        sendAtOnce(_HandleTransport(client))
        self.assertEqual(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_otherTransports(self) -> None:
        """
        A Unix socket and a transport without a socket are left alone.
        """
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        sendAtOnce(_HandleTransport(left))
        sendAtOnce(StringTransport())
        self.assertEqual(left.family, socket.AF_UNIX)


class PostcopySendBufferTests(SynchronousTestCase):
    """
    At the switch to postcopy the main channel's send buffer is made
    short (L{POSTCOPY_SNDBUF}), with or without a preempt channel.
    """

    def test_shortened(self) -> None:
        """
        C{postcopyStarted} sets C{SO_SNDBUF} (which Linux reports doubled)
        on the connection's socket, preempt or not.
        """
        for capabilities in ({"postcopy-ram": True}, {"postcopy-ram": True, "postcopy-preempt": True}):
            _, migration, protocol, _, _ = _source(capabilities)
            server = socket.create_server(("127.0.0.1", 0))
            self.addCleanup(server.close)
            client = socket.create_connection(server.getsockname())
            self.addCleanup(client.close)
            self.assertNotEqual(client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 2 * POSTCOPY_SNDBUF)
            protocol.transport = _HandleTransport(client)
            protocol.postcopyStarted()
            self.assertEqual(client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 2 * POSTCOPY_SNDBUF)


class ReadInLargeChunksTests(SynchronousTestCase):
    """
    L{readInLargeChunks} raises the read size of a destination's main
    channel.
    """

    def test_throughWrapper(self) -> None:
        """
        The transport under a protocol wrapper (TLS) gets
        C{bufferSize} L{RECEIVE_CHUNK}; a transport without one is left
        alone.
        """
        from twisted.internet.protocol import Protocol
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

        inner = StringTransport()
        inner.bufferSize = 1 << 16
        wrapper = ProtocolWrapper(WrappingFactory(None), Protocol())
        wrapper.makeConnection(inner)
        readInLargeChunks(wrapper)
        self.assertEqual(inner.bufferSize, RECEIVE_CHUNK)
        plain = StringTransport()
        readInLargeChunks(plain)
        self.assertFalse(hasattr(plain, "bufferSize"))
