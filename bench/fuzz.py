"""
Fuzz the decoders of everything a peer can send (main stream and its
packages, return path, preempt channel, snapshot import, attach framing)
with mutated real QEMU 7.2 recordings and our own streams, in random
chunkings (L{twisted_postcopy.testing.fuzz}).

Prints the inputs per target and outcome (C{ok}, C{error:<ProtocolError
subclass>}; anything C{bad:...} is a finding, listed with the index that
replays it), the slowest input and the rate; C{--json} prints one JSON
object instead.  Exits 1 if there was a finding.

Each worker process runs under an address-space limit (C{--memory-mib}), a
CPU bound per input (C{--cpu-bound}), and samples inputs under tracemalloc
for a memory bound per input.

Usage: C{python bench/fuzz.py [-n 1000000] [-j 2] [--seed 1] [--json]
[--replay INDEX]}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from multiprocessing import Pool
from typing import Any

from twisted_postcopy.testing import fuzz

_corpus: fuzz.Corpus | None = None


def _initWorker(memoryMiB: int) -> None:
    """
    Limit a worker's address space and load the corpus once.

    @param memoryMiB: the limit.
    """
    global _corpus
    limit = memoryMiB << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _corpus = fuzz.Corpus.load()


def _batch(job: tuple[int, int, int, float, float | None]) -> fuzz.Report:
    """
    @param job: (seed, first index, count, CPU bound, wall-clock deadline
        as C{time.time()} or L{None}).
    @return: the batch's report.
    """
    seed, start, count, cpuBound, deadline = job
    fuzz.CPU_BOUND = cpuBound
    assert _corpus is not None
    until = None if deadline is None else time.monotonic() + (deadline - time.time())
    return fuzz.fuzz(_corpus, seed, start, count, until)


def run(count: int, workers: int, seed: int, memoryMiB: int, cpuBound: float,
        maxSeconds: float | None = None) -> tuple[fuzz.Report, float]:
    """
    @param maxSeconds: stop starting inputs after this many seconds.
    @return: the merged report and the wall-clock seconds.
    """
    report = fuzz.Report()
    batch = 2000
    deadline = None if maxSeconds is None else time.time() + maxSeconds
    jobs = [(seed, start, min(batch, count - start), cpuBound, deadline) for start in range(0, count, batch)]
    started = time.monotonic()
    with Pool(workers, _initWorker, (memoryMiB,)) as pool:
        for done, part in enumerate(pool.imap_unordered(_batch, jobs), 1):
            report.merge(part)
            if sys.stderr.isatty() and done % 10 == 0:
                print(f"\r{report.inputs} inputs, {report.bad} findings", end="", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return report, time.monotonic() - started


def replay(index: int, seed: int) -> None:
    """
    Run one input again and print what it did.
    """
    corpus = fuzz.Corpus.load()
    target, data, rng = fuzz.makeInput(corpus, seed, index)
    outcome = fuzz.runOne(target, data, rng, True)
    print(f"input {index} (seed {seed}): target {target}, {len(data)} bytes: {outcome.kind} "
          f"in {outcome.seconds:.3f} s {outcome.detail}")
    if outcome.kind.startswith("bad:"):
        decode, _ = fuzz.TARGETS[target]
        decode(iter([data]))


def figures(report: fuzz.Report, seconds: float, args: Any) -> dict[str, Any]:
    """
    @return: the run's figures for C{--json}.
    """
    byOutcome: dict[str, dict[str, int]] = {}
    for (target, kind), n in sorted(report.counts.items()):
        byOutcome.setdefault(target, {})[kind] = n
    return {
        "inputs": report.inputs, "findings": report.bad, "seed": args.seed, "workers": args.jobs,
        "elapsed_s": round(seconds, 1), "inputs_per_s": round(report.inputs / seconds) if seconds else 0,
        "max_input_cpu_ms": round(report.maxSeconds * 1000, 1), "cpu_bound_ms": args.cpu_bound * 1000,
        "memory_limit_mib": args.memory_mib, "outcomes": byOutcome,
        "first_findings": [list(finding) for finding in report.findings[:10]],
    }


def main(argv: list[str] | None = None) -> int:
    """
    @param argv: the arguments.
    @return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=1_000_000, help="inputs to run")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memory-mib", type=int, default=2048, help="address-space limit per worker")
    parser.add_argument("--cpu-bound", type=float, default=fuzz.CPU_BOUND, help="CPU seconds per input")
    parser.add_argument("--max-seconds", type=float, help="stop starting inputs after this long")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="run one input again, with a traceback")
    args = parser.parse_args(argv)
    if args.replay is not None:
        replay(args.replay, args.seed)
        return 0
    report, seconds = run(args.count, args.jobs, args.seed, args.memory_mib, args.cpu_bound, args.max_seconds)
    result = figures(report, seconds, args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'target':<16} {'outcome':<38} {'inputs':>9}")
        for target, kinds in result["outcomes"].items():
            for kind, n in kinds.items():
                print(f"{target:<16} {kind:<38} {n:>9}")
        print(f"\n{report.inputs} inputs in {seconds:.0f} s ({result['inputs_per_s']}/s, {args.jobs} workers); "
              f"slowest input {result['max_input_cpu_ms']} ms of CPU (bound {result['cpu_bound_ms']:.0f} ms); "
              f"findings: {report.bad}")
        for index, target, kind, detail in report.findings[:10]:
            print(f"  finding: input {index} ({target}) {kind}: {detail}  (replay: --replay {index})")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
