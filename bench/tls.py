"""
What TLS costs a migration (docs/tls.md): the same migration with and
without TLS, ours and QEMU's.

Ours: two real C{twistd postcopy} daemons with built-in stress guests
(every page holds data), C{migrate-start-postcopy} after
C{--postcopy-after} seconds (default: at once), the destination guest
verifying every page; once plaintext, once with C{tls-creds} on both
daemons.

QEMU: a QEMU 7.2 to QEMU 7.2 precopy of the boot-sector guest of the
same RAM size (TCG, no bandwidth limit, the source stopped first: with
its counters running a TLS precopy does not converge), once plaintext,
once with C{tls-creds-x509} objects on both.  QEMU's guest is stopped,
ours runs: compare each system's TLS/plain ratio more than the two
throughputs.

Usage: C{python bench/tls.py [--mib 256] [--json] [--no-qemu]}
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_postcopy.control.client import runMain  # noqa: E402
from twisted_postcopy.control.daemon import startDaemon  # noqa: E402
from twisted_postcopy.demo import Progress, daemonArguments, migrate  # noqa: E402
from twisted_postcopy.testing import pki  # noqa: E402


async def ours(reactor: Any, mib: int, useTLS: bool, postcopyAfter: float,
               credentials: str) -> dict[str, Any]:
    """
    One migration between two daemons.

    @param reactor: the reactor.
    @param mib: guest RAM in MiB.
    @param useTLS: with TLS.
    @param postcopyAfter: seconds of precopy before postcopy.
    @param credentials: the credentials directory.
    @return: the source's final C{query-migrate} and the guest's verdict.
    """
    workdir = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    options = argparse.Namespace(guest="stress", ram=mib << 20, seed=3, timeout=600,
                                 postcopy_after=postcopyAfter)
    daemons = []
    try:
        for role in ("destination", "source"):
            extra = []
            if useTLS:
                endpoint = "server" if role == "destination" else "client"
                extra = ["--object", f"tls-creds-x509,id=tls0,dir={credentials},endpoint={endpoint}",
                         "--parameter", "tls-creds=tls0"]
            daemons.append(await startDaemon(reactor, role, workdir,
                                             [*daemonArguments(options, role), *extra]))
        result = await migrate(reactor, daemons[1], daemons[0], options,
                               Progress(io.StringIO(), options.ram))
    finally:
        for daemon in daemons:
            await daemon.stop(reactor)
        shutil.rmtree(workdir, ignore_errors=True)
    if result["source"]["status"] != "completed" or not result["verified"]:
        raise RuntimeError(f"migration failed: {result}")
    return result["source"]


def qemuPrecopy(mib: int, useTLS: bool, credentials: str, scratch: str) -> dict[str, Any]:
    """
    One QEMU-to-QEMU precopy.

    @param mib: guest RAM in MiB.
    @param useTLS: with TLS.
    @param credentials: the credentials directory.
    @param scratch: a scratch directory.
    @return: the source's final C{query-migrate}.
    """
    from twisted_postcopy.testing.qemubaseline import UNLIMITED, guestPair, layoutFor
    from twisted_postcopy.testing.qemuguest import listenIncoming

    directory = tempfile.mkdtemp(dir=scratch)
    with guestPair(directory, layoutFor(mib), mib) as (source, destination):
        if useTLS:
            for qemu, endpoint in ((source, "client"), (destination, "server")):
                qemu.qmp("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                          "dir": credentials, "endpoint": endpoint})
                qemu.qmp("migrate-set-parameters", **{"tls-creds": "tls0"})
        source.setParameters(max_bandwidth=UNLIMITED)
        host, port = listenIncoming(destination)
        source.waitSerial(1, 60)
        source.qmp("stop")
        source.migrate(f"tcp:{host}:{port}")
        info = source.waitMigration(["completed"], 300)
        destination.waitMigration(["completed"], 60)
        return info


def row(info: dict[str, Any]) -> dict[str, Any]:
    """
    @param info: a source's final C{query-migrate}.
    @return: its total time, downtime and throughput.
    """
    return {"total_ms": info["total-time"], "downtime_ms": info.get("downtime"),
            "mbps": round(info["ram"]["mbps"], 1),
            "transferred_bytes": info["ram"]["transferred"]}


async def run(reactor: Any, args: argparse.Namespace) -> int:
    """
    Run every migration and print the figures.

    @param reactor: the reactor.
    @param args: the options.
    @return: 0.
    """
    scratch = tempfile.mkdtemp(prefix="bench-tls-")
    try:
        credentials = os.path.join(scratch, "pki")
        pki.writeCredentials(credentials)
        figures: dict[str, Any] = {"guest_mib": args.mib}
        for name, useTLS in (("plain", False), ("tls", True)):
            started = time.monotonic()
            info = await ours(reactor, args.mib, useTLS, args.postcopy_after, credentials)
            figures.update({f"ours_{name}_{k}": v for k, v in row(info).items()})
            figures[f"ours_{name}_wall_ms"] = round((time.monotonic() - started) * 1000)
        figures["ours_tls_over_plain_total"] = round(
            figures["ours_tls_total_ms"] / figures["ours_plain_total_ms"], 2)
        if not args.no_qemu:
            for name, useTLS in (("plain", False), ("tls", True)):
                info = qemuPrecopy(args.mib, useTLS, credentials, scratch)
                figures.update({f"qemu_{name}_{k}": v for k, v in row(info).items()})
            figures["qemu_tls_over_plain_total"] = round(
                figures["qemu_tls_total_ms"] / figures["qemu_plain_total_ms"], 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--postcopy-after", type=float, default=0.0,
                        help="seconds of precopy before postcopy (ours)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU-to-QEMU runs")
    sys.exit(runMain(lambda reactor: run(reactor, parser.parse_args())))
