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
from twisted_postcopy.source.outgoing import DONE, OutgoingMigration
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
        migration.ending = "precopy"
        migration._stopVM()
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
