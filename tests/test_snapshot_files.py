# -*- test-case-name: tests.test_snapshot_files -*-
"""
Tests for how L{twisted_postcopy.snapshot.store} and
L{twisted_postcopy.snapshot.jobs} treat the file system: fresh 0700
directories, exclusive no-follow creation, fsync before the manifest is
published, no-follow reads, plain manifest names, and the daemon's
C{--snapshot-root}.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.errors import SnapshotError
from twisted_postcopy.snapshot import store
from twisted_postcopy.snapshot.jobs import SnapshotJobs
from twisted_postcopy.snapshot.store import MANIFEST, checkName, openSnapshot, prepareDirectory, writeSnapshot

PAGE = 4096
CONFIG = b"\x00\x00\x00\x0dpc-i440fx-7.2"
DEVICE = b"device-bytes"
VICTIM = b"root-only bytes that must not change\n"


class SnapshotFilesTests(SynchronousTestCase):
    """
    Writing and reading snapshots next to hostile directory contents.
    """

    def setUp(self) -> None:
        """
        A work directory, a root-only victim file outside any snapshot, and
        a one-block memfd with a known page.
        """
        self.base = os.path.abspath(self.mktemp())
        os.mkdir(self.base)
        self.victim = os.path.join(self.base, "victim")
        with open(self.victim, "wb") as f:
            f.write(VICTIM)
        os.chmod(self.victim, 0o600)
        self.fd = os.memfd_create("block")
        self.addCleanup(os.close, self.fd)
        os.ftruncate(self.fd, 4 * PAGE)
        os.pwrite(self.fd, b"P" * PAGE, PAGE)

    def write(self, path: str, root: str | None = None) -> store.Snapshot:
        """
        @param path: the snapshot directory.
        @param root: the snapshot root.
        @return: the stored snapshot.
        """
        return writeSnapshot(path, "pc-i440fx-7.2", CONFIG, "precopy", DEVICE,
                             [("pc.ram", 4 * PAGE, PAGE, self.fd)], 1.0, root)

    def assertVictimIntact(self) -> None:
        """
        The victim file holds its bytes.
        """
        with open(self.victim, "rb") as f:
            self.assertEqual(f.read(), VICTIM)

    def test_freshDirectoryModes(self) -> None:
        """
        A new snapshot directory and its C{ram} directory are 0700, every
        file 0600, whatever the umask.
        """
        previous = os.umask(0)
        try:
            snapshot = self.write(os.path.join(self.base, "snap"))
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(os.stat(snapshot.path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(snapshot.path, "ram")).st_mode), 0o700)
        for name in (MANIFEST, "configuration.bin", "devices.bin", "ram/0000.ram"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(snapshot.path, name)).st_mode), 0o600, name)
        self.assertEqual(snapshot.read("pc.ram", PAGE, PAGE), b"P" * PAGE)

    def test_existingEmptyDirectory(self) -> None:
        """
        An existing empty directory of the daemon's user is used (and made
        0700).
        """
        path = os.path.join(self.base, "empty")
        os.mkdir(path, 0o755)
        self.write(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def test_symlinksInDirectoryRefused(self) -> None:
        """
        A directory holding symbolic links (to a root-only file, as the
        finding had it) is refused before anything is written: the target
        is unchanged.
        """
        path = os.path.join(self.base, "trap")
        os.mkdir(path)
        for name in ("configuration.bin", "devices.bin", "manifest.json.tmp"):
            os.symlink(self.victim, os.path.join(path, name))
        error = self.assertRaises(SnapshotError, self.write, path)
        self.assertIn("not empty", str(error))
        self.assertVictimIntact()
        trap = os.path.join(self.base, "trap2")
        os.mkdir(trap)
        os.symlink(self.base, os.path.join(trap, "ram"))
        self.assertRaises(SnapshotError, self.write, trap)
        self.assertEqual(sorted(os.listdir(self.base)), ["trap", "trap2", "victim"])
        self.assertVictimIntact()

    def test_directoryIsSymlinkRefused(self) -> None:
        """
        A snapshot path that is a symbolic link (to an empty directory) is
        refused, and nothing is created through it.
        """
        target = os.path.join(self.base, "elsewhere")
        os.mkdir(target)
        link = os.path.join(self.base, "link")
        os.symlink(target, link)
        error = self.assertRaises(SnapshotError, self.write, link)
        self.assertIn("symbolic link", str(error))
        self.assertEqual(os.listdir(target), [])

    def test_existingSnapshotRefused(self) -> None:
        """
        A directory holding a snapshot already is not written again.
        """
        path = os.path.join(self.base, "snap")
        self.write(path)
        self.assertRaises(SnapshotError, self.write, path)
        self.assertRaises(SnapshotError, prepareDirectory, path)

    def test_otherUsersDirectoryRefused(self) -> None:
        """
        An existing empty directory of another user is refused (it could
        add files while the capture runs).
        """
        if os.geteuid() != 0:
            from twisted_postcopy.testing.real import missingReal

            missingReal("changing a directory's owner needs root")
        path = os.path.join(self.base, "theirs")
        os.mkdir(path)
        os.chown(path, 65534, 65534)
        error = self.assertRaises(SnapshotError, self.write, path)
        self.assertIn("belongs to uid 65534", str(error))

    def test_fsyncBeforeManifest(self) -> None:
        """
        Every data file, the C{ram} directory and the snapshot directory are
        fsynced before the manifest is renamed into place.
        """
        synced: list[str] = []
        renamed: list[list[str]] = []
        realFsync, realRename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            """
            Record the synced file's path.

            @param fd: the descriptor.
            """
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFsync(fd)

        def rename(*args: object, **kwargs: object) -> None:
            """
            Record what was synced when the manifest was renamed.

            @param args: rename's arguments.
            @param kwargs: its keyword arguments.
            """
            renamed.append(list(synced))
            realRename(*args, **kwargs)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        path = os.path.join(self.base, "snap")
        self.write(path)
        (before,) = renamed
        for name in ("configuration.bin", "devices.bin", "ram/0000.ram", "ram", "", MANIFEST + ".tmp"):
            self.assertIn(os.path.join(path, name).rstrip("/"), before, name)

    def test_readThroughSymlinkRefused(self) -> None:
        """
        A block file swapped for a link to a root-only file, or the C{ram}
        directory swapped for a link, is refused on read: the victim's
        bytes never come back.
        """
        path = os.path.join(self.base, "snap")
        self.write(path)
        block = os.path.join(path, "ram", "0000.ram")
        os.unlink(block)
        os.symlink(self.victim, block)
        error = self.assertRaises(SnapshotError, openSnapshot, path)
        self.assertIn("symbolic link", str(error))
        other = os.path.join(self.base, "other")
        os.mkdir(other)
        os.rename(os.path.join(path, "ram"), os.path.join(other, "ram"))
        os.symlink(os.path.join(other, "ram"), os.path.join(path, "ram"))
        self.assertRaises(SnapshotError, openSnapshot, path)

    def test_fifoRefused(self) -> None:
        """
        A FIFO in place of a file is refused at once (no blocking open).
        """
        path = os.path.join(self.base, "snap")
        self.write(path)
        os.unlink(os.path.join(path, "devices.bin"))
        os.mkfifo(os.path.join(path, "devices.bin"))
        error = self.assertRaises(SnapshotError, openSnapshot, path)
        self.assertIn("not a regular file", str(error))

    def test_manifestKeysInside(self) -> None:
        """
        A manifest listing a file by a name that is not a plain relative
        name inside the snapshot (C{../}, absolute, hidden, empty parts) is
        refused, even for an extra entry no block uses.
        """
        path = os.path.join(self.base, "snap")
        self.write(path)
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        entry = {"size": len(VICTIM), "sha256": hashlib.sha256(VICTIM).hexdigest()}
        for name in ("../victim", self.victim, "ram/../../victim", "./devices.bin", "ram//0000.ram", ".hidden"):
            bad = dict(manifest, files=dict(manifest["files"], **{name: entry}))
            os.chmod(os.path.join(path, MANIFEST), 0o600)
            with open(os.path.join(path, MANIFEST), "w") as f:
                json.dump(bad, f)
            error = self.assertRaises(SnapshotError, openSnapshot, path)
            self.assertIn("not a plain relative name", str(error))
        self.assertEqual(checkName("ram/0000.ram"), ["ram", "0000.ram"])


class SnapshotRootTests(TestCase):
    """
    C{--snapshot-root}: the commands cannot leave it.
    """

    def setUp(self) -> None:
        """
        A root holding one snapshot, a snapshot outside it, and a link in
        the root pointing outside.
        """
        base = os.path.abspath(self.mktemp())
        self.root = os.path.join(base, "root")
        self.outside = os.path.join(base, "outside")
        os.makedirs(self.root)
        os.makedirs(self.outside)
        fd = os.memfd_create("block")
        self.addCleanup(os.close, fd)
        os.ftruncate(fd, PAGE)
        os.pwrite(fd, b"S" * PAGE, 0)
        for path in (os.path.join(self.root, "snap"), os.path.join(self.outside, "snap")):
            writeSnapshot(path, "pc-i440fx-7.2", CONFIG, "precopy", DEVICE, [("pc.ram", PAGE, PAGE, fd)])
        os.symlink(self.outside, os.path.join(self.root, "link"))
        self.jobs = SnapshotJobs(reactor, root=self.root)

    def test_inside(self) -> Any:
        """
        A snapshot in the root is reached by a relative or an absolute
        path.
        """
        self.assertEqual(self.jobs.info("snap")["path"], os.path.join(self.root, "snap"))
        self.assertEqual(self.jobs.info(os.path.join(self.root, "snap"))["machine"], "pc-i440fx-7.2")
        return self.jobs.read("snap", "pc.ram", 0, 16).addCallback(self.assertEqual, b"S" * 16)

    @inlineCallbacks
    def test_cannotLeave(self) -> Any:
        """
        C{..}, an absolute path elsewhere, and a link in the root pointing
        outside are each refused by info, read, verify, restore and capture;
        nothing is created outside.
        """
        for path in ("../outside/snap", os.path.join(self.outside, "snap"), "link/snap", "/", "",
                     self.root):
            if path:
                self.assertRaises(SnapshotError, self.jobs.info, path)
                self.assertRaises(SnapshotError, self.jobs.read, path, "pc.ram", 0, 16)
            yield self.assertFailure(maybeDeferred(self.jobs.verify, path or "."), SnapshotError)
            yield self.assertFailure(maybeDeferred(self.jobs.startRestore, path or ".", ["tcp:127.0.0.1:1"]),
                                     SnapshotError)
        for path in ("../outside/new", os.path.join(self.outside, "new"), "link/new"):
            self.assertRaises(SnapshotError, self.jobs.startCapture, "tcp:127.0.0.1:0", path)
        self.assertEqual(os.listdir(self.outside), ["snap"])
