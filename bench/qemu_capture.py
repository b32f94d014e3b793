"""
Capturing a running QEMU 7.2 guest by postcopy into our destination (a
snapshot capture), beside the same postcopy into a QEMU 7.2 destination.

One source QEMU boots the boot-sector counting guest (every page of its
low RAM holds data), counts one pass and is then stopped, so that both
migrations move the same RAM contents (between them QEMU needs a C{cont}
before it migrates again: the guest runs a moment, its counters change,
which pages hold data does not).  From that one source, in the same
run, each switched to postcopy right after C{migrate} (no bandwidth limit):

  - B{qemu}: into a fresh C{-incoming defer} QEMU with C{postcopy-blocktime}
    (its vCPU runs from RUN and faults on the pages it counts);
  - B{capture}: into our capture (L{captureSnapshot}, the code behind
    C{postcopy snapshot capture}, in its own process, C{postcopy-blocktime}
    on), which stores a snapshot; the snapshot's counters are checked.

Total times are the source's C{total-time} for both (QEMU's own measure of
the migration); C{capture_stored_ms} adds the time until the snapshot was
written.  Blocktime is each destination's C{postcopy-blocktime} (QEMU's
algorithm on both sides): a capture runs no vCPU, so only its own reads
could block, and it reports what its blocktime context measured.

Keys: C{capture_total_ms}, C{qemu_total_ms}, C{ratio_capture_total}
(ours / QEMU's, lower is better), C{capture_blocktime_ms},
C{qemu_blocktime_ms}, page requests, C{_mbps} of both, C{load_1min}.

Usage: C{python bench/qemu_capture.py [--size 1024] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_postcopy.childprocess import childEnvironment  # noqa: E402
from twisted_postcopy.testing.bootsector import checkCounterPattern, writeBootImage  # noqa: E402
from twisted_postcopy.testing.qemu import QEMUInstance, qemuMissing  # noqa: E402
from twisted_postcopy.testing.qemubaseline import (  # noqa: E402
    UNLIMITED, listenIncoming, startGuest, startPostcopyAfter, stopAndCheck,
)
from twisted_postcopy.testing.qemuguest import lowRAMLayout  # noqa: E402

TIMEOUT = 300.0


def captureRole(directory: str) -> int:
    """
    The capturing side, run in its own process: print the port it listens
    on, then, once the snapshot is stored, one JSON line with our
    C{query-migrate} and C{stored} (epoch seconds).

    @param directory: the snapshot directory to create.
    @return: the exit status.
    """
    from twisted_postcopy.snapshot.capture import captureSnapshot
    from twisted_postcopy.snapshot.cli import runUntil

    def start(reactor: Any) -> Any:
        """
        @param reactor: the running reactor.
        @return: a Deferred firing once the snapshot is stored.
        """
        listening, vm = captureSnapshot(reactor, "tcp:127.0.0.1:0", directory, True)
        vm.migration.setCapabilities({"postcopy-blocktime": True})
        listening.addCallback(lambda port: print(port.getHost().port, flush=True))

        def stored(snapshot: Any) -> Any:
            print(json.dumps({"stored": time.time(), **vm.migration.queryMigrate()}), flush=True)
            return snapshot

        return listening.addCallback(lambda _: vm.stored).addCallback(stored)

    return runUntil(start)


def intoQEMU(source: QEMUInstance, directory: str, image: str, sizeMiB: int) -> dict[str, Any]:
    """
    Postcopy from the stopped source into a fresh QEMU.

    @return: C{total_ms}, C{blocktime_ms}, C{requests}, C{mbps}.
    """
    target = startGuest(directory, "destination", image, sizeMiB, "-incoming", "defer")
    try:
        target.setCapabilities(**{"postcopy-ram": True, "postcopy-blocktime": True})
        host, port = listenIncoming(target)
        source.migrate(f"tcp:{host}:{port}")
        startPostcopyAfter(source, 0, TIMEOUT)
        info = source.waitMigration(["completed"], TIMEOUT)
        destination = target.waitMigration(["completed"], TIMEOUT)
        stopAndCheck(target, lowRAMLayout(sizeMiB))
    finally:
        target.kill()
    return {"total_ms": info["total-time"], "blocktime_ms": destination.get("postcopy-blocktime"),
            "requests": info["ram"]["postcopy-requests"], "mbps": round(info["ram"]["mbps"], 1)}


def intoCapture(source: QEMUInstance, directory: str, sizeMiB: int) -> dict[str, Any]:
    """
    Postcopy from the stopped source into our capture; check the stored
    snapshot's counters.

    @return: C{total_ms}, C{stored_ms}, C{blocktime_ms}, C{requests},
        C{mbps}.
    @raise RuntimeError: the capture failed.
    """
    from twisted_postcopy.snapshot.store import openSnapshot

    path = os.path.join(directory, "snapshot")
    capture = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--capture-role", path],
                               stdout=subprocess.PIPE, env=childEnvironment())
    try:
        assert capture.stdout is not None
        port = int(capture.stdout.readline())
        began = time.time()
        source.migrate(f"tcp:127.0.0.1:{port}")
        startPostcopyAfter(source, 0, TIMEOUT)
        info = source.waitMigration(["completed"], TIMEOUT)
        line = capture.stdout.readline()
        if capture.wait(TIMEOUT) or not line:
            raise RuntimeError(f"capture failed (exit status {capture.returncode})")
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    ours = json.loads(line)
    layout = lowRAMLayout(sizeMiB)
    checkCounterPattern(openSnapshot(path).read("pc.ram", 0, layout.end), layout)
    return {"total_ms": info["total-time"], "stored_ms": round((ours["stored"] - began) * 1000),
            "blocktime_ms": ours.get("postcopy-blocktime", 0),
            "requests": info["ram"]["postcopy-requests"], "mbps": round(info["ram"]["mbps"], 1)}


def measure(sizeMiB: int, scratch: str) -> dict[str, Any]:
    """
    Both migrations of one source guest.

    @param sizeMiB: guest RAM in MiB.
    @param scratch: an empty scratch directory.
    @return: the figures.
    """
    image = writeBootImage(os.path.join(scratch, "boot.img"), lowRAMLayout(sizeMiB))
    source = startGuest(scratch, "source", image, sizeMiB)
    try:
        source.waitSerial(1, TIMEOUT)
        source.qmp("stop")
        source.setCapabilities(**{"postcopy-ram": True})
        source.setParameters(max_bandwidth=UNLIMITED, max_postcopy_bandwidth=0)
        qemu = intoQEMU(source, scratch, image, sizeMiB)
        # QEMU migrates a guest paused by a completed migration only once
        # it ran again: a moment, then stopped (every page still counted).
        source.qmp("cont")
        source.qmp("stop")
        ours = intoCapture(source, scratch, sizeMiB)
    finally:
        source.kill()
    figures: dict[str, Any] = {"size_mib": sizeMiB}
    figures.update({f"capture_{key}": value for key, value in ours.items()})
    figures.update({f"qemu_{key}": value for key, value in qemu.items()})
    figures["ratio_capture_total"] = round(ours["total_ms"] / qemu["total_ms"], 3)
    figures["load_1min"] = os.getloadavg()[0]
    return figures


def table(figures: dict[str, Any]) -> str:
    """
    @param figures: the results of L{measure}.
    @return: a readable table.
    """
    rows = [("", "total (ms)", "stored (ms)", "page requests", "blocktime (ms)", "Mbit/s")]
    for name, prefix in (("capture (ours)", "capture_"), ("qemu->qemu", "qemu_")):
        rows.append((f"{figures['size_mib']} MiB {name}", str(figures[prefix + "total_ms"]),
                     str(figures.get(prefix + "stored_ms", "-")), str(figures[prefix + "requests"]),
                     str(figures[prefix + "blocktime_ms"]), str(figures[prefix + "mbps"])))
    rows.append(("ratio ours/qemu", str(figures["ratio_capture_total"]), "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([*lines, f"load average (1 min): {figures['load_1min']:.2f}"])


def main() -> int:
    """
    Run the bench; print a table, or one JSON object with C{--json}.

    @return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, metavar="MIB", help="guest RAM (default 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--capture-role", metavar="DIR", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.capture_role:
        return captureRole(options.capture_role)
    reason = qemuMissing()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    scratch = tempfile.mkdtemp(prefix="pc-bench-capture-")
    try:
        figures = measure(options.size, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(figures, sort_keys=True) if options.json else table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
