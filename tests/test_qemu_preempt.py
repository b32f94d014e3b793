# -*- test-case-name: tests.test_qemu_preempt -*-
"""
Decode a real QEMU 7.2 postcopy migration with C{postcopy-preempt},
recorded at test time.

Once per test process, two QEMUs (TCG, 32 MiB) migrate the boot-sector
guest through a L{RecordingRelay} with C{postcopy-ram} and
C{postcopy-preempt}, postcopy throttled so that the destination requests
pages.  The relay records the main connection (and its return path) and
the preempt connection, in accept order, as the destination sees them.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import wire
from twisted_postcopy.testing.bootsector import PAGE_SIZE, CounterSnapshot
from twisted_postcopy.testing.qemubaseline import (
    MIB,
    PostcopyResult,
    layoutFor,
    migratePostcopy,
)
from twisted_postcopy.testing.qemuhost import inTemporaryDirectory, recordOnce


def migration() -> PostcopyResult:
    """
    Record the preempt migration on first use; later calls return the same
    result (or raise the same error).

    @return: the recorded migration.
    @raise SkipTest: when QEMU is not installed (a failure in strict mode).
    """
    return recordOnce("preempt", lambda: inTemporaryDirectory("qemu-preempt-", _migrate))


def _migrate(directory: str) -> PostcopyResult:
    """
    Run the preempt migration.

    @param directory: a scratch directory for the QEMUs' files.
    @return: the recorded migration.
    """
    return migratePostcopy(
        directory, 32, layoutFor(32, pages=1024),
        postcopyBandwidth=2 * MIB, preempt=True,
    )


def mainEvents() -> list[Any]:
    """
    @return: the events of the recorded main stream.
    """
    return wire.decodeAll(migration().main)


def blocks() -> tuple[Any, ...]:
    """
    @return: the RAMBlocks of the main stream's START list.
    """
    (listed,) = [e for e in mainEvents() if type(e).__name__ == "RAMBlocksListed"]
    return listed.blocks


def preemptEvents() -> tuple[list[Any], Any]:
    """
    @return: the events of the recorded preempt channel, and its decoder.
    """
    decoder = wire.PreemptDecoder(blocks())
    return decoder.decodeWhole(migration().preempt), decoder


def pages(events: list[Any]) -> set[tuple[str, int]]:
    """
    @param events: decoded events.
    @return: the C{(block, offset)} of every page (normal or zero) in them.
    """
    return {
        (event.block, event.offset) for event in events
        if type(event).__name__ in ("PageReceived", "ZeroPageReceived")
    }


def requestedPages() -> set[tuple[str, int]]:
    """
    @return: the C{(block, offset)} of every page the destination requested
        on the return path.
    """
    events = wire.ReturnPathDecoder().decodeWhole(migration().returnPath)
    return {
        (event.block, offset)
        for event in events if type(event).__name__ == "PagesRequested"
        for offset in range(event.start, event.start + event.length, PAGE_SIZE)
    }


class PreemptMigrationTests(SynchronousTestCase):
    """
    The migration itself (no codec involved).
    """

    def test_completedConsistent(self) -> None:
        """
        Both sides completed, the destination requested pages, and its
        guest memory is consistent.
        """
        result = migration()
        self.assertEqual(result.source["status"], "completed")
        self.assertEqual(result.destination["status"], "completed")
        self.assertGreater(result.source["ram"]["postcopy-requests"], 0)
        self.assertIsInstance(result.snapshot, CounterSnapshot)

    def test_preemptChannelHasNoHeader(self) -> None:
        """
        The second connection carries no stream header (its first record
        is a RAM page) and ends with an EOS record.
        """
        preempt = migration().preempt
        self.assertFalse(preempt.startswith(b"QEVM"))
        self.assertEqual(preempt[-8:], (0x10).to_bytes(8, "big"))


class PreemptDecodeTests(SynchronousTestCase):
    """
    The codec on the main stream and the preempt channel.
    """

    def test_mainReencodes(self) -> None:
        """
        The main stream decodes completely and re-encodes exactly.
        """
        self.assertTrue(wire.encodeEvents(mainEvents()) == migration().main)

    def test_preemptDecodes(self) -> None:
        """
        The preempt channel decodes into whole pages ending with EOS, and
        re-encodes exactly.
        """
        events, decoder = preemptEvents()
        self.assertTrue(decoder.complete)
        self.assertTrue(pages(events))
        self.assertEqual(type(events[-1]).__name__, "RAMSectionEOS")
        encoded = wire.PreemptEncoder().encodeEvents(events)
        self.assertTrue(encoded == migration().preempt)

    def test_preemptCarriesRequestedPages(self) -> None:
        """
        Every page on the preempt channel was requested by the destination.
        """
        events, _ = preemptEvents()
        self.assertTrue(pages(events) <= requestedPages())

    def test_channelsCoverBlocks(self) -> None:
        """
        Together, the main stream and the preempt channel sent every page
        of every RAMBlock.
        """
        sent = pages(mainEvents()) | pages(preemptEvents()[0])
        everything = {
            (block.idstr, offset) for block in blocks()
            for offset in range(0, block.length, PAGE_SIZE)
        }
        self.assertEqual(sent, everything)
