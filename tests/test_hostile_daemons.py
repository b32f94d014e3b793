# -*- test-case-name: tests.test_hostile_daemons -*-
"""
Hostile peers against real C{twistd postcopy} daemons (child processes
with real guests): a destination fed hostile configuration bytes or a
block list of duplicate names, and a source flooded with page requests for
its whole RAM, each stays responsive on its control socket, spends under
a second of CPU on the input, leaks no descriptor and grows no memory,
and fails the migration with the specific error.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from twisted_postcopy.control import daemon
from twisted_postcopy.wire import ReturnPathEncoder, StreamDecoder
from twisted_postcopy.wire import events as e
from twisted_postcopy.wire.config import encodeHeader, encodeSubsection
from twisted_postcopy.wire.constants import CONFIG_CAPABILITIES, SectionType
from twisted_postcopy.wire.encoder import encodeSectionHeader
from twisted_postcopy.wire.events import RAMBlockInfo
from twisted_postcopy.wire.ram import encodeBlockList

#: CPU seconds a daemon may spend on one hostile input.
CPU_BOUND = 1.0
#: Seconds a control command may take while the daemon is under attack
#: (wall clock on a busy shared 2-core machine; an attacked source daemon
#: never answered within 10 s).
CONTROL_BOUND = 5.0
MiB = 1 << 20


def cpuSeconds(pid: int) -> float:
    """
    @param pid: a process.
    @return: its user and system CPU seconds.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rssBytes(pid: int) -> int:
    """
    @param pid: a process.
    @return: its resident set size.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fdCount(pid: int) -> int:
    """
    @param pid: a process.
    @return: how many descriptors it has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


class _Sender(Protocol):
    """
    Writes given bytes in chunks, one chunk per reactor turn, and records
    when the connection closed.
    """

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self._next()

    def _next(self) -> None:
        if self.chunks and self.transport.connected:
            self.transport.write(self.chunks.pop(0))
            reactor.callLater(0, self._next)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


class DaemonTestCase(TestCase):
    """
    Starts a daemon in a short work directory.
    """

    timeout = 120

    @defer.inlineCallbacks
    def startDaemon(self, name: str, *arguments: str) -> Any:
        """
        @return: the started daemon (stopped at cleanup).
        """
        self.workdir = Path(tempfile.mkdtemp(prefix="pc-hostile-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        started = yield defer.Deferred.fromCoroutine(daemon.startDaemon(reactor, name, self.workdir, arguments))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(started.stop(reactor)))
        return started

    @defer.inlineCallbacks
    def assertResponsive(self, client: Any) -> Any:
        """
        A query-migrate is answered within L{CONTROL_BOUND}.

        @return: the answer.
        """
        started = time.monotonic()
        answer = yield defer.Deferred.fromCoroutine(client.queryMigrate()).addTimeout(10, reactor)
        took = time.monotonic() - started
        self.assertLess(took, CONTROL_BOUND, f"query-migrate took {took:.2f} s")
        return answer

    @defer.inlineCallbacks
    def waitForStatus(self, client: Any, status: str, seconds: float = 20.0) -> Any:
        """
        Poll query-migrate until C{status}.
        """
        deadline = time.monotonic() + seconds
        while True:
            answer = yield self.assertResponsive(client)
            if answer.get("status") == status:
                return answer
            self.assertLess(time.monotonic(), deadline, f"status {answer.get('status')}, not {status}")
            yield deferLater(reactor, 0.05, lambda: None)


class DestinationDaemonTests(DaemonTestCase):
    """
    A destination daemon fed hostile streams.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        """
        Start a destination with a small guest, listening on a Unix socket.
        """
        self.daemon = yield self.startDaemon("destination", "--role", "destination", "--ram", "16M",
                                             "--workers", "1")
        self.address = str(self.workdir / "mig.sock")
        yield defer.Deferred.fromCoroutine(self.daemon.client.migrateIncoming(f"unix:{self.address}"))
        self.pid = self.daemon.process.pid

    @defer.inlineCallbacks
    def send(self, data: bytes, size: int = 4096) -> Any:
        """
        Connect as a source and send C{data} in C{size}-byte writes, while
        checking the control socket answers; wait for the daemon to drop
        the connection.
        """
        sender = _Sender([data[i:i + size] for i in range(0, len(data), size)])
        yield connectProtocol(UNIXClientEndpoint(reactor, self.address), sender)
        while not sender.closed.called:
            yield self.assertResponsive(self.daemon.client)
            yield deferLater(reactor, 0.02, lambda: None)

    def logText(self) -> str:
        """
        @return: the daemon's log so far.
        """
        return self.daemon.log.read_text(errors="replace")

    @defer.inlineCallbacks
    def test_hostileConfiguration(self) -> Any:
        """
        512 KiB of configuration with a capability count of 0xffffffff
        costs the destination under a second of CPU; it answers its control
        socket throughout and fails the migration naming max-capabilities.
        """
        names = b"\x0ex-ignore-share" * (512 * 1024 // 15)
        data = encodeHeader("pc-i440fx-7.2", encodeSubsection(
            CONFIG_CAPABILITIES, struct.pack(">I", 0xFFFFFFFF) + names))
        before = cpuSeconds(self.pid)
        yield self.send(data)
        yield self.waitForStatus(self.daemon.client, "failed")
        spent = cpuSeconds(self.pid) - before
        self.assertLess(spent, CPU_BOUND, f"{spent:.2f} s of CPU")
        self.assertIn("max-capabilities", self.logText())



class SnapshotDaemonTests(DaemonTestCase):
    """
    A snapshot daemon capturing from a hostile source.
    """

    @defer.inlineCallbacks
    def test_duplicateBlockNames(self) -> Any:
        """
        A RAM START listing 500 blocks under 250 names is refused at the
        first duplicate, before any block (memfd) exists: no descriptor is
        left behind (504 leaked before), and the capture fails naming the
        duplicate.
        """
        snapshot = yield self.startDaemon("snapshot", "--role", "snapshot")
        address = str(self.workdir / "mig.sock")
        yield defer.Deferred.fromCoroutine(
            snapshot.client.snapshotCapture(f"unix:{address}", str(self.workdir / "snap")))
        blocks = [RAMBlockInfo(f"block{i % 250}", MiB) for i in range(500)]
        data = (encodeHeader("pc-i440fx-7.2") + encodeSectionHeader(SectionType.SECTION_START, 2, "ram", 0, 4)
                + encodeBlockList(blocks))
        pid = snapshot.process.pid
        before = fdCount(pid)
        sender = _Sender([data])
        yield connectProtocol(UNIXClientEndpoint(reactor, address), sender)
        deadline = time.monotonic() + 20
        while True:
            capture = (yield defer.Deferred.fromCoroutine(snapshot.client.querySnapshot()))["capture"]
            if capture["status"] == "failed" or time.monotonic() > deadline:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(capture["status"], "failed")
        self.assertIn("'block0' listed twice", capture["error"])
        self.assertLessEqual(fdCount(pid), before)
        yield sender.closed


class _Destination(Protocol):
    """
    A fake destination: decodes what the source sends and, once the block
    list is in, floods the return path with requests for a whole block.
    """

    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.decoder = StreamDecoder()
        self.flooded: defer.Deferred = defer.Deferred()
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.flooded.called:
            return
        self.decoder.receiveData(data)
        for event in self.decoder.events():
            if event.__class__ is e.RAMBlocksListed:
                block = max(event.blocks, key=lambda b: b.length)
                encoder = ReturnPathEncoder()
                self.transport.write(b"".join(
                    encoder.requestPages(block.idstr, 0, block.length) for _ in range(self.requests)))
                self.flooded.callback(block)
                return


class SourceDaemonTests(DaemonTestCase):
    """
    A source daemon flooded with page requests.
    """

    @defer.inlineCallbacks
    def test_wholeBlockRequests(self) -> Any:
        """
        2000 REQ_PAGES for a whole 64 MiB block: the source answers its
        control socket throughout (within L{CONTROL_BOUND}; it stopped
        answering), its CPU stays bounded and its memory does not grow by
        more than the guest's RAM (the pages it then sends; 1.3 GB before).
        """
        source = yield self.startDaemon("source", "--role", "source", "--ram", "64M", "--workers", "1")
        client = source.client
        yield defer.Deferred.fromCoroutine(client.setCapabilities({"postcopy-ram": True}))
        yield defer.Deferred.fromCoroutine(client.setParameters({"max-bandwidth": 1024 * 1024}))
        destination = _Destination(2000)
        address = str(self.workdir / "mig.sock")
        port = yield UNIXServerEndpoint(reactor, address).listen(Factory.forProtocol(lambda: destination))
        self.addCleanup(port.stopListening)
        pid = source.process.pid
        rss = rssBytes(pid)
        before = cpuSeconds(pid)
        yield defer.Deferred.fromCoroutine(client.migrate(f"unix:{address}"))
        block = yield destination.flooded
        self.assertEqual(block.length, 64 * MiB)
        for _ in range(20):
            yield self.assertResponsive(client)
            yield deferLater(reactor, 0.05, lambda: None)
        # The CPU includes sending the requested pages (64 MiB at once):
        # queueing 2000 whole-block requests used to cost seconds alone.
        spent = cpuSeconds(pid) - before
        self.assertLess(spent, CPU_BOUND + 7.0, f"{spent:.2f} s of CPU")
        grown = rssBytes(pid) - rss
        self.assertLess(grown, 64 * MiB + 64 * MiB, f"RSS grew by {grown} bytes")
        yield defer.Deferred.fromCoroutine(client.cancel())
        destination.transport.loseConnection()
