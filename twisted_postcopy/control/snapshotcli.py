# -*- test-case-name: tests.test_control_snapshotcli -*-
"""
The snapshot subcommands of C{postcopy} that act through a daemon's
control API (next to the standalone C{postcopy snapshot ...} commands,
which run their own reactor)::

    postcopy snapshot-capture --control unix:/run/snap.sock tcp:127.0.0.1:4444 /srv/vm1
    postcopy query-snapshot --control unix:/run/snap.sock
    postcopy snapshot-read --control unix:/run/snap.sock /srv/vm1 pc.ram 0x100000 4096
    postcopy snapshot-restore --control unix:/run/snap.sock /srv/vm1 --to tcp:10.0.0.2:4444

Directories are made absolute here: the daemon's working directory is not
the caller's.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from twisted_postcopy.control.client import ControlClient
from twisted_postcopy.control.runner import runHandler, showResult


def _path(text: str) -> str:
    """
    @param text: a directory as typed.
    @return: it made absolute (empty stays empty: the live capture).
    """
    return os.path.abspath(text) if text else ""


def _show(value: dict[str, Any], args: argparse.Namespace, out: TextIO) -> int:
    """
    Print a result as the query commands do.

    @param value: the result.
    @param args: the arguments (C{json}).
    @param out: the output.
    @return: 0.
    """
    return showResult(value, args, out)


def _tlsArguments(args: argparse.Namespace, other: str) -> dict[str, str]:
    """
    @param args: the arguments.
    @param other: the second TLS option of the command.
    @return: the TLS parameters given (docs/tls.md).
    """
    names = ("tls_creds", other)
    return {name.replace("_", "-"): getattr(args, name) for name in names if getattr(args, name, None)}


async def snapshotCapture(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{snapshot-capture}: print C{listening on URI}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: 0.
    """
    uri = await client.snapshotCapture(args.uri, _path(args.dir), not args.no_postcopy,
                                       args.machine, getattr(args, "qmp", None),
                                       _tlsArguments(args, "tls_authz"))
    print(f"listening on {uri}", file=out)
    return 0


def parseParameters(specs: list[str]) -> dict[str, int]:
    """
    @param specs: C{--parameter} values, C{NAME=VALUE} with an integer
        value.
    @return: name -> value.
    @raise SystemExit: a malformed one.
    """
    parameters = {}
    for spec in specs:
        name, equals, value = spec.partition("=")
        if not name or not equals or not value.isdigit():
            raise SystemExit(f"--parameter {spec!r}: expected NAME=INTEGER")
        parameters[name] = int(value)
    return parameters


async def snapshotRestore(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{snapshot-restore}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output (unused).
    @return: 0 once every connection started.
    """
    await client.snapshotRestore(_path(args.dir), args.to, args.postcopy or args.postcopy_preempt,
                                 args.max_bandwidth, not args.no_verify, getattr(args, "qmp", None),
                                 _tlsArguments(args, "tls_hostname"), args.postcopy_preempt,
                                 parseParameters(args.parameter))
    return 0


async def snapshotVerify(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{snapshot-verify}: print C{DIR: OK}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: 0 when intact (a C{SnapshotError} otherwise).
    """
    await client.snapshotVerify(_path(args.dir))
    print(f"{args.dir}: OK", file=out)
    return 0


async def snapshotInfo(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{snapshot-info}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: 0.
    """
    info = await client.snapshotInfo(_path(args.dir))
    if not args.json:
        info = dict(info, blocks=", ".join(f"{b['idstr']} ({b['length']} bytes)"
                                           for b in info["blocks"]))
    return _show(info, args, out)


async def snapshotRead(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{snapshot-read}: write the bytes to the output (its binary buffer).

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: 0.
    """
    data = await client.snapshotRead(_path(args.dir), args.block, int(args.offset, 0),
                                      int(args.length, 0))
    sink = getattr(out, "buffer", out)
    sink.write(data)
    sink.flush()
    return 0


async def querySnapshot(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """
    C{query-snapshot}.

    @param client: the connection.
    @param args: the arguments.
    @param out: the output.
    @return: 0.
    """
    info = await client.querySnapshot()
    if not args.json:
        info = {"capture": info["capture"] or {"status": "none"},
                **{f"restore {i}": job for i, job in enumerate(info["restores"])}}
        for name in list(info):
            info[name] = {k: v for k, v in info[name].items() if k not in ("migration", "clones")}
    return _show(info, args, out)


_JSON = (("--json",), {"action": "store_true", "help": "print JSON"})

#: (name, help, handler, extra arguments), as C{control.cli._COMMANDS}.
SNAPSHOT_COMMANDS: list[tuple[str, str, Any, list[tuple[tuple[str, ...], dict]]]] = [
    ("snapshot-capture", "make the daemon listen on URI for one QEMU migration, stored in DIR",
     snapshotCapture,
     [(("uri",), {}), (("dir",), {}),
      (("--no-postcopy",), {"action": "store_true", "help": "refuse postcopy"}),
      (("--machine",), {"default": None, "help": "machine type recorded"}),
      (("--qmp",), {"default": None, "metavar": "PATH",
                    "help": "a QMP socket of the QEMU source: resume it after a cut"}),
      (("--tls-creds",), {"metavar": "ID", "help": "accept QEMU over TLS with these server "
                                                  "credentials (object-add; docs/tls.md)"}),
      (("--tls-authz",), {"metavar": "ID", "help": "only the client this authz-simple allows"})]),
    ("snapshot-restore", "make the daemon migrate snapshot DIR to QEMU destination(s)",
     snapshotRestore,
     [(("dir",), {}), (("--to",), {"action": "append", "required": True, "metavar": "URI"}),
      (("--postcopy",), {"action": "store_true", "help": "run before RAM arrives"}),
      (("--postcopy-preempt",), {"action": "store_true",
                                 "help": "postcopy with requested pages on a preempt channel"}),
      (("--parameter",), {"action": "append", "default": [], "metavar": "NAME=VALUE",
                          "help": "a migration parameter for every destination, e.g. "
                                  "x-working-set-pages=65536 (docs/prefetch.md; repeatable)"}),
      (("--no-verify",), {"action": "store_true", "help": "skip the sha256 check"}),
      (("--max-bandwidth",), {"type": int, "default": 0, "metavar": "BYTES",
                              "help": "bytes/s per destination, 0 for unlimited"}),
      (("--qmp",), {"action": "append", "default": None, "metavar": "PATH",
                    "help": "per --to, a QMP socket of that QEMU ('' for none): recover it after a cut"}),
      (("--tls-creds",), {"metavar": "ID", "help": "migrate over TLS with these client "
                                                  "credentials (object-add; docs/tls.md)"}),
      (("--tls-hostname",), {"metavar": "NAME",
                             "help": "the name the destinations' certificates carry"})]),
    ("snapshot-verify", "make the daemon check sizes and sha256 of DIR", snapshotVerify,
     [(("dir",), {})]),
    ("snapshot-info", "describe snapshot DIR", snapshotInfo, [(("dir",), {}), _JSON]),
    ("snapshot-read", "write RAM bytes of DIR (or of the live capture: DIR '') to stdout",
     snapshotRead, [(("dir",), {}), (("block",), {}), (("offset",), {}), (("length",), {})]),
    ("query-snapshot", "show the daemon's capture and restores", querySnapshot, [_JSON]),
]


def readThroughDaemon(args: argparse.Namespace) -> int:
    """
    C{postcopy snapshot read --control ENDPOINT ...}: the standalone read,
    done by the daemon (so a read of its capture in progress is a live
    read).

    @param args: C{control}, C{dir}, C{block}, C{offset}, C{length}.
    @return: the exit status.
    """
    from twisted_postcopy.control.client import runMain

    return runMain(lambda reactor: runHandler(reactor, snapshotRead, args, sys.stdout, sys.stderr))
