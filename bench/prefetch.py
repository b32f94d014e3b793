"""
The prefetch policies of docs/prefetch.md, each on and off in the same run.

1. B{restore}: the boot-sector counting guest (it increments a byte in
   every page, in ascending order, forever) is saved and imported as in
   C{bench/qemu_restore.py}, then restored by postcopy into a fresh QEMU
   7.2 once per variant: C{off} (every prefetch policy off,
   C{x-skip-known-zero} at its default, on), C{readahead}
   (C{x-readahead-pages}), C{ws-record} (the first restore with
   C{x-working-set-pages}: it records), C{ws} (the next one: it sends the
   recorded pages first), C{ws+readahead}, C{sendzero}
   (C{x-skip-known-zero} 0: the snapshot's holes are sent as ZERO
   records, as QEMU would; with C{--mib} above 3072 the guest's RAM above
   4 GiB is such a hole), all but C{ws-record} in interleaved
   rounds (medians).  Reported per variant: time to
   the destination's RESUME, total time, page requests and the QEMU
   destination's C{postcopy-blocktime}; each restored guest's counters are
   checked.
2. B{hot}: working-set prefetch where REAP meant it: a snapshot of random
   data (at most 256 MiB) restored by postcopy at C{--hot-bandwidth} MiB/s
   (a link slower than loopback) into our destination, whose
   guest worker first touches a fixed random hot set (C{--hot} pages, one
   at a time) and then reads everything; the recording restore, then
   C{off} and C{ws} in interleaved rounds (medians; each C{ws} restore
   grows the set with what it was still asked for): time until the hot set
   is in (C{hot_ms}), faults and summed stall in that phase, total time,
   page requests.
3. B{migrate}: C{bench/migrate.py}'s postcopy (our daemon to our daemon, a
   guest worker reading its RAM on the production fault service) with the
   guest reading in order (C{p1}) and in 64 strided passes (C{p64}), per
   variant C{off}, C{readahead}, C{nofollow} (C{x-scan-follows-faults}
   0) and C{nofollow+readahead}, in interleaved rounds (medians): total
   time, page requests, request latency p50/p99 and the summed stall
   (fault read to placement).

Ratios are variant / C{off} of the same run (lower is better).

Usage: C{python bench/prefetch.py [--mib 1024] [--readahead 64] [--rounds 3] [--json]
[--skip-restore] [--skip-migrate]}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import migrate as migrateBench  # noqa: E402
import qemu_restore  # noqa: E402
from twisted_postcopy.manager import MigrationManager  # noqa: E402
from twisted_postcopy.snapshot.restore import restoreSnapshot  # noqa: E402
from twisted_postcopy.snapshot.store import openSnapshot, writeSnapshot  # noqa: E402
from twisted_postcopy.snapshot.workingset import readWorkingSet  # noqa: E402
from twisted_postcopy.source.prefetch import (  # noqa: E402
    READAHEAD, SCAN_FOLLOWS_FAULTS, SKIP_KNOWN_ZERO, WORKING_SET)
from twisted_postcopy.testing.qemuhost import qemuMissing  # noqa: E402

#: The working-set limit used by the C{ws} variants.
WS_PAGES = 65536
PAGE = 4096
#: The hot set's random seed (the same set in every run).
HOT_SEED = 9


def restoreVariants(readahead: int) -> list[tuple[str, dict[str, int]]]:
    """
    @param readahead: the C{x-readahead-pages} of the readahead variants.
    @return: (name, parameters) of each round, in run order.
    """
    off = {READAHEAD: 0, WORKING_SET: 0}
    return [("off", off), ("readahead", {**off, READAHEAD: readahead}),
            ("ws", {**off, WORKING_SET: WS_PAGES}),
            ("ws+readahead", {READAHEAD: readahead, WORKING_SET: WS_PAGES}),
            ("sendzero", {**off, SKIP_KNOWN_ZERO: 0})]


def _restore(directory: str, sizeMiB: int, snapshot: str, name: str,
             parameters: dict[str, int]) -> dict[str, Any]:
    """
    One restore into a fresh QEMU (its counters checked).

    @return: its figures (see C{bench/qemu_restore.py}'s C{ours}).
    """
    extra = tuple(arg for key, value in parameters.items() for arg in ("--parameter", f"{key}={value}"))
    result = qemu_restore.ours(directory, sizeMiB, snapshot, extra=extra)
    print(json.dumps({"restore": name, **result}), file=sys.stderr, flush=True)
    return result


def measureRestores(sizeMiB: int, readahead: int, rounds: int, scratch: str) -> dict[str, Any]:
    """
    Every restore variant of one saved guest: the recording restore, then
    C{rounds} rounds of the variants interleaved; medians.

    @param sizeMiB: guest RAM.
    @param readahead: see L{restoreVariants}.
    @param rounds: rounds of the variants.
    @param scratch: scratch directory.
    @return: C{restore_<variant>_<figure>} keys (medians).
    """
    directory = tempfile.mkdtemp(prefix="prefetch-restore-", dir=scratch)
    stream, snapshot = os.path.join(directory, "stream.mig"), os.path.join(directory, "snap")
    qemu_restore.record(directory, sizeMiB, stream)
    qemu_restore.command("import", stream, snapshot)
    figures: dict[str, Any] = {}
    recorded = _restore(directory, sizeMiB, snapshot, "ws-record", {READAHEAD: 0, WORKING_SET: WS_PAGES})
    figures.update({f"restore_ws-record_{key}": value for key, value in recorded.items()})
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for name, parameters in restoreVariants(readahead):
            samples.setdefault(name, []).append(_restore(directory, sizeMiB, snapshot, name, parameters))
    for name, results in samples.items():
        for key, value in qemu_restore.medians(results).items():
            figures[f"restore_{name}_{key}"] = None if value is None else round(value, 1)
    for name, _ in restoreVariants(readahead)[1:]:
        for key in ("blocktime_ms", "total_ms", "postcopy_requests", "resume_ms"):
            off = figures[f"restore_off_{key}"]
            if off:
                figures[f"ratio_restore_{name}_{key}"] = round(figures[f"restore_{name}_{key}"] / off, 3)
    return figures


def hotPages(mib: int, count: int) -> list[int]:
    """
    @param mib: guest RAM.
    @param count: how many.
    @return: the hot set: C{count} distinct pages in a fixed random order.
    """
    return random.Random(HOT_SEED).sample(range((mib << 20) // PAGE), count)


class HotGuestVM(migrateBench.TimedGuestVM):
    """
    L{migrateBench.TimedGuestVM} whose guest first touches a hot set, one
    page at a time; it also times that phase.

    @ivar hot: figures of the hot phase once it is over.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """
        Not running yet.
        """
        super().__init__(*args, **kwargs)
        self.hot: dict[str, Any] = {}
        self.began = 0.0
        self.touchedFirst.addCallback(self._hotDone)

    def run(self) -> None:
        """
        The guest starts: the hot phase begins.
        """
        self.began = time.perf_counter()
        super().run()

    def _hotDone(self, answers: Any) -> Any:
        """
        The hot set is in.
        """
        self.hot = {"hot_ms": round((time.perf_counter() - self.began) * 1000, 1),
                    "hot_faults": len(self.latencies), "hot_stall_ms": round(sum(self.latencies) * 1000, 1)}
        return answers


@inlineCallbacks
def destinationRole(passes: int, hot: int = 0, mib: int = 0) -> Any:
    """
    The destination process: as C{bench/migrate.py}'s, the guest reading in
    C{passes} strided passes (after touching L{hotPages} if C{hot}).

    @param passes: see L{twisted_postcopy.testing.workerguest.WorkerGuestVM}.
    @param hot: the hot set's size (0: none).
    @param mib: guest RAM (for the hot set).
    """
    destination = HotGuestVM(reactor, passes=passes, touchFirst=hotPages(mib, hot) if hot else None)
    dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
    dst.setCapabilities({"postcopy-ram": True})
    port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
    print(port.getHost().port, flush=True)
    destination.ready.addCallback(lambda _: print("ready", flush=True))
    status = yield dst.whenStatus("completed", "failed")
    yield destination.done
    print(json.dumps({"status": status, "latencies": destination.latencies, **destination.hot}), flush=True)


def storeRandomSnapshot(path: str, mib: int) -> None:
    """
    Store a snapshot of one RAM block of random data (our own device
    section, as the tests' snapshots).

    @param path: the directory.
    @param mib: its RAM.
    """
    machine = "pc-i440fx-7.2"
    blob = b"device state"
    device = (b"\x04" + struct.pack(">I", 3) + b"\x15twisted-postcopy/test" + struct.pack(">III", 0, 1, len(blob))
              + blob + b"\x7e" + struct.pack(">I", 3))
    fd = os.memfd_create("hot")
    try:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            os.write(fd, chunk)
        writeSnapshot(path, machine, struct.pack(">I", len(machine)) + machine.encode(), "precopy", device,
                      [("pc.ram", mib << 20, PAGE, fd)])
    finally:
        os.close(fd)


@inlineCallbacks
def restoreHot(path: str, mib: int, hot: int, bandwidth: int, parameters: dict[str, int]) -> Any:
    """
    One postcopy restore of C{path} into our destination (its own process)
    whose guest touches the hot set first.

    @return: the figures.
    """
    destination = migrateBench.DestinationProcess()
    reactor.spawnProcess(destination, sys.executable,
                         [sys.executable, os.path.abspath(__file__), "--destination-role", "1",
                          "--hot", str(hot), "--mib", str(mib)], env=None)
    port = yield destination.port
    began = time.perf_counter()
    managers, done = restoreSnapshot(reactor, path, [f"tcp:127.0.0.1:{port}"], True, False, bandwidth,
                                     parameters=parameters)
    yield done
    elapsed = time.perf_counter() - began
    result = yield destination.result
    if result["status"] != "completed":
        raise RuntimeError(f"restore {result['status']}")
    return {"total_ms": round(elapsed * 1000), "requests": managers[0].queryMigrate()["ram"]["postcopy-requests"],
            "stall_sum_ms": round(sum(result["latencies"]) * 1000),
            **{key: result[key] for key in ("hot_ms", "hot_faults", "hot_stall_ms")}}


@inlineCallbacks
def measureHotSet(mib: int, hot: int, bandwidth: int, rounds: int, scratch: str) -> Any:
    """
    Working-set prefetch where it is meant to help: a guest whose first
    touches are a scattered hot set, restored into our destination; the
    recording restore, then C{rounds} rounds of C{off} and C{ws}; medians.

    @return: C{hot_<variant>_<figure>} keys.
    """
    path = os.path.join(scratch, "hot")
    storeRandomSnapshot(path, mib)
    figures: dict[str, Any] = {"hot_pages": hot, "hot_bandwidth_mbps": bandwidth * 8 / 1e6}
    recorded = yield restoreHot(path, mib, hot, bandwidth, {WORKING_SET: WS_PAGES})
    print(json.dumps({"hot": "ws-record", **recorded}), file=sys.stderr, flush=True)
    figures.update({f"hot_ws-record_{key}": value for key, value in recorded.items()})
    figures["hot_ws_recorded_pages"] = len(readWorkingSet(openSnapshot(path)) or ())
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for name, parameters in (("off", {WORKING_SET: 0}), ("ws", {WORKING_SET: WS_PAGES})):
            result = yield restoreHot(path, mib, hot, bandwidth, parameters)
            print(json.dumps({"hot": name, **result}), file=sys.stderr, flush=True)
            samples.setdefault(name, []).append(result)
    for name, results in samples.items():
        figures.update({f"hot_{name}_{key}": value for key, value in qemu_restore.medians(results).items()})
    for key in ("total_ms", "requests", "stall_sum_ms", "hot_ms", "hot_stall_ms"):
        if figures[f"hot_off_{key}"]:
            figures[f"ratio_hot_ws_{key}"] = round(figures[f"hot_ws_{key}"] / figures[f"hot_off_{key}"], 3)
    return figures


@inlineCallbacks
def migrateOnce(source: Any, passes: int, parameters: dict[str, int]) -> Any:
    """
    One postcopy migration as C{bench/migrate.py}'s, with parameters.

    @param source: the source VM (C{bench/migrate.py}'s C{stressVM}, one
        for every run: its RAM never changes).
    @param passes: the destination guest's strided passes.
    @param parameters: the source's prefetch parameters.
    @return: the figures.
    """
    source.resume()
    destination = migrateBench.DestinationProcess()
    reactor.spawnProcess(destination, sys.executable,
                         [sys.executable, os.path.abspath(__file__), "--destination-role", str(passes)], env=None)
    port = yield destination.port
    src = MigrationManager(reactor, source)
    src.setParameters({"max-bandwidth": migrateBench.WAITING_BANDWIDTH, "max-postcopy-bandwidth": 0,
                       **parameters})
    src.setCapabilities({"postcopy-ram": True})
    src.migrate(f"tcp:127.0.0.1:{port}")
    yield destination.ready
    began = time.perf_counter()
    src.startPostcopy()
    status = yield src.whenStatus("completed", "failed")
    elapsed = time.perf_counter() - began
    result = yield destination.result
    if status != "completed" or result["status"] != "completed":
        raise RuntimeError(f"migration {status}/{result['status']}")
    latencies = result["latencies"]
    figures = {"total_ms": round(elapsed * 1000), "requests": src.queryMigrate()["ram"]["postcopy-requests"],
               "readahead_pages": src.outgoing.scheduler.readahead.sent,
               "request_p50_us": round(migrateBench._percentile(latencies, 0.5)),
               "request_p99_us": round(migrateBench._percentile(latencies, 0.99)),
               "stall_sum_ms": round(sum(latencies) * 1000)}
    return figures


@inlineCallbacks
def measureMigrations(mib: int, readahead: int, rounds: int) -> Any:
    """
    Every migrate variant for both guest patterns, C{rounds} rounds
    interleaved; medians.

    @param mib: guest RAM.
    @param readahead: the C{x-readahead-pages} of the readahead variant.
    @param rounds: rounds of the variants.
    @return: C{migrate_p<passes>_<variant>_<figure>} keys.
    """
    figures: dict[str, Any] = {}
    source = migrateBench.stressVM(mib)
    variants = [("off", {READAHEAD: 0}), ("readahead", {READAHEAD: readahead}),
                ("nofollow", {READAHEAD: 0, SCAN_FOLLOWS_FAULTS: 0}),
                ("nofollow+readahead", {READAHEAD: readahead, SCAN_FOLLOWS_FAULTS: 0})]
    for passes in (1, 64):
        samples: dict[str, list[dict[str, Any]]] = {}
        for _ in range(rounds):
            for name, parameters in variants:
                result = yield migrateOnce(source, passes, parameters)
                print(json.dumps({"migrate": f"p{passes}", "variant": name, **result}), file=sys.stderr,
                      flush=True)
                samples.setdefault(name, []).append(result)
        for name, results in samples.items():
            figures.update({f"migrate_p{passes}_{name}_{key}": value
                            for key, value in qemu_restore.medians(results).items()})
        for name, _ in variants[1:]:
            for key in ("total_ms", "requests", "stall_sum_ms"):
                off = figures[f"migrate_p{passes}_off_{key}"]
                if off:
                    figures[f"ratio_migrate_p{passes}_{name}_{key}"] = round(
                        figures[f"migrate_p{passes}_{name}_{key}"] / off, 3)
    return figures


@inlineCallbacks
def main(options: argparse.Namespace) -> Any:
    """
    Run the selected parts and print a table, or one JSON object.
    """
    try:
        results: dict[str, Any] = {"guest_mib": options.mib, "readahead_pages": options.readahead,
                                   "loadavg_1min": os.getloadavg()[0]}
        if not options.skip_hot:
            scratch = tempfile.mkdtemp(prefix="pc-bench-prefetch-hot-")
            try:
                results.update((yield measureHotSet(min(options.mib, 256), options.hot, options.hot_bandwidth << 20,
                                                          options.rounds, scratch)))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        if not options.skip_migrate:
            results.update((yield measureMigrations(options.mib, options.readahead, options.rounds)))
        if not options.skip_restore:
            reason = qemuMissing()
            if reason:
                results["restore_skipped"] = reason
            else:
                scratch = tempfile.mkdtemp(prefix="pc-bench-prefetch-")
                try:
                    results.update(measureRestores(options.mib, options.readahead, options.rounds, scratch))
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        results["loadavg_1min_end"] = os.getloadavg()[0]
        if options.json:
            print(json.dumps(results, sort_keys=True))
        else:
            width = max(map(len, results))
            for key, value in results.items():
                print(f"{key:<{width}}  {value}")
    finally:
        reactor.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--readahead", type=int, default=64, help="x-readahead-pages of the readahead variants")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the variants (medians)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-restore", action="store_true", help="no restore into QEMU")
    parser.add_argument("--skip-migrate", action="store_true", help="no migration to our destination")
    parser.add_argument("--skip-hot", action="store_true", help="no hot-set restore into our destination")
    parser.add_argument("--hot", type=int, default=2000, help="pages of the hot set")
    parser.add_argument("--hot-bandwidth", type=int, default=64, metavar="MIB",
                        help="MiB/s of the hot-set restores (a slower link than loopback)")
    parser.add_argument("--destination-role", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.destination_role:
        reactor.callWhenRunning(lambda: destinationRole(options.destination_role, options.hot, options.mib).addBoth(
            lambda _: reactor.stop()))
    else:
        reactor.callWhenRunning(main, options)
    reactor.run()
