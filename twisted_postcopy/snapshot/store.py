# -*- test-case-name: tests.test_snapshot_store -*-
"""
The snapshot directory format (documented in C{docs/snapshots.md}).

A snapshot is a directory::

    manifest.json        format, machine, blocks, device form, sha256 per file
    configuration.bin    the configuration section's bytes after its type byte
    devices.bin          the device sections, byte-exact, concatenated
    ram/NNNN.ram         one sparse file per RAMBlock (zero pages are holes)

C{manifest.json} is written last, through a rename, so a directory without
it is an unfinished capture.  L{openSnapshot} checks that every file exists
with its recorded size; L{Snapshot.verify} also checks every sha256.  Any
failure raises L{SnapshotError} naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, BinaryIO

from attrs import frozen

from twisted_postcopy.errors import SnapshotError
from twisted_postcopy.snapshot.sparse import dataRuns

if TYPE_CHECKING:
    from twisted_postcopy.snapshot.mapping import BlockMapping

#: The manifest's name and format number.
MANIFEST = "manifest.json"
FORMAT = "twisted-postcopy-snapshot/1"
CONFIGURATION = "configuration.bin"
DEVICES = "devices.bin"
#: Where device state came from: a postcopy package or a precopy tail.
FORMS = ("package", "precopy")
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


@frozen
class BlockInfo:
    """
    One RAMBlock as stored.

    @ivar idstr: QEMU's block name.
    @ivar length: used length in bytes.
    @ivar pageSize: the block's page size.
    @ivar file: path of its sparse file, relative to the snapshot.
    """

    idstr: str
    length: int
    pageSize: int
    file: str


def hashFile(fd: int, length: int) -> str:
    """
    sha256 of a possibly sparse file, hashing holes as zeros without
    reading them.

    @param fd: the file.
    @param length: its logical length.
    @return: the hex digest.
    """
    digest, position = hashlib.sha256(), 0
    for start, size in dataRuns(fd, length):
        _hashZeros(digest, start - position)
        for chunk in range(start, start + size, _CHUNK):
            digest.update(os.pread(fd, min(_CHUNK, start + size - chunk), chunk))
        position = start + size
    _hashZeros(digest, length - position)
    return digest.hexdigest()


def _hashZeros(digest: "hashlib._Hash", count: int) -> None:
    """
    Feed C{count} zero bytes to a digest.

    @param digest: the hash object.
    @param count: how many zeros.
    """
    while count > 0:
        digest.update(_ZEROS[: min(count, _CHUNK)])
        count -= _CHUNK


@frozen
class Snapshot:
    """
    An opened snapshot directory.

    @ivar path: the directory.
    @ivar machine: the machine type name.
    @ivar form: where the device state came from (one of L{FORMS}).
    @ivar blocks: the blocks in QEMU's list order.
    @ivar files: relative path -> {"size", "sha256"}.
    @ivar created: capture time, seconds since the epoch.
    """

    path: str
    machine: str
    form: str
    blocks: tuple[BlockInfo, ...]
    files: dict
    created: float

    def _file(self, name: str) -> str:
        """
        @param name: a relative path from the manifest.
        @return: its absolute path.
        """
        return os.path.join(self.path, name)

    def readFile(self, name: str) -> bytes:
        """
        @param name: C{configuration.bin} or C{devices.bin}.
        @return: the file's bytes.
        """
        with open(self._file(name), "rb") as f:
            return f.read()

    def configuration(self) -> bytes:
        """
        @return: the configuration section's bytes after its type byte.
        """
        return self.readFile(CONFIGURATION)

    def deviceState(self) -> bytes:
        """
        @return: the device sections as wire bytes.
        """
        return self.readFile(DEVICES)

    def block(self, idstr: str) -> BlockInfo:
        """
        @param idstr: a block name.
        @return: its entry.
        @raise SnapshotError: no such block.
        """
        for block in self.blocks:
            if block.idstr == idstr:
                return block
        raise SnapshotError(f"{self.path}: no RAM block {idstr!r}")

    def mapBlock(self, block: BlockInfo) -> "BlockMapping | None":
        """
        Map a block's file read-only (holes read as zeros; no userfaultfd).

        @param block: the entry.
        @return: the L{twisted_postcopy.snapshot.mapping.BlockMapping}, or
            L{None} for an empty block.
        """
        from twisted_postcopy.snapshot.mapping import BlockMapping

        if not block.length:
            return None
        return BlockMapping(self._file(block.file), block.length)

    def read(self, idstr: str, offset: int, length: int) -> bytes:
        """
        Read stored RAM.

        @param idstr: the block.
        @param offset: byte offset.
        @param length: byte count.
        @return: the bytes.
        @raise SnapshotError: unknown block or range past its end.
        """
        block = self.block(idstr)
        if offset < 0 or length < 0 or offset + length > block.length:
            raise SnapshotError(f"{block.file}: range {offset:#x}+{length:#x} past {block.length:#x}")
        with open(self._file(block.file), "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def dataBytes(self, block: BlockInfo) -> int:
        """
        @param block: the entry.
        @return: bytes of the block's file that are not holes.
        """
        with open(self._file(block.file), "rb") as f:
            return sum(size for _, size in dataRuns(f.fileno(), block.length))

    def verify(self) -> None:
        """
        Check every file's size and sha256 against the manifest.

        @raise SnapshotError: naming the first file that differs.
        """
        for name, entry in sorted(self.files.items()):
            with _openChecked(self._file(name), entry["size"]) as f:
                if hashFile(f.fileno(), entry["size"]) != entry["sha256"]:
                    raise SnapshotError(f"{self._file(name)}: sha256 mismatch (tampered)")

    def info(self) -> dict:
        """
        @return: a JSON-able summary (C{postcopy snapshot info}).
        """
        return {
            "path": self.path, "format": FORMAT, "machine": self.machine, "device-form": self.form,
            "created": self.created, "device-bytes": self.files[DEVICES]["size"],
            "blocks": [{"idstr": b.idstr, "length": b.length, "page-size": b.pageSize,
                        "file": b.file, "data-bytes": self.dataBytes(b)} for b in self.blocks],
        }


def _openChecked(path: str, size: int) -> BinaryIO:
    """
    Open a snapshot file, checking its size.

    @param path: the file.
    @param size: the size it must have.
    @return: the open binary file.
    @raise SnapshotError: missing or of another size.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"{path}: missing ({e.strerror})") from e
    actual = os.fstat(f.fileno()).st_size
    if actual != size:
        f.close()
        raise SnapshotError(f"{path}: {actual} bytes, manifest says {size} (truncated?)")
    return f


def openSnapshot(path: str) -> Snapshot:
    """
    Open a snapshot, checking the manifest and every file's presence and
    size (not the hashes: see L{Snapshot.verify}).

    @param path: the directory.
    @return: the snapshot.
    @raise SnapshotError: missing, unreadable or inconsistent.
    """
    manifestPath = os.path.join(path, MANIFEST)
    try:
        with open(manifestPath, "rb") as f:
            manifest = json.loads(f.read())
        snapshot = _fromManifest(path, manifest)
    except OSError as e:
        raise SnapshotError(f"{manifestPath}: missing ({e.strerror})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{manifestPath}: malformed manifest ({e})") from e
    for name, entry in snapshot.files.items():
        _openChecked(os.path.join(path, name), entry["size"]).close()
    return snapshot


def _fromManifest(path: str, manifest: dict) -> Snapshot:
    """
    @param path: the directory.
    @param manifest: the parsed manifest.
    @return: the snapshot it describes.
    @raise ValueError: wrong format, or files and blocks disagree.
    """
    if manifest["format"] != FORMAT or manifest["device-form"] not in FORMS:
        raise ValueError(f"format {manifest['format']!r}")
    blocks = tuple(BlockInfo(b["idstr"], int(b["length"]), int(b["page-size"]), b["file"])
                   for b in manifest["blocks"])
    files = {name: {"size": int(e["size"]), "sha256": str(e["sha256"])}
             for name, e in manifest["files"].items()}
    for name in [CONFIGURATION, DEVICES] + [b.file for b in blocks]:
        if name not in files or os.path.isabs(name) or ".." in name.split("/"):
            raise ValueError(f"file {name!r} not listed or not inside the snapshot")
    for b in blocks:
        if files[b.file]["size"] != b.length:
            raise ValueError(f"{b.file} size differs from block length")
    return Snapshot(path, str(manifest["machine"]), manifest["device-form"], blocks, files,
                    float(manifest.get("created", 0)))


def _copySparse(source: int, target: int, length: int) -> str:
    """
    Copy a block's content into its sparse file: holes stay holes and
    all-zero pages are not written.

    @param source: the block's memfd (or file), read with C{pread}.
    @param target: the new file, already truncated to C{length}.
    @param length: the block length.
    @return: the sha256 of the content.
    """
    page = 4096
    zero = bytes(page)
    for start, size in dataRuns(source, length):
        for chunk in range(start, start + size, _CHUNK):
            data = os.pread(source, min(_CHUNK, start + size - chunk), chunk)
            view = memoryview(data)
            for at in range(0, len(data), page):
                if view[at : at + page] != zero:
                    os.pwrite(target, view[at : at + page], chunk + at)
    return hashFile(target, length)


def _writeBytes(path: str, data: bytes) -> dict:
    """
    Write a small file and describe it.

    @param path: where.
    @param data: what.
    @return: its manifest entry.
    """
    with open(path, "wb") as f:
        f.write(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def writeSnapshot(path: str, machine: str, configuration: bytes, form: str, devices: bytes,
                  blocks: list[tuple[str, int, int, int]], created: float = 0.0) -> Snapshot:
    """
    Store a snapshot.

    @param path: the directory (created; must not hold a manifest yet).
    @param machine: the machine type name.
    @param configuration: the configuration section after its type byte.
    @param form: C{"package"} or C{"precopy"}.
    @param devices: the device sections, byte-exact.
    @param blocks: (idstr, length, pageSize, fd) per block in list order;
        each fd is read with C{pread} only.
    @param created: capture time.
    @return: the stored snapshot, reopened.
    @raise SnapshotError: the directory holds a snapshot already.
    """
    if form not in FORMS:
        raise SnapshotError(f"{path}: unknown device form {form!r}")
    os.makedirs(os.path.join(path, "ram"), exist_ok=True)
    if os.path.exists(os.path.join(path, MANIFEST)):
        raise SnapshotError(f"{os.path.join(path, MANIFEST)}: a snapshot is stored here already")
    files = {CONFIGURATION: _writeBytes(os.path.join(path, CONFIGURATION), configuration),
             DEVICES: _writeBytes(os.path.join(path, DEVICES), devices)}
    entries = []
    for index, (idstr, length, pageSize, fd) in enumerate(blocks):
        name = f"ram/{index:04d}.ram"
        with open(os.path.join(path, name), "w+b") as f:
            os.ftruncate(f.fileno(), length)
            files[name] = {"size": length, "sha256": _copySparse(fd, f.fileno(), length)}
        entries.append({"idstr": idstr, "length": length, "page-size": pageSize, "file": name})
    manifest = {"format": FORMAT, "machine": machine, "device-form": form, "created": created,
                "blocks": entries, "files": files}
    temporary = os.path.join(path, MANIFEST + ".tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temporary, os.path.join(path, MANIFEST))
    return openSnapshot(path)
