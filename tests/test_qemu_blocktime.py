# -*- test-case-name: tests.test_qemu_blocktime -*-
"""
Postcopy blocktime on our destination with a real QEMU 7.2 source (TCG):
the figure C{query-migrate} reports is QEMU's algorithm
(L{twisted_postcopy.blocktime.BlocktimeContext}) computed on the fault trace
the production fault service really saw, and it is bounded by what the
guest experienced.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_postcopy.blocktime import BlocktimeContext
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.ram.guestworker import spawnWorker
from twisted_postcopy.testing.enginevm import IncomingTestVM
from twisted_postcopy.testing.qemu import requireQEMU, startBootedQEMU
from twisted_postcopy.testing.real import requireUserfaultfd
from twisted_postcopy.testing.waiting import waitUntil

PAGE = 4096
TIMEOUT = 60
#: The guest pages the destination's guest reads: the boot-sector guest's
#: counted pages (1 MiB up, 256 pages, not zero pages).
FIRST, COUNT = 256, 256


class FaultTrace:
    """
    What the fault service told its observers, with the times the
    manager's blocktime context read for each: registered on the service
    before that context, its clock wrapped so every reading is kept.

    @ivar events: C{("fault", thread, address, received)} and
        C{("placed", address)}, in order.
    @ivar times: the context's clock readings, in order (one per event it
        timed).
    @ivar vcpus: the vCPU thread ids, live (a thread is registered at its
        first fault, before the context sees it).
    """

    def __init__(self) -> None:
        """
        Nothing seen yet.
        """
        self.events: list[tuple[Any, ...]] = []
        self.times: list[float] = []
        self.vcpus: list[int] = []

    def fault(self, threadId: int, address: int, received: bool) -> None:
        """
        A fault: register its thread as a vCPU, keep it.
        """
        if threadId not in self.vcpus:
            self.vcpus.append(threadId)
        self.events.append(("fault", threadId, address, received))

    def placed(self, address: int) -> None:
        """
        A placement: keep it.
        """
        self.events.append(("placed", address))

    def clock(self, now: Any) -> Any:
        """
        @param now: the context's clock.
        @return: the same clock, keeping each reading.
        """
        def reading() -> float:
            value = now()
            self.times.append(value)
            return value

        return reading

    def replay(self, origin: float) -> dict[str, object]:
        """
        Run QEMU's algorithm again, on a fresh context, over the trace and
        the recorded times.

        @param origin: the live context's creation time.
        @return: the replayed C{query-migrate} blocktime fields.
        """
        times = iter(self.times)
        vcpus: list[int] = []
        context = BlocktimeContext(vcpus, lambda: next(times), origin=origin)
        for event in self.events:
            if event[0] == "fault":
                _, threadId, address, received = event
                if threadId not in vcpus:
                    vcpus.append(threadId)
                context.faultBegan(threadId, address, received)
            else:
                context.pagePlaced(event[1])
        return context.query()


class QEMUSourceBlocktimeTests(TestCase):
    """
    A real QEMU source, our destination with a guest process that faults.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Give up without QEMU or userfaultfd.
        """
        requireQEMU()
        requireUserfaultfd()

    @inlineCallbacks
    def test_blocktimeOnTheFaultTrace(self):
        """
        QEMU 7.2 migrates its running guest to our destination in
        postcopy (background pages throttled to 32 KiB/s until our guest
        is done, so it surely faults however slowly it starts); our guest
        process reads the 256 pages QEMU's guest counts in, from one
        thread.  The blocktime
        our destination reports equals QEMU's algorithm replayed on the
        recorded fault trace; that thread is the only vCPU, so the total
        equals its figure, which is positive and at most the time its reads
        took.
        """
        qemu = startBootedQEMU(self, "source")
        destination = IncomingTestVM()
        trace = FaultTrace()
        destination.vcpuThreads = trace.vcpus
        manager = MigrationManager(reactor, destination)
        manager.setCapabilities({"postcopy-ram": True, "postcopy-blocktime": True})
        qemu.setCapabilities(**{"postcopy-ram": True})
        qemu.setParameters(**{"max-bandwidth": 100000, "max-postcopy-bandwidth": 32 * 1024})
        guests: list[Any] = []
        run = destination.run

        def runGuest() -> None:
            """
            At RUN: wrap the blocktime clock, then start the guest.
            """
            run()
            manager.blocktime.now = trace.clock(manager.blocktime.now)
            guests.append(spawnWorker(reactor, manager.incoming.faults, list(destination.blocks.values())))

        destination.run = runGuest
        factory = manager._ramFaultService

        def faultService(blocks: Any, pageSource: Any) -> Any:
            """
            The production fault service, with the trace observers first.
            """
            service = factory(blocks, pageSource)
            service.addFaultObserver(trace.fault)
            service.addPlacementObserver(trace.placed)
            return service

        manager.faultServiceFactory = faultService
        port = yield manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        qemu.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield deferToThread(qemu.waitMigration, ["active"], TIMEOUT)
        qemu.qmp("migrate-start-postcopy")
        yield waitUntil(reactor, lambda: guests, TIMEOUT)
        guest = guests[0]
        self.addCleanup(lambda: guest.ended if guest.ended.called else guest.exit())
        yield guest.attached
        ram = list(destination.blocks).index("pc.ram")
        answer = yield guest.command(op="touch", block=ram, first=FIRST, count=COUNT)
        yield deferToThread(qemu.setParameters, **{"max-postcopy-bandwidth": 0})
        status = yield manager.whenStatus("completed", "failed")
        self.assertEqual(status, "completed")
        info = yield deferToThread(qemu.waitMigration, ["completed"], TIMEOUT)
        self.assertGreater(info["ram"]["postcopy-requests"], 0, info)
        self.assertEqual(trace.vcpus, answer["tids"])
        faults = [event for event in trace.events if event[0] == "fault"]
        self.assertTrue(faults)
        self.assertEqual(len(trace.times), len(trace.events))
        reported = manager.queryMigrate()
        figures = {key: reported[key] for key in ("postcopy-blocktime", "postcopy-vcpu-blocktime")}
        self.assertEqual(figures, trace.replay(manager.blocktime.origin))
        (vcpu,) = figures["postcopy-vcpu-blocktime"]
        self.assertEqual(figures["postcopy-blocktime"], vcpu)
        self.assertGreater(vcpu, 0, figures)
        self.assertLessEqual(vcpu, answer["elapsed"] / 1e6 + len(faults), (figures, answer["elapsed"]))
