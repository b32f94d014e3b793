# -*- test-case-name: tests.test_qemu_workingset -*-
"""
Working-set prefetch (docs/prefetch.md) into real QEMU 7.2 destinations:
a postcopy restore of the boot-sector counting guest records the pages
QEMU asked for, and the next restore of that snapshot sends them first
(seen on the wire through a recording relay); both restored guests run
on consistently with the snapshot's memory.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from tests.snapshotqemu import finish, snapshotCommand, summaries
from tests import test_qemu_restore
from tests.test_snapshot_workingset import checkSentFirst
from twisted_postcopy.snapshot.store import openSnapshot
from twisted_postcopy.snapshot.workingset import NAME, readWorkingSet
from twisted_postcopy.source.prefetch import WORKING_SET
from twisted_postcopy.testing.relay import RecordingRelay


class WorkingSetRestoreTests(SynchronousTestCase):
    """
    Record, then prefetch, into QEMU.
    """

    target = test_qemu_restore.RestoreTests.target
    assertSnapshotMemory = test_qemu_restore.RestoreTests.assertSnapshotMemory
    assertRunsConsistently = test_qemu_restore.RestoreTests.assertRunsConsistently

    def setUp(self) -> None:
        """
        A private copy of the stored snapshot (this test writes its
        working set) and a directory for the destinations.
        """
        stored, self.image = test_qemu_restore.storedSnapshot()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.snapshot = os.path.join(self.directory, "snap")
        shutil.copytree(stored, self.snapshot)
        self.assertFalse(os.path.exists(os.path.join(self.snapshot, NAME)))

    def restore(self, uri: str) -> dict:
        """
        A postcopy restore with the working-set policy on, background pages
        throttled to 4 MiB/s so that the guest faults (as in
        C{test_qemu_restore}'s C{test_postcopy}).

        @param uri: the destination.
        @return: its summary line.
        """
        code, out, err = finish(snapshotCommand(
            "restore", self.snapshot, "--to", uri, "--postcopy", "--max-bandwidth", str(4 << 20),
            "--parameter", f"{WORKING_SET}=4096"))
        self.assertEqual(code, 0, err.decode())
        (summary,) = summaries(out)
        self.assertEqual(summary["status"], "completed", summary)
        return summary

    def test_recordThenPrefetch(self) -> None:
        """
        The first restore stores the pages QEMU requested (as many as it
        asked for at most); the second sends those in order before any
        other page QEMU did not ask for (its guest runs meanwhile, so its
        own requests may come in between), every page once, and appends
        only pages QEMU asked it for to the stored set.
        """
        qemu, uri = self.target("record", True)
        summary = self.restore(uri)
        self.assertGreater(summary["ram"]["postcopy-requests"], 0, summary)
        self.assertRunsConsistently(qemu)
        recorded = readWorkingSet(openSnapshot(self.snapshot))
        self.assertTrue(recorded)
        self.assertLessEqual(len(recorded), summary["ram"]["postcopy-requests"])

        qemu, uri = self.target("prefetch", True)
        host, port = uri.rsplit(":", 2)[1:]
        relay = RecordingRelay((host, int(port)))
        self.addCleanup(relay.close)
        self.restore(relay.uri)
        self.assertRunsConsistently(qemu)
        relay.waitClosed()
        checkSentFirst(self, relay.connections[0], self.snapshot, recorded)
