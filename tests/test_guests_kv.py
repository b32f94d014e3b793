# -*- test-case-name: tests.test_guests_kv -*-
"""
Tests for L{twisted_postcopy.guests.kv}: the table on bytes, request
parsing, and a real kv worker process serving TCP clients from guest RAM.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.errors import GuestError
from twisted_postcopy.guests.host import GuestHost
from twisted_postcopy.guests.kv import SLOT, Table, parseRequest
from twisted_postcopy.ram.block import RAMBlock

KV = "twisted_postcopy.guests.kv"


def converse(port: int, lines: list[bytes]) -> list[bytes]:
    """
    One client connection: send each line, read each answer.

    @param port: the kv port on 127.0.0.1.
    @param lines: requests.
    @return: the answers, without newlines.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as answers:
        result = []
        for line in lines:
            sock.sendall(line + b"\n")
            result.append(answers.readline().rstrip(b"\n"))
        return result


class TableTests(SynchronousTestCase):
    """
    Tests for L{Table} and L{parseRequest}.
    """

    def test_setGet(self) -> None:
        """
        Values set are read back, overwrites replace, collisions probe on,
        and the bytes are all in the given buffer (another L{Table} over a
        copy sees them).
        """
        memory = bytearray(8 * SLOT)
        table = Table(memoryview(memory))
        for k in range(8):
            table.set(b"k%d" % k, b"v%d" % k)
        table.set(b"k3", b"again")
        copy = Table(memoryview(bytearray(memory)))
        self.assertEqual([copy.get(b"k%d" % k) for k in range(8)],
                         [b"v0", b"v1", b"v2", b"again", b"v4", b"v5", b"v6", b"v7"])
        self.assertIsNone(copy.get(b"absent"))
        self.assertRaises(GuestError, table.set, b"ninth", b"x")

    def test_parse(self) -> None:
        """
        C{SET k v} and C{GET k} parse; anything else, an oversized key or a
        value starting with C{ERR} is a L{ValueError}.
        """
        self.assertEqual(parseRequest(b"SET a b"), ("SET", b"a", b"b"))
        self.assertEqual(parseRequest(b"GET a"), ("GET", b"a", b""))
        for bad in (b"PUT a b", b"GET", b"SET " + b"k" * 65 + b" v", b"SET a ERRx"):
            self.assertRaises(ValueError, parseRequest, bad)


class WorkerTests(TestCase):
    """
    A real kv worker process.
    """

    timeout = 60

    @inlineCallbacks
    def test_serve(self) -> None:
        """
        SET/GET over TCP from two connections; every acknowledged value is
        in the block (read back with C{pread}); after C{stop} requests get
        C{ERR stopped}, after C{run} they are served again.
        """
        block = RAMBlock("ram", 64 * SLOT)
        self.addCleanup(block.close)
        host = GuestHost(reactor, self.mktemp() + ".sock", [block], "plain")
        self.addCleanup(host.kill)
        host.spawn(KV, "kv", 1)
        yield host.whenAttached()
        yield host.run()
        port = host.workers["kv-0"].info["port"]
        answers = yield deferToThread(converse, port, [b"SET a 1", b"SET b 2", b"GET a", b"GET zz", b"BAD"])
        self.assertEqual(answers[:4], [b"OK", b"OK", b"1", b"ERR no such key"])
        self.assertTrue(answers[4].startswith(b"ERR usage"))
        self.assertEqual((yield deferToThread(converse, port, [b"SET a 3", b"GET b"])), [b"OK", b"2"])
        stored = Table(memoryview(bytearray(os.pread(block.fd, block.length, 0))))
        self.assertEqual((stored.get(b"a"), stored.get(b"b")), (b"3", b"2"))
        yield host.stop()
        self.assertEqual((yield deferToThread(converse, port, [b"SET c 1", b"GET a"])),
                         [b"ERR stopped", b"ERR stopped"])
        self.assertIsNone(Table(memoryview(bytearray(os.pread(block.fd, block.length, 0)))).get(b"c"))
        yield host.run()
        self.assertEqual((yield deferToThread(converse, port, [b"GET a"])), [b"3"])
