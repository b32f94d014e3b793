# -*- test-case-name: tests.test_qemu_recovery -*-
"""
A real QEMU-to-QEMU postcopy recovery, recorded.

L{migratePostcopyRecovered} starts a postcopy migration of the boot-sector
guest through one L{RecordingRelay}, cuts every connection while postcopy
runs (as a network failure would), waits for both QEMUs to reach
C{postcopy-paused}, then recovers with C{migrate-recover} on the
destination and C{migrate resume=true} on the source through a second
relay, and waits for C{completed} on both.  Both relays' recordings are
kept: the interrupted stream and its return path, and the recovery channel
(RECV_BITMAP commands, POSTCOPY_RESUME, RAM) and its return path
(RECV_BITMAP replies, RESUME_ACK, re-sent page requests, SHUT).
"""

from __future__ import annotations

import time
from typing import Any

from attrs import frozen

from twisted_postcopy.testing.bootsector import CounterSnapshot, GuestLayout
from twisted_postcopy.testing.qemu import QEMUInstance, waitFor
from twisted_postcopy.testing.qemubaseline import preparePostcopy, startPostcopyAfter
from twisted_postcopy.testing.qemuguest import (
    MIB,
    guestPair,
    incomingAddress,
    layoutFor,
    stopAndCheck,
)
from twisted_postcopy.testing.relay import RecordingRelay, RelayedConnection


@frozen
class RecoveryResult:
    """
    The outcome of one recovered postcopy migration.

    @ivar source: the source's final C{query-migrate}.
    @ivar destination: the destination's final C{query-migrate}.
    @ivar interrupted: the first connection (main stream up to the cut,
        and its return path).
    @ivar recovered: the recovery connection.
    @ivar pausedAfter: seconds from the cut until both sides reported
        C{postcopy-paused}.
    @ivar snapshot: the destination's verified counters after the run.
    """

    source: dict[str, Any]
    destination: dict[str, Any]
    interrupted: RelayedConnection
    recovered: RelayedConnection
    pausedAfter: float
    snapshot: CounterSnapshot


def migratePostcopyRecovered(
    directory: str,
    memoryMiB: int = 32,
    layout: GuestLayout | None = None,
    postcopyBandwidth: int = MIB,
    cutAfterBytes: int = MIB // 2,
    timeout: float = 60.0,
) -> RecoveryResult:
    """
    Migrate with postcopy, cut the connection during postcopy, recover.

    @param directory: an existing directory for images and QEMU files.
    @param memoryMiB: guest RAM size in MiB.
    @param layout: the guest layout (default: L{layoutFor} with 1024
        pages).
    @param postcopyBandwidth: the source's C{max-postcopy-bandwidth}
        (bytes/s); low enough that postcopy still runs at the cut.
    @param cutAfterBytes: cut once this many postcopy bytes were sent.
    @param timeout: seconds allowed for each wait.
    @return: the figures, both recordings and the verified memory.
    @raise QEMUError: when a QEMU, the migration or the recovery fails.
    @raise GuestPatternError: when the destination memory is inconsistent.
    """
    layout = layout or layoutFor(memoryMiB, pages=1024)
    with guestPair(directory, layout, memoryMiB) as (source, destination):
        target = preparePostcopy(source, destination, 4 * MIB, postcopyBandwidth)
        interrupted, pausedAfter = _interrupt(
            source, destination, target, cutAfterBytes, timeout
        )
        recovered = _recover(source, destination, timeout)
        return RecoveryResult(
            source=source.waitMigration(["completed"], timeout),
            destination=destination.waitMigration(["completed"], timeout),
            interrupted=interrupted,
            recovered=recovered,
            pausedAfter=pausedAfter,
            snapshot=stopAndCheck(destination, layout),
        )


def _interrupt(
    source: QEMUInstance,
    destination: QEMUInstance,
    target: tuple[str, int],
    cutAfterBytes: int,
    timeout: float,
) -> tuple[RelayedConnection, float]:
    """
    Start the migration through a relay, switch to postcopy, and cut the
    relay once enough postcopy bytes went through.

    @return: the interrupted connection and the seconds until both sides
        paused.
    """
    relay = RecordingRelay(target)
    try:
        source.waitSerial(1, timeout)
        source.migrate(relay.uri)
        startPostcopyAfter(source, MIB, timeout)
        destination.waitEvent("RESUME", timeout)

        def sentEnough() -> bool | None:
            """
            @return: L{True} once postcopy sent enough bytes, else L{None}.
            """
            info = source.queryMigrate()
            if info["status"] != "postcopy-active":
                return None
            return info["ram"].get("postcopy-bytes", 0) >= cutAfterBytes or None

        waitFor(sentEnough, timeout, f"for {cutAfterBytes} postcopy bytes")
        cut = time.monotonic()
        relay.cut()
        for qemu in (destination, source):
            qemu.waitMigration(["postcopy-paused"], timeout)
        pausedAfter = time.monotonic() - cut
        relay.waitClosed(timeout)
    finally:
        relay.close()
    return relay.connections[0], pausedAfter


def _recover(
    source: QEMUInstance, destination: QEMUInstance, timeout: float
) -> RelayedConnection:
    """
    Recover a paused migration through a second relay.

    @return: the recovery connection, once it closed.
    """
    destination.qmp("migrate-recover", uri="tcp:127.0.0.1:0")
    relay = RecordingRelay(incomingAddress(destination))
    try:
        source.qmp("migrate", uri=relay.uri, resume=True)
        for qemu in (source, destination):
            qemu.waitMigration(["completed"], timeout)
        relay.waitClosed(timeout)
    finally:
        relay.close()
    return relay.connections[0]
