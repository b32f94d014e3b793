"""
Migration engine benchmark over loopback TCP, the source in this process
and the destination daemon in a child process (one core each), beside
QEMU 7.2 to QEMU 7.2 doing the same work in the same run.

Runs, on a guest of C{--mib} MiB whose every page holds non-zero data:
  1. Precopy with no bandwidth limit. Reports throughput, total time and
     the switchover downtime.
  2. Postcopy without preempt, then 3. with C{postcopy-preempt}. A real
     guest process (the guest worker, one thread) reads all of its RAM
     through its own userfaultfd, served by the production fault service,
     in C{--passes} strided passes (pass k: pages k, k+passes, ...; the
     default 1 sweeps RAM in order, as QEMU's counting guest does).
     Precopy runs at 8 MiB/s until that guest is ready, then the switch;
     the total time counts from migrate-start-postcopy. Reports the page
     request latency from fault read to placement and wake (p50/p99), the
     downtime, the total time and the destination's C{postcopy-blocktime}
     (QEMU's algorithm, L{twisted_postcopy.blocktime}).
  4. QEMU 7.2 to QEMU 7.2 postcopy (TCG, switched to postcopy at once, no
     bandwidth limit, no preempt) of the boot-sector counting guest with
     the same RAM size: it writes a counter into every page from 1 MiB to
     1 MiB below the top of RAM, counts one pass and is then stopped.

The same work: the same RAM size; every page non-zero on our side, all
but the guest's first and last MiB (firmware) on QEMU's (both sides'
normal and zero page counts are printed); the same dirty rate, zero (our
source never writes, QEMU's source guest is stopped before C{migrate});
the destination's guest reads its RAM once from RUN.  C{mean_stall_us}
and C{qemu_mean_stall_us} are blocktime / page requests on each side,
both without preempt; C{page_request_p50_us} and C{page_request_p99_us}
are with preempt (C{_nopreempt} and C{_preempt} keys hold each run's
figures).  QEMU's downtime is not shown: its source was stopped before
C{migrate}.
If the preempt run fails (a source or destination refusing
C{postcopy-preempt}), its error is printed (C{preempt_error}),
its keys are L{None} and the exit status is 1.

Runs 2 to 4 are repeated C{--rounds} times (default 3), ours and QEMU's
alternating.  On this machine a 1 GiB postcopy, ours or QEMU's, takes
either about 1 s or 3 to 5 s, the slow mode being the first write into
each page the kernel allocates costing about four times as much, on the
hypervisor's side (docs/engine.md); one round
says mostly which mode each side hit.  Every postcopy key is the median
over the rounds (L{qemu_restore.medians}), C{ratio_postcopy_total} is the
median of our totals over the median of QEMU's, and C{rounds} lists each
round's two totals.  C{postcopy_faults} counts the fault messages the
destination's fault service read (a fault on a page placed after the
thread faulted but before its message was read counts, and is not a
request).

Throughput is in megabits per second (C{_mbps}, QEMU's C{mbps} unit); the
table adds GB/s.  Ratios are ours / QEMU's, lower is better.

Usage: C{python bench/migrate.py [--mib 1024] [--passes 1] [--rounds 3] [--json] [--no-qemu]}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qemu_restore  # noqa: E402
from twisted_postcopy.errors import MigrationError  # noqa: E402
from twisted_postcopy.manager import MigrationManager  # noqa: E402
from twisted_postcopy.testing.enginevm import OutgoingTestVM  # noqa: E402
from twisted_postcopy.testing.qemubaseline import UNLIMITED, qemuToQemuPostcopy  # noqa: E402
from twisted_postcopy.testing.qemuhost import qemuMissing  # noqa: E402
from twisted_postcopy.testing.workerguest import WorkerGuestVM  # noqa: E402


#: Precopy bandwidth (bytes/s) of the postcopy run until the destination's
#: guest is ready: its faults then meet a RAM that is almost all missing.
WAITING_BANDWIDTH = 8 << 20


def stressVM(mib: int) -> OutgoingTestVM:
    """
    @param mib: RAM size in MiB.
    @return: a source VM whose every page holds non-zero data.
    """
    vm = OutgoingTestVM({"pc.ram": mib << 20})
    chunk = os.urandom(1 << 20)
    ram = vm.blocks[0].map
    for offset in range(0, mib << 20, 1 << 20):
        ram[offset : offset + (1 << 20)] = chunk
    return vm


class TimedGuestVM(WorkerGuestVM):
    """
    The incoming VM: production RAMBlocks and fault service, a guest worker
    process reading all of its RAM from POSTCOPY_RUN; each fault on a
    missing page is timed from the moment the fault service read it to
    the placement that woke it (the fault service's own observers, the
    ones blocktime uses).

    @ivar latencies: seconds, one per fault on a missing page.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """
        Nothing timed yet.
        """
        super().__init__(*args, **kwargs)
        self.started: dict[int, float] = {}
        self.latencies: list[float] = []

    def faultServiceFactory(self, blocks: Any, pageSource: Any) -> Any:
        """
        The production fault service, observed.
        """
        service = super().faultServiceFactory(blocks, pageSource)
        service.addFaultObserver(self._faulted)
        service.addPlacementObserver(self._placed)
        return service

    def _faulted(self, threadId: int, address: int, received: bool) -> None:
        """
        A fault was read: remember when, if the page is missing.
        """
        if not received:
            self.started.setdefault(address, time.perf_counter())

    def _placed(self, address: int) -> None:
        """
        A faulted page was placed and its waiters woken.
        """
        began = self.started.pop(address, None)
        if began is not None:
            self.latencies.append(time.perf_counter() - began)


@inlineCallbacks
def destinationRole(postcopy: bool, preempt: bool, passes: int) -> Any:
    """
    The destination daemon (run in its own process by L{migrate}): prints
    its port, C{ready} once its guest worker mapped the blocks and
    registered its userfaultfd, then, once completed, one JSON line with
    the fault latencies and its C{postcopy-blocktime}.

    @param postcopy: enable C{postcopy-ram} (and C{postcopy-blocktime}).
    @param preempt: enable C{postcopy-preempt}.
    @param passes: the guest's strided passes over its RAM.
    """
    destination = TimedGuestVM(reactor, passes=passes)
    dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
    dst.setCapabilities({"postcopy-ram": postcopy, "postcopy-blocktime": postcopy,
                         "postcopy-preempt": preempt})
    port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
    print(port.getHost().port, flush=True)
    destination.ready.addCallback(lambda _: print("ready", flush=True))
    status = yield dst.whenStatus("completed", "failed")
    yield destination.done
    blocktime = dst.queryMigrate().get("postcopy-blocktime")
    print(json.dumps({"status": status, "latencies": destination.latencies, "blocktime": blocktime,
                      "faults": destination.service.faultCount if destination.service else 0}), flush=True)


class DestinationProcess(protocol.ProcessProtocol):
    """
    The parent's view of the destination process.

    @ivar port: fires with its listening port.
    @ivar ready: fires once its guest worker is ready.
    @ivar result: fires with its final JSON line.
    """

    def __init__(self) -> None:
        """
        Nothing received yet.
        """
        self.port: Deferred = Deferred()
        self.ready: Deferred = Deferred()
        self.result: Deferred = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        """
        Lines: the port, C{ready}, the result.
        """
        self.output += data
        *lines, self.output = self.output.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready.callback(None)
            elif not self.port.called:
                self.port.callback(int(line))
            else:
                self.result.callback(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        """
        Show the destination's errors.
        """
        sys.stderr.write(data.decode(errors="replace"))


@inlineCallbacks
def migrate(mib: int, postcopy: bool, preempt: bool = False, passes: int = 1) -> Any:
    """
    Run one migration to a destination in its own process (so each side
    has a core).

    @param mib: guest RAM in MiB.
    @param postcopy: switch to postcopy as soon as the destination's guest
        worker is ready (precopy runs at L{WAITING_BANDWIDTH} until then).
    @param preempt: use C{postcopy-preempt} on both sides.
    @param passes: the destination guest's strided passes over its RAM.
    @return: (source query-migrate, elapsed seconds, the destination's
        result line: fault latencies and blocktime); in postcopy the time
        counts from C{migrate-start-postcopy}.
    @raise MigrationError: our source refused the migration.
    """
    source = stressVM(mib)
    destination = DestinationProcess()
    arguments = [sys.executable, os.path.abspath(__file__), "--destination-role", "--passes", str(passes)]
    if postcopy:
        arguments.append("--postcopy")
    if preempt:
        arguments.append("--preempt")
    process = reactor.spawnProcess(destination, sys.executable, arguments, env=None)
    port = yield destination.port
    src = MigrationManager(reactor, source)
    src.setParameters({"max-bandwidth": WAITING_BANDWIDTH if postcopy else 0, "max-postcopy-bandwidth": 0})
    src.setCapabilities({"postcopy-ram": postcopy, "postcopy-preempt": preempt})
    began = time.perf_counter()
    try:
        src.migrate(f"tcp:127.0.0.1:{port}")
    except MigrationError:
        process.signalProcess("KILL")
        raise
    if postcopy:
        yield destination.ready
        began = time.perf_counter()
        src.startPostcopy()
    status = yield src.whenStatus("completed", "failed")
    elapsed = time.perf_counter() - began
    result = yield destination.result
    if status != "completed" or result["status"] != "completed":
        raise RuntimeError(f"migration {status}/{result['status']}: {src.queryMigrate()}")
    return src.queryMigrate(), elapsed, result


def _percentile(values: list[float], fraction: float) -> float:
    """
    @return: the value at C{fraction} of the sorted values, in microseconds.
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e6


def meanStall(blocktimeMs: int | None, requests: int) -> float | None:
    """
    @param blocktimeMs: a destination's C{postcopy-blocktime}.
    @param requests: the source's C{postcopy-requests}.
    @return: the mean stall per page request in microseconds, or L{None}.
    """
    if blocktimeMs is None or not requests:
        return None
    return round(blocktimeMs * 1000 / requests, 1)


def postcopyFigures(info: dict[str, Any], elapsed: float, result: dict[str, Any], suffix: str) -> dict[str, Any]:
    """
    @param info: the source's final C{query-migrate}.
    @param elapsed: seconds from C{migrate-start-postcopy} to completion.
    @param result: the destination's result line.
    @param suffix: appended to every key.
    @return: one postcopy run's figures.
    """
    latencies = result["latencies"]
    requests = info["ram"]["postcopy-requests"]
    return {
        f"postcopy_total_ms{suffix}": round(elapsed * 1000),
        f"postcopy_downtime_ms{suffix}": info["downtime"],
        f"postcopy_requests{suffix}": requests,
        f"page_request_p50_us{suffix}": round(_percentile(latencies, 0.5)),
        f"page_request_p99_us{suffix}": round(_percentile(latencies, 0.99)),
        f"page_request_mean_us{suffix}": round(statistics.mean(latencies) * 1e6) if latencies else 0,
        f"blocktime_ms{suffix}": result["blocktime"],
        f"postcopy_faults{suffix}": result["faults"],
        f"mean_stall_us{suffix}": meanStall(result["blocktime"], requests),
        f"normal_pages{suffix}": info["ram"]["normal"],
        f"zero_pages{suffix}": info["ram"]["duplicate"],
    }


def qemuBaseline(mib: int) -> dict[str, Any]:
    """
    QEMU-to-QEMU postcopy of a guest of the same size.

    @param mib: guest RAM in MiB.
    @return: the QEMU figures.
    """
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as scratch:
        qemu = qemuToQemuPostcopy(mib, scratch, startAfterBytes=0, precopyBandwidth=UNLIMITED,
                                  stopSource=True, timeout=300.0)
    figures = {
        "qemu_postcopy_total_ms": qemu["total_ms"],
        "qemu_postcopy_requests": qemu["postcopy_requests"],
        "qemu_postcopy_mbps": round(qemu["mbps"], 1),
        "qemu_blocktime_ms": qemu["blocktime_ms"],
        "qemu_mean_stall_us": meanStall(qemu["blocktime_ms"], qemu["postcopy_requests"]),
        "qemu_normal_pages": qemu["normal_pages"],
        "qemu_zero_pages": qemu["zero_pages"],
    }
    return figures


@inlineCallbacks
def postcopyRound(options: argparse.Namespace) -> Any:
    """
    One round: our postcopy without then with preempt, then QEMU's.

    @return: the round's figures (a refused preempt run's error goes to
        C{options.preemptError}).
    """
    figures = postcopyFigures(*(yield migrate(options.mib, True, False, options.passes)), "_nopreempt")
    try:
        figures.update(postcopyFigures(*(yield migrate(options.mib, True, True, options.passes)), "_preempt"))
    except MigrationError as e:
        options.preemptError = str(e)
        figures.update({key: None for key in postcopyFigures(
            {"downtime": None, "ram": {"postcopy-requests": 0, "normal": None, "duplicate": None}},
            0.0, {"latencies": [], "blocktime": None, "faults": None}, "_preempt")})
    if not options.no_qemu and not qemuMissing():
        figures.update(qemuBaseline(options.mib))
    return figures


@inlineCallbacks
def main(options: argparse.Namespace) -> Any:
    """
    Run the migrations and print the results.
    """
    try:
        pre, preTime, _ = yield migrate(options.mib, False)
        size = options.mib << 20
        results: dict[str, Any] = {
            "guest_mib": options.mib,
            "passes": options.passes,
            "precopy_throughput_mbps": round(size * 8 / preTime / 1e6, 1),
            "precopy_total_ms": round(preTime * 1000),
            "precopy_downtime_ms": pre["downtime"],
        }
        rounds = []
        for _ in range(options.rounds):
            rounds.append((yield postcopyRound(options)))
        results.update(qemu_restore.medians(rounds))
        if options.preemptError is not None:
            results["preempt_error"] = options.preemptError
        results["rounds"] = [{"ours_ms": figures["postcopy_total_ms_nopreempt"],
                              "ours_preempt_ms": figures["postcopy_total_ms_preempt"],
                              "qemu_ms": figures.get("qemu_postcopy_total_ms")} for figures in rounds]
        # The headline keys: request latency with preempt, the stall beside
        # QEMU's (which runs without preempt) without.
        results["page_request_p50_us"] = results["page_request_p50_us_preempt"]
        results["page_request_p99_us"] = results["page_request_p99_us_preempt"]
        results["mean_stall_us"] = results["mean_stall_us_nopreempt"]
        if not options.no_qemu:
            reason = qemuMissing()
            if reason:
                results["qemu_skipped"] = reason
            elif results["qemu_postcopy_total_ms"]:
                results["ratio_postcopy_total"] = round(
                    results["postcopy_total_ms_nopreempt"] / results["qemu_postcopy_total_ms"], 3)
        results["load_1min"] = os.getloadavg()[0]
        if options.json:
            print(json.dumps(results))
        else:
            width = max(map(len, results))
            for key, value in results.items():
                print(f"{key:<{width}}  {value}")
            print(f"{'(precopy throughput)':<{width}}  {size / preTime / 1e9:.2f} GB/s")
        if "preempt_error" in results:
            print(f"migrate.py: the preempt run failed: {results['preempt_error']}", file=sys.stderr)
            exitStatus.append(1)
    finally:
        reactor.stop()


#: The exit status, set by L{main}.
exitStatus: list[int] = []


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--passes", type=int, default=1, help="the destination guest's strided passes")
    parser.add_argument("--rounds", type=int, default=3, help="postcopy rounds (ours, then QEMU's), medians kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU-to-QEMU baseline")
    parser.add_argument("--destination-role", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--postcopy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preempt", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    options.preemptError = None
    if options.destination_role:
        reactor.callWhenRunning(lambda: destinationRole(options.postcopy, options.preempt, options.passes).addBoth(
            lambda _: reactor.stop()))
    else:
        reactor.callWhenRunning(main, options)
    reactor.run()
    sys.exit(exitStatus[0] if exitStatus else 0)
