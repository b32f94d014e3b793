# -*- test-case-name: tests.test_migration_loopback -*-
"""
Postcopy test support with the real kernel: a minimal userfaultfd fault
service (until C{twisted_postcopy.ram.faults} lands) and a guest process
that maps the destination's memfds, registers its own userfaultfd, hands it
over with SCM_RIGHTS and reads all of its RAM (faulting on missing pages).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
import sys
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred

_libc = ctypes.CDLL(None, use_errno=True)
UFFDIO_API, UFFDIO_REGISTER, UFFDIO_WAKE = 0xC018AA3F, 0xC020AA00, 0x8010AA02
UFFDIO_COPY, UFFDIO_ZEROPAGE = 0xC028AA03, 0xC020AA04
THREAD_ID = 0x100
PAGEFAULT = 0x12


def uffdOpen(features: int = THREAD_ID) -> int:
    """
    @return: a non-blocking userfaultfd after the API handshake.
    """
    fd = _libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("QQQ", 0xAA, features, 0)))
    return fd


def register(fd: int, address: int, length: int) -> None:
    """
    Register a range for MISSING faults.
    """
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", address, length, 1, 0)))


def address(buffer: Any) -> int:
    """
    @return: the address of a writable buffer (an mmap).
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


GUEST = r"""
import ctypes, fcntl, hashlib, json, mmap, os, socket, struct, sys, threading
sys.path.insert(0, sys.argv[1])
from tests.uffdguest import uffdOpen, register, address
spec = json.loads(sys.argv[2])
maps = [mmap.mmap(fd, length, mmap.MAP_SHARED) for fd, length in spec["blocks"]]
uffd = uffdOpen()
bases = []
for m in maps:
    base = address(m)
    register(uffd, base, len(m))
    bases.append(base)
sock = socket.socket(fileno=spec["sock"])
socket.send_fds(sock, [b"u"], [uffd])
print(json.dumps({"bases": bases, "tid": threading.get_native_id()}), flush=True)
digests = []
for m in maps:
    pages = len(m) // 4096
    order = [(i * 7919) % pages for i in range(pages)] if pages % 7919 else range(pages)
    for i in order:
        m[i * 4096]
    digests.append(hashlib.sha256(m[:]).hexdigest())
print(json.dumps(digests), flush=True)
"""


class FaultService:
    """
    The daemon side: registers its own mapping of each block, reads the
    guest's userfaultfd, requests missing pages, places them with
    UFFDIO_COPY/ZEROPAGE and wakes the guest.
    """

    def __init__(self, reactor: Any, blocks: dict[str, Any], pageSource: Any) -> None:
        """
        Set up the instance.
        """
        self.reactor, self.blocks, self.pageSource = reactor, blocks, pageSource
        self.uffd = uffdOpen(0)
        self.bases = {}
        for name, block in blocks.items():
            self.bases[name] = address(block.map)
            register(self.uffd, self.bases[name], block.length)
        self.guest: list[tuple[str, int, int]] = []
        self.guestFd: int | None = None
        self.faultObservers: list[Any] = []
        self.placementObservers: list[Any] = []
        self.reader: Any = None

    def addFaultObserver(self, observer: Any) -> None:
        """
        @param observer: called with (thread id, address, received) per fault.
        """
        self.faultObservers.append(observer)

    def addPlacementObserver(self, observer: Any) -> None:
        """
        @param observer: called with the address of each placed page.
        """
        self.placementObservers.append(observer)

    def attach(self, uffd: int, bases: list[int], names: list[str]) -> None:
        """
        A guest registered its mappings (one base per block, in order).
        """
        self.guestFd = uffd
        self.guest = [(n, b, self.blocks[n].length) for n, b in zip(names, bases)]
        self.reader = _Reader(self)
        self.reactor.addReader(self.reader)

    def _guestAddress(self, name: str, offset: int) -> int:
        """
        @return: the guest's address of C{offset} in block C{name}.
        """
        for n, base, _ in self.guest:
            if n == name:
                return base + offset
        raise KeyError(name)

    def faulted(self, address: int, tid: int) -> None:
        """
        A guest fault was read: request the page, wake the guest once placed.

        @param address: the faulting address.
        @param tid: the faulting thread.
        """
        self.nfaults = getattr(self, "nfaults", 0) + 1
        for name, base, length in self.guest:
            if base <= address < base + length:
                offset = (address - base) & ~4095
                break
        else:
            raise ValueError(f"fault outside guest RAM {address:#x}")
        for observer in self.faultObservers:
            observer(tid, base + offset, False)
        d = self.pageSource.requestPage(name, offset)
        d.addCallback(lambda _: self._wake(name, offset, 4096))
        d.addErrback(lambda f: None)

    def _wake(self, name: str, offset: int, length: int) -> None:
        """
        Wake the guest on a placed range and tell the placement observers.
        """
        if self.guestFd is None or not self.guest:
            return
        start = self._guestAddress(name, offset)
        fcntl.ioctl(self.guestFd, UFFDIO_WAKE, bytearray(struct.pack("QQ", start, length)))
        for page in range(0, length, 4096):
            for observer in self.placementObservers:
                observer(start + page)

    def placePages(self, name: str, offset: int, data: bytes) -> None:
        """
        Place pages (UFFDIO_COPY here, or a stand-in).
        """
        source = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        arg = bytearray(struct.pack("QQQQq", self.bases[name] + offset, source, len(data), 0, 0))
        fcntl.ioctl(self.uffd, UFFDIO_COPY, arg)
        self._wake(name, offset, len(data))

    def placeZero(self, name: str, offset: int, length: int) -> None:
        """
        Place zero pages.
        """
        arg = bytearray(struct.pack("QQQq", self.bases[name] + offset, length, 0, 0))
        fcntl.ioctl(self.uffd, UFFDIO_ZEROPAGE, arg)
        self._wake(name, offset, length)

    def stop(self) -> None:
        """
        Stop (no further effect on pages already placed).
        """
        if self.reader is not None:
            self.reactor.removeReader(self.reader)
            self.reader = None
        os.close(self.uffd)


class _Reader:
    """
    IReadDescriptor over the guest's userfaultfd.
    """

    def __init__(self, service: FaultService) -> None:
        """
        Set up the instance.
        """
        self.service = service

    def fileno(self) -> int:
        """
        @return: the guest's userfaultfd.
        """
        return self.service.guestFd

    def doRead(self) -> None:
        """
        Read fault messages and dispatch page faults.
        """
        try:
            data = os.read(self.service.guestFd, 32 * 64)
        except BlockingIOError:
            return
        for i in range(0, len(data), 32):
            event, = struct.unpack_from("B", data, i)
            if event == PAGEFAULT:
                _, address, tid = struct.unpack_from("QQI", data, i + 8)
                self.service.faulted(address, tid)

    def connectionLost(self, reason: Any) -> None:
        """
        Nothing to release.
        """
        pass

    def logPrefix(self) -> str:
        """
        @return: the log prefix.
        """
        return "uffd-guest"


class GuestProcess(protocol.ProcessProtocol):
    """
    Runs L{GUEST}; C{done} fires with the digests of every block.
    """

    def __init__(self, service: FaultService, sock: socket.socket, names: list[str]) -> None:
        """
        Set up the instance.
        """
        self.service, self.sock, self.names = service, sock, names
        self.lines: list[dict] = []
        self.buffer = b""
        self.done: Deferred = Deferred()
        self.errors = b""

    def outReceived(self, data: bytes) -> None:
        """
        Parse the guest's JSON lines; the first one carries its mapping bases.
        """
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))
            if len(self.lines) == 1:
                _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
                self.service.attach(fds[0], self.lines[0]["bases"], self.names)

    def errReceived(self, data: bytes) -> None:
        """
        Keep the guest's stderr for the error message.
        """
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        """
        Fire C{done} with the guest's digests, or fail with its stderr.
        """
        self.sock.close()
        if len(self.lines) == 2:
            self.done.callback(self.lines[1])
        else:
            self.done.errback(RuntimeError(f"guest failed: {self.errors.decode()}"))


def spawnGuest(reactor: Any, service: FaultService, blocks: dict[str, Any]) -> GuestProcess:
    """
    Start the guest process over C{blocks} (in their order).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    names = list(blocks)
    fds = {0: "w", 1: "r", 2: "r"}
    spec = {"blocks": [], "sock": theirs.fileno()}
    for name in names:
        fds[blocks[name].fd] = blocks[name].fd
        spec["blocks"].append([blocks[name].fd, blocks[name].length])
    fds[theirs.fileno()] = theirs.fileno()
    guest = GuestProcess(service, ours, names)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reactor.spawnProcess(guest, sys.executable, [sys.executable, "-c", GUEST, root, json.dumps(spec)],
                         env=None, childFDs=fds)
    theirs.close()
    return guest
