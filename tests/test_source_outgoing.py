# -*- test-case-name: tests.test_source_outgoing -*-
"""
Tests for L{twisted_postcopy.source.outgoing} and
L{twisted_postcopy.source.stats}, without sockets: rate limits, urgent
pages, convergence, and the C{query-migrate} shape.
"""

from __future__ import annotations

import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.enginevm import OutgoingTestVM, PAGE
from tests import wirebytes as c
from twisted_postcopy.source.outgoing import DONE, STOP_POLL, OutgoingMigration, SourcePhase, WriteChannel
from twisted_postcopy.wire import decodeAll
from twisted_postcopy.wire import events as e


def _migration(capabilities: dict[str, bool], **parameters: int):
    """
    @return: (vm, migration, written chunks, clock) after C{start()}.
    """
    vm = OutgoingTestVM({"pc.ram": 64 * PAGE})
    for page in range(64):
        vm.write(0, page * PAGE, b"%d" % page)
    clock = Clock()
    chunks: list[bytes] = []
    values = {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300}
    values.update(parameters)
    migration = OutgoingMigration(vm, chunks.append, clock.seconds, capabilities, values)
    migration.begin()
    migration.start()
    return vm, migration, chunks, clock


class OutgoingTests(SynchronousTestCase):
    """
    The source's scheduling decisions.
    """

    def test_precopyRateLimited(self) -> None:
        """
        A limit of 10 pages per 100 ms window stops the PART after about 10
        pages; the next step says how long to wait and writes nothing.
        """
        _, migration, chunks, clock = _migration({}, **{"max-bandwidth": 10 * PAGE * 10})
        chunks.clear()
        migration.limiter.windowStart = clock.seconds()
        migration.limiter.used = 0
        self.assertEqual(migration.step(), 0.0)
        self.assertLessEqual(len(chunks[0]), 12 * (PAGE + 20))
        delay = migration.step()
        self.assertGreater(delay, 0)
        self.assertEqual(len(chunks), 1)

    def test_bandwidthChangeApplies(self) -> None:
        """
        A max-bandwidth change during precopy applies at the next step.
        """
        _, migration, chunks, clock = _migration({}, **{"max-bandwidth": 1})
        clock.advance(1)
        migration.step()
        self.assertGreater(migration.step(), 0)
        migration.parameters["max-bandwidth"] = 0
        clock.advance(1)
        self.assertEqual(migration.step(), 0.0)

    def test_urgentPagesIgnoreLimit(self) -> None:
        """
        In postcopy with the background budget spent, a requested page is
        still sent at once, and only it.
        """
        _, migration, chunks, clock = _migration({"postcopy-ram": True},
                                                 **{"max-postcopy-bandwidth": 1})
        migration.postcopyRequested = True
        migration.step()
        self.assertEqual(migration.machine.status.value, "postcopy-active")
        migration.step()
        chunks.clear()
        self.assertGreater(migration.step(), 0)
        migration.pagesRequested("pc.ram", 40 * PAGE, PAGE)
        self.assertEqual(migration.step(), 0.0)
        self.assertEqual(len(chunks), 1)
        self.assertIn(struct.pack(">Q", 40 * PAGE | c.PAGE), chunks[0])
        header = 5 + 8 + 1 + len("pc.ram")
        self.assertEqual(len(chunks[0]), header + PAGE + 8 + 5)
        self.assertEqual(migration.stats.postcopyRequests, 1)

    def test_scanRestartsAfterRequest(self) -> None:
        """
        As QEMU 7.2's C{ram_find_and_save_block} moves C{pss} to a queued
        page, the background scan continues from the page after a requested
        one: on the wire the requested page is followed by its successors,
        and the pages the scan skipped come after the end of the block.
        """
        _, migration, chunks, clock = _migration({"postcopy-ram": True},
                                                 **{"max-postcopy-bandwidth": 4 * PAGE * 10})
        migration.postcopyRequested = True
        migration.step()
        self.assertEqual(migration.machine.status.value, "postcopy-active")
        migration.step()
        migration.pagesRequested("pc.ram", 40 * PAGE, PAGE)
        while migration.step() != DONE:
            clock.advance(0.1)
        pages = [event.offset // PAGE for event in decodeAll(b"".join(chunks))
                 if isinstance(event, e.PageReceived)]
        self.assertEqual(sorted(pages), list(range(64)))
        sent = pages.index(40)
        self.assertGreater(sent, 0)
        self.assertEqual(pages[sent:sent + 24], list(range(40, 64)))
        self.assertEqual(pages[:sent] + pages[sent + 24:], list(range(40)))

    def test_precopyEndNotThrottled(self) -> None:
        """
        The precopy completion is not rate limited (as in QEMU): with 3 MiB
        dirty at the stop and a budget of one page per second, the stream
        holds one END section with every page, sent while stopped.
        """
        pages = 768
        vm = OutgoingTestVM({"pc.ram": pages * PAGE})
        for page in range(pages):
            vm.write(0, page * PAGE, b"%d" % page)
        clock = Clock()
        chunks: list[bytes] = []
        parameters = {"max-bandwidth": PAGE, "max-postcopy-bandwidth": 0, "downtime-limit": 300}
        migration = OutgoingMigration(vm, chunks.append, clock.seconds, {}, parameters)
        migration.begin()
        migration.start()
        migration._stopVM(SourcePhase.STOPPING_FOR_COMPLETION)
        writes = len(chunks)
        while migration.step() != DONE:
            pass
        events = decodeAll(b"".join(chunks))
        ends = [event for event in events if isinstance(event, e.SectionStarted) and event.kind == c.END]
        self.assertEqual(len(ends), 1)
        received = {event.offset // PAGE for event in events if isinstance(event, e.PageReceived)}
        self.assertEqual(received, set(range(pages)))
        self.assertEqual(migration.machine.status.value, "completed")
        self.assertEqual(migration.stats.downtimeBytes, sum(map(len, chunks[writes:])))

    def test_neverTwiceAfterSwitch(self) -> None:
        """
        Every page goes out exactly once after the switch, and the first
        postcopy record names its block.
        """
        _, migration, chunks, clock = _migration({"postcopy-ram": True})
        migration.postcopyRequested = True
        migration.step()
        chunks.clear()
        while migration.step() != DONE:
            pass
        data = b"".join(chunks)
        offsets = [page * PAGE for page in range(64)]
        for offset in offsets:
            named = data.count(struct.pack(">Q", offset | c.PAGE) + c.str8("pc.ram"))
            continued = data.count(struct.pack(">Q", offset | c.PAGE | c.CONTINUE))
            self.assertEqual(named + continued, 1)
        self.assertEqual(data[5:13 + 7], struct.pack(">Q", c.PAGE) + c.str8("pc.ram"))

    def test_knownZeroSkippedAfterAdvise(self) -> None:
        """
        With postcopy-ram (so POSTCOPY_ADVISE empties the destination's
        RAM) the pages the VM knows are zero are never sent, unless
        C{x-skip-known-zero} is 0; without postcopy they are sent as ZERO
        records.
        """
        skipped = range(8, 40)
        for capabilities, parameters, expected in (
                ({"postcopy-ram": True}, {}, [page for page in range(64) if page not in skipped]),
                ({"postcopy-ram": True}, {"x-skip-known-zero": 0}, list(range(64))),
                ({}, {}, list(range(64)))):
            vm = OutgoingTestVM({"pc.ram": 64 * PAGE})
            vm.knownZero = lambda: [("pc.ram", 8 * PAGE, 32 * PAGE)]
            for page in range(64):
                if page not in skipped:
                    vm.write(0, page * PAGE, b"%d" % page)
            chunks: list[bytes] = []
            values = {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300, **parameters}
            migration = OutgoingMigration(vm, chunks.append, Clock().seconds, capabilities, values)
            migration.begin()
            migration.start()
            migration.postcopyRequested = bool(capabilities)
            while migration.step() not in (DONE, STOP_POLL):
                pass
            while migration.step() != DONE:
                pass
            events = decodeAll(b"".join(chunks))
            sent = sorted(event.offset // PAGE for event in events
                          if isinstance(event, (e.PageReceived, e.ZeroPageReceived)))
            self.assertEqual(sent, expected)

    def _skippingMigration(self, **flags: bool) -> tuple[OutgoingMigration, list[bytes]]:
        """
        @param flags: attributes of the migration to set first.
        @return: a postcopy migration with the return path open whose VM
            (4 MiB) knows pages 8 to 999 are zero, stepped until it waits,
            and its written chunks.
        """
        vm = OutgoingTestVM({"pc.ram": 1024 * PAGE})
        vm.knownZero = lambda: [("pc.ram", 8 * PAGE, 992 * PAGE)]
        chunks: list[bytes] = []
        values = {"max-bandwidth": 0, "max-postcopy-bandwidth": 0, "downtime-limit": 300}
        migration = OutgoingMigration(vm, chunks.append, Clock().seconds,
                                      {"postcopy-ram": True, "return-path": True}, values)
        for name, value in flags.items():
            setattr(migration, name, value)
        migration.begin()
        migration.start()
        migration.postcopyRequested = True
        while migration.step() not in (DONE, STOP_POLL):
            pass
        while migration.step() != DONE:
            pass
        return migration, chunks

    def test_endWaitsForPackageWhenPagesWereSkipped(self) -> None:
        """
        With pages left out as known zeros, END and EOF wait for PONG 3: a
        QEMU 7.2 destination may still be loading the package, and a device
        load that reads a left-out page must still get it (after EOF nothing
        could be sent, and QEMU's main thread would wait for ever).  A
        request meanwhile sends the page (and the left-out pages of its
        2 MiB window: those beyond it stay left out); PONG 3 lets the
        stream end.
        """
        migration, chunks = self._skippingMigration()
        self.assertEqual((migration.written, migration.machine.status.value), (False, "postcopy-active"))
        migration.pagesRequested("pc.ram", 20 * PAGE, PAGE)
        while migration.step() != DONE:
            pass
        self.assertFalse(migration.written)
        migration.pong(3)
        while migration.step() != DONE:
            pass
        self.assertTrue(migration.written)
        events = decodeAll(b"".join(chunks))
        sent = [event.offset // PAGE for event in events if isinstance(event, (e.PageReceived, e.ZeroPageReceived))]
        self.assertIn(20, sent)
        self.assertIsInstance(events[-1], e.EOFReceived)

    def test_endAfterPackageDoesNotWait(self) -> None:
        """
        Once PONG 3 came, or after a recovery resumed the migration (PONG 3
        may have been lost with the old connection), the stream ends as
        soon as everything else is written.
        """
        for flag in ("destinationRunning", "resumed"):
            migration, _ = self._skippingMigration(**{flag: True})
            self.assertTrue(migration.written, flag)

    def test_queryShape(self) -> None:
        """
        query-migrate in active has QEMU's fields; after completion
        remaining is 0 and downtime appears.
        """
        _, migration, _, clock = _migration({})
        info = migration.stats.query(migration.machine.status, migration.scheduler.remainingBytes, 300)
        self.assertEqual(set(info), {"status", "setup-time", "total-time", "ram", "expected-downtime"})
        for key in ("total", "transferred", "remaining", "normal", "normal-bytes", "duplicate",
                    "postcopy-requests", "mbps", "dirty-sync-count", "page-size",
                    "precopy-bytes", "postcopy-bytes", "downtime-bytes"):
            self.assertIn(key, info["ram"])
        while migration.step() != DONE:
            clock.advance(0.01)
        info = migration.stats.query(migration.machine.status, migration.scheduler.remainingBytes, 300)
        self.assertEqual((info["status"], info["ram"]["remaining"]), ("completed", 0))
        self.assertIn("downtime", info)
        self.assertEqual(info["ram"]["normal"], 64)


class BrokenWatch(WriteChannel):
    """
    A main channel that records L{WriteChannel.preemptBroken} calls.
    """

    def __init__(self, write, broken: list) -> None:
        """
        @param write: writes bytes.
        @param broken: gets C{True} per call.
        """
        super().__init__(write)
        self.broken = broken

    def preemptBroken(self) -> None:
        """
        Record it.
        """
        self.broken.append(True)


class PreemptEngineTests(SynchronousTestCase):
    """
    C{postcopy-preempt} in the engine (return-path-preempt-recovery.md
    section 3): the switch to postcopy waits for the channel, requested
    pages go there at once, EOS after the main channel's EOF.
    """

    def setUp(self) -> None:
        """
        A migration with preempt on, asked to switch to postcopy.
        """
        self.vm, self.migration, self.chunks, self.clock = _migration(
            {"postcopy-ram": True, "postcopy-preempt": True}, **{"max-postcopy-bandwidth": 1})
        self.preempt: list[bytes] = []
        self.migration.postcopyRequested = True

    def connect(self) -> None:
        """
        The preempt channel connects.
        """
        self.migration.preemptConnecting()
        self.migration.preemptConnected(lambda buffers: self.preempt.append(b"".join(buffers)))

    def test_switchoverWaitsForChannel(self) -> None:
        """
        Until the preempt channel is up, the stopped source polls instead
        of switching (QEMU's C{postcopy_preempt_wait_channel}); then it
        switches.
        """
        self.migration.preemptConnecting()
        self.migration.step()
        self.assertNotEqual(self.migration.step(), 0.0)
        self.assertEqual(self.migration.machine.status.value, "active")
        self.connect()
        self.assertEqual(self.migration.step(), 0.0)
        self.assertEqual(self.migration.machine.status.value, "postcopy-active")

    def test_failedChannelFailsSwitchover(self) -> None:
        """
        A preempt channel that could not connect fails the migration at
        the switch to postcopy, with the connect error, and the guest runs
        on the source again.
        """
        self.migration.preemptConnecting()
        self.migration.preemptFailed("Failed to connect to 'tcp:x:1': refused")
        self.migration.step()
        self.assertEqual(self.migration.step(), DONE)
        self.assertEqual(self.migration.machine.status.value, "failed")
        self.assertEqual(self.migration.stats.error,
                         "postcopy preempt channel: Failed to connect to 'tcp:x:1': refused (the destination "
                         "needs the postcopy-preempt capability too)")
        self.assertTrue(self.vm.running)

    def test_requestsGoToPreemptAtOnce(self) -> None:
        """
        In postcopy a request is written to the preempt channel inside
        C{pagesRequested} (not at a later step, not on the main channel,
        not held by the rate limit), naming its block; the main channel's
        next record names its block again; after the main channel's EOF
        the preempt channel gets one EOS.
        """
        self.connect()
        self.migration.step()
        self.migration.step()
        self.assertEqual(self.migration.machine.status.value, "postcopy-active")
        self.migration.step()
        main = len(self.chunks)
        self.migration.pagesRequested("pc.ram", 40 * PAGE, PAGE)
        self.assertEqual(len(self.chunks), main)
        (record,) = self.preempt
        self.assertEqual(record[:15], struct.pack(">Q", 40 * PAGE | c.PAGE) + b"\x06pc.ram")
        self.assertEqual(record[15:15 + PAGE], bytes(self.vm.blocks[0].map[40 * PAGE:41 * PAGE]))
        self.assertEqual(len(record), 15 + PAGE)
        self.assertIsNone(self.migration.records.lastBlock)
        self.migration.parameters["max-postcopy-bandwidth"] = 0
        self.migration.limiter.bandwidth = 0
        for _ in range(100):
            if self.migration.step() == DONE:
                break
        self.assertEqual(self.preempt[-1], struct.pack(">Q", c.EOS))
        self.assertEqual(self.migration.preemptPhase.value, "ended")
        pages = [event.offset // PAGE for event in decodeAll(b"".join(self.chunks))
                 if isinstance(event, (e.PageReceived, e.ZeroPageReceived))]
        self.assertNotIn(40, pages)
        self.assertEqual(sorted(pages + [40]), list(range(64)))

    def test_mainChannelKeepsFullBatches(self) -> None:
        """
        In postcopy a main channel PART carries a full C{BATCH} (all 64
        pages in one step here), with the preempt channel up or without
        one.
        """
        def firstPostcopyPart(migration, chunks) -> int:
            migration.postcopyRequested = True
            for _ in range(10):
                migration.step()
                if migration.machine.status.value == "postcopy-active":
                    break
            chunks.clear()
            migration.step()
            return len(chunks[0]) // PAGE  # whole pages, plus 8 bytes of header each

        self.migration.parameters["max-postcopy-bandwidth"] = 0
        self.connect()
        self.assertEqual(firstPostcopyPart(self.migration, self.chunks), 64)
        _, plain, chunks, _ = _migration({"postcopy-ram": True})
        self.assertEqual(firstPostcopyPart(plain, chunks), 64)

    def test_brokenChannelInPostcopy(self) -> None:
        """
        A preempt channel breaking in postcopy asks the protocol to drop
        the main connection too (the migration then pauses); requests
        meanwhile stay queued for the main channel.
        """
        broken: list[bool] = []
        self.migration.attachChannel(BrokenWatch(self.chunks.append, broken))
        self.connect()
        self.migration.step()
        self.migration.step()
        self.migration.preemptFailed("preempt channel lost")
        self.assertEqual(broken, [True])
        self.migration.pagesRequested("pc.ram", 40 * PAGE, PAGE)
        self.assertEqual(len(self.preempt), 0)
        self.assertEqual(len(self.migration.scheduler.queue), 1)
