# -*- test-case-name: tests.test_bootsector -*-
"""
Tests for L{twisted_postcopy.testing.bootsector}: the encoding of the boot
sector, the counter-pattern checker, and (when QEMU is installed) that the
guest really boots and counts under QEMU 7.2.
"""

from __future__ import annotations

import os
import struct

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import GuestPatternError
from twisted_postcopy.testing.bootsector import (
    PAGE_SIZE,
    SECTOR_SIZE,
    CounterSnapshot,
    GuestLayout,
    buildBootSector,
    checkCounterPattern,
    counters,
    writeBootImage,
)
from twisted_postcopy.testing.qemu import QEMUInstance, machineArguments, requireQEMU

LAYOUT = GuestLayout(start=0x100000, end=0x100000 + 8 * PAGE_SIZE, offset=16)


def dumpWith(values: list[int], layout: GuestLayout = LAYOUT) -> bytes:
    """
    Build a memory dump from address 0 whose counters hold C{values}.

    @param values: one counter per page of C{layout}.
    @param layout: the guest layout.
    @return: the dump, covering C{[0, layout.end)}.
    """
    memory = bytearray(layout.end)
    for index, value in enumerate(values):
        memory[layout.start + index * PAGE_SIZE + layout.offset] = value
    return bytes(memory)


class BuildBootSectorTests(SynchronousTestCase):
    """
    Tests for L{buildBootSector}.
    """

    def test_sizeAndSignature(self) -> None:
        """
        The sector is 512 bytes and ends with the C{55 AA} boot signature.
        """
        sector = buildBootSector(LAYOUT)
        self.assertEqual(len(sector), SECTOR_SIZE)
        self.assertEqual(sector[-2:], b"\x55\xaa")

    def test_parametersPatched(self) -> None:
        """
        The range ends, the counter offset and the delay appear as
        little-endian immediates, so the same code serves any layout.
        """
        layout = GuestLayout(start=0x200000, end=0x345000, offset=0x123, delay=77)
        sector = buildBootSector(layout)
        self.assertEqual(sector.count(struct.pack("<I", 0x200000)), 2)
        self.assertEqual(sector.count(struct.pack("<I", 0x345000)), 2)
        self.assertEqual(sector.count(b"\x83" + struct.pack("<I", 0x123)), 2)
        self.assertIn(b"\xb9" + struct.pack("<I", 77), sector)

    def test_gdtFlat(self) -> None:
        """
        The GDT holds flat 4 GiB code and data descriptors, and the GDT
        pointer loaded by C{lgdt} points at it.
        """
        sector = buildBootSector(LAYOUT)
        code = struct.pack("<Q", 0x00CF9A000000FFFF)
        self.assertIn(code, sector)
        gdtAt = sector.index(code) - 8
        self.assertIn(struct.pack("<HI", 23, 0x7C00 + gdtAt), sector)

    def test_invalidLayout(self) -> None:
        """
        Unaligned ranges, ranges below 1 MiB and offsets outside a page
        are refused with L{ValueError}.
        """
        for layout in [
            GuestLayout(start=0x100001),
            GuestLayout(start=0x1000, end=0x2000),
            GuestLayout(offset=PAGE_SIZE),
            GuestLayout(start=0x200000, end=0x200000),
        ]:
            self.assertRaises(ValueError, buildBootSector, layout)

    def test_writeBootImage(self) -> None:
        """
        L{writeBootImage} writes the sector to a file and returns its path.
        """
        path = self.mktemp()
        self.assertEqual(writeBootImage(path, LAYOUT), path)
        with open(path, "rb") as image:
            self.assertEqual(image.read(), buildBootSector(LAYOUT))


class CounterPatternTests(SynchronousTestCase):
    """
    Tests for L{checkCounterPattern} and L{counters}.
    """

    def test_allEqual(self) -> None:
        """
        Counters all equal to C{v} are a snapshot between two passes.
        """
        self.assertEqual(
            checkCounterPattern(dumpWith([7] * 8), LAYOUT), CounterSnapshot(7, 0)
        )

    def test_boundary(self) -> None:
        """
        C{v + 1} up to a boundary then C{v} is a snapshot within a pass.
        """
        self.assertEqual(
            checkCounterPattern(dumpWith([8, 8, 8, 7, 7, 7, 7, 7]), LAYOUT),
            CounterSnapshot(7, 3),
        )

    def test_wraps(self) -> None:
        """
        Counters wrap at 256: C{0} before the boundary, C{255} after.
        """
        self.assertEqual(
            checkCounterPattern(dumpWith([0] * 5 + [255] * 3), LAYOUT),
            CounterSnapshot(255, 5),
        )

    def test_stalePage(self) -> None:
        """
        A page holding an older value (lost or stale) is named.
        """
        error = self.assertRaises(
            GuestPatternError,
            checkCounterPattern, dumpWith([8, 8, 7, 7, 6, 7, 7, 7]), LAYOUT,
        )
        self.assertIn("page 4 at 0x104000 holds 6", str(error))

    def test_secondBoundary(self) -> None:
        """
        C{v + 1} after a C{v} page (two boundaries) is refused.
        """
        self.assertRaises(
            GuestPatternError,
            checkCounterPattern, dumpWith([8, 7, 8, 7, 7, 7, 7, 7]), LAYOUT,
        )

    def test_base(self) -> None:
        """
        A dump that starts at C{base} is indexed from there.
        """
        memory = dumpWith([3] * 8)[LAYOUT.start :]
        self.assertEqual(counters(memory, LAYOUT, base=LAYOUT.start), b"\x03" * 8)

    def test_shortDump(self) -> None:
        """
        A dump that does not cover the range is refused.
        """
        self.assertRaises(
            GuestPatternError, counters, dumpWith([1] * 8)[:-1], LAYOUT
        )


class BootTests(SynchronousTestCase):
    """
    The guest boots under real QEMU 7.2 (TCG) and counts.
    """

    def setUp(self) -> None:
        """
        Give up without QEMU (L{requireQEMU}: a failure in strict mode).
        """
        requireQEMU()

    def test_bootsAndCounts(self) -> None:
        """
        The guest writes pass markers to the serial port, and a dump of the
        stopped guest is a consistent counter snapshot whose value matches
        the number of markers (mod 256; one more if the guest stopped
        between its last increment and the marker's C{out}).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        layout = GuestLayout(start=0x100000, end=0x100000 + 64 * PAGE_SIZE, delay=10_000)
        image = writeBootImage(directory + "/boot.img", layout)
        qemu = QEMUInstance.start(directory, machineArguments(image, 16), "guest")
        self.addCleanup(qemu.kill)
        qemu.waitSerial(300)
        qemu.qmp("stop")
        snapshot = checkCounterPattern(qemu.pmemsave(0, layout.end), layout)
        markers = qemu.serialOutput()
        self.assertEqual(set(markers), {ord("P")})
        self.assertIn(snapshot.value, {len(markers) % 256, (len(markers) + 1) % 256})
