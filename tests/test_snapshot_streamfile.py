# -*- test-case-name: tests.test_snapshot_streamfile -*-
"""
Tests for L{twisted_postcopy.snapshot.streamfile}: importing recorded QEMU
precopy streams (hand-built ones, and a real QEMU 7.2 recording in
C{tests/data}) into snapshots.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import (
    BadRAMRecordError,
    LimitExceededError,
    RemoteProtocolError,
    SnapshotError,
    UnsupportedFeatureError,
)
from twisted_postcopy.snapshot.streamfile import findVMDescription, importStreamFile
from twisted_postcopy.testing import fuzz

PAGE = 4096
DATA = os.path.join(os.path.dirname(__file__), "data", "qemu72-precopy-pc-32m.mig")
MACHINE = b"pc-i440fx-7.2"
VMDESC = json.dumps({"page_size": 4096, "devices": [{"name": "timer"}]}).encode()
#: A FULL device section of QEMU's shape (no length field), footer included.
DEVICE = (b"\x04" + struct.pack(">I", 5) + b"\x05timer" + struct.pack(">II", 0, 2) + bytes(range(40))
          + b"\x7e" + struct.pack(">I", 5))


def str8(text: bytes) -> bytes:
    """
    @param text: an id string.
    @return: its C{str8} encoding.
    """
    return bytes([len(text)]) + text


def record(offset: int, flags: int, block: bytes | None) -> bytes:
    """
    @param offset: page offset.
    @param flags: RAM_SAVE_FLAG_* (CONTINUE added when C{block} is None).
    @param block: the block name, or None for CONTINUE.
    @return: the record header.
    """
    if block is None:
        return struct.pack(">Q", offset | flags | 0x20)
    return struct.pack(">Q", offset | flags) + str8(block)


def stream(pages: bytes = b"", tail: bytes = DEVICE, vmdesc: bytes = VMDESC) -> bytes:
    """
    Build a QEMU-shaped precopy stream with blocks C{pc.ram} (4 pages) and
    C{pc.rom} (1 page).

    @param pages: RAM records of the PART section.
    @param tail: device sections.
    @param vmdesc: the JSON after EOF.
    @return: the stream bytes.
    """
    blocks = str8(b"pc.ram") + struct.pack(">Q", 4 * PAGE) + str8(b"pc.rom") + struct.pack(">Q", PAGE)
    out = struct.pack(">IIB", 0x5145564D, 3, 7) + struct.pack(">I", len(MACHINE)) + MACHINE
    out += b"\x01" + struct.pack(">I", 2) + str8(b"ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", 5 * PAGE | 0x04) + blocks + struct.pack(">Q", 0x10)
    out += b"\x7e" + struct.pack(">I", 2)
    out += b"\x02" + struct.pack(">I", 2) + pages + struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 2)
    out += b"\x03" + struct.pack(">I", 2) + struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 2)
    return out + tail + b"\x00\x06" + struct.pack(">I", len(vmdesc)) + vmdesc


class ImportTests(SynchronousTestCase):
    """
    L{importStreamFile}.
    """

    def importBytes(self, data: bytes):
        """
        @param data: a stream.
        @return: the imported snapshot.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return importStreamFile(path, self.mktemp())

    def test_pagesAndDevices(self) -> None:
        """
        PAGE, ZERO (with a non-zero fill) and CONTINUE records land in the
        right blocks; the device tail is kept byte-exact; the form is
        C{precopy}; configuration is the bytes after the type byte.
        """
        pages = (record(PAGE, 0x08, b"pc.ram") + b"a" * PAGE
                 + record(2 * PAGE, 0x02, None) + b"\x07"
                 + record(3 * PAGE, 0x02, None) + b"\x00"
                 + record(0, 0x08, b"pc.rom") + b"r" * PAGE)
        snapshot = self.importBytes(stream(pages))
        self.assertEqual(snapshot.read("pc.ram", 0, 4 * PAGE),
                         bytes(PAGE) + b"a" * PAGE + b"\x07" * PAGE + bytes(PAGE))
        self.assertEqual(snapshot.read("pc.rom", 0, PAGE), b"r" * PAGE)
        self.assertEqual(snapshot.deviceState(), DEVICE)
        self.assertEqual(snapshot.form, "precopy")
        self.assertEqual(snapshot.configuration(), struct.pack(">I", len(MACHINE)) + MACHINE)
        snapshot.verify()

    def test_vmdescInsideDevice(self) -> None:
        """
        Bytes that look like EOF + VMDESC inside a device section do not
        end the tail early: only the vmdesc that ends the file counts.
        """
        fake = b"\x00\x06" + struct.pack(">I", 2) + b"{}"
        tail = DEVICE[:-5] + fake + DEVICE[-5:]
        self.assertEqual(self.importBytes(stream(tail=tail)).deviceState(), tail)

    def test_noVMDescription(self) -> None:
        """
        A stream cut before its vmdesc is refused.
        """
        self.assertRaises(RemoteProtocolError, self.importBytes, stream()[:-3])

    def test_truncatedRAM(self) -> None:
        """
        A stream cut inside RAM is refused.
        """
        self.assertRaises(RemoteProtocolError, self.importBytes, stream()[:60])

    def test_unknownBlock(self) -> None:
        """
        A page for a block not in the list is refused.
        """
        pages = record(0, 0x08, b"vga.vram") + b"v" * PAGE
        self.assertRaises(RemoteProtocolError, self.importBytes, stream(pages))

    def test_unsupportedFlags(self) -> None:
        """
        XBZRLE and compressed records are refused by name, unknown record
        flags as a bad record (the wire decoder's errors).
        """
        for flags in (0x40, 0x100):
            pages = record(0, flags, b"pc.ram") + b"u" * PAGE
            self.assertRaises(UnsupportedFeatureError, self.importBytes, stream(pages))
        pages = record(0, 0x400 | 0x08, b"pc.ram") + b"u" * PAGE
        self.assertRaises(BadRAMRecordError, self.importBytes, stream(pages))

    def test_missingFile(self) -> None:
        """
        A stream file that does not exist is a L{SnapshotError}.
        """
        self.assertRaises(SnapshotError, importStreamFile, self.mktemp(), self.mktemp())

    def test_qemuRecording(self) -> None:
        """
        The real QEMU 7.2 recording imports: its blocks, and a device tail
        that starts with a FULL section and ends right before EOF.
        """
        snapshot = importStreamFile(DATA, self.mktemp())
        names = [block.idstr for block in snapshot.blocks]
        self.assertEqual(names[0], "pc.ram")
        self.assertIn("pc.bios", names)
        devices = snapshot.deviceState()
        with open(DATA, "rb") as f:
            data = f.read()
        end = findVMDescription(data)
        self.assertTrue(data[:end].endswith(devices))
        self.assertEqual(devices[0], 0x04)
        self.assertEqual(snapshot.machine, "pc-i440fx-7.2")


class HostileFileTests(SynchronousTestCase):
    """
    Malformed and hostile files get the wire decoder's typed errors (with
    the file offset), within a CPU bound: the old hand-written parser
    raised UnicodeDecodeError, MemoryError and OSError on such input and
    ran for seconds on one.
    """

    importBytes = ImportTests.importBytes

    def test_undecodableNames(self) -> None:
        """
        Block and machine names that are not UTF-8 do not raise
        UnicodeDecodeError: names round-trip as bytes.
        """
        data = stream(record(0, 0x08, b"pc.ram") + b"a" * PAGE).replace(b"pc.rom", b"pc.r\xffm")
        snapshot = self.importBytes(data)
        self.assertEqual(snapshot.read("pc.ram", 0, PAGE), b"a" * PAGE)

    def test_hugeBlock(self) -> None:
        """
        A block list claiming 2**62 bytes is refused at max-total-ram
        before any memory is made (it was an OSError from the memfd).
        """
        data = stream()
        total = struct.pack(">Q", 5 * PAGE | 0x04)
        data = data.replace(total, struct.pack(">Q", (1 << 62) + 5 * PAGE | 0x04), 1)
        data = data.replace(str8(b"pc.rom") + struct.pack(">Q", PAGE), str8(b"pc.rom") + struct.pack(">Q", (1 << 62) + PAGE))
        error = self.assertRaises(LimitExceededError, self.importBytes, data)
        self.assertEqual(error.limit, "max-total-ram")
        self.assertEqual(error.offset, data.index(struct.pack(">Q", (1 << 62) + 5 * PAGE | 0x04)))

    def test_misalignedBlock(self) -> None:
        """
        A block whose length is not whole pages is a bad record, not a
        RAMBlockError from the memfd.
        """
        data = stream().replace(str8(b"pc.rom") + struct.pack(">Q", PAGE), str8(b"pc.rom") + struct.pack(">Q", 100))
        data = data.replace(struct.pack(">Q", 5 * PAGE | 0x04), struct.pack(">Q", 4 * PAGE + 100 | 0x04))
        self.assertRaises(RemoteProtocolError, self.importBytes, data)

    def test_mutatedRecording(self) -> None:
        """
        Mutated copies of the real QEMU 7.2 recording import or fail with a
        RemoteProtocolError carrying an offset inside the file, each under
        a second of CPU.
        """
        with open(DATA, "rb") as f:
            data = f.read()
        for index in range(12):
            rng = random.Random(index)
            mutated = fuzz.mutate(data, rng, [data])
            started = time.process_time()
            try:
                self.importBytes(mutated)
            except RemoteProtocolError as error:
                self.assertIsNotNone(error.offset)
                self.assertTrue(0 <= error.offset <= len(mutated), error)
            self.assertLess(time.process_time() - started, 1.0)
