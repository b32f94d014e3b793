"""
Latency of the control API: C{query-migrate} round trips and C{MIGRATION}
event delivery between a L{ControlClient} and a L{ControlAMP} over a real
Unix socket, in one process (the manager is a stand-in returning a
QMP-sized C{query-migrate} object, so this measures AMP and JSON only).

Usage: C{python bench/bench_control.py [--calls N] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint

from twisted_postcopy.control.client import connectControl, runMain
from twisted_postcopy.control.server import ControlFactory

#: A C{query-migrate} answer of realistic size.
INFO = {
    "status": "postcopy-active", "total-time": 2345, "setup-time": 4, "downtime": 41,
    "ram": {"total": 268435456, "transferred": 201326592, "remaining": 67108864,
            "duplicate": 1024, "normal": 49152, "normal-bytes": 201326592, "mbps": 2811.2,
            "dirty-sync-count": 3, "postcopy-requests": 57, "page-size": 4096},
    "postcopy-blocktime": 120, "postcopy-vcpu-blocktime": [80, 40],
}


class BenchManager:
    """
    The smallest manager: answers C{query-migrate}, holds subscribers.
    """

    def __init__(self) -> None:
        """
        No subscribers yet.
        """
        self.subscribers: list[Callable[[dict], None]] = []

    def queryMigrate(self) -> dict[str, Any]:
        """
        @return: L{INFO}.
        """
        return INFO

    def subscribe(self, callback: Callable[[dict], None]) -> Callable[[], None]:
        """
        @param callback: the subscriber.
        @return: the unsubscribe callable.
        """
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)


async def measure(reactor: Any, calls: int) -> dict[str, float]:
    """
    Time C{calls} round trips and C{calls} events.

    @param reactor: the reactor.
    @param calls: how many of each.
    @return: the figures.
    """
    manager = BenchManager()
    path = os.path.join(tempfile.mkdtemp(prefix="pc-bench-"), "control.sock")
    port = await UNIXServerEndpoint(reactor, path).listen(ControlFactory(manager))
    client = await connectControl(reactor, "unix:" + path)
    rtts = []
    for _ in range(calls):
        start = time.perf_counter()
        await client.queryMigrate()
        rtts.append((time.perf_counter() - start) * 1e6)
    waiting: list[Deferred] = []
    await client.subscribe(lambda event, data: waiting.pop().callback(time.perf_counter()))
    delays = []
    for _ in range(calls):
        d: Deferred = Deferred()
        waiting.append(d)
        start = time.perf_counter()
        manager.subscribers[0]({"event": "MIGRATION", "data": {"status": "active"}})
        delays.append(((await d) - start) * 1e6)
    client.transport.loseConnection()
    await port.stopListening()
    return {
        "query_migrate_median_us": statistics.median(rtts),
        "query_migrate_p99_us": sorted(rtts)[int(len(rtts) * 0.99) - 1],
        "event_median_us": statistics.median(delays),
        "event_p99_us": sorted(delays)[int(len(delays) * 0.99) - 1],
    }


def main() -> int:
    """
    Run the benchmark and print a table, or one JSON object.

    @return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    async def run(reactor: Any) -> int:
        """
        Measure and print.

        @param reactor: the reactor.
        @return: 0.
        """
        figures = await measure(reactor, args.calls)
        if args.json:
            print(json.dumps({k: round(v, 1) for k, v in figures.items()}))
        else:
            print(f"control API over a Unix socket, {args.calls} calls each")
            for name, value in figures.items():
                print(f"  {name:<26} {value:10.1f}")
        return 0

    return runMain(run)


if __name__ == "__main__":
    raise SystemExit(main())
