# -*- test-case-name: tests.test_qemu_hugepages -*-
"""
A real QEMU 7.2 guest whose RAM is a hugetlbfs memory backend
(C{memory-backend-memfd,hugetlb=on,hugetlbsize=2M}, C{-machine
memory-backend=mem}, TCG): captured by our destination by postcopy, and
restored by postcopy into a fresh QEMU with the same backend (also with
C{memory-backend-file} on a hugetlbfs mount); and migrated
by postcopy (with and without C{postcopy-preempt}) into our destination,
whose guest process faults on its 2 MiB pages.

QEMU's source lists its C{mem} block with C{page_size} 2 MiB in RAM START
(postcopy-ram on, page size not the host's 4 KiB): our capture reads it off
the wire, captures into a hugetlbfs memfd and places each 2 MiB page whole
once its 512 target-page records arrived.  The restore sends the page size
back, so the QEMU destination accepts the list; it requests and receives
whole huge pages.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_destination_qemu import qemuStatus
from tests.test_hugepages import faultOnMissingPage, gateAtRun
from tests.snapshotqemu import (
    LAYOUT, MEMORY_MIB, TIMEOUT, bootImage, finish, requireQEMU, snapshotCommand, startCapture, summaries,
)
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.ram.block import HUGE_PAGE_SIZE
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.testing.bootsector import checkCounterPattern
from twisted_postcopy.testing.qemubaseline import MIB, stopAndCheck
from twisted_postcopy.testing.qemuguest import listenIncoming, startGuest
from twisted_postcopy.testing.real import missingReal, requireUserfaultfd, reserveHugePages
from twisted_postcopy.testing.waiting import waitUntil
from twisted_postcopy.testing.workerguest import WorkerGuestVM

#: QEMU options putting the guest's RAM on 2 MiB hugetlbfs pages.
HUGETLBFS_RAM = ("-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,hugetlb=on,hugetlbsize=2M",
                 "-machine", "memory-backend=mem")
#: Huge pages of one guest.
GUEST_PAGES = MEMORY_MIB * MIB // HUGE_PAGE_SIZE


class HugetlbfsCaptureRestoreTests(SynchronousTestCase):
    """
    Capture and restore of a QEMU guest on hugetlbfs (a
    C{memory-backend-memfd} with C{hugetlb=on}), both by postcopy.
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
        self.ram = self.memoryBackend()
        self.image = bootImage(self.directory)
        self.source = startGuest(self.directory, "source", self.image, MEMORY_MIB, *self.ram)
        self.addCleanup(self.source.kill)
        self.source.waitSerial(1, TIMEOUT)
        self.target = os.path.join(self.directory, "snapshot")

    def memoryBackend(self) -> tuple[str, ...]:
        """
        @return: the QEMU options of the guests' RAM.
        """
        return HUGETLBFS_RAM

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
                              *self.ram)
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


class HugetlbfsFileCaptureRestoreTests(HugetlbfsCaptureRestoreTests):
    """
    The same with the RAM in a file on a hugetlbfs mount
    (C{memory-backend-file,mem-path=MOUNT,share=on}); the test mounts one.
    """

    def memoryBackend(self) -> tuple[str, ...]:
        """
        Mount hugetlbfs (2 MiB pages) in a new directory, unmounted after
        the test (and after the QEMUs are gone).

        @return: the QEMU options of the guests' RAM.
        """
        mount = os.path.join(self.directory, "hugetlbfs")
        os.makedirs(mount)
        result = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mount],
                                capture_output=True, text=True)
        if result.returncode:
            missingReal(f"cannot mount hugetlbfs: {result.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", mount], check=True)
        return ("-object", f"memory-backend-file,id=mem,size={MEMORY_MIB}M,mem-path={mount},share=on",
                "-machine", "memory-backend=mem")


class QEMUHugetlbfsSourceTests(TestCase):
    """
    A QEMU 7.2 source whose RAM is on hugetlbfs, migrating by postcopy
    into our destination, whose guest (a worker process on the production
    fault service) faults on 2 MiB pages.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Huge pages for QEMU and our destination; the running source.
        """
        requireQEMU()
        requireUserfaultfd(hugetlb=True, hugePages=0)
        reserveHugePages(self, 2 * GUEST_PAGES)
        directory = self.mktemp()
        os.makedirs(directory)
        self.qemu = startGuest(directory, "source", bootImage(directory), MEMORY_MIB, *HUGETLBFS_RAM)
        self.addCleanup(self.qemu.kill)
        self.qemu.waitSerial(1, TIMEOUT)
        self.vm = WorkerGuestVM(reactor)
        self.addCleanup(self.vm.close)
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)

    @inlineCallbacks
    def test_postcopyIntoOurGuest(self) -> None:
        """
        QEMU's RAM START gives C{mem} 2 MiB pages, so our block is a
        hugetlbfs memfd; our guest touches a huge page that cannot have
        arrived (L{faultOnMissingPage}): QEMU gets a request for the whole
        2 MiB page, sends its 512 records, and we place it at once.  Both
        sides complete and our RAM equals the stopped source's.
        """
        gateAtRun(lambda: self.manager, self.vm)
        self.qemu.setCapabilities(**{"postcopy-ram": True})
        self.manager.setCapabilities({"postcopy-ram": True})
        self.qemu.setParameters(**{"max-bandwidth": 1000})
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{listening.getHost().port}")
        yield qemuStatus(self.qemu, {"active"})
        self.qemu.qmp("migrate-start-postcopy")
        try:
            transport, page = yield faultOnMissingPage(self.manager, self.vm)
        except TimeoutError:
            self.fail(f"no fault: QEMU {self.qemu.queryMigrate()}, ours {self.manager.queryMigrate()}, "
                      f"guest {self.vm.events} {self.vm.failure}\n{self.qemu.stderrTail()}")
        self.assertEqual((self.vm.blocks["mem"].pageSize, self.vm.blocks["mem"].backing),
                         (HUGE_PAGE_SIZE, "hugetlbfs"))
        yield waitUntil(reactor, lambda: self.qemu.queryMigrate()["ram"]["postcopy-requests"] > 0)
        transport.resumeProducing()
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 1 << 30, "max-bandwidth": 1 << 30})
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        digests = yield self.vm.done
        contents = self.vm.contents()
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in contents.values()])
        self.assertTrue(self.vm.blocks["mem"].receivedMap.test(page))
        memory = self.qemu.pmemsave(0, MEMORY_MIB * MIB)
        self.assertTrue(contents["mem"][MIB:] == memory[MIB:], "our RAM differs from QEMU's")

    @inlineCallbacks
    def test_postcopyPreemptIntoOurGuest(self) -> None:
        """
        With C{postcopy-preempt}, QEMU sends requested huge pages on the
        second connection while the main stream may be in the middle of
        another host page (QEMU rate-limits inside huge pages and, for an
        urgent page, interrupts the one it is sending): each channel's
        host page is assembled apart.  The faults are made by
        construction, not timing: at 1000 B/s neither precopy nor the
        background stream (a zero huge page is 512 records, some 6 KB)
        gets near the end of C{mem} during the test, where our guest reads
        first, three huge pages going down with gaps.  Each is requested
        and arrives whole on the preempt channel; then the throttle is
        lifted; both sides complete and our RAM equals QEMU's.
        """
        capabilities = {"postcopy-ram": True, "postcopy-preempt": True}
        self.vm.gate = None
        self.vm.touchFirst = [-1, -3, -5]
        self.qemu.setCapabilities(**capabilities)
        self.manager.setCapabilities(capabilities)
        self.qemu.setParameters(**{"max-bandwidth": 1000, "max-postcopy-bandwidth": 1000})
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{listening.getHost().port}")
        yield qemuStatus(self.qemu, {"active"})
        yield self.manager.destinationFactory.preempt.accepted
        yield self.vm.ready
        self.qemu.qmp("migrate-start-postcopy")
        touched = yield self.vm.touchedFirst
        preempt = self.manager.destinationFactory.preempt.preempt
        self.assertEqual(preempt.recordsReceived, 3 * HUGE_PAGE_SIZE // 4096, touched)
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 1 << 30})
        ours = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        yield preempt.ended
        digests = yield self.vm.done
        contents = self.vm.contents()
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest() for data in contents.values()])
        self.assertGreaterEqual(info["ram"]["postcopy-requests"], 3)
        memory = self.qemu.pmemsave(0, MEMORY_MIB * MIB)
        self.assertTrue(contents["mem"][MIB:] == memory[MIB:], "our RAM differs from QEMU's")
