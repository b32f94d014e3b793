# -*- test-case-name: tests.test_snapshot_store -*-
"""
Tests for L{twisted_postcopy.snapshot.store}: the directory format, sparse
block files, the sha256 manifest, and refusal of truncated or tampered
snapshots.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import SnapshotError
from twisted_postcopy.snapshot import store
from twisted_postcopy.snapshot.store import (
    BlockInfo, CONFIGURATION, DEVICES, MANIFEST, dataRuns, hashFile, openSnapshot, writeSnapshot,
)

PAGE = 4096
CONFIG = b"\x00\x00\x00\x0dpc-i440fx-7.2"
DEVICE = b"\x04\x00\x00\x00\x05\x05timer\x00\x00\x00\x00\x00\x00\x00\x02" + b"x" * 20 + b"\x7e\x00\x00\x00\x05"


def memfdWith(length: int, pages: dict[int, bytes]) -> int:
    """
    @param length: the memfd size.
    @param pages: offset -> bytes to write.
    @return: a memfd holding them (closed at the test's end by the caller).
    """
    fd = os.memfd_create("test-block")
    os.ftruncate(fd, length)
    for offset, data in pages.items():
        os.pwrite(fd, data, offset)
    return fd


class StoreTests(SynchronousTestCase):
    """
    Writing, opening, reading and verifying snapshots.
    """

    def setUp(self) -> None:
        """
        Two blocks: one with data, a zero page written explicitly and
        holes; one empty.
        """
        self.ram = {0: b"A" * PAGE, 3 * PAGE: b"\x00" * PAGE, 5 * PAGE: b"B" * 10}
        self.fds = [memfdWith(8 * PAGE, self.ram), memfdWith(2 * PAGE, {})]
        for fd in self.fds:
            self.addCleanup(os.close, fd)
        self.path = self.mktemp()
        self.snapshot = writeSnapshot(
            self.path, "pc-i440fx-7.2", CONFIG, "package", DEVICE,
            [("pc.ram", 8 * PAGE, PAGE, self.fds[0]), ("pc.rom", 2 * PAGE, PAGE, self.fds[1])], 12.5)

    def expectedRAM(self) -> bytes:
        """
        @return: the full content of the first block.
        """
        data = bytearray(8 * PAGE)
        for offset, chunk in self.ram.items():
            data[offset : offset + len(chunk)] = chunk
        return bytes(data)

    def test_layout(self) -> None:
        """
        The directory holds the manifest, configuration, devices and one
        file per block, with the documented names.
        """
        self.assertEqual(sorted(os.listdir(self.path)), sorted([MANIFEST, CONFIGURATION, DEVICES, "ram"]))
        self.assertEqual(sorted(os.listdir(os.path.join(self.path, "ram"))), ["0000.ram", "0001.ram"])

    def test_roundTrip(self) -> None:
        """
        Opening gives back the machine, form, blocks, configuration and
        device bytes exactly.
        """
        snapshot = openSnapshot(self.path)
        self.assertEqual((snapshot.machine, snapshot.form, snapshot.created),
                         ("pc-i440fx-7.2", "package", 12.5))
        self.assertEqual([(b.idstr, b.length, b.pageSize) for b in snapshot.blocks],
                         [("pc.ram", 8 * PAGE, PAGE), ("pc.rom", 2 * PAGE, PAGE)])
        self.assertEqual(snapshot.configuration(), CONFIG)
        self.assertEqual(snapshot.deviceState(), DEVICE)
        self.assertEqual(snapshot.read("pc.ram", 0, 8 * PAGE), self.expectedRAM())

    def test_sparse(self) -> None:
        """
        Zero pages and holes are not written: only the two data pages are
        stored.
        """
        block = self.snapshot.block("pc.ram")
        self.assertEqual(self.snapshot.dataBytes(block), 2 * PAGE)
        self.assertEqual(self.snapshot.dataBytes(self.snapshot.block("pc.rom")), 0)

    def test_mapBlock(self) -> None:
        """
        A block's read-only mapping reads the stored bytes, holes as zeros.
        """
        mapping = self.snapshot.mapBlock(self.snapshot.block("pc.ram"))
        self.addCleanup(mapping.close)
        self.assertEqual(bytes(mapping.view()), self.expectedRAM())
        self.assertIsNone(self.snapshot.mapBlock(BlockInfo("empty", 0, PAGE, "ram/none")))

    def test_readOutside(self) -> None:
        """
        Reading past a block's end or an unknown block is a
        L{SnapshotError}.
        """
        self.assertRaises(SnapshotError, self.snapshot.read, "pc.ram", 8 * PAGE - 1, 2)
        self.assertRaises(SnapshotError, self.snapshot.read, "nope", 0, 1)

    def test_verify(self) -> None:
        """
        An intact snapshot verifies; the manifest's hashes are the sha256
        of each file's full logical content.
        """
        self.snapshot.verify()
        self.assertEqual(self.snapshot.files["ram/0000.ram"]["sha256"],
                         hashlib.sha256(self.expectedRAM()).hexdigest())

    def test_tampered(self) -> None:
        """
        A changed byte fails verification naming the file.
        """
        with open(os.path.join(self.path, "ram/0000.ram"), "r+b") as f:
            f.seek(7 * PAGE)
            f.write(b"!")
        error = self.assertRaises(SnapshotError, openSnapshot(self.path).verify)
        self.assertIn("ram/0000.ram", str(error))

    def test_truncated(self) -> None:
        """
        A truncated file is refused at open, naming it.
        """
        os.truncate(os.path.join(self.path, DEVICES), 3)
        error = self.assertRaises(SnapshotError, openSnapshot, self.path)
        self.assertIn(DEVICES, str(error))

    def test_readTruncatedLater(self) -> None:
        """
        A block file truncated after the snapshot was opened makes a read
        past its new end a L{SnapshotError} naming it, never short bytes.
        """
        snapshot = openSnapshot(self.path)
        os.truncate(os.path.join(self.path, "ram/0000.ram"), 2 * PAGE)
        self.assertEqual(snapshot.read("pc.ram", 0, PAGE), b"A" * PAGE)
        error = self.assertRaises(SnapshotError, snapshot.read, "pc.ram", PAGE, 2 * PAGE)
        self.assertIn("ram/0000.ram", str(error))

    def test_missingFile(self) -> None:
        """
        A missing block file is refused at open, naming it.
        """
        os.unlink(os.path.join(self.path, "ram/0001.ram"))
        error = self.assertRaises(SnapshotError, openSnapshot, self.path)
        self.assertIn("0001.ram", str(error))

    def test_noManifest(self) -> None:
        """
        A directory without a manifest (an unfinished capture) is refused.
        """
        os.unlink(os.path.join(self.path, MANIFEST))
        error = self.assertRaises(SnapshotError, openSnapshot, self.path)
        self.assertIn(MANIFEST, str(error))

    def test_badManifest(self) -> None:
        """
        A manifest naming a file outside the snapshot, or not JSON, is
        refused.
        """
        manifestPath = os.path.join(self.path, MANIFEST)
        with open(manifestPath) as f:
            manifest = json.load(f)
        manifest["blocks"][0]["file"] = "../escape"
        with open(manifestPath, "w") as f:
            json.dump(manifest, f)
        self.assertRaises(SnapshotError, openSnapshot, self.path)
        with open(manifestPath, "w") as f:
            f.write("{")
        self.assertRaises(SnapshotError, openSnapshot, self.path)

    def test_noOverwrite(self) -> None:
        """
        Writing into a directory that holds a snapshot is refused.
        """
        self.assertRaises(SnapshotError, writeSnapshot, self.path, "m", CONFIG, "package", b"", [])

    def test_badForm(self) -> None:
        """
        The device form must be C{package} or C{precopy}.
        """
        self.assertRaises(SnapshotError, writeSnapshot, self.mktemp(), "m", CONFIG, "other", b"", [])

    def test_info(self) -> None:
        """
        The info summary lists blocks with their stored (non-hole) bytes.
        """
        info = self.snapshot.info()
        self.assertEqual(info["device-form"], "package")
        self.assertEqual(info["device-bytes"], len(DEVICE))
        self.assertEqual([(b["idstr"], b["data-bytes"]) for b in info["blocks"]],
                         [("pc.ram", 2 * PAGE), ("pc.rom", 0)])


class SparseHelperTests(SynchronousTestCase):
    """
    L{dataRuns} and L{hashFile} over sparse files.
    """

    def test_dataRuns(self) -> None:
        """
        Runs of a memfd with two separate written pages.
        """
        fd = memfdWith(16 * PAGE, {PAGE: b"x" * PAGE, 9 * PAGE: b"y"})
        self.addCleanup(os.close, fd)
        self.assertEqual(list(dataRuns(fd, 16 * PAGE)), [(PAGE, PAGE), (9 * PAGE, PAGE)])
        self.assertEqual(list(dataRuns(fd, 4 * PAGE)), [(PAGE, PAGE)])

    def test_hashMatchesContent(self) -> None:
        """
        The hash equals sha256 of the file read in full.
        """
        fd = memfdWith(3 * 1024 * 1024 + PAGE, {5: b"abc", 2 * 1024 * 1024: b"z" * 9000})
        self.addCleanup(os.close, fd)
        whole = os.pread(fd, 3 * 1024 * 1024 + PAGE, 0)
        self.assertEqual(hashFile(fd, len(whole)), hashlib.sha256(whole).hexdigest())

    def test_copyWritesAlignedChunks(self) -> None:
        """
        L{store._copySparse} writes a data run that starts inside a chunk
        in pieces that end at chunk boundaries (so a dense block lands in
        the page cache as large folios), skips its all-zero pages, and the
        copy and its hash equal the source.
        """
        chunk = store._CHUNK
        length = 4 * chunk
        start = chunk - 3 * PAGE
        content = bytes(range(256)) * ((length - start) // 256)
        fd = memfdWith(length, {start: content})
        self.addCleanup(os.close, fd)
        os.pwrite(fd, bytes(PAGE), 2 * chunk + PAGE)
        target = os.memfd_create("copy")
        self.addCleanup(os.close, target)
        os.ftruncate(target, length)
        writes: list[tuple[int, int]] = []
        original = store._pwriteAll

        def recording(fd: int, data: memoryview, offset: int) -> None:
            writes.append((offset, len(data)))
            original(fd, data, offset)

        self.patch(store, "_pwriteAll", recording)
        digest = store._copySparse(fd, target, length)
        whole = os.pread(fd, length, 0)
        self.assertEqual(os.pread(target, length, 0), whole)
        self.assertEqual(digest, hashlib.sha256(whole).hexdigest())
        self.assertEqual(writes, [
            (start, 3 * PAGE), (chunk, chunk), (2 * chunk, PAGE),
            (2 * chunk + 2 * PAGE, chunk - 2 * PAGE), (3 * chunk, chunk),
        ])
