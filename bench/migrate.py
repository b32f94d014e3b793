"""
Migration engine benchmark over loopback TCP, the source in this process
and the destination daemon in a child process (one core each).

Runs two migrations of a guest whose RAM holds incompressible data:
  1. Precopy with no bandwidth limit. Reports throughput, total time and
     the switchover downtime.
  2. Postcopy from the first iteration. A real guest process (the guest
     worker, one thread) reads all of its RAM through its own userfaultfd,
     served by the production fault service, in 64 strided passes (pass k:
     pages k, k+64, ...) so that its faults spread over all of RAM. Precopy
     runs at 8 MiB/s until that guest is ready, then the switch; the total
     time counts from migrate-start-postcopy. Reports the page request
     latency from fault read to placement and wake (p50/p99), the downtime
     (stop until the package is sent) and the total time.

Beside them, in the same run, a QEMU 7.2 to QEMU 7.2 postcopy migration of
a guest with the same RAM size (the project's boot-sector counter guest
under TCG, switched to postcopy at once, no bandwidth limit), and the
ratios of our figures to QEMU's (C{--no-qemu} skips it). The guests
differ: ours holds incompressible data in every page, QEMU's is mostly
zero pages, which QEMU sends as 9-byte records.

Throughput is in megabits per second (C{_mbps}, QEMU's C{mbps} unit); the
table adds GB/s.

Usage: C{python bench/migrate.py [--mib 1024] [--json]}
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

from twisted_postcopy.manager import MigrationManager  # noqa: E402
from twisted_postcopy.testing.enginevm import OutgoingTestVM  # noqa: E402
from twisted_postcopy.testing.qemubaseline import UNLIMITED, qemuToQemuPostcopy  # noqa: E402
from twisted_postcopy.testing.qemuhost import qemuMissing  # noqa: E402
from twisted_postcopy.testing.workerguest import WorkerGuestVM  # noqa: E402


#: Strided passes of the destination guest over its RAM.
PASSES = 64
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
def destinationRole(postcopy: bool) -> Any:
    """
    The destination daemon (run in its own process by L{migrate}): prints
    its port, C{ready} once its guest worker mapped the blocks and
    registered its userfaultfd, then, once completed, one JSON line with
    the fault latencies.

    @param postcopy: enable C{postcopy-ram}.
    """
    destination = TimedGuestVM(reactor, passes=PASSES)
    dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
    dst.setCapabilities({"postcopy-ram": postcopy})
    port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
    print(port.getHost().port, flush=True)
    destination.ready.addCallback(lambda _: print("ready", flush=True))
    status = yield dst.whenStatus("completed", "failed")
    yield destination.done
    print(json.dumps({"status": status, "latencies": destination.latencies}), flush=True)


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
def migrate(mib: int, postcopy: bool) -> Any:
    """
    Run one migration to a destination in its own process (so each side
    has a core).

    @param mib: guest RAM in MiB.
    @param postcopy: switch to postcopy as soon as the destination's guest
        worker is ready (precopy runs at L{WAITING_BANDWIDTH} until then).
    @return: (source query-migrate, elapsed seconds, fault latencies); in
        postcopy the time counts from C{migrate-start-postcopy}.
    """
    source = stressVM(mib)
    destination = DestinationProcess()
    arguments = [sys.executable, os.path.abspath(__file__), "--destination-role"]
    if postcopy:
        arguments.append("--postcopy")
    reactor.spawnProcess(destination, sys.executable, arguments, env=None)
    port = yield destination.port
    src = MigrationManager(reactor, source)
    src.setParameters({"max-bandwidth": WAITING_BANDWIDTH if postcopy else 0, "max-postcopy-bandwidth": 0})
    src.setCapabilities({"postcopy-ram": postcopy})
    began = time.perf_counter()
    src.migrate(f"tcp:127.0.0.1:{port}")
    if postcopy:
        yield destination.ready
        began = time.perf_counter()
        src.startPostcopy()
    status = yield src.whenStatus("completed", "failed")
    elapsed = time.perf_counter() - began
    result = yield destination.result
    if status != "completed" or result["status"] != "completed":
        raise RuntimeError(f"migration {status}/{result['status']}: {src.queryMigrate()}")
    return src.queryMigrate(), elapsed, result["latencies"]


def _percentile(values: list[float], fraction: float) -> float:
    """
    @return: the value at C{fraction} of the sorted values, in microseconds.
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e6


def qemuBaseline(mib: int, ours: dict[str, Any]) -> dict[str, Any]:
    """
    QEMU-to-QEMU postcopy of a guest of the same size, and our ratios.

    @param mib: guest RAM in MiB.
    @param ours: our figures (see L{main}).
    @return: the QEMU figures and ratios (ours / QEMU's), or a skip reason.
    """
    reason = qemuMissing()
    if reason:
        return {"qemu_skipped": reason}
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as scratch:
        qemu = qemuToQemuPostcopy(mib, scratch, startAfterBytes=0, precopyBandwidth=UNLIMITED)
    figures = {
        "qemu_postcopy_total_ms": qemu["total_ms"],
        "qemu_postcopy_downtime_ms": qemu["downtime_ms"],
        "qemu_postcopy_requests": qemu["postcopy_requests"],
        "qemu_postcopy_mbps": round(qemu["mbps"], 1),
    }
    if qemu["total_ms"]:
        figures["ratio_postcopy_total"] = round(ours["postcopy_total_ms"] / qemu["total_ms"], 2)
    return figures


@inlineCallbacks
def main(options: argparse.Namespace) -> Any:
    """
    Run both migrations and print the results.
    """
    try:
        pre, preTime, _ = yield migrate(options.mib, False)
        post, postTime, latencies = yield migrate(options.mib, True)
        size = options.mib << 20
        results = {
            "guest_mib": options.mib,
            "precopy_throughput_mbps": round(size * 8 / preTime / 1e6, 1),
            "precopy_total_ms": round(preTime * 1000),
            "precopy_downtime_ms": pre["downtime"],
            "postcopy_downtime_ms": post["downtime"],
            "postcopy_total_ms": round(postTime * 1000),
            "postcopy_requests": post["ram"]["postcopy-requests"],
            "page_request_p50_us": round(_percentile(latencies, 0.5)),
            "page_request_p99_us": round(_percentile(latencies, 0.99)),
            "page_request_mean_us": round(statistics.mean(latencies) * 1e6) if latencies else 0,
        }
        if not options.no_qemu:
            results.update(qemuBaseline(options.mib, results))
        if options.json:
            print(json.dumps(results))
        else:
            width = max(map(len, results))
            for key, value in results.items():
                print(f"{key:<{width}}  {value}")
            print(f"{'(precopy throughput)':<{width}}  {size / preTime / 1e9:.2f} GB/s")
    finally:
        reactor.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU-to-QEMU baseline")
    parser.add_argument("--destination-role", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--postcopy", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.destination_role:
        reactor.callWhenRunning(lambda: destinationRole(options.postcopy).addBoth(lambda _: reactor.stop()))
    else:
        reactor.callWhenRunning(main, options)
    reactor.run()
