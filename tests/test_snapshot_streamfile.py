# -*- test-case-name: tests.test_snapshot_streamfile -*-
"""
Tests for L{twisted_postcopy.snapshot.streamfile}: importing recorded QEMU
precopy streams (hand-built ones, and a real QEMU 7.2 recording in
C{tests/data}) into snapshots.
"""

from __future__ import annotations

import json
import os
import struct

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import (
    BadRAMRecordError,
    RemoteProtocolError,
    SnapshotError,
    UnsupportedFeatureError,
)
from twisted_postcopy.snapshot.streamfile import findVMDescription, importStreamFile

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
