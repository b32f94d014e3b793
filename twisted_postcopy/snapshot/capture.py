# -*- test-case-name: tests.test_snapshot_capture -*-
"""
Capture: an L{IIncomingVM} that receives a VM (a real QEMU, or one of ours)
into memfd RAMBlocks and stores it as a snapshot when the migration
completes.

The daemon never reads a capture's RAM through a mapping: precopy pages are
written with C{pwrite}, postcopy pages are placed by the fault service, and
the store copies each memfd with C{pread} after completion (every page is
present then).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, execute, gatherResults, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_postcopy.errors import MigrationError, SnapshotError
from twisted_postcopy.interfaces import IIncomingVM
from twisted_postcopy.ram.block import HUGE_PAGE_SIZE, RAMBlock
from twisted_postcopy.ram.support import reserveHugePages
from twisted_postcopy.snapshot.store import writeSnapshot
from twisted_postcopy.wire.config import encodeHeader

#: The largest total RAM a capture accepts (64 GiB).
MAX_RAM = 64 << 30


@implementer(IIncomingVM)
class CaptureVM:
    """
    Receives one incoming migration and stores it in C{path}.

    @ivar path: the snapshot directory.
    @ivar machine: the machine type name to record.
    @ivar configuration: the configuration bytes after the type byte.
    @ivar blocks: idstr -> L{RAMBlock}, in list order.
    @ivar devices: the device section bytes received.
    @ivar inPostcopy: tells whether the migration went through LISTEN
        (set by whoever drives the capture).
    @ivar faults: returns the incoming migration's
        L{twisted_postcopy.interfaces.IFaultService} once it listens, else
        L{None}, for L{readLive} (set by whoever drives the capture).
    @ivar running: the VM was started (RUN or end of precopy).
    @ivar storing: the migration completed and the store began (the
        memfds belong to the writer from then on).
    @ivar runWriter: C{(function, *args) -> Deferred} running the store
        (default: at once; L{captureSnapshot} uses the reactor's thread
        pool: the writer only C{pread}s memfds and writes files).
    @ivar stored: fires with the L{Snapshot} once stored, or fails.
    @ivar migration: the MigrationManager receiving the capture (set by
        L{captureSnapshot}; its C{queryMigrate} reports progress), or
        L{None}.
    @ivar root: the snapshot root C{path} must lie in (the daemon's
        C{--snapshot-root}), or L{None}.
    """

    def __init__(self, path: str, machine: str = "pc-i440fx-7.2") -> None:
        """
        @param path: where to store the snapshot.
        @param machine: the machine name recorded (the stream's own
            configuration wins when the decoder reports it).
        """
        self.path, self.machine = path, machine
        self.configuration = _configuration(machine)
        self.blocks: dict[str, RAMBlock] = {}
        self.devices: list[bytes] = []
        self.inPostcopy: Callable[[], bool] = lambda: False
        self.faults: Callable[[], Any] = lambda: None
        self.runWriter: Callable[..., Deferred] = execute
        self.running = False
        self.storing = False
        self.stored: Deferred = Deferred()
        self.migration: Any = None
        self.root: str | None = None
        self._releaseHugePages: Callable[[], None] = lambda: None

    def configurationReceived(self, raw: bytes, machine: str) -> None:
        """
        The stream's configuration section (called when the decoder
        reports it).

        @param raw: its bytes after the type byte.
        @param machine: the machine name in it.
        """
        self.configuration, self.machine = raw, machine

    def ramBlocksListed(self, blocks: Any) -> dict[str, RAMBlock]:
        """
        Create one memfd per listed block.

        A block listed with 2 MiB pages (a QEMU guest whose RAM is a
        hugetlbfs memory backend, migrated with postcopy-ram) is captured
        into a hugetlbfs memfd, so postcopy places its pages whole, as a
        QEMU destination would; the huge pages it needs are reserved
        (L{twisted_postcopy.ram.support.reserveHugePages}) and given back
        when the capture ends.

        @param blocks: (idstr, length, pageSize or None) each.
        @return: idstr -> block.
        @raise MigrationError: too much RAM, or a page size other than
            4 KiB and 2 MiB.
        @raise UffdUnavailableError: the huge pages cannot be reserved
            (the message names C{/proc/sys/vm/nr_hugepages}).
        """
        if sum(length for _, length, _ in blocks) > MAX_RAM:
            raise MigrationError("capture refuses more than 64 GiB of RAM")
        for idstr, length, pageSize in blocks:
            if pageSize not in (None, 4096, HUGE_PAGE_SIZE):
                raise MigrationError(f"block {idstr}: page size {pageSize} not supported "
                                     f"(4 KiB and 2 MiB pages are)")
        huge = sum(length // HUGE_PAGE_SIZE for _, length, pageSize in blocks if pageSize == HUGE_PAGE_SIZE)
        if huge:
            self._releaseHugePages = reserveHugePages(huge)
        for idstr, length, pageSize in blocks:
            if pageSize == HUGE_PAGE_SIZE:
                self.blocks[idstr] = RAMBlock(idstr, length, HUGE_PAGE_SIZE, "hugetlbfs")
            else:
                self.blocks[idstr] = RAMBlock(idstr, length)
        return dict(self.blocks)

    def deviceStateReceived(self, raw: bytes) -> None:
        """
        Keep device sections byte-exact.

        @param raw: their wire bytes.
        """
        self.devices.append(bytes(raw))

    def run(self) -> None:
        """
        The captured VM would start now; nothing runs in a capture.
        """
        self.running = True

    def read(self, idstr: str, offset: int, length: int) -> bytes:
        """
        Read captured RAM with C{pread} (pages not yet received read as
        zeros; see L{readLive}).

        @param idstr: the block.
        @param offset: byte offset.
        @param length: byte count.
        @return: the bytes.
        @raise SnapshotError: unknown block, a range past its end, or the
            capture is over (read the stored snapshot then).
        """
        if self.stored.called or self.storing:
            raise SnapshotError(f"{self.path}: the capture is over; read the stored snapshot")
        if idstr not in self.blocks:
            raise SnapshotError(f"no RAM block {idstr!r} in this capture")
        block = self.blocks[idstr]
        if offset < 0 or length < 0 or offset + length > block.length:
            raise SnapshotError(f"range {offset:#x}+{length:#x} past the end of block {idstr}")
        return os.pread(block.fd, length, offset)

    def readLive(self, idstr: str, offset: int, length: int) -> Deferred:
        """
        Read captured RAM during the migration: in postcopy, pages not yet
        received are first requested from the source (REQ_PAGES) and the
        read happens once they are placed.  Before this side processed
        LISTEN (see L{inPostcopy}) nothing can be requested, and pages not
        yet received read as zeros.

        @param idstr: the block.
        @param offset: byte offset.
        @param length: byte count.
        @return: a Deferred firing with the bytes.
        @raise SnapshotError: as L{read}.
        """
        self.read(idstr, offset, 0)
        faults = self.faults()
        if faults is None or not self.inPostcopy():
            return succeed(self.read(idstr, offset, length))
        pageSize = self.blocks[idstr].pageSize
        first = offset - offset % pageSize
        waits = [faults.requestPage(idstr, page)
                 for page in range(first, offset + length, pageSize)]
        return gatherResults(waits, consumeErrors=True).addCallback(
            lambda _: self.read(idstr, offset, length))

    def completed(self) -> None:
        """
        Every page arrived: write the snapshot and release the memfds
        (through L{runWriter}, so a daemon does both in a thread while QEMU
        gets its SHUT: unmapping and closing a GiB of memfd takes about
        half a second), then fire L{stored}.  From now on L{read} refuses.
        """
        form = "package" if self.inPostcopy() else "precopy"
        blocks = [(b.idstr, b.length, b.pageSize, b.fd) for b in self.blocks.values()]
        self.storing = True
        writing = self.runWriter(_storeThenRelease, list(self.blocks.values()), self.path, self.machine,
                                 self.configuration, form, b"".join(self.devices), blocks, time.time(),
                                 self.root)
        writing.addBoth(self._written)

    def _written(self, result: Any) -> None:
        """
        The snapshot was written (or not): release the memfds, fire
        L{stored}.

        @param result: the L{Snapshot} or a L{Failure}.
        """
        self._close()
        if isinstance(result, Failure):
            self.stored.errback(result)
        else:
            self.stored.callback(result)

    def failed(self, reason: Any) -> None:
        """
        The migration failed: nothing is stored.

        @param reason: why.
        """
        self._close()
        if not self.stored.called:
            self.stored.errback(SnapshotError(f"{self.path}: capture failed: {reason}"))

    def _close(self) -> None:
        """
        Release the memfds (and the huge pages reserved for them).
        """
        for block in self.blocks.values():
            block.close()
        self._releaseHugePages()


def _storeThenRelease(blocks: list[RAMBlock], *arguments: Any) -> Any:
    """
    Write a snapshot, then release the captured blocks (whatever the
    outcome).

    @param blocks: the blocks whose memfds the snapshot is read from.
    @param arguments: L{writeSnapshot}'s.
    @return: the stored L{Snapshot}.
    """
    try:
        return writeSnapshot(*arguments)
    finally:
        for block in blocks:
            block.close()


def _configuration(machine: str) -> bytes:
    """
    @param machine: a machine type name.
    @return: the configuration section QEMU 7.2 x86 sends for it (no
        subsections), after the type byte.
    """
    return encodeHeader(machine)[9:]


def captureSnapshot(reactor: Any, uri: str, path: str, postcopy: bool = True,
                    machine: str = "pc-i440fx-7.2", objects: Any = None,
                    tls: dict[str, str] | None = None,
                    insecure: bool = False) -> tuple[Deferred, CaptureVM]:
    """
    Listen for one incoming migration and store it.

    @param reactor: the reactor.
    @param uri: C{tcp:HOST:PORT} or C{unix:PATH}.
    @param path: the snapshot directory.
    @param postcopy: accept postcopy (C{postcopy-ram} on this side).
    @param machine: the machine name to record.
    @param objects: the L{twisted_postcopy.tlscreds.ObjectRegistry}
        holding the TLS objects named by C{tls}.
    @param tls: TLS parameters (C{tls-creds} naming server credentials,
        C{tls-authz}) to accept the source over TLS (docs/tls.md).
    @param insecure: allow listening off the host without TLS
        authentication (C{--insecure-migration}; see
        L{twisted_postcopy.access.checkMigrationListener}).
    @return: (a Deferred firing with the listening port, the
        L{CaptureVM}, whose C{stored} fires with the L{Snapshot} or fails).
    """
    from twisted.internet.threads import deferToThreadPool

    from twisted_postcopy.manager import MigrationManager

    vm = CaptureVM(path, machine)
    manager = MigrationManager(reactor, vm, _faultServiceFactory(reactor))
    manager.setCapabilities({"postcopy-ram": postcopy, "x-postcopy-auto-recover": True})
    _useTLS(manager, objects, tls)
    manager.insecureMigration = insecure
    vm.inPostcopy = lambda: bool(manager.incoming is not None and manager.incoming.faults is not None)
    listening = manager.migrateIncoming(uri)
    vm.faults = lambda: manager.incoming.faults if manager.incoming is not None else None
    vm.migration = manager
    vm.runWriter = lambda function, *args: deferToThreadPool(
        reactor, reactor.getThreadPool(), function, *args)
    vm.stored.addBoth(lambda result: _stopListening(manager, result))
    return listening, vm


def _stopListening(manager: Any, result: Any) -> Any:
    """
    Close a listening port left open.

    @param manager: the capture's manager.
    @param result: passed through.
    @return: C{result}.
    """
    port = getattr(manager, "_listening", None)
    if port is not None:
        port.stopListening()
    return result


def _faultServiceFactory(reactor: Any) -> Any:
    """
    @param reactor: the reactor.
    @return: a fault service factory C{(blocks, pageSource) -> service}.
    """
    from twisted_postcopy.ram.faults import FaultService

    return lambda blocks, source: FaultService(reactor, source, blocks)


def _useTLS(manager: Any, objects: Any, tls: dict[str, str] | None) -> None:
    """
    Give a snapshot job's manager the daemon's TLS objects and the job's
    TLS parameters.

    @param manager: the job's L{twisted_postcopy.manager.MigrationManager}.
    @param objects: an L{twisted_postcopy.tlscreds.ObjectRegistry}, or
        None to keep the manager's own (empty) one.
    @param tls: TLS parameters, or None.
    """
    if objects is not None:
        manager.objects = objects
    if tls:
        manager.setParameters(dict(tls))
