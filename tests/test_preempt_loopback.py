# -*- test-case-name: tests.test_preempt_loopback -*-
"""
Postcopy with C{postcopy-preempt} from our source to our destination over
real loopback TCP, through a recording relay: the destination's guest is a
worker process faulting through its own userfaultfd on the production fault
service.

The second connection is the preempt channel (accept order, as QEMU 7.2):
requested pages go there as raw RAM records, each naming its block, never
on the main channel too, and it ends with one EOS record after the main
channel's EOF.  One test proves by ordering that requested pages overtake
a saturated background stream: the relay stops forwarding the main channel
(its bytes back up into the source, whose transport stops producing), and
the guest's requested pages still arrive, on the preempt channel, while
not one more byte of the main channel did.
"""

from __future__ import annotations

from typing import Any

import hashlib
import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.test_migration_loopback import fill, ownDevice
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.source.recovery import currentTransport
from twisted_postcopy.testing.enginevm import OutgoingTestVM
from twisted_postcopy.testing.real import requireUserfaultfd
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.testing.waiting import waitUntil
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.wire import decodeAll
from twisted_postcopy.wire.events import PageReceived, RAMBlockInfo, ZeroPageReceived
from twisted_postcopy.wire.preempt import PreemptDecoder

MiB = 1 << 20
PAGE = 4096
#: The longest any single wait may take, in seconds.
WAIT = 30.0
PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}


def within(waiting: Deferred, seconds: float = WAIT) -> Deferred:
    """
    @param waiting: a Deferred.
    @param seconds: the bound.
    @return: C{waiting}, failing with C{TimeoutError} after C{seconds}.
    """
    return waiting.addTimeout(seconds, reactor)


def mainPages(stream: bytes) -> list[tuple[str, int]]:
    """
    @param stream: a whole recorded main channel.
    @return: its RAM records' (block, offset), in order.
    """
    return [(event.block, event.offset) for event in decodeAll(stream)
            if isinstance(event, (PageReceived, ZeroPageReceived))]


def preemptRecords(stream: bytes, blocks: dict[str, int]) -> tuple[list[tuple[str, int]], bool]:
    """
    @param stream: a recorded preempt channel.
    @param blocks: idstr -> length.
    @return: its records' (block, offset), in order, and whether it ended
        with EOS.
    """
    decoder = PreemptDecoder([RAMBlockInfo(name, length) for name, length in blocks.items()])
    decoder.receiveData(stream)
    records = [(event.block, event.offset) for event in decoder.events()
               if isinstance(event, (PageReceived, ZeroPageReceived))]
    return records, decoder.complete


class PreemptLoopbackTests(TestCase):
    """
    Our source with C{postcopy-preempt} to our destination.
    """

    timeout = 90

    #: pc.ram's size.
    RAM = 32 * MiB
    #: The pages the guest reads first: near the end of pc.ram, going down
    #: with gaps, where the background scan (from the start) is not yet.
    TOUCH_FIRST = [-1 - 16 * n for n in range(16)]

    def setUp(self) -> None:
        """
        A patterned source (every other page non-zero), a destination guest
        worker that reads L{TOUCH_FIRST} first, managers with preempt on.
        """
        requireUserfaultfd()
        self.source = OutgoingTestVM({"pc.ram": self.RAM, "pc.rom": 128 * 1024},
                                     device=ownDevice(b"cpu state"))
        fill(self.source, 7)
        self.destination = WorkerGuestVM(reactor, touchFirst=self.TOUCH_FIRST)
        self.addCleanup(self.destination.close)
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination, self.destination.faultServiceFactory)
        for manager in (self.src, self.dst):
            manager.setCapabilities(PREEMPT)
        self.events: dict[str, list[str]] = {"src": [], "dst": []}
        self.src.subscribe(lambda e: self.events["src"].append(e["data"]["status"]))
        self.dst.subscribe(lambda e: self.events["dst"].append(e["data"]["status"]))

    @inlineCallbacks
    def relayed(self):
        """
        Listen, and put a recording relay in front.

        @return: the relay (via the Deferred).
        """
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        return relay

    def touchedPages(self) -> set[tuple[str, int]]:
        """
        @return: the (block, offset) of the pages the guest reads first.
        """
        pages = self.RAM // PAGE
        return {("pc.ram", (page % pages) * PAGE) for page in self.TOUCH_FIRST}

    @inlineCallbacks
    def guestRunning(self):
        """
        Background pages trickle (1000 B/s); switch to postcopy through a
        relay and wait until the guest's first reads were served and the
        source knows the destination runs the guest (PONG 3), so a cut
        pauses instead of failing.

        @return: the relay (via the Deferred).
        """
        self.src.setParameters({"max-bandwidth": 1000, "max-postcopy-bandwidth": 1000})
        relay = yield self.relayed()
        self.src.migrate(relay.uri)
        yield within(self.src.whenStatus("active"))
        self.src.startPostcopy()
        yield within(self.destination.touchedFirst)
        yield within(waitUntil(reactor, lambda: self.src.outgoing.destinationRunning))
        return relay

    @inlineCallbacks
    def bothCompleted(self):
        """
        Both sides complete and the destination guest saw exactly the
        source's RAM.

        @return: a Deferred.
        """
        status = yield within(self.src.whenStatus("completed", "failed"))
        dstStatus = yield within(self.dst.whenStatus("completed", "failed"))
        self.assertEqual((status, dstStatus), ("completed", "completed"),
                         self.src.queryMigrate().get("error-desc"))
        digests = yield within(self.destination.done)
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)

    @inlineCallbacks
    def completeAndCompare(self, relay: RecordingRelay):
        """
        Both sides complete; the guest saw exactly the source's RAM; the
        preempt channel (the relay's second connection) carried the pages
        the guest read first, ended with EOS, and no page it carried went
        on the main channel too.

        @param relay: the relay.
        @return: the preempt channel's records (via the Deferred).
        """
        yield self.bothCompleted()
        yield within(self.dst.destinationFactory.preempt.preempt.ended)
        yield within(waitUntil(reactor, lambda: all(c.closed.is_set() for c in relay.connections)))
        main, preempt = relay.connections[:2]
        records, ended = preemptRecords(bytes(preempt.forward), {"pc.ram": self.RAM, "pc.rom": 128 * 1024})
        self.assertTrue(ended)
        self.assertEqual(bytes(preempt.forward[-8:]), bytes.fromhex("0000000000000010"))
        self.assertEqual(bytes(preempt.backward), b"")
        self.assertLessEqual(self.touchedPages(), set(records))
        self.assertEqual(len(records), len(set(records)))
        self.assertEqual(set(records) & set(mainPages(bytes(main.forward))), set())
        self.assertEqual(len(relay.connections), 2)
        info = self.src.queryMigrate()
        self.assertGreaterEqual(info["ram"]["postcopy-requests"], len(self.TOUCH_FIRST))
        self.assertEqual(self.events["src"], ["setup", "active", "postcopy-active", "completed"])
        self.assertEqual(self.events["dst"], ["setup", "active", "postcopy-active", "completed"])
        return records

    @inlineCallbacks
    def test_preemptOursToOurs(self) -> None:
        """
        Background pages trickle (1000 B/s) so the scan stays at the start
        of RAM; the guest's first reads, near the end, are requested and
        arrive on the preempt channel; then the throttle is lifted and the
        migration completes with memory equal.
        """
        relay = yield self.guestRunning()
        self.assertGreaterEqual(self.dst.destinationFactory.preempt.preempt.recordsReceived,
                                len(self.TOUCH_FIRST))
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        records = yield self.completeAndCompare(relay)
        self.assertEqual(set(records[:len(self.TOUCH_FIRST)]), self.touchedPages())

    @inlineCallbacks
    def saturated(self):
        """
        Switch to postcopy with the destination guest held at its gate;
        once it runs, hold the relay's main channel and lift the
        background throttle, and wait until the source's main transport
        stops producing: the main channel is saturated, its background
        pages queued in the source and the kernel.

        @return: (the relay, its main connection, the main channel's bytes
            forwarded so far) via the Deferred.
        """
        self.src.setParameters({"max-bandwidth": 1000, "max-postcopy-bandwidth": 1000})
        self.destination.gate = Deferred()
        relay = yield self.relayed()
        self.src.migrate(relay.uri)
        yield within(self.src.whenStatus("active"))
        self.src.startPostcopy()
        yield within(self.dst.whenStatus("postcopy-active"))
        yield within(waitUntil(reactor, lambda: self.destination.worker.attached.called))
        main = relay.connections[0]
        main.hold()
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        sourceMain = currentTransport(self.src.outgoing)
        yield within(waitUntil(reactor, lambda: sourceMain.producer.paused))
        return relay, main, len(main.forward)

    @inlineCallbacks
    def test_urgentPagesOvertakeSaturatedStream(self) -> None:
        """
        Once the destination runs, the relay stops forwarding the main
        channel and the background stream goes at full speed: it backs up
        until the source's transport stops producing (saturated).  Only
        then does the guest read its first pages.  They are requested on
        the return path and all arrive, on the preempt channel, while the
        main channel delivered nothing more: requested pages overtook
        every background page queued before them.
        """
        relay, main, held = yield self.saturated()
        written = self.src.queryMigrate()["ram"]["transferred"]
        self.destination.gate.callback(None)
        yield within(self.destination.touchedFirst)
        self.assertEqual(len(main.forward), held, "the main channel moved while it was held")
        # The main channel had background bytes queued ahead of the
        # requests that never reached the destination before them.
        self.assertGreater(written - held - len(relay.connections[1].forward), 64 * 1024)
        self.assertGreaterEqual(self.dst.destinationFactory.preempt.preempt.recordsReceived,
                                len(self.TOUCH_FIRST))
        main.release()
        records = yield self.completeAndCompare(relay)
        self.assertEqual(set(records[:len(self.TOUCH_FIRST)]), self.touchedPages())

    @inlineCallbacks
    def test_withoutPreemptRequestsWaitBehindStream(self) -> None:
        """
        The same saturated main channel without C{postcopy-preempt}: the
        guest's first requested page cannot arrive while the main channel
        is held; once it is released, the page arrives on the main channel
        after every background byte that was queued ahead of the request.
        This is what the preempt channel removes.
        """
        for manager in (self.src, self.dst):
            manager.setCapabilities({"postcopy-preempt": False})
        relay, main, held = yield self.saturated()
        migration = self.src.outgoing
        atRequest: list[int] = []

        class Noting:
            """
            The migration, as the return path reader sees it, noting the
            bytes written when the first request arrives (read later, a
            poll would also count background pages written after the
            requested one).
            """

            def __getattr__(self, name: str) -> Any:
                return getattr(migration, name)

            def pagesRequested(self, *arguments: Any) -> None:
                if not atRequest:
                    atRequest.append(migration.stats.transferred)
                migration.pagesRequested(*arguments)

        migration.channel.returnPath.outgoing = Noting()
        self.destination.gate.callback(None)
        yield within(waitUntil(reactor, lambda: bool(atRequest)))
        (queued,) = atRequest
        self.assertFalse(self.destination.touchedFirst.called)
        main.release()
        yield within(self.destination.touchedFirst)
        status = yield within(self.src.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed")
        yield within(self.destination.done)
        yield within(waitUntil(reactor, lambda: all(c.closed.is_set() for c in relay.connections)))
        self.assertEqual(len(relay.connections), 1)
        stream = bytes(main.forward)
        offset = (self.RAM // PAGE - 1) * PAGE
        # A PAGE or ZERO record, naming its block or CONTINUE.
        found = [stream.find(struct.pack(">Q", offset | flags)) for flags in (0x08, 0x28, 0x02, 0x22)]
        position = max(found)
        self.assertGreater(position, held)
        # Everything the source had queued on the main channel when the
        # request came went ahead of the requested page.
        self.assertGreater(position, queued - 8 * PAGE)

    @inlineCallbacks
    def test_cutAndRecover(self) -> None:
        """
        Preempt with a relay cut: the guest's first reads arrive on the
        first preempt channel; the cut (both connections) pauses both
        sides; after C{migrate-recover} and C{migrate} with C{resume} the
        source opens a new main connection, then a new preempt connection,
        and only then sends its RECV_BITMAPs; the pages the paused guest
        waits for are requested again and arrive on the new preempt
        channel; both complete with memory equal.
        """
        relay = yield self.guestRunning()
        first, _ = preemptRecords(bytes(relay.connections[1].forward), {"pc.ram": self.RAM, "pc.rom": 128 * 1024})
        self.assertLessEqual(self.touchedPages(), set(first))
        relay.cut()
        yield within(self.src.whenStatus("postcopy-paused"))
        yield within(self.dst.whenStatus("postcopy-paused"))
        self.assertEqual(self.src.outgoing.preemptPhase.value, "off")
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        second = RecordingRelay(("127.0.0.1", recoverPort.getHost().port))
        self.addCleanup(second.close)
        self.src.migrate(second.uri, resume=True)
        yield within(self.src.whenStatus("postcopy-active"))
        yield within(waitUntil(reactor, lambda: self.src.queryMigrate()["ram"]["postcopy-requests"]
                               > len(self.TOUCH_FIRST) and len(second.connections) == 2
                               and len(second.connections[1].forward) > 0))
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        yield self.bothCompleted()
        yield within(waitUntil(reactor, lambda: all(c.closed.is_set() for c in second.connections)))
        self.assertEqual(len(second.connections), 2)
        main, preempt = (bytes(connection.forward) for connection in second.connections)
        self.assertEqual(main[:1], b"\x08")
        records, ended = preemptRecords(preempt, {"pc.ram": self.RAM, "pc.rom": 128 * 1024})
        self.assertTrue(ended)
        self.assertGreater(len(records), 0)
        self.assertEqual(self.events["src"], [
            "setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
            "postcopy-active", "completed"])

    @inlineCallbacks
    def test_preemptChannelCutPauses(self) -> None:
        """
        Only the preempt connection is cut: the source notices (its
        channel broke while the migration writes to it), drops the main
        connection too, and both sides pause, as QEMU pauses on an error
        on either channel; a recovery then completes with memory equal.
        """
        relay = yield self.guestRunning()
        relay.connections[1].cut()
        yield within(self.src.whenStatus("postcopy-paused"))
        yield within(self.dst.whenStatus("postcopy-paused"))
        self.assertIn("preempt channel lost", self.src.outgoing.preemptError or "")
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        self.src.migrate(f"tcp:127.0.0.1:{recoverPort.getHost().port}", resume=True)
        yield self.bothCompleted()

    @inlineCallbacks
    def test_unixSocket(self) -> None:
        """
        Over a C{unix:} URI the preempt channel is a second connection to
        the same socket path: the guest's first reads arrive there and the
        migration completes with memory equal.
        """
        path = os.path.join(self.mktemp() + ".d", "migration.sock")
        os.makedirs(os.path.dirname(path))
        self.src.setParameters({"max-bandwidth": 1000, "max-postcopy-bandwidth": 1000})
        port = yield self.dst.migrateIncoming(f"unix:{path}")
        self.addCleanup(port.stopListening)
        self.src.migrate(f"unix:{path}")
        yield within(self.src.whenStatus("active"))
        self.src.startPostcopy()
        yield within(self.destination.touchedFirst)
        preempt = self.dst.destinationFactory.preempt.preempt
        self.assertGreaterEqual(preempt.recordsReceived, len(self.TOUCH_FIRST))
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        status = yield within(self.src.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed", self.src.queryMigrate().get("error-desc"))
        yield within(preempt.ended)
        digests = yield within(self.destination.done)
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)
