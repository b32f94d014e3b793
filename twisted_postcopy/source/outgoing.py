# -*- test-case-name: tests.test_source_outgoing -*-
"""
The outgoing migration: QEMU 7.2's source sequence (migration-stream.md
section 5, return-path-preempt-recovery.md sections 1-2), without sockets.

The protocol calls L{OutgoingMigration.start} once connected, then
L{OutgoingMigration.step} repeatedly while its transport accepts data;
each step writes one RAM PART (or the switchover, or the completion) through
C{write} and says when to call again.  Return-path messages come back
through L{OutgoingMigration.shut}, L{OutgoingMigration.pong} and
L{OutgoingMigration.pagesRequested}.
"""

from __future__ import annotations

import operator
from enum import Enum
from functools import reduce
from typing import Any, Callable, Protocol

from attrs import define, field
from twisted.internet.defer import maybeDeferred

from twisted_postcopy.errors import MigrationFailed
from twisted_postcopy.wire import StreamEncoder
from twisted_postcopy.wire.ram import blockListFor
from twisted_postcopy.wire.constants import RAM_SECTION_ID, SectionType
from twisted_postcopy.state import MigrationStatus as S, StatusMachine, outgoingMachine
from twisted_postcopy.source.prefetch import skipKnownZero
from twisted_postcopy.source.records import RecordWriter
from twisted_postcopy.wire.ram import RAMRecordEncoder
from twisted_postcopy.source.sender import PageScheduler, RateLimiter, converged
from twisted_postcopy.source.stats import TransferStats

#: Target bytes of page data per PART written in one step, in precopy and
#: postcopy alike.  (Postcopy without preempt used 128 KiB PARTs so that a
#: requested page waited behind less data; but nearly every request then
#: names a page already written, and the shorter steps slowed the stream
#: the guest waits on: docs/engine.md.)
BATCH = 1 << 20
#: The most bytes of one run of requested pages on the preempt channel.
POSTCOPY_BATCH = 1 << 17
VMDESC = b'{"page_size": 4096, "devices": []}'
#: Seconds between steps while waiting for the VM to stop.
STOP_POLL = 0.002
#: Returned by L{OutgoingMigration.step} when nothing more will be written.
DONE = -1.0
#: Element encoders; pages are written by L{RecordWriter}, so its CONTINUE
#: memory is not used.
_wire = StreamEncoder()


class MainChannel(Protocol):
    """
    What an L{OutgoingMigration} writes its main stream to and tells what
    happened: the main connection's protocol
    (L{twisted_postcopy.protocols.stream.SourceProtocol}) attaches itself
    with L{OutgoingMigration.attachChannel}, a recovery's new connection
    replaces it, and a pause detaches it (writes are then dropped).
    """

    transport: Any

    def writeBuffers(self, buffers: list[Any]) -> None:
        """
        @param buffers: bytes and views of guest RAM, in order.
        """

    def finished(self) -> None:
        """
        The migration reached a final status: close.
        """

    def postcopyStarted(self) -> None:
        """
        The package is written: requested pages should not queue behind
        megabytes of background pages.
        """

    def wake(self) -> None:
        """
        Step at once: a page request was queued, the stopped VM's device
        state is ready, or the preempt channel connected.
        """

    def preemptBroken(self) -> None:
        """
        The preempt channel broke in postcopy: drop the main connection
        too, so the migration pauses.
        """


@define
class WriteChannel:
    """
    A L{MainChannel} over one C{write} callable (the engine's C{write}
    argument, for units without a protocol): buffers are joined, the
    notifications do nothing.

    @ivar write: writes bytes.
    """

    write: Callable[[bytes], None]

    @property
    def transport(self) -> Any:
        """
        The object whose bound method C{write} is, if any.
        """
        return getattr(self.write, "__self__", None)

    def writeBuffers(self, buffers: list[Any]) -> None:
        """
        @param buffers: joined and written.
        """
        self.write(b"".join(buffers))

    def finished(self) -> None:
        """
        Nothing to close.
        """

    def postcopyStarted(self) -> None:
        """
        Nothing to tune.
        """

    def wake(self) -> None:
        """
        Nothing to schedule.
        """

    def preemptBroken(self) -> None:
        """
        Nothing to drop.
        """


class _Detached(WriteChannel):
    """
    No main channel (paused): writes are dropped (the destination's
    received bitmaps tell a recovery what to send again).
    """


#: The null main channel of a paused migration.
DETACHED = _Detached(lambda data: None)


class SourcePhase(Enum):
    """
    Where an outgoing migration's main stream is, beside its QEMU status
    (which it refines): QEMU's iteration loop, the stop for
    C{migration_completion} or for C{postcopy_start}, postcopy, and the
    end of the stream.

    @cvar PRECOPY: iterating while the VM runs (status C{active}).
    @cvar STOPPING_FOR_COMPLETION: converged: the VM is stopping; then one
        END section with everything left, the devices and EOF.
    @cvar STOPPING_FOR_POSTCOPY: C{migrate-start-postcopy} was acted on:
        the VM is stopping; then the discards and the package.
    @cvar POSTCOPY: the package is written; background and requested
        pages flow (also while paused and recovering).
    @cvar WRITTEN: everything is written; completion waits for SHUT(0)
        when the return path is open.
    """

    PRECOPY = "precopy"
    STOPPING_FOR_COMPLETION = "stopping-for-completion"
    STOPPING_FOR_POSTCOPY = "stopping-for-postcopy"
    POSTCOPY = "postcopy"
    WRITTEN = "written"


class PreemptPhase(Enum):
    """
    The postcopy preempt channel of an outgoing migration (capability
    C{postcopy-preempt}, return-path-preempt-recovery.md section 3).

    @cvar OFF: no preempt channel (capability off, not connected yet, or
        dropped when the migration paused).
    @cvar CONNECTING: its connection is being made (after the main one,
        and again after each new main connection of a recovery).
    @cvar READY: connected: urgent pages are written there.
    @cvar FAILED: its connect failed or it broke; the switch to postcopy
        fails, a recovery waits for the next C{migrate} with C{resume}.
    @cvar ENDED: its EOS was written after the main channel's EOF.
    """

    OFF = "off"
    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"
    ENDED = "ended"


@define
class OutgoingMigration:
    """
    One outgoing migration.

    @ivar vm: the L{twisted_postcopy.interfaces.IOutgoingVM}.
    @ivar write: writes bytes to the main channel when no L{channel} is
        given (units), or L{None}.
    @ivar channel: the L{MainChannel} attached, or L{None} (nothing
        connected yet, or paused: writes are dropped).
    @ivar now: the clock (seconds).
    @ivar capabilities: the source's capabilities.
    @ivar parameters: the source's parameters (live; read at each step).
    @ivar machine: the source's status machine.
    @ivar stats: counters for C{query-migrate}.
    @ivar scheduler: the dirty maps and page queue.
    @ivar limiter: the rate limiter of the main channel.
    @ivar records: encodes RAM records from the blocks' memory.
    @ivar postcopyRequested: C{migrate-start-postcopy} was issued.
    @ivar returnPathOpen: OPEN_RETURN_PATH was sent.
    @ivar stopped: the VM was stopped by this migration.
    @ivar phase: the main stream's L{SourcePhase}.
    @ivar shutValue: the destination's SHUT value, if it arrived.
    @ivar destinationRunning: PONG 3 arrived: the destination loaded the
        package up to POSTCOPY_RUN, so its guest may run (see
        L{packageLoaded}).
    @ivar resumed: a recovery resumed this migration (RESUME_ACK).
    @ivar tracking: whether the dirty tracker runs.
    @ivar device: the device state, once the VM stopped and gave it.
    @ivar onPass: called with the dirty sync count after each dirty sync
        (QEMU's C{MIGRATION_PASS} event).
    @ivar preemptPhase: the preempt channel's L{PreemptPhase}.
    @ivar preemptError: why the preempt channel failed, if it did.
    @ivar writePreempt: writes a list of buffers to the preempt channel
        while it is L{PreemptPhase.READY}.
    @ivar preemptRecords: encodes the preempt channel's RAM records (every
        record names its block, as QEMU 7.2's effectively do).
    """

    vm: Any
    write: Callable[[bytes], None]
    now: Callable[[], float]
    capabilities: dict[str, bool]
    parameters: dict[str, int]
    machine: StatusMachine = field(factory=outgoingMachine)
    stats: TransferStats = field(init=False)
    scheduler: PageScheduler = field(init=False)
    limiter: RateLimiter = field(init=False)
    records: RecordWriter = field(init=False)
    postcopyRequested: bool = False
    returnPathOpen: bool = False
    stopped: bool = False
    phase: SourcePhase = SourcePhase.PRECOPY
    shutValue: int | None = None
    destinationRunning: bool = False
    resumed: bool = False
    tracking: bool = False
    device: bytes | None = None
    onPass: Callable[[int], object] = lambda count: None
    channel: MainChannel | None = None
    preemptPhase: PreemptPhase = PreemptPhase.OFF
    preemptError: str | None = None
    writePreempt: Callable[[list[Any]], None] | None = None
    preemptRecords: RecordWriter = field(init=False)

    def __attrs_post_init__(self) -> None:
        """
        Build the dirty maps and counters; a C{write} callable without a
        channel becomes a L{WriteChannel}.
        """
        if self.channel is None and self.write is not None:
            self.channel = WriteChannel(self.write)
        blocks = [(b.idstr, b.length, b.pageSize) for b in self.vm.blocks]
        self.scheduler = PageScheduler.forBlocks(blocks, self.parameters)
        self.stats = TransferStats(self.now, sum(b.length for b in self.vm.blocks),
                                   pageSize=max((b.pageSize for b in self.vm.blocks), default=4096))
        self.limiter = RateLimiter(self.now, self.parameters["max-bandwidth"])
        views = {b.idstr: b.view() for b in self.vm.blocks}
        self.records = RecordWriter(views, self.stats)
        self.preemptRecords = RecordWriter(views, self.stats, RAMRecordEncoder(alwaysNameBlock=True))

    @property
    def written(self) -> bool:
        """
        Whether everything was written (L{SourcePhase.WRITTEN}).
        """
        return self.phase is SourcePhase.WRITTEN

    @property
    def _out(self) -> MainChannel:
        """
        The attached main channel, or L{DETACHED}.
        """
        return self.channel or DETACHED

    def attachChannel(self, channel: MainChannel) -> None:
        """
        A connection becomes the main channel (the first one, or a
        recovery's new one, replacing the old).

        @param channel: it.
        """
        self.channel = channel

    def detachChannel(self) -> None:
        """
        The main channel is gone (the migration pauses): writes are
        dropped until a recovery attaches a new one.
        """
        self.channel = None

    def begin(self) -> None:
        """
        C{migrate} was called: status C{setup}.
        """
        self.machine.moveTo(S.SETUP)
        self.stats.began()

    def start(self) -> None:
        """
        Connected: header, return path, ADVISE, RAM START; status C{active}.
        """
        postcopy = self.capabilities.get("postcopy-ram", False)
        out = [_wire.header(self.vm.machine, configuration=getattr(self.vm, "configuration", None))]
        if postcopy or self.capabilities.get("return-path", False):
            self.returnPathOpen = True
            out += [_wire.openReturnPath(), _wire.ping(1)]
        if postcopy:
            summary = reduce(operator.or_, (b.pageSize for b in self.vm.blocks), 0)
            out.append(_wire.postcopyAdvise(summary, 4096))
        out.append(_wire.ramStart(RAM_SECTION_ID, blockListFor(self.vm.blocks, postcopy)))
        if postcopy and skipKnownZero(self.parameters) and hasattr(self.vm, "knownZero"):
            for idstr, offset, length in self.vm.knownZero():
                self.scheduler.skipZero(idstr, offset, length)
        self._sendBuffers(out)
        if self.vm.dirtyTracker is not None:
            self.vm.dirtyTracker.start()
            self.tracking = True
        self.stats.setupDone()
        self.machine.moveTo(S.ACTIVE)

    def _sendBuffers(self, buffers: list[Any]) -> None:
        """
        Write gathered buffers (bytes and views of guest RAM) and count them.

        @param buffers: the buffers, in order.
        """
        size = sum(map(len, buffers))
        self._out.writeBuffers(buffers)
        self.limiter.account(size)
        self.stats.sent(size, self.machine.status, self.stopped)

    def _part(self) -> bool:
        """
        Write one PART with urgent pages first, then background pages until
        the batch or the rate budget is used up.

        @return: whether dirty pages remain.
        """
        out: list[Any] = [_wire.sectionHeader(SectionType.SECTION_PART, RAM_SECTION_ID)]
        self.records.gather(self.scheduler, out, min(BATCH, self.limiter.allowance()), BATCH)
        out += [_wire.eos(), _wire.sectionFooter(RAM_SECTION_ID)]
        self._sendBuffers(out)
        return self.scheduler.remainingBytes > 0

    def step(self) -> float:
        """
        Write the next piece.

        @return: seconds to wait before the next step (0: at once), or
            L{DONE}.
        """
        status = self.machine.status
        if self.written or status not in (S.ACTIVE, S.POSTCOPY_ACTIVE):
            return DONE
        if status == S.ACTIVE:
            self.limiter.bandwidth = self.parameters["max-bandwidth"]
        if self.limiter.limited() and not self.scheduler.queue and not self.stopped:
            return self.limiter.delay()
        if status == S.POSTCOPY_ACTIVE:
            return self._postcopyStep()
        if self.phase is SourcePhase.PRECOPY:
            if self.postcopyRequested:
                self._stopVM(SourcePhase.STOPPING_FOR_POSTCOPY)
            elif self._converged():
                self._sync()
                if self._converged():
                    self._stopVM(SourcePhase.STOPPING_FOR_COMPLETION)
        if self.phase is SourcePhase.PRECOPY:
            self._part()
            return 0.0
        if self.device is None:
            return STOP_POLL
        if self.phase is SourcePhase.STOPPING_FOR_POSTCOPY:
            if not self._preemptReadyForPostcopy():
                return STOP_POLL if self.machine.inProgress else DONE
            self._switchover()
            return 0.0
        return self._completePrecopy()

    def _converged(self) -> bool:
        """
        QEMU's test: the dirty bytes left fit in C{downtime-limit} at the
        measured bandwidth.  It is made twice, before and after a dirty
        sync, so the VM stops only if the guest's latest writes fit too.

        @return: whether the precopy phase may end.
        """
        return converged(self.scheduler.remainingBytes, self.stats.bandwidth(),
                         self.parameters["downtime-limit"])

    def _sync(self) -> None:
        """
        A dirty sync: pages written since the last one become dirty again.
        """
        self.stats.dirtySyncCount += 1
        self.onPass(self.stats.dirtySyncCount)
        tracker = self.vm.dirtyTracker
        if tracker is None:
            return
        for idstr, ranges in tracker.sync().items():
            for offset, length in ranges:
                self.scheduler.markDirty(idstr, offset, length)

    def _stopVM(self, phase: SourcePhase) -> None:
        """
        Stop the guest for switchover; once it is stopped (C{stop()} may
        return a Deferred), collect its last writes and its device state
        (which may also come as a Deferred) into L{device}.

        @param phase: the stopping phase entered.
        """
        self.phase = phase
        self.stats.stopping()

        def stopped(_: object) -> Any:
            """
            The VM stopped: sync dirty pages, then ask for the device state.
            """
            if not self.machine.inProgress:
                self.vm.resume()
                return None
            self.stopped = True
            self._sync()
            return maybeDeferred(self.vm.deviceState)

        def collected(device: bytes) -> None:
            """
            @param device: the device state, now ready to send.
            """
            self.device = device
            self._out.wake()

        stopping = maybeDeferred(self.vm.stop).addCallback(stopped).addCallback(collected)
        stopping.addErrback(lambda failure: self.fail(failure.value))

    def _completePrecopy(self) -> float:
        """
        The VM is stopped: send everything left in one END section, then
        the devices, EOF and the vmdesc.  Not rate limited, as in QEMU.
        (Writing the END a batch per step, to overlap encoding and sending,
        was measured slower: bench/migrate.py precopy downtime 265-307 ms
        against 144-179 ms in one step.)

        @return: L{DONE}.
        """
        out: list[Any] = [_wire.sectionHeader(SectionType.SECTION_END, RAM_SECTION_ID)]
        self.records.gather(self.scheduler, out, float("inf"), BATCH)
        out += [_wire.eos(), _wire.sectionFooter(RAM_SECTION_ID), self.device,
                _wire.eof(), _wire.vmDescription(VMDESC)]
        self._sendBuffers(out)
        self._written()
        return DONE

    def _switchover(self) -> None:
        """
        The VM is stopped: enter postcopy, discard every dirty page, send
        the package and PING 4.
        """
        self.machine.moveTo(S.POSTCOPY_ACTIVE)
        if self.machine.status != S.POSTCOPY_ACTIVE:
            return
        out = [_wire.discard(name, ranges) for name, ranges in self.scheduler.discardCommands()]
        out += [_wire.ping(2), _wire.package(self.device), _wire.ping(4)]
        self._sendBuffers(out)
        self.phase = SourcePhase.POSTCOPY
        self.stopped = False
        self.stats.switchedOver()
        self.scheduler.restartScan()
        self.records.lastBlock = None
        self._out.postcopyStarted()
        self.limiter.bandwidth = self.parameters["max-postcopy-bandwidth"]

    def _postcopyStep(self) -> float:
        """
        One postcopy PART; END and EOF when nothing is left.

        @return: as L{step}.
        """
        self.limiter.bandwidth = self.parameters["max-postcopy-bandwidth"]
        if self._part():
            return 0.0
        if self._packagePending:
            return DONE
        self._sendBuffers([_wire.sectionHeader(SectionType.SECTION_END, RAM_SECTION_ID), _wire.eos(),
                           _wire.sectionFooter(RAM_SECTION_ID), _wire.eof()])
        self._endPreempt()
        self._written()
        return DONE

    @property
    def _packagePending(self) -> bool:
        """
        Whether END and EOF must wait for PONG 3 (L{pong} or a page
        request steps again): pages were left out as known zeros
        (C{x-skip-known-zero}) and the destination may still be loading
        the package.  A QEMU 7.2 destination loads it on its main thread,
        holding the BQL; a device whose load reads a left-out page waits
        there for it.  After EOF nothing more can be sent, so that page
        would never come: QEMU's migration would never end and its QMP
        would stop answering.  PONG 3 follows the devices in the package.
        After a recovery PONG 3 may have been lost with the old
        connection, so it is not waited for.
        """
        return (self.returnPathOpen and not self.destinationRunning and not self.resumed
                and self.scheduler.anySkipped)

    def _written(self) -> None:
        """
        Everything is written: complete now, or when SHUT arrives.
        """
        self.phase = SourcePhase.WRITTEN
        if not self.returnPathOpen or self.shutValue == 0:
            self._finish(S.COMPLETED)

    def _finish(self, status: S) -> None:
        """
        Enter a final status and tell the protocol.

        @param status: COMPLETED or FAILED.
        """
        if self.machine.moveIfPossible(status):
            self.stats.finished(status)
            self._out.finished()

    def shut(self, value: int) -> None:
        """
        SHUT from the destination.

        @param value: 0 for success.
        """
        self.shutValue = value
        if value:
            self.fail(MigrationFailed(f"RP: Sibling indicated error {value}"))
        elif self.written:
            self._finish(S.COMPLETED)

    def pong(self, value: int) -> None:
        """
        PONG from the destination (QEMU only traces it); PONG 3 answers the
        PING just before POSTCOPY_RUN in the package.

        @param value: the echoed ping value.
        """
        if value == 3:
            self.destinationRunning = True
            if self.phase is SourcePhase.POSTCOPY:
                self._out.wake()

    @property
    def packageLoaded(self) -> bool:
        """
        Whether the destination has the whole package, so that it may run
        the guest already (a lost connection then pauses the migration
        instead of failing it): PONG 3 came back, or a page request did.
        QEMU 7.2's destination, like ours, reads CMD_PACKAGED whole before
        the LISTEN in it starts the fault handling that asks for pages.

        A request can come from device loading, before PING 3, and a
        destination whose link dies then fails where one already past RUN
        pauses; which one it was is not known here.  Pausing is the safe
        guess: a wrong pause costs a wait (automatic recovery gives up at
        C{x-recover-deadline-ms}; C{migrate-cancel}), a wrong failure loses
        a guest that runs on the destination.
        """
        return self.destinationRunning or self.stats.postcopyRequests > 0

    def pagesRequested(self, idstr: str | None, start: int, length: int) -> None:
        """
        REQ_PAGES(_ID): count, validate, queue.

        @param idstr: the block, or None for the previous one.
        @param start: byte offset.
        @param length: byte length.
        @raise twisted_postcopy.source.sender.PageRequestError: bad request.
        """
        self.stats.postcopyRequests += 1
        self.scheduler.queueRequest(idstr, start, length, revive=not self.written)
        if not self.sendUrgent():
            self._out.wake()

    @property
    def preemptWanted(self) -> bool:
        """
        Whether this migration uses a preempt channel (C{postcopy-preempt}).
        """
        return bool(self.capabilities.get("postcopy-preempt", False))

    def preemptConnecting(self) -> None:
        """
        The protocol started connecting the preempt channel.
        """
        self.preemptPhase = PreemptPhase.CONNECTING
        self.writePreempt = None

    def preemptConnected(self, write: Callable[[list[Any]], None]) -> None:
        """
        The preempt channel is up: urgent pages go there from now on.

        @param write: writes buffers to it.
        """
        self.preemptPhase = PreemptPhase.READY
        self.preemptError = None
        self.writePreempt = write
        self.preemptRecords.lastBlock = None
        self._out.wake()

    def preemptFailed(self, reason: object) -> None:
        """
        The preempt channel could not connect, or broke.  Before postcopy
        the switchover will fail (as QEMU's C{postcopy_start} does); in
        postcopy the main connection is dropped too, so the migration
        pauses and a recovery makes both channels again.

        @param reason: why.
        """
        if self.preemptPhase == PreemptPhase.ENDED:
            return
        self.preemptPhase = PreemptPhase.FAILED
        self.preemptError = str(reason)
        self.writePreempt = None
        if self.machine.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
            self._out.preemptBroken()

    def preemptDropped(self) -> None:
        """
        The migration pauses: its preempt channel is dropped with the main
        one (a recovery connects a new one after the new main connection).
        """
        self.preemptPhase = PreemptPhase.OFF
        self.writePreempt = None

    def _preemptReadyForPostcopy(self) -> bool:
        """
        QEMU's C{postcopy_preempt_wait_channel} at C{postcopy_start}: the
        switch to postcopy waits for the preempt channel, and fails if it
        could not connect.

        @return: whether the switchover may go on now.
        """
        if not self.preemptWanted or self.preemptPhase == PreemptPhase.READY:
            return True
        if self.preemptPhase == PreemptPhase.FAILED:
            self.fail(MigrationFailed(f"postcopy preempt channel: {self.preemptError} (the destination "
                                      "needs the postcopy-preempt capability too)"))
        return False

    def sendUrgent(self) -> bool:
        """
        Write every queued page request to the preempt channel at once,
        one whole host page each, flushed (QEMU's C{ram_save_host_page}
        with C{postcopy_preempt_choose_channel}): they never wait behind
        the background stream of the main channel, nor for its rate limit
        (preempt bytes do not count against C{max-postcopy-bandwidth}).
        A page is handed out once (its dirty bit clears), so it never goes
        on both channels, and a host page never straddles them.  The main
        channel's next record names its block again, as QEMU's shared
        "last block" is cleared at each channel switch.

        @return: whether the preempt channel took the requests (else they
            stay queued for the main channel).
        """
        if self.preemptPhase != PreemptPhase.READY or self.machine.status != S.POSTCOPY_ACTIVE:
            return False
        out: list[Any] = []
        self.preemptRecords.gather(self.scheduler, out, 0, POSTCOPY_BATCH)
        if out:
            size = sum(map(len, out))
            self.writePreempt(out)
            self.stats.sent(size, self.machine.status, self.stopped)
            self.records.lastBlock = None
        return True

    def _endPreempt(self) -> None:
        """
        The main channel's EOF is written: end the preempt channel with one
        EOS record (QEMU's C{postcopy_preempt_shutdown_file}).
        """
        if self.preemptPhase == PreemptPhase.READY:
            self.writePreempt([_wire.eos()])
            self.preemptPhase = PreemptPhase.ENDED

    def fail(self, reason: BaseException) -> None:
        """
        The migration failed: a guest still on the source runs again.

        @param reason: why.
        """
        if not self.machine.inProgress:
            return
        self.stats.error = str(reason)
        if self.machine.status != S.POSTCOPY_ACTIVE:
            self._resumeVM()
        self.machine.moveIfPossible(S.FAILED)
        self.stats.finished(S.FAILED)
        self._out.finished()

    def _resumeVM(self) -> None:
        """
        Let the guest run on the source again.
        """
        self.vm.resume()
        self.stopped = False
        if self.tracking:
            self.tracking = False
            self.vm.dirtyTracker.stop()

    def cancel(self) -> None:
        """
        C{migrate-cancel}: cancelling then cancelled; before postcopy the
        guest keeps (or resumes) running on the source.
        """
        if not self.machine.inProgress or self.machine.status == S.CANCELLING:
            return
        inPostcopy = self.machine.status == S.POSTCOPY_ACTIVE
        self.machine.moveTo(S.CANCELLING)
        if not inPostcopy:
            self._resumeVM()
        self.machine.moveTo(S.CANCELLED)
        self._out.finished()
