# -*- test-case-name: tests.test_snapshot_workingset -*-
"""
Tests for L{twisted_postcopy.snapshot.workingset}: the file's round trip,
hostile files refused, and restores that record a working set and then
send it first, into the engine's own destination with a real guest worker
on the production fault service.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_snapshot_restore import storeContents
from twisted_postcopy.errors import SnapshotError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.snapshot.restore import WorkingSetPolicy, restoreSnapshot
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.snapshot.workingset import (
    MAGIC, MAX_PAGES, NAME, WorkingSetError, decode, encode, readWorkingSet, writeWorkingSet)
from twisted_postcopy.source.prefetch import WORKING_SET
from twisted_postcopy.source.sender import PageScheduler
from twisted_postcopy.testing.real import requireUserfaultfd
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.wire import ReturnPathDecoder, decodeAll
from twisted_postcopy.wire import events as e

PAGE = 4096
#: pc.ram's pages.
PAGES = 1024
MACHINE = "pc-i440fx-7.2"
CONFIG = struct.pack(">I", len(MACHINE)) + MACHINE.encode()
BLOB = b"device state"
DEVICE = (b"\x04" + struct.pack(">I", 3) + b"\x15twisted-postcopy/test" + struct.pack(">III", 0, 1, len(BLOB))
          + BLOB + b"\x7e" + struct.pack(">I", 3))
#: The pages the restored guest touches first, in this order.
FIRST = [700, 300, 900, 50]


def makeSnapshot(path: str) -> dict[str, bytes]:
    """
    Store a snapshot whose every page differs from the others.

    @param path: the directory.
    @return: idstr -> the block's content.
    """
    contents = {"pc.ram": b"".join(struct.pack(">Q", page) * (PAGE // 8) for page in range(PAGES)),
                "pc.rom": b"r" * PAGE}
    return storeContents(path, contents, CONFIG, DEVICE)


def checkSentFirst(case: Any, relayed: Any, path: str, recorded: list[tuple[int, int]]) -> tuple[list, set]:
    """
    Check the recorded stream of a restore that had a working set: its
    pages went out before any page that was neither in it nor requested
    (the guest runs meanwhile: its requests may come in between), in order
    (but for requested ones), and every page once; after the restore the
    stored set starts with the old one and adds requested pages only.

    @param case: the test case.
    @param relayed: the relay's L{RelayedConnection}.
    @param path: the snapshot.
    @param recorded: the working set the restore used.
    @return: (the pages sent, as (idstr, page), in order; the pages
        requested).
    """
    snapshot = openSnapshot(path)
    blocks = [block.idstr for block in snapshot.blocks]
    sizes = {block.idstr: block.pageSize for block in snapshot.blocks}
    pages = [(event.block, event.offset // sizes[event.block]) for event in decodeAll(bytes(relayed.forward))
             if isinstance(event, (e.PageReceived, e.ZeroPageReceived))]
    requested = {(event.block, event.start // sizes[event.block] + index)
                 for event in ReturnPathDecoder().decodeWhole(bytes(relayed.backward))
                 if isinstance(event, e.PagesRequested)
                 for index in range(event.length // sizes[event.block])}
    working = [(blocks[b], p) for b, p in recorded]
    members = set(working)
    last = max(pages.index(page) for page in working)
    case.assertEqual([page for page in pages[:last + 1] if page not in members | requested], [])
    case.assertEqual([page for page in pages if page in members and page not in requested],
                     [page for page in working if page not in requested])
    case.assertEqual(len(pages), len(set(pages)))
    after = readWorkingSet(snapshot)
    case.assertEqual(after[:len(recorded)], recorded)
    case.assertLessEqual({(blocks[b], p) for b, p in after[len(recorded):]}, requested)
    return pages, requested


class FileTests(SynchronousTestCase):
    """
    The file format and its storage beside the manifest.
    """

    def setUp(self) -> None:
        """
        A snapshot without a working set.
        """
        self.path = self.mktemp()
        makeSnapshot(self.path)
        self.snapshot = openSnapshot(self.path)

    def test_roundTrip(self) -> None:
        """
        What is written is read back in order, truncated to the limit;
        the file is 0600; the manifest's files still verify.
        """
        entries = [(0, 700), (1, 0), (0, 3)]
        self.assertIsNone(readWorkingSet(self.snapshot))
        self.assertTrue(writeWorkingSet(self.snapshot, entries))
        self.assertEqual(readWorkingSet(self.snapshot), entries)
        self.assertEqual(readWorkingSet(self.snapshot, 2), entries[:2])
        self.assertEqual(os.stat(os.path.join(self.path, NAME)).st_mode & 0o777, 0o600)
        self.assertFalse(os.path.exists(os.path.join(self.path, NAME + ".tmp")))
        self.snapshot.verify()

    def test_writtenOnce(self) -> None:
        """
        A second working set does not replace the first.
        """
        self.assertTrue(writeWorkingSet(self.snapshot, [(0, 1)]))
        self.assertFalse(writeWorkingSet(self.snapshot, [(0, 2)]))
        self.assertEqual(readWorkingSet(self.snapshot), [(0, 1)])

    def test_replace(self) -> None:
        """
        With C{replace} a working set replaces the stored one; a symbolic
        link in its place is replaced, its target left alone.
        """
        self.assertTrue(writeWorkingSet(self.snapshot, [(0, 1)]))
        self.assertTrue(writeWorkingSet(self.snapshot, [(0, 1), (0, 2)], replace=True))
        self.assertEqual(readWorkingSet(self.snapshot), [(0, 1), (0, 2)])
        other = self.mktemp()
        with open(other, "wb") as f:
            f.write(b"root only")
        os.unlink(os.path.join(self.path, NAME))
        os.symlink(os.path.abspath(other), os.path.join(self.path, NAME))
        self.assertTrue(writeWorkingSet(self.snapshot, [(0, 3)], replace=True))
        self.assertEqual(readWorkingSet(self.snapshot), [(0, 3)])
        self.assertEqual(open(other, "rb").read(), b"root only")
        self.assertEqual(os.stat(os.path.join(self.path, NAME)).st_mode & 0o777, 0o600)

    def test_interruptedWrite(self) -> None:
        """
        A temporary file left by an interrupted write is not overwritten:
        the error names it.
        """
        open(os.path.join(self.path, NAME + ".tmp"), "wb").close()
        error = self.assertRaises(SnapshotError, writeWorkingSet, self.snapshot, [(0, 1)])
        self.assertIn(NAME + ".tmp: exists already", str(error))

    def _refused(self, data: bytes, reason: str) -> None:
        """
        @param data: a file's bytes.
        @param reason: what the error must say.
        """
        with open(os.path.join(self.path, NAME), "wb") as f:
            f.write(data)
        error = self.assertRaises(WorkingSetError, readWorkingSet, self.snapshot)
        self.assertIn(os.path.join(self.path, NAME), str(error))
        self.assertIn(reason, str(error))

    def test_hostileFiles(self) -> None:
        """
        Wrong magic, short, truncated, padded, too many entries, a bad
        crc, pages or blocks the snapshot lacks, a non-zero reserved field
        and repeated pages are each refused, saying why.
        """
        good = encode([(0, 1), (0, 2)])
        body = good[16:]
        header = lambda count, payload: struct.pack(">8sII", MAGIC, count, zlib.crc32(payload))  # noqa: E731
        self._refused(b"NOTWSET!" + good[8:], "not a working-set file")
        self._refused(good[:10], "shorter than its 16-byte header")
        self._refused(good[:-1], "truncated or padded")
        self._refused(good + b"\0", "truncated or padded")
        self._refused(header(MAX_PAGES + 1, b""), f"at most {MAX_PAGES}")
        self._refused(good[:12] + b"\0\0\0\0" + body, "crc32 mismatch")
        for entry in [(0, 0, PAGES), (2, 0, 0), (1, 0, 1), (0, 1, 5)]:
            payload = struct.pack(">HHI", *entry)
            self._refused(header(1, payload) + payload, "is not a page of this snapshot")
        payload = struct.pack(">HHI", 0, 0, 5) * 2
        self._refused(header(2, payload) + payload, "entry 1 repeats block 0 page 5")

    def test_oversized(self) -> None:
        """
        A file larger than the largest possible working set is refused
        without being read whole.
        """
        with open(os.path.join(self.path, NAME), "wb") as f:
            f.truncate(16 + 8 * MAX_PAGES + 1)
        error = self.assertRaises(SnapshotError, readWorkingSet, self.snapshot)
        self.assertIn("larger than", str(error))

    def test_notThroughLinks(self) -> None:
        """
        A symbolic link or a directory in the file's place is refused; a
        write never goes through the link (the name is taken: nothing is
        stored).
        """
        other = self.mktemp()
        with open(other, "wb") as f:
            f.write(encode([(0, 1)]))
        os.symlink(os.path.abspath(other), os.path.join(self.path, NAME))
        error = self.assertRaises(SnapshotError, readWorkingSet, self.snapshot)
        self.assertIn("symbolic link", str(error))
        self.assertFalse(writeWorkingSet(self.snapshot, [(0, 2)]))
        self.assertEqual(open(other, "rb").read(), encode([(0, 1)]))
        os.unlink(os.path.join(self.path, NAME))
        os.mkdir(os.path.join(self.path, NAME))
        error = self.assertRaises(SnapshotError, readWorkingSet, self.snapshot)
        self.assertIn("not a regular file", str(error))

    def test_decodeChecksCounts(self) -> None:
        """
        L{decode} checks pages against the block sizes it is given.
        """
        self.assertEqual(decode(encode([(1, 3)]), [1, 4]), [(1, 3)])
        self.assertRaises(WorkingSetError, decode, encode([(1, 4)]), [1, 4])

    def test_encodeBounded(self) -> None:
        """
        No more than L{MAX_PAGES} entries are encoded.
        """
        self.assertRaises(ValueError, encode, [(0, 0)] * (MAX_PAGES + 1))


class PolicyTests(SynchronousTestCase):
    """
    L{WorkingSetPolicy} over a page scheduler, without a network.
    """

    def setUp(self) -> None:
        """
        A snapshot and a scheduler over its blocks.
        """
        self.path = self.mktemp()
        makeSnapshot(self.path)
        self.snapshot = openSnapshot(self.path)

    def scheduler(self) -> PageScheduler:
        """
        @return: a scheduler over the snapshot's blocks.
        """
        return PageScheduler.forBlocks([(b.idstr, b.length, b.pageSize) for b in self.snapshot.blocks])

    def test_recordThenGrow(self) -> None:
        """
        A completed clone without a working set stores its requests; the
        next one sends them first and appends the new pages it was asked
        for; a failed clone stores nothing; the limit caps the set.
        """
        policy = WorkingSetPolicy.load(self.snapshot, 3)
        scheduler, done = self.scheduler(), Deferred()
        policy.attach(scheduler, done)
        scheduler.queueRequest("pc.ram", 7 * PAGE, PAGE)
        scheduler.queueRequest("pc.rom", 0, PAGE)
        scheduler.queueRequest("pc.ram", 7 * PAGE, PAGE)
        done.callback("completed")
        self.assertEqual(readWorkingSet(self.snapshot), [(0, 7), (1, 0)])

        failed = WorkingSetPolicy.load(self.snapshot, 3)
        scheduler, done = self.scheduler(), Deferred()
        failed.attach(scheduler, done)
        scheduler.queueRequest("pc.ram", 9 * PAGE, PAGE)
        done.callback("failed")
        self.assertEqual(readWorkingSet(self.snapshot), [(0, 7), (1, 0)])

        policy = WorkingSetPolicy.load(self.snapshot, 3)
        scheduler, done = self.scheduler(), Deferred()
        policy.attach(scheduler, done)
        self.assertEqual(scheduler.nextBackgroundRun(8), ("pc.ram", 7 * PAGE, 1, PAGE))
        self.assertEqual(scheduler.nextBackgroundRun(8), ("pc.rom", 0, 1, PAGE))
        scheduler.queueRequest("pc.ram", 7 * PAGE, PAGE)
        scheduler.queueRequest("pc.ram", 2 * PAGE, 2 * PAGE)
        done.callback("completed")
        self.assertEqual(readWorkingSet(self.snapshot), [(0, 7), (1, 0), (0, 2)])

        full = WorkingSetPolicy.load(self.snapshot, 3)
        scheduler = self.scheduler()
        full.attach(scheduler, Deferred())
        self.assertIsNone(scheduler.log)

    def test_precopyOnlyPrefetches(self) -> None:
        """
        A precopy clone sends the working set first and records nothing.
        """
        writeWorkingSet(self.snapshot, [(0, 4)])
        scheduler = self.scheduler()
        WorkingSetPolicy.load(self.snapshot, 10).attach(scheduler, None)
        self.assertIsNone(scheduler.log)
        self.assertEqual(scheduler.nextBackgroundRun(8), ("pc.ram", 4 * PAGE, 1, PAGE))

    def test_off(self) -> None:
        """
        At 0 there is no policy, and the file is not even read.
        """
        with open(os.path.join(self.path, NAME), "wb") as f:
            f.write(b"garbage")
        self.assertIsNone(WorkingSetPolicy.load(self.snapshot, 0))


class RestoreTests(TestCase):
    """
    Restores into the engine's destination with a real guest worker: the
    first records, the next sends the working set first.
    """

    def setUp(self) -> None:
        """
        Skip without userfaultfd; a snapshot.
        """
        requireUserfaultfd()
        self.path = self.mktemp()
        self.contents = makeSnapshot(self.path)
        self.expected = [hashlib.sha256(data).hexdigest() for data in self.contents.values()]

    @inlineCallbacks
    def destination(self):
        """
        @return: (a Deferred firing with) a worker guest VM touching
            L{FIRST} first, and the port it listens on.
        """
        vm = WorkerGuestVM(reactor, touchFirst=FIRST)
        self.addCleanup(vm.close)
        manager = MigrationManager(reactor, vm, vm.faultServiceFactory)
        manager.setCapabilities({"postcopy-ram": True})
        port = yield manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        return vm, port.getHost().port

    @inlineCallbacks
    def test_recordThenPrefetch(self) -> None:
        """
        The first restore, throttled so that the guest's first touches are
        page requests, stores them in request order; the second restore of
        the snapshot sends those pages first, in that order (see
        L{checkSentFirst}), and every page once; both guests see the
        snapshot's RAM.
        """
        parameters = {WORKING_SET: 4096}
        vm, port = yield self.destination()
        managers, done = restoreSnapshot(reactor, self.path, [f"tcp:127.0.0.1:{port}"], True,
                                         bandwidth=PAGE * 10, parameters=parameters)
        yield vm.touchedFirst
        managers[0].setParameters({"max-postcopy-bandwidth": 0, "max-bandwidth": 0})
        self.assertEqual((yield done), ["completed"])
        self.assertEqual((yield vm.done), self.expected)
        snapshot = openSnapshot(self.path)
        recorded = readWorkingSet(snapshot)
        self.assertEqual(recorded[:len(FIRST)], [(0, page) for page in FIRST])
        requests = managers[0].queryMigrate()["ram"]["postcopy-requests"]
        self.assertGreaterEqual(requests, len(recorded))

        vm, port = yield self.destination()
        relay = RecordingRelay(("127.0.0.1", port))
        self.addCleanup(relay.close)
        managers, done = restoreSnapshot(reactor, self.path, [relay.uri], True, parameters=parameters)
        self.assertEqual((yield done), ["completed"])
        self.assertEqual((yield vm.done), self.expected)
        yield deferToThread(relay.waitClosed)
        pages, _ = checkSentFirst(self, relay.connections[0], self.path, recorded)
        # Page 0 is zero, a hole of the snapshot: it is sent only if a
        # request revived it (x-skip-known-zero, docs/prefetch.md).
        self.assertEqual(sorted(set(pages) - {("pc.ram", 0)}),
                         [("pc.ram", p) for p in range(1, PAGES)] + [("pc.rom", 0)])

    @inlineCallbacks
    def test_corruptRefused(self) -> None:
        """
        A restore that would use a corrupt working set is refused before it
        connects anywhere; with the policy off the file is not read.
        """
        with open(os.path.join(self.path, NAME), "wb") as f:
            f.write(b"garbage")
        error = self.assertRaises(WorkingSetError, restoreSnapshot, reactor, self.path,
                                  ["tcp:127.0.0.1:1"], True, parameters={WORKING_SET: 10})
        self.assertIn("shorter than its 16-byte header", str(error))
        vm, port = yield self.destination()
        _, done = restoreSnapshot(reactor, self.path, [f"tcp:127.0.0.1:{port}"], True,
                                  parameters={WORKING_SET: 0})
        self.assertEqual((yield done), ["completed"])
        self.assertEqual((yield vm.done), self.expected)


class RestoreParameterOptionTests(SynchronousTestCase):
    """
    C{postcopy snapshot restore --parameter NAME=VALUE}.
    """

    def test_parsed(self) -> None:
        """
        Integer values become parameters; anything else is refused naming
        the option.
        """
        from twisted_postcopy.control.snapshotcli import parseParameters

        self.assertEqual(parseParameters([f"{WORKING_SET}=4096", "x-readahead-pages=8"]),
                         {WORKING_SET: 4096, "x-readahead-pages": 8})
        for bad in ("x-working-set-pages", "x-working-set-pages=", "x-working-set-pages=-1", "=3"):
            error = self.assertRaises(SystemExit, parseParameters, [bad])
            self.assertIn("--parameter", str(error))


class StoreFailureTests(SynchronousTestCase):
    """
    A working set that cannot be stored does not fail the restore.
    """

    def test_logged(self) -> None:
        """
        With a left-over temporary file in the way, the completed clone's
        status passes through and the failure is logged.
        """
        path = self.mktemp()
        makeSnapshot(path)
        snapshot = openSnapshot(path)
        open(os.path.join(path, NAME + ".tmp"), "wb").close()
        policy = WorkingSetPolicy.load(snapshot, 10)
        scheduler = PageScheduler.forBlocks([(b.idstr, b.length, b.pageSize) for b in snapshot.blocks])
        done: Deferred = Deferred()
        policy.attach(scheduler, done)
        scheduler.queueRequest("pc.ram", 0, PAGE)
        done.callback("completed")
        self.assertEqual(self.successResultOf(done), "completed")
        self.assertIsNone(readWorkingSet(snapshot))
        self.assertFalse(policy.recorded)
