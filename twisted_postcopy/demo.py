# -*- test-case-name: tests.test_demo -*-
"""
C{postcopy demo}: a whole postcopy migration on one machine.

Two C{twistd postcopy} daemons are started as child processes (a source
running a built-in guest, a destination waiting with C{--incoming}); the
demo drives them over their AMP control sockets exactly as an operator
would with the C{postcopy} command line: capabilities, C{migrate},
C{migrate-start-postcopy} after a while of precopy, C{query-migrate} until
both sides complete; then it asks the destination guest whether every page
it holds is right.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.task import deferLater

from twisted_postcopy.control.client import FINAL_STATUSES, runMain
from twisted_postcopy.control.daemon import Daemon, startDaemon
from twisted_postcopy.control.progress import Progress, formatReport
from twisted_postcopy.errors import PostcopyError
from twisted_postcopy.tap import GUESTS, parseSize

#: Capabilities set on both sides (QEMU requires postcopy-ram on both;
#: x-postcopy-auto-recover lets a cut link recover with no command).
SOURCE_CAPABILITIES = {"postcopy-ram": True, "x-postcopy-auto-recover": True}
DESTINATION_CAPABILITIES = {"postcopy-ram": True, "postcopy-blocktime": True, "x-postcopy-auto-recover": True}
#: Precopy at QEMU's default 128 MiB/s, so that the default guest (256 MiB)
#: is still in precopy when C{--postcopy-after} asks for postcopy (at 1 GiB/s
#: the demo's precopy converged first and the migration ended without
#: postcopy); postcopy itself runs at full speed.
SOURCE_PARAMETERS = {"max-bandwidth": 128 << 20, "max-postcopy-bandwidth": 0}
#: Entries the demo stores in each kv worker before migrating, then reads
#: back from the destination.
KV_ENTRIES = 500


def daemonArguments(args: argparse.Namespace, role: str) -> list[str]:
    """
    The C{twistd postcopy} options of one side.  The destination is
    started without C{--incoming} (like QEMU's C{-incoming defer}) so its
    capabilities can be set before C{migrate-incoming}.

    @param args: the demo's arguments.
    @param role: C{source} or C{destination}.
    @return: the options.
    """
    arguments = ["--role", role, "--guest", args.guest, "--ram", f"{args.ram}B", "--seed", str(args.seed)]
    if getattr(args, "hugepages", False):
        arguments.append("--hugepages")
    return arguments


def reserveDemoHugePages(args: argparse.Namespace) -> Any:
    """
    With C{--hugepages}, make huge pages for both guests available before
    either daemon starts (the source maps its RAM at start, the
    destination only at RAM START, so each daemon's own check at start
    would count the same free pages).

    @param args: the demo's arguments.
    @return: a function giving back what was added to the pool.
    @raise UffdUnavailableError: they cannot be reserved (the message
        names C{/proc/sys/vm/nr_hugepages}).
    """
    if not getattr(args, "hugepages", False):
        return lambda: None
    from twisted_postcopy.ram.block import HUGE_PAGE_SIZE
    from twisted_postcopy.ram.support import reserveHugePages

    return reserveHugePages(2 * (args.ram // HUGE_PAGE_SIZE))


async def pollUntil(reactor: Any, daemon: Daemon, statuses: frozenset[str], progress: Progress,
                    until: float) -> dict[str, Any]:
    """
    Poll C{query-migrate} on a daemon until it reaches one of C{statuses}
    or the time C{until} passes.

    @param reactor: the reactor.
    @param daemon: the daemon to poll.
    @param statuses: the statuses to wait for.
    @param progress: the progress display to update.
    @param until: the reactor time at which to stop polling.
    @return: the last C{query-migrate} answer.
    @raise twisted_postcopy.errors.DaemonError: the daemon died.
    """
    while True:
        if daemon.protocol.status is not None:
            raise daemon.failure(f"exited with status {daemon.protocol.status}")
        info = await daemon.client.queryMigrate()
        progress.update(daemon.name, info)
        if info.get("status") in statuses or reactor.seconds() >= until:
            return info
        await deferLater(reactor, 0.2, lambda: None)


async def waitForGuest(reactor: Any, source: Daemon, until: float) -> None:
    """
    Wait until the source guest's workers run (C{query-guest}).

    @param reactor: the reactor.
    @param source: the source daemon.
    @param until: the reactor time at which to give up.
    @raise PostcopyError: the guest did not start in time.
    """
    while not (await source.client.queryGuest()).get("running"):
        if source.protocol.status is not None:
            raise source.failure(f"exited with status {source.protocol.status}")
        if reactor.seconds() > until:
            raise source.failure("has a guest that did not start")
        await deferLater(reactor, 0.05, lambda: None)


async def migrate(reactor: Any, source: Daemon, destination: Daemon, args: argparse.Namespace,
                  progress: Progress) -> dict[str, Any]:
    """
    Run the migration and collect both sides' final state.

    @param reactor: the reactor.
    @param source: the source daemon.
    @param destination: the destination daemon.
    @param args: the demo's arguments.
    @param progress: the progress display.
    @return: both C{query-migrate} answers, the source's C{MIGRATION}
        statuses (from events) and the guest's check.
    @raise PostcopyError: a side did not finish within C{args.timeout}.
    """
    deadline = reactor.seconds() + args.timeout
    await waitForGuest(reactor, source, deadline)
    stored = None
    if args.guest == "kv":
        stored = await kvExchange(await source.client.queryGuest(), args.seed, "SET")
    statuses: list[str] = []
    await source.client.subscribe(
        lambda event, data: statuses.append(data["status"]) if event == "MIGRATION" else None
    )
    preempt = {"postcopy-preempt": True} if getattr(args, "postcopy_preempt", False) else {}
    await source.client.setCapabilities({**SOURCE_CAPABILITIES, **preempt})
    await destination.client.setCapabilities({**DESTINATION_CAPABILITIES, **preempt})
    await destination.client.migrateIncoming("tcp:127.0.0.1:0")
    (address,) = (await destination.client.queryMigrate())["socket-address"]
    args.uri = f"tcp:{address['host']}:{address['port']}"
    await source.client.setParameters(SOURCE_PARAMETERS)
    await source.client.migrate(args.uri)
    info = await pollUntil(reactor, source, FINAL_STATUSES, progress,
                           reactor.seconds() + args.postcopy_after)
    if info["status"] in ("setup", "active"):
        await source.client.startPostcopy()
    result: dict[str, Any] = {}
    for daemon in (source, destination):
        info = await pollUntil(reactor, daemon, FINAL_STATUSES, progress, deadline)
        if info.get("status") not in FINAL_STATUSES:
            raise PostcopyError(f"{daemon.name} still {info.get('status')!r} after {args.timeout} s")
        result[daemon.name] = info
    result["source-statuses"] = statuses
    result["guest"] = await destination.client.queryGuest()
    result["verified"] = bool(result["guest"].get("verified"))
    if stored is not None:
        result["kv"] = await kvCheck(destination, args.seed, stored)
        result["verified"] = result["verified"] and result["kv"]["keys"] == result["kv"]["matched"] > 0
    return result


def kvRequests(port: int, lines: list[str]) -> list[str]:
    """
    Send request lines to a kv worker and collect the answers (blocking:
    run in a thread; the daemon's guest RAM is never touched here).

    @param port: the worker's loopback TCP port.
    @param lines: C{SET key value} / C{GET key} lines.
    @return: the answer lines.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        stream = connection.makefile("rwb")
        answers = []
        for line in lines:
            stream.write(line.encode() + b"\n")
            stream.flush()
            answers.append(stream.readline().decode().rstrip("\n"))
        return answers


def kvEntries(worker: str, seed: int) -> dict[str, str]:
    """
    The entries the demo stores in one kv worker.

    @param worker: the worker's name.
    @param seed: varies the values.
    @return: key -> value.
    """
    return {f"{worker}-key{i}": f"value-{seed}-{i}-{worker}" for i in range(KV_ENTRIES)}


async def kvExchange(guestInfo: dict[str, Any], seed: int, verb: str) -> dict[str, list[str]]:
    """
    Store the demo's entries in (C{SET}) or read them back from (C{GET})
    every kv worker of a guest.

    @param guestInfo: the guest's C{query-guest} answer (worker ports).
    @param seed: varies the values.
    @param verb: C{SET} or C{GET}.
    @return: worker name -> answers in L{kvEntries} order.
    """
    from twisted.internet.threads import deferToThread

    answers = {}
    for worker, info in guestInfo.get("info", {}).items():
        entries = kvEntries(worker, seed)
        lines = [f"SET {k} {v}" if verb == "SET" else f"GET {k}" for k, v in entries.items()]
        answers[worker] = await deferToThread(kvRequests, info["port"], lines)
    return answers


async def kvCheck(destination: Daemon, seed: int, stored: dict[str, list[str]]) -> dict[str, Any]:
    """
    Read back from the destination's kv workers what was stored on the
    source's before migration.

    @param destination: the destination daemon.
    @param seed: the values' seed.
    @param stored: the source's C{SET} answers.
    @return: C{keys} stored, C{matched} read back unchanged.
    """
    read = await kvExchange(await destination.client.queryGuest(), seed, "GET")
    keys = sum(answer == "OK" for answers in stored.values() for answer in answers)
    matched = sum(
        answer == value
        for worker, answers in read.items()
        for answer, value in zip(answers, kvEntries(worker, seed).values())
    )
    return {"keys": keys, "matched": matched}


def terminate(daemons: list[Daemon]) -> None:
    """
    Send SIGTERM to the daemons still running.

    @param daemons: the daemons.
    """
    for daemon in daemons:
        if daemon.protocol.status is None:
            daemon.process.signalProcess("TERM")


async def runDemo(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Start both daemons, migrate, report, stop both daemons.

    @param reactor: the reactor.
    @param args: the demo's arguments.
    @param out: where the report goes.
    @param err: where progress and errors go.
    @return: 0 if both sides completed and the guest verified its memory.
    """
    if getattr(args, "report", None):
        from twisted_postcopy.observe.plots import ReportError, requireMatplotlib

        try:
            requireMatplotlib()
        except ReportError as e:
            print(f"error: {e}", file=err)
            return 2
    if getattr(args, "hugepages", False) and args.ram % (2 << 20):
        print("error: --ram must be a multiple of 2M with --hugepages", file=err)
        return 2
    try:
        release = reserveDemoHugePages(args)
    except PostcopyError as e:
        print(f"error: {e}", file=err)
        return 1
    try:
        return await _runDemo(reactor, args, out, err)
    finally:
        release()


async def _runDemo(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    L{runDemo} once huge pages (if any) are reserved.

    @param reactor: the reactor.
    @param args: the demo's arguments.
    @param out: where the report goes.
    @param err: where progress and errors go.
    @return: the exit status.
    """
    workdir = Path(tempfile.mkdtemp(prefix="postcopy-demo-"))
    daemons: list[Daemon] = []
    progress = Progress(err, args.ram)
    # Ctrl-C stops the reactor without unwinding this coroutine.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", terminate, daemons)
    try:
        for role in ("destination", "source"):
            daemons.append(await startDaemon(reactor, role, workdir, daemonArguments(args, role)))
        result = await migrate(reactor, daemons[1], daemons[0], args, progress)
        if getattr(args, "report", None):
            from twisted_postcopy.observe.plots import saveDemoReport

            result["report"] = await saveDemoReport(daemons[1], daemons[0], args.report)
    except PostcopyError as e:
        progress.finish()
        print(f"error: {e}\n(daemon logs kept in {workdir})", file=err)
        return 1
    finally:
        reactor.removeSystemEventTrigger(trigger)
        for daemon in daemons:
            await daemon.stop(reactor)
    progress.finish()
    result.update({"guest-name": args.guest, "ram-bytes": args.ram, "uri": args.uri,
                   "hugepages": bool(getattr(args, "hugepages", False))})
    print(json.dumps(result, sort_keys=True) if args.json else formatReport(result), file=out)
    if result.get("report") and not args.json:
        print(f"timeline and plots written to {args.report}: "
              f"{', '.join(Path(p).name for p in result['report'])}", file=out)
    shutil.rmtree(workdir, ignore_errors=True)
    completed = all(result[side]["status"] == "completed" for side in ("source", "destination"))
    return 0 if completed and result["verified"] else 1


def register(subparsers: Any) -> None:
    """
    Add C{postcopy demo} to the C{postcopy} parser.

    @param subparsers: the C{add_subparsers} object.
    """
    parser = subparsers.add_parser(
        "demo", help="migrate a built-in guest between two local daemons (postcopy)",
        description="Start a source and a destination twistd postcopy daemon, migrate a "
        "built-in guest between them over loopback TCP (precopy, then postcopy), "
        "and report both sides' statistics and whether the guest's memory arrived intact.",
    )
    parser.add_argument("--guest", choices=[g for g in GUESTS if g != "none"], default="stress",
                        help="the built-in guest (default: stress)")
    parser.add_argument("--ram", type=parseSize, default=parseSize("256M"), metavar="SIZE",
                        help="guest RAM, e.g. 64M or 1G (default: 256M)")
    parser.add_argument("--postcopy-after", type=float, default=0.2, metavar="SECONDS",
                        help="precopy time before migrate-start-postcopy (default: 0.2)")
    parser.add_argument("--postcopy-preempt", action="store_true",
                        help="requested pages on a second connection (capability postcopy-preempt)")
    parser.add_argument("--seed", type=int, default=0, help="the guest's workload seed")
    parser.add_argument("--hugepages", action="store_true",
                        help="guest RAM on hugetlbfs (2 MiB pages) on both sides; free huge pages "
                        "are reserved through /proc/sys/vm/nr_hugepages if needed (and given back)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="give up after this long (default: 120)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: both sides' query-migrate and the check")
    parser.add_argument("--report", metavar="DIR",
                        help="write both daemons' timelines (timeline.json) and PNG plots "
                        "of throughput, request latency and blocktime to DIR (the 'report' extra)")
    parser.set_defaults(
        func=lambda args: runMain(lambda reactor: runDemo(reactor, args, sys.stdout, sys.stderr))
    )
