# -*- test-case-name: tests.test_guests_migration -*-
"""
A guest of ours as the migration engine sees it.

L{Guest} is the source (L{IOutgoingVM}): it owns the RAMBlocks, spawns the
worker processes attached in C{track} mode (userfaultfd C{WP_ASYNC} dirty
tracking), stops them at switchover and sends their device state as one
FULL section, idstr C{twisted-postcopy/<guest>}, instance 0, version 1,
payload C{be32 len} + blob (encoded by L{twisted_postcopy.wire}).

L{IncomingGuest} is the destination (L{IIncomingVM}): it checks the listed
blocks, creates them, and starts workers attached in C{fault} mode at
LISTEN (paused; their faults go to the fault service) through
L{IncomingGuest.faultServiceFactory}, or in C{plain} mode at the end of a
precopy-only migration; at C{run} each worker loads its state and runs.
"""

from __future__ import annotations

import json
from base64 import b64decode, b64encode
from typing import Any, Sequence

from attrs import field, frozen
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from twisted_postcopy.errors import GuestError, MigrationError
from twisted_postcopy.guests.host import GuestHost
from twisted_postcopy.interfaces import IDirtyTracker, IIncomingVM, IOutgoingVM
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.wire import StreamEncoder, decodeAll
from twisted_postcopy.wire.constants import OWN_SECTION_PREFIX

#: The built-in guests and their worker modules.
BUILTIN = {"stress": "twisted_postcopy.guests.stress", "kv": "twisted_postcopy.guests.kv"}

#: Our device section's id (QEMU's RAM section is 2).
SECTION_ID = 3

#: The machine name our guests put in the configuration section.
MACHINE = "twisted-postcopy"


@frozen
class GuestSpec:
    """
    What a guest is: the same on both sides of a migration.

    @ivar name: the guest name (a key of L{BUILTIN}, or any name with
        C{module}).
    @ivar workers: how many worker processes.
    @ivar blocks: (idstr, length) of each RAMBlock, in order.
    @ivar arguments: the workers' extra command-line arguments.
    @ivar module: the worker module (default: the built-in's).
    @ivar pageSize: the blocks' page size: 4096 (memfd), or 2 MiB for
        RAM on hugetlbfs (C{--hugepages}).
    """

    name: str
    workers: int = 1
    blocks: tuple[tuple[str, int], ...] = (("ram", 16 << 20),)
    arguments: tuple[str, ...] = ()
    module: str = field(default="")
    pageSize: int = 4096

    def makeBlock(self, idstr: str, length: int) -> RAMBlock:
        """
        @param idstr: a block of this guest.
        @param length: its length.
        @return: a new RAMBlock with this guest's page size (hugetlbfs for
            huge pages).
        """
        return RAMBlock(idstr, length, self.pageSize, "memfd" if self.pageSize == 4096 else "hugetlbfs")

    def workerModule(self) -> str:
        """
        @return: the module workers run.
        @raise GuestError: unknown guest and no module.
        """
        if self.module:
            return self.module
        if self.name not in BUILTIN:
            raise GuestError(f"unknown guest {self.name!r}; built-in guests: {sorted(BUILTIN)}")
        return BUILTIN[self.name]


def encodeDeviceState(guest: str, states: dict[str, bytes]) -> bytes:
    """
    @param guest: the guest name.
    @param states: worker name -> its device state.
    @return: our FULL section holding them all.
    """
    blob = json.dumps({name: b64encode(state).decode() for name, state in sorted(states.items())}).encode()
    return StreamEncoder().ownDeviceSection(SECTION_ID, guest, blob)


def decodeDeviceState(guest: str, raw: bytes) -> dict[str, bytes] | None:
    """
    @param guest: the guest name.
    @param raw: device sections' wire bytes.
    @return: worker name -> device state, or L{None} if no section of
        C{guest} is in C{raw}.
    @raise GuestError: our section is malformed or names another guest.
    """
    idstr = OWN_SECTION_PREFIX + guest
    try:
        for event in decodeAll(raw, header=False):
            if getattr(event, "idstr", None) == idstr and getattr(event, "payload", None) is not None:
                fields = json.loads(bytes(event.payload)[4:])
                return {str(name): b64decode(state) for name, state in fields.items()}
            if getattr(event, "idstr", "").startswith(OWN_SECTION_PREFIX):
                raise GuestError(f"device section {event.idstr} is not for guest {guest}")
    except (ValueError, AttributeError, TypeError) as error:
        raise GuestError(f"malformed device state of guest {guest}: {error}") from None
    return None


@implementer(IDirtyTracker)
class _SessionTracker:
    """
    The guest's dirty tracker as each migration sees it: the engine's
    C{stop} must not end tracking, a later migration (after a failed one)
    needs the same processes.

    @ivar tracker: the L{twisted_postcopy.ram.dirty.DirtyTracker}.
    """

    def __init__(self, tracker: Any) -> None:
        """
        @param tracker: the real tracker.
        """
        self.tracker = tracker

    def start(self) -> None:
        """
        Everything is clean from now on.
        """
        self.tracker.start()

    def sync(self) -> dict[str, list[tuple[int, int]]]:
        """
        @return: the ranges written since the previous call.
        """
        return self.tracker.sync()

    def stop(self) -> None:
        """
        The migration ended; tracking continues until the guest closes.
        """


@implementer(IOutgoingVM)
class Guest:
    """
    A running guest on the source.

    @ivar spec: what it is.
    @ivar blocks: its RAMBlocks.
    @ivar host: its worker processes.
    @ivar dirtyTracker: WP_ASYNC tracking of the workers.
    """

    machine = MACHINE

    def __init__(self, reactor: Any, spec: GuestSpec, socketPath: str, access: Any = None) -> None:
        """
        Create the blocks and spawn the workers (tracked).

        @param reactor: the reactor.
        @param spec: the guest.
        @param socketPath: the attach socket to listen on.
        @param access: its L{twisted_postcopy.guests.host.AttachAccess},
            or L{None} (spawned workers only).
        @raise DirtyTrackingUnavailableError: the kernel cannot track.
        """
        from twisted_postcopy.ram.dirty import DirtyTracker

        self.spec = spec
        self.blocks = [spec.makeBlock(idstr, length) for idstr, length in spec.blocks]
        tracker = DirtyTracker(self.blocks)
        self.dirtyTracker = _SessionTracker(tracker)
        self.host = GuestHost(reactor, socketPath, self.blocks, "track", dirtyTracker=tracker,
                              access=access)
        self.host.spawn(spec.workerModule(), spec.name, spec.workers, list(spec.arguments))

    def start(self) -> Deferred:
        """
        @return: a new Deferred firing once every worker attached and
            answered C{running} (its C{called} stays false until then; a
            guest still initialising its memory would otherwise be stopped
            for switchover behind its first C{run}, and its start counted
            as downtime).
        """
        running: Deferred = Deferred()
        self.host.whenAttached().addCallback(lambda _: self.host.run()).chainDeferred(running)
        return running

    def stop(self) -> Deferred:
        """
        @return: a Deferred firing once no worker can write any more.
        """
        return self.host.stop()

    def deviceState(self) -> Deferred:
        """
        @return: a Deferred firing with our device section's bytes.
        """
        return self.host.save().addCallback(lambda states: encodeDeviceState(self.spec.name, states))

    def resume(self) -> Deferred:
        """
        @return: a Deferred firing once the workers run again.
        """
        return self.host.run()

    def close(self) -> Deferred:
        """
        Kill the workers and release the blocks.

        @return: a Deferred firing when done.
        """
        return self.host.kill().addCallback(lambda _: _closeBlocks(self.blocks))


def _closeBlocks(blocks: Sequence[RAMBlock]) -> None:
    """
    @param blocks: blocks to close.
    """
    for block in blocks:
        block.close()


@implementer(IIncomingVM)
class IncomingGuest:
    """
    A guest arriving on the destination.

    @ivar spec: what it must be.
    @ivar blocks: idstr -> RAMBlock once listed.
    @ivar host: its worker processes once started.
    @ivar states: worker name -> device state once received.
    @ivar autoRun: whether C{run} runs the workers (or only loads them).
    @ivar running: fires once the workers loaded their state (and run).
    @ivar done: fires on completion, fails on failure.
    @ivar vcpuThreads: the native ids of the worker threads that touch
        guest RAM, as the workers report them (a live list: it grows as
        they run; C{postcopy-blocktime} counts them as vCPUs).
    """

    def __init__(self, reactor: Any, spec: GuestSpec, socketPath: str, autoRun: bool = True,
                 access: Any = None) -> None:
        """
        @param reactor: the reactor.
        @param spec: the guest expected.
        @param socketPath: the attach socket to listen on.
        @param access: its L{twisted_postcopy.guests.host.AttachAccess},
            or L{None} (spawned workers only).
        @param autoRun: run the workers at C{run}; when false they only
            load their state (and wait for C{host.run()}).
        """
        self.reactor, self.spec, self.socketPath, self.autoRun = reactor, spec, socketPath, autoRun
        self.access = access
        self.blocks: dict[str, RAMBlock] = {}
        self.host: GuestHost | None = None
        self.states: dict[str, bytes] | None = None
        self.running: Deferred = Deferred()
        self.done: Deferred = Deferred()
        self.vcpuThreads: list[int] = []

    def ramBlocksListed(self, blocks: Any) -> dict[str, RAMBlock]:
        """
        @param blocks: (idstr, length, pageSize or None) each.
        @return: idstr -> new RAMBlock.
        @raise MigrationError: they are not this guest's blocks.
        """
        listed = [(idstr, length) for idstr, length, _ in blocks]
        if listed != list(self.spec.blocks):
            raise MigrationError(f"guest {self.spec.name} has blocks {list(self.spec.blocks)}, "
                                 f"the source listed {listed}")
        for idstr, _, pageSize in blocks:
            if (pageSize or 4096) != self.spec.pageSize and pageSize is not None:
                raise MigrationError(f"guest {self.spec.name}: block {idstr} has page size {pageSize} at the "
                                     f"source, {self.spec.pageSize} here (start both sides with the same "
                                     "--hugepages)")
        self.blocks = {idstr: self.spec.makeBlock(idstr, length) for idstr, length in listed}
        return dict(self.blocks)

    def _startWorkers(self, mode: str, faultService: Any = None) -> None:
        """
        @param mode: C{fault} or C{plain}.
        @param faultService: for C{fault}.
        """
        self.host = GuestHost(self.reactor, self.socketPath, list(self.blocks.values()), mode,
                              faultService=faultService, threads=self.vcpuThreads, access=self.access)
        self.host.spawn(self.spec.workerModule(), self.spec.name, self.spec.workers, list(self.spec.arguments))

    def faultServiceFactory(self, blocks: dict[str, Any], pageSource: Any) -> Any:
        """
        The engine's fault service factory: at LISTEN, start the fault
        service and the workers (paused) attached to it.

        @param blocks: idstr -> RAMBlock.
        @param pageSource: the return path.
        @return: the L{twisted_postcopy.ram.faults.FaultService}.
        """
        from twisted_postcopy.ram.faults import FaultService

        service = FaultService(self.reactor, pageSource, blocks)
        self._startWorkers("fault", service)
        return service

    def deviceStateReceived(self, raw: bytes) -> None:
        """
        @param raw: device sections; ours are kept, others ignored.
        @raise GuestError: our section is malformed.
        """
        states = decodeDeviceState(self.spec.name, bytes(raw))
        if states is not None:
            self.states = states

    def run(self) -> None:
        """
        Start the workers with the source's state (spawning them now after
        a precopy-only migration); L{running} fires once they run.
        """
        if self.host is None:
            self._startWorkers("plain")
        host = self.host
        assert host is not None
        started = host.whenAttached()
        started.addCallback(lambda _: host.load(self.states or {}))
        if self.autoRun:
            started.addCallback(lambda _: host.run())
        started.chainDeferred(self.running)

    def completed(self) -> None:
        """
        Every page arrived.
        """
        if not self.done.called:
            self.done.callback(None)

    def failed(self, reason: Any) -> None:
        """
        The migration failed: kill the workers.

        @param reason: why.
        """
        if self.host is not None:
            self.host.kill()
        if not self.done.called:
            self.done.errback(GuestError(f"incoming guest {self.spec.name} failed: {reason}"))

    def close(self) -> Deferred:
        """
        Kill the workers and release the blocks.

        @return: a Deferred firing when done.
        """
        killed = self.host.kill() if self.host is not None else maybeDeferred(lambda: None)
        return killed.addCallback(lambda _: _closeBlocks(list(self.blocks.values())))
