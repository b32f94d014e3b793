# -*- test-case-name: tests.test_ram_uffdmsg -*-
"""
Tests for L{twisted_postcopy.ram.uffdmsg}: decoding C{struct uffd_msg}
records built independently with C{struct}.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.ram._uffd import lib
from twisted_postcopy.ram.uffdmsg import (
    MESSAGE_SIZE,
    Fork,
    PageFault,
    Remap,
    Remove,
    UnknownEvent,
    Unmap,
    decodeMessages,
    encodePageFault,
    iterRecords,
)


def record(event: int, payload: bytes) -> bytes:
    """
    @param event: the event byte.
    @param payload: the C{arg} union's bytes (padded to 24).
    @return: one 32-byte record (reserved bytes set to garbage).
    """
    return struct.pack("<BBHI", event, 0xEE, 0xEEEE, 0xEEEEEEEE) + payload.ljust(24, b"\0")


class DecodeTests(SynchronousTestCase):
    """
    Decoding of each event kind.
    """

    def test_size(self):
        """
        The record size matches the C compiler's C{sizeof(struct uffd_msg)}.
        """
        self.assertEqual(MESSAGE_SIZE, lib.TP_UFFD_MSG_SIZE)

    def test_pageFault(self):
        """
        A PAGEFAULT record gives flags, address and the thread id (the
        padding after C{ptid} is ignored).
        """
        data = record(0x12, struct.pack("<QQII", 3, 0x7F0000001000, 4242, 0xFFFFFFFF))
        self.assertEqual(decodeMessages(data), [PageFault(3, 0x7F0000001000, 4242)])
        self.assertTrue(decodeMessages(data)[0].write)

    def test_otherEvents(self):
        """
        FORK, REMAP, REMOVE and UNMAP records, and an unknown event.
        """
        data = (record(0x13, struct.pack("<I", 7)) + record(0x14, struct.pack("<QQQ", 1, 2, 3))
                + record(0x15, struct.pack("<QQ", 4, 5)) + record(0x16, struct.pack("<QQ", 6, 7))
                + record(0x42, b""))
        self.assertEqual(decodeMessages(data), [Fork(7), Remap(1, 2, 3), Remove(4, 5), Unmap(6, 7),
                                                UnknownEvent(0x42)])

    def test_batch(self):
        """
        A batch decodes in order; the raw iterator gives the same fields.
        """
        data = b"".join(encodePageFault(0x1000 * i, 0, i) for i in range(5))
        self.assertEqual([m.address for m in decodeMessages(data)], [0x1000 * i for i in range(5)])
        self.assertEqual([fields[3] for fields in iterRecords(memoryview(data))], list(range(5)))

    def test_partialRecord(self):
        """
        A length that is not a whole number of records is refused.
        """
        self.assertRaises(ValueError, decodeMessages, b"\0" * 33)
