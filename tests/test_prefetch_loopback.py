# -*- test-case-name: tests.test_prefetch_loopback -*-
"""
The prefetch policies (docs/prefetch.md) end to end: our source to our
destination over loopback TCP through a recording relay, a real guest
worker faulting on the production fault service.  Whatever the policies,
the stream carries each page exactly once and the guest sees the source's
memory.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.source.prefetch import READAHEAD, SCAN_FOLLOWS_FAULTS
from twisted_postcopy.testing.enginevm import PAGE, OutgoingTestVM
from twisted_postcopy.testing.real import requireUserfaultfd
from twisted_postcopy.testing.relay import RecordingRelay
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.wire import decodeAll
from twisted_postcopy.wire import events as e
from tests.test_migration_loopback import fill, ownDevice

MiB = 1 << 20


class PrefetchLoopbackTests(TestCase):
    """
    Postcopy with readahead, with the scan following faults or not, with
    sequential and strided guests.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Skip without userfaultfd; a source VM of 8 MiB + 128 KiB, every
        other page data.
        """
        requireUserfaultfd()
        self.source = OutgoingTestVM({"pc.ram": 8 * MiB, "pc.rom": 128 * 1024},
                                     device=ownDevice(b"cpu state"))
        fill(self.source, 7)
        self.pages = {(name, offset) for name, data in self.source.contents().items()
                      for offset in range(0, len(data), PAGE)}

    @inlineCallbacks
    def migrate(self, passes: int, **parameters: int) -> Any:
        """
        Migrate by postcopy with the background stream throttled to 16
        pages/s, so that the guest's reads become page requests.

        @param passes: the guest reads each block in this many strided
            passes (1: in order).
        @param parameters: the source's prefetch parameters.
        @return: (a Deferred firing with) the source manager and how many
            times each page crossed the wire.
        """
        destination = WorkerGuestVM(reactor, passes=passes)
        self.addCleanup(destination.close)
        src = MigrationManager(reactor, self.source)
        dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
        for manager in (src, dst):
            manager.setCapabilities({"postcopy-ram": True})
        src.setParameters({"max-bandwidth": 16 * PAGE, "max-postcopy-bandwidth": 16 * PAGE, **parameters})
        port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        relay = RecordingRelay(("127.0.0.1", port.getHost().port))
        self.addCleanup(relay.close)
        src.migrate(relay.uri)
        yield destination.ready
        src.startPostcopy()
        digests = yield destination.done
        src.setParameters({"max-postcopy-bandwidth": 0})
        self.assertEqual((yield src.whenStatus("completed", "failed")), "completed", src.queryMigrate())
        self.assertEqual((yield dst.whenStatus("completed", "failed")), "completed")
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest()
                                   for data in self.source.contents().values()])
        yield deferToThread(relay.waitClosed)
        crossed = Counter((event.block, event.offset) for event in decodeAll(relay.connections[0].forward)
                          if isinstance(event, (e.PageReceived, e.ZeroPageReceived)))
        return src, crossed

    @inlineCallbacks
    def test_sequentialReadahead(self) -> None:
        """
        A guest reading in order gets readahead windows: fewer requests
        than pages it faulted on, each page sent once, memory equal.
        """
        src, crossed = yield self.migrate(1, **{READAHEAD: 64})
        self.assertEqual(set(crossed), self.pages)
        self.assertEqual(set(crossed.values()), {1})
        scheduler = src.outgoing.scheduler
        self.assertGreater(scheduler.readahead.sent, 0)
        self.assertGreater(src.queryMigrate()["ram"]["postcopy-requests"], 0)

    @inlineCallbacks
    def test_stridedScanStays(self) -> None:
        """
        A guest reading in 64 strided passes, with readahead on and the
        scan keeping its position: each page sent once, memory equal.
        """
        src, crossed = yield self.migrate(64, **{READAHEAD: 64, SCAN_FOLLOWS_FAULTS: 0})
        self.assertEqual(set(crossed), self.pages)
        self.assertEqual(set(crossed.values()), {1})
        self.assertGreater(src.queryMigrate()["ram"]["postcopy-requests"], 0)
