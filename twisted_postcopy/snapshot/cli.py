# -*- test-case-name: tests.test_snapshot_cli -*-
"""
C{postcopy snapshot capture|restore|import|verify|info|read}.

C{capture} and C{restore} run the reactor until the migration(s) end; the
others only read the snapshot directory.  Errors print one line to stderr
and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from twisted_postcopy.errors import PostcopyError


def register(subparsers: Any) -> None:
    """
    Add C{snapshot} and its subcommands.

    @param subparsers: the C{postcopy} subparsers.
    """
    parser = subparsers.add_parser("snapshot", help="capture, restore and inspect VM snapshots")
    commands = parser.add_subparsers(dest="snapshotCommand", metavar="SUBCOMMAND")
    commands.required = True
    capture = commands.add_parser("capture", help="receive one incoming QEMU migration into DIR")
    capture.add_argument("--listen", required=True, metavar="URI", help="tcp:HOST:PORT or unix:PATH")
    capture.add_argument("--no-postcopy", action="store_true", help="refuse postcopy")
    capture.add_argument("--machine", default="pc-i440fx-7.2", help="machine type recorded")
    capture.add_argument("--insecure-migration", action="store_true",
                         help="allow a non-loopback tcp: URI without TLS client authentication")
    capture.add_argument("dir")
    _tlsOptions(capture, "--tls-authz", "ID", "only the client this authz-simple object allows")
    capture.set_defaults(func=_guard(_capture))
    restore = commands.add_parser("restore", help="feed DIR to QEMU destination(s)")
    restore.add_argument("dir")
    restore.add_argument("--to", action="append", required=True, metavar="URI")
    restore.add_argument("--postcopy", action="store_true", help="run before RAM arrives")
    restore.add_argument("--postcopy-preempt", action="store_true",
                         help="with --postcopy: requested pages on a second connection (the "
                              "destinations need the postcopy-preempt capability)")
    restore.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    _tlsOptions(restore, "--tls-hostname", "NAME", "the name the destinations' certificates carry")
    restore.add_argument("--max-bandwidth", type=int, default=0, metavar="BYTES",
                         help="bytes/s per destination, 0 for unlimited")
    restore.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                         help="a migration parameter for every destination, e.g. "
                              "x-working-set-pages=65536 (docs/prefetch.md; repeatable)")
    restore.set_defaults(func=_guard(_restore))
    importer = commands.add_parser("import", help="store a QEMU precopy stream file as DIR")
    importer.add_argument("stream")
    importer.add_argument("dir")
    importer.set_defaults(func=_guard(_import))
    verify = commands.add_parser("verify", help="check sizes and sha256 of DIR")
    verify.add_argument("dir")
    verify.set_defaults(func=_guard(_verify))
    info = commands.add_parser("info", help="describe DIR")
    info.add_argument("--json", action="store_true")
    info.add_argument("dir")
    info.set_defaults(func=_guard(_info))
    read = commands.add_parser("read", help="write stored RAM bytes to stdout")
    read.add_argument("--control", metavar="ENDPOINT",
                      help="read through this daemon (a live read when DIR is its capture)")
    for name in ("dir", "block", "offset", "length"):
        read.add_argument(name)
    read.set_defaults(func=_guard(_read))


def _guard(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """
    @param command: a subcommand.
    @return: it, printing L{PostcopyError}s as one line and returning 1.
    """

    def guarded(args: argparse.Namespace) -> int:
        """
        @param args: the parsed arguments.
        @return: the exit status.
        """
        try:
            return command(args)
        except PostcopyError as e:
            print(f"postcopy snapshot: {e}", file=sys.stderr)
            return 1

    return guarded


def _verify(args: argparse.Namespace) -> int:
    """
    @param args: the parsed arguments.
    @return: 0 when the snapshot is intact.
    """
    from twisted_postcopy.snapshot.store import openSnapshot

    openSnapshot(args.dir).verify()
    print(f"{args.dir}: OK")
    return 0


def _info(args: argparse.Namespace) -> int:
    """
    @param args: the parsed arguments.
    @return: 0.
    """
    from twisted_postcopy.snapshot.store import openSnapshot

    info = openSnapshot(args.dir).info()
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"{info['path']}: machine {info['machine']}, device state {info['device-bytes']} bytes "
          f"({info['device-form']})")
    for block in info["blocks"]:
        print(f"  {block['idstr']:<32} {block['length']:>12} bytes  {block['data-bytes']:>12} stored")
    return 0


def _read(args: argparse.Namespace) -> int:
    """
    Read stored RAM; with C{--control}, ask that daemon instead (a page
    of its capture in progress not yet received is then requested from
    the QEMU source first).

    @param args: the parsed arguments.
    @return: the exit status.
    """
    from twisted_postcopy.snapshot.store import openSnapshot

    if args.control:
        from twisted_postcopy.control.snapshotcli import readThroughDaemon

        return readThroughDaemon(args)
    data = openSnapshot(args.dir).read(args.block, int(args.offset, 0), int(args.length, 0))
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _import(args: argparse.Namespace) -> int:
    """
    @param args: the parsed arguments.
    @return: 0.
    """
    from twisted_postcopy.snapshot.streamfile import importStreamFile

    importStreamFile(args.stream, args.dir)
    return 0


def runUntil(start: Callable[[Any], Any]) -> int:
    """
    Run the reactor until the Deferred C{start(reactor)} returns fires.

    @param start: called with the reactor once it runs.
    @return: 0 on success, 1 on failure (printed).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred

    outcome: list[int] = []

    def begin() -> None:
        """
        Start the work; stop the reactor when it ends.
        """
        d = maybeDeferred(start, reactor)
        d.addCallbacks(lambda _: outcome.append(0), lambda f: (
            print(f"postcopy snapshot: {f.getErrorMessage()}", file=sys.stderr), outcome.append(1)))
        d.addBoth(lambda _: _drainThenStop(reactor))

    reactor.callWhenRunning(begin)
    reactor.run()
    return outcome[0] if outcome else 1


def _tlsOptions(parser: argparse.ArgumentParser, other: str, metavar: str, help: str) -> None:
    """
    Add the TLS options (docs/tls.md) of a standalone snapshot command.

    @param parser: the subcommand's parser.
    @param other: its second TLS parameter (C{--tls-authz} or
        C{--tls-hostname}).
    @param metavar: that option's metavar.
    @param help: that option's help.
    """
    parser.add_argument("--object", action="append", default=[], metavar="SPEC",
                        help="create an object, QEMU's -object syntax, e.g. "
                             "tls-creds-x509,id=tls0,dir=DIR,endpoint=server (repeatable)")
    parser.add_argument("--tls-creds", metavar="ID", help="migrate over TLS with this object")
    parser.add_argument(other, metavar=metavar, help=help)


def _tls(args: argparse.Namespace, other: str) -> dict[str, Any]:
    """
    @param args: the parsed arguments.
    @param other: the attribute of the second TLS parameter.
    @return: the C{objects} made from C{--object} and the C{tls}
        parameters given (None without C{--tls-creds}), as keyword
        arguments of C{captureSnapshot}/C{restoreSnapshot}.
    @raise twisted_postcopy.tlscreds.TLSError: a bad object.
    """
    from twisted_postcopy.tlscreds import ObjectRegistry, parseObjectOption

    objects = ObjectRegistry()
    for spec in args.object:
        qomType, id, properties = parseObjectOption(spec)
        objects.add(qomType, id, **properties)
    if not args.tls_creds:
        return {"objects": objects, "tls": None}
    tls = {"tls-creds": args.tls_creds}
    if getattr(args, other):
        tls[other.replace("_", "-")] = getattr(args, other)
    return {"objects": objects, "tls": tls}


def _drainThenStop(reactor: Any, patience: int = 100) -> None:
    """
    Stop the reactor once no transport has bytes left to write (the last
    SHUT or END must reach the peer), or after C{patience} polls.

    @param reactor: the running reactor.
    @param patience: polls of 50 ms left.
    """
    if reactor.getWriters() and patience > 0:
        reactor.callLater(0.05, _drainThenStop, reactor, patience - 1)
        return
    reactor.callLater(0.05, reactor.stop)


def _capture(args: argparse.Namespace) -> int:
    """
    @param args: the parsed arguments.
    @return: 0 once QEMU's side completed and the snapshot is stored.
    """
    from twisted_postcopy.snapshot.capture import captureSnapshot

    def start(reactor: Any) -> Any:
        """
        @param reactor: the running reactor.
        @return: a Deferred firing once the snapshot is stored.
        """
        listening, vm = captureSnapshot(reactor, args.listen, args.dir, not args.no_postcopy,
                                        args.machine, **_tls(args, "tls_authz"),
                                        insecure=args.insecure_migration)
        listening.addCallback(lambda port: print(f"listening on {port.getHost()}", flush=True))
        return listening.addCallback(lambda _: vm.stored)

    return runUntil(start)


def _restore(args: argparse.Namespace) -> int:
    """
    @param args: the parsed arguments.
    @return: 0 once every destination completed; one C{query-migrate}
        JSON line per destination is printed at the end, with
        C{started}, the epoch time the connections were started.
    """
    from twisted_postcopy.control.snapshotcli import parseParameters
    from twisted_postcopy.snapshot.restore import restoreSnapshot
    from twisted_postcopy.snapshot.store import openSnapshot

    if not args.no_verify:
        openSnapshot(args.dir).verify()

    def start(reactor: Any) -> Any:
        """
        @param reactor: the running reactor.
        @return: a Deferred firing when every clone ended.
        """
        started = time.time()
        managers, done = restoreSnapshot(reactor, args.dir, args.to, args.postcopy or args.postcopy_preempt,
                                         False, args.max_bandwidth, **_tls(args, "tls_hostname"),
                                         parameters=parseParameters(args.parameter),
                                         preempt=args.postcopy_preempt)

        def report(result: Any) -> Any:
            for uri, manager in zip(args.to, managers):
                line = {"uri": uri, "started": started, **manager.queryMigrate()}
                print(json.dumps(line, sort_keys=True), flush=True)
            return result

        return done.addBoth(report)

    return runUntil(start)
