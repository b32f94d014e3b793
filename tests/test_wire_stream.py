# -*- test-case-name: tests.test_wire_stream -*-
"""
Tests for L{twisted_postcopy.wire.stream}: whole streams in any chunking,
a real QEMU 7.2 capture, packages, device sections and bad input.
"""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.wirehelpers import (
    buildPostcopyStream,
    decodeChunked,
    decodeSplit,
    globalstatePayload,
    pageBytes,
    unhex,
)
from twisted_postcopy.errors import (
    BadHeaderError,
    DeviceSectionBoundaryError,
    LimitExceededError,
    SectionMismatchError,
    TruncatedStreamError,
    UnknownElementError,
)
from twisted_postcopy.wire.constants import SectionType
from twisted_postcopy.wire.encoder import StreamEncoder, encodeEvents
from twisted_postcopy.wire.events import (
    NEED_DATA,
    ConfigurationReceived,
    DeviceSectionReceived,
    EOFReceived,
    HeaderReceived,
    ListenReceived,
    PackageReceived,
    PageReceived,
    PingReceived,
    RAMBlockInfo,
    RAMBlocksListed,
    RunReceived,
    SectionEnded,
    SectionStarted,
    VMDescriptionReceived,
)
from twisted_postcopy.wire.stream import StreamDecoder, decodeAll, iterChunks

#: Vector 7.A.
HEADER = unhex("51 45 56 4d 00 00 00 03 07 00 00 00 0d 70 63 2d 69 34 34 30 66 78 2d 37 2e 32")
#: Vector 7.M.
SUBSECTIONS = (unhex("05 1a") + b"configuration/capabilities" + unhex("00 00 00 01 00 00 00 01 0f")
               + b"x-ignore-shared" + unhex("05 12") + b"configuration/uuid"
               + unhex("00 00 00 01 12 34 56 78 9a bc de f0 11 22 33 44 55 66 77 88"))
#: A precopy capture of C{qemu-system-x86_64 -M pc -m 32 -accel tcg -S}.
CAPTURE = os.path.join(os.path.dirname(__file__), "data", "qemu72-precopy-pc-32m.mig")
#: The main stream of a postcopy migration between two QEMU 7.2, recorded by a relay.
POSTCOPY_CAPTURE = os.path.join(os.path.dirname(__file__), "data", "qemu72-postcopy-pc-32m.main.mig")
STREAM, PACKAGE = buildPostcopyStream()


class HeaderTests(SynchronousTestCase):
    """
    The header and configuration element.
    """

    def test_golden(self) -> None:
        """
        Vector 7.A decodes to version 3 and C{pc-i440fx-7.2}.
        """
        events = decodeAll(HEADER)
        self.assertEqual(events, [HeaderReceived(3), ConfigurationReceived("pc-i440fx-7.2")])
        self.assertEqual(encodeEvents(events), HEADER)
        self.assertEqual(StreamEncoder().header("pc-i440fx-7.2"), HEADER)

    def test_subsectionsKeptExactly(self) -> None:
        """
        Vector 7.M: capability and uuid subsections are kept as raw bytes.
        """
        data = HEADER + SUBSECTIONS + unhex("08 00 01 00 00")
        events = decodeAll(data)
        self.assertEqual(events[1], ConfigurationReceived("pc-i440fx-7.2", SUBSECTIONS))
        self.assertEqual(encodeEvents(events), data)

    def test_configurationWaitsForTheNextByte(self) -> None:
        """
        Like QEMU's subsection peek, the configuration is complete only when
        the byte after it (or the end) is there.
        """
        decoder = StreamDecoder()
        decoder.receiveData(HEADER)
        self.assertEqual(list(decoder.events()), [HeaderReceived(3)])
        decoder.receiveData(b"\x08")
        self.assertEqual(list(decoder.events()), [ConfigurationReceived("pc-i440fx-7.2")])

    def test_badHeaders(self) -> None:
        """
        Bad magic, version 2 or 4, and a missing configuration raise
        L{BadHeaderError} with the offset.
        """
        cases = [(b"QEVX" + HEADER[4:], 0), (HEADER[:7] + b"\x02" + HEADER[8:], 4),
                 (HEADER[:7] + b"\x04" + HEADER[8:], 4), (HEADER[:8] + b"\x08" + HEADER[9:], 8),
                 (HEADER + unhex("05 03") + b"abc" + b"\x00" * 8, 26)]
        for data, offset in cases:
            error = self.assertRaises(BadHeaderError, decodeAll, data)
            self.assertEqual(error.offset, offset)


class RealCaptureTests(SynchronousTestCase):
    """
    A real QEMU 7.2 precopy stream.
    """

    def setUp(self) -> None:
        """
        Read the capture.
        """
        with open(CAPTURE, "rb") as f:
            self.data = f.read()

    def test_roundTrip(self) -> None:
        """
        The capture decodes to the expected elements and re-encodes to the
        same bytes.
        """
        events = decodeAll(self.data)
        self.assertEqual(encodeEvents(events), self.data)
        devices = [e for e in events if isinstance(e, DeviceSectionReceived)]
        self.assertEqual(devices[-1].idstr, "globalstate")
        self.assertEqual(devices[-1].payload, globalstatePayload(b"prelaunch"))
        self.assertEqual(len(devices), 30)
        self.assertIsInstance(events[-1], VMDescriptionReceived)
        self.assertEqual(sum(isinstance(e, RAMBlocksListed) for e in events), 1)

    def test_chunkings(self) -> None:
        """
        Every chunking gives the same events.
        """
        expected = pageBytes(decodeAll(self.data))
        for size in (3, 4111, 65536):
            self.assertEqual(pageBytes(decodeChunked(StreamDecoder, self.data, size)), expected)

    def test_deviceSectionsMatchTheirVMDescription(self) -> None:
        """
        The heuristic split of each device section matches the field sizes
        of QEMU's own description for the sections it describes fully.
        """
        import json
        events = decodeAll(self.data)
        description = json.loads(events[-1].json)
        sizes = {}
        for device in description["devices"]:
            fields = device["fields"]
            if "subsections" not in device and all("struct" not in f for f in fields):
                sizes[(device["name"], device["instance_id"])] = sum(
                    f["size"] * f.get("array_len", 1) for f in fields)
        checked = 0
        for event in events:
            if isinstance(event, DeviceSectionReceived) and (event.idstr, event.instanceId) in sizes:
                self.assertEqual(len(event.payload), sizes[(event.idstr, event.instanceId)], event.idstr)
                checked += 1
        self.assertGreater(checked, 10)


class RealPostcopyCaptureTests(SynchronousTestCase):
    """
    The main stream of a real QEMU 7.2 postcopy migration, recorded by a
    TCP relay between two QEMUs (C{-M pc -m 32 -accel tcg}).
    """

    def setUp(self) -> None:
        """
        Read the recording.
        """
        with open(POSTCOPY_CAPTURE, "rb") as f:
            self.data = f.read()

    def test_roundTripWithPackage(self) -> None:
        """
        The stream and its package re-encode exactly; the package ends with
        the 14 bytes of PING(3) and RUN; no vmdesc follows EOF.
        """
        events = decodeAll(self.data)
        self.assertEqual(encodeEvents(events), self.data)
        [package] = [e for e in events if isinstance(e, PackageReceived)]
        self.assertEqual(package.data[-14:], unhex("08 00 02 00 04 00 00 00 03 08 00 05 00 00"))
        inner = decodeAll(package.data, header=False)
        self.assertEqual(encodeEvents(inner), package.data)
        self.assertEqual(sum(isinstance(e, DeviceSectionReceived) for e in inner), 30)
        self.assertIsInstance(events[-1], EOFReceived)

    def test_chunkings(self) -> None:
        """
        Chunked decoding gives the same events as one-shot decoding.
        """
        expected = pageBytes(decodeAll(self.data))
        for size in (5, 4097):
            self.assertEqual(pageBytes(decodeChunked(StreamDecoder, self.data, size)), expected)


class PostcopyStreamTests(SynchronousTestCase):
    """
    A postcopy stream built like a 7.2 source's.
    """

    def test_roundTrip(self) -> None:
        """
        The stream decodes and re-encodes exactly, and the package decodes
        with a header-less decoder into its device sections.
        """
        events = decodeAll(STREAM)
        self.assertEqual(encodeEvents(events), STREAM)
        packages = [e for e in events if isinstance(e, PackageReceived)]
        self.assertEqual(packages, [PackageReceived(PACKAGE)])
        inner = decodeAll(PACKAGE, header=False)
        self.assertEqual(encodeEvents(inner), PACKAGE)
        self.assertEqual(inner[0], ListenReceived())
        self.assertEqual(inner[-2:], [PingReceived(3), RunReceived()])
        devices = inner[1:-2]
        self.assertEqual([d.idstr for d in devices], ["timer", "twisted-postcopy/stress", "globalstate"])
        self.assertEqual(devices[0].payload, b"\x00" * 8 + unhex("7e 00 00 00 00 ff") + b"\x01" * 10)
        self.assertEqual(devices[1].payload, unhex("00 00 00 0b 7e 00 00 00 2e 04") + b" blob")
        self.assertIsInstance(events[-1], EOFReceived)

    def test_continueAndSectionsAcrossThePackage(self) -> None:
        """
        RAM sections start and end with events; the first record after the
        package names its block.
        """
        events = decodeAll(STREAM)
        kinds = [(e.kind, e.sectionId) for e in events if isinstance(e, (SectionStarted, SectionEnded))]
        self.assertEqual([k for k, _ in kinds], [
            SectionType.SECTION_START, SectionType.SECTION_START, SectionType.SECTION_PART,
            SectionType.SECTION_PART, SectionType.SECTION_PART, SectionType.SECTION_PART,
            SectionType.SECTION_END, SectionType.SECTION_END])
        afterPackage = events.index(PingReceived(4)) + 2
        self.assertEqual(events[afterPackage].continued, False)
        self.assertEqual(events[afterPackage + 1].continued, True)

    def test_byteByByte(self) -> None:
        """
        One byte at a time gives the same events.
        """
        self.assertEqual(pageBytes(decodeChunked(StreamDecoder, STREAM, 1)), pageBytes(decodeAll(STREAM)))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
    def test_anySplit(self, cuts: list[int]) -> None:
        """
        Splitting the stream anywhere gives the same events.
        """
        self.assertEqual(pageBytes(decodeSplit(StreamDecoder, STREAM, cuts)), pageBytes(decodeAll(STREAM)))

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(PACKAGE)), max_size=8))
    def test_anySplitOfThePackage(self, cuts: list[int]) -> None:
        """
        Splitting a package anywhere finds the same device-section bounds.
        """
        self.assertEqual(decodeSplit(lambda: StreamDecoder(header=False), PACKAGE, cuts),
                         decodeAll(PACKAGE, header=False))

    def test_pageViewsAreNotCopies(self) -> None:
        """
        A page's data is a view of the fed chunk.
        """
        decoder = StreamDecoder()
        decoder.receiveData(STREAM)
        pages = [e for e in decoder.events() if isinstance(e, PageReceived) and e.continued]
        self.assertIs(pages[0].data.obj, STREAM)

    def test_iterChunks(self) -> None:
        """
        L{iterChunks} decodes a chunked stream to the end.
        """
        chunks = [STREAM[i:i + 1000] for i in range(0, len(STREAM), 1000)]
        self.assertEqual(pageBytes(iterChunks(chunks)), pageBytes(decodeAll(STREAM)))

    def test_recoveryChannel(self) -> None:
        """
        A recovery main channel (no header) decodes PART sections of the RAM
        section announced on the first connection.
        """
        from twisted_postcopy.wire.events import RAMBlockInfo
        encoder = StreamEncoder()
        data = (encoder.recvBitmap("pc.ram") + encoder.resume()
                + encoder.sectionHeader(SectionType.SECTION_PART, 2) + encoder.zeroPage("pc.ram", 0x5000)
                + encoder.eos() + encoder.sectionFooter(2))
        events = decodeAll(data, header=False, blocks=[RAMBlockInfo("pc.ram", 0x10000)], ramSectionId=2)
        self.assertEqual(encodeEvents(events), data)
        self.assertIsInstance(events[-1], SectionEnded)


class HugePageBlockListTests(SynchronousTestCase):
    """
    A postcopy stream whose RAM START lists a huge page block decodes with
    its page size, in any chunking, with nothing configured.
    """

    def test_advisedHugePages(self) -> None:
        """
        ADVISE with a 2 MiB bit in its summary, then a list whose huge
        page block carries its page size: the decoder reports it.
        """
        encoder = StreamEncoder()
        blocks = [RAMBlockInfo("mem", 0x400000, 0x200000), RAMBlockInfo("pc.bios", 0x40000)]
        stream = (HEADER + encoder.openReturnPath() + encoder.postcopyAdvise(0x201000, 0x1000)
                  + encoder.ramStart(2, blocks))
        for size in (1, 7, len(stream)):
            listed = [e for e in decodeChunked(StreamDecoder, stream, size, close=False)
                      if isinstance(e, RAMBlocksListed)]
            self.assertEqual(listed, [RAMBlocksListed(blocks)])

    def test_notAdvised(self) -> None:
        """
        Without ADVISE no entry carries a page size (QEMU's rule needs
        postcopy-ram), so none is looked for.
        """
        blocks = [RAMBlockInfo("mem", 0x400000), RAMBlockInfo("pc.bios", 0x40000)]
        stream = HEADER + StreamEncoder().ramStart(2, blocks)
        listed = [e for e in decodeAll(stream) if isinstance(e, RAMBlocksListed)]
        self.assertEqual(listed, [RAMBlocksListed(blocks)])


class DeviceSectionTests(SynchronousTestCase):
    """
    The device-section end heuristic and its bounds.
    """

    def test_fakeFooterFollowedByGarbage(self) -> None:
        """
        C{7e <id>} inside a payload followed by an implausible byte does not
        end the section.
        """
        events = decodeAll(PACKAGE, header=False)
        self.assertEqual(len(events[1].payload), 24)

    def test_missingFooter(self) -> None:
        """
        Input ending before any footer raises L{DeviceSectionBoundaryError}
        naming the section's offset.
        """
        data = StreamEncoder().sectionHeader(SectionType.SECTION_FULL, 7, "apic", 0, 3) + b"\x00" * 40
        error = self.assertRaises(DeviceSectionBoundaryError, decodeAll, b"\x08\x00\x01\x00\x00" + data,
                                  header=False)
        self.assertEqual(error.offset, 5)

    def test_limit(self) -> None:
        """
        A payload longer than C{maxDeviceSectionSize} raises
        L{LimitExceededError} without waiting for the end.
        """
        decoder = StreamDecoder(header=False, maxDeviceSectionSize=1000)
        decoder.receiveData(StreamEncoder().sectionHeader(SectionType.SECTION_FULL, 7, "apic", 0, 3))
        self.assertIs(decoder.nextEvent(), NEED_DATA)
        decoder.receiveData(b"\x00" * 2000)
        self.assertRaises(LimitExceededError, decoder.nextEvent)

    def test_ownSectionLimit(self) -> None:
        """
        Our own section's length is checked before its blob is buffered.
        """
        data = StreamEncoder().ownDeviceSection(3, "kv", b"x" * 100)
        self.assertRaises(LimitExceededError, decodeAll, data[:40], header=False, maxDeviceSectionSize=50)

    def test_ownSectionFooter(self) -> None:
        """
        Our own section must end with its footer right after the blob.
        """
        data = bytearray(StreamEncoder().ownDeviceSection(3, "kv", b"abc"))
        data[-1] = 9
        self.assertRaises(SectionMismatchError, decodeAll, bytes(data), header=False)


class StreamErrorTests(SynchronousTestCase):
    """
    Bad streams raise specific errors with the stream offset.
    """

    def assertStreamError(self, exception: type, data: bytes, offset: int, **options: object) -> None:
        """
        @param exception: the expected error class.
        @param data: a stream.
        @param offset: the expected offset.
        @param options: decoder options.
        """
        error = self.assertRaises(exception, decodeAll, data, **options)
        self.assertEqual(error.offset, offset)

    def test_unknownElements(self) -> None:
        """
        0x09, a top-level subsection and a stray footer are unknown.
        """
        for byte in (b"\x09", b"\x05", b"\x7e", b"\x07"):
            self.assertStreamError(UnknownElementError, HEADER + unhex("08 00 01 00 00") + byte, 31)

    def test_partOfUnknownSection(self) -> None:
        """
        A PART for an id no START announced is rejected.
        """
        self.assertStreamError(SectionMismatchError, HEADER + unhex("02 00 00 00 02"), 26)

    def test_footers(self) -> None:
        """
        A RAM section's footer must be there and name its id.
        """
        encoder = StreamEncoder()
        start = HEADER + encoder.ramStart(2, [])
        self.assertStreamError(SectionMismatchError, start[:-5] + unhex("7e 00 00 00 03"), len(start) - 5)
        self.assertStreamError(SectionMismatchError, start[:-5] + unhex("00 00 00 00 02"), len(start) - 5)

    def test_truncated(self) -> None:
        """
        Input that ends inside an element raises L{TruncatedStreamError};
        ending between elements is fine.
        """
        self.assertStreamError(TruncatedStreamError, STREAM[:200], 135)
        self.assertStreamError(TruncatedStreamError, HEADER[:10], 8)
        decodeAll(STREAM[:HEADER.__len__() + 5])

    def test_afterEOF(self) -> None:
        """
        Only a VMDESCRIPTION may follow EOF, and nothing may follow it.
        """
        self.assertStreamError(UnknownElementError, HEADER + b"\x00\x01", 27)
        done = HEADER + b"\x00" + StreamEncoder().vmDescription(b"{}")
        self.assertEqual(decodeAll(done)[-1], VMDescriptionReceived(b"{}"))
        self.assertStreamError(UnknownElementError, done + b"\x00", len(done))

    def test_vmdescLimit(self) -> None:
        """
        A VMDESCRIPTION over the limit is refused from its length.
        """
        self.assertStreamError(LimitExceededError, HEADER + unhex("00 06 00 01 00 00"), 27,
                               maxVMDescriptionSize=1000)

    def test_offsetOption(self) -> None:
        """
        C{offset} shifts reported offsets (e.g. a package inside its stream).
        """
        error = self.assertRaises(UnknownElementError, decodeAll, unhex("08 00 01 00 00 09"),
                                  header=False, offset=1000)
        self.assertEqual(error.offset, 1005)
        self.assertIn("at stream offset 1005", str(error))

    def test_errorIsSticky(self) -> None:
        """
        After an error the decoder raises it again.
        """
        decoder = StreamDecoder()
        decoder.receiveData(b"XXXXXXXX")
        first = self.assertRaises(BadHeaderError, decoder.nextEvent)
        self.assertIs(self.assertRaises(BadHeaderError, decoder.nextEvent), first)


class PurityTests(SynchronousTestCase):
    """
    The codec is sans-IO.
    """

    def test_noReactorImport(self) -> None:
        """
        Importing the whole codec imports nothing from C{twisted.internet}.
        """
        import subprocess
        import sys
        code = ("import sys, twisted_postcopy.wire, twisted_postcopy.wire.device; "
                "print(sorted(m for m in sys.modules if m.startswith('twisted.')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "[]")
