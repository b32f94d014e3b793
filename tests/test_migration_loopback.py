# -*- test-case-name: tests.test_migration_loopback -*-
"""
End-to-end migrations between two L{MigrationManager}s over real loopback
TCP and Unix sockets.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time

import hashlib

from twisted.internet import reactor
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineReceiver
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM, PAGE
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.interfaces import IOutgoingVM
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.real import requireUserfaultfd, requireWriteTracking
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.testing.waiting import waitUntil
from twisted_postcopy.wire import decodeAll
from tests import wirebytes as c

MiB = 1 << 20


def ownDevice(blob: bytes) -> bytes:
    """
    @param blob: device state.
    @return: our FULL device section carrying it.
    """
    return (c.sectionHeader(c.FULL, 3, "twisted-postcopy/test", 0, 1)
            + struct.pack(">I", len(blob)) + blob + c.footer(3))


def fill(vm: OutgoingTestVM, seed: int) -> None:
    """
    Write a pattern into every other page of every block (the rest stay
    zero).

    @param vm: the VM.
    @param seed: varies the pattern.
    """
    for index, block in enumerate(vm.blocks):
        for offset in range(0, block.length, 2 * PAGE):
            vm.write(index, offset, struct.pack(">QQ", seed, offset) * 8)



def skipWithoutUserfaultfd() -> None:
    """
    Give up (L{missingReal}: a skip by hand, a failure in strict mode) when
    this kernel or process cannot use userfaultfd for postcopy.
    """
    requireUserfaultfd()


@inlineCallbacks
def startedGuestPair(case: Any, spec: Any, postcopy: bool) -> Any:
    """
    Start a source guest and prepare its destination guest and both
    managers, with sockets in C{case.directory} and cleanups on C{case}.

    @param case: the test case.
    @param spec: the L{twisted_postcopy.guests.guest.GuestSpec}.
    @param postcopy: the C{postcopy-ram} capability of both sides.
    @return: a Deferred firing with (source, destination guest, source
        manager, destination manager) once the source guest runs.
    """
    from twisted_postcopy.guests.guest import Guest, IncomingGuest

    source = Guest(reactor, spec, os.path.join(case.directory, "src.sock"))
    case.addCleanup(source.close)
    yield source.start()
    arriving = IncomingGuest(reactor, spec, os.path.join(case.directory, "dst.sock"))
    case.addCleanup(arriving.close)
    src = MigrationManager(reactor, source)
    dst = MigrationManager(reactor, arriving, arriving.faultServiceFactory)
    for manager in (src, dst):
        manager.setCapabilities({"postcopy-ram": postcopy})
    return source, arriving, src, dst

class LoopbackTests(TestCase):
    """
    Real sockets, both managers in this process.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        self.source = OutgoingTestVM({"pc.ram": 8 * MiB, "pc.rom": 128 * 1024},
                                     device=ownDevice(b"cpu state"))
        fill(self.source, 1)
        self.destination = IncomingTestVM()
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, lambda: self.destination)
        self.events: list[str] = []
        self.src.subscribe(lambda e: self.events.append(e["data"]["status"]))

    @inlineCallbacks
    def listen(self, uri: str = "tcp:127.0.0.1:0"):
        """
        Start the destination; return the URI to migrate to.
        """
        port = yield self.dst.migrateIncoming(uri)
        self.addCleanup(port.stopListening)
        if uri.startswith("tcp"):
            return f"tcp:127.0.0.1:{port.getHost().port}"
        return uri

    @inlineCallbacks
    def test_precopyWhileDirtying(self) -> None:
        """
        A guest that writes during precopy arrives identical to the
        source's final state; device state arrives byte-exact; the source
        completes after SHUT (return-path) and reports QMP fields.
        """
        self.src.setCapabilities({"return-path": True})
        self.src.setParameters({"max-bandwidth": 40 * MiB, "downtime-limit": 50})
        uri = yield self.listen()
        writes = []
        self.addCleanup(lambda: [write.cancel() for write in writes if write.active()])

        def dirty(n=[0]):
            """
            Write a random page every 10 ms while the guest runs (30 times).
            """
            if self.source.running and n[0] < 30:
                n[0] += 1
                self.source.write(0, (n[0] * 37 % 2048) * PAGE, os.urandom(PAGE))
                writes.append(reactor.callLater(0.01, dirty))

        self.src.migrate(uri)
        dirty()
        status = yield self.src.whenStatus("completed", "failed")
        yield self.dst.whenStatus("completed", "failed")
        self.assertEqual(status, "completed")
        self.assertEqual(self.destination.contents(), self.source.contents())
        self.assertEqual(self.destination.devices, [ownDevice(b"cpu state")])
        self.assertEqual(self.destination.events, ["run", "completed"])
        self.assertEqual(self.events, ["setup", "active", "completed"])
        info = self.src.queryMigrate()
        self.assertEqual(info["ram"]["remaining"], 0)
        self.assertGreater(info["ram"]["dirty-sync-count"], 0)
        self.assertGreater(info["ram"]["duplicate"], 0)
        self.assertEqual(self.dst.queryMigrate(), {"status": "completed"})

    @inlineCallbacks
    def test_unixPrecopyNoReturnPath(self) -> None:
        """
        Over a Unix socket without a return path the source completes when
        it has written everything.
        """
        directory = tempfile.mkdtemp(prefix="tpc")
        self.addCleanup(shutil.rmtree, directory)
        uri = yield self.listen(f"unix:{directory}/migration.sock")
        self.src.migrate(uri)
        status = yield self.src.whenStatus("completed", "failed")
        yield self.dst.whenStatus("completed", "failed")
        self.assertEqual(status, "completed")
        self.assertEqual(self.destination.contents(), self.source.contents())


class PostcopyLoopbackTests(TestCase):
    """
    Postcopy with the real kernel: the destination guest runs before all
    pages arrived and its faults are served.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        skipWithoutUserfaultfd()
        self.source = OutgoingTestVM({"pc.ram": 8 * MiB, "pc.rom": 128 * 1024},
                                     device=ownDevice(b"cpu state"))
        fill(self.source, 2)
        self.destination = WorkerGuestVM(reactor)
        self.addCleanup(self.destination.close)
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, self.destination, self.destination.faultServiceFactory)
        for manager in (self.src, self.dst):
            manager.setCapabilities({"postcopy-ram": True})
        self.dst.setCapabilities({"postcopy-blocktime": True})
        self.srcEvents: list[str] = []
        self.dstEvents: list[str] = []
        self.src.subscribe(lambda e: self.srcEvents.append(e["data"]["status"]))
        self.dst.subscribe(lambda e: self.dstEvents.append(e["data"]["status"]))

    @inlineCallbacks
    def test_postcopyWithFaults(self) -> None:
        """
        After a little precopy (with the guest writing), postcopy starts;
        the destination guest reads all its RAM while pages still arrive
        (postcopy-requests > 0), sees exactly the source's final RAM, and
        both sides complete; blocktime is reported after completion.
        """
        self.src.setParameters({"max-bandwidth": 4 * MiB, "max-postcopy-bandwidth": 256 * 1024})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        self.src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield self.src.whenStatus("active")
        self.source.write(0, 5 * PAGE, b"late write" * 100)
        yield deferLater(reactor, 0.3, lambda: None)
        self.source.write(0, 0, b"first page rewritten")
        self.src.startPostcopy()
        # Background pages trickle until the guest faulted, however slowly
        # it starts; then they go at full speed.
        yield waitUntil(reactor, lambda: self.src.queryMigrate()["ram"]["postcopy-requests"] > 0)
        self.src.setParameters({"max-postcopy-bandwidth": 0})
        status = yield self.src.whenStatus("completed", "failed")
        dstStatus = yield self.dst.whenStatus("completed", "failed")
        digests = yield self.destination.done
        self.assertEqual((status, dstStatus), ("completed", "completed"))
        expected = [hashlib.sha256(data).hexdigest() for data in self.source.contents().values()]
        self.assertEqual(digests, expected)
        info = self.src.queryMigrate()
        self.assertGreater(info["ram"]["postcopy-requests"], 0)
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
        self.assertEqual(self.srcEvents, ["setup", "active", "postcopy-active", "completed"])
        self.assertEqual(self.dstEvents, ["setup", "active", "postcopy-active", "completed"])
        self.assertEqual(self.destination.devices, [ownDevice(b"cpu state")])
        dstInfo = self.dst.queryMigrate()
        self.assertEqual(len(dstInfo["postcopy-vcpu-blocktime"]), 1)
        self.assertGreater(dstInfo["postcopy-vcpu-blocktime"][0], 0)


class RAMFaultServiceTests(TestCase):
    """
    Postcopy through C{ram.faults.FaultService} and its guest worker: two
    threads touch every page while pages still arrive.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        skipWithoutUserfaultfd()

    @inlineCallbacks
    def test_workerTouchesEverything(self) -> None:
        """
        The worker faults on pages, they are requested and placed; its
        digest equals the source's RAM and postcopy-requests > 0.
        """
        from twisted_postcopy.ram.guestworker import spawnWorker

        source = OutgoingTestVM({"pc.ram": 8 * MiB}, device=ownDevice(b"dev"))
        fill(source, 3)
        destination = IncomingTestVM()
        src = MigrationManager(reactor, source)
        dst = MigrationManager(reactor, destination)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        # Background pages trickle until the worker read everything, so
        # its reads fault however slowly it starts.
        src.setParameters({"max-postcopy-bandwidth": 128 * 1024})
        workers = []
        original = destination.run

        def run():
            """
            The guest starts here.
            """
            original()
            service = dst.incoming.faults
            workers.append(spawnWorker(reactor, service, list(destination.blocks.values())))

        destination.run = run
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        src.startPostcopy()
        yield src.whenStatus("postcopy-active")
        yield waitUntil(reactor, lambda: workers)
        worker = workers[0]
        yield worker.attached
        answer = yield worker.command(op="touch", block=0, first=0, count=2048, threads=2)
        self.assertEqual(len(answer["latencies"]), 2048)
        src.setParameters({"max-postcopy-bandwidth": 0})
        status = yield src.whenStatus("completed", "failed")
        self.assertEqual(status, "completed")
        yield dst.whenStatus("completed")
        digest = yield worker.command(op="digest", block=0)
        yield worker.exit()
        expected = hashlib.sha256(source.contents()["pc.ram"]).hexdigest()
        self.assertEqual(digest["digest"], expected)
        self.assertGreater(src.queryMigrate()["ram"]["postcopy-requests"], 0)


@implementer(IOutgoingVM)
class DirtyingGuestSource:
    """
    An outgoing VM whose guest is a real process (the ram guest worker)
    writing its RAM in a loop, tracked with WP_ASYNC + PAGEMAP_SCAN.
    """

    machine = "pc-i440fx-7.2"

    def __init__(self, blocks, writeLoop: bool = True) -> None:
        """
        Set up the instance.

        @param blocks: the RAMBlocks.
        @param writeLoop: whether the guest writes in a loop while it runs
            (otherwise it writes only when told, with L{write}).
        """
        from twisted_postcopy.ram.dirty import DirtyTracker

        self.blocks = blocks
        self.writeLoop = writeLoop
        self.dirtyTracker = DirtyTracker(blocks)
        self.worker = None
        self.running = False
        self.current = None
        self.writes = 0

    @inlineCallbacks
    def boot(self):
        """
        Start the guest and its write loop.
        """
        from twisted_postcopy.ram.guestworker import spawnWorker

        self.worker = spawnWorker(reactor, self.dirtyTracker, self.blocks, mode="track")
        yield self.worker.attached
        self.resume()

    def _loop(self, _=None):
        """
        Write 32 pages somewhere, again and again while running.
        """
        if not self.running or not self.writeLoop:
            self.current = None
            return
        first = (self.writes * 97) % (self.blocks[0].length // PAGE - 32)
        self.writes += 1
        self.current = self.worker.command(op="touch", block=0, first=first, count=32, write=True)
        self.current.addCallback(self._loop)

    def write(self, first: int, count: int) -> Deferred:
        """
        Have the guest write pages C{first..first+count} of block 0 once
        (their first byte becomes 1, 2, ...).

        @return: a Deferred firing once written.
        """
        return self.worker.command(op="touch", block=0, first=first, count=count, write=True)

    def stop(self):
        """
        Stop writing; fires once the write in flight is done.
        """
        self.running = False
        return self.current

    def deviceState(self) -> bytes:
        """
        @return: this VM's device sections.
        """
        return ownDevice(b"dirtying guest")

    def resume(self) -> None:
        """
        Let the guest run again.
        """
        if not self.running:
            self.running = True
            self._loop()


class DirtyingGuestTests(TestCase):
    """
    A guest process keeps writing during precopy; what arrives is the
    source's final state.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        requireWriteTracking()

    @inlineCallbacks
    def migrate(self, postcopy: bool):
        """
        Migrate the dirtying guest and check the destination got its final RAM.
        """
        from twisted_postcopy.ram.block import RAMBlock

        blocks = [RAMBlock("pc.ram", 8 * MiB)]
        for offset in range(0, 8 * MiB, 2 * PAGE):
            blocks[0].write(offset, (b"initial %d" % offset).ljust(PAGE, b"."))
        source = DirtyingGuestSource(blocks)
        yield source.boot()
        self.addCleanup(source.worker.exit)
        destination = IncomingTestVM()
        src = MigrationManager(reactor, source)
        dst = MigrationManager(reactor, destination)
        if postcopy:
            for manager in (src, dst):
                manager.setCapabilities({"postcopy-ram": True})
        if postcopy:
            src.setParameters({"max-bandwidth": 16 * MiB, "downtime-limit": 20})
        else:
            src.setParameters({"max-bandwidth": 64 * MiB, "downtime-limit": 300})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        writesBefore = source.writes
        src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        if postcopy:
            yield deferLater(reactor, 0.3, lambda: None)
            src.startPostcopy()
        status = yield src.whenStatus("completed", "failed")
        yield dst.whenStatus("completed", "failed")
        self.assertEqual(status, "completed")
        info = src.queryMigrate()
        self.assertGreater(source.writes, writesBefore, info)
        self.assertGreaterEqual(info["ram"]["dirty-sync-count"], 1, info)
        final = os.pread(blocks[0].fd, blocks[0].length, 0)
        self.assertEqual(destination.contents()["pc.ram"], final)
        return info

    def test_precopy(self) -> None:
        """
        Precopy with a guest process dirtying pages converges on its final
        state.
        """
        return self.migrate(False).addCallback(self.assertPrecopySyncs)

    def assertPrecopySyncs(self, info) -> None:
        """
        The source synced before stopping: the final sync is one more.
        """
        self.assertGreaterEqual(info["ram"]["dirty-sync-count"], 2, info)

    @inlineCallbacks
    def test_postcopy(self):
        """
        Pages the source guest re-dirtied after they were sent are
        discarded on the destination and re-sent.  The first precopy pass
        is held (C{max-bandwidth} cut to 64 KiB/s) once the first quarter of
        RAM was sent; the guest then rewrites known runs there and postcopy
        starts (background pages at 64 KiB/s until the destination guest
        has read, so its reads fault).  The destination receives exactly those runs plus the
        unsent tail as discards, nothing else; its guest (a real process
        faulting through the production fault service) reads the rewritten
        pages and gets the new bytes, its last page is requested, and its
        whole RAM ends equal to the source's.
        """
        from twisted_postcopy.ram.block import RAMBlock
        from twisted_postcopy.ram.guestworker import spawnWorker

        pages = 2048
        rewritten = [(8, 4), (64, 1), (130, 16), (250, 32)]
        blocks = [RAMBlock("pc.ram", pages * PAGE)]
        for offset in range(0, pages * PAGE, 2 * PAGE):
            blocks[0].write(offset, (b"initial %d" % offset).ljust(PAGE, b"."))
        source = DirtyingGuestSource(blocks, writeLoop=False)
        yield source.boot()
        self.addCleanup(source.worker.exit)
        destination = IncomingTestVM()
        src = MigrationManager(reactor, source)
        dst = MigrationManager(reactor, destination)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        src.setParameters({"max-bandwidth": 4 * MiB, "max-postcopy-bandwidth": 64 * 1024})
        guests: list[Any] = []
        run = destination.run

        def runGuest() -> None:
            """
            The destination guest starts with the VM.
            """
            run()
            guests.append(spawnWorker(reactor, dst.incoming.faults, list(destination.blocks.values())))

        destination.run = runGuest
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        src.migrate(relay.uri)
        # Even pages are data, odd ones zero: normal pages sent * 2 pages
        # are scanned at least.
        yield waitUntil(reactor, lambda: src.queryMigrate()["ram"]["normal"] * 2 >= pages // 4)
        src.setParameters({"max-bandwidth": 64 * 1024})
        for first, count in rewritten:
            yield source.write(first, count)
        final = os.pread(blocks[0].fd, blocks[0].length, 0)
        src.startPostcopy()
        yield src.whenStatus("postcopy-active")
        yield waitUntil(reactor, lambda: guests or None)
        guest = guests[0]
        self.addCleanup(guest.exit)
        yield guest.attached
        for first, count in rewritten:
            answer = yield guest.command(op="touch", block=0, first=first, count=count)
            self.assertEqual(answer["checksum"], sum(final[(first + i) * PAGE] for i in range(count)))
        last = yield guest.command(op="touch", block=0, first=pages - 1, count=1)
        self.assertEqual(last["checksum"], final[(pages - 1) * PAGE])
        src.setParameters({"max-postcopy-bandwidth": 0})
        status = yield src.whenStatus("completed", "failed")
        self.assertEqual(status, "completed", src.queryMigrate())
        yield dst.whenStatus("completed", "failed")
        digest = yield guest.command(op="digest", block=0)
        self.assertEqual(digest["digest"], hashlib.sha256(final).hexdigest())
        info = src.queryMigrate()
        self.assertGreater(info["ram"]["postcopy-requests"], 0, info)

        yield deferToThread(relay.waitClosed, 30)
        (connection,) = relay.connections
        discards = [event for event in decodeAll(bytes(connection.forward))
                    if type(event).__name__ == "DiscardReceived"]
        self.assertEqual({event.block for event in discards}, {"pc.ram"})
        ranges = [tuple(r) for event in discards for r in event.ranges]
        discarded = [page for start, length in ranges for page in range(start // PAGE, (start + length) // PAGE)]
        self.assertEqual(len(discarded), len(set(discarded)), ranges)
        dirtied = {first + i for first, count in rewritten for i in range(count)}
        tail = sorted(set(discarded) - dirtied)
        self.assertTrue(tail, ranges)
        unsent = tail[0]
        self.assertGreaterEqual(unsent, pages // 4, ranges)
        self.assertEqual(tail, list(range(unsent, pages)), ranges)
        expected = [(first * PAGE, count * PAGE) for first, count in rewritten] + \
                   [(unsent * PAGE, (pages - unsent) * PAGE)]
        self.assertEqual(sorted(ranges), expected)
        self.assertEqual(len(discarded), len(dirtied) + pages - unsent)


class StressGuestTests(TestCase):
    """
    The built-in C{stress} guest (two self-verifying worker processes
    dirtying their working sets) migrated between two managers.
    """

    timeout = 60
    #: Page requests the destination's workers make before the background
    #: stream is let go.
    REQUESTS = 32

    def setUp(self) -> None:
        """
        Skip without write tracking or userfaultfd.
        """
        requireWriteTracking()
        requireUserfaultfd()
        self.directory = tempfile.mkdtemp(prefix="tps")
        self.addCleanup(shutil.rmtree, self.directory, True)

    @inlineCallbacks
    def migrate(self, postcopy: bool):
        """
        Run the stress guest, migrate it, and have the destination's
        workers verify every page against their migrated state.
        """
        from twisted_postcopy.guests.guest import GuestSpec

        spec = GuestSpec("stress", workers=2, blocks=(("ram", 16 * MiB),),
                         arguments=("--working-set", "1024", "--rate", "20000"))
        source, arriving, src, dst = yield startedGuestPair(self, spec, postcopy)
        dst.setCapabilities({"postcopy-blocktime": postcopy})
        if postcopy:
            # Faults by construction: precopy (512 KiB/s, from page 0)
            # cannot reach the end of the workers' 8 MiB of working sets
            # before the switch, and after it the background stream sends
            # one page per 100 ms window until the destination's workers
            # faulted REQUESTS times: each of those is a page the workers
            # wrote before the stream reached it.
            src.setParameters({"max-bandwidth": 512 * 1024, "max-postcopy-bandwidth": 4096,
                               "downtime-limit": 50})
        else:
            src.setParameters({"max-bandwidth": 0, "downtime-limit": 300})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        started = reactor.seconds()
        src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield deferLater(reactor, 0.3, lambda: None)
        if postcopy:
            # Background pages trickle until the destination's workers
            # run and faulted (however slowly they start), then go at full
            # speed.
            src.startPostcopy()
            yield arriving.running
            yield waitUntil(reactor, lambda: src.queryMigrate()["ram"]["postcopy-requests"] >= self.REQUESTS)
            src.setParameters({"max-postcopy-bandwidth": 0})
        status = yield src.whenStatus("completed", "failed")
        self.assertEqual(status, "completed", src.queryMigrate())
        yield dst.whenStatus("completed")
        self.elapsedMs = (reactor.seconds() - started) * 1000
        yield arriving.running
        verdicts = yield arriving.host.verify()
        for name, verdict in verdicts.items():
            self.assertTrue(verdict["ok"], (name, verdict))
            self.assertGreater(verdict["steps"], 0)
        return src.queryMigrate(), dst.queryMigrate(), arriving

    @inlineCallbacks
    def test_precopy(self) -> None:
        """
        Precopy of a guest dirtying memory: every page verified.
        """
        info, _, _ = yield self.migrate(False)
        self.assertGreater(info["ram"]["dirty-sync-count"], 0)

    @inlineCallbacks
    def test_postcopy(self) -> None:
        """
        Postcopy: the workers run on the destination before all pages
        arrived (their faults are requested) and every page verifies.  With
        C{postcopy-blocktime} on the destination, the workers' reported
        threads are its vCPUs: C{postcopy-vcpu-blocktime} has an entry per
        thread and the writers' waits make at least one of them non-zero;
        no vCPU waited longer than the migration lasted, and the time all
        of them were blocked at once is at most any one's.
        """
        info, incoming, arriving = yield self.migrate(True)
        self.assertGreaterEqual(info["ram"]["postcopy-requests"], self.REQUESTS)
        self.assertEqual(incoming["status"], "completed")
        vcpus = incoming["postcopy-vcpu-blocktime"]
        self.assertEqual(len(vcpus), len(arriving.vcpuThreads))
        self.assertGreaterEqual(len(vcpus), 2)
        self.assertTrue(any(vcpus), incoming)
        self.assertLessEqual(incoming["postcopy-blocktime"], min(vcpus), incoming)
        self.assertLessEqual(max(vcpus), self.elapsedMs, incoming)


    @inlineCallbacks
    def switchDuringFirstPass(self, delay: float):
        """
        Start a 64 MiB stress guest (its first C{run} writes its whole
        working set), migrate it as soon as L{Guest.start} fired and ask
        for postcopy C{delay} seconds later, during the first precopy pass.

        @return: the source's statuses and its final C{query-migrate}.
        """
        from twisted_postcopy.guests.guest import GuestSpec

        spec = GuestSpec("stress", workers=2, blocks=(("ram", 64 * MiB),),
                         arguments=("--working-set", str(32 * MiB // PAGE)))
        source, arriving, src, dst = yield startedGuestPair(self, spec, True)
        src.setParameters({"max-bandwidth": 64 * MiB})
        statuses: list[str] = []
        src.subscribe(lambda event: statuses.append(event["data"]["status"]))
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield deferLater(reactor, delay, lambda: None)
        src.startPostcopy()
        status = yield src.whenStatus("completed", "failed")
        self.assertEqual(status, "completed", src.queryMigrate())
        yield arriving.running
        verdicts = yield arriving.host.verify()
        self.assertTrue(all(verdict["ok"] for verdict in verdicts.values()), verdicts)
        return statuses, src.queryMigrate()

    @inlineCallbacks
    def test_switchAtOnce(self) -> None:
        """
        C{migrate-start-postcopy} right after C{migrate}, on a guest whose
        start just completed: the status goes through C{postcopy-active},
        and nothing is sent while the guest is stopped (the guest's memory
        initialisation is over before L{Guest.start} fires, so the stop
        does not wait behind it).
        """
        statuses, info = yield self.switchDuringFirstPass(0)
        self.assertEqual(statuses, ["setup", "active", "postcopy-active", "completed"])
        self.assertEqual(info["ram"]["downtime-bytes"], 0)

    @inlineCallbacks
    def test_switchPartway(self) -> None:
        """
        C{migrate-start-postcopy} partway through the first precopy pass
        (64 MiB at 64 MiB/s, asked after 0.2 s): the switch happens, with
        no page sent during the downtime.
        """
        statuses, info = yield self.switchDuringFirstPass(0.2)
        self.assertIn("postcopy-active", statuses)
        self.assertEqual(statuses[-1], "completed")
        self.assertEqual(info["ram"]["downtime-bytes"], 0)
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)


class _RunningHost:
    """
    A guest host whose workers are attached and whose C{run} is answered
    when the test says.

    @ivar runs: the Deferreds of C{run} requests.
    """

    def __init__(self) -> None:
        """
        No run requested yet.
        """
        self.runs: list[Deferred] = []

    def whenAttached(self) -> Deferred:
        """
        @return: a fired Deferred (every worker attached).
        """
        return succeed({})

    def run(self) -> Deferred:
        """
        @return: a Deferred the test fires (the workers' C{running}).
        """
        self.runs.append(Deferred())
        return self.runs[-1]


class GuestStartTests(SynchronousTestCase):
    """
    L{Guest.start}'s Deferred, which says whether a source guest runs.
    """

    def test_calledOnlyOnceRunning(self) -> None:
        """
        The Deferred is not C{called} while the workers are still in their
        first C{run} (a stress worker writing its working set), so nobody
        migrates a guest that would stop only after its initialisation.
        """
        from twisted_postcopy.guests.guest import Guest

        guest = Guest.__new__(Guest)
        guest.host = _RunningHost()
        started = guest.start()
        self.assertEqual(len(guest.host.runs), 1)
        self.assertFalse(started.called)
        guest.host.runs[0].callback({"stress-0": {}})
        self.assertEqual(self.successResultOf(started), {"stress-0": {}})


class _KVClient(LineReceiver):
    """
    Sends C{SET} requests one at a time and remembers the acknowledged
    ones; or sends C{GET}s and collects the answers.
    """

    delimiter = b"\n"

    def __init__(self, requests: list[bytes]) -> None:
        """
        @param requests: the lines to send, in order.
        """
        self.requests = list(requests)
        self.answers: list[tuple[bytes, bytes]] = []
        self.finished: Deferred = Deferred()

    def connectionMade(self) -> None:
        """
        Send the first request.
        """
        self._next()

    def _next(self) -> None:
        """
        Send the next request, or finish.
        """
        if not self.requests:
            self.transport.loseConnection()
            return
        self.sendLine(self.requests[0])

    def lineReceived(self, line: bytes) -> None:
        """
        Record the answer; stop at the first error (the guest stopped).
        """
        self.answers.append((self.requests.pop(0), line.strip()))
        if line.startswith(b"ERR stopped"):
            self.transport.loseConnection()
            return
        self._next()

    def connectionLost(self, reason: Any = None) -> None:
        """
        Done.
        """
        if not self.finished.called:
            self.finished.callback(self.answers)


class KVGuestTests(TestCase):
    """
    The built-in C{kv} guest serving clients during a postcopy migration:
    no acknowledged write is lost.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Skip without write tracking or userfaultfd.
        """
        StressGuestTests.setUp(self)

    @inlineCallbacks
    def test_noAcknowledgedWriteLost(self) -> None:
        """
        A client writes until the source guest stops; every write answered
        OK reads back the same from the destination guest.
        """
        from twisted_postcopy.guests.guest import Guest, GuestSpec, IncomingGuest

        spec = GuestSpec("kv", workers=1, blocks=(("ram", 8 * MiB),))
        source = Guest(reactor, spec, os.path.join(self.directory, "src.sock"))
        self.addCleanup(source.close)
        yield source.start()
        arriving = IncomingGuest(reactor, spec, os.path.join(self.directory, "dst.sock"))
        self.addCleanup(arriving.close)
        src = MigrationManager(reactor, source)
        dst = MigrationManager(reactor, arriving, arriving.faultServiceFactory)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        src.setParameters({"max-bandwidth": 16 * MiB, "max-postcopy-bandwidth": 4 * MiB})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        kvPort = list(source.host.workers.values())[0].info["port"]
        writes = [b"SET key%d value-%d" % (i, i * 7) for i in range(20000)]
        writer = _KVClient(writes)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", kvPort), writer)
        yield deferLater(reactor, 0.3, lambda: None)
        src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield deferLater(reactor, 0.3, lambda: None)
        src.startPostcopy()
        answers = yield writer.finished
        acknowledged = [request for request, answer in answers if answer == b"OK"]
        self.assertGreater(len(acknowledged), 10, answers[-3:])
        yield src.whenStatus("completed")
        yield arriving.running
        newPort = list(arriving.host.workers.values())[0].info["port"]
        reader = _KVClient([b"GET " + request.split()[1] for request in acknowledged])
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", newPort), reader)
        results = yield reader.finished
        self.assertEqual([answer for _, answer in results],
                         [request.split()[2] for request in acknowledged])


class PostcopyBandwidthTests(TestCase):
    """
    C{max-postcopy-bandwidth} measured on a real loopback socket.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Give up without userfaultfd (the destination's fault service).
        """
        skipWithoutUserfaultfd()

    @inlineCallbacks
    def test_backgroundPagesAtTheLimit(self) -> None:
        """
        With postcopy started at once and no guest faulting, 4 MiB of
        incompressible RAM goes as background pages at
        C{max-postcopy-bandwidth} (2 MiB/s): the bytes that crossed the
        relayed socket between C{postcopy-active} and C{completed}, per
        second, are within 25% below and 10% above the limit, and match the
        source's C{postcopy-bytes}.
        """
        limit = 2 * MiB
        source = OutgoingTestVM({"pc.ram": 4 * MiB}, device=ownDevice(b"dev"))
        source.write(0, 0, os.urandom(4 * MiB))
        destination = IncomingTestVM()
        src = MigrationManager(reactor, source)
        dst = MigrationManager(reactor, destination)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        src.setParameters({"max-bandwidth": 256 * 1024, "max-postcopy-bandwidth": limit})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        marks: dict[str, tuple[float, int]] = {}

        def mark(event: dict) -> None:
            """
            Note when each status began and how many bytes had crossed.
            """
            status = event["data"]["status"]
            if status in ("postcopy-active", "completed"):
                crossed = len(relay.connections[0].forward) if relay.connections else 0
                marks[status] = (time.monotonic(), crossed)

        src.subscribe(mark)
        src.migrate(relay.uri)
        src.startPostcopy()
        status = yield src.whenStatus("completed", "failed")
        self.assertEqual(status, "completed", src.queryMigrate())
        yield dst.whenStatus("completed", "failed")
        self.assertEqual(destination.contents(), source.contents())
        (began, before), (ended, after) = marks["postcopy-active"], marks["completed"]
        sent = after - before
        rate = sent / (ended - began)
        self.assertGreater(sent, 3 * MiB, marks)
        self.assertGreaterEqual(rate, 0.75 * limit, (rate, marks))
        self.assertLessEqual(rate, 1.1 * limit, (rate, marks))
        info = src.queryMigrate()
        ratio = info["ram"]["postcopy-bytes"] / sent
        self.assertTrue(0.95 <= ratio <= 1.0, (info["ram"]["postcopy-bytes"], sent))
