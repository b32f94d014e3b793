"""
The QEMU-to-QEMU side of C{bench/cuts.py}: the same silent cut, made
between two QEMU 7.2 processes in the namespaces of
L{twisted_postcopy.testing.netns}, to see whether QEMU notices it.

Synchronous (QMP through L{twisted_postcopy.testing.qemu}); it never
touches the reactor.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from twisted_postcopy.testing.bootsector import writeBootImage
from twisted_postcopy.testing.netns import DESTINATION_ADDRESS, NetnsPath
from twisted_postcopy.testing.qemu import QEMUInstance, machineArguments
from twisted_postcopy.testing.qemuguest import layoutFor

#: QEMU's postcopy bandwidth here: slow enough to be cut in postcopy.
POSTCOPY_BANDWIDTH = 8 << 20
#: Seconds the cut is held.
HOLD = 3.0
#: Seconds allowed for each QEMU wait.
WAIT = 60.0


def _start(path: NetnsPath, namespace: str, directory: Path, name: str, image: str, mib: int,
           *extra: str) -> QEMUInstance:
    """
    Start a QEMU inside a namespace.

    @return: the running instance.
    """
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    return QEMUInstance.start(str(home), [*machineArguments(image, mib), *extra], name,
                              wrapper=path.execIn(namespace))


def _status(qemu: QEMUInstance) -> str:
    """
    @param qemu: a QEMU.
    @return: its migration status.
    """
    return qemu.queryMigrate().get("status", "none")


def qemuCut(path: NetnsPath, mib: int, directory: Path, timeout: float,
            rng: random.Random) -> dict[str, Any]:
    """
    One QEMU 7.2 postcopy migration from A to B, cut at a random moment of
    postcopy for L{HOLD} seconds.

    @param path: the namespaces.
    @param mib: guest RAM in MiB.
    @param directory: scratch space.
    @param timeout: the link timeout to compare with (seconds).
    @param rng: the random moment's source.
    @return: C{source}, C{destination}: whether that QEMU reached
        C{postcopy-paused} (or C{failed}) within C{timeout} of the cut;
        C{source_status}, C{destination_status}: their status at the end
        of the hold.
    """
    directory.mkdir(parents=True, exist_ok=True)
    image = writeBootImage(str(directory / "boot.img"), layoutFor(mib))
    uri = f"tcp:{DESTINATION_ADDRESS}:4444"
    destination = _start(path, path.destination, directory, "destination", image, mib, "-incoming", "defer")
    source = None
    try:
        source = _start(path, path.source, directory, "source", image, mib)
        for qemu in (source, destination):
            qemu.setCapabilities(postcopy_ram=True)
        source.setParameters(max_bandwidth=POSTCOPY_BANDWIDTH, max_postcopy_bandwidth=POSTCOPY_BANDWIDTH)
        destination.migrateIncoming(uri)
        source.waitSerial(1, WAIT)
        source.migrate(uri)
        time.sleep(0.2)
        source.qmp("migrate-start-postcopy")
        destination.waitMigration(["postcopy-active"], WAIT)
        source.waitMigration(["postcopy-active"], WAIT)
        time.sleep(rng.uniform(0.1, 0.6))
        path.cut()
        cutAt = time.monotonic()
        noticed = {"source": False, "destination": False}
        try:
            while time.monotonic() - cutAt < HOLD:
                for name, qemu in (("source", source), ("destination", destination)):
                    if time.monotonic() - cutAt <= timeout and _status(qemu) in ("postcopy-paused", "failed"):
                        noticed[name] = True
                time.sleep(0.05)
            final = {f"{name}_status": _status(qemu) for name, qemu in
                     (("source", source), ("destination", destination))}
        finally:
            path.restore()
        return {**noticed, **final}
    finally:
        for qemu in (source, destination):
            if qemu is not None:
                qemu.kill()
