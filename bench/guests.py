"""
Guest benchmark: the attach protocol, reads through faults, and the
built-in guests migrated.

1. Attach: spawn N idle worker processes in C{fault} mode and wait until
   all attached (includes Python start-up).
2. Reads through faults: 1 and 4 worker processes read (SHA-256) a block
   of non-zero pages that arrive only through their faults, from a
   L{FaultService} with an in-process page source (C{_mbps}: megabits per
   second of block read, the slowest worker).
3. stress migrated by postcopy between two managers over loopback (32 MiB/s
   before and after switchover, postcopy after 0.5 s): total time,
   downtime, postcopy requests (the destination's workers verify all their
   pages at once after loading, so most pages are faulted), and whether the
   destination verifies.
4. kv: SET round trips per second from one TCP client.

Usage: C{python bench/guests.py [--mib N] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from twisted_postcopy.guests.guest import Guest, GuestSpec, IncomingGuest
from twisted_postcopy.guests.host import GuestHost
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.ram.faults import FaultService
from twisted_postcopy.ram.guestworker import MemoryPageSource

MiB = 1 << 20
STRESS = "twisted_postcopy.guests.stress"


@inlineCallbacks
def faultReads(reactor: Any, directory: str, mib: int, workers: int, results: dict[str, Any]) -> Any:
    """
    Attach C{workers} processes and read a block through their faults.

    @param reactor: the reactor.
    @param directory: for the socket.
    @param mib: the block size.
    @param workers: how many processes.
    @param results: gets C{attach_wN_ms} and C{fault_read_wN_mbps}.
    """
    contents = b"".join(i.to_bytes(8, "little") * 512 for i in range(1, mib * 256 + 1))
    block = RAMBlock("ram", len(contents))
    source = MemoryPageSource({"ram": contents})
    service = FaultService(reactor, source, [block])
    source.service = service
    host = GuestHost(reactor, os.path.join(directory, f"f{workers}.sock"), [block], "fault", faultService=service)
    began = time.perf_counter()
    host.spawn(STRESS, "stress", workers, ["--working-set", "0"])
    yield host.whenAttached()
    results[f"attach_w{workers}_ms"] = (time.perf_counter() - began) * 1e3
    began = time.perf_counter()
    yield host.digest()
    results[f"fault_read_w{workers}_mbps"] = len(contents) * 8 / 1e6 / (time.perf_counter() - began)
    yield host.kill()
    block.close()


@inlineCallbacks
def stressMigration(reactor: Any, directory: str, mib: int, results: dict[str, Any]) -> Any:
    """
    Migrate a running stress guest by postcopy; verify on the destination.

    @param reactor: the reactor.
    @param directory: for the sockets.
    @param mib: the block size (both workers cover it all).
    @param results: gets C{stress_total_ms}, C{stress_downtime_ms},
        C{stress_postcopy_requests}, C{stress_verified}.
    """
    pages = mib * 256 // 2
    spec = GuestSpec("stress", 2, (("ram", mib * MiB),), ("--working-set", str(pages), "--rate", "20000"))
    source = Guest(reactor, spec, os.path.join(directory, "src.sock"))
    destination = IncomingGuest(reactor, spec, os.path.join(directory, "dst.sock"), autoRun=False)
    yield source.start()
    src, dst = MigrationManager(reactor, source), MigrationManager(reactor, destination,
                                                                  destination.faultServiceFactory)
    for manager in (src, dst):
        manager.setCapabilities({"postcopy-ram": True})
    src.setParameters({"max-bandwidth": 32 * MiB, "max-postcopy-bandwidth": 32 * MiB})
    port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
    src.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
    yield src.whenStatus("active")
    yield deferLater(reactor, 0.5, lambda: None)
    src.startPostcopy()
    yield destination.running
    verified = yield destination.host.verify()
    yield src.whenStatus("completed", "failed")
    yield dst.whenStatus("completed", "failed")
    info = src.queryMigrate()
    results.update(stress_total_ms=info.get("total-time"), stress_downtime_ms=info.get("downtime"),
                   stress_postcopy_requests=info["ram"]["postcopy-requests"],
                   stress_verified=all(r["ok"] for r in verified.values()))
    yield source.close()
    yield destination.close()


def setLoop(port: int, count: int) -> float:
    """
    @param port: the kv port.
    @param count: how many SETs.
    @return: seconds taken.
    """
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as answers:
        began = time.perf_counter()
        for n in range(count):
            sock.sendall(b"SET k%d v%d\n" % (n % 1000, n))
            answers.readline()
        return time.perf_counter() - began


@inlineCallbacks
def kvRate(reactor: Any, directory: str, results: dict[str, Any]) -> Any:
    """
    @param reactor: the reactor.
    @param directory: for the socket.
    @param results: gets C{kv_set_us}.
    """
    block = RAMBlock("ram", 4 * MiB)
    host = GuestHost(reactor, os.path.join(directory, "kv.sock"), [block], "plain")
    host.spawn("twisted_postcopy.guests.kv", "kv", 1)
    yield host.whenAttached()
    yield host.run()
    seconds = yield deferToThread(setLoop, host.workers["kv-0"].info["port"], 5000)
    results["kv_set_us"] = seconds / 5000 * 1e6
    yield host.kill()
    block.close()


def report(results: dict[str, Any]) -> str:
    """
    @param results: the figures.
    @return: a table.
    """
    return "\n".join(f"{name:<28} {value:>12.1f}" if isinstance(value, float) else f"{name:<28} {value!s:>12}"
                     for name, value in results.items())


def main(argv: list[str] | None = None) -> None:
    """
    @param argv: the command line.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="block size in MiB")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args(argv)
    results: dict[str, Any] = {}

    @inlineCallbacks
    def run(reactor: Any) -> Any:
        """
        @param reactor: the reactor.
        """
        directory = tempfile.mkdtemp()
        for workers in (1, 4):
            yield faultReads(reactor, directory, options.mib, workers, results)
        yield stressMigration(reactor, directory, options.mib, results)
        yield kvRate(reactor, directory, results)

    from twisted.internet import task

    try:
        task.react(run)
    except SystemExit as exit:
        if exit.code:
            raise
    print(json.dumps(results) if options.json else report(results))


if __name__ == "__main__":
    main(sys.argv[1:])
