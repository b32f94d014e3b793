# -*- test-case-name: tests.test_snapshot_streamfile -*-
"""
Offline import of a recorded QEMU 7.2 precopy stream (C{migrate
"exec:cat > FILE"}) into a snapshot.

QEMU's own device sections carry no length, so a live decoder cannot find
where one ends.  A whole file can be cut anyway: it ends with C{QEMU_VM_EOF},
C{QEMU_VM_VMDESCRIPTION}, a be32 length and that many bytes of JSON; the
device tail is everything between the first non-RAM FULL section and that
EOF byte.  RAM records before it are decoded and written into memfd blocks.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

from twisted_postcopy.errors import RemoteProtocolError, SnapshotError, UnsupportedFeatureError
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.snapshot.store import Snapshot, writeSnapshot
from twisted_postcopy.wire.constants import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, RAMFlag
from twisted_postcopy.wire.constants import SectionType as T

_RAM_FLAGS = int(RAMFlag.ZERO | RAMFlag.PAGE | RAMFlag.CONTINUE)
_PAGE_MASK = ~0xFFF


def findVMDescription(data: bytes | mmap.mmap) -> int:
    """
    Find the offset of the final C{QEMU_VM_EOF} byte of a stream.

    @param data: the whole stream.
    @return: the offset of the EOF byte that precedes the vmdesc.
    @raise RemoteProtocolError: the stream does not end with a vmdesc.
    """
    end = len(data)
    closing = data.rfind(b"}")
    marker = bytes([T.EOF, T.VMDESCRIPTION])
    position = data.rfind(marker, 0, end)
    while position >= 0:
        size = struct.unpack(">I", data[position + 2 : position + 6])[0]
        if position + 6 + size == end and closing == end - 1:
            try:
                json.loads(bytes(data[position + 6 : end]))
            except ValueError:
                pass
            else:
                return position
        position = data.rfind(marker, 0, position)
    raise RemoteProtocolError("stream does not end with EOF and a VM description")


class _Walker:
    """
    Walks a recorded stream up to its device tail.

    @ivar data: the stream.
    @ivar at: the read position.
    @ivar blocks: idstr -> L{RAMBlock}.
    @ivar order: block names in list order.
    @ivar last: the CONTINUE block.
    """

    def __init__(self, data: bytes | mmap.mmap) -> None:
        """
        @param data: the whole stream.
        """
        self.data, self.at = data, 0
        self.blocks: dict[str, RAMBlock] = {}
        self.order: list[str] = []
        self.last: str | None = None

    def take(self, count: int) -> bytes:
        """
        @param count: bytes wanted.
        @return: them.
        @raise RemoteProtocolError: the stream ends first.
        """
        if self.at + count > len(self.data):
            raise RemoteProtocolError(f"stream truncated at offset {self.at}")
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return bytes(chunk)

    def u(self, fmt: str) -> int:
        """
        @param fmt: a one-field struct format.
        @return: the value read.
        """
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def str8(self) -> str:
        """
        @return: a C{str8}.
        """
        return self.take(self.u(">B")).decode()

    def header(self) -> tuple[str, bytes]:
        """
        @return: machine name and configuration bytes (after the type byte).
        @raise UnsupportedFeatureError: the configuration has subsections.
        """
        magic, version, kind = struct.unpack(">IIB", self.take(9))
        if magic != QEMU_VM_FILE_MAGIC or version != QEMU_VM_FILE_VERSION or kind != T.CONFIGURATION:
            raise RemoteProtocolError("bad stream header")
        begin = self.at
        machine = self.take(self.u(">I")).decode()
        if self.data[self.at] == T.SUBSECTION:
            raise UnsupportedFeatureError("configuration subsections are not supported")
        return machine, bytes(self.data[begin : self.at])

    def walk(self) -> int:
        """
        Decode commands and RAM sections up to the first device section.

        @return: the offset where the device tail begins.
        """
        while True:
            kind = self.data[self.at]
            if kind == T.COMMAND:
                self.at += 1
                self.take(struct.unpack(">HH", self.take(4))[1])
            elif kind in (T.SECTION_START, T.SECTION_FULL) and self._idstrAt() != "ram":
                return self.at
            elif kind in (T.SECTION_START, T.SECTION_PART, T.SECTION_END):
                self.at += 1
                self._ramSection(kind)
            else:
                raise RemoteProtocolError(f"unexpected element {kind} at offset {self.at}")

    def _idstrAt(self) -> str:
        """
        @return: the idstr of the START/FULL section at the position.
        """
        size = self.data[self.at + 5]
        return bytes(self.data[self.at + 6 : self.at + 6 + size]).decode()

    def _ramSection(self, kind: int) -> None:
        """
        One RAM section after its type byte, footer included.

        @param kind: START, PART or END.
        """
        sectionId = self.u(">I")
        if kind == T.SECTION_START:
            self.str8()
            self.take(8)
            self._ramList()
        else:
            self._records()
        if self.take(1)[0] != T.SECTION_FOOTER or self.u(">I") != sectionId:
            raise RemoteProtocolError(f"bad section footer before offset {self.at}")

    def _ramList(self) -> None:
        """
        The RAM START block list: creates the memfd blocks.
        """
        word = self.u(">Q")
        total, seen = word & _PAGE_MASK, 0
        while seen < total:
            name, length = self.str8(), self.u(">Q")
            self.blocks[name] = RAMBlock(name, length)
            self.order.append(name)
            seen += length
        if self.u(">Q") != RAMFlag.EOS:
            raise RemoteProtocolError("RAM START not ended by EOS")

    def _records(self) -> None:
        """
        RAM records up to EOS: pages are written with C{pwrite}.
        """
        while True:
            word = self.u(">Q")
            flags, offset = word & ~_PAGE_MASK, word & _PAGE_MASK
            if flags == RAMFlag.EOS:
                return
            if flags & ~_RAM_FLAGS:
                raise UnsupportedFeatureError(f"RAM record flags {flags:#x}")
            if not flags & RAMFlag.CONTINUE:
                self.last = self.str8()
            block = self.blocks.get(self.last or "")
            if block is None:
                raise RemoteProtocolError(f"Can't find block {self.last}")
            if flags & RAMFlag.PAGE:
                block.write(offset, self.take(4096))
            elif self.take(1) != b"\x00":
                block.write(offset, self.data[self.at - 1 : self.at] * 4096)


def importStreamFile(streamPath: str, snapshotPath: str) -> Snapshot:
    """
    Store a recorded precopy stream as a snapshot.

    @param streamPath: the file QEMU wrote.
    @param snapshotPath: the snapshot directory to create.
    @return: the snapshot.
    @raise SnapshotError: the stream cannot be read.
    @raise RemoteProtocolError: the stream is malformed.
    """
    try:
        f = open(streamPath, "rb")
    except OSError as e:
        raise SnapshotError(f"{streamPath}: {e.strerror}") from e
    with f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walker = _Walker(data)
        machine, configuration = walker.header()
        tail = walker.walk()
        devices = bytes(data[tail : findVMDescription(data)])
    try:
        blocks = [walker.blocks[name] for name in walker.order]
        return writeSnapshot(snapshotPath, machine, configuration, "precopy", devices,
                             [(b.idstr, b.length, b.pageSize, b.fd) for b in blocks],
                             os.stat(streamPath).st_mtime)
    finally:
        for block in walker.blocks.values():
            block.close()
