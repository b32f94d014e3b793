"""
Postcopy recovery figures: how fast both sides pause after a real relay
cut, how long the recovery handshake takes (C{migrate resume} to the
source's C{postcopy-active}) and the rest of the migration, with a guest
worker process faulting through its own userfaultfd on the production
fault service; plus the received-bitmap encode and reload cost for a
1 GiB block.

Usage: C{python bench/recovery.py [--mib 64] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater, react

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_postcopy.manager import MigrationManager  # noqa: E402
from twisted_postcopy.ram.bitmap import dirtyFromReceived  # noqa: E402
from twisted_postcopy.ram.block import RAMBlock  # noqa: E402
from twisted_postcopy.testing.enginevm import PAGE, OutgoingTestVM  # noqa: E402
from twisted_postcopy.testing.relay import RecordingRelay  # noqa: E402
from twisted_postcopy.testing.workerguest import WorkerGuestVM  # noqa: E402

MiB = 1 << 20


def bitmapFigures() -> dict[str, float]:
    """
    @return: milliseconds to encode (destination) and reload (source) the
        received bitmap of a half-received 1 GiB block.
    """
    block = RAMBlock("bench", 1 << 30)
    for page in range(0, block.pages, 2):
        block.receivedMap.set(page)
    start = time.perf_counter()
    bitmap = block.receivedBitmap()
    encoded = time.perf_counter()
    dirtyFromReceived(bitmap, 1 << 30, PAGE)
    reloaded = time.perf_counter()
    block.close()
    return {"bitmap_encode_1gib_ms": (encoded - start) * 1e3,
            "bitmap_reload_1gib_ms": (reloaded - encoded) * 1e3}


def stamps(manager: MigrationManager) -> list[tuple[str, float]]:
    """
    @param manager: a side.
    @return: a live list of (status, C{perf_counter}) per status event.
    """
    seen: list[tuple[str, float]] = []
    manager.subscribe(lambda event: seen.append((event["data"]["status"], time.perf_counter())))
    return seen


def since(seen: list[tuple[str, float]], status: str, start: float) -> float:
    """
    @param seen: a side's stamps.
    @param status: a status.
    @param start: a C{perf_counter} start.
    @return: milliseconds from C{start} to the last entry into C{status}.
    """
    return (max(at for name, at in seen if name == status) - start) * 1e3


@inlineCallbacks
def migrateWithRecovery(mib: int):
    """
    Migrate C{mib} MiB through a relay, cut it in postcopy, recover.

    @param mib: guest RAM in MiB.
    @return: a Deferred firing with the figures.
    """
    source = OutgoingTestVM({"pc.ram": mib * MiB})
    for offset in range(0, mib * MiB, PAGE):
        source.write(0, offset, offset.to_bytes(8, "big") * 4)
    destination = WorkerGuestVM(reactor)
    src = MigrationManager(reactor, source)
    dst = MigrationManager(reactor, destination, destination.faultServiceFactory)
    for manager in (src, dst):
        manager.setCapabilities({"postcopy-ram": True})
    src.setParameters({"max-bandwidth": 0, "max-postcopy-bandwidth": 16 * MiB})
    port = yield dst.migrateIncoming("tcp:127.0.0.1:0")
    relay = RecordingRelay(("127.0.0.1", port.getHost().port))
    src.migrate(relay.uri)
    src.startPostcopy()
    yield dst.whenStatus("postcopy-active")
    yield deferLater(reactor, 0.5, lambda: None)
    srcSeen, dstSeen = stamps(src), stamps(dst)
    cut = time.perf_counter()
    relay.cut()
    yield src.whenStatus("postcopy-paused")
    yield dst.whenStatus("postcopy-paused")
    recoverPort = yield dst.migrateRecover("tcp:127.0.0.1:0")
    resumed = time.perf_counter()
    src.migrate(f"tcp:127.0.0.1:{recoverPort.getHost().port}", resume=True)
    yield src.whenStatus("completed")
    yield destination.done
    port.stopListening()
    relay.close()
    return {"pause_source_ms": since(srcSeen, "postcopy-paused", cut),
            "pause_destination_ms": since(dstSeen, "postcopy-paused", cut),
            "handshake_ms": since(srcSeen, "postcopy-active", resumed),
            "resume_to_completed_ms": since(srcSeen, "completed", resumed)}


def main(options: argparse.Namespace) -> Deferred:
    """
    Run the figures and print them.

    @param options: the parsed command line.
    @return: a Deferred firing when done.
    """

    def report(figures: dict[str, float]) -> None:
        """
        @param figures: print them.
        """
        figures.update(bitmapFigures())
        if options.json:
            print(json.dumps(figures))
            return
        print(f"postcopy recovery, {options.mib} MiB, loopback relay cut, guest faulting")
        print(f"  {'figure':28} {'ms':>10}")
        for name, value in figures.items():
            print(f"  {name[:-3]:28} {value:10.2f}")

    return migrateWithRecovery(options.mib).addCallback(report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=64, help="guest RAM in MiB")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    arguments = parser.parse_args()
    react(lambda _: main(arguments))
