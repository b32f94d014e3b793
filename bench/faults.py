"""
Fault service benchmark.

1. Fault round trip: a guest worker process touches missing pages from 1,
   4 and 16 C threads (timed in C with C{CLOCK_MONOTONIC}, from the touch
   to the resume); the daemon side is a L{FaultService} on the reactor
   with an in-process page source that places each page at once.
   Reports p50, p99 and faults/s (in JSON: C{faults_tN_interval_us}, the
   wall time per fault, 1e6 / faults per second).  In the same run a C
   userfaultfd handler of the same shape (L{twisted_postcopy.testing.cfaults}:
   another process faults, the handler places with C{UFFDIO_COPY} and
   wakes it) is the baseline: C{c_tN_p50_us}, C{c_tN_p99_us} and the
   ratios ours / C, C{ratio_tN_p50} and C{ratio_tN_p99} (lower is better).  The daemon's garbage collector is
   collected and tuned as the destination does at ADVISE and LISTEN
   (L{collectGarbage}, L{tuneGarbageCollector}) unless C{--default-gc} is given
   (a default-threshold collection every ~100 faults dominates the p99).
2. Placement throughput: C{UFFDIO_COPY} into a registered memfd in 4 KiB
   and 2 MiB placements, and into a hugetlbfs memfd in 2 MiB placements
   (huge pages are reserved through C{/proc/sys/vm/nr_hugepages} and the
   old value restored; skipped if the kernel refuses).

Usage: C{python bench/faults.py [--pages N] [--runs N] [--mib N] [--default-gc] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks

from twisted_postcopy.ram import uffd
from twisted_postcopy.ram.block import HUGE_PAGE_SIZE, RAMBlock
from twisted_postcopy.ram.faults import FaultService
from twisted_postcopy.ram.guestworker import MemoryPageSource, spawnWorker
from twisted_postcopy.ram.support import NR_HUGEPAGES, checkHugePages, collectGarbage, tuneGarbageCollector
from twisted_postcopy.testing import cfaults

PAGE = 4096
#: Faulting thread counts measured.
THREADS = (1, 4, 16)
#: Where the C handler is built.
BUILD_DIR = os.environ.get("TMPDIR", "/tmp")


def percentile(values: list[int], fraction: float) -> float:
    """
    @param values: samples.
    @param fraction: 0..1.
    @return: the nearest-rank percentile.
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@inlineCallbacks
def faultRoundTrips(reactor: Any, pages: int, runs: int, threads: int):
    """
    Measure fault round trips with C{threads} faulting threads.

    @param reactor: the reactor.
    @param pages: pages touched per run.
    @param runs: runs (each on a fresh block).
    @param threads: faulting threads in the worker.
    @return: a Deferred firing with the round trips (ns) and the
        faults per second of each run.
    """
    latencies: list[int] = []
    rates: list[float] = []
    for _ in range(runs):
        data = os.urandom(pages * PAGE)
        block = RAMBlock("pc.ram", len(data))
        source = MemoryPageSource({"pc.ram": data})
        service = FaultService(reactor, source, [block])
        source.service = service
        worker = spawnWorker(reactor, service, [block])
        try:
            yield worker.attached
            answer = yield worker.command(op="touch", block=0, first=0, count=pages, threads=threads)
            latencies += answer["latencies"]
            rates.append(pages / (answer["elapsed"] / 1e9))
            yield worker.exit()
        finally:
            service.stop()
            block.close()
    return latencies, rates


def summary(prefix: str, latencies: list[int]) -> dict[str, float]:
    """
    @param prefix: the key prefix, e.g. C{faults_t1} or C{c_t1}.
    @param latencies: round trips in ns.
    @return: C{PREFIX_p50_us} and C{PREFIX_p99_us}.
    """
    return {f"{prefix}_p50_us": percentile(latencies, 0.5) / 1000,
            f"{prefix}_p99_us": percentile(latencies, 0.99) / 1000}


def ratios(results: dict[str, Any]) -> None:
    """
    Add C{ratio_tN_p50} and C{ratio_tN_p99} (ours / C) where both are known.

    @param results: the figures (updated).
    """
    for threads in THREADS:
        for q in ("p50", "p99"):
            ours, c = results.get(f"faults_t{threads}_{q}_us"), results.get(f"c_t{threads}_{q}_us")
            if ours is not None and c:
                results[f"ratio_t{threads}_{q}"] = round(ours / c, 2)


def placementThroughput(backing: str, chunk: int, total: int, runs: int) -> float:
    """
    Time C{UFFDIO_COPY} of C{total} bytes in C{chunk}-byte placements into a
    freshly registered block.

    @param backing: C{"memfd"} or C{"hugetlbfs"}.
    @param chunk: bytes per placement.
    @param total: bytes per run.
    @param runs: runs (median taken).
    @return: MB/s (10**6 bytes per second).
    """
    pageSize = HUGE_PAGE_SIZE if backing == "hugetlbfs" else PAGE
    source = os.urandom(chunk)
    rates = []
    for _ in range(runs):
        block = RAMBlock("bench", total, pageSize, backing)
        fd = uffd.openWithFeatures()
        try:
            uffd.register(fd, block.address, total)
            began = uffd.monotonicNs()
            for offset in range(0, total, chunk):
                uffd.placeRun(fd, block.address + offset, source, chunk, pageSize)
            rates.append(total / ((uffd.monotonicNs() - began) / 1e9) / 1e6)
        finally:
            os.close(fd)
            block.close()
    return statistics.median(rates)


def withHugePages(count: int, f: Any) -> Any:
    """
    Run C{f()} with C{count} more 2 MiB pages reserved, then restore.

    @param count: pages to add.
    @param f: the measurement.
    @return: C{f()}'s result, or L{None} when the pages cannot be reserved.
    """
    try:
        with open(NR_HUGEPAGES) as file:
            saved = int(file.read())
        with open(NR_HUGEPAGES, "w") as file:
            file.write(str(saved + count))
    except OSError:
        return None
    try:
        checkHugePages(count)
        return f()
    except Exception as error:
        print(f"hugetlbfs skipped: {error}", file=sys.stderr)
        return None
    finally:
        with open(NR_HUGEPAGES, "w") as file:
            file.write(str(saved))


def placements(mib: int, runs: int) -> dict[str, Any]:
    """
    @param mib: MiB per run.
    @param runs: runs.
    @return: the placement figures.
    """
    total = mib << 20
    results = {
        "copy_memfd_4k_mbps": placementThroughput("memfd", PAGE, total, runs),
        "copy_memfd_2m_mbps": placementThroughput("memfd", HUGE_PAGE_SIZE, total, runs),
    }
    huge = withHugePages(total // HUGE_PAGE_SIZE,
                         lambda: placementThroughput("hugetlbfs", HUGE_PAGE_SIZE, total, runs))
    if huge is not None:
        results["copy_hugetlbfs_2m_mbps"] = huge
    return results


def report(results: dict[str, Any]) -> str:
    """
    @param results: the figures.
    @return: a readable table.
    """
    lines = [f"{'threads':>8} {'p50 us':>9} {'p99 us':>9} {'faults/s':>10} {'C p50':>9} {'C p99':>9}"
             f" {'x p50':>7} {'x p99':>7}"]
    for threads in THREADS:
        c50, c99 = results.get(f"c_t{threads}_p50_us"), results.get(f"c_t{threads}_p99_us")
        r50, r99 = results.get(f"ratio_t{threads}_p50"), results.get(f"ratio_t{threads}_p99")
        lines.append(f"{threads:>8} {results[f'faults_t{threads}_p50_us']:>9.1f} "
                     f"{results[f'faults_t{threads}_p99_us']:>9.1f} "
                     f"{1e6 / results[f'faults_t{threads}_interval_us']:>10.0f} "
                     + (f"{c50:>9.1f} {c99:>9.1f} {r50:>7.2f} {r99:>7.2f}" if c50 else f"{'-':>9} {'-':>9}"))
    lines.append(f"(C: the C userfaultfd handler of the same shape; x: ours / C; load {results.get('load_1m')})")
    lines.append("")
    lines.append(f"{'UFFDIO_COPY placement':<28} {'MB/s':>8}")
    for key, label in (("copy_memfd_4k_mbps", "memfd, 4 KiB per ioctl"),
                       ("copy_memfd_2m_mbps", "memfd, 2 MiB per ioctl"),
                       ("copy_hugetlbfs_2m_mbps", "hugetlbfs, 2 MiB pages")):
        value = results.get(key)
        lines.append(f"{label:<28} {value:>8.0f}" if value is not None else f"{label:<28} {'skipped':>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """
    Run the benchmark.

    @param argv: command line arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=4000, help="pages faulted per run (default 4000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--mib", type=int, default=64, help="MiB placed per throughput run (default 64)")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep CPython's default GC thresholds (default: tuneGarbageCollector())")
    parser.add_argument("--no-c", action="store_true", help="skip the C handler baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args(argv)
    if not options.default_gc:
        collectGarbage()
        tuneGarbageCollector()

    from twisted.internet import reactor

    results: dict[str, Any] = {}

    @inlineCallbacks
    def run():
        """
        All measurements, then stop the reactor.
        """
        try:
            binary = None if options.no_c else cfaults.build(os.path.join(BUILD_DIR, "cfaults"))
            for threads in THREADS:
                # Ours and C alternate run by run, so both see the same load.
                ours: list[int] = []
                c: list[int] = []
                rates: list[float] = []
                for _ in range(options.runs):
                    latencies, rate = yield faultRoundTrips(reactor, options.pages, 1, threads)
                    ours += latencies
                    rates += rate
                    if binary is not None:
                        c += cfaults.faultLatencies(binary, options.pages, threads)
                results.update(summary(f"faults_t{threads}", ours))
                results[f"faults_t{threads}_interval_us"] = 1e6 / statistics.median(rates)
                if c:
                    results.update(summary(f"c_t{threads}", c))
            ratios(results)
            results["load_1m"] = round(os.getloadavg()[0], 2)
            results.update(placements(options.mib, options.runs))
        finally:
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    print(json.dumps(results) if options.json else report(results))


if __name__ == "__main__":
    main()
