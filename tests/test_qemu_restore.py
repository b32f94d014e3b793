# -*- test-case-name: tests.test_qemu_restore -*-
"""
Restore snapshots into real QEMU 7.2 destinations (TCG, 32 MiB, the
boot-sector counting guest) with C{postcopy snapshot restore} (and, for
the recovery with C{postcopy-preempt}, with the restore driver in this
process, so that the relay can be cut mid-restore).

The snapshot is made once per test process: QEMU saves the running guest
with C{migrate exec:cat > FILE} and C{postcopy snapshot import} stores it.
Every restored guest must keep writing serial markers and, once stopped,
hold a consistent counter pattern (every page's counter is C{v} or C{v+1}
with one boundary), which a lost or misplaced page would break.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.snapshotqemu import (
    LAYOUT, MEMORY_MIB, TIMEOUT, bootImage, finish, requireQEMU, restoreTarget, snapshotCommand,
    summaries,
)
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.snapshot.restore import SnapshotVM, restoreOne, restoreSnapshot
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.wire import decodeAll
from twisted_postcopy.wire.events import PageReceived, RAMBlockInfo, ZeroPageReceived
from twisted_postcopy.wire.preempt import PreemptDecoder
from twisted_postcopy.testing.bootsector import PAGE_SIZE
from twisted_postcopy.testing.qemubaseline import recordPrecopy, stopAndCheck
from twisted_postcopy.testing.waiting import waitUntil

#: Bytes/s of the background stream until the guests faulted: below one
#: page per 100 ms window, so it sends exactly one page per window.
CRAWL = 1
#: Page requests awaited from each clone before the crawl is lifted.  A few
#: come from QEMU's own threads (no vCPU blocktime), and QEMU counts a
#: vCPU's blocktime in whole milliseconds, so a fault served within one
#: adds 0 or 1: dozens of vCPU faults make the blocktime surely positive.
REQUESTS = 64

_made: dict[str, str] = {}


def storedSnapshot() -> tuple[str, str]:
    """
    Record and import the guest once per process.

    @return: (the snapshot directory, the boot image).
    """
    if not _made:
        requireQEMU()
        directory = tempfile.mkdtemp(prefix="pc-restore-")
        atexit.register(shutil.rmtree, directory, True)
        stream = os.path.join(directory, "stream.mig")
        recordPrecopy(directory, stream, MEMORY_MIB, LAYOUT)
        code, _, err = finish(snapshotCommand("import", stream, os.path.join(directory, "snap")))
        if code:
            raise AssertionError(err.decode())
        _made.update(directory=directory, snapshot=os.path.join(directory, "snap"),
                     image=bootImage(directory))
    return _made["snapshot"], _made["image"]


class _RestoreHelpers:
    """
    The destinations and the checks of the restore tests.
    """

    def setUp(self) -> None:
        """
        Make (or reuse) the snapshot and a directory for the destinations.
        """
        self.snapshot, self.image = storedSnapshot()
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def target(self, name: str, postcopy: bool, memoryMiB: int = MEMORY_MIB, preempt: bool = False):
        """
        @param name: the instance name.
        @param postcopy: enable postcopy on it.
        @param memoryMiB: its RAM size.
        @param preempt: enable C{postcopy-preempt} on it.
        @return: (a fresh QEMU destination, its URI); killed at cleanup.
        """
        qemu, uri = restoreTarget(self.directory, name, self.image, postcopy, memoryMiB, preempt)
        self.addCleanup(qemu.kill)
        return qemu, uri

    def assertSnapshotMemory(self, qemu) -> None:
        """
        The clone's RAM equals the snapshot's byte for byte, except the
        guest's counter bytes (one per counted page, checked by
        L{stopAndCheck}'s pattern instead).

        @param qemu: a stopped destination.
        """
        size = MEMORY_MIB << 20
        expected = bytearray(openSnapshot(self.snapshot).read("pc.ram", 0, size))
        actual = bytearray(qemu.pmemsave(0, size))
        counters = slice(LAYOUT.start + LAYOUT.offset, LAYOUT.end, PAGE_SIZE)
        for memory in (expected, actual):
            memory[counters] = bytes(len(range(size)[counters]))
        if actual != expected:
            page = next(p for p in range(0, size, PAGE_SIZE)
                        if actual[p : p + PAGE_SIZE] != expected[p : p + PAGE_SIZE])
            self.fail(f"{qemu.name}: guest page {page:#x} differs from the snapshot")

    def assertRunsConsistently(self, qemu) -> None:
        """
        The restored guest completed, keeps running, and its memory holds
        a consistent counter pattern.

        @param qemu: the destination.
        """
        qemu.waitMigration(["completed"], TIMEOUT)
        seen = len(qemu.serialOutput())
        qemu.waitSerial(seen + 2, TIMEOUT)
        stopAndCheck(qemu, LAYOUT)
        self.assertSnapshotMemory(qemu)

    def assertBlocktime(self, info, summary) -> None:
        """
        QEMU's blocktime figures of a postcopy restore whose guest faulted:
        its one vCPU was blocked for a while, no longer than the migration
        lasted, and (one vCPU) the all-vCPUs figure is at most the vCPU's.
        (Usually equal; but QEMU 7.2 counts the all-vCPUs time only while
        its count of blocked vCPUs equals the number of vCPUs, and a fault
        racing with the placement of its own page decrements that count
        twice, in C{mark_postcopy_blocktime_begin} and C{_end}: after that
        some of the vCPU's blocked time is missing from the total, as in
        one run here, 75 ms against 84 ms.)

        @param info: the destination's C{query-migrate}.
        @param summary: the restore's line for that destination.
        """
        (vcpu,) = info["postcopy-vcpu-blocktime"]
        self.assertLessEqual(info["postcopy-blocktime"], vcpu, info)
        self.assertGreater(vcpu, 0, info)
        self.assertLessEqual(vcpu, summary["total-time"], (info, summary))



class RestoreTests(_RestoreHelpers, SynchronousTestCase):
    """
    Our source feeding a stored snapshot to QEMU destinations, through the
    C{postcopy snapshot restore} command.
    """

    def test_precopy(self) -> None:
        """
        A plain precopy restore (all pages, devices, EOF, vmdesc) gives a
        running, consistent guest.
        """
        qemu, uri = self.target("pre", False)
        code, out, err = finish(snapshotCommand("restore", self.snapshot, "--to", uri))
        self.assertEqual(code, 0, err.decode())
        self.assertEqual([s["status"] for s in summaries(out)], ["completed"])
        self.assertRunsConsistently(qemu)

    def test_sourceKilled(self) -> None:
        """
        When our source dies mid-postcopy, QEMU leaves postcopy-active for
        a paused or failed state and never reports completion.
        """
        qemu, uri = self.target("killed", True)
        restore = snapshotCommand("restore", self.snapshot, "--to", uri, "--postcopy",
                                  "--max-bandwidth", str(1 << 20))
        self.addCleanup(finish, restore, 5)
        qemu.waitMigration(["postcopy-active"], TIMEOUT)
        restore.kill()
        info = qemu.waitMigration(["postcopy-paused", "failed"], TIMEOUT)
        self.assertIn(info["status"], ("postcopy-paused", "failed"))
        self.assertEqual(finish(restore, TIMEOUT)[0], -9)
        self.assertNotEqual(qemu.queryMigrate()["status"], "completed")

    def test_tamperedRefused(self) -> None:
        """
        A tampered snapshot is refused before any connection, naming the
        file.
        """
        copy = os.path.join(self.directory, "copy")
        shutil.copytree(self.snapshot, copy)
        with open(os.path.join(copy, "devices.bin"), "r+b") as f:
            f.write(b"\xff")
        qemu, uri = self.target("tampered", True)
        code, _, err = finish(snapshotCommand("restore", copy, "--to", uri, "--postcopy"))
        self.assertEqual(code, 1)
        self.assertIn(b"devices.bin", err)
        self.assertIsNone(qemu.queryMigrate().get("status"))

    def test_sizeMismatch(self) -> None:
        """
        A destination with another RAM size refuses the block list; the
        restore exits 1 reporting C{failed}, and QEMU never runs the guest.
        """
        qemu, uri = self.target("bigger", True, 2 * MEMORY_MIB)
        code, out, err = finish(snapshotCommand("restore", self.snapshot, "--to", uri, "--postcopy"))
        self.assertEqual(code, 1)
        self.assertEqual([s["status"] for s in summaries(out)], ["failed"])
        self.assertIn(uri.encode(), err)
        qemu.process.wait(TIMEOUT)
        self.assertIn("Size mismatch", qemu.stderrTail())


class PostcopyRestoreTests(_RestoreHelpers, TestCase):
    """
    Postcopy restores whose guests fault by construction: our source's
    background stream crawls at one page per 100 ms window
    (C{max-postcopy-bandwidth} of 1 byte/s) from page 0, so the counted
    pages, 1 MiB up (page 256), are over 25 s out of its reach (a request
    moves the scan, as in QEMU, so it can only follow a fault).  The
    limit is lifted once every clone asked for pages.  (Throttling to a
    few MiB/s only made a fault likely: a vCPU left unscheduled for a
    second on a loaded machine saw its pages arrive first.)
    """

    timeout = 180

    @inlineCallbacks
    def restoreFaulting(self, count: int, preempt: bool = False) -> Any:
        """
        Restore the snapshot by postcopy into C{count} fresh QEMUs, one
        connection each, and lift the crawl once every clone asked for
        L{REQUESTS} pages.

        @param count: how many clones.
        @param preempt: with C{postcopy-preempt} on both sides, each clone
            behind a recording relay (kept in C{self.relays}).
        @return: a Deferred firing with [(QEMU, its final
            C{query-migrate} on our side)].
        """
        targets = [self.target(f"clone{index}", True, preempt=preempt) for index in range(count)]
        uris = [uri for _, uri in targets]
        self.relays = [self.relayed(uri) for uri in uris] if preempt else []
        managers, done = restoreSnapshot(reactor, self.snapshot, [r.uri for r in self.relays] or uris,
                                         postcopy=True, bandwidth=CRAWL, preempt=preempt)
        for manager in managers:
            yield waitUntil(reactor, lambda: manager.queryMigrate().get("ram", {}).get(
                "postcopy-requests", 0) >= REQUESTS, TIMEOUT)
        for manager in managers:
            manager.setParameters({"max-bandwidth": 0, "max-postcopy-bandwidth": 0})
        statuses = yield done
        self.assertEqual(statuses, ["completed"] * count)
        for relay in self.relays:
            yield waitUntil(reactor, lambda: all(c.closed.is_set() for c in relay.connections), TIMEOUT)
        return [(qemu, manager.queryMigrate()) for (qemu, _), manager in zip(targets, managers)]

    @inlineCallbacks
    def test_postcopy(self) -> Any:
        """
        A postcopy restore runs the guest before its RAM arrived: QEMU
        asked for pages that the background stream could not have sent
        yet (our source counted them), was blocked for them, and the guest
        is consistent after completion.
        """
        ((qemu, summary),) = yield self.restoreFaulting(1)
        self.assertGreater(summary["ram"]["postcopy-requests"], 0, summary)
        self.assertEqual(qemu.qmp("query-status")["status"], "running")
        self.assertBlocktime(qemu.waitMigration(["completed"], TIMEOUT), summary)
        self.assertRunsConsistently(qemu)

    @inlineCallbacks
    def test_threeClones(self) -> Any:
        """
        One snapshot restored into three QEMUs at once, one connection
        each: every clone runs and faults before its RAM arrived (its own
        C{postcopy-requests}, its vCPU blocked), all complete, and each
        runs on with its memory equal to the snapshot's.
        """
        clones = yield self.restoreFaulting(3)
        for qemu, summary in clones:
            self.assertGreater(summary["ram"]["postcopy-requests"], 0, summary)
            self.assertBlocktime(qemu.waitMigration(["completed"], TIMEOUT), summary)
            self.assertRunsConsistently(qemu)

    def relayed(self, uri: str) -> RecordingRelay:
        """
        @param uri: a destination's C{tcp:} URI.
        @return: a recording relay in front of it, closed at cleanup.
        """
        host, port = uri.split(":")[1:]
        relay = RecordingRelay((host, int(port)))
        self.addCleanup(relay.close)
        return relay

    def assertPreemptChannel(self, relay: RecordingRelay) -> None:
        """
        The restore's second connection was QEMU's preempt channel: raw RAM
        records of requested pages (at least one, each once, none of them
        on the main channel too), each naming its block, and one EOS.

        @param relay: the relay in front of the destination.
        """
        relay.waitClosed(TIMEOUT)
        self.assertEqual(len(relay.connections), 2)
        main, preempt = (bytes(connection.forward) for connection in relay.connections)
        decoder = PreemptDecoder([RAMBlockInfo(block.idstr, block.length)
                                  for block in openSnapshot(self.snapshot).blocks])
        decoder.receiveData(preempt)
        records = [(ev.block, ev.offset) for ev in decoder.events()
                   if isinstance(ev, (PageReceived, ZeroPageReceived))]
        self.assertTrue(decoder.complete)
        self.assertGreater(len(records), 0)
        self.assertEqual(len(records), len(set(records)))
        sent = {(ev.block, ev.offset) for ev in decodeAll(main)
                if isinstance(ev, (PageReceived, ZeroPageReceived))}
        self.assertEqual(set(records) & sent, set())

    @inlineCallbacks
    def test_postcopyPreempt(self) -> Any:
        """
        A postcopy restore with C{postcopy-preempt} into a QEMU 7.2
        destination that has it too: our source opens the second
        connection, QEMU takes it as its preempt channel, the pages its
        guest asks for arrive there (the background stream crawls; the
        requested pages do not wait for it), it ends with EOS, and the guest
        runs on with its memory equal to the snapshot's.
        """
        ((qemu, summary),) = yield self.restoreFaulting(1, preempt=True)
        self.assertGreater(summary["ram"]["postcopy-requests"], 0, summary)
        self.assertBlocktime(qemu.waitMigration(["completed"], TIMEOUT), summary)
        self.assertRunsConsistently(qemu)
        self.assertPreemptChannel(self.relays[0])

    @inlineCallbacks
    def test_twoClonesPreempt(self) -> Any:
        """
        One snapshot restored into two QEMUs at once with
        C{postcopy-preempt}: each clone has its own main and preempt
        connections, asks for pages that arrive on its preempt channel,
        completes, and runs on with memory equal to the snapshot's.
        """
        clones = yield self.restoreFaulting(2, preempt=True)
        for (qemu, summary), relay in zip(clones, self.relays):
            self.assertGreater(summary["ram"]["postcopy-requests"], 0, summary)
            self.assertRunsConsistently(qemu)
            self.assertPreemptChannel(relay)


class PreemptRecoveryRestoreTests(TestCase):
    """
    A postcopy restore with C{postcopy-preempt} into a real QEMU 7.2 whose
    guest runs and faults, through a relay that is cut: both pause; our
    source's automatic recovery (C{x-postcopy-auto-recover}, on for
    restores) connects a new main and a new preempt connection to QEMU's
    original listener (which QEMU 7.2 takes while paused), the handshake
    runs, the pages the guest waits for arrive on the new preempt channel,
    and the clone completes with memory equal to the snapshot.
    """

    timeout = 180

    @inlineCallbacks
    def test_cutAndAutoRecover(self) -> None:
        """
        See the class docstring.
        """
        snapshot, image = storedSnapshot()
        directory = self.mktemp()
        os.makedirs(directory)
        qemu, uri = restoreTarget(directory, "recovered", image, True, preempt=True)
        self.addCleanup(qemu.kill)
        host, port = uri.split(":")[1:]
        relay = RecordingRelay((host, int(port)))
        self.addCleanup(relay.close)
        vm = SnapshotVM(openSnapshot(snapshot))
        manager, done = restoreOne(reactor, vm, relay.uri, True, 1 << 20, preempt=True)
        # PONG 3: QEMU ran POSTCOPY_RUN (a cut while its device loading
        # still waits for a page fails it instead of pausing it).
        yield waitUntil(reactor, lambda: manager.queryMigrate().get("ram", {}).get("postcopy-requests", 0) > 0
                        and len(relay.connections[1].forward) > 0 and manager.outgoing.destinationRunning)
        events: list[str] = []
        manager.subscribe(lambda event: events.append(event["data"]["status"]))
        relay.cut()
        # Background pages stay throttled until the recovered preempt
        # channel carried a page the guest asked for again.
        yield waitUntil(reactor, lambda: len(relay.connections) >= 4 and len(relay.connections[-1].forward) > 8)
        manager.setParameters({"max-postcopy-bandwidth": 0})
        try:
            yield waitUntil(reactor, lambda: done.called, 60)
        except TimeoutError:
            self.fail(f"no end 60 s after the recovery: ours {manager.queryMigrate()}, "
                      f"preempt {manager.outgoing.preemptPhase}, events {events}, "
                      f"QEMU {qemu.qmp('query-migrate')}, relay {[len(c.forward) for c in relay.connections]}")
        status = yield done
        self.assertEqual(status, "completed", manager.queryMigrate().get("error-desc"))
        self.assertEqual([s for s in events if s != "postcopy-paused"][-3:],
                         ["postcopy-recover", "postcopy-active", "completed"])
        self.assertIn("postcopy-paused", events)
        self.assertGreaterEqual(len(relay.connections), 4)
        main, preempt = (bytes(connection.forward) for connection in relay.connections[-2:])
        self.assertEqual(main[:1], b"\x08")
        decoder = PreemptDecoder([RAMBlockInfo(block.idstr, block.length)
                                  for block in openSnapshot(snapshot).blocks])
        decoder.receiveData(preempt)
        self.assertGreater(len([ev for ev in decoder.events() if isinstance(ev, PageReceived)]), 0)
        self.assertTrue(decoder.complete)
        info = qemu.waitMigration(["completed"], TIMEOUT)
        self.assertEqual(info["status"], "completed")
        checker = RestoreTests("test_precopy")
        checker.snapshot, checker.image = snapshot, image
        checker.assertRunsConsistently(qemu)
