"""
Restoring a snapshot into a real QEMU 7.2 by postcopy, beside QEMU's own
ways of getting the same guest running.

For each guest size the boot-sector counting guest (whose every page holds
data) is saved with C{migrate exec:cat > FILE} and imported with
C{postcopy snapshot import}.  Then, each into a fresh QEMU:

  - B{ours}: C{postcopy snapshot restore --postcopy --no-verify}; time from
    our C{migrate} to the destination's C{RESUME} event, total restore time
    (our C{total-time}), QEMU's page requests (our C{postcopy-requests}) and
    the destination's C{postcopy-blocktime};
  - B{qemu-postcopy}: QEMU to QEMU postcopy of the same guest (switched to
    postcopy after 1 MiB of precopy);
  - B{precopy-load}: C{-incoming exec:cat FILE} of the saved stream, time
    to C{RESUME} (all RAM first).

With C{--preempt}, C{postcopy-preempt} is on for both ours and QEMU's
(each destination QEMU too): a source that does not support it yet fails
the run with its own error, nothing is faked.

Guests above 3 GiB count pages only in their low 3 GiB (the i440fx PCI
hole); the RAM above 4 GiB is then zero.  Figures of each size also go to
stderr as soon as they are measured.

By default both 1 GiB and 4 GiB run (C{--size 1024} for one).  The JSON
object holds every figure prefixed by its size (C{1024mib_ours_total_ms},
...) and, unprefixed, the worst of the sizes run for the headline keys
C{total_vs_qemu_postcopy_ratio}, C{blocktime_vs_qemu_ratio} (ours / QEMU's,
lower is better; L{None} when QEMU's blocktime was 0) and
C{ours_resume_ms}, plus C{preempt} and C{load_1min} (the machine's load
average when the run ended: the machine is shared, compare ratios).

With C{--rounds N} ours and QEMU to QEMU each run N times per size,
interleaved, alternating which goes first; every figure is then the median
of its rounds (C{ours_total_ms_rounds} and C{qemu_postcopy_total_ms_rounds}
list each round's total).  Single runs of 4 GiB vary by up to 2x here.

Usage: C{python bench/qemu_restore.py [--size 1024 4096] [--preempt] [--rounds N] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted_postcopy.childprocess import childEnvironment, pythonArguments
from twisted_postcopy.testing.bootsector import writeBootImage
from twisted_postcopy.testing.qemuguest import lowRAMLayout
from twisted_postcopy.testing.qemubaseline import (
    eventTime, listenIncoming, qemuPrecopyLoad, qemuToQemuPostcopy, startGuest,
    stopAndCheck,
)

TIMEOUT = 300.0
#: The counting layout of a guest size (every page from 1 MiB up to 1 MiB
#: below the top of its low RAM).
layout = lowRAMLayout


def record(directory: str, sizeMiB: int, stream: str) -> None:
    """
    Save the running guest to a stream file (unlimited bandwidth and a
    huge downtime limit, so precopy stops after its first pass instead of
    chasing a guest that rewrites every page), and flush it to disk before
    anything is timed (L{flush}).

    @param directory: scratch directory.
    @param sizeMiB: guest RAM.
    @param stream: the file to write.
    """
    image = writeBootImage(os.path.join(directory, "boot.img"), layout(sizeMiB))
    source = startGuest(directory, "saver", image, sizeMiB)
    try:
        source.waitSerial(1, TIMEOUT)
        source.setParameters(max_bandwidth=1 << 40, downtime_limit=600_000)
        source.migrate(f"exec:cat > {stream}")
        source.waitMigration(["completed"], TIMEOUT)
    finally:
        source.kill()
    flush(stream)


def flush(path: str) -> None:
    """
    Write a file's dirty pages out and wait for them.  The recorded
    stream is gigabytes of dirty page cache; left to the kernel's
    writeback it is flushed during the first restores measured after it,
    and that slowed them 2-4x here (a 4 GiB restore: 14.8 s with 2.2 GB
    dirty, 3.8 s right after) while timing nothing of ours or QEMU's.

    @param path: the file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def command(*arguments: str) -> subprocess.CompletedProcess[bytes]:
    """
    @param arguments: C{postcopy snapshot} arguments.
    @return: the finished process.
    @raise RuntimeError: it failed.
    """
    done = subprocess.run(pythonArguments("-m", "twisted_postcopy.cli", "snapshot", *arguments),
                          capture_output=True, timeout=TIMEOUT, env=childEnvironment())
    if done.returncode:
        raise RuntimeError(done.stderr.decode())
    return done


def ours(directory: str, sizeMiB: int, snapshot: str, preempt: bool = False,
         extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """
    Our postcopy restore into a fresh QEMU.

    @param directory: scratch directory.
    @param sizeMiB: guest RAM.
    @param snapshot: the snapshot directory.
    @param preempt: use C{postcopy-preempt}.
    @param extra: more C{snapshot restore} arguments (bench/prefetch.py
        passes C{--parameter}s).
    @return: the figures.
    @raise RuntimeError: the restore failed (its error message).
    """
    image = os.path.join(directory, "boot.img")
    target = startGuest(directory, "restored", image, sizeMiB, "-incoming", "defer")
    try:
        target.setCapabilities(**{"postcopy-ram": True, "postcopy-blocktime": True})
        if preempt:
            target.setCapabilities(**{"postcopy-preempt": True})
        host, port = listenIncoming(target)
        done = command("restore", snapshot, "--to", f"tcp:{host}:{port}", "--postcopy", "--no-verify",
                       *(["--postcopy-preempt"] if preempt else []), *extra)
        (summary,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
        resumed = eventTime(target.waitEvent("RESUME", TIMEOUT))
        info = target.waitMigration(["completed"], TIMEOUT)
        stopAndCheck(target, layout(sizeMiB))
    finally:
        target.kill()
    return {"resume_ms": (resumed - summary["started"]) * 1000, "total_ms": summary["total-time"],
            "postcopy_requests": summary["ram"]["postcopy-requests"],
            "blocktime_ms": info.get("postcopy-blocktime"), "mbps": summary["ram"]["mbps"]}


def ratio(ours: float | None, qemu: float | None) -> float | None:
    """
    @return: C{ours / qemu} rounded, or L{None} when either is missing or
        QEMU's is 0.
    """
    if ours is None or not qemu:
        return None
    return round(ours / qemu, 3)


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """
    @param rounds: the same figures from several rounds.
    @return: each figure's median over the rounds that have it (L{None}
        where none has).
    """
    figures: dict[str, Any] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if r.get(key) is not None]
        figures[key] = statistics.median(values) if values else None
    return figures


def measure(sizeMiB: int, scratch: str, preempt: bool = False, rounds: int = 1) -> dict[str, Any]:
    """
    All three ways for one guest size.  Ours and QEMU to QEMU run
    C{rounds} times, interleaved and alternating which goes first (the
    first restore after the recording and import, and after an idle spell,
    is often the slower one on this machine, whichever engine it is); the
    figures are the medians, each engine's totals of every round are kept
    too.

    @param sizeMiB: guest RAM.
    @param scratch: parent scratch directory.
    @param preempt: use C{postcopy-preempt} (ours and QEMU's postcopy).
    @param rounds: rounds of ours and QEMU to QEMU.
    @return: the figures, keyed C{ours_*}, C{qemu_postcopy_*},
        C{precopy_load_*} and ratios.
    """
    directory = tempfile.mkdtemp(prefix=f"restore-{sizeMiB}-", dir=scratch)
    stream, snapshot = os.path.join(directory, "stream.mig"), os.path.join(directory, "snap")
    record(directory, sizeMiB, stream)
    began = time.monotonic()
    command("import", stream, snapshot)
    figures: dict[str, Any] = {"import_ms": (time.monotonic() - began) * 1000, "rounds": rounds}
    oursRounds: list[dict[str, Any]] = []
    qemuRounds: list[dict[str, Any]] = []

    def runOurs() -> None:
        oursRounds.append(ours(directory, sizeMiB, snapshot, preempt))

    def runQEMU() -> None:
        baseline = tempfile.mkdtemp(dir=directory)
        qemuRounds.append(qemuToQemuPostcopy(sizeMiB, baseline, layout=layout(sizeMiB), timeout=TIMEOUT,
                                             preempt=preempt))
        shutil.rmtree(baseline, ignore_errors=True)

    for n in range(rounds):
        for run in ((runOurs, runQEMU) if n % 2 == 0 else (runQEMU, runOurs)):
            run()
    figures.update({f"ours_{k}": v for k, v in medians(oursRounds).items()})
    figures.update({f"qemu_postcopy_{k}": v for k, v in medians(qemuRounds).items()})
    figures["ours_total_ms_rounds"] = [r["total_ms"] for r in oursRounds]
    figures["qemu_postcopy_total_ms_rounds"] = [r["total_ms"] for r in qemuRounds]
    figures.update({f"precopy_load_{k}": v for k, v in qemuPrecopyLoad(
        stream, directory, sizeMiB, layout(sizeMiB)).items()})
    figures["resume_vs_qemu_postcopy_ratio"] = figures["ours_resume_ms"] / figures["qemu_postcopy_resume_ms"]
    figures["resume_vs_precopy_load_ratio"] = figures["ours_resume_ms"] / figures["precopy_load_load_ms"]
    figures["total_vs_qemu_postcopy_ratio"] = ratio(figures["ours_total_ms"], figures["qemu_postcopy_total_ms"])
    figures["blocktime_vs_qemu_ratio"] = ratio(figures["ours_blocktime_ms"], figures["qemu_postcopy_blocktime_ms"])
    figures["load_1min"] = os.getloadavg()[0]
    shutil.rmtree(directory, ignore_errors=True)
    return figures


def headline(results: dict[int, dict[str, Any]], preempt: bool) -> dict[str, Any]:
    """
    @param results: size in MiB -> figures.
    @param preempt: whether preempt was on.
    @return: the unprefixed keys: the worst of the sizes for each headline
        figure, the preempt flag and the load average.
    """
    worst: dict[str, Any] = {"preempt": preempt, "load_1min": os.getloadavg()[0]}
    for key in ("total_vs_qemu_postcopy_ratio", "blocktime_vs_qemu_ratio", "ours_resume_ms"):
        values = [f[key] for f in results.values() if f.get(key) is not None]
        worst[key] = max(values) if values else None
    return worst


def table(results: dict[int, dict[str, Any]]) -> str:
    """
    @param results: size in MiB -> figures.
    @return: a readable table.
    """
    rows = [("", "to running (ms)", "total (ms)", "page requests", "blocktime (ms)", "load")]
    for size, f in results.items():
        rows.append((f"{size} MiB ours", f"{f['ours_resume_ms']:.0f}", f"{f['ours_total_ms']:.0f}",
                     str(f["ours_postcopy_requests"]), str(f["ours_blocktime_ms"]), f"{f['load_1min']:.2f}"))
        rows.append((f"{size} MiB qemu->qemu postcopy", f"{f['qemu_postcopy_resume_ms']:.0f}",
                     f"{f['qemu_postcopy_total_ms']:.0f}", str(f["qemu_postcopy_postcopy_requests"]),
                     str(f["qemu_postcopy_blocktime_ms"]), ""))
        rows.append((f"{size} MiB precopy load (exec:cat)", f"{f['precopy_load_load_ms']:.0f}",
                     f"{f['precopy_load_load_ms']:.0f}", "-", "-", ""))
        rows.append((f"{size} MiB ratio ours/qemu", "", str(f["total_vs_qemu_postcopy_ratio"]), "",
                     str(f["blocktime_vs_qemu_ratio"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def main() -> None:
    """
    Run the bench and print a table, or one JSON object with C{--json}.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", "--sizes", dest="sizes", type=int, nargs="+", default=[1024, 4096],
                        metavar="MIB", help="guest RAM sizes (default: 1024 4096)")
    parser.add_argument("--preempt", action="store_true", help="postcopy-preempt on, ours and QEMU's")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="rounds of ours and QEMU to QEMU, interleaved (medians; default: 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    scratch = tempfile.mkdtemp(prefix="pc-bench-restore-")
    try:
        results = {}
        for size in args.sizes:
            results[size] = measure(size, scratch, args.preempt, args.rounds)
            print(json.dumps({"size_mib": size, **results[size]}), file=sys.stderr, flush=True)
    except RuntimeError as e:
        print(f"qemu_restore: {e}".rstrip(), file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        figures = {f"{size}mib_{key}": value for size, figures in results.items() for key, value in figures.items()}
        print(json.dumps({**figures, **headline(results, args.preempt)}, sort_keys=True))
    else:
        print(f"preempt: {'on' if args.preempt else 'off'}; medians of {args.rounds} round(s)")
        print(table(results))


if __name__ == "__main__":
    main()
