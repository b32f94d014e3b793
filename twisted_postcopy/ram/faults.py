# -*- test-case-name: tests.test_ram_faults -*-
"""
The destination's fault service: QEMU's shared-memory client model on the
reactor.

For each destination RAMBlock the daemon registers I{its own} mapping
(MISSING) on I{its own} userfaultfd and places pages there with
C{UFFDIO_COPY}/C{UFFDIO_ZEROPAGE}, one ioctl per contiguous run.  The block
is a memfd, so a placed page is then in the page cache for every process
mapping it.  Guest processes map the same memfd, register their mappings
on their own userfaultfds and hand those over (with a mapping table); this
service reads them on the reactor.  A fault on a page:

  - already received: the client is woken at once (C{UFFDIO_WAKE}); a
    page received as ZERO before LISTEN (a hole in the memfd) first gets
    a zero page;
  - otherwise: the page is requested from the L{IPageSource} (one request
    per page, however many threads or clients fault on it; fire-and-forget,
    the answer is the page arriving), and every waiting client is woken
    right after the page is placed.

This service is the one owner of the destination's page state
(L{twisted_postcopy.interfaces.IFaultService}): received and hole bits
(kept in each RAMBlock's C{receivedMap} and C{holeMap}, changed only here
from LISTEN on), requested and waiting pages (L{PendingPages}).  The
incoming migration only tells it that pages arrived.

Nothing here touches guest memory from Python.  See C{docs/userfaultfd.md}.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Callable, Iterable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_postcopy.errors import MappingTableError, MigrationFailed, RAMBlockError, RemoteProtocolError, UffdError
from twisted_postcopy.interfaces import IFaultService
from twisted_postcopy.ram import uffd
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.clients import ClientMapping, FaultClient, Readable, validateMappings
from twisted_postcopy.ram.observers import FaultObservers
from twisted_postcopy.ram.pending import PendingPage, PendingPages
from twisted_postcopy.ram.placement import PLACE_RETRIES, Placer
from twisted_postcopy.ram.uffdmsg import UFFD_EVENT_PAGEFAULT, iterRecords

__all__ = ["ClientMapping", "FaultClient", "FaultService"]

#: The target page: what one RAM record carries.
_TARGET_PAGE = 4096
#: Runs reported by one C{tp_record_runs} call.
_RECORD_RUNS = 64
#: The most bytes one zero placement of L{FaultService.fillUnsent} covers
#: (on hugetlbfs it copies that many zeros).
ZERO_CHUNK = 64 << 20

_log = Logger()


@implementer(IFaultService)
class FaultService:
    """
    Serves userfaults of guest processes from an L{IPageSource}.

    @ivar reactor: the reactor that reads client userfaultfds.
    @ivar pageSource: where missing pages are requested.
    @ivar clients: the attached clients.
    @ivar placer: the daemon's own placement userfaultfd and its blocks.
    @ivar faultCount: fault messages read.
    @ivar pending: the wanted pages (C{pending.requestCount}: requests
        sent to the page source).
    """

    def __init__(self, reactor: Any, pageSource: Any, blocks: Iterable[Any] | Mapping[str, Any] = ()) -> None:
        """
        @param reactor: an C{IReactorFDSet}.
        @param pageSource: an L{IPageSource}.
        @param blocks: RAMBlocks (or idstr -> RAMBlock) to register now.
        @raise UffdUnavailableError: userfaultfd could not be opened.
        @raise UffdError: a registration failed.
        """
        self.reactor = reactor
        self.pageSource = pageSource
        self.clients: list[FaultClient] = []
        self.placer = Placer()
        self.faultCount = 0
        self.pending = PendingPages(pageSource)
        self._messages = uffd.MessageBuffer()
        self._recordsPlaced = ffi.new("uint64_t *")
        self.observers = FaultObservers()
        for block in (blocks.values() if isinstance(blocks, Mapping) else blocks):
            self.addBlock(block)

    # -- blocks and clients ------------------------------------------------

    def addBlock(self, block: Any) -> None:
        """
        Register the daemon's mapping of C{block} (MISSING) on the daemon's
        own userfaultfd; from now on its pages are placed by this service.

        @param block: a L{twisted_postcopy.ram.block.RAMBlock}.
        @raise RAMBlockError: a block of that idstr is already registered.
        @raise UffdError: the registration failed.
        """
        self.placer.register(block)

    @property
    def blocks(self) -> dict[str, Any]:
        """
        @return: idstr -> the registered RAMBlocks.
        """
        return self.placer.blocks

    @property
    def uffd(self) -> int:
        """
        @return: the daemon's own placement userfaultfd (-1 once stopped).
        """
        return self.placer.uffd

    def addClient(self, uffdFd: int, mappings: Iterable[Any], pid: int | None = None) -> FaultClient:
        """
        Attach a guest process: read its userfaultfd on the reactor.

        @param uffdFd: its userfaultfd, handshake and registration done;
            the service owns it from now on (and makes it non-blocking).
        @param mappings: its mapping table (L{ClientMapping}s or dicts with
            C{base}, C{block}, C{offset}, C{length}, C{pageSize}).
        @param pid: its process id; its exit is then noticed at once through
            a pidfd.
        @return: the client handle (for L{removeClient}).
        @raise MappingTableError: the table does not fit the blocks.
        """
        table = validateMappings(self.blocks, mappings)
        flags = fcntl.fcntl(uffdFd, fcntl.F_GETFL)
        fcntl.fcntl(uffdFd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        client = FaultClient(uffdFd, table, pid)
        client.readers.append(Readable(uffdFd, lambda: self._clientReadable(client), f"uffd-client-{pid}"))
        if pid is not None:
            try:
                client.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                os.close(uffdFd)
                raise MappingTableError(f"guest process {pid} has already exited") from None
            client.readers.append(Readable(client.pidfd, lambda: self._clientExited(client), f"pidfd-{pid}"))
        self.clients.append(client)
        for reader in client.readers:
            self.reactor.addReader(reader)
        _log.info("fault service: attached {client} with {n} mappings", client=client, n=len(table))
        return client

    def removeClient(self, client: FaultClient, reason: str = "detached") -> None:
        """
        Detach a client: stop reading it, close its fds, forget its faults.

        @param client: the handle from L{addClient}.
        @param reason: why, for the log.
        """
        if not client.alive:
            return
        client.alive = False
        for reader in client.readers:
            self.reactor.removeReader(reader)
        os.close(client.fd)
        if client.pidfd >= 0:
            os.close(client.pidfd)
        self.clients.remove(client)
        self.pending.forgetClient(client)
        _log.info("fault service: removed {client}: {reason}", client=client, reason=reason)

    def _clientExited(self, client: FaultClient) -> None:
        """
        The client's pidfd became readable: the process exited.

        @param client: the client.
        """
        self.removeClient(client, f"process {client.pid} exited")

    # -- faults ------------------------------------------------------------

    def _clientReadable(self, client: FaultClient) -> None:
        """
        Read the client's fault messages in batches until C{EAGAIN}.  An
        exception while handling one fault (an observer's bug) is logged and
        does not stop the reading: the reactor would otherwise drop the
        descriptor and leave the client blocked.

        @param client: the client whose userfaultfd is readable.
        """
        while client.alive:
            try:
                records = self._messages.read(client.fd)
            except UffdError as error:
                self.removeClient(client, f"reading its userfaultfd failed: {error}")
                return
            if records is None:
                return
            for event, _, address, threadId in list(iterRecords(records)):
                if event == UFFD_EVENT_PAGEFAULT:
                    try:
                        self._fault(client, address, threadId & 0xFFFFFFFF)
                    except Exception:
                        _log.failure("fault service: handling a fault of {client} at {address:#x}",
                                     client=client, address=address)
                else:
                    _log.warn("fault service: ignored uffd event {event} from {client}", event=event, client=client)

    def _fault(self, client: FaultClient, address: int, threadId: int) -> None:
        """
        One page fault of a client.

        @param client: the client.
        @param address: the faulting address in the client.
        @param threadId: the faulting thread.
        """
        client.faults += 1
        self.faultCount += 1
        mapping = client.find(address)
        if mapping is None:
            _log.error("fault service: {client} faulted at {address:#x}, outside its mapping table",
                       client=client, address=address)
            return
        block = self.blocks[mapping.block]
        size = block.pageSize
        pageAddress = address - (address - mapping.base) % size
        offset = mapping.offset + pageAddress - mapping.base
        received = block.receivedMap.test(offset // size)
        if self.observers.onFault:
            self.observers.faultBegan(threadId, block, offset, uffd.monotonicNs(), received)
        if received:
            self._fillHole(block, offset)
            self._wake(client, pageAddress, size)
            return
        self.pending.addWaiter((block.idstr, offset), client, pageAddress)

    def _fillHole(self, ram: Any, offset: int) -> None:
        """
        A received page is wanted: if it was received as ZERO before LISTEN
        (a hole in the memfd), place a zero page now, as nothing else will
        come for it.

        @param ram: the RAMBlock.
        @param offset: the page's byte offset.
        """
        if ram.holeMap.test(offset // ram.pageSize):
            self.placeZero(ram.idstr, offset, ram.pageSize)

    def _wake(self, client: FaultClient, address: int, length: int) -> None:
        """
        C{UFFDIO_WAKE} a client's range; a client that is gone is removed.

        @param client: the client.
        @param address: start, in the client.
        @param length: bytes.
        """
        if not client.alive:
            return
        result = lib.tp_uffd_wake(client.fd, address, length)
        if result < 0:
            self.removeClient(client, f"UFFDIO_WAKE failed: {UffdError(-result, f'UFFDIO_WAKE: {os.strerror(-result)}')}")

    def requestPage(self, block: str, offset: int) -> Deferred:
        """
        Want a page (the daemon's own need, e.g. a device load); shares the
        request with any fault on it.

        @param block: the RAMBlock idstr.
        @param offset: a byte offset in it.
        @return: a Deferred firing with L{None} once the page is placed.
        @raise RAMBlockError: unknown block or bad offset.
        """
        ram = self.placer.find(block, offset)
        offset -= offset % ram.pageSize
        if ram.receivedMap.test(offset // ram.pageSize):
            self._fillHole(ram, offset)
            return succeed(None)
        return self.pending.addDeferred((block, offset))

    def rerequestPending(self) -> int:
        """
        After recovery: request again every page still wanted.

        @return: how many requests were sent.
        """
        return self.pending.rerequest()

    def failAll(self, reason: BaseException | Failure) -> None:
        """
        Fail the Deferreds of L{requestPage}; the pages stay wanted and the
        faulting threads stay blocked until their pages are placed.

        @param reason: e.g. L{twisted_postcopy.errors.PostcopyPaused}.
        """
        self.pending.failAll(reason)

    # -- placement ---------------------------------------------------------

    def placePages(self, block: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """
        Place received pages (requested or background) with one
        C{UFFDIO_COPY} per contiguous run, mark them received and wake every
        client waiting on them.

        @param block: the RAMBlock idstr.
        @param offset: page-aligned byte offset.
        @param data: one or more contiguous whole pages.
        @raise RAMBlockError: unknown block or misaligned range.
        @raise RemoteProtocolError: a page of the range was already
            received (pages arrive at most once after LISTEN).
        @raise UffdError: the kernel refused (pages before the failure are
            placed and woken).
        """
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        length = len(data)
        ram = self.placer.block(block, offset, length)
        self._checkNew(ram, offset, length)
        done, error = self.placer.place(ram, offset, data, length)
        if done:
            self._placed(ram, offset, done)
        if error is not None:
            raise error

    def placeRecords(self, block: str, records: Any) -> None:
        """
        Place a run of RAM records decoded in C (a
        L{twisted_postcopy.wire.events.RAMRecordsReceived}) into a block of
        4 KiB pages, straight from the receive buffer: one C{UFFDIO_COPY}
        per page from where it lies (no copy, no Python call per page),
        then, per run of consecutive pages, received bits and wake-ups as
        L{placePages}; a run of ZERO records is one L{placeZero}.

        @param block: the RAMBlock idstr.
        @param records: the records.
        @raise RAMBlockError: unknown block, a block of larger pages, or a
            record outside it.
        @raise RemoteProtocolError: a page was already received.
        @raise UffdError: the kernel refused (pages before are placed).
        @raise ValueError: records whose pages lie outside their data (not
            made by the decoder).
        """
        ram = self.placer.find(block, 0)
        if ram.pageSize != _TARGET_PAGE:
            raise RAMBlockError(f"RAMBlock {block}: records are placed one host page at a time "
                                f"({ram.pageSize:#x} bytes), not by placeRecords")
        runs = ffi.new("uint64_t[]", 4 * _RECORD_RUNS)
        out = ffi.new("uint64_t[2]")
        count = len(records.words)
        if len(records.payloads) != count:
            raise ValueError(f"{count} RAM record words but {len(records.payloads)} payload offsets")
        # Released on the way out even when something is raised.
        with ffi.from_buffer(records.data) as data, ffi.from_buffer("uint64_t[]", records.words) as words, \
                ffi.from_buffer("uint32_t[]", records.payloads) as payloads:
            index = 0
            while index < count:
                found = lib.tp_record_runs(data, len(records.data), words, payloads, index, count, runs,
                                           _RECORD_RUNS, out)
                if found < 0:
                    raise ValueError("RAM records whose pages lie outside their data")
                for run in range(found):
                    offset, length, first, kind = runs[4 * run:4 * run + 4]
                    if kind == 1:
                        self._placeRecordRun(ram, offset, length, data, len(records.data), payloads, first)
                    elif kind == 0:
                        self.placeZero(block, offset, length)
                    else:
                        self.placePages(block, offset, bytes((records.data[records.payloads[first]],)) * length)
                index = out[0]

    def _placeRecordRun(self, ram: Any, offset: int, length: int, data: Any, dataLength: int, payloads: Any,
                        first: int) -> None:
        """
        Place one run of PAGE records (see L{placeRecords}).

        @param ram: the RAMBlock.
        @param offset: the run's offset.
        @param length: its length.
        @param data: the records' bytes (C pointer).
        @param dataLength: their length.
        @param payloads: where each page starts in C{data} (C pointer).
        @param first: the index of the run's first record.
        """
        self.placer.block(ram.idstr, offset, length)
        self._checkNew(ram, offset, length)
        pages, done, retries = length // _TARGET_PAGE, 0, 0
        placed = self._recordsPlaced
        while True:
            result = lib.tp_uffd_place_records(self.placer.uffd, ram.address + offset + done * _TARGET_PAGE, data,
                                               dataLength, payloads, first + done, pages - done, placed)
            done += placed[0]
            if result != -errno.EAGAIN or retries >= PLACE_RETRIES:
                break
            retries += 1
            self.placer.drain()
        if done:
            self._placed(ram, offset, done * _TARGET_PAGE)
        if result < 0:
            where = f"{ram.idstr}:{offset + done * _TARGET_PAGE:#x}"
            raise UffdError(-result, f"UFFDIO_COPY of {where}: {os.strerror(-result)}")

    def placeZero(self, block: str, offset: int, length: int) -> None:
        """
        Place zero pages (C{UFFDIO_ZEROPAGE}; a copy of zeros on hugetlbfs,
        which has no zero page ioctl).

        @param block: the RAMBlock idstr.
        @param offset: page-aligned byte offset.
        @param length: whole pages.
        @raise RAMBlockError: unknown block or misaligned range.
        @raise RemoteProtocolError: a page of the range was already received.
        @raise UffdError: the kernel refused.
        """
        ram = self.placer.block(block, offset, length)
        self._checkNew(ram, offset, length)
        zeros = memoryview(bytes(length)) if ram.backing == "hugetlbfs" else None
        self._finish(ram, offset, *self.placer.place(ram, offset, zeros, length))

    def _checkNew(self, ram: Any, offset: int, length: int) -> None:
        """
        @param ram: the RAMBlock.
        @param offset: page-aligned byte offset.
        @param length: whole pages.
        @raise RemoteProtocolError: a page of the range was received already
            (a hole left by a precopy ZERO may still be filled).
        """
        size = ram.pageSize
        first, count = offset // size, length // size
        if count == 1:
            if ram.receivedMap.test(first) and not ram.holeMap.test(first):
                raise RemoteProtocolError(f"page {ram.idstr}:{offset:x} sent twice after LISTEN")
            return
        if not ram.receivedMap.anySet(first, count):
            return
        for page in range(first, first + count):
            if ram.receivedMap.test(page) and not ram.holeMap.test(page):
                raise RemoteProtocolError(f"page {ram.idstr}:{page * size:x} sent twice after LISTEN")

    def _finish(self, ram: Any, offset: int, done: int, error: UffdError | None) -> None:
        """
        After a placement: release what was placed, then raise the error.

        @param ram: the RAMBlock.
        @param offset: where the run started.
        @param done: bytes placed from C{offset}.
        @param error: why the rest was not placed, or L{None}.
        @raise UffdError: C{error}.
        """
        if done:
            self._placed(ram, offset, done)
        if error is not None:
            raise error

    def _placed(self, ram: Any, offset: int, length: int) -> None:
        """
        Pages are in: wake their waiters first (a guest thread's stall ends
        here; nothing else runs on the reactor before the bits are set),
        then mark them received, tell the observers and fire their
        Deferreds.

        @param ram: the RAMBlock.
        @param offset: byte offset.
        @param length: bytes placed.
        """
        size = ram.pageSize
        released = self.pending.take(ram.idstr, offset, length, size) if len(self.pending) else ()
        for _, pending in released:
            self._wakeWaiters(ram, pending)
        ram.receivedMap.set(offset // size, length // size)
        ram.holeMap.clear(offset // size, length // size)
        for page, pending in released:
            self._release(ram, page, pending)

    def _wakeWaiters(self, ram: Any, pending: PendingPage) -> None:
        """
        Wake the clients waiting on one placed page: one C{UFFDIO_WAKE} per
        client and address, however many threads wait there.

        @param ram: the RAMBlock.
        @param pending: the page's waiting state.
        """
        waiters = pending.waiters
        for client, address in (waiters if len(waiters) == 1 else dict.fromkeys(waiters)):
            self._wake(client, address, ram.pageSize)

    def _release(self, ram: Any, offset: int, pending: PendingPage) -> None:
        """
        After the wake-ups of one placed page: tell the observers and fire
        its Deferreds.

        @param ram: the RAMBlock.
        @param offset: the page's byte offset.
        @param pending: its waiting state.
        """
        if self.observers.onPlaced:
            self.observers.pagePlaced(ram, offset, uffd.monotonicNs())
        for waiting in pending.deferreds:
            waiting.callback(None)

    def missingPages(self) -> int:
        """
        @return: pages of the registered blocks not received yet.
        """
        return sum(block.pages - block.receivedMap.count() for block in self.blocks.values())

    def fillHoles(self) -> None:
        """
        Place zero pages over every hole left by precopy ZERO records (one
        call per run), so that clients never fault once this service stops.
        """
        for ram in self.blocks.values():
            for first, count in list(ram.holeMap.runs()):
                self.placeZero(ram.idstr, first * ram.pageSize, count * ram.pageSize)

    def fillUnsent(self) -> int:
        """
        Place zero pages over every page never received, one call per run
        (at most L{ZERO_CHUNK} bytes each), so that clients never fault
        once this service stops.  This is QEMU's meaning of a page the
        source never sends in postcopy: POSTCOPY_ADVISE emptied the
        destination's RAM, so the page is zero (a snapshot restore does
        not send the snapshot's holes, docs/prefetch.md).

        @return: how many pages were placed.
        """
        placed = 0
        for ram in self.blocks.values():
            for first, count in list(ram.receivedMap.runs(False)):
                placed += count
                offset, end = first * ram.pageSize, (first + count) * ram.pageSize
                while offset < end:
                    length = min(end - offset, ZERO_CHUNK)
                    self.placeZero(ram.idstr, offset, length)
                    offset += length
        return placed

    def receivedBitmap(self, block: str) -> bytes:
        """
        QEMU's received bitmap of a block for C{MIG_RP_MSG_RECV_BITMAP}
        (recovery): one bit per target page, holes counted as received.

        @param block: the RAMBlock idstr.
        @return: little-endian u64 words.
        @raise KeyError: unknown block.
        """
        return self.blocks[block].receivedBitmap()

    # -- observers and lifetime --------------------------------------------

    def addFaultObserver(self, callback: Callable[[int, int, bool], None]) -> None:
        """
        Address-keyed fault observer (QEMU's C{mark_postcopy_blocktime_begin}).

        @param callback: called with (thread id, the page's address in the
            daemon's mapping, whether the page was already received).
        """
        self.observers.addFaultObserver(callback)

    def addPlacementObserver(self, callback: Callable[[int], None]) -> None:
        """
        Address-keyed placement observer (QEMU's C{mark_postcopy_blocktime_end}).

        @param callback: called with the page's address in the daemon's mapping.
        """
        self.observers.addPlacementObserver(callback)

    def stop(self, reason: BaseException | None = None) -> None:
        """
        Fail outstanding requests, detach every client and close the
        daemon's userfaultfd (idempotent).  Call it only once every page is
        placed, or when the guests are finished anyway: closing the last
        reference to a userfaultfd turns its missing pages into zero pages.

        @param reason: the failure for L{requestPage}'s outstanding
            Deferreds (default: a L{twisted_postcopy.errors.MigrationFailed}).
        """
        self.failAll(reason if reason is not None else MigrationFailed("fault service stopped"))
        self.pending.clear()
        for client in list(self.clients):
            self.removeClient(client, "fault service stopped")
        self.placer.close()
