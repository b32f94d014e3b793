# -*- test-case-name: tests.test_migration_loopback -*-
"""
An incoming test VM whose guest is a real process on the production fault
service, for integration tests and benchmarks.

L{WorkerGuestVM} creates production RAMBlocks
(L{twisted_postcopy.testing.enginevm.IncomingTestVM}) and, as soon as RAM
START listed them, starts a guest worker process
(L{twisted_postcopy.ram.guestworker}) that maps them and registers its own
userfaultfd (as a guest process attaches to the daemon before it runs).
At LISTEN it builds the production L{twisted_postcopy.ram.faults.FaultService}
(pass L{WorkerGuestVM.faultServiceFactory} to the
L{twisted_postcopy.manager.MigrationManager}) and attaches the worker to
it.  At POSTCOPY_RUN the worker reads every page of every block (faulting
on the missing ones) and reports a SHA-256 digest per block.  No
stand-in: what runs is what ships.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from twisted_postcopy.testing.enginevm import IncomingTestVM


class WorkerGuestVM(IncomingTestVM):
    """
    An incoming VM whose guest worker reads all of its RAM.

    @ivar reactor: the reactor the worker and the fault service run on.
    @ivar threads: touching threads per block (0: the worker's main thread,
        registered in L{vcpuThreads} for C{postcopy-blocktime}).
    @ivar passes: the guest reads each block in this many passes, pass
        C{k} touching pages C{k, k + passes, ...} (1: in order; more
        spreads the first faults over all of RAM).
    @ivar service: the fault service, once LISTEN created it.
    @ivar worker: the L{twisted_postcopy.ram.guestworker.WorkerProcess}
        once RAM START listed the blocks.
    @ivar vcpuThreads: thread ids that touch guest RAM (for blocktime).
    @ivar gate: if set, a Deferred the guest waits for after POSTCOPY_RUN
        before it reads (e.g. until a preempt channel is up).
    @ivar onRun: if set, called with no arguments when POSTCOPY_RUN is
        handled, before anything after it in the stream (e.g. to pause the
        main channel there).
    @ivar ready: fires once the worker mapped the blocks and registered
        its userfaultfd (so a test can switch to postcopy knowing the guest
        will touch its RAM as soon as it runs).
    @ivar done: fires with the per-block digests (list order) once the
        worker read everything (and exited), or fails with its error.
    @ivar touchFirst: page indexes in the largest block (negative: from
        its end) that the worker touches one by one, in this order, before
        anything else; or L{None}.
    @ivar touchedFirst: fires with the worker's answer once those pages
        are in (a test that throttled the background stream so that it
        cannot reach them knows each of them was requested and served,
        and may then lift the throttle).
    """

    def __init__(self, reactor: Any, threads: int = 0, touchFirst: Sequence[int] | None = None,
                 passes: int = 1) -> None:
        """
        @param reactor: an C{IReactorProcess} and C{IReactorFDSet}.
        @param threads: see L{threads}.
        @param touchFirst: see L{touchFirst}.
        @param passes: see L{passes}.
        """
        super().__init__()
        self.reactor = reactor
        self.threads = threads
        self.touchFirst = touchFirst
        self.touchedFirst: Deferred = Deferred()
        self.passes = passes
        self.gate: Deferred | None = None
        self.onRun: Callable[[], object] | None = None
        self.service: Any = None
        self.worker: Any = None
        self.vcpuThreads: list[int] = []
        self.ready: Deferred = Deferred()
        self.done: Deferred = Deferred()

    def ramBlocksListed(self, blocks: Any) -> dict[str, Any]:
        """
        Create the blocks and start the guest worker over them.

        @param blocks: (idstr, length, pageSize) each.
        @return: idstr -> RAMBlock.
        """
        from twisted_postcopy.ram.guestworker import spawnWorker

        listed = super().ramBlocksListed(blocks)
        self.worker = spawnWorker(self.reactor, None, list(listed.values()))
        self.worker.ready.addCallback(self._ready).chainDeferred(self.ready)
        return listed

    def _ready(self, tid: int) -> None:
        """
        The worker is ready: its main thread is a vCPU.

        @param tid: its main thread id.
        """
        if self.threads == 0:
            self.vcpuThreads.append(tid)

    def faultServiceFactory(self, blocks: dict[str, Any], pageSource: Any) -> Any:
        """
        The production fault service over the blocks (what the daemon
        runs); the guest worker is attached to it.

        @param blocks: idstr -> RAMBlock.
        @param pageSource: the incoming migration.
        @return: the L{twisted_postcopy.ram.faults.FaultService}.
        """
        from twisted_postcopy.ram.faults import FaultService

        self.service = FaultService(self.reactor, pageSource, blocks)
        self.worker.attachTo(self.service)
        return self.service

    def run(self) -> None:
        """
        The guest starts here: the worker reads its RAM (or, after a
        precopy migration, with nothing left to fault on, the blocks are
        digested with C{pread} and the worker exits).
        """
        if self.onRun is not None:
            self.onRun()
        super().run()
        if self.service is None:
            digests = [hashlib.sha256(data).hexdigest() for data in self.contents().values()]
            self._stopWorker().addCallback(lambda _: digests).chainDeferred(self.done)
            return
        self._readAll().chainDeferred(self.done)

    def failed(self, reason: Any) -> None:
        """
        The migration failed: the worker is killed (its faults would never
        be answered), L{done} fails.

        @param reason: why.
        """
        super().failed(reason)
        if self.worker is not None and not self.worker.ended.called:
            self.worker.transport.signalProcess("KILL")
        if not self.done.called:
            self.done.errback(RuntimeError(f"incoming migration failed: {reason}"))
        self._touchFailed(RuntimeError(f"incoming migration failed: {reason}"))

    def _touchFailed(self, error: BaseException) -> None:
        """
        Fail L{touchedFirst} if it is awaited (L{touchFirst} given) and
        pending.

        @param error: why.
        """
        if self.touchFirst is not None and not self.touchedFirst.called:
            self.touchedFirst.errback(error)

    def close(self) -> Deferred:
        """
        Kill the worker if it still runs (a test's cleanup) and close the
        blocks.

        @return: a Deferred firing once the worker ended.
        """
        worker = self.worker
        ended: Deferred = succeed(None)
        if worker is not None and not worker.ended.called:
            for waiting in (worker.ready, worker.attached, self.done):
                if not waiting.called:
                    waiting.addErrback(lambda failure: None)
            worker.transport.signalProcess("KILL")
            ended = Deferred()
            worker.ended.addBoth(lambda _: ended.callback(None))
        return ended.addCallback(lambda _: [block.close() for block in self.blocks.values()])

    def _stopWorker(self) -> Deferred:
        """
        Let a worker that is never attached exit.

        @return: a Deferred firing once it ended.
        """
        if self.worker is None or self.worker.ended.called:
            return succeed(None)
        self.worker.attached.addErrback(lambda failure: None)
        return self.worker.exit()

    @inlineCallbacks
    def _readAll(self) -> Any:
        """
        Once the worker is attached, read every page of every block and
        digest them.

        @return: a Deferred firing with the digests.
        """
        blocks = list(self.blocks.values())
        worker = self.worker
        yield worker.attached
        if self.gate is not None:
            yield self.gate
        try:
            if self.touchFirst is not None:
                try:
                    index = max(range(len(blocks)), key=lambda i: blocks[i].length)
                    pages = blocks[index].length // blocks[index].pageSize
                    answers = []
                    for page in self.touchFirst:
                        answer = yield worker.command(op="touch", block=index, first=page % pages, count=1,
                                                      threads=self.threads)
                        answers.append(answer)
                except BaseException as error:
                    self._touchFailed(error)
                    raise
                self.touchedFirst.callback(answers)
            for index, block in enumerate(blocks):
                pages = block.length // block.pageSize
                for first in range(min(self.passes, pages)):
                    yield worker.command(op="touch", block=index, first=first,
                                         count=len(range(first, pages, self.passes)), stride=self.passes,
                                         threads=self.threads)
            digests = []
            for index in range(len(blocks)):
                answer = yield worker.command(op="digest", block=index)
                digests.append(answer["digest"])
        finally:
            yield worker.exit()
        return digests
