# -*- test-case-name: tests.test_guests_migration -*-
"""
Tests for L{twisted_postcopy.guests.guest}: built-in guests migrated
between two L{MigrationManager}s over loopback TCP, with real worker
processes on both sides (dirty tracking with WP_ASYNC on the source, real
userfaultfd faults on the destination).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.errors import GuestError, MigrationError
from twisted_postcopy.guests.guest import Guest, GuestSpec, IncomingGuest, decodeDeviceState, encodeDeviceState
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing.real import requireWriteTracking
from twisted_postcopy.testing.waiting import waitUntil
from twisted_postcopy.wire import decodeAll

MiB = 1 << 20


class DeviceStateTests(SynchronousTestCase):
    """
    Tests for our device section.
    """

    def test_roundTrip(self) -> None:
        """
        The section is FULL, idstr C{twisted-postcopy/<guest>}, instance 0,
        version 1, and decodes to the workers' states.
        """
        raw = encodeDeviceState("stress", {"stress-0": b"\x00a", "stress-1": b""})
        (event,) = decodeAll(raw, header=False)
        self.assertEqual((event.idstr, event.instanceId, event.versionId), ("twisted-postcopy/stress", 0, 1))
        self.assertEqual(decodeDeviceState("stress", raw), {"stress-0": b"\x00a", "stress-1": b""})
        self.assertIsNone(decodeDeviceState("stress", b""))

    def test_otherGuest(self) -> None:
        """
        Our section of another guest, or a malformed blob, is a
        L{GuestError}.
        """
        self.assertRaises(GuestError, decodeDeviceState, "kv", encodeDeviceState("stress", {}))
        from twisted_postcopy.wire import StreamEncoder

        self.assertRaises(GuestError, decodeDeviceState, "kv", StreamEncoder().ownDeviceSection(3, "kv", b"{"))

    def test_blocksMustMatch(self) -> None:
        """
        A destination refuses a source whose blocks differ.
        """
        guest = IncomingGuest(reactor, GuestSpec("stress", blocks=(("ram", MiB),)), "unused")
        self.assertRaises(MigrationError, guest.ramBlocksListed, [("ram", 2 * MiB, None)])


class MigrationTests(TestCase):
    """
    Built-in guests migrated over loopback.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        Give up (L{missingReal}) without WP_ASYNC dirty tracking here.
        """
        requireWriteTracking()

    def guests(self, spec: GuestSpec, postcopy: bool) -> tuple[Guest, IncomingGuest]:
        """
        A source guest, a destination guest (loads without running) and
        their managers.

        @param spec: the guest.
        @param postcopy: the C{postcopy-ram} capability.
        @return: (source, destination).
        """
        source = Guest(reactor, spec, self.mktemp() + ".sock")
        self.addCleanup(source.close)
        destination = IncomingGuest(reactor, spec, self.mktemp() + ".sock", autoRun=spec.name == "kv")
        self.addCleanup(destination.close)
        self.src = MigrationManager(reactor, source)
        self.dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
        for manager in (self.src, self.dst):
            manager.setCapabilities({"postcopy-ram": postcopy})
        return source, destination

    @inlineCallbacks
    def migrate(self, postcopy: bool, spec: GuestSpec, during=None, postcopyBandwidth: int = 4 * MiB,
                bandwidth: int = 4 * MiB):
        """
        Migrate: some precopy with the guest running, then postcopy (or
        precopy to the end).

        @param postcopy: switch to postcopy.
        @param spec: the guest.
        @param during: called with the destination once its workers
            loaded their state, before completion.
        @param postcopyBandwidth: C{max-postcopy-bandwidth}.
        @param bandwidth: C{max-bandwidth}.
        @return: (source, destination) once both sides completed.
        """
        source, destination = self.guests(spec, postcopy)
        yield source.start()
        self.src.setParameters({"max-bandwidth": bandwidth, "max-postcopy-bandwidth": postcopyBandwidth})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield self.src.whenStatus("active")
        yield deferLater(reactor, 0.3, lambda: None)
        if postcopy:
            self.src.startPostcopy()
        yield destination.running
        result = (yield during(destination)) if during else None
        status = yield self.src.whenStatus("completed", "failed")
        dstStatus = yield self.dst.whenStatus("completed", "failed")
        self.assertEqual((status, dstStatus), ("completed", "completed"))
        return source, destination, result

    def assertSameRAM(self, source: Guest, destination: IncomingGuest) -> None:
        """
        The destination's RAM (read with C{pread}) is the stopped source's.

        @param source: the source.
        @param destination: the destination.
        """
        for block in source.blocks:
            other = destination.blocks[block.idstr]
            self.assertTrue(os.pread(block.fd, block.length, 0) == os.pread(other.fd, other.length, 0),
                            f"block {block.idstr} differs")

    @inlineCallbacks
    def test_stressPostcopy(self) -> None:
        """
        The destination's workers verify their memory while postcopy still
        runs (their reads fault and are served by page requests); the final
        RAM equals the stopped source's.

        The faults are made by construction: precopy goes at 128 KiB/s
        (from page 0), so however late the switch comes on a loaded
        machine most of the 4 MiB (all of it the workers' working sets) is
        missing or dirty at the switch; afterwards background pages go at
        one per 100 ms window (4 KiB/s) until the verification, which reads
        every page, is done.
        """
        spec = GuestSpec("stress", 2, (("ram", 4 * MiB),), ("--working-set", "512", "--rate", "4000"))

        def verify(guest: IncomingGuest) -> Any:
            """
            Verify, then let the background pages go at full speed.
            """
            def unthrottle(verified: Any) -> Any:
                """
                @return: C{verified}, once the throttle is lifted.
                """
                self.src.setParameters({"max-postcopy-bandwidth": 0})
                return verified

            return guest.host.verify().addCallback(unthrottle)

        source, destination, verified = yield self.migrate(True, spec, verify, 4096, 128 * 1024)
        self.assertEqual([r["ok"] for r in verified.values()], [True, True], verified)
        self.assertGreater(sum(r["steps"] for r in verified.values()), 0)
        self.assertGreater(self.src.queryMigrate()["ram"]["postcopy-requests"], 0)
        self.assertSameRAM(source, destination)

    @inlineCallbacks
    def test_stressPrecopy(self) -> None:
        """
        Without postcopy the destination's workers start at the end of
        the migration, with every page present, and verify.
        """
        spec = GuestSpec("stress", 1, (("ram", 2 * MiB),), ("--working-set", "256", "--rate", "2000"))
        source, destination, _ = yield self.migrate(False, spec)
        verified = yield destination.host.verify()
        self.assertTrue(verified["stress-0"]["ok"], verified)
        self.assertSameRAM(source, destination)

    @inlineCallbacks
    def test_kvNoAcknowledgedWriteLost(self) -> None:
        """
        A client fills the source's kv table and keeps writing until it
        answers C{ERR stopped} (switchover), then reconnects to the
        destination: every write that was acknowledged reads back there,
        while postcopy still runs.
        """
        spec = GuestSpec("kv", 1, (("ram", 1 * MiB),))
        acknowledged: dict[bytes, bytes] = {}
        stopped, filled = threading.Event(), threading.Event()

        def client(port: int) -> None:
            """
            SET until refused.
            """
            with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as answers:
                for n in range(100000):
                    key, value = b"key%d" % (n % 2000), b"value%d" % n
                    sock.sendall(b"SET %s %s\n" % (key, value))
                    answer = answers.readline().rstrip(b"\n")
                    if answer != b"OK":
                        self.assertEqual(answer, b"ERR stopped")
                        stopped.set()
                        return
                    acknowledged[key] = value
                    if n == 2000:
                        filled.set()

        source, destination = self.guests(spec, True)
        yield source.start()
        writing = deferToThread(client, source.host.workers["kv-0"].info["port"])
        yield deferToThread(filled.wait, 30)
        self.src.setParameters({"max-bandwidth": 1 * MiB, "max-postcopy-bandwidth": 2 * MiB})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield self.src.whenStatus("active")
        yield deferLater(reactor, 0.2, lambda: None)
        self.src.startPostcopy()
        yield writing
        yield destination.running
        self.assertTrue(stopped.is_set())
        keys = sorted(acknowledged)
        newPort = destination.host.workers["kv-0"].info["port"]

        def read() -> list[bytes]:
            """
            @return: each acknowledged key's value on the destination.
            """
            with socket.create_connection(("127.0.0.1", newPort)) as sock, sock.makefile("rb") as answers:
                values = []
                for key in keys:
                    sock.sendall(b"GET %s\n" % key)
                    values.append(answers.readline().rstrip(b"\n"))
                return values

        values = yield deferToThread(read)
        self.assertGreater(len(keys), 0)
        self.assertEqual(values, [acknowledged[key] for key in keys])
        yield self.src.whenStatus("completed", "failed")
        self.assertEqual((yield self.dst.whenStatus("completed", "failed")), "completed")

    @inlineCallbacks
    def test_cancelResumes(self) -> None:
        """
        After a cancelled migration the source guest still stops, saves and
        resumes (its steps go on) and its memory verifies.
        """
        spec = GuestSpec("stress", 1, (("ram", 4 * MiB),), ("--working-set", "1024", "--rate", "2000"))
        source, destination = self.guests(spec, True)
        destinationFailed = self.assertFailure(destination.done, GuestError)
        yield source.start()
        self.src.setParameters({"max-bandwidth": 1 * MiB})
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        yield self.src.whenStatus("active")
        self.src.cancel()
        self.assertEqual((yield self.src.whenStatus("cancelled", "failed", "completed")), "cancelled")
        self.assertEqual((yield self.dst.whenStatus("failed")), "failed")
        yield destinationFailed
        yield source.stop()
        first = yield source.host.save()
        (block,) = source.blocks
        saved = os.pread(block.fd, block.length, 0)
        yield source.resume()
        yield waitUntil(reactor, lambda: os.pread(block.fd, block.length, 0) != saved)
        yield source.stop()
        second = yield source.host.save()
        self.assertGreater(json.loads(second["stress-0"])["steps"], json.loads(first["stress-0"])["steps"])
        verified = yield source.host.verify()
        self.assertTrue(verified["stress-0"]["ok"], verified)
