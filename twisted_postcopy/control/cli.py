# -*- test-case-name: tests.test_control_cli -*-
"""
The control subcommands of C{postcopy}: QMP's migration commands, sent to
a daemon's control endpoint over AMP.

Every subcommand takes C{--control ENDPOINT} (default: the
C{POSTCOPY_CONTROL} environment variable), e.g.::

    postcopy migrate-set-capabilities --control unix:/run/src.sock postcopy-ram=on
    postcopy migrate --control unix:/run/src.sock tcp:127.0.0.1:4444
    postcopy query-migrate --control unix:/run/src.sock --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, TextIO

from twisted.internet.defer import Deferred

from twisted_postcopy.control.client import ControlClient, runMain
from twisted_postcopy.control.runner import Handler, formatInfo, runHandler as _run, showResult as _show

__all__ = ["Handler", "formatInfo", "parseAssignments", "parseParameter", "parseState", "register"]

_BOOLEANS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def parseAssignments(pairs: list[str], value: Callable[[str], Any]) -> dict[str, Any]:
    """
    Parse C{NAME=VALUE} words.

    @param pairs: the words.
    @param value: converts each value text.
    @return: names to converted values.
    @raise argparse.ArgumentTypeError: a word has no C{=} or a bad value.
    """
    result = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {pair!r}")
        result[name] = value(text)
    return result


def parseState(text: str) -> bool:
    """
    Parse a capability state the way HMP does (C{on}/C{off}).

    @param text: C{on}, C{off}, C{true}, C{false}, C{yes} or C{no}.
    @return: the state.
    @raise argparse.ArgumentTypeError: anything else.
    """
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}") from None


def parseParameter(text: str) -> int | str:
    """
    Parse a parameter value: an integer if it is one, else the text.

    @param text: the value text.
    @return: the value.
    """
    try:
        return int(text, 0)
    except ValueError:
        return text


async def queryMigrate(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{query-migrate}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status.
    """
    return _show(await client.queryMigrate(), args, out)


async def queryCapabilities(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{query-migrate-capabilities}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status.
    """
    caps = await client.queryCapabilities()
    if not args.json:
        caps = {name: "on" if state else "off" for name, state in caps.items()}
    return _show(caps, args, out)


async def queryParameters(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{query-migrate-parameters}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status.
    """
    return _show(await client.queryParameters(), args, out)


async def queryGuest(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{query-guest}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status.
    """
    return _show(await client.queryGuest(), args, out)


async def queryMigrateTimeline(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{x-query-migrate-timeline}: always JSON (C{postcopy report} reads it).

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status.
    """
    print(json.dumps(await client.queryMigrateTimeline(), sort_keys=True), file=out)
    return 0


async def events(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    Print events as JSON lines as they come; with C{--until}, stop after a
    MIGRATION event with one of the given statuses.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status (0 when an C{--until} status was reached).
    """
    done: Deferred = Deferred()
    until = set(args.until or ())

    def observe(event: str, data: dict) -> None:
        """
        Print an event; stop at an C{--until} status.

        @param event: the event name.
        @param data: its data.
        """
        print(json.dumps({"event": event, "data": data}, sort_keys=True), file=out, flush=True)
        if event == "MIGRATION" and data.get("status") in until and not done.called:
            done.callback(0)

    def lost(_: object) -> None:
        """
        The daemon went away: exit 1 unless already done.

        @param _: ignored.
        """
        if not done.called:
            done.callback(1)

    client.whenDisconnected().addCallback(lost)
    await client.subscribe(observe)
    return await done


def _simple(method: str, *argNames: str) -> Handler:
    """
    Make a handler for a command that answers nothing.

    @param method: the L{ControlClient} method name.
    @param argNames: the argument attributes passed to it, in order.
    @return: the handler.
    """

    async def handler(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
        """
        Call the client method with the arguments.

        @param client: the connection.
        @param args: the arguments.
        @param out: the output (unused).
        @return: 0.
        """
        await getattr(client, method)(*(getattr(args, name) for name in argNames))
        return 0

    return handler



def runHandler(reactor: Any, handler: Handler, args: argparse.Namespace, out: TextIO, err: TextIO) -> Deferred:
    """
    Run a subcommand on a running reactor.

    @param reactor: the reactor.
    @param handler: the subcommand body.
    @param args: the arguments.
    @param out: standard output.
    @param err: standard error.
    @return: a Deferred firing with the exit status.
    """
    return Deferred.fromCoroutine(_run(reactor, handler, args, out, err))


def _main(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """
    Make the C{func} of a subcommand: run the reactor around the handler.

    @param handler: the subcommand body.
    @return: a function of the parsed arguments returning the exit status.
    """

    def func(args: argparse.Namespace) -> int:
        """
        Run the subcommand.

        @param args: the parsed arguments.
        @return: the exit status.
        """
        return runMain(lambda reactor: _run(reactor, handler, args, sys.stdout, sys.stderr))

    return func


#: (QMP name, help, handler, extra arguments as (names, options)).
_COMMANDS: list[tuple[str, str, Handler, list[tuple[tuple[str, ...], dict]]]] = [
    ("query-migrate", "show migration status and statistics", queryMigrate,
     [(("--json",), {"action": "store_true", "help": "print QMP's JSON object"})]),
    ("query-migrate-capabilities", "show migration capabilities", queryCapabilities,
     [(("--json",), {"action": "store_true", "help": "print JSON"})]),
    ("query-migrate-parameters", "show migration parameters", queryParameters,
     [(("--json",), {"action": "store_true", "help": "print JSON"})]),
    ("query-guest", "show the built-in guest's state (and memory check)", queryGuest,
     [(("--json",), {"action": "store_true", "help": "print JSON"})]),
    ("migrate-set-capabilities", "set capabilities, e.g. postcopy-ram=on",
     _simple("setCapabilities", "capabilities"),
     [(("capabilities",), {"nargs": "+", "metavar": "CAPABILITY=on|off",
                           "type": lambda s: parseAssignments([s], parseState)})]),
    ("migrate-set-parameters", "set parameters, e.g. max-bandwidth=134217728",
     _simple("setParameters", "parameters"),
     [(("parameters",), {"nargs": "+", "metavar": "PARAMETER=VALUE",
                         "type": lambda s: parseAssignments(
                             [s], str if s.startswith("tls-") else parseParameter)})]),
    ("migrate", "start migrating to URI (tcp:HOST:PORT or unix:PATH)",
     _simple("migrate", "uri", "resume"),
     [(("uri",), {}), (("--resume",), {"action": "store_true",
                                        "help": "resume a paused postcopy migration"})]),
    ("migrate-incoming", "listen for an incoming migration on URI",
     _simple("migrateIncoming", "uri"), [(("uri",), {})]),
    ("migrate-recover", "listen on URI for a paused migration's source",
     _simple("migrateRecover", "uri"), [(("uri",), {})]),
    ("migrate-pause", "pause a postcopy migration", _simple("migratePause"), []),
    ("migrate-start-postcopy", "switch the migration to postcopy", _simple("startPostcopy"), []),
    ("migrate-cancel", "cancel the outgoing migration", _simple("cancel"), []),
    ("events", "print events (JSON lines) as they come", events,
     [(("--until",), {"action": "append", "metavar": "STATUS",
                      "help": "exit 0 after a MIGRATION event with this status"})]),
    ("x-query-migrate-timeline", "print the migration's timeline as JSON (for postcopy report)",
     queryMigrateTimeline, []),
]


async def objectAdd(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{object-add}, given in QEMU's C{-object} syntax
    (C{tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server}).

    @param client: the connection.
    @param args: the arguments.
    @param out: the output (unused).
    @return: the exit status.
    """
    from twisted_postcopy.tlscreds import parseObjectOption

    qomType, id, properties = parseObjectOption(args.object)
    await client.objectAdd(qomType, id, properties)
    return 0


async def queryObjects(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{query-objects}, one object per line (or a JSON list with C{--json}).

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: the exit status.
    """
    objects = await client.queryObjects()
    if args.json:
        print(json.dumps(objects, sort_keys=True), file=out)
    for each in [] if args.json else objects:
        rest = ",".join(f"{k}={('on' if v else 'off') if isinstance(v, bool) else v}"
                        for k, v in each.items() if k not in ("qom-type", "id"))
        print(f"{each['qom-type']},id={each['id']}" + (f",{rest}" if rest else ""), file=out)
    return 0


_COMMANDS.extend([
    ("object-add", "create TLS credentials or an authz object, QEMU's -object syntax: "
     "tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off] or "
     "authz-simple,id=ID,identity=DN", objectAdd,
     [(("object",), {"metavar": "TYPE,id=ID,PROP=VALUE..."})]),
    ("object-del", "remove an object made by object-add", _simple("objectDel", "id"),
     [(("id",), {})]),
    ("query-objects", "list the objects made by object-add", queryObjects,
     [(("--json",), {"action": "store_true", "help": "print JSON"})]),
])

def _merge(args: argparse.Namespace) -> argparse.Namespace:
    """
    Merge the one-pair dictionaries of C{NAME=VALUE} arguments.

    @param args: the parsed arguments.
    @return: C{args}, with C{capabilities}/C{parameters} as one mapping.
    """
    for name in ("capabilities", "parameters"):
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, {k: v for each in getattr(args, name) for k, v in each.items()})
    return args


def register(subparsers: Any) -> None:
    """
    Add the control subcommands to the C{postcopy} parser.

    @param subparsers: the C{add_subparsers} object.
    """
    from twisted_postcopy.control.snapshotcli import SNAPSHOT_COMMANDS

    for name, helpText, handler, extra in _COMMANDS + SNAPSHOT_COMMANDS:
        parser = subparsers.add_parser(name, help=helpText, description=helpText)
        parser.add_argument(
            "--control",
            default=os.environ.get("POSTCOPY_CONTROL"),
            metavar="ENDPOINT",
            help="the daemon's control endpoint, e.g. unix:/run/postcopy.sock "
            "(default: $POSTCOPY_CONTROL)",
        )
        for names, options in extra:
            parser.add_argument(*names, **options)
        run = _main(handler)
        parser.set_defaults(func=lambda args, run=run: run(_merge(args)))
