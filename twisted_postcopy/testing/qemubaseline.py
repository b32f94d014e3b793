# -*- test-case-name: tests.test_qemu_streams -*-
"""
Real QEMU-to-QEMU migrations of the boot-sector guest: the recordings the
stream tests decode, and the baseline figures the benches compare with.

L{migratePostcopy} runs a postcopy migration between two QEMU 7.2 processes
(optionally through a L{RecordingRelay}, which keeps the main stream and the
return path), L{recordPrecopy} saves a precopy stream to a file with
C{exec:cat}, and L{loadPrecopy} restores one into a fresh QEMU.
L{qemuToQemuPostcopy} and L{qemuPrecopyLoad} reduce those to flat
dictionaries of figures with unit-suffixed keys for C{bench/} scripts.
The single-guest helpers (L{layoutFor}, L{startGuest}, L{stopAndCheck},
...) live in L{twisted_postcopy.testing.qemuguest} and are importable from
here.

Times are taken from QMP event timestamps (QEMU's own clock) against
C{time.time()} read just before the command, so the 20 ms QMP polling does
not blur them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from attrs import frozen

from twisted_postcopy.testing.bootsector import CounterSnapshot, GuestLayout, writeBootImage
from twisted_postcopy.testing.qemu import QEMUInstance, waitFor
from twisted_postcopy.testing.qemuguest import (
    MIB,
    UNLIMITED,
    eventTime,
    guestPair,
    incomingAddress,
    layoutFor,
    listenIncoming,
    startGuest,
    stopAndCheck,
)
from twisted_postcopy.testing.relay import RecordingRelay

__all__ = [
    "MIB", "UNLIMITED", "PostcopyPlan", "PostcopyResult", "eventTime", "guestPair",
    "incomingAddress", "layoutFor", "listenIncoming", "loadPrecopy", "migratePostcopy",
    "preparePostcopy", "qemuPrecopyLoad", "qemuToQemuPostcopy", "recordPrecopy",
    "startGuest", "startPostcopyAfter", "stopAndCheck",
]


@frozen
class PostcopyPlan:
    """
    How L{migratePostcopy} runs a migration.

    @ivar memoryMiB: guest RAM size in MiB.
    @ivar layout: the guest layout.
    @ivar record: relay through a L{RecordingRelay} and keep what crossed.
    @ivar precopyBandwidth: the source's C{max-bandwidth} (bytes/s),
        which keeps precopy running until the switch.
    @ivar postcopyBandwidth: the source's C{max-postcopy-bandwidth}
        (bytes/s, 0 for unlimited); a low value makes the destination fault
        and request pages.
    @ivar startAfterBytes: issue C{migrate-start-postcopy} once this many
        bytes were transferred (0: right after C{migrate}).
    @ivar preempt: switch on C{postcopy-preempt} on both sides.
    @ivar timeout: seconds allowed for each wait.
    @ivar stopSource: stop the source's guest once it counted its first
        pass, before C{migrate} (its RAM then does not change: no dirty
        pages; the destination still runs the guest from RUN).
    """

    memoryMiB: int
    layout: GuestLayout
    record: bool
    precopyBandwidth: int
    postcopyBandwidth: int
    startAfterBytes: int
    preempt: bool
    timeout: float
    stopSource: bool = False


@frozen
class PostcopyResult:
    """
    The outcome of one QEMU-to-QEMU postcopy migration.

    @ivar source: the source's final C{query-migrate}.
    @ivar destination: the destination's final C{query-migrate}.
    @ivar resumeAfter: seconds from C{migrate} to the destination's
        C{RESUME} event.
    @ivar main: the recorded main stream (empty without a relay).
    @ivar returnPath: the recorded return path (empty without a relay).
    @ivar snapshot: the destination's verified counters after the run.
    @ivar preempt: the recorded preempt channel (empty without preempt or
        without a relay).
    @ivar connections: how many connections the relay accepted (0 without
        a relay).
    """

    source: dict[str, Any]
    destination: dict[str, Any]
    resumeAfter: float
    main: bytes
    returnPath: bytes
    snapshot: CounterSnapshot
    preempt: bytes = b""
    connections: int = 0


def migratePostcopy(
    directory: str,
    memoryMiB: int = 32,
    layout: GuestLayout | None = None,
    record: bool = True,
    precopyBandwidth: int = 4 * MIB,
    postcopyBandwidth: int = 0,
    startAfterBytes: int = MIB,
    preempt: bool = False,
    timeout: float = 60.0,
    stopSource: bool = False,
) -> PostcopyResult:
    """
    Migrate a running boot-sector guest from one QEMU to another with
    C{postcopy-ram}, switching to postcopy mid-precopy.

    @param directory: an existing directory for images and QEMU files.
    @param memoryMiB: see L{PostcopyPlan}.
    @param layout: see L{PostcopyPlan} (default: L{layoutFor}).
    @param record: see L{PostcopyPlan}.
    @param precopyBandwidth: see L{PostcopyPlan}.
    @param postcopyBandwidth: see L{PostcopyPlan}.
    @param startAfterBytes: see L{PostcopyPlan}.
    @param preempt: see L{PostcopyPlan}.
    @param timeout: see L{PostcopyPlan}.
    @param stopSource: see L{PostcopyPlan}.
    @return: the figures, recordings and verified destination memory.
    @raise QEMUError: when a QEMU or the migration fails.
    @raise GuestPatternError: when the destination memory is inconsistent.
    """
    plan = PostcopyPlan(
        memoryMiB, layout or layoutFor(memoryMiB), record, precopyBandwidth,
        postcopyBandwidth, startAfterBytes, preempt, timeout, stopSource,
    )
    with guestPair(directory, plan.layout, memoryMiB) as (source, destination):
        return _runPostcopy(source, destination, plan)


def _runPostcopy(
    source: QEMUInstance, destination: QEMUInstance, plan: PostcopyPlan
) -> PostcopyResult:
    """
    The body of L{migratePostcopy}, once both QEMUs run.

    @return: see L{migratePostcopy}.
    """
    target = preparePostcopy(
        source, destination, plan.precopyBandwidth, plan.postcopyBandwidth,
        plan.preempt,
    )
    relay = RecordingRelay(target) if plan.record else None
    try:
        source.waitSerial(1, plan.timeout)
        if plan.stopSource:
            source.qmp("stop")
        started = time.time()
        source.migrate(relay.uri if relay else "tcp:%s:%d" % target)
        startPostcopyAfter(source, plan.startAfterBytes, plan.timeout)
        resumed = eventTime(destination.waitEvent("RESUME", plan.timeout))
        sourceInfo = source.waitMigration(["completed"], plan.timeout)
        destinationInfo = destination.waitMigration(["completed"], plan.timeout)
        if relay:
            relay.waitClosed(plan.timeout)
    finally:
        if relay:
            relay.close()
    recorded = [bytes(c.forward) for c in relay.connections] if relay else []
    return PostcopyResult(
        source=sourceInfo,
        destination=destinationInfo,
        resumeAfter=resumed - started,
        main=recorded[0] if recorded else b"",
        returnPath=bytes(relay.connections[0].backward) if relay else b"",
        snapshot=stopAndCheck(destination, plan.layout),
        preempt=recorded[1] if len(recorded) > 1 else b"",
        connections=len(recorded),
    )


def preparePostcopy(
    source: QEMUInstance,
    destination: QEMUInstance,
    precopyBandwidth: int,
    postcopyBandwidth: int,
    preempt: bool = False,
) -> tuple[str, int]:
    """
    Switch on C{postcopy-ram} (and C{postcopy-preempt} if asked) on both
    sides and C{postcopy-blocktime} on the destination, set the source's
    bandwidths, and make the destination listen.

    @param source: the source QEMU.
    @param destination: the destination QEMU (started with C{-incoming
        defer}).
    @param precopyBandwidth: the source's C{max-bandwidth} (bytes/s).
    @param postcopyBandwidth: the source's C{max-postcopy-bandwidth}.
    @param preempt: whether to use a postcopy preempt channel.
    @return: the C{(host, port)} the destination listens on.
    """
    for qemu in (source, destination):
        qemu.setCapabilities(postcopy_ram=True)
        if preempt:
            qemu.setCapabilities(postcopy_preempt=True)
    destination.setCapabilities(postcopy_blocktime=True)
    source.setParameters(
        max_bandwidth=precopyBandwidth, max_postcopy_bandwidth=postcopyBandwidth
    )
    return listenIncoming(destination)


def startPostcopyAfter(source: QEMUInstance, count: int, timeout: float) -> None:
    """
    Issue C{migrate-start-postcopy} once C{count} bytes were transferred.

    @param source: the migrating source.
    @param count: the byte threshold (0: at once).
    @param timeout: seconds allowed.
    """

    def transferred() -> bool | None:
        """
        @return: L{True} once enough bytes went, else L{None}.
        """
        info = source.queryMigrate()
        return info.get("ram", {}).get("transferred", 0) >= count or None

    if count:
        waitFor(transferred, timeout, f"for {count} bytes of precopy")
    source.qmp("migrate-start-postcopy")


def recordPrecopy(
    directory: str,
    path: str,
    memoryMiB: int = 32,
    layout: GuestLayout | None = None,
    timeout: float = 60.0,
    maxBandwidth: int = UNLIMITED,
) -> dict[str, Any]:
    """
    Save a running guest's precopy stream to a file (C{exec:cat > path}).

    The guest keeps dirtying its whole range, so precopy converges only
    when the range fits in QEMU's downtime limit at the achieved bandwidth;
    the default removes the bandwidth cap so that a pipe's speed is used.

    @param directory: an existing directory for images and QEMU files.
    @param path: the stream file to write.
    @param memoryMiB: guest RAM size in MiB.
    @param layout: the guest layout (default: L{layoutFor}).
    @param timeout: seconds allowed for each wait.
    @param maxBandwidth: the source's C{max-bandwidth} (bytes/s).
    @return: the source's final C{query-migrate}.
    """
    layout = layout or layoutFor(memoryMiB)
    image = writeBootImage(os.path.join(directory, "boot.img"), layout)
    source = startGuest(directory, "saver", image, memoryMiB)
    try:
        source.waitSerial(1, timeout)
        source.setParameters(max_bandwidth=maxBandwidth)
        source.migrate(f"exec:cat > {path}")
        return source.waitMigration(["completed"], timeout)
    finally:
        source.kill()


def loadPrecopy(
    directory: str,
    path: str,
    memoryMiB: int = 32,
    layout: GuestLayout | None = None,
    timeout: float = 60.0,
) -> tuple[float, CounterSnapshot]:
    """
    Restore a precopy stream file into a fresh QEMU and verify the guest.

    @param directory: an existing directory for QEMU files (the image
        written by L{recordPrecopy} is reused when present).
    @param path: the stream file.
    @param memoryMiB: guest RAM size in MiB (as recorded).
    @param layout: the guest layout (as recorded).
    @param timeout: seconds allowed for each wait.
    @return: seconds from C{migrate-incoming} to C{RESUME}, and the
        verified counters of the restored guest.
    """
    layout = layout or layoutFor(memoryMiB)
    image = os.path.join(directory, "boot.img")
    if not os.path.exists(image):
        writeBootImage(image, layout)
    loader = startGuest(directory, "loader", image, memoryMiB, "-incoming", "defer")
    try:
        started = time.time()
        loader.migrateIncoming(f"exec:cat {path}")
        resumed = eventTime(loader.waitEvent("RESUME", timeout))
        loader.waitMigration(["completed"], timeout)
        return resumed - started, stopAndCheck(loader, layout)
    finally:
        loader.kill()


def qemuToQemuPostcopy(ramMiB: int, directory: str, **options: Any) -> dict[str, Any]:
    """
    The QEMU-to-QEMU postcopy baseline for benches.

    @param ramMiB: guest RAM size in MiB.
    @param directory: an existing scratch directory.
    @param options: passed to L{migratePostcopy} (C{record} defaults to
        C{False}).
    @return: C{resume_ms} (migrate to destination running), C{total_ms}
        (L{None} when QEMU reports a C{total-time} of 0, which one round
        in about forty did here: a median must not count it),
        C{downtime_ms}, C{postcopy_requests}, C{blocktime_ms}, C{mbps},
        C{precopy_bytes}, C{postcopy_bytes}, C{normal_pages} and
        C{zero_pages} (the source's C{normal} and C{duplicate}).
    """
    options.setdefault("record", False)
    result = migratePostcopy(directory, ramMiB, **options)
    ram = result.source["ram"]
    return {
        "resume_ms": result.resumeAfter * 1000,
        "total_ms": result.source["total-time"] or None,
        "downtime_ms": result.source.get("downtime"),
        "postcopy_requests": ram["postcopy-requests"],
        "blocktime_ms": result.destination.get("postcopy-blocktime"),
        "mbps": ram["mbps"],
        "precopy_bytes": ram.get("precopy-bytes"),
        "postcopy_bytes": ram.get("postcopy-bytes"),
        "normal_pages": ram.get("normal"),
        "zero_pages": ram.get("duplicate"),
    }


def qemuPrecopyLoad(
    path: str, directory: str, ramMiB: int = 32, layout: GuestLayout | None = None
) -> dict[str, Any]:
    """
    The QEMU precopy restore baseline for benches.

    @param path: a stream saved by L{recordPrecopy} with the same C{ramMiB}.
    @param directory: an existing scratch directory.
    @param ramMiB: guest RAM size in MiB.
    @param layout: the guest layout it was recorded with (default:
        L{layoutFor}).
    @return: C{load_ms} (C{migrate-incoming exec:cat} to running) and
        C{stream_bytes}.
    """
    seconds, _ = loadPrecopy(directory, path, ramMiB, layout)
    return {"load_ms": seconds * 1000, "stream_bytes": os.path.getsize(path)}
