# -*- test-case-name: tests.test_destination_incoming -*-
"""
Tests for L{twisted_postcopy.destination.incoming} and
L{twisted_postcopy.destination.placer}: a real QEMU 7.2 precopy capture
loaded into a destination, and postcopy placement rules.
"""

from __future__ import annotations

import os

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.enginevm import IncomingTestVM, PAGE
from twisted_postcopy.destination.incoming import IncomingMigration
from twisted_postcopy.destination.placer import HOLE, PagePlacer
from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.protocols.stream import DestinationProtocol
from twisted_postcopy.wire import decodeAll
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


class QEMUCaptureTests(SynchronousTestCase):
    """
    A stream written by a real QEMU 7.2 source.
    """

    def test_loadCapture(self) -> None:
        """
        The capture, fed in odd-sized chunks, completes; RAM and device bytes
        equal what the records say; the guest is run once.
        """
        with open(CAPTURE, "rb") as f:
            stream = f.read()
        vm = IncomingTestVM()
        incoming = IncomingMigration(vm, None)
        incoming.machine.setup()
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
    Records placements.
    """

    def __init__(self) -> None:
        """
        Set up the instance.
        """
        self.calls: list[tuple] = []

    def placePages(self, block, offset, data):
        """
        Place pages (UFFDIO_COPY here, or a stand-in).
        """
        self.calls.append(("copy", block, offset, len(data)))

    def placeZero(self, block, offset, length):
        """
        Place zero pages.
        """
        self.calls.append(("zero", block, offset, length))


class _Block:
    """
    A block that records discards.
    """

    def __init__(self, length: int) -> None:
        """
        Set up the instance.
        """
        self.length, self.pageSize, self.fd = length, PAGE, -1
        self.discards: list[tuple[int, int]] = []

    def discard(self, offset: int, length: int) -> None:
        """
        Record a discard.
        """
        self.discards.append((offset, length))


class PlacerTests(SynchronousTestCase):
    """
    Postcopy placement: runs, holes, never twice.
    """

    def setUp(self) -> None:
        """
        Prepare the VMs and managers for one test.
        """
        self.block = _Block(8 * PAGE)
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

    def test_neverTwice(self) -> None:
        """
        A page sent twice after LISTEN is refused before the kernel's EEXIST.
        """
        self.placer.faults = _Faults()
        self.placer.page("pc.ram", 0, bytes(PAGE))
        self.assertRaises(RemoteProtocolError, self.placer.page, "pc.ram", 0, bytes(PAGE))

    def test_discardAllowsResend(self) -> None:
        """
        A precopy zero page is a hole; discarding it lets it come again in
        postcopy; an undiscarded hole is filled with a zero page on fault.
        """
        self.placer.zero("pc.ram", 0, 0, PAGE)
        self.placer.zero("pc.ram", PAGE, 0, PAGE)
        self.assertEqual(self.placer.received["pc.ram"][:2], bytes([HOLE, HOLE]))
        self.placer.discard("pc.ram", 0, PAGE)
        faults = self.placer.faults = _Faults()
        self.placer.page("pc.ram", 0, bytes(PAGE))
        self.assertTrue(self.placer.fillHole("pc.ram", PAGE))
        self.assertFalse(self.placer.fillHole("pc.ram", PAGE))
        self.assertEqual(faults.calls, [("zero", "pc.ram", PAGE, PAGE)])

    def test_badOffsets(self) -> None:
        """
        Unknown blocks and offsets past the end are load errors.
        """
        self.assertRaises(RemoteProtocolError, self.placer.page, "nope", 0, bytes(PAGE))
        self.assertRaises(RemoteProtocolError, self.placer.page, "pc.ram", 8 * PAGE, bytes(PAGE))
