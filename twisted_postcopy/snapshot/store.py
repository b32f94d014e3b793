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

The daemon runs as root and the directory may have been prepared by
someone else, so files are handled as in C{docs/security.md}: a capture
creates its directory fresh (mode 0700; an existing one must be empty and
the daemon's), every file with C{O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC}
relative to the directory's descriptor; data files and the directories
are fsynced before the manifest is renamed into place.  Reads open each
path component with C{O_NOFOLLOW} and take regular files only; manifest
keys must be plain relative names (L{checkName}).  With a C{root} (the
daemon's C{--snapshot-root}), the snapshot directory itself is reached
from the root one component at a time, never through a symbolic link.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
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
#: The page size whose all-zero pages stay holes, and such a page.
_PAGE = 4096
_ZERO_PAGE = bytes(_PAGE)
_ZEROS = bytes(_CHUNK)

#: How snapshot files and directories are opened for reading: no symbolic
#: link as the last component, and no blocking on a FIFO put there.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How every snapshot file is created.
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: One component of a file name a manifest may list.
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


def checkName(name: object) -> list[str]:
    """
    Check a file name from a manifest: a plain relative name inside the
    snapshot (at most two components such as C{ram/0000.ram}, each of
    letters, digits, C{_.+-}, not starting with a dot).

    @param name: the name.
    @return: its components.
    @raise SnapshotError: anything else (absolute, C{..}, empty parts,
        odd characters).
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(parts) > 2 or not all(_COMPONENT.fullmatch(part) for part in parts):
        raise SnapshotError(f"manifest lists file {name!r:.200}: not a plain relative name inside the snapshot")
    return parts


def _osError(path: str, error: OSError) -> SnapshotError:
    """
    @param path: what was opened.
    @param error: why it failed.
    @return: the L{SnapshotError} to raise (a symbolic link is named as
        such).
    """
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        return SnapshotError(f"{path}: a symbolic link or not a directory (refused: snapshot "
                             "files are never reached through links)")
    if error.errno == errno.ENOENT:
        return SnapshotError(f"{path}: missing ({error.strerror})")
    return SnapshotError(f"{path}: {error.strerror}")


def insideRoot(root: str, path: str) -> str:
    """
    Where a snapshot path given to the daemon lies under its root.

    @param root: the daemon's C{--snapshot-root}.
    @param path: an absolute path under it, or a path relative to it.
    @return: the absolute path.
    @raise SnapshotError: it leaves the root (or is the root itself).
    """
    root = os.path.abspath(root)
    full = os.path.normpath(os.path.join(root, path))
    if ".." in path.split("/") or os.path.commonpath([root, full]) != root or full == root:
        raise SnapshotError(f"{path}: outside the daemon's snapshot root {root}")
    return full


def _walk(path: str, root: str | None, create: bool = False) -> int:
    """
    Open a snapshot directory.

    @param path: the directory.
    @param root: the snapshot root it must stay in (each component below
        it opened with C{O_NOFOLLOW}), or L{None}.
    @param create: create the last component (mode 0700) if missing.
    @return: a descriptor of the directory.
    @raise SnapshotError: missing, a link, or outside C{root}.
    """
    if root is None:
        if create:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as error:
                raise _osError(path, error) from None
        try:
            return os.open(path, _DIRECTORY)
        except OSError as error:
            raise _osError(path, error) from None
    relative = os.path.relpath(insideRoot(root, path), os.path.abspath(root)).split("/")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise _osError(root, error) from None
    try:
        for index, part in enumerate(relative):
            if create and index == len(relative) - 1:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            inner = os.open(part, _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError as error:
        os.close(fd)
        raise _osError(path, error) from None
    return fd


def openInside(directory: int, name: str, path: str) -> BinaryIO:
    """
    Open a snapshot file for reading, never through a link.

    @param directory: the snapshot directory's descriptor.
    @param name: the file's relative name (checked by L{checkName}).
    @param path: the snapshot's path, for messages.
    @return: the open regular file.
    @raise SnapshotError: bad name, missing, a link, or not a regular file.
    """
    parts = checkName(name)
    where = os.path.join(path, name)
    parent = directory
    try:
        if len(parts) == 2:
            parent = os.open(parts[0], _DIRECTORY, dir_fd=directory)
        fd = os.open(parts[-1], _READ, dir_fd=parent)
    except OSError as error:
        raise _osError(where, error) from None
    finally:
        if parent != directory:
            os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(f"{where}: not a regular file")
    return os.fdopen(fd, "rb")


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
    @ivar root: the snapshot root the directory is reached from, or
        L{None}.
    """

    path: str
    machine: str
    form: str
    blocks: tuple[BlockInfo, ...]
    files: dict
    created: float
    root: str | None = None

    def _file(self, name: str) -> str:
        """
        @param name: a relative path from the manifest.
        @return: its absolute path (for messages).
        """
        return os.path.join(self.path, name)

    def open(self, name: str) -> BinaryIO:
        """
        @param name: a relative path from the manifest.
        @return: the file, opened without following links.
        @raise SnapshotError: missing, a link, or not a regular file.
        """
        directory = _walk(self.path, self.root)
        try:
            return openInside(directory, name, self.path)
        finally:
            os.close(directory)

    def readFile(self, name: str) -> bytes:
        """
        @param name: C{configuration.bin} or C{devices.bin}.
        @return: the file's bytes.
        """
        with self.open(name) as f:
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
        with self.open(block.file) as f:
            return BlockMapping(self._file(block.file), block.length, f)

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
        with self.open(block.file) as f:
            return _preadAll(f.fileno(), length, offset, block.file)

    def readExtra(self, name: str, limit: int) -> bytes | None:
        """
        Read a file kept beside the manifest but not listed in it (written
        after the capture, such as the working set of
        L{twisted_postcopy.snapshot.workingset}).

        @param name: its plain name (L{checkName}).
        @param limit: the most bytes it may hold.
        @return: its bytes, or L{None} if there is no such file.
        @raise SnapshotError: larger than C{limit}, a link, or not a regular
            file.
        """
        try:
            f = self.open(name)
        except SnapshotError as error:
            if "missing" in str(error):
                return None
            raise
        with f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise SnapshotError(f"{self._file(name)}: larger than {limit} bytes (refused)")
        return data

    def publishExtra(self, name: str, data: bytes, replace: bool = False) -> bool:
        """
        Store a file beside the manifest: written to C{NAME.tmp} (created
        exclusively, mode 0600, never through a link), fsynced, then linked
        to C{name} only if no such file exists yet (or, with C{replace},
        renamed over it: a link there is replaced, never followed), the
        directory fsynced.

        @param name: its plain name (L{checkName}).
        @param data: its bytes.
        @param replace: replace an existing C{name}.
        @return: whether it was stored (L{False}: one exists already).
        @raise SnapshotError: the temporary name exists (an interrupted
            write: remove it) or the directory cannot be written.
        """
        checkName(name)
        temporary = name + ".tmp"
        directory = _walk(self.path, self.root)
        try:
            _writeBytes(directory, temporary, self.path, data)
            try:
                if replace:
                    os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
                else:
                    os.link(temporary, name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
                    os.unlink(temporary, dir_fd=directory)
            except FileExistsError:
                os.unlink(temporary, dir_fd=directory)
                return False
            except OSError as error:
                os.unlink(temporary, dir_fd=directory)
                raise _osError(self._file(name), error) from None
            os.fsync(directory)
            return True
        finally:
            os.close(directory)

    def dataBytes(self, block: BlockInfo) -> int:
        """
        @param block: the entry.
        @return: bytes of the block's file that are not holes.
        """
        with self.open(block.file) as f:
            return sum(size for _, size in dataRuns(f.fileno(), block.length))

    def verify(self) -> None:
        """
        Check every file's size and sha256 against the manifest.

        @raise SnapshotError: naming the first file that differs.
        """
        for name, entry in sorted(self.files.items()):
            with _openChecked(self.open(name), self._file(name), entry["size"]) as f:
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


def _openChecked(f: BinaryIO, path: str, size: int) -> BinaryIO:
    """
    Check an open snapshot file's size.

    @param f: the file.
    @param path: its path, for messages.
    @param size: the size it must have.
    @return: C{f}.
    @raise SnapshotError: of another size.
    """
    actual = os.fstat(f.fileno()).st_size
    if actual != size:
        f.close()
        raise SnapshotError(f"{path}: {actual} bytes, manifest says {size} (truncated?)")
    return f


#: The largest manifest read (a few hundred bytes per block).
MAX_MANIFEST = 4 << 20


def openSnapshot(path: str, root: str | None = None) -> Snapshot:
    """
    Open a snapshot, checking the manifest and every file's presence and
    size (not the hashes: see L{Snapshot.verify}).

    @param path: the directory.
    @param root: the snapshot root it must lie in (reached without
        following links), or L{None}.
    @return: the snapshot.
    @raise SnapshotError: missing, unreadable, inconsistent, reached
        through a link, or outside C{root}.
    """
    manifestPath = os.path.join(path, MANIFEST)
    try:
        directory = _walk(path, root)
    except SnapshotError as error:
        if "missing" in str(error):
            raise SnapshotError(f"{manifestPath}: missing (no snapshot directory {path})") from None
        raise
    try:
        with openInside(directory, MANIFEST, path) as f:
            text = f.read(MAX_MANIFEST + 1)
        if len(text) > MAX_MANIFEST:
            raise SnapshotError(f"{manifestPath}: larger than {MAX_MANIFEST} bytes")
        try:
            snapshot = _fromManifest(path, json.loads(text), root)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SnapshotError(f"{manifestPath}: malformed manifest ({e})") from e
        for name, entry in snapshot.files.items():
            _openChecked(openInside(directory, name, path), os.path.join(path, name), entry["size"]).close()
    finally:
        os.close(directory)
    return snapshot


def _fromManifest(path: str, manifest: dict, root: str | None = None) -> Snapshot:
    """
    @param path: the directory.
    @param manifest: the parsed manifest.
    @param root: the snapshot root, or L{None}.
    @return: the snapshot it describes.
    @raise ValueError: wrong format, or files and blocks disagree.
    @raise SnapshotError: a file name is not a plain relative name.
    """
    if manifest["format"] != FORMAT or manifest["device-form"] not in FORMS:
        raise ValueError(f"format {manifest['format']!r}")
    blocks = tuple(BlockInfo(b["idstr"], int(b["length"]), int(b["page-size"]), b["file"])
                   for b in manifest["blocks"])
    files = {name: {"size": int(e["size"]), "sha256": str(e["sha256"])}
             for name, e in manifest["files"].items()}
    for name in files:
        checkName(name)
    for name in [CONFIGURATION, DEVICES] + [b.file for b in blocks]:
        if name not in files:
            raise ValueError(f"file {name!r} not listed")
    for b in blocks:
        if files[b.file]["size"] != b.length:
            raise ValueError(f"{b.file} size differs from block length")
    return Snapshot(path, str(manifest["machine"]), manifest["device-form"], blocks, files,
                    float(manifest.get("created", 0)), root)


def _copySparse(source: int, target: int, length: int) -> str:
    """
    Copy a block's content into its sparse file and hash it in the same
    pass (no second read): holes stay holes and all-zero pages are not
    written; each run of non-zero pages within a chunk is one C{pwrite}.
    Chunks end at multiples of L{_CHUNK} whatever offset a data run
    starts at, so a dense block is written in aligned 1 MiB pieces and the
    page cache keeps it in large folios: the restore source then reads a
    fresh mapping of it with a fault per folio, not per 16 pages (the
    first read of 3 GiB of a QEMU guest's RAM took 161 ms instead of
    399 ms here; its data started 928 KiB in, and unaligned 1 MiB writes
    had left it in 32 KiB folios).
    (Hashing in a helper thread, overlapping the I/O, measured slower on
    the shared 2-core machine.)

    @param source: the block's memfd (or file), read with C{pread}; nothing
        writes it meanwhile.
    @param target: the new file, already truncated to C{length}.
    @param length: the block length.
    @return: the sha256 of the content (the file's, holes read as zeros).
    """
    digest, position = hashlib.sha256(), 0
    for start, size in dataRuns(source, length):
        _hashZeros(digest, start - position)
        chunk, end = start, start + size
        while chunk < end:
            stop = min(end, (chunk // _CHUNK + 1) * _CHUNK)
            data = os.pread(source, stop - chunk, chunk)
            digest.update(data)
            _writeNonZero(target, data, chunk)
            chunk = stop
        position = end
    _hashZeros(digest, length - position)
    return digest.hexdigest()


def _preadAll(fd: int, length: int, offset: int, name: str) -> bytes:
    """
    C{pread} exactly C{length} bytes (one C{pread} returns at most about
    2 GiB on Linux).

    @param fd: the file.
    @param length: bytes.
    @param offset: where.
    @param name: the file's name, for the error.
    @return: the bytes.
    @raise SnapshotError: the file ended first (it was truncated).
    """
    parts, done = [], 0
    while done < length:
        part = os.pread(fd, min(length - done, _CHUNK << 10), offset + done)
        if not part:
            raise SnapshotError(f"{name}: ends at {offset + done:#x}, before {offset + length:#x}")
        parts.append(part)
        done += len(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _writeNonZero(target: int, data: bytes, offset: int) -> None:
    """
    Write the pages of C{data} that are not all zero, one C{pwrite} per
    run of them.

    @param target: the file.
    @param data: whole pages (a short last page counts as a page).
    @param offset: where C{data} starts in the file.
    """
    if data == (_ZEROS if len(data) == _CHUNK else bytes(len(data))):
        return
    view, run = memoryview(data), None
    for at in range(0, len(data), _PAGE):
        if view[at : at + _PAGE] == _ZERO_PAGE[: min(_PAGE, len(data) - at)]:
            if run is not None:
                _pwriteAll(target, view[run:at], offset + run)
                run = None
        elif run is None:
            run = at
    if run is not None:
        _pwriteAll(target, view[run:], offset + run)


def _pwriteAll(target: int, data: memoryview, offset: int) -> None:
    """
    C{pwrite} all of C{data} (a short write continues).

    @param target: the file.
    @param data: the bytes.
    @param offset: where.
    """
    while data:
        written = os.pwrite(target, data, offset)
        data, offset = data[written:], offset + written


def _create(directory: int, name: str, path: str) -> int:
    """
    Create a new snapshot file (mode 0600), never through a link and never
    over an existing file.

    @param directory: the descriptor of its directory.
    @param name: its name there.
    @param path: its full path, for messages.
    @return: its descriptor (read-write).
    @raise SnapshotError: it exists (or is a link).
    """
    try:
        return os.open(name, _CREATE, 0o600, dir_fd=directory)
    except OSError as error:
        if error.errno == errno.EEXIST:
            raise SnapshotError(f"{path}: exists already (refused: snapshot files are created fresh)") from None
        raise _osError(path, error) from None


def _writeBytes(directory: int, name: str, path: str, data: bytes) -> dict:
    """
    Write a small file, fsynced, and describe it.

    @param directory: the snapshot directory's descriptor.
    @param name: the file name.
    @param path: the snapshot's path, for messages.
    @param data: what.
    @return: its manifest entry.
    """
    with os.fdopen(_create(directory, name, os.path.join(path, name)), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def prepareDirectory(path: str, root: str | None = None) -> None:
    """
    Create a capture's directory fresh (mode 0700), or accept an existing
    one only if it is an empty directory of the daemon's user (not a
    link); called before a capture starts listening, and again by
    L{writeSnapshot}.

    @param path: the directory.
    @param root: the snapshot root it must lie in, or L{None}.
    @raise SnapshotError: it exists and is not empty, is a link or
        another user's, or lies outside C{root}.
    """
    os.close(_freshDirectory(path, root))


def _freshDirectory(path: str, root: str | None) -> int:
    """
    @param path: the directory.
    @param root: the snapshot root, or L{None}.
    @return: a descriptor of the new or empty directory, mode 0700.
    @raise SnapshotError: as L{prepareDirectory}.
    """
    directory = _walk(path, root, create=True)
    try:
        info = os.fstat(directory)
        if info.st_uid != os.geteuid():
            raise SnapshotError(f"{path}: belongs to uid {info.st_uid}, not the daemon's {os.geteuid()}")
        if os.listdir(directory):
            raise SnapshotError(f"{path}: exists and is not empty (a capture creates its directory fresh)")
        os.fchmod(directory, 0o700)
    except BaseException:
        os.close(directory)
        raise
    return directory


def writeSnapshot(path: str, machine: str, configuration: bytes, form: str, devices: bytes,
                  blocks: list[tuple[str, int, int, int]], created: float = 0.0,
                  root: str | None = None) -> Snapshot:
    """
    Store a snapshot.

    @param path: the directory (created; an existing one must be empty:
        see L{prepareDirectory}).
    @param machine: the machine type name.
    @param configuration: the configuration section after its type byte.
    @param form: C{"package"} or C{"precopy"}.
    @param devices: the device sections, byte-exact.
    @param blocks: (idstr, length, pageSize, fd) per block in list order;
        each fd is read with C{pread} only.
    @param created: capture time.
    @param root: the snapshot root C{path} must lie in, or L{None}.
    @return: the stored snapshot, reopened.
    @raise SnapshotError: the directory is not empty (a snapshot is stored
        there already), is a link, or lies outside C{root}.
    """
    if form not in FORMS:
        raise SnapshotError(f"{path}: unknown device form {form!r}")
    directory = _freshDirectory(path, root)
    ram = -1
    try:
        os.mkdir("ram", 0o700, dir_fd=directory)
        ram = os.open("ram", _DIRECTORY, dir_fd=directory)
        os.fchmod(ram, 0o700)
        files = {CONFIGURATION: _writeBytes(directory, CONFIGURATION, path, configuration),
                 DEVICES: _writeBytes(directory, DEVICES, path, devices)}
        entries = []
        for index, (idstr, length, pageSize, fd) in enumerate(blocks):
            name = f"ram/{index:04d}.ram"
            target = _create(ram, name[len("ram/"):], os.path.join(path, name))
            try:
                os.ftruncate(target, length)
                files[name] = {"size": length, "sha256": _copySparse(fd, target, length)}
                os.fsync(target)
            finally:
                os.close(target)
            entries.append({"idstr": idstr, "length": length, "page-size": pageSize, "file": name})
        os.fsync(ram)
        manifest = {"format": FORMAT, "machine": machine, "device-form": form, "created": created,
                    "blocks": entries, "files": files}
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _writeBytes(directory, MANIFEST + ".tmp", path, text)
        os.fsync(directory)
        os.rename(MANIFEST + ".tmp", MANIFEST, src_dir_fd=directory, dst_dir_fd=directory)
        os.fsync(directory)
    finally:
        if ram >= 0:
            os.close(ram)
        os.close(directory)
    return openSnapshot(path, root)
