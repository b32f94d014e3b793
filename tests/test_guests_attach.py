# -*- test-case-name: tests.test_guests_attach -*-
"""
Tests for L{twisted_postcopy.guests.attach} and the daemon side in
L{twisted_postcopy.guests.host}: message framing on bytes, and guest
processes attached to a real fault service (real userfaultfd, real
processes, real Unix sockets).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.errors import AttachProtocolError, GuestError
from twisted_postcopy.guests.attach import MAX_MESSAGE, MessageReader, attach, encodeMessage
from twisted_postcopy.access import PeerPolicy
from twisted_postcopy.guests.host import AttachAccess, GuestHost
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.faults import FaultService
from twisted_postcopy.ram.guestworker import MemoryPageSource
from twisted_postcopy.testing.real import requireUserfaultfd, requireWriteTracking
from twisted_postcopy.testing.waiting import waitUntil

PAGE = 4096
STRESS = "twisted_postcopy.guests.stress"
IDLE = ["--working-set", "0"]


class MessageReaderTests(SynchronousTestCase):
    """
    Tests for L{MessageReader} and L{encodeMessage}.
    """

    def test_anySplit(self) -> None:
        """
        Messages fed in chunks of any size come out whole, in order, each
        with the descriptors it claims.
        """
        data = encodeMessage("hello", guest="g", worker="g-0", pid=1) + encodeMessage("uffd", fds=2, mappings=[])
        for size in (1, 3, 7, len(data)):
            reader = MessageReader()
            fds = [10, 11]
            messages = []
            for start in range(0, len(data), size):
                reader.feed(data[start : start + size], fds if start == 0 else ())
                messages += list(reader.messages())
            self.assertEqual([(m.kind, m.fds) for m in messages], [("hello", ()), ("uffd", (10, 11))])
            self.assertEqual(messages[0]["worker"], "g-0")

    def test_missingField(self) -> None:
        """
        A missing field is an L{AttachProtocolError} naming it.
        """
        reader = MessageReader()
        reader.feed(encodeMessage("hello"))
        (message,) = reader.messages()
        error = self.assertRaises(AttachProtocolError, message.__getitem__, "pid")
        self.assertIn("'pid'", str(error))

    def test_badMessages(self) -> None:
        """
        Too long, not JSON, not an object with a type, or claiming fds that
        did not arrive: each raises L{AttachProtocolError}.
        """
        for data, text in [(struct.pack(">I", MAX_MESSAGE + 1), "exceeds"),
                           (struct.pack(">I", 3) + b"{x}", "not JSON"),
                           (struct.pack(">I", 2) + b"[]", "'type'"),
                           (encodeMessage("uffd", fds=1), "claims 1 fds")]:
            reader = MessageReader()
            reader.feed(data)
            error = self.assertRaises(AttachProtocolError, list, reader.messages())
            self.assertIn(text, str(error))

    def test_closeUnclaimed(self) -> None:
        """
        L{MessageReader.close} closes descriptors no message claimed.
        """
        r, w = os.pipe()
        os.close(w)
        reader = MessageReader()
        reader.feed(b"", [r])
        reader.close()
        self.assertRaises(OSError, os.fstat, r)


def _checkUffd() -> None:
    """
    Give up (L{missingReal}) without userfaultfd here.
    """
    requireUserfaultfd()


class FaultAttachTests(TestCase):
    """
    Guest processes attached in C{fault} mode read a block whose pages
    arrive only through their faults.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        One 2 MiB block of random bytes (a quarter zero pages) behind a
        fault service fed by an in-process page source.
        """
        _checkUffd()
        rng = random.Random(7)
        pages = [bytes(PAGE) if rng.random() < 0.25 else rng.randbytes(PAGE) for _ in range(512)]
        self.contents = b"".join(pages)
        self.block = RAMBlock("pc.ram", len(self.contents))
        self.addCleanup(self.block.close)

    def makeHost(self, delay: float = 0.0) -> GuestHost:
        """
        @param delay: seconds before each requested page is placed.
        @return: a host in C{fault} mode (killed at cleanup); this test
            process is on its allow list, so it can play a bad client.
        """
        self.source = MemoryPageSource({"pc.ram": self.contents}, reactor if delay else None, delay)
        self.service = FaultService(reactor, self.source, [self.block])
        self.source.service = self.service
        host = GuestHost(reactor, self.mktemp() + ".sock", [self.block], "fault", faultService=self.service,
                         access=AttachAccess(PeerPolicy(pids={os.getpid()})))
        self.addCleanup(host.kill)
        return host

    @inlineCallbacks
    def test_readThroughFaults(self) -> None:
        """
        A worker process attaches, reads its whole mapping; every byte is
        the page source's and every page came through a request.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        digests = yield host.digest()
        self.assertEqual(digests, {"stress-0": [hashlib.sha256(self.contents).hexdigest()]})
        self.assertEqual(len(set(self.source.requests)), 512)
        self.assertEqual(self.service.clients[0].pid, host.workers["stress-0"].pid)

    @inlineCallbacks
    def test_manyClients(self) -> None:
        """
        Four processes read the same block at once: all see the same bytes,
        and no page is requested twice.
        """
        host = self.makeHost(0.001)
        host.spawn(STRESS, "stress", 4, IDLE)
        yield host.whenAttached()
        digests = yield host.digest()
        expected = [hashlib.sha256(self.contents).hexdigest()]
        self.assertEqual(digests, {f"stress-{k}": expected for k in range(4)})
        self.assertEqual(len(self.source.requests), len(set(self.source.requests)))
        self.assertEqual(len(self.service.clients), 4)

    @inlineCallbacks
    def test_clientDiesMidFault(self) -> None:
        """
        A worker killed while blocked on a fault is dropped (its attachment
        and fault client go); the other worker's read completes intact.
        """
        host = self.makeHost(0.002)
        host.spawn(STRESS, "stress", 2, IDLE)
        yield host.whenAttached()
        reading = host.workers["stress-1"].request("digest")
        dying = host.workers["stress-0"].request("digest")
        dying.addCallbacks(lambda _: "finished", lambda failure: failure.trap(GuestError) and "lost")
        yield deferLater(reactor, 0.05, lambda: None)
        os.kill(host.workers["stress-0"].pid, signal.SIGKILL)
        reply = yield reading
        self.assertEqual((yield dying), "lost")
        self.assertEqual(reply["sha256"], [hashlib.sha256(self.contents).hexdigest()])
        yield host.processes["stress-0"].ended
        self.assertEqual(sorted(host.workers), ["stress-1"])
        self.assertEqual([c.pid for c in self.service.clients], [host.workers["stress-1"].pid])

    @inlineCallbacks
    def assertRefused(self, host: GuestHost, table: list, text: str) -> None:
        """
        Attaching with C{table} from a thread is refused with C{text}.

        @param host: the host.
        @param table: the mapping table to send.
        @param text: expected in the error.
        """
        try:
            attachment = yield deferToThread(attach, host.socketPath, "bad", "bad-0", table)
        except AttachProtocolError as error:
            self.assertIn(text, str(error))
        else:
            attachment.close()
            self.fail(f"table {table} accepted")

    @inlineCallbacks
    def test_badMappingTable(self) -> None:
        """
        Unknown idstr, past the end, unaligned, malformed: each gets
        C{error} and a close; a good worker attaches afterwards.
        """
        host = self.makeHost()
        entry = {"base": 0x7F0000000000, "idstr": "pc.ram", "offset": 0, "length": PAGE, "page_size": PAGE}
        yield self.assertRefused(host, [dict(entry, idstr="pc.rom")], "unknown RAMBlock 'pc.rom'")
        yield self.assertRefused(host, [dict(entry, offset=len(self.contents))], "runs past")
        yield self.assertRefused(host, [dict(entry, base=entry["base"] + 100)], "not aligned")
        yield self.assertRefused(host, [{"base": 1}], "bad mapping table entry")
        self.assertEqual(self.service.clients, [])
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        self.assertEqual(len(self.service.clients), 1)

    @inlineCallbacks
    def test_garbage(self) -> None:
        """
        A peer sending a message that is not JSON gets C{error} and a close.
        """
        import socket

        host = self.makeHost()

        def talk() -> bytes:
            """
            @return: everything the daemon sent before closing.
            """
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(host.socketPath)
                sock.sendall(struct.pack(">I", 4) + b"nope")
                chunks = []
                while chunk := sock.recv(4096):
                    chunks.append(chunk)
                return b"".join(chunks)

        data = yield deferToThread(talk)
        reader = MessageReader()
        reader.feed(data)
        (message,) = reader.messages()
        self.assertEqual(message.kind, "error")
        self.assertIn("not JSON", message["message"])

    def rawClient(self, host: GuestHost, body: bytes, fds: list[int] = ()) -> str:
        """
        Say hello, take the blocks, then send C{body} as one message with
        C{fds} (run in a thread).

        @param host: the host.
        @param body: the JSON text of the message (not necessarily JSON).
        @param fds: descriptors to send with it.
        @return: the daemon's C{error} message, or C{accepted}.
        """
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(host.socketPath)
            sock.sendall(encodeMessage("hello", guest="bad", worker="bad-0", pid=os.getpid()))
            reader = MessageReader()
            while not list(reader.messages()):
                data, received, _, _ = socket.recv_fds(sock, 65536, 8)
                reader.feed(data, received)
            reader.close()
            socket.send_fds(sock, [struct.pack(">I", len(body)) + body], list(fds))
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        reader = MessageReader()
        reader.feed(b"".join(chunks))
        replies = list(reader.messages())
        return replies[0]["message"] if replies and replies[0].kind == "error" else "accepted"

    @inlineCallbacks
    def test_pipeAsUffd(self) -> None:
        """
        A pipe sent as the userfaultfd is refused (nothing it carries can
        become a page request); a real worker attached beside it reads its
        memory intact.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        table = [{"base": 0x7F0000000000, "idstr": "pc.ram", "offset": 0, "length": PAGE, "page_size": PAGE}]
        body = json.dumps({"type": "uffd", "fds": 1, "mappings": table}).encode()
        message = yield deferToThread(self.rawClient, host, body, [r])
        self.assertIn("pipe:", message)
        self.assertIn("not a userfaultfd", message)
        self.assertEqual(len(self.service.clients), 1)
        digests = yield host.digest()
        self.assertEqual(digests, {"stress-0": [hashlib.sha256(self.contents).hexdigest()]})

    @inlineCallbacks
    def test_malformedJSONValues(self) -> None:
        """
        C{Infinity}, C{NaN}, huge integers, floats and strings in a mapping
        table each get a clear error to that client alone; the attached
        worker keeps working.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        entry = '{"base": %s, "idstr": "pc.ram", "offset": 0, "length": 4096, "page_size": 4096}'
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        for value, text in [("Infinity", "Infinity is not a JSON value"), ("NaN", "NaN is not a JSON value"),
                            ("-Infinity", "-Infinity is not a JSON value"), ("1" * 30, "is not an integer"),
                            ("9" * 5000, "not JSON"), ("1.5e3", "is not an integer"), ('"0"', "is not an integer"),
                            ("true", "is not an integer")]:
            body = ('{"type": "uffd", "fds": 1, "mappings": [%s]}' % (entry % value)).encode()
            message = yield deferToThread(self.rawClient, host, body, [r])
            self.assertIn(text, message, value[:20])
        message = yield deferToThread(self.rawClient, host, b'{"type": "uffd", "fds": 1, "mappings": {"a": 1}}',
                                      [r])
        self.assertIn("mapping table is not a list", message)
        digests = yield host.digest()
        self.assertEqual(digests, {"stress-0": [hashlib.sha256(self.contents).hexdigest()]})
        self.assertEqual(sorted(host.workers), ["stress-0"])

    @inlineCallbacks
    def test_workerFailsToStart(self) -> None:
        """
        A worker process that exits without attaching fails
        L{GuestHost.whenAttached} with its stderr.
        """
        host = self.makeHost()
        host.spawn("twisted_postcopy.guests.nonexistent", "nope", 1)
        error = yield self.assertFailure(host.whenAttached(), GuestError)
        self.assertIn("No module named", str(error))

    @inlineCallbacks
    def test_duplicateWorker(self) -> None:
        """
        A second attachment under an attached worker's name is refused;
        the first stays attached.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        first = host.workers["stress-0"]
        try:
            yield deferToThread(attach, host.socketPath, "stress", "stress-0")
        except AttachProtocolError as error:
            self.assertIn("already attached", str(error))
        else:
            self.fail("a second stress-0 attached")
        self.assertIs(host.workers["stress-0"], first)
        self.assertEqual(len(self.service.clients), 1)

    @inlineCallbacks
    def test_threadsReported(self) -> None:
        """
        After attaching, a stress worker reports its writer thread: a
        thread of its process other than the main one; the host's list
        holds it once, also after C{run} reported it again.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        yield host.digest()
        worker = host.workers["stress-0"]
        tasks = {int(tid) for tid in os.listdir(f"/proc/{worker.pid}/task")}
        self.assertEqual(len(worker.threads), 1)
        self.assertLessEqual(set(worker.threads), tasks - {worker.pid})
        self.assertEqual(host.threads, worker.threads)
        yield host.run()
        self.assertEqual(host.threads, worker.threads)

    @inlineCallbacks
    def test_badThreads(self) -> None:
        """
        A C{threads} message that is not a list of positive integers gets
        C{error} and a close.
        """
        host = self.makeHost()

        def talk() -> str:
            """
            @return: the daemon's error message.
            """
            attachment = attach(host.socketPath, "bad", "bad-0")
            try:
                attachment.send("threads", threads=[1, "two"])
                attachment.receive()
            except AttachProtocolError as error:
                return str(error)
            finally:
                attachment.close()
            return "accepted"

        message = yield deferToThread(talk)
        self.assertIn("bad threads message", message)
        self.assertEqual(host.threads, [])


class TrackAttachTests(TestCase):
    """
    Guest processes attached in C{track} mode: their writes are seen by
    the dirty tracker.
    """

    timeout = 60

    @inlineCallbacks
    def test_everyWrittenPageIsDirty(self) -> None:
        """
        Every page whose bytes changed between C{start} and the C{sync}
        after C{stop} is reported dirty; the tracker holds both workers.
        """
        from twisted_postcopy.ram.dirty import DirtyTracker

        requireWriteTracking()
        block = RAMBlock("ram", 1 << 20)
        self.addCleanup(block.close)
        tracker = DirtyTracker([block])
        host = GuestHost(reactor, self.mktemp() + ".sock", [block], "track", dirtyTracker=tracker)
        self.addCleanup(host.kill)
        host.spawn(STRESS, "stress", 2, ["--working-set", "100", "--rate", "300"])
        yield host.whenAttached()
        self.assertEqual(sorted(p.pid for p in tracker.processes), sorted(w.pid for w in host.workers.values()))
        yield host.run()
        tracker.start()
        before = os.pread(block.fd, block.length, 0)
        yield waitUntil(reactor, lambda: os.pread(block.fd, block.length, 0) != before)
        yield host.stop()
        after = os.pread(block.fd, block.length, 0)
        dirty = {offset // PAGE + k for offset, length in tracker.sync()["ram"] for k in range(length // PAGE)}
        changed = {page for page in range(block.length // PAGE)
                   if before[page * PAGE : (page + 1) * PAGE] != after[page * PAGE : (page + 1) * PAGE]}
        self.assertTrue(changed)
        self.assertLessEqual(changed, dirty)
        self.assertEqual(tracker.sync()["ram"], [])
