# -*- test-case-name: tests.test_control_cli -*-
"""
Running one control subcommand of C{postcopy}: connect to the daemon's
control endpoint, run the subcommand's body, report errors with QEMU's
text; and printing query results.  Shared by L{twisted_postcopy.control.cli}
and L{twisted_postcopy.control.snapshotcli}.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Awaitable, Callable, TextIO

from twisted.internet.error import ConnectError

from twisted_postcopy.control.client import ControlClient, connectControl
from twisted_postcopy.errors import PostcopyError

#: The type of a subcommand body: (client, arguments, output) -> exit status.
Handler = Callable[[ControlClient, argparse.Namespace, TextIO], Awaitable[int]]


def formatInfo(info: dict[str, Any], prefix: str = "") -> list[str]:
    """
    Render a QMP object as C{name: value} lines, nested objects prefixed
    with their name (as HMP's C{info migrate} does with C{ram}).

    @param info: the object.
    @param prefix: the prefix of nested names.
    @return: the lines.
    """
    lines = []
    for name, value in info.items():
        if isinstance(value, dict):
            lines.extend(formatInfo(value, f"{prefix}{name} "))
        else:
            lines.append(f"{prefix}{name}: {value}")
    return lines


def showResult(value: dict[str, Any], args: argparse.Namespace, out: TextIO) -> int:
    """
    Print a query result, as JSON with C{--json}.

    @param value: the result.
    @param args: the arguments.
    @param out: the output.
    @return: 0.
    """
    if args.json:
        print(json.dumps(value, sort_keys=True), file=out)
    else:
        for line in formatInfo(value):
            print(line, file=out)
    return 0


async def runHandler(reactor: Any, handler: Handler, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Connect, run one handler, report errors as QEMU's text.

    @param reactor: the reactor.
    @param handler: the subcommand body.
    @param args: the arguments.
    @param out: standard output.
    @param err: standard error.
    @return: the exit status.
    """
    if not args.control:
        print("error: no control endpoint (--control or POSTCOPY_CONTROL)", file=err)
        return 2
    try:
        client = await connectControl(reactor, args.control)
    except ConnectError as e:
        print(f"error: cannot connect to {args.control}: {e}", file=err)
        return 1
    try:
        return await handler(client, args, out)
    except PostcopyError as e:
        print(f"error: {e}", file=err)
        return 1
    finally:
        client.transport.loseConnection()
