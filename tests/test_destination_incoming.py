# -*- test-case-name: tests.test_destination_incoming -*-
"""
Tests for L{twisted_postcopy.destination.incoming} and
L{twisted_postcopy.destination.placer}: a real QEMU 7.2 precopy capture
loaded into a destination, and postcopy placement rules.
"""

from __future__ import annotations

import errno
import os

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM, PAGE
from tests.test_protocols_stream import HEADER, RP_PING_ADVISE
from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.destination.placer import PagePlacer
from twisted_postcopy.errors import RemoteProtocolError, UffdError
from twisted_postcopy.protocols.stream import DestinationProtocol, SourceProtocol
from twisted_postcopy.ram import support
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.support import unavailableError
from twisted_postcopy.source.outgoing import OutgoingMigration
from twisted_postcopy.testing.real import missingReal
from twisted_postcopy.wire import ReturnPathDecoder, decodeAll
from twisted_postcopy.wire import events as e

CAPTURE = os.path.join(os.path.dirname(__file__), "data", "qemu72-precopy-pc-32m.mig")


def _expected(stream: bytes) -> tuple[dict[str, bytearray], bytes]:
    """
    An independent oracle: replay the decoded records into byte arrays.

    @param stream: a precopy stream.
    @return: (block contents, device bytes).
    """
    memory: dict[str, bytearray] = {}
    devices = b""
    for event in decodeAll(stream):
        if isinstance(event, e.RAMBlocksListed):
            memory = {b.idstr: bytearray(b.length) for b in event.blocks}
        elif isinstance(event, e.PageReceived):
            memory[event.block][event.offset : event.offset + PAGE] = event.data
        elif isinstance(event, e.ZeroPageReceived):
            memory[event.block][event.offset : event.offset + PAGE] = bytes([event.fill]) * PAGE
        elif isinstance(event, e.DeviceSectionReceived):
            devices += event.raw
    return memory, devices


def loadingCapture() -> tuple[bytes, IncomingTestVM, IncomingMigration]:
    """
    @return: the QEMU 7.2 capture, and an incoming migration (in C{setup})
        into a new L{IncomingTestVM} to load it.
    """
    with open(CAPTURE, "rb") as f:
        stream = f.read()
    vm = IncomingTestVM()
    incoming = IncomingMigration(vm, None)
    incoming.machine.setup()
    return stream, vm, incoming


class QEMUCaptureTests(SynchronousTestCase):
    """
    A stream written by a real QEMU 7.2 source.
    """

    def test_loadCapture(self) -> None:
        """
        The capture, fed in odd-sized chunks, completes; RAM and device bytes
        equal what the records say; the guest is run once.
        """
        stream, vm, incoming = loadingCapture()
        protocol = DestinationProtocol(incoming)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for start in range(0, len(stream), 4093):
            protocol.dataReceived(stream[start : start + 4093])
        memory, devices = _expected(stream)
        self.assertEqual(vm.events, ["run", "completed"])
        self.assertEqual(vm.contents(), {name: bytes(data) for name, data in memory.items()})
        self.assertEqual(vm.devices, [devices])
        self.assertGreater(len(devices), 0)
        self.assertTrue(transport.disconnecting)


class _Faults:
    """
    A unit-test stand-in for the fault service: records placements.
    """

    def __init__(self) -> None:
        """
        Set up the instance.
        """
        self.calls: list[tuple] = []

    def placePages(self, block, offset, data):
        """
        Record a page run.
        """
        self.calls.append(("copy", block, offset, len(data)))

    def placeZero(self, block, offset, length):
        """
        Place zero pages.
        """
        self.calls.append(("zero", block, offset, length))


class PlacerTests(SynchronousTestCase):
    """
    Placement: runs before and after LISTEN, precopy holes, bad offsets.
    """

    def setUp(self) -> None:
        """
        A placer over one real 8-page block.
        """
        self.block = RAMBlock("pc.ram", 8 * PAGE)
        self.addCleanup(self.block.close)
        self.placer = PagePlacer({"pc.ram": self.block})

    def test_runs(self) -> None:
        """
        After LISTEN consecutive pages become one UFFDIO_COPY; a gap or a
        flush ends the run.
        """
        faults = self.placer.faults = _Faults()
        for page in (0, 1, 2, 5):
            self.placer.page("pc.ram", page * PAGE, bytes(PAGE))
        self.placer.flush()
        self.assertEqual(faults.calls, [("copy", "pc.ram", 0, 3 * PAGE), ("copy", "pc.ram", 5 * PAGE, PAGE)])

    def test_precopyRuns(self) -> None:
        """
        Before LISTEN a run is one C{pwrite}; the block marks it received.
        """
        self.placer.page("pc.ram", PAGE, b"a" * PAGE)
        self.placer.page("pc.ram", 2 * PAGE, b"b" * PAGE)
        self.placer.flush()
        self.assertEqual(os.pread(self.block.fd, 2 * PAGE, PAGE), b"a" * PAGE + b"b" * PAGE)
        self.assertEqual([self.block.receivedMap.test(page) for page in range(4)], [False, True, True, False])

    def test_precopyZeroIsHole(self) -> None:
        """
        A ZERO record before LISTEN punches a hole marked received and a
        hole in the block (the fault service owns it from LISTEN on); a
        discard makes it missing again; after LISTEN a ZERO record goes to
        the fault service.
        """
        self.placer.page("pc.ram", 0, b"x" * PAGE)
        self.placer.zero("pc.ram", 0, 0, PAGE)
        self.placer.zero("pc.ram", PAGE, 0, PAGE)
        self.assertEqual(os.pread(self.block.fd, PAGE, 0), bytes(PAGE))
        self.assertEqual([self.block.holeMap.test(page) for page in range(3)], [True, True, False])
        self.assertEqual(self.block.receivedMap.count(), 2)
        self.placer.discard("pc.ram", 0, PAGE)
        self.assertEqual((self.block.holeMap.test(0), self.block.receivedMap.test(0)), (False, False))
        faults = self.placer.faults = _Faults()
        self.placer.zero("pc.ram", 0, 0, PAGE)
        self.assertEqual(faults.calls, [("zero", "pc.ram", 0, PAGE)])

    def test_badOffsets(self) -> None:
        """
        Unknown blocks and offsets past the end are protocol errors.
        """
        self.assertRaises(RemoteProtocolError, self.placer.page, "nope", 0, bytes(PAGE))
        self.assertRaises(RemoteProtocolError, self.placer.page, "pc.ram", 8 * PAGE, bytes(PAGE))
        self.assertRaises(RemoteProtocolError, self.placer.page, "pc.ram", 100, bytes(PAGE))
        self.assertRaises(RemoteProtocolError, self.placer.zero, "pc.ram", 8 * PAGE, 0, PAGE)


class _RAMBlockVM(IncomingTestVM):
    """
    An incoming VM whose blocks are real L{RAMBlock}s.
    """

    def ramBlocksListed(self, blocks):
        """
        @param blocks: (idstr, length, page size) each.
        @return: idstr -> new RAMBlock.
        """
        self.blocks = {name: RAMBlock(name, length) for name, length, _ in blocks}
        for block in self.blocks.values():
            self.addCleanup(block.close)
        return self.blocks


class RAMSupportTests(SynchronousTestCase):
    """
    The destination's use of L{twisted_postcopy.ram.support} and of
    L{RAMBlock.write}, and when the fault service stops.
    """

    def _destination(self, vm, postcopy: bool = False):
        """
        @return: (incoming migration, connected protocol) over C{vm}.
        """
        incoming = IncomingMigration(vm, None, postcopy)
        incoming.machine.setup()
        protocol = DestinationProtocol(incoming)
        protocol.makeConnection(StringTransport())
        return incoming, protocol

    def test_adviseChecksUserfaultfd(self) -> None:
        """
        At POSTCOPY_ADVISE the destination runs its userfaultfd check; a
        missing privilege fails the incoming migration right there, with
        L{UffdUnavailableError}'s message naming the fix.
        """
        unavailable = unavailableError(UffdError(errno.EPERM, "userfaultfd: Operation not permitted"))

        def refuse() -> None:
            raise unavailable

        vm = IncomingTestVM()
        incoming, protocol = self._destination(vm, postcopy=True)
        incoming.checkUserfaultfd = refuse
        protocol.dataReceived(HEADER + RP_PING_ADVISE)
        self.assertEqual(incoming.machine.status.status.value, "failed")
        self.assertIs(vm.failure, unavailable)
        self.assertIn("vm.unprivileged_userfaultfd=1", str(vm.failure))
        self.assertEqual(incoming.machine.postcopy.name, "NONE")

    def test_defaults(self) -> None:
        """
        By default the check is L{support.checkUserfaultfd}, ADVISE collects
        garbage with L{support.collectGarbage} and LISTEN tunes the
        collector with L{support.tuneGarbageCollector}; the check
        passes on this host and ADVISE is accepted.
        """
        vm = IncomingTestVM()
        incoming, protocol = self._destination(vm, postcopy=True)
        self.assertIs(incoming.checkUserfaultfd, support.checkUserfaultfd)
        self.assertIs(incoming.tuneGarbageCollector, support.tuneGarbageCollector)
        self.assertIs(incoming.collectGarbage, support.collectGarbage)
        protocol.dataReceived(HEADER + RP_PING_ADVISE)
        self.assertEqual(incoming.machine.postcopy.name, "ADVISE")

    def test_listenTunesCollector(self) -> None:
        """
        ADVISE collects garbage (off the switchover path); LISTEN tunes the
        collector once, before the fault service starts.
        """
        calls: list[str] = []
        incoming = IncomingMigration(IncomingTestVM(), None, True,
                                     lambda blocks, source: calls.append("faults"))
        incoming.tuneGarbageCollector = lambda: calls.append("gc")
        incoming.collectGarbage = lambda: calls.append("collect")
        incoming.checkUserfaultfd = lambda: calls.append("check")
        incoming.machine.setup()
        incoming.connected()
        incoming.advise(PAGE, PAGE)
        self.assertEqual(calls, ["check", "collect"])
        incoming.ramBlocksListed([("pc.ram", 4 * PAGE, None)])
        incoming.listen()
        self.assertEqual(calls, ["check", "collect", "gc", "faults"])

    def test_precopyMarksReceived(self) -> None:
        """
        Precopy pages go through L{RAMBlock.write}: every page is received,
        the ZERO pages are holes (exactly those not sent with data), and
        the memfd holds the data.
        """
        source = OutgoingTestVM({"pc.ram": 16 * PAGE})
        for page in (1, 2, 3, 9):
            source.write(0, page * PAGE, b"%d" % page)
        clock = Clock()
        parameters = {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300}
        migration = OutgoingMigration(source, None, clock.seconds, {}, parameters)
        migration.begin()
        sending = StringTransport()
        SourceProtocol(migration, clock).makeConnection(sending)
        while not migration.written:
            clock.advance(0.1)
        vm = _RAMBlockVM()
        vm.addCleanup = self.addCleanup
        incoming, protocol = self._destination(vm)
        protocol.dataReceived(sending.value())
        self.assertEqual(vm.events, ["run", "completed"])
        block = vm.blocks["pc.ram"]
        self.assertEqual(block.receivedMap.count(), 16)
        self.assertEqual([page for page in range(16) if not block.holeMap.test(page)], [1, 2, 3, 9])
        self.assertEqual(os.pread(block.fd, block.length, 0), source.contents()["pc.ram"])

    def test_stopOnlyWhenAllPlaced(self) -> None:
        """
        With the production fault service: it stops only after every page
        is placed.  Precopy holes get zero pages first, and so do the pages
        a postcopy stream never sent (QEMU's meaning: POSTCOPY_ADVISE
        emptied the destination's RAM), so the migration completes with
        those pages zero and no guest can fault on them afterwards.
        """
        from twisted_postcopy.ram.faults import FaultService

        try:
            support.checkUserfaultfd()
        except Exception as error:
            missingReal(f"userfaultfd: {error}")
        for sent in (4, 3, 0):
            services: list[FaultService] = []

            def factory(blocks, source):
                services.append(FaultService(MemoryReactor(), source, blocks))
                return services[-1]

            vm = IncomingTestVM()
            incoming = IncomingMigration(vm, None, True, factory)
            incoming.tuneGarbageCollector = lambda: None
            incoming.machine.setup()
            incoming.connected()
            incoming.advise(PAGE, PAGE)
            incoming.ramBlocksListed([("pc.ram", 5 * PAGE, None)])
            self.addCleanup(vm.blocks["pc.ram"].close)
            incoming.zero("pc.ram", 4 * PAGE, 0)
            incoming.listen()
            incoming.run()
            for page in range(sent):
                incoming.page("pc.ram", page * PAGE, b"%d" % page * PAGE)
            incoming.flush()
            block = vm.blocks["pc.ram"]
            self.assertEqual(services[0].missingPages(), 4 - sent)
            incoming.eof()
            self.assertEqual(block.holeMap.count(), 0)
            self.assertTrue(block.receivedMap.all())
            self.assertEqual(vm.contents()["pc.ram"],
                             b"".join(b"%d" % page * PAGE for page in range(sent)) + bytes((5 - sent) * PAGE))
            self.assertEqual(incoming.machine.status.status.value, "completed")
            self.assertEqual(services[0].uffd, -1)


class RequestTests(SynchronousTestCase):
    """
    L{IncomingMigration} as the fault service's page source.
    """

    def test_fireAndForget(self) -> None:
        """
        A request becomes one REQ_PAGES of the block's page size, queued
        for the return path (L{IncomingMigration.dataToSend}), and returns
        nothing; once the migration is over a request is only logged.
        """
        vm = IncomingTestVM()
        incoming = IncomingMigration(vm, None)
        incoming.machine.setup()
        incoming.connected()
        incoming.ramBlocksListed([("pc.ram", 4 * PAGE, None)])
        self.addCleanup(vm.blocks["pc.ram"].close)
        self.assertIsNone(incoming.requestPage("pc.ram", 2 * PAGE))
        [event] = ReturnPathDecoder().decodeWhole(incoming.dataToSend())
        self.assertEqual((event.block, event.start, event.length), ("pc.ram", 2 * PAGE, PAGE))
        incoming.failed(RemoteProtocolError("cut"))
        self.assertIsNone(incoming.requestPage("pc.ram", 3 * PAGE))
        self.assertEqual((incoming.dataToSend(), incoming.pageRequests), (b"", 1))
