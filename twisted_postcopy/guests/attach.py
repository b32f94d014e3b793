# -*- test-case-name: tests.test_guests_attach -*-
"""
The attach protocol (see C{docs/attach.md}) and its client library.

A guest process connects to the daemon's Unix stream socket and exchanges
messages: a big-endian 32-bit length, then that many bytes of a UTF-8 JSON
object with a C{"type"} key.  A message whose JSON has C{"fds": n} carries
C{n} file descriptors (SCM_RIGHTS) attached to any of its bytes; receivers
queue descriptors in arrival order and hand the first C{n} to the message.

L{MessageReader} is the sans-IO parser used by both sides; L{attach} is the
blocking client used by guest workers (any Python process may use it).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from collections import deque
from typing import Any, Iterator

from attrs import define, field, frozen

from twisted_postcopy.errors import AttachProtocolError
from twisted_postcopy.ram import uffd
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.dirty import registerWriteTracking

#: The largest message either side accepts (device state included).
MAX_MESSAGE = 16 << 20

#: The most descriptors one message may carry.
MAX_FDS = 64

#: Attachment modes the daemon announces in C{blocks}.
MODES = ("fault", "track", "plain")

_LENGTH = struct.Struct(">I")

#: What C{/proc/self/fd/N} reads for a userfaultfd.
USERFAULTFD_LINK = "anon_inode:[userfaultfd]"

#: The prefix of what C{/proc/self/fd/N} reads for a memfd.
MEMFD_LINK = "/memfd:"


def _rejectConstant(name: str) -> Any:
    """
    C{json.loads}'s C{parse_constant}: refuse C{Infinity}, C{-Infinity}
    and C{NaN}, which are not JSON.

    @param name: the constant.
    @raise ValueError: always.
    """
    raise ValueError(f"{name} is not a JSON value")


def descriptorKind(fd: int) -> str:
    """
    What a descriptor is, as C{/proc/self/fd} names it.

    @param fd: a descriptor of this process.
    @return: the link text (C{anon_inode:[userfaultfd]}, C{/memfd:NAME
        (deleted)}, C{pipe:[N]}, ...).
    @raise AttachProtocolError: it is not open.
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as error:
        raise AttachProtocolError(f"descriptor {fd} is not open: {error.strerror}") from None


def checkUserfaultfd(fd: int) -> None:
    """
    @param fd: a descriptor a peer sent as its userfaultfd.
    @raise AttachProtocolError: it is something else (a pipe, a file).
    """
    kind = descriptorKind(fd)
    if kind != USERFAULTFD_LINK:
        raise AttachProtocolError(f"the descriptor sent as a userfaultfd is {kind}, not a userfaultfd")


def checkMemfd(fd: int, length: int) -> None:
    """
    @param fd: a descriptor a peer sent as a RAMBlock's memfd.
    @param length: the block's length.
    @raise AttachProtocolError: not a memfd (or a hugetlbfs file), or
        shorter than the block.
    """
    kind = descriptorKind(fd)
    info = os.fstat(fd)
    if not (kind.startswith(MEMFD_LINK) or kind.startswith("/dev/hugepages")) or not stat.S_ISREG(info.st_mode):
        raise AttachProtocolError(f"the descriptor sent as a RAMBlock is {kind}, not a memfd")
    if info.st_size < length:
        raise AttachProtocolError(f"the memfd sent for a {length}-byte RAMBlock has {info.st_size} bytes")


def encodeMessage(kind: str, **fields: Any) -> bytes:
    """
    @param kind: the message type (C{hello}, C{blocks}, ...).
    @param fields: its other fields (JSON-serialisable).
    @return: the framed message.
    @raise AttachProtocolError: it is larger than L{MAX_MESSAGE}.
    """
    body = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise AttachProtocolError(f"{kind} message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LENGTH.pack(len(body)) + body


@frozen
class Message:
    """
    One received message.

    @ivar kind: its C{type}.
    @ivar fields: the whole JSON object.
    @ivar fds: the descriptors it carried (the receiver owns them).
    """

    kind: str
    fields: dict[str, Any]
    fds: tuple[int, ...] = ()

    def __getitem__(self, name: str) -> Any:
        """
        @param name: a field name.
        @return: its value.
        @raise AttachProtocolError: the field is missing.
        """
        try:
            return self.fields[name]
        except KeyError:
            raise AttachProtocolError(f"{self.kind} message has no {name!r} field") from None


@define
class MessageReader:
    """
    Sans-IO parser: feed bytes and descriptors, take messages.

    @ivar buffer: bytes not yet parsed.
    @ivar fds: descriptors received and not yet given to a message.
    """

    buffer: bytearray = field(factory=bytearray)
    fds: deque[int] = field(factory=deque)

    def feed(self, data: bytes, fds: Any = ()) -> None:
        """
        @param data: received bytes.
        @param fds: descriptors received with them.
        @raise AttachProtocolError: too many descriptors are queued.
        """
        self.buffer += data
        self.fds.extend(fds)
        if len(self.fds) > MAX_FDS:
            raise AttachProtocolError(f"peer sent more than {MAX_FDS} unclaimed file descriptors")

    def messages(self) -> Iterator[Message]:
        """
        @return: the complete messages buffered so far.
        @raise AttachProtocolError: bad length, JSON, type or fd count.
        """
        while True:
            message = self._next()
            if message is None:
                return
            yield message

    def _next(self) -> Message | None:
        """
        @return: the next complete message, or L{None}.
        @raise AttachProtocolError: malformed message.
        """
        if len(self.buffer) < 4:
            return None
        (length,) = _LENGTH.unpack_from(self.buffer)
        if length > MAX_MESSAGE:
            raise AttachProtocolError(f"message length {length} exceeds {MAX_MESSAGE}")
        if len(self.buffer) < 4 + length:
            return None
        body = bytes(self.buffer[4 : 4 + length])
        del self.buffer[: 4 + length]
        try:
            fields = json.loads(body, parse_constant=_rejectConstant)
        except (ValueError, RecursionError) as error:
            raise AttachProtocolError(f"message is not JSON: {error}") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("type"), str):
            raise AttachProtocolError("message is not a JSON object with a string 'type'")
        count = fields.get("fds", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_FDS or count > len(self.fds):
            raise AttachProtocolError(f"{fields['type']} message claims {count!r} fds, {len(self.fds)} arrived")
        return Message(fields["type"], fields, tuple(self.fds.popleft() for _ in range(count)))

    def close(self) -> None:
        """
        Close every unclaimed descriptor.
        """
        while self.fds:
            os.close(self.fds.popleft())


@define(eq=False)
class MappedBlock:
    """
    A RAMBlock as mapped in a guest process.

    @ivar idstr: the block's name.
    @ivar length: bytes.
    @ivar pageSize: its page size.
    @ivar address: the mapping's address in this process.
    """

    idstr: str
    length: int
    pageSize: int
    address: int

    def view(self) -> memoryview:
        """
        A writable view of the mapping.  Touching a missing page blocks
        this thread in the kernel until the daemon places it (guest workers
        never serve their own faults).

        @return: C{length} bytes.
        """
        return memoryview(ffi.buffer(ffi.cast("char *", self.address), self.length))

    def mapping(self) -> dict[str, Any]:
        """
        @return: this block's entry of the mapping table.
        """
        return {"base": self.address, "idstr": self.idstr, "offset": 0,
                "length": self.length, "page_size": self.pageSize}


@define(eq=False)
class Attachment:
    """
    A guest process's connection to the daemon (blocking socket).

    @ivar sock: the connected Unix socket.
    @ivar mode: C{fault}, C{track} or C{plain}.
    @ivar blocks: the mapped blocks, in the daemon's order.
    @ivar reader: the message parser.
    """

    sock: socket.socket
    mode: str = "plain"
    blocks: list[MappedBlock] = field(factory=list)
    reader: MessageReader = field(factory=MessageReader)

    def send(self, kind: str, fds: tuple[int, ...] = (), **fields: Any) -> None:
        """
        Send one message.

        @param kind: its type.
        @param fds: descriptors to attach.
        @param fields: its fields.
        """
        if fds:
            fields["fds"] = len(fds)
        data = encodeMessage(kind, **fields)
        sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def receive(self) -> Message:
        """
        Wait for the next message.

        @return: it.
        @raise AttachProtocolError: the daemon closed the connection, or
            sent C{error} (its message).
        """
        while True:
            for message in self.reader.messages():
                if message.kind == "error":
                    raise AttachProtocolError(f"daemon refused: {message.fields.get('message')}")
                return message
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, MAX_FDS)
            if not data:
                raise AttachProtocolError("daemon closed the attach connection")
            self.reader.feed(data, fds)

    def block(self, idstr: str) -> MappedBlock:
        """
        @param idstr: a block name.
        @return: its mapping.
        @raise KeyError: no such block.
        """
        for block in self.blocks:
            if block.idstr == idstr:
                return block
        raise KeyError(idstr)

    def close(self) -> None:
        """
        Close the connection and unmap the blocks.
        """
        self.sock.close()
        self.reader.close()
        for block in self.blocks:
            lib.tp_munmap(block.address, block.length)
        self.blocks = []


def _mapBlocks(message: Message) -> list[MappedBlock]:
    """
    Map every memfd of a C{blocks} message (C{MAP_SHARED}) and close it.

    @param message: the C{blocks} message.
    @return: the mappings.
    @raise AttachProtocolError: the table and the fds disagree.
    """
    table = message["blocks"]
    if not isinstance(table, list) or len(table) != len(message.fds):
        raise AttachProtocolError(f"blocks message lists {len(table)} blocks with {len(message.fds)} fds")
    try:
        for entry, memfd in zip(table, message.fds):
            checkMemfd(memfd, entry["length"])
    except BaseException:
        for memfd in message.fds:
            os.close(memfd)
        raise
    mapped = []
    for entry, memfd in zip(table, message.fds):
        address = lib.tp_mmap(memfd, entry["length"], lib.MAP_SHARED)
        os.close(memfd)
        uffd.check(address, f"mmap of {entry['idstr']}")
        mapped.append(MappedBlock(entry["idstr"], entry["length"], entry["page_size"], address))
    return mapped


def _registerFaults(blocks: list[MappedBlock]) -> int:
    """
    Open a userfaultfd (C{THREAD_ID}, C{MISSING_SHMEM}, and
    C{MISSING_HUGETLBFS} for huge pages) and register every block MISSING.

    @param blocks: the mappings.
    @return: the userfaultfd.
    """
    features = uffd.UFFD_FEATURE_THREAD_ID | uffd.UFFD_FEATURE_MISSING_SHMEM
    if any(block.pageSize != 4096 for block in blocks):
        features |= uffd.UFFD_FEATURE_MISSING_HUGETLBFS
    fd = uffd.openWithFeatures(features)
    for block in blocks:
        uffd.register(fd, block.address, block.length)
    return fd


def _registerTracking(blocks: list[MappedBlock]) -> int:
    """
    Put every block under C{WP_ASYNC} write tracking on one userfaultfd.

    @param blocks: the mappings.
    @return: the userfaultfd.
    """
    fd = None
    for block in blocks:
        fd = registerWriteTracking(block.address, block.length, fd)
    assert fd is not None
    return fd


def attach(path: str, guest: str, worker: str, mappings: Any = None) -> Attachment:
    """
    Attach this process to the daemon's RAMBlocks.

    @param path: the daemon's attach socket.
    @param guest: the guest's name.
    @param worker: this worker's name.
    @param mappings: replaces the mapping table sent (tests of bad tables).
    @return: the attachment, blocks mapped and registered.
    @raise AttachProtocolError: the daemon refused or closed.
    @raise UffdError: registration failed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    attachment = Attachment(sock)
    try:
        attachment.send("hello", guest=guest, worker=worker, pid=os.getpid())
        message = attachment.receive()
        if message.kind != "blocks" or message["mode"] not in MODES:
            raise AttachProtocolError(f"expected blocks, got {message.kind} {message.fields.get('mode')!r}")
        attachment.mode = message["mode"]
        attachment.blocks = _mapBlocks(message)
        table = [block.mapping() for block in attachment.blocks] if mappings is None else mappings
        if attachment.mode == "plain":
            attachment.send("mapped", mappings=table)
        else:
            register = _registerFaults if attachment.mode == "fault" else _registerTracking
            fd = register(attachment.blocks)
            try:
                attachment.send("uffd" if attachment.mode == "fault" else "track", (fd,), mappings=table)
            finally:
                os.close(fd)
        reply = attachment.receive()
        if reply.kind != "attached":
            raise AttachProtocolError(f"expected attached, got {reply.kind}")
    except BaseException:
        attachment.close()
        raise
    return attachment
