# -*- test-case-name: tests.test_observe_watch -*-
"""
C{postcopy watch}: live progress of any daemon's migration, over its AMP
control endpoint (C{--control}) or a QMP socket (C{--qmp}: our daemon's QMP
endpoint, or a real QEMU's), ending with the report C{postcopy demo}
prints for that side (L{twisted_postcopy.control.progress}).

On a terminal the progress is drawn with C{rich} (the C{watch} extra): a
bar, throughput, page requests and stall time (the source's downtime, the
destination's postcopy blocktime).  Otherwise, or with C{--plain}, it is
written as plain lines: one per status change and one every few polls.

The loop (L{watchMigration}) is framework-neutral: the AMP client runs it
on the Twisted reactor, the QMP client (C{qemu.qmp}, asyncio) under
asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Awaitable, Callable, TextIO

from twisted_postcopy.control.progress import (
    Progress, _mib, destinationReportLines, fractionDone, sourceReportLines)
from twisted_postcopy.observe.timeline import FINAL


class WatchError(Exception):
    """
    C{postcopy watch} cannot run as asked (a missing extra, a bad endpoint).
    """


def stallText(info: dict[str, Any]) -> str:
    """
    The stall time of a side: the source's downtime (or expected downtime),
    the destination's postcopy blocktime.

    @param info: a C{query-migrate} answer.
    @return: e.g. C{downtime 12 ms}, or C{""} when unknown.
    """
    if "downtime" in info:
        return f"downtime {info['downtime']} ms"
    if "postcopy-blocktime" in info:
        return f"blocktime {info['postcopy-blocktime']} ms"
    if "expected-downtime" in info:
        return f"expected downtime {info['expected-downtime']} ms"
    return ""


def reportLines(info: dict[str, Any], statuses: list[str]) -> list[str]:
    """
    The final report of the watched side, as C{postcopy demo} prints it.

    @param info: its last C{query-migrate} answer.
    @param statuses: the statuses it went through.
    @return: the lines.
    """
    if "ram" in info:
        return sourceReportLines(info, statuses)
    return destinationReportLines(info) + [f"             statuses: {' -> '.join(statuses or ['-'])}"]


class PlainDisplay:
    """
    Plain lines (L{Progress} without a terminal), named after the side.

    @ivar progress: the line writer.
    """

    def __init__(self, out: TextIO, name: str = "migration") -> None:
        """
        @param out: where lines go.
        @param name: the first word of each line.
        """
        self.progress = Progress(out, 0, tty=False)
        self.name = name

    def update(self, info: dict[str, Any]) -> None:
        """
        Show one C{query-migrate} answer.

        @param info: the answer.
        """
        name = "source" if "ram" in info else "destination" if info else self.name
        self.progress.update(name, info)

    def finish(self) -> None:
        """
        Nothing to close.
        """
        self.progress.finish()

    def note(self, text: str) -> None:
        """
        Write a line of its own.

        @param text: the line.
        """
        self.progress.stream.write(text + "\n")
        self.progress.stream.flush()


class RichDisplay:
    """
    A C{rich} progress bar with throughput, requests and stall time.
    """

    def __init__(self, out: TextIO) -> None:
        """
        @param out: the terminal.
        @raise WatchError: C{rich} is missing (naming the extra).
        """
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TaskProgressColumn, TextColumn
        except ImportError:
            raise WatchError("postcopy watch draws its terminal display with rich: install the "
                             "'watch' extra (python3 -m pip install 'twisted-postcopy[watch]') "
                             "or pass --plain") from None
        self.progress = RichProgress(
            TextColumn("[bold]{task.fields[side]}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[status]}"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[requests]} requests"), TextColumn("{task.fields[stall]}"),
            console=Console(file=out), transient=False)
        self.task = self.progress.add_task("migration", total=1.0, side="-", status="-",
                                           rate="", requests=0, stall="")
        self.progress.start()

    def update(self, info: dict[str, Any]) -> None:
        """
        Redraw from one C{query-migrate} answer.

        @param info: the answer.
        """
        ram = info.get("ram") or {}
        # A destination's query-migrate has no RAM figures: the bar pulses
        # until the end.
        known = bool(ram) or info.get("status") in FINAL
        self.progress.update(
            self.task, total=1.0 if known else None,
            completed=fractionDone(info, ram.get("total") or 0) if known else 0,
            side="source" if ram else "destination" if info else "migration",
            status=info.get("status", "none"),
            rate=f"{ram.get('mbps', 0):.0f} Mbps, sent {_mib(ram.get('transferred'))}" if ram else "",
            requests=ram.get("postcopy-requests", 0) if ram else "-", stall=stallText(info))

    def finish(self) -> None:
        """
        Leave the final bar on the terminal.
        """
        self.progress.stop()

    def note(self, text: str) -> None:
        """
        Print a line above the bar.

        @param text: the line.
        """
        self.progress.console.print(text)


async def watchMigration(client: Any, sleep: Callable[[float], Awaitable[Any]], display: Any,
                         interval: float, out: TextIO, endpoint: str) -> int:
    """
    Poll C{query-migrate} until the migration ends, then print the report.

    @param client: has C{async queryMigrate()} and C{async
        subscribe(onStatus)} (C{onStatus} called with each C{MIGRATION}
        event's status).
    @param sleep: an awaitable sleep of the running framework.
    @param display: a L{PlainDisplay} or L{RichDisplay}.
    @param interval: seconds between polls.
    @param out: where the report goes.
    @param endpoint: the watched endpoint, for the report's first line.
    @return: 0 if the migration completed, 1 otherwise.
    """
    statuses: list[str] = []

    def onStatus(status: str) -> None:
        """
        Record a status the migration went through.

        @param status: QEMU's status name.
        """
        if status != "none" and (not statuses or statuses[-1] != status):
            statuses.append(status)

    await client.subscribe(onStatus)
    waiting = False
    try:
        while True:
            info = await client.queryMigrate()
            status = info.get("status")
            if status is not None:
                onStatus(status)
            if status in (None, "none") and not waiting:
                display.note(f"postcopy watch: waiting for a migration on {endpoint}")
                waiting = True
            display.update(info)
            if status in FINAL:
                break
            await sleep(interval)
    finally:
        display.finish()
    print(f"postcopy watch: {endpoint}", file=out)
    for line in reportLines(info, statuses):
        print(line, file=out)
    out.flush()
    return 0 if info.get("status") == "completed" else 1


class AMPWatchClient:
    """
    The watch's view of a daemon's AMP control connection.

    @ivar control: the L{twisted_postcopy.control.client.ControlClient}.
    """

    def __init__(self, control: Any) -> None:
        """
        @param control: a connected control client.
        """
        self.control = control

    async def subscribe(self, onStatus: Callable[[str], None]) -> None:
        """
        Pass each C{MIGRATION} event's status to C{onStatus}.

        @param onStatus: the callback.
        """
        await self.control.subscribe(
            lambda event, data: onStatus(data["status"]) if event == "MIGRATION" else None)

    async def queryMigrate(self) -> dict[str, Any]:
        """
        @return: C{query-migrate}.
        """
        return await self.control.queryMigrate()


class QMPWatchClient:
    """
    The watch's view of a QMP socket (C{qemu.qmp}'s asyncio client).

    @ivar qmp: the connected C{qemu.qmp.QMPClient}.
    """

    def __init__(self, qmp: Any) -> None:
        """
        @param qmp: a connected client.
        """
        self.qmp = qmp
        self._reader: asyncio.Task | None = None

    async def subscribe(self, onStatus: Callable[[str], None]) -> None:
        """
        Pass each C{MIGRATION} event's status to C{onStatus} (QEMU sends
        them when the C{events} capability is on).

        @param onStatus: the callback.
        """
        from qemu.qmp import EventListener

        listener = EventListener(("MIGRATION",))
        self.qmp.register_listener(listener)

        async def read() -> None:
            async for event in listener:
                onStatus(event["data"]["status"])

        self._reader = asyncio.get_running_loop().create_task(read())

    async def queryMigrate(self) -> dict[str, Any]:
        """
        @return: C{query-migrate}.
        """
        return dict(await self.qmp.execute("query-migrate"))

    async def close(self) -> None:
        """
        Stop reading events and disconnect.
        """
        if self._reader is not None:
            self._reader.cancel()
        await self.qmp.disconnect()


def qmpAddress(endpoint: str) -> Any:
    """
    Parse a C{--qmp} endpoint.

    @param endpoint: C{unix:PATH}, C{tcp:HOST:PORT} or a bare path.
    @return: a path, or a (host, port) pair, as C{qemu.qmp} connects to.
    @raise WatchError: anything else.
    """
    if endpoint.startswith("unix:"):
        return endpoint[len("unix:"):]
    if endpoint.startswith("/"):
        return endpoint
    if endpoint.startswith("tcp:"):
        host, _, port = endpoint[len("tcp:"):].rpartition(":")
        if host and port.isdigit():
            return (host, int(port))
    raise WatchError(f"--qmp {endpoint!r}: expected unix:PATH or tcp:HOST:PORT")


def makeDisplay(args: argparse.Namespace, out: TextIO) -> Any:
    """
    @param args: the arguments (C{plain}).
    @param out: standard output.
    @return: a rich display on a terminal, else plain lines.
    @raise WatchError: a terminal but no C{rich}.
    """
    if not args.plain and getattr(out, "isatty", lambda: False)():
        return RichDisplay(out)
    return PlainDisplay(out)


async def watchQMP(args: argparse.Namespace, out: TextIO) -> int:
    """
    C{postcopy watch --qmp}, under asyncio.

    @param args: the arguments.
    @param out: standard output.
    @return: the exit status.
    """
    import logging

    from qemu.qmp import ConnectError, QMPClient

    # The error is reported once, below, not also by the library's logger.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    qmp = QMPClient("postcopy-watch")
    try:
        await qmp.connect(qmpAddress(args.qmp))
    except ConnectError as e:
        raise OSError(str(e)) from None
    client = QMPWatchClient(qmp)
    try:
        return await watchMigration(client, asyncio.sleep, makeDisplay(args, out), args.interval,
                                    out, args.qmp)
    finally:
        await client.close()


async def watchControl(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{postcopy watch --control}, on the Twisted reactor.

    @param reactor: the reactor.
    @param args: the arguments.
    @param out: standard output.
    @return: the exit status.
    """
    from twisted.internet.task import deferLater

    from twisted_postcopy.control.client import connectControl

    control = await connectControl(reactor, args.control)
    try:
        return await watchMigration(AMPWatchClient(control), lambda s: deferLater(reactor, s, lambda: None),
                                    makeDisplay(args, out), args.interval, out, args.control)
    finally:
        control.transport.loseConnection()


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """
    Run C{postcopy watch}.

    @param args: the parsed arguments.
    @param out: standard output (default: C{sys.stdout}).
    @param err: standard error (default: C{sys.stderr}).
    @return: the exit status.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        if args.qmp:
            try:
                import qemu.qmp  # noqa: F401
            except ImportError:
                raise WatchError("--qmp needs the qemu.qmp package: install the 'watch' extra "
                                 "(python3 -m pip install 'twisted-postcopy[watch]')") from None
            return asyncio.run(watchQMP(args, out))
        if not args.control:
            print("error: no endpoint (--control, --qmp or POSTCOPY_CONTROL)", file=err)
            return 2
        from twisted_postcopy.control.client import runMain

        return runMain(lambda reactor: watchControl(reactor, args, out))
    except WatchError as e:
        print(f"error: {e}", file=err)
        return 2
    except (OSError, ConnectionError) as e:
        print(f"error: cannot watch {args.qmp or args.control}: {e}", file=err)
        return 1


def register(subparsers: Any) -> None:
    """
    Add C{postcopy watch} to the C{postcopy} parser.

    @param subparsers: the C{add_subparsers} object.
    """
    parser = subparsers.add_parser(
        "watch", help="show a daemon's migration progress live, then its report",
        description="Poll query-migrate on a daemon (AMP control endpoint) or a QMP socket "
        "(ours or a real QEMU's) until the migration ends, showing progress (rich on a "
        "terminal, plain lines otherwise), then print the report postcopy demo prints.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--control", default=os.environ.get("POSTCOPY_CONTROL"), metavar="ENDPOINT",
                       help="the daemon's control endpoint (default: $POSTCOPY_CONTROL)")
    where.add_argument("--qmp", metavar="ENDPOINT",
                       help="a QMP socket: unix:PATH or tcp:HOST:PORT")
    parser.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                        help="seconds between polls (default: 0.5)")
    parser.add_argument("--plain", action="store_true",
                        help="plain lines even on a terminal")
    parser.set_defaults(func=run)
