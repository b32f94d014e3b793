"""
Silent cuts during postcopy between two of our daemons, each in its own
network namespace: how fast each side notices by itself, and how fast it
recovers by itself once the link is back.

Each migration (a stress guest, faulting through userfaultfd in real
guest processes; fresh daemons each time) gets up to C{--per-migration}
cuts at random moments of postcopy, each holding the path down for a
random 2.5 to 4 s (longer than the 2 s default link timeout), until
C{--cuts} cuts were made.  No command is issued after C{migrate}:
C{x-postcopy-auto-recover} is on at both ends.

With C{--qemu}, the same cut is also made between two QEMU 7.2 processes
in the same namespaces (postcopy, QEMU's defaults), and the figure is how
many of those cuts either QEMU noticed (reached C{postcopy-paused})
within the same timeout.

Usage: C{python bench/cuts.py [--cuts 20] [--mib 64] [--qemu N] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_postcopy.protocols.deadlink import DEFAULT_LINK_TIMEOUT_MS  # noqa: E402
from twisted_postcopy.testing import netns  # noqa: E402
from twisted_postcopy.testing.cuts import Cut, migrateWithCuts, startPair, stopPair  # noqa: E402

MiB = 1 << 20
#: Postcopy bandwidth: slow enough for several cuts per migration.
POSTCOPY_BANDWIDTH = 8 * MiB
TIMEOUT_S = DEFAULT_LINK_TIMEOUT_MS / 1000.0


def _percentile(values: list[float], fraction: float) -> float | None:
    """
    @param values: numbers.
    @param fraction: 0.5 for the median.
    @return: that percentile, or L{None} for no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def oursCuts(reactor: Any, options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """
    Run migrations with cuts until C{options.cuts} cuts were made.

    @param reactor: the reactor.
    @param options: the command line.
    @param workdir: daemon logs and sockets.
    @return: the figures.
    """
    rng = random.Random(options.seed)
    path = netns.makePath()
    made: list[Cut] = []
    migrations = verified = 0
    try:
        while len(made) < options.cuts:
            want = min(options.per_migration, options.cuts - len(made))
            cuts = [Cut("postcopy", rng.uniform(2.5, 4.0)) for _ in range(want)]
            daemons = await startPair(reactor, path, workdir, options.mib * MiB, rng.randrange(1000))
            try:
                result = await migrateWithCuts(reactor, path, daemons, cuts, POSTCOPY_BANDWIDTH, rng)
            finally:
                await stopPair(reactor, daemons)
            migrations += 1
            final = result["final"]
            if all(final[s]["status"] == "completed" for s in final) and result["guest"].get("verified"):
                verified += 1
            made += [cut for cut in cuts if cut.cutAt]
            print(f"migration {migrations}: {len([c for c in cuts if c.cutAt])} cuts, "
                  f"{final['source']['status']}, verified {result['guest'].get('verified')}", file=sys.stderr)
    finally:
        path.remove()
    detect = [cut.paused[s] * 1000 for cut in made for s in ("source", "destination") if s in cut.paused]
    recover = [max(cut.recovered.values()) * 1000 for cut in made if len(cut.recovered) == 2]
    return {
        "cuts": len(made),
        "migrations": migrations,
        "self_detected_src": sum(cut.paused.get("source", 1e9) <= TIMEOUT_S for cut in made),
        "self_detected_dst": sum(cut.paused.get("destination", 1e9) <= TIMEOUT_S for cut in made),
        "detect_ms_p50": _percentile(detect, 0.5),
        "detect_ms_max": max(detect) if detect else None,
        "auto_recovered": len(recover),
        "recover_ms_p50": _percentile(recover, 0.5),
        "recover_ms_max": max(recover) if recover else None,
        "completed_verified": verified,
    }


def qemuCuts(count: int, mib: int, workdir: Path) -> dict[str, Any]:
    """
    The same cut between two QEMU 7.2 processes.

    @param count: cuts (one migration each).
    @param mib: guest RAM.
    @param workdir: scratch space.
    @return: the figures.
    """
    from twisted_postcopy.testing.qemucuts import qemuCut

    noticed = []
    for index in range(count):
        path = netns.makePath()
        try:
            noticed.append(qemuCut(path, mib, workdir / f"qemu{index}", TIMEOUT_S, random.Random(index)))
        finally:
            path.remove()
    return {"qemu_cuts": count,
            "qemu_noticed_src": sum(n["source"] for n in noticed),
            "qemu_noticed_dst": sum(n["destination"] for n in noticed),
            "qemu_active_after_hold": sum(n["source_status"] == n["destination_status"] == "postcopy-active"
                                          for n in noticed)}


def main(reactor: Any, options: argparse.Namespace) -> Deferred:
    """
    Run the figures and print them.

    @param reactor: the reactor.
    @param options: the command line.
    @return: a Deferred firing when done.
    """

    async def run() -> None:
        workdir = Path(tempfile.mkdtemp(prefix="cuts-"))
        try:
            figures = await oursCuts(reactor, options, workdir)
            if options.qemu:
                figures.update(qemuCuts(options.qemu, options.mib, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        figures["timeout_ms"] = DEFAULT_LINK_TIMEOUT_MS
        if options.json:
            print(json.dumps(figures))
            return
        print(f"silent cuts in postcopy, our daemons in network namespaces, {options.mib} MiB stress guest")
        for name, value in figures.items():
            shown = f"{value:.1f}" if isinstance(value, float) else str(value)
            print(f"  {name:22} {shown:>10}")

    return Deferred.fromCoroutine(run())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cuts", type=int, default=20, help="cuts to make (default 20)")
    parser.add_argument("--per-migration", type=int, default=4, help="cuts per migration at most")
    parser.add_argument("--mib", type=int, default=64, help="guest RAM in MiB")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random moments")
    parser.add_argument("--qemu", type=int, default=0, metavar="N",
                        help="also cut N QEMU-to-QEMU postcopy migrations")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    arguments = parser.parse_args()
    react(lambda reactor: main(reactor, arguments))
