# -*- test-case-name: tests.test_recovery_loopback -*-
"""
Postcopy pause and recovery between two L{MigrationManager}s over real
loopback TCP, with real network failures: a relay between the two sides is
cut (both directions shut down at once) while a destination guest process
faults on missing pages through its own userfaultfd.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests import test_migration_loopback as loopback
from twisted_postcopy.testing.enginevm import OutgoingTestVM
from twisted_postcopy.testing.enginevm import IncomingTestVM
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.real import requireUserfaultfd
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.testing.waiting import waitUntil

MiB = 1 << 20
#: The longest any single wait in these tests may take, in seconds.
WAIT = 20.0


def within(waiting: Deferred, seconds: float = WAIT) -> Deferred:
    """
    @param waiting: a Deferred.
    @param seconds: the bound.
    @return: C{waiting}, failing with C{TimeoutError} after C{seconds}.
    """
    return waiting.addTimeout(seconds, reactor)


def recvBitmapCommand(name: str) -> bytes:
    """
    @param name: a block name.
    @return: QEMU 7.2's C{MIG_CMD_RECV_BITMAP} for it.
    """
    raw = name.encode()
    return struct.pack(">BHHB", 8, 10, 1 + len(raw), len(raw)) + raw


class GuestVM(WorkerGuestVM):
    """
    The destination VM: a guest worker process on the production fault
    service reading all of its RAM, faulting on every missing page.
    """


class _Peer(Protocol):
    """
    A raw peer: writes C{send} on connect (or once data arrives, with
    C{reply}), collects what arrives, fires C{done} with it when closed.

    @ivar send: bytes written on connect.
    @ivar reply: bytes written once the first data arrived.
    @ivar received: what arrived.
    @ivar done: fires with C{received} once the connection closed.
    """

    def __init__(self, send: bytes = b"", reply: bytes = b"") -> None:
        """
        @param send: bytes written on connect.
        @param reply: bytes written once data arrived.
        """
        self.send, self.reply = send, reply
        self.received = bytearray()
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        """
        Write C{send}.
        """
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        """
        @param data: collected; the first data is answered with C{reply}.
        """
        if not self.received:
            self.transport.write(self.reply)
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        """
        @param reason: ignored.
        """
        self.done.callback(bytes(self.received))


class RecoveryLoopbackTests(TestCase):
    """
    Our source to our destination through a cuttable relay.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Two managers with postcopy on; the destination's fault service is
        the production one, its guest a worker process.
        """
        requireUserfaultfd()
        self.source = OutgoingTestVM({"pc.ram": 8 * MiB, "pc.rom": 128 * 1024},
                                     device=loopback.ownDevice(b"cpu state"))
        loopback.fill(self.source, 5)
        self.destination = GuestVM(reactor)
        self.addCleanup(self.destination.close)
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination, self.destination.faultServiceFactory)
        for manager in (self.src, self.dst):
            manager.setCapabilities({"postcopy-ram": True})
        # Background pages trickle (the guest's reads are requested and
        # served at once) until the last recovery, so a cut always finds
        # the guest waiting for pages, however slowly it starts.
        self.src.setParameters({"max-bandwidth": 4 * MiB, "max-postcopy-bandwidth": 256 * 1024})
        self.events: dict[str, list[str]] = {"src": [], "dst": []}
        self.src.subscribe(lambda e: self.events["src"].append(e["data"]["status"]))
        self.dst.subscribe(lambda e: self.events["dst"].append(e["data"]["status"]))

    def relay(self, port: Any) -> RecordingRelay:
        """
        @param port: a listening port of the destination.
        @return: a relay to it, closed at cleanup.
        """
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        return relay

    @inlineCallbacks
    def startPostcopy(self):
        """
        Migrate through a relay until the destination guest runs and
        faults.

        @return: the relay (via the Deferred).
        """
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = self.relay(port)
        self.src.migrate(relay.uri)
        yield within(self.src.whenStatus("active"))
        self.src.startPostcopy()
        yield within(self.dst.whenStatus("postcopy-active"))
        yield self.guestWaiting()
        return relay

    def guestWaiting(self) -> Deferred:
        """
        @return: a Deferred firing once the destination's guest waits for a
            page (a fault is pending in the fault service).
        """
        return waitUntil(reactor, lambda: len(self.dst.incoming.faults.pending) > 0)

    @inlineCallbacks
    def recoverAndComplete(self):
        """
        Both sides are paused: C{migrate-recover} on the destination,
        C{migrate resume} on the source (through a second relay), then
        both complete and the guest saw exactly the source's RAM.

        @return: the recovery relay (via the Deferred).
        """
        paused = yield within(self.src.whenStatus("postcopy-paused"))
        self.assertEqual(paused, "postcopy-paused")
        yield within(self.dst.whenStatus("postcopy-paused"))
        self.assertEqual(self.dst.queryMigrate()["status"], "postcopy-paused")
        self.assertEqual(self.src.queryMigrate()["status"], "postcopy-paused")
        self.assertFalse(self.source.running)
        self.assertFalse(self.destination.done.called)
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        relay = self.relay(recoverPort)
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        self.src.migrate(relay.uri, resume=True)
        status = yield within(self.src.whenStatus("completed", "failed"))
        dstStatus = yield within(self.dst.whenStatus("completed", "failed"))
        digests = yield within(self.destination.done)
        self.assertEqual((status, dstStatus), ("completed", "completed"))
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)
        return relay

    def assertRecoveryWire(self, relay: RecordingRelay) -> None:
        """
        The recovery connection starts as QEMU 7.2's does: one RECV_BITMAP
        per block in list order, then POSTCOPY_RESUME; the return path
        answers each with its bitmap, then RESUME_ACK(1), then the
        re-sent request of the page the paused guest waits for
        (REQ_PAGES_ID first).

        @param relay: the recovery relay.
        """
        forward = bytes(relay.connections[0].forward)
        backward = bytes(relay.connections[0].backward)
        head = recvBitmapCommand("pc.ram") + recvBitmapCommand("pc.rom") + bytes.fromhex("0800090000")
        self.assertEqual(forward[:len(head)], head)
        self.assertEqual(backward[:11], bytes.fromhex("0005 0007 06") + b"pc.ram")
        ramBitmap = 8 * MiB // 4096 // 8
        self.assertEqual(struct.unpack(">Q", backward[11:19])[0], ramBitmap)
        romStart = 19 + ramBitmap + 8
        self.assertEqual(backward[19 + ramBitmap:romStart], bytes.fromhex("0123456789abcdef"))
        self.assertEqual(backward[romStart:romStart + 11], bytes.fromhex("0005 0007 06") + b"pc.rom")
        ackAt = romStart + 11 + 8 + 8 + 8
        self.assertEqual(backward[ackAt:ackAt + 8], bytes.fromhex("0006 0004 00000001"))
        self.assertEqual(backward[ackAt + 8:ackAt + 10], bytes.fromhex("0003"))

    @inlineCallbacks
    def test_cutAndRecover(self) -> None:
        """
        A cut during postcopy pauses both sides (not failed); after
        C{migrate-recover} and C{migrate resume} the migration completes
        with the guest's memory identical to the source's, and the status
        sequences are QEMU's.
        """
        relay = yield self.startPostcopy()
        relay.cut()
        recovery = yield self.recoverAndComplete()
        self.assertRecoveryWire(recovery)
        self.assertEqual(self.events["src"], [
            "setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
            "postcopy-active", "completed"])
        self.assertEqual(self.events["dst"], [
            "setup", "active", "postcopy-active", "postcopy-paused", "setup", "postcopy-recover",
            "postcopy-active", "completed"])

    @inlineCallbacks
    def test_migratePauseAndRecover(self) -> None:
        """
        C{migrate-pause} on the source shuts the connection down: both
        sides pause, and recover as after a network failure.
        """
        yield self.startPostcopy()
        self.src.migratePause()
        yield self.recoverAndComplete()

    @inlineCallbacks
    def test_cutAfterEverythingWritten(self) -> None:
        """
        The path goes silent while the source writes its last pages, END
        and EOF (all lost); after C{migrate-pause} and the recovery, the
        pages the destination lacks and the END and EOF go out again and
        both complete (before, the source stayed C{postcopy-active}
        sending nothing and the guest waited forever).
        """
        relay = yield self.startPostcopy()
        (connection,) = relay.connections
        connection.blackhole()
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        yield waitUntil(reactor, lambda: self.src.outgoing.written)
        self.assertEqual(self.src.queryMigrate()["ram"]["remaining"], 0)
        self.src.migratePause()
        yield self.recoverAndComplete()

    @inlineCallbacks
    def test_destinationPauseAndTwoRecoveries(self) -> None:
        """
        C{migrate-pause} on the destination pauses both sides; a cut
        after the first recovery pauses them again, and a second recovery
        completes.
        """
        yield self.startPostcopy()
        self.dst.migratePause()
        paused = yield within(self.src.whenStatus("postcopy-paused"))
        self.assertEqual(paused, "postcopy-paused")
        yield within(self.dst.whenStatus("postcopy-paused"))
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        relay = self.relay(recoverPort)
        self.src.migrate(relay.uri, resume=True)
        yield within(self.dst.whenStatus("postcopy-active"))
        yield self.guestWaiting()
        relay.cut()
        yield self.recoverAndComplete()
        self.assertEqual(self.events["src"].count("postcopy-paused"), 2)

    @inlineCallbacks
    def test_badHandshakesPauseAgain(self) -> None:
        """
        Bad input during the handshake pauses that side again (7.2 would
        crash or wait forever): our destination given a RECV_BITMAP for an
        unknown block, and our source given a bitmap of the wrong size,
        both drop that connection and go back to C{postcopy-paused}; a
        refused resume connect leaves the source paused; then a correct
        recovery completes.
        """
        relay = yield self.startPostcopy()
        relay.cut()
        yield within(self.src.whenStatus("postcopy-paused"))
        yield within(self.dst.whenStatus("postcopy-paused"))
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        intruder = _Peer(send=recvBitmapCommand("xyz"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", recoverPort.getHost().port),
                              intruder)
        yield within(intruder.done)
        self.assertEqual(self.events["dst"][-2:], ["postcopy-recover", "postcopy-paused"])
        closed = socket.create_server(("127.0.0.1", 0))
        closedPort = closed.getsockname()[1]
        closed.close()
        self.src.migrate(f"tcp:127.0.0.1:{closedPort}", resume=True)
        for _ in range(int(WAIT / 0.01)):
            if self.src.outgoing.stats.error:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.src.status.value, "postcopy-paused")
        self.assertIn("Failed to connect to", self.src.outgoing.stats.error)
        badReply = (bytes.fromhex("0005 0007 06") + b"pc.ram" + struct.pack(">Q", 16) + bytes(16)
                    + bytes.fromhex("0123456789abcdef"))
        liar = _Peer(reply=badReply)
        fake = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: liar))
        self.addCleanup(fake.stopListening)
        self.src.migrate(f"tcp:127.0.0.1:{fake.getHost().port}", resume=True)
        yield within(liar.done)
        self.assertEqual(self.events["src"][-2:], ["postcopy-recover", "postcopy-paused"])
        self.assertIn("bitmap size mismatch (0x10 != 0x100)", self.src.outgoing.stats.error)
        self.src.migrate(f"tcp:127.0.0.1:{recoverPort.getHost().port}", resume=True)
        status = yield within(self.src.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed")
        digests = yield within(self.destination.done)
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)


class ProductionFaultServiceTests(TestCase):
    """
    Recovery with the production fault service
    (L{twisted_postcopy.ram.faults.FaultService}) and its guest worker:
    two worker threads touch every page while the connection is cut.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Skip without userfaultfd.
        """
        requireUserfaultfd()

    @inlineCallbacks
    def test_workerWaitsThroughRecovery(self) -> None:
        """
        Faults outstanding at the cut stay pending while paused (the worker
        keeps waiting, nothing fails), are requested again after the
        recovery, and the worker's digest equals the source's RAM.
        """
        from twisted_postcopy.ram.guestworker import spawnWorker

        source = OutgoingTestVM({"pc.ram": 8 * MiB}, device=loopback.ownDevice(b"dev"))
        loopback.fill(source, 7)
        destination = IncomingTestVM()
        src, dst = MigrationManager(reactor, source), MigrationManager(reactor, destination)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        src.setParameters({"max-postcopy-bandwidth": 128 * 1024})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        src.migrate(relay.uri)
        src.startPostcopy()
        yield within(dst.whenStatus("postcopy-active"))
        worker = spawnWorker(reactor, dst.incoming.faults, list(destination.blocks.values()))
        yield within(worker.attached)
        touching = worker.command(op="touch", block=0, first=0, count=2048, threads=2)
        # Cut while a fault is outstanding and over half the block is still
        # missing: the touch cannot end before the pause, so faults are
        # pending then whatever the machine's speed.
        faults = dst.incoming.faults
        yield waitUntil(reactor, lambda: len(faults.pending) > 0 and faults.missingPages() > 1024)
        relay.cut()
        yield within(src.whenStatus("postcopy-paused"))
        yield within(dst.whenStatus("postcopy-paused"))
        self.assertFalse(touching.called)
        self.assertGreater(len(dst.incoming.faults.pending), 0)
        recoverPort = yield dst.migrateRecover("tcp:127.0.0.1:0")
        src.setParameters({"max-postcopy-bandwidth": 0})
        src.migrate(f"tcp:127.0.0.1:{recoverPort.getHost().port}", resume=True)
        answer = yield within(touching)
        self.assertEqual(len(answer["latencies"]), 2048)
        status = yield within(src.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed")
        yield within(dst.whenStatus("completed"))
        digest = yield within(worker.command(op="digest", block=0))
        yield within(worker.exit())
        self.assertEqual(digest["digest"], hashlib.sha256(source.contents()["pc.ram"]).hexdigest())
