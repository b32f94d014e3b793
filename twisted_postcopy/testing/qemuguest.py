# -*- test-case-name: tests.test_qemu_recovery -*-
"""
The boot-sector guest in real QEMUs, for the migrations of
L{twisted_postcopy.testing.qemubaseline} and
L{twisted_postcopy.testing.qemurecovery}: its layout, starting one QEMU or
a source and destination pair, listening for a migration, and stopping and
verifying the guest.  L{twisted_postcopy.testing.qemubaseline} re-exports
every name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from twisted_postcopy.testing.bootsector import (
    PAGE_SIZE,
    CounterSnapshot,
    GuestLayout,
    checkCounterPattern,
    writeBootImage,
)
from twisted_postcopy.testing.qemu import QEMUInstance, machineArguments

MIB = 1 << 20
#: A C{max-bandwidth} no link reaches (QEMU has no "unlimited" value).
UNLIMITED = 1 << 40


def layoutFor(memoryMiB: int, pages: int | None = None) -> GuestLayout:
    """
    The default guest layout for a RAM size: count pages from 1 MiB up to
    C{pages} pages, or up to 1 MiB below the top of RAM.

    @param memoryMiB: guest RAM size in MiB (at least 4).
    @param pages: how many pages to count, or L{None} for all that fit.
    @return: the layout.
    """
    end = (memoryMiB - 1) * MIB
    if pages is not None:
        end = min(end, MIB + pages * PAGE_SIZE)
    return GuestLayout(start=MIB, end=end)


#: The i440fx machine maps at most 3 GiB of RAM below 4 GiB (the rest of a
#: bigger guest lies above 4 GiB, out of the 32-bit boot-sector guest's reach).
LOW_RAM_MIB = 3072


def lowRAMLayout(memoryMiB: int) -> GuestLayout:
    """
    The counting layout of a guest of any size: L{layoutFor} its RAM below
    4 GiB (guests above 3 GiB count pages only in their low 3 GiB; their
    RAM above 4 GiB stays zero).

    @param memoryMiB: guest RAM size in MiB.
    @return: the layout.
    """
    return layoutFor(min(memoryMiB, LOW_RAM_MIB))


def eventTime(event: dict) -> float:
    """
    @param event: a QMP event message.
    @return: its timestamp in seconds since the epoch.
    """
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def startGuest(
    directory: str, name: str, image: str, memoryMiB: int, *extra: str
) -> QEMUInstance:
    """
    Start one QEMU in its own subdirectory of C{directory}.

    @param directory: the parent directory.
    @param name: the instance and subdirectory name.
    @param image: the boot image.
    @param memoryMiB: guest RAM size.
    @param extra: extra QEMU arguments.
    @return: the running instance.
    """
    home = os.path.join(directory, name)
    os.makedirs(home, exist_ok=True)
    return QEMUInstance.start(home, [*machineArguments(image, memoryMiB), *extra], name)


def listenIncoming(destination: QEMUInstance) -> tuple[str, int]:
    """
    Make a C{-incoming defer} QEMU listen on an ephemeral loopback port.

    @param destination: the destination QEMU.
    @return: the C{(host, port)} it listens on.
    """
    destination.migrateIncoming("tcp:127.0.0.1:0")
    return incomingAddress(destination)


def incomingAddress(destination: QEMUInstance) -> tuple[str, int]:
    """
    @param destination: a QEMU listening for an incoming migration (after
        C{migrate-incoming} or C{migrate-recover} on port 0).
    @return: the C{(host, port)} it listens on.
    """
    (address,) = destination.queryMigrate()["socket-address"]
    return address["host"], int(address["port"])


def stopAndCheck(qemu: QEMUInstance, layout: GuestLayout) -> CounterSnapshot:
    """
    Stop a guest and verify its counters.

    @param qemu: a running QEMU.
    @param layout: its guest layout.
    @return: the verified snapshot.
    @raise GuestPatternError: when the memory is not consistent.
    """
    qemu.qmp("stop")
    return checkCounterPattern(qemu.pmemsave(0, layout.end), layout)


@contextmanager
def guestPair(
    directory: str, layout: GuestLayout, memoryMiB: int
) -> Iterator[tuple[QEMUInstance, QEMUInstance]]:
    """
    Run a migration source booting the guest and a C{-incoming defer}
    destination, both killed on exit.

    @param directory: an existing directory for the image and QEMU files.
    @param layout: the guest layout written into the boot image.
    @param memoryMiB: guest RAM size in MiB.
    @return: a context manager giving C{(source, destination)}.
    """
    image = writeBootImage(os.path.join(directory, "boot.img"), layout)
    source = startGuest(directory, "source", image, memoryMiB)
    try:
        destination = startGuest(
            directory, "destination", image, memoryMiB, "-incoming", "defer"
        )
        try:
            yield source, destination
        finally:
            destination.kill()
    finally:
        source.kill()
