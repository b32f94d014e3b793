# -*- test-case-name: tests.test_destination_incoming -*-
"""
The incoming migration: what a QEMU 7.2 destination does with each element
of the main stream (migration-stream.md section 6), without sockets.

L{IncomingMigration} is sans-IO in the manner of h2: it is driven by the
stream protocol, one method per decoded element (and by the preempt
channel and the fault service), and keeps what it answers on the return
path (C{PONG}, C{SHUT}, page requests, the recovery replies) encoded in an
outbox that L{IncomingMigration.dataToSend} empties.  The main channel
currently attached (L{IncomingMigration.channel}: the connection's
protocol, replaced by a recovery, absent while paused) is told when the
outbox is no longer empty and writes it to its transport.  Pages go
through a L{PagePlacer}; at LISTEN a fault service
(L{twisted_postcopy.interfaces.IFaultService}) is started over the blocks
and placement switches to it.  From then on the fault service owns every
page's state; this object only tells it that pages arrived, and is its
page source: a fault becomes a REQ_PAGES on the return path (none while
the migration is paused or recovering: every awaited page is requested
again at POSTCOPY_RESUME).
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Sequence

from attrs import define, field
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_postcopy.destination.machine import IncomingMachine
from twisted_postcopy.destination.placer import PagePlacer
from twisted_postcopy.destination.recovery import pausable, pauseIncoming
from twisted_postcopy.errors import RemoteProtocolError
from twisted_postcopy.interfaces import IFaultService, IPageSource
from twisted_postcopy.ram import support
from twisted_postcopy.state import MigrationStatus
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE
from twisted_postcopy.wire import ReturnPathEncoder
from twisted_postcopy.wire.strings import encodeName

_log = Logger()

#: Statuses in which the incoming migration may complete (not while
#: paused or recovering: the main channel is gone).
_LOADING = frozenset({MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE})


@implementer(IPageSource)
@define
class IncomingMigration:
    """
    One incoming migration.

    @ivar vm: the L{twisted_postcopy.interfaces.IIncomingVM} being filled.
    @ivar channel: the main channel attached (L{attachChannel}), told by
        C{returnPathReady()} that L{dataToSend} has bytes; L{None} before
        a connection and while paused.
    @ivar postcopyEnabled: the destination's C{postcopy-ram} capability.
    @ivar faultServiceFactory: C{(blocks, pageSource) -> }
        L{IFaultService}, called at LISTEN.
    @ivar machine: the destination's state machines.
    @ivar placer: the page placer, once RAM START listed the blocks.
    @ivar faults: the L{IFaultService} from LISTEN on.
    @ivar checkUserfaultfd: called at POSTCOPY_ADVISE (QEMU's
        C{postcopy_ram_supported_by_host}); raises
        L{twisted_postcopy.errors.UffdUnavailableError} when postcopy
        cannot run here.
    @ivar collectGarbage: called at POSTCOPY_ADVISE, before precopy, for
        the full collection that L{tuneGarbageCollector} no longer makes
        at the switchover.
    @ivar tuneGarbageCollector: called at POSTCOPY_LISTEN to keep the
        cyclic garbage collector off the fault path.
    @ivar encoder: encodes the return path; it remembers the block of the
        previous request (QEMU's C{mis->last_rb}), so a request for
        another block is REQ_PAGES_ID and one for the same block REQ_PAGES.
    @ivar outbox: return-path bytes not yet taken by L{dataToSend}.
    @ivar pageRequests: page requests sent (all connections).
    """

    vm: Any
    channel: Any = None
    postcopyEnabled: bool = False
    faultServiceFactory: Callable[[dict[str, Any], IPageSource], IFaultService] | None = None
    machine: IncomingMachine = field(factory=IncomingMachine)
    placer: PagePlacer | None = None
    faults: IFaultService | None = None
    checkUserfaultfd: Callable[[], object] = support.checkUserfaultfd
    collectGarbage: Callable[[], object] = support.collectGarbage
    tuneGarbageCollector: Callable[[], object] = support.tuneGarbageCollector
    encoder: ReturnPathEncoder = field(factory=ReturnPathEncoder)
    outbox: list[bytes] = field(factory=list)
    pageRequests: int = 0

    def attachChannel(self, channel: Any) -> None:
        """
        A connection became the main channel (the first, or a recovery's):
        return-path bytes go to it from now on.

        @param channel: its protocol (with C{transport} and
            C{returnPathReady()}).
        """
        self.channel = channel
        if self.outbox:
            channel.returnPathReady()

    def detachChannel(self) -> None:
        """
        The main channel is gone (a pause): nothing is written until a
        recovery attaches a new one, and nothing meant for the lost
        connection is kept for the new one.
        """
        self.channel = None
        self.outbox = []

    def send(self, data: bytes) -> None:
        """
        Queue return-path bytes and tell the attached main channel.

        @param data: encoded return-path messages.
        """
        self.outbox.append(data)
        if self.channel is not None:
            self.channel.returnPathReady()

    def dataToSend(self) -> bytes:
        """
        @return: the queued return-path bytes (and the outbox emptied).
        """
        data, self.outbox = b"".join(self.outbox), []
        return data

    def connected(self) -> None:
        """
        The source connected: loading starts (status C{active}).
        """
        self.machine.loadingStarted()

    def configurationReceived(self, machineName: str, subsections: bytes) -> None:
        """
        The configuration section: handed to the VM when it has a
        C{configurationReceived(raw, machine)} method.

        @param machineName: the machine type name.
        @param subsections: the raw subsection bytes that followed it.
        """
        receive = getattr(self.vm, "configurationReceived", None)
        if receive is not None:
            name = encodeName(machineName)
            receive(struct.pack(">I", len(name)) + name + subsections, machineName)

    def openReturnPath(self) -> None:
        """
        OPEN_RETURN_PATH.
        """
        self.machine.openReturnPath()

    def ping(self, value: int) -> None:
        """
        PING: answer with a PONG of the same value.

        @param value: the ping's value.
        """
        self.machine.ping()
        self.send(self.encoder.pong(value))

    def advise(self, pageSizeSummary: int, targetPageSize: int) -> None:
        """
        POSTCOPY_ADVISE.

        @param pageSizeSummary: the source's OR of block page sizes.
        @param targetPageSize: the source's target page size.
        @raise RemoteProtocolError: postcopy is off here, or the sizes differ.
        @raise twisted_postcopy.errors.UffdUnavailableError: userfaultfd
            cannot be used by this process (the message names the fix).
        """
        if not self.postcopyEnabled:
            raise RemoteProtocolError("CMD_POSTCOPY_ADVISE received but postcopy-ram is off")
        if targetPageSize != TARGET_PAGE_SIZE or pageSizeSummary & (TARGET_PAGE_SIZE - 1):
            raise RemoteProtocolError(
                f"Postcopy needs matching target page sizes {targetPageSize:#x} "
                f"(summary {pageSizeSummary:#x})"
            )
        self.checkUserfaultfd()
        self.machine.advise()
        self.collectGarbage()

    def ramBlocksListed(self, blocks: Sequence[tuple[str, int, int | None]]) -> None:
        """
        RAM START listed the blocks: ask the VM for its RAMBlocks.

        @param blocks: (idstr, length, pageSize or None) each.
        """
        self.placer = PagePlacer(dict(self.vm.ramBlocksListed(blocks)))

    def _placer(self) -> PagePlacer:
        """
        @return: the placer.
        @raise RemoteProtocolError: a page arrived before RAM START.
        """
        if self.placer is None:
            raise RemoteProtocolError("RAM page before the RAM block list")
        return self.placer

    def page(self, idstr: str, offset: int, data: bytes | memoryview, channel: int = 0) -> None:
        """
        A PAGE record.

        @param idstr: the block.
        @param offset: byte offset.
        @param data: the page.
        @param channel: 0 for the main stream, 1 for the preempt channel.
        """
        placer = self.placer
        if placer is None:
            raise RemoteProtocolError("RAM page before the RAM block list")
        placer.page(idstr, offset, data, channel)

    def zero(self, idstr: str, offset: int, fill: int, channel: int = 0) -> None:
        """
        A ZERO record (one target page).

        @param idstr: the block.
        @param offset: byte offset.
        @param fill: the fill byte.
        @param channel: 0 for the main stream, 1 for the preempt channel.
        """
        self._placer().zero(idstr, offset, fill, TARGET_PAGE_SIZE, channel)

    def flush(self) -> None:
        """
        Place the pending run (the fault service wakes the faults it
        answers).  Called by the protocol after each chunk of received data.
        """
        if self.placer is not None:
            self.placer.flush()

    def discard(self, idstr: str, ranges: Sequence[tuple[int, int]]) -> None:
        """
        POSTCOPY_RAM_DISCARD.

        @param idstr: the block.
        @param ranges: (start, length) byte ranges.
        """
        self.machine.discard()
        for start, length in ranges:
            self._placer().discard(idstr, start, length)

    def records(self, idstr: str, records: Any) -> bool:
        """
        A run of CONTINUE records decoded in C.

        @param idstr: the block.
        @param records: a L{twisted_postcopy.wire.events.RAMRecordsReceived}.
        @return: whether they were taken in one go (else the caller gives
            them to L{page} and L{zero} one by one).
        """
        return self._placer().records(idstr, records)

    def listen(self) -> None:
        """
        POSTCOPY_LISTEN: start the fault service; pages now go through it.
        """
        self.machine.listen()
        self.encoder.reset()
        placer = self._placer()
        placer.flush()
        if self.faultServiceFactory is None:
            raise RemoteProtocolError("postcopy LISTEN but no fault service available")
        self.tuneGarbageCollector()
        self.faults = self.faultServiceFactory(dict(placer.blocks), self)
        placer.faults = self.faults

    def deviceState(self, raw: bytes) -> None:
        """
        Device sections (from the package or the precopy tail).

        @param raw: their exact wire bytes.
        """
        self.vm.deviceStateReceived(raw)

    def run(self) -> None:
        """
        POSTCOPY_RUN: the guest starts here.
        """
        self.machine.run()
        self.vm.run()

    def requestPage(self, block: str, offset: int) -> None:
        """
        The fault service wants a missing page: a REQ_PAGES on the return
        path, except while C{postcopy-paused} or C{postcopy-recover} (the
        request is held: at POSTCOPY_RESUME every awaited page is
        requested again, see L{IFaultService.rerequestPending}).

        @param block: the block idstr.
        @param offset: page-aligned byte offset.
        """
        status = self.machine.status.status
        if not self.machine.status.inProgress:
            _log.warn("page {block}:{offset:#x} wanted after the incoming migration ended",
                      block=block, offset=offset)
            return
        if status in (MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.POSTCOPY_RECOVER):
            return
        self.pageRequests += 1
        self.send(self.encoder.requestPages(block, offset, self._placer().blocks[block].pageSize))

    def eof(self) -> None:
        """
        EOF on the main stream (after the vmdesc in precopy): finish, or
        in postcopy with C{postcopy-preempt} wait for the preempt
        channel's EOS first (L{preemptEnded}), as QEMU 7.2's listen thread
        joins its preempt thread before the status becomes C{completed}.
        """
        self.machine.mainEOF()
        self.flush()
        if not self.machine.inPostcopy:
            self.vm.run()
        if self.machine.readyToComplete:
            self.complete()
        else:
            _log.info("main stream ended; waiting for the preempt channel's EOS")

    def preemptOpened(self) -> None:
        """
        A preempt channel was accepted: its EOS is awaited before a
        postcopy migration completes.
        """
        self.machine.preemptOpened()

    def preemptEnded(self) -> None:
        """
        The preempt channel's EOS arrived (its pages were placed before
        it): complete if the main stream already ended.

        @raise RemoteProtocolError: see L{complete}.
        """
        self.flush()
        machine = self.machine
        machine.preemptEnded()
        if machine.status.status in _LOADING and machine.readyToComplete:
            self.complete()

    def preemptLost(self, reason: BaseException) -> bool:
        """
        The preempt channel broke before its EOS.  While postcopy is
        RUNNING that is an I/O failure like the main channel's: the
        migration pauses (QEMU 7.2's main loop checks both channels' errors
        and pauses; the pause shuts both).  Before that, a migration still
        loading fails.

        @param reason: why (a L{RemoteProtocolError} naming the channel).
        @return: L{True} when the migration paused and the caller must
            shut the main channel too (its source then pauses as well).
        """
        machine = self.machine
        if not machine.status.inProgress or machine.status.status is MigrationStatus.POSTCOPY_PAUSED:
            return False
        if pausable(machine):
            pauseIncoming(self, reason)
            return True
        self.failed(reason)
        return False

    def complete(self) -> None:
        """
        Completion: the VM told, SHUT(0) sent, then status C{completed}
        (whose observers may close the main connection: SHUT is written
        before, so it is never lost under TLS).  In postcopy the fault
        service stops only once every page is placed: precopy holes and
        the pages the source never sent get zero pages first (as on a QEMU
        destination, whose RAM POSTCOPY_ADVISE emptied).
        """
        if self.faults is not None:
            self.flush()
            self._placer().checkComplete()
            self.faults.fillHoles()
            unsent = self.faults.fillUnsent()
            if unsent:
                _log.info("postcopy: {pages} page(s) the source never sent are zero pages", pages=unsent)
            self.faults.stop()
        self.vm.completed()
        if self.machine.returnPathOpen:
            self.send(self.encoder.shut(0))
        self.machine.complete()

    def failed(self, reason: BaseException | Failure) -> None:
        """
        Loading failed: status C{failed}, the fault service stopped, the VM
        told.

        @param reason: what went wrong.
        """
        if not self.machine.status.inProgress:
            return
        self.machine.fail()
        if self.faults is not None:
            self.faults.stop()
        self.vm.failed(reason)
