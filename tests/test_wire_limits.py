# -*- test-case-name: tests.test_wire_limits -*-
"""
Hostile inputs against the decoders, the source's request queue, the
preempt channel and the control socket: each gets its specific error
(a L{RemoteProtocolError} subclass with an offset, naming the limit) within
1 s of CPU and bounded memory, and decoding is linear in the input.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from typing import Any, Callable

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.control.server import ControlAMP
from twisted_postcopy.errors import (
    DuplicateRAMBlockError,
    LimitExceededError,
    RemoteProtocolError,
)
from twisted_postcopy.protocols.dispatch import IncomingStreamReader, ReturnPathReader
from twisted_postcopy.protocols.preempt import PreemptDestinationProtocol
from twisted_postcopy.source.sender import PageScheduler
from twisted_postcopy.wire import ReturnPathEncoder, StreamDecoder, StreamEncoder
from twisted_postcopy.wire.buffer import ReceiveBuffer
from twisted_postcopy.wire.config import encodeHeader, encodeSubsection
from twisted_postcopy.wire.constants import (
    CONFIG_CAPABILITIES,
    CONFIG_TARGET_PAGE_BITS,
    DEFAULT_MAX_PREEMPT_HELD,
    MAX_AMP_BOX_SIZE,
    SectionType,
)
from twisted_postcopy.wire.events import RAMBlockInfo
from twisted_postcopy.wire.ram import encodeBlockList

from .wirebytes import footer, sectionHeader

#: CPU seconds one hostile input may cost.
CPU_BOUND = 1.0
#: Bytes of Python memory one hostile input may hold at its peak.
MEMORY_BOUND = 16 << 20
MiB = 1 << 20
PAGE = 4096


def chunks(data: bytes, size: int) -> list[bytes]:
    """
    @param data: bytes.
    @param size: chunk size.
    @return: C{data} cut into C{size}-byte pieces (as a socket delivers).
    """
    return [data[i:i + size] for i in range(0, len(data), size)]


class BoundedMixin:
    """
    Run a hostile input under a CPU and a memory bound.
    """

    def assertBounded(self, work: Callable[[], Any], cpu: float = CPU_BOUND,
                      memory: int | None = MEMORY_BOUND) -> Any:
        """
        @param work: what to run.
        @param cpu: the most CPU seconds it may take.
        @param memory: the most bytes it may hold at its peak (tracemalloc;
            L{None}: not measured, for work of many tiny allocations that
            tracemalloc would slow down).
        @return: what C{work} returned.
        """
        if memory is not None:
            tracemalloc.start()
        started = time.process_time()
        try:
            result = work()
        finally:
            spent = time.process_time() - started
            peak = tracemalloc.get_traced_memory()[1] if memory is not None else 0
            tracemalloc.stop()
        self.assertLess(spent, cpu, f"took {spent:.2f} s of CPU")  # type: ignore[attr-defined]
        if memory is not None:
            self.assertLess(peak, memory, f"peak {peak} bytes")  # type: ignore[attr-defined]
        return result

    def feedUntilError(self, decoder: Any, data: bytes, size: int, close: bool = True) -> RemoteProtocolError:
        """
        Feed C{data} in C{size}-byte chunks, taking events after each,
        until the decoder fails.

        @return: the error.
        """
        try:
            for chunk in chunks(data, size):
                decoder.receiveData(chunk)
                for _ in decoder.events():
                    pass
            if close:
                decoder.receiveData(b"")
                for _ in decoder.events():
                    pass
        except RemoteProtocolError as error:
            self.assertIsNotNone(error.offset)  # type: ignore[attr-defined]
            return error
        raise AssertionError("the decoder accepted the input")


class ReceiveBufferLinearTests(SynchronousTestCase, BoundedMixin):
    """
    L{ReceiveBuffer.ensure} is linear in the bytes received.
    """

    def test_growingElementFromPendingChunks(self) -> None:
        """
        An element a parser needs in growing steps (ensure(16), ensure(32),
        ...) over 4 MiB already received in 4 KiB chunks is joined
        O(log n) times, not once per step (the old buffer copied the
        element every step: 512 GiB here).
        """
        data = b"y" * (4 * MiB)

        def work() -> None:
            buffer = ReceiveBuffer()
            for chunk in chunks(data, 4096):
                buffer.feed(chunk)
            wanted = 16
            while buffer.ensure(wanted):
                wanted += 16
            self.assertEqual(wanted, len(data) + 16)

        self.assertBounded(work, memory=None)

    def test_bigElementTrickling(self) -> None:
        """
        A 16 MiB package arriving in 4 KiB chunks, the decoder asked for
        events after each chunk, is copied once: C{ensure} copies nothing
        until the whole element is there.
        """
        encoder = StreamEncoder()
        data = encoder.header("pc") + encoder.packaged(b"\x00" * (16 * MiB))
        decoder = StreamDecoder()

        def work() -> list:
            events = []
            for chunk in chunks(data, 4096):
                decoder.receiveData(chunk)
                events.extend(decoder.events())
            return events

        events = self.assertBounded(work, memory=None)
        self.assertEqual(len(events[-1].data), 16 * MiB)


def configuration(subsections: bytes) -> bytes:
    """
    @param subsections: raw configuration subsections.
    @return: a stream header with them.
    """
    return encodeHeader("pc-i440fx-7.2", subsections)


class ConfigurationLimitTests(SynchronousTestCase, BoundedMixin):
    """
    The configuration element's capability count and size.
    """

    def test_capabilityCount(self) -> None:
        """
        A capability count of 0xffffffff is refused as soon as it is read
        (max-capabilities), whatever follows.
        """
        body = encodeSubsection(CONFIG_CAPABILITIES, struct.pack(">I", 0xFFFFFFFF) + b"\x01a" * 256 * 1024)
        data = configuration(body)
        error = self.assertBounded(lambda: self.feedUntilError(StreamDecoder(), data, 4096))
        self.assertIsInstance(error, LimitExceededError)
        self.assertEqual(error.limit, "max-capabilities")
        self.assertEqual(error.offset, 8 + 5 + len("pc-i440fx-7.2") + 2 + len(CONFIG_CAPABILITIES) + 4)

    def test_hostileConfigurationBytes(self) -> None:
        """
        512 KiB of configuration subsections (each one valid) in 1 KiB
        chunks is refused at max-configuration-size, cheaply.
        """
        one = encodeSubsection(CONFIG_TARGET_PAGE_BITS, struct.pack(">I", 12))
        data = configuration(one * (512 * 1024 // len(one)))
        error = self.assertBounded(lambda: self.feedUntilError(StreamDecoder(), data, 1024))
        self.assertIsInstance(error, LimitExceededError)
        self.assertEqual(error.limit, "max-configuration-size")
        self.assertEqual(error.offset, 8)

    def test_byteByByte(self) -> None:
        """
        A valid 7.2 configuration with the most capabilities allowed, fed
        one byte at a time, decodes (each byte is scanned once).
        """
        names = b"".join(b"\x0fx-ignore-shared" for _ in range(64))
        data = configuration(encodeSubsection(CONFIG_CAPABILITIES, struct.pack(">I", 64) + names)) + b"\x00"
        decoder = StreamDecoder()

        def work() -> list:
            events = []
            for byte in chunks(data, 1):
                decoder.receiveData(byte)
                events.extend(decoder.events())
            return events

        events = self.assertBounded(work)
        self.assertEqual(events[1].subsections[-16:], names[-16:])


def ramStart(blocks: list[RAMBlockInfo], sectionId: int = 2) -> bytes:
    """
    @param blocks: the block list.
    @param sectionId: the section id.
    @return: a RAM START section header and its block list.
    """
    return sectionHeader(SectionType.SECTION_START, sectionId, "ram", 0, 4) + encodeBlockList(blocks)


def streamWith(body: bytes) -> bytes:
    """
    @param body: elements after the configuration.
    @return: a stream header, an empty configuration and C{body}.
    """
    return configuration(b"") + body


class BlockListLimitTests(SynchronousTestCase, BoundedMixin):
    """
    The RAM START block list: size, count, total RAM, duplicates, one START.
    """

    def test_bigBlockList(self) -> None:
        """
        A 1.1 MB block list (4400 blocks of 255-byte names) in 4 KiB chunks
        is refused at max-ram-blocks within the bound.
        """
        blocks = [RAMBlockInfo(f"{i:05d}" + "b" * 250, PAGE) for i in range(4400)]
        data = streamWith(ramStart(blocks))
        self.assertGreater(len(data), 1100 * 1000)
        error = self.assertBounded(lambda: self.feedUntilError(StreamDecoder(), data, 4096))
        self.assertIsInstance(error, LimitExceededError)
        self.assertEqual(error.limit, "max-ram-blocks")

    def test_bigValidBlockListByteByByte(self) -> None:
        """
        A list of 500 blocks with 255-byte names (136 KiB), fed in 64-byte
        chunks, decodes within the bound: each entry is scanned once.
        """
        blocks = [RAMBlockInfo(f"{i:05d}" + "c" * 250, PAGE) for i in range(500)]
        data = streamWith(ramStart(blocks) + struct.pack(">Q", 0x10) + footer(2))
        decoder = StreamDecoder()

        def work() -> list:
            events = []
            for chunk in chunks(data, 64):
                decoder.receiveData(chunk)
                events.extend(decoder.events())
            return events

        events = self.assertBounded(work)
        self.assertEqual(list(events[3].blocks), blocks)

    def test_totalRAM(self) -> None:
        """
        A MEM_SIZE total over max-total-ram is refused before any entry.
        """
        data = streamWith(ramStart([RAMBlockInfo("pc.ram", 768 << 30)]))
        decoder = StreamDecoder(maxTotalRAM=512 << 30)
        error = self.feedUntilError(decoder, data, 4096)
        self.assertIsInstance(error, LimitExceededError)
        self.assertEqual(error.limit, "max-total-ram")

    def test_secondRAMStart(self) -> None:
        """
        A second RAM START is a protocol error (590 bytes used to list
        768 GiB of RAM this way).
        """
        one = ramStart([RAMBlockInfo("pc.ram", 1 << 30)]) + struct.pack(">Q", 0x10) + footer(2)
        data = streamWith(one + ramStart([RAMBlockInfo("pc.ram2", 1 << 30)], 3))
        error = self.feedUntilError(StreamDecoder(), data, 4096)
        self.assertIsInstance(error, DuplicateRAMBlockError)
        self.assertIn("second RAM START", str(error))
        self.assertEqual(error.offset, len(streamWith(one)))

    def test_RAMStartInPackage(self) -> None:
        """
        A RAM START inside a package is a second list too: the destination's
        reader refuses it with the package's offset in the stream.
        """
        class Incoming:
            def __getattr__(self, name: str) -> Callable[..., None]:
                return lambda *args: None

        one = ramStart([RAMBlockInfo("pc.ram", 1 << 30)]) + struct.pack(">Q", 0x10) + footer(2)
        inner = ramStart([RAMBlockInfo("pc.ram2", 1 << 40)], 3)
        head = streamWith(one)
        data = head + StreamEncoder().packaged(inner)
        reader = IncomingStreamReader(Incoming())
        error = self.assertRaises(DuplicateRAMBlockError, reader.receiveData, data)
        self.assertIn("inside a package", str(error))
        self.assertEqual(error.offset, len(head) + 9)

    def test_duplicateBlockNames(self) -> None:
        """
        A block listed twice is a protocol error at the second entry.
        """
        data = streamWith(ramStart([RAMBlockInfo("pc.ram", PAGE)] * 500))
        error = self.feedUntilError(StreamDecoder(), data, 4096)
        self.assertIsInstance(error, DuplicateRAMBlockError)
        self.assertIn("'pc.ram' listed twice", str(error))

    def test_duplicateNamesCreateNoBlock(self) -> None:
        """
        The destination's reader never hands a list with a duplicate to the
        engine, so no RAMBlock (memfd) is made for it.
        """
        listed: list = []

        class Incoming:
            def configurationReceived(self, machine: str, subsections: bytes) -> None:
                pass

            def ramBlocksListed(self, blocks: list) -> None:
                listed.append(blocks)

        reader = IncomingStreamReader(Incoming())
        data = streamWith(ramStart([RAMBlockInfo(f"b{i % 250}", PAGE) for i in range(500)]))
        self.assertRaises(DuplicateRAMBlockError, reader.receiveData, data)
        self.assertEqual(listed, [])


class DeviceBytesTests(SynchronousTestCase, BoundedMixin):
    """
    The total of device-section bytes a destination holds.
    """

    def test_decoderTotal(self) -> None:
        """
        Device sections over max-device-bytes in all are refused at the
        section that crosses the limit.
        """
        encoder = StreamEncoder()
        section = encoder.ownDeviceSection(10, "g", b"z" * 1000)
        data = encoder.header("pc") + section * 20
        error = self.feedUntilError(StreamDecoder(maxDeviceBytes=10 * len(section)), data, 4096)
        self.assertIsInstance(error, LimitExceededError)
        self.assertEqual(error.limit, "max-device-bytes")
        self.assertEqual(error.offset, len(encoder.header("pc")) + 10 * len(section))

    def test_heldAcrossPackages(self) -> None:
        """
        The destination's reader counts the device bytes it holds until RUN
        across packages: two packages without RUN in between cannot hold
        more than the limit.
        """
        class Incoming:
            def __getattr__(self, name: str) -> Callable[..., None]:
                return lambda *args: None

        encoder = StreamEncoder()
        section = encoder.ownDeviceSection(10, "g", b"z" * 4000)
        reader = IncomingStreamReader(Incoming())
        reader.decoder = StreamDecoder(maxDeviceBytes=5 * len(section))
        package = encoder.packaged(section * 3)
        data = encoder.header("pc") + package + package

        def work() -> LimitExceededError:
            return self.assertRaises(LimitExceededError, reader.receiveData, data)

        error = self.assertBounded(work)
        self.assertEqual(error.limit, "max-device-bytes")
        self.assertIsNotNone(error.offset)


class RequestQueueTests(SynchronousTestCase, BoundedMixin):
    """
    Page requests queued on the source are de-duplicated and capped.
    """

    def scheduler(self, length: int = 64 * MiB) -> PageScheduler:
        """
        @return: a scheduler of one block of C{length} bytes.
        """
        return PageScheduler.forBlocks([("pc.ram", length, PAGE)])

    def test_wholeBlockRequests(self) -> None:
        """
        2000 REQ_PAGES for a whole 64 MiB block queue one range, and the
        pages come out once each, in order.
        """
        scheduler = self.scheduler()
        reader = ReturnPathReader(_Outgoing(scheduler))
        encoder = ReturnPathEncoder()
        data = b"".join(encoder.requestPages("pc.ram", 0, 64 * MiB) for _ in range(2000))
        self.assertBounded(lambda: reader.receiveData(data))
        self.assertEqual(len(scheduler.queue), 1)
        first = [scheduler.nextUrgent().offset for _ in range(3)]
        self.assertEqual(first, [0, PAGE, 2 * PAGE])

    def test_burst(self) -> None:
        """
        A 167-byte burst of requests for big ranges (2.6 M page entries
        before) queues a handful of ranges.
        """
        scheduler = self.scheduler(1 << 30)
        reader = ReturnPathReader(_Outgoing(scheduler))
        encoder = ReturnPathEncoder()
        data = encoder.requestPages("pc.ram", 0, 1 << 30) + b"".join(
            encoder.requestPages("pc.ram", i * PAGE, (1 << 30) - i * PAGE) for i in range(1, 9))
        self.assertLessEqual(len(data), 167)
        self.assertBounded(lambda: reader.receiveData(data))
        self.assertEqual(len(scheduler.queue), 1)

    def test_cap(self) -> None:
        """
        Distinct single-page requests beyond max-queued-requests fail the
        return path with the limit's name and the stream offset.
        """
        scheduler = self.scheduler()
        scheduler.queue.limit = 100
        reader = ReturnPathReader(_Outgoing(scheduler))
        encoder = ReturnPathEncoder()
        data = b"".join(encoder.requestPages("pc.ram", 2 * i * PAGE, PAGE) for i in range(200))
        error = self.assertRaises(LimitExceededError, reader.receiveData, data)
        self.assertEqual(error.limit, "max-queued-requests")
        named = len(ReturnPathEncoder().requestPages("pc.ram", 0, PAGE))
        self.assertEqual(error.offset, named + 100 * 16)

    def test_sentPagesAreNotQueued(self) -> None:
        """
        A request for pages already sent queues nothing; one for a page
        queued and then sent can be queued again.
        """
        scheduler = self.scheduler(16 * PAGE)
        scheduler.queueRequest("pc.ram", 0, PAGE)
        self.assertEqual(scheduler.nextUrgent().offset, 0)
        scheduler.queueRequest("pc.ram", 0, PAGE)
        self.assertEqual(len(scheduler.queue), 0)
        scheduler.queueRequest("pc.ram", PAGE, PAGE)
        scheduler.queue.clear()
        scheduler.queueRequest("pc.ram", PAGE, PAGE)
        self.assertEqual(scheduler.nextUrgent().offset, PAGE)
        self.assertIsNone(scheduler.nextUrgent())


class _Outgoing:
    """
    The part of an outgoing migration a L{ReturnPathReader} calls, over a
    real L{PageScheduler} (a stand-in for the engine, for unit tests).
    """

    def __init__(self, scheduler: PageScheduler) -> None:
        self.scheduler = scheduler

    def pagesRequested(self, idstr: str | None, start: int, length: int) -> None:
        self.scheduler.queueRequest(idstr, start, length)


class PreemptHeldTests(SynchronousTestCase, BoundedMixin):
    """
    The preempt channel holds bytes before the block list up to a cap.
    """

    def test_cap(self) -> None:
        """
        More than max-preempt-held bytes before the RAM block list fail the
        channel and the incoming migration, and drop the connection.
        """
        failures: list = []

        class Incoming:
            placer = None

            def preemptOpened(self) -> None:
                pass

            def failed(self, reason: BaseException) -> None:
                failures.append(reason)

        protocol = PreemptDestinationProtocol(Incoming())
        protocol.makeConnection(StringTransport())
        protocol.ended.addErrback(lambda f: None)
        chunk = b"\x00" * 65536

        def work() -> None:
            for _ in range(DEFAULT_MAX_PREEMPT_HELD // len(chunk) + 8):
                if protocol.transport.disconnecting:
                    break
                protocol.dataReceived(chunk)

        self.assertBounded(work, memory=DEFAULT_MAX_PREEMPT_HELD + MEMORY_BOUND)
        self.assertTrue(protocol.transport.disconnecting)
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0], LimitExceededError)
        self.assertEqual(failures[0].limit, "max-preempt-held")
        self.assertLessEqual(protocol.heldBytes, DEFAULT_MAX_PREEMPT_HELD)


class AMPBoxTests(SynchronousTestCase, BoundedMixin):
    """
    The control socket's AMP boxes are capped.
    """

    def test_unterminatedBox(self) -> None:
        """
        An AMP box that never ends (distinct keys, 60 KiB values) is
        dropped with its connection once it passes max-amp-box.
        """
        protocol = ControlAMP(manager=None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        value = b"v" * 60000
        pair = lambda i: (struct.pack(">H", 8) + b"k%07d" % i + struct.pack(">H", len(value)) + value)

        def work() -> None:
            for i in range(2 * MAX_AMP_BOX_SIZE // len(value)):
                protocol.dataReceived(pair(i))

        self.assertBounded(work, memory=MAX_AMP_BOX_SIZE + MEMORY_BOUND)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.boxTooLarge.limit, "max-amp-box")

    def test_normalBoxes(self) -> None:
        """
        Ordinary boxes still work: a box under the limit reaches the
        responder machinery (an unknown command gets an error answer).
        """
        protocol = ControlAMP(manager=None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for _ in range(3):
            protocol.dataReceived(
                b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x04Nope\x00\x00")
        self.assertFalse(transport.disconnecting)
        self.assertIn(b"_error", transport.value())


class NamedLimitTests(SynchronousTestCase):
    """
    The size limits of single elements name themselves in the error, as
    the Limits table of docs/wire-format.md says every limit does.
    """

    def assertLimit(self, decoder: Any, data: bytes, name: str) -> None:
        """
        @param decoder: a decoder with a small limit.
        @param data: bytes over that limit.
        @param name: the limit's documented name.
        """
        decoder.receiveData(data)
        error = self.assertRaises(LimitExceededError, lambda: list(decoder.events()))
        self.assertEqual(error.limit, name)
        self.assertIn(f"[{name}]", str(error))

    def test_package(self) -> None:
        """
        A PACKAGED body over C{max-package-size}.
        """
        self.assertLimit(StreamDecoder(header=False, maxPackageSize=16),
                         StreamEncoder().packaged(b"x" * 32), "max-package-size")

    def test_vmdesc(self) -> None:
        """
        A VMDESCRIPTION over C{max-vmdesc-size}.
        """
        encoder = StreamEncoder()
        self.assertLimit(StreamDecoder(header=False, maxVMDescriptionSize=8),
                         encoder.eof() + encoder.vmDescription(b'{"devices": []}'), "max-vmdesc-size")

    def test_recvBitmap(self) -> None:
        """
        A RECV_BITMAP body over C{max-recv-bitmap-size}.
        """
        from twisted_postcopy.wire import ReturnPathDecoder

        self.assertLimit(ReturnPathDecoder(maxBitmapSize=8),
                         ReturnPathEncoder().recvBitmap("pc.ram", bytes(64)), "max-recv-bitmap-size")
