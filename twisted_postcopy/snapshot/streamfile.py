# -*- test-case-name: tests.test_snapshot_streamfile -*-
"""
Offline import of a recorded QEMU 7.2 precopy stream (C{migrate
"exec:cat > FILE"}) into a snapshot.

The file is walked by the L{twisted_postcopy.wire.StreamDecoder} in 1 MiB
chunks, so a malformed or hostile file gets the decoder's typed
L{twisted_postcopy.errors.RemoteProtocolError}s (with the file offset),
within its limits, in time linear in the file.  L{StreamImporter} applies
the events: the block list creates the blocks, RAM records are written into
them, device sections (byte-exact, as the decoder delimits them) form the
device tail, and the stream must end with C{QEMU_VM_EOF} and a
VMDESCRIPTION.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Callable, Iterable

from attrs import define, field

from twisted_postcopy.errors import BadRAMRecordError, RemoteProtocolError, SnapshotError, TruncatedStreamError
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.snapshot.store import Snapshot, writeSnapshot
from twisted_postcopy.wire import events as e
from twisted_postcopy.wire.config import encodeConfigurationEvent
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE
from twisted_postcopy.wire.stream import StreamDecoder

#: Bytes read from the file at a time.
CHUNK = 1 << 20


def _memfdBlock(idstr: str, length: int) -> RAMBlock:
    """
    @param idstr: a block name.
    @param length: its used length (page aligned).
    @return: a memfd-backed L{RAMBlock}.
    """
    return RAMBlock(idstr, length)


@define
class StreamImporter:
    """
    Applies the events of a recorded precopy stream.

    @ivar newBlock: makes a block from (idstr, length); it has C{write(offset,
        data)}, C{close()} and, for L{importStreamFile}, C{fd}/C{pageSize}.
    @ivar decoder: the stream decoder.
    @ivar machine: the machine type name, once decoded.
    @ivar configuration: the configuration element after its type byte.
    @ivar blocks: idstr -> block, in list order.
    @ivar devices: device sections, byte-exact, in order.
    @ivar ended: whether the VMDESCRIPTION (the file's end) was decoded.
    """

    newBlock: Callable[[str, int], Any] = _memfdBlock
    decoder: StreamDecoder = field(factory=StreamDecoder)
    machine: str | None = None
    configuration: bytes = b""
    blocks: dict[str, Any] = field(factory=dict)
    devices: list[bytes] = field(factory=list)
    ended: bool = False
    _calls: dict[type, Callable[[Any], None]] = field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        """
        The one event-dispatch table; other events (header, section
        boundaries, EOS, commands, EOF) need nothing.
        """
        self._calls.update({
            e.ConfigurationReceived: self._configurationReceived,
            e.RAMBlocksListed: self._blocksListed,
            e.PageReceived: lambda ev: self.blocks[ev.block].write(ev.offset, ev.data),
            e.ZeroPageReceived: self._zero,
            e.DeviceSectionReceived: lambda ev: self.devices.append(ev.raw),
            e.VMDescriptionReceived: self._ended,
        })

    def receiveData(self, data: bytes) -> None:
        """
        Decode and apply bytes of the file.

        @param data: the next bytes; C{b""} at the end of the file.
        @raise RemoteProtocolError: malformed input.
        """
        decoder, calls = self.decoder, self._calls
        decoder.receiveData(data)
        for event in decoder.events():
            call = calls.get(event.__class__)
            if call is not None:
                call(event)

    def finish(self) -> None:
        """
        The file ended.

        @raise TruncatedStreamError: it did not end with EOF and a
            VMDESCRIPTION.
        """
        self.receiveData(b"")
        if not self.ended:
            raise TruncatedStreamError("stream does not end with EOF and a VM description",
                                       self.decoder.position)

    def close(self) -> None:
        """
        Release the blocks.
        """
        for block in self.blocks.values():
            block.close()
        self.blocks.clear()

    def _configurationReceived(self, event: e.ConfigurationReceived) -> None:
        """
        @param event: the configuration.
        """
        self.machine = event.machine
        self.configuration = encodeConfigurationEvent(event)[1:]

    def _blocksListed(self, event: e.RAMBlocksListed) -> None:
        """
        Create the blocks (the decoder checked counts, total and names).

        @param event: the RAM START list.
        @raise BadRAMRecordError: a length that is not whole pages.
        """
        for info in event.blocks:
            if info.length <= 0 or info.length % TARGET_PAGE_SIZE:
                raise BadRAMRecordError(
                    f"RAMBlock {info.idstr!r} length 0x{info.length:x} is not a whole number of pages",
                    self.decoder.position)
        for info in event.blocks:
            self.blocks[info.idstr] = self.newBlock(info.idstr, info.length)

    def _zero(self, event: e.ZeroPageReceived) -> None:
        """
        A ZERO record: a fresh block is zero already; another fill byte
        is written out.

        @param event: the record.
        """
        if event.fill:
            self.blocks[event.block].write(event.offset, bytes((event.fill,)) * TARGET_PAGE_SIZE)

    def _ended(self, event: e.VMDescriptionReceived) -> None:
        """
        @param event: the VMDESCRIPTION, the last element of a file.
        """
        self.ended = True


def importChunks(chunks: Iterable[bytes], newBlock: Callable[[str, int], Any] = _memfdBlock) -> StreamImporter:
    """
    Walk a whole recorded stream.

    @param chunks: its bytes, in order.
    @param newBlock: the block factory.
    @return: the importer, complete (the caller closes it).
    @raise RemoteProtocolError: malformed input (the blocks are closed).
    """
    importer = StreamImporter(newBlock)
    try:
        for chunk in chunks:
            importer.receiveData(chunk)
        importer.finish()
    except BaseException:
        importer.close()
        raise
    return importer


def findVMDescription(data: bytes | mmap.mmap) -> int:
    """
    Find the offset of the final C{QEMU_VM_EOF} byte of a stream.

    @param data: the whole stream.
    @return: the offset of the EOF byte that precedes the vmdesc.
    @raise RemoteProtocolError: the stream is malformed or does not end
        with a vmdesc.
    """
    decoder = StreamDecoder()
    decoder.receiveData(data)
    decoder.receiveData(b"")
    end = None
    for event in decoder.events():
        if event.__class__ is e.EOFReceived:
            end = decoder.position - 1
        elif event.__class__ is e.VMDescriptionReceived and end is not None:
            return end
    raise RemoteProtocolError("stream does not end with EOF and a VM description", decoder.position)


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
    except OSError as error:
        raise SnapshotError(f"{streamPath}: {error.strerror}") from error
    with f:
        importer = importChunks(iter(lambda: f.read(CHUNK), b""))
    try:
        blocks = list(importer.blocks.values())
        assert importer.machine is not None
        return writeSnapshot(snapshotPath, importer.machine, importer.configuration, "precopy",
                             b"".join(importer.devices),
                             [(b.idstr, b.length, b.pageSize, b.fd) for b in blocks],
                             os.stat(streamPath).st_mtime)
    finally:
        importer.close()
