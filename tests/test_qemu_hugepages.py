# -*- test-case-name: tests.test_qemu_hugepages -*-
"""
A real QEMU 7.2 guest whose RAM is a hugetlbfs memory backend
(C{memory-backend-memfd,hugetlb=on,hugetlbsize=2M}, C{-machine
memory-backend=mem}, TCG): captured by our destination by postcopy, and
restored by postcopy into a fresh QEMU with the same backend.

QEMU's source lists its C{mem} block with C{page_size} 2 MiB in RAM START
(postcopy-ram on, page size not the host's 4 KiB): our capture reads it off
the wire, captures into a hugetlbfs memfd and places each 2 MiB page whole
once its 512 target-page records arrived.  The restore sends the page size
back, so the QEMU destination accepts the list; it requests and receives
whole huge pages.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.snapshotqemu import (
    LAYOUT, MEMORY_MIB, TIMEOUT, bootImage, finish, requireQEMU, snapshotCommand, startCapture, summaries,
)
from twisted_postcopy.ram.block import HUGE_PAGE_SIZE
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.testing.bootsector import checkCounterPattern
from twisted_postcopy.testing.qemubaseline import MIB, stopAndCheck
from twisted_postcopy.testing.qemuguest import listenIncoming, startGuest
from twisted_postcopy.testing.real import requireUserfaultfd, reserveHugePages

#: QEMU options putting the guest's RAM on 2 MiB hugetlbfs pages.
HUGETLBFS_RAM = ("-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,hugetlb=on,hugetlbsize=2M",
                 "-machine", "memory-backend=mem")
#: Huge pages of one guest.
GUEST_PAGES = MEMORY_MIB * MIB // HUGE_PAGE_SIZE


class HugetlbfsCaptureRestoreTests(SynchronousTestCase):
    """
    Capture and restore of a QEMU guest on hugetlbfs, both by postcopy.
    """

    def setUp(self) -> None:
        """
        Huge pages for the source, the capture and the restored QEMU; the
        boot image; the running source guest.
        """
        requireQEMU()
        requireUserfaultfd(hugetlb=True, hugePages=0)
        reserveHugePages(self, 3 * GUEST_PAGES)
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.image = bootImage(self.directory)
        self.source = startGuest(self.directory, "source", self.image, MEMORY_MIB, *HUGETLBFS_RAM)
        self.addCleanup(self.source.kill)
        self.source.waitSerial(1, TIMEOUT)
        self.target = os.path.join(self.directory, "snapshot")

    def test_postcopyCaptureAndRestore(self) -> None:
        """
        The capture completes through postcopy and stores the C{mem} block
        with its 2 MiB page size, equal to a C{pmemsave} of the paused
        source; restored by postcopy into a paused QEMU with the same
        backend, the memory equals the source's again, and the guest then
        runs on consistently.
        """
        process, uri = startCapture(self.directory, self.target, True)
        self.addCleanup(finish, process, 5)
        self.source.setCapabilities(**{"postcopy-ram": True, "return-path": True})
        self.source.setParameters(**{"max-bandwidth": 64 << 10})
        self.source.migrate(uri)
        self.source.waitMigration(["active"], TIMEOUT)
        self.source.qmp("migrate-start-postcopy")
        info = self.source.waitMigration(["completed"], TIMEOUT)
        code, _, err = finish(process)
        self.assertEqual(code, 0, err.decode())
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)

        snapshot = openSnapshot(self.target)
        snapshot.verify()
        self.assertEqual(snapshot.form, "package")
        sizes = {block.idstr: block.pageSize for block in snapshot.blocks}
        self.assertEqual(sizes["mem"], HUGE_PAGE_SIZE)
        memory = self.source.pmemsave(0, MEMORY_MIB * MIB)
        stored = snapshot.read("mem", 0, MEMORY_MIB * MIB)
        self.assertTrue(stored[MIB:] == memory[MIB:], "captured RAM differs from the source")
        checkCounterPattern(stored, LAYOUT)

        restored = startGuest(self.directory, "restored", self.image, MEMORY_MIB, "-S", "-incoming", "defer",
                              *HUGETLBFS_RAM)
        self.addCleanup(restored.kill)
        restored.setCapabilities(**{"postcopy-ram": True})
        host, port = listenIncoming(restored)
        code, out, err = finish(snapshotCommand("restore", self.target, "--to", f"tcp:{host}:{port}",
                                                "--postcopy"))
        self.assertEqual(code, 0, err.decode())
        (summary,) = summaries(out)
        self.assertEqual(summary["status"], "completed")
        self.assertEqual(summary["ram"]["page-size"], HUGE_PAGE_SIZE)
        self.assertGreater(summary["ram"]["postcopy-bytes"], 0)
        restored.waitMigration(["completed"], TIMEOUT)
        again = restored.pmemsave(0, MEMORY_MIB * MIB)
        self.assertTrue(again[MIB:] == memory[MIB:], "restored RAM differs from the source")
        serial = len(restored.serialOutput())
        restored.qmp("cont")
        restored.waitSerial(serial + 2, TIMEOUT)
        stopAndCheck(restored, LAYOUT)
