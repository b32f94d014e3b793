# -*- test-case-name: tests.test_control_cli -*-
"""
Tests for L{twisted_postcopy.control.cli}: argument parsing, and each
subcommand run against a control server listening on a real Unix socket
(over the L{FakeManager} of L{tests.test_control_server}; the end-to-end
runs against real daemons are in L{tests.test_service}).
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy import errors
from twisted_postcopy.cli import buildParser
from twisted_postcopy.control import cli
from twisted_postcopy.control.server import ControlFactory
from tests.test_control_server import FakeManager
from tests.test_service import socketPath


class ParsingTests(SynchronousTestCase):
    """
    Tests for the argument helpers.
    """

    def test_assignments(self) -> None:
        """
        C{NAME=VALUE} words become a mapping of converted values.
        """
        self.assertEqual(
            cli.parseAssignments(["postcopy-ram=on", "postcopy-preempt=off"], cli.parseState),
            {"postcopy-ram": True, "postcopy-preempt": False},
        )

    def test_badAssignment(self) -> None:
        """
        A word without C{=} is rejected.
        """
        self.assertRaises(argparse.ArgumentTypeError, cli.parseAssignments, ["postcopy-ram"], str)

    def test_badState(self) -> None:
        """
        A state other than on/off (and synonyms) is rejected.
        """
        self.assertRaises(argparse.ArgumentTypeError, cli.parseState, "maybe")

    def test_parameter(self) -> None:
        """
        Integer values (any base) become integers; others stay text.
        """
        self.assertEqual(cli.parseParameter("0x100"), 256)
        self.assertEqual(cli.parseParameter("tls0"), "tls0")

    def test_formatInfo(self) -> None:
        """
        Nested objects are rendered with their name as prefix.
        """
        lines = cli.formatInfo({"status": "active", "ram": {"transferred": 5}})
        self.assertEqual(lines, ["status: active", "ram transferred: 5"])

    def test_mergedArguments(self) -> None:
        """
        Several capabilities on one command line become one mapping.
        """
        args = buildParser().parse_args(
            ["migrate-set-capabilities", "--control", "unix:/x", "postcopy-ram=on", "events=off"]
        )
        self.assertEqual(cli._merge(args).capabilities, {"postcopy-ram": True, "events": False})

    def test_controlFromEnvironment(self) -> None:
        """
        C{--control} defaults to C{POSTCOPY_CONTROL}.
        """
        self.patch(cli.os, "environ", {"POSTCOPY_CONTROL": "unix:/run/p.sock"})
        args = buildParser().parse_args(["query-migrate"])
        self.assertEqual(args.control, "unix:/run/p.sock")


class CommandTests(TestCase):
    """
    Each subcommand against a control server on a real Unix socket.
    """

    def setUp(self) -> defer.Deferred:
        """
        Listen on a Unix socket in a temporary directory.

        @return: a Deferred firing once listening.
        """
        from twisted.internet import reactor

        self.reactor = reactor
        self.manager = FakeManager()
        self.path = socketPath(self)
        d = UNIXServerEndpoint(reactor, self.path).listen(ControlFactory(self.manager))
        return d.addCallback(lambda port: self.addCleanup(port.stopListening))

    async def runCommand(self, *argv: str) -> tuple[int, str, str]:
        """
        Run one subcommand against the server.

        @param argv: the command line after C{postcopy}, without C{--control}.
        @return: the exit status, the output and the error output.
        """
        args = buildParser().parse_args([argv[0], "--control", "unix:" + self.path, *argv[1:]])
        out, err = io.StringIO(), io.StringIO()
        status = await cli.runHandler(self.reactor, _handlerOf(args), cli._merge(args), out, err)
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_queryMigrateJSON(self) -> Any:
        """
        C{query-migrate --json} prints the manager's object as JSON.
        """
        self.manager.info = {"status": "active", "ram": {"transferred": 42}}
        status, out, _ = yield defer.Deferred.fromCoroutine(self.runCommand("query-migrate", "--json"))
        self.assertEqual((status, json.loads(out)), (0, self.manager.info))

    @defer.inlineCallbacks
    def test_queryMigrateText(self) -> Any:
        """
        C{query-migrate} prints C{name: value} lines.
        """
        self.manager.info = {"status": "active", "ram": {"transferred": 42}}
        status, out, _ = yield defer.Deferred.fromCoroutine(self.runCommand("query-migrate"))
        self.assertEqual((status, out), (0, "status: active\nram transferred: 42\n"))

    @defer.inlineCallbacks
    def test_capabilities(self) -> Any:
        """
        C{migrate-set-capabilities} then C{query-migrate-capabilities}.
        """
        yield defer.Deferred.fromCoroutine(
            self.runCommand("migrate-set-capabilities", "postcopy-ram=on", "postcopy-preempt=on"))
        status, out, _ = yield defer.Deferred.fromCoroutine(self.runCommand("query-migrate-capabilities"))
        self.assertEqual((status, out), (0, "postcopy-preempt: on\npostcopy-ram: on\n"))

    @defer.inlineCallbacks
    def test_parameters(self) -> Any:
        """
        C{migrate-set-parameters} then C{query-migrate-parameters --json}.
        """
        yield defer.Deferred.fromCoroutine(self.runCommand("migrate-set-parameters", "downtime-limit=100"))
        _, out, _ = yield defer.Deferred.fromCoroutine(self.runCommand("query-migrate-parameters", "--json"))
        self.assertEqual(json.loads(out)["downtime-limit"], 100)

    @defer.inlineCallbacks
    def test_simpleCommands(self) -> Any:
        """
        The commands without results call the manager with their URI.
        """
        for argv in (("migrate", "tcp:127.0.0.1:4444"), ("migrate", "--resume", "unix:/m"),
                     ("migrate-incoming", "tcp:0:4444"), ("migrate-recover", "unix:/r"),
                     ("migrate-pause",), ("migrate-start-postcopy",), ("migrate-cancel",)):
            status, out, err = yield defer.Deferred.fromCoroutine(self.runCommand(*argv))
            self.assertEqual((status, out, err), (0, "", ""))
        self.assertEqual(self.manager.calls, [
            ("migrate", ("tcp:127.0.0.1:4444", False)), ("migrate", ("unix:/m", True)),
            ("migrateIncoming", ("tcp:0:4444",)), ("migrateRecover", ("unix:/r",)),
            ("migratePause", ()), ("startPostcopy", ()), ("cancel", ()),
        ])

    @defer.inlineCallbacks
    def test_error(self) -> Any:
        """
        A migration error prints QEMU's text and exits 1.
        """
        self.manager.failure = errors.MigrationError("There's a migration process in progress")
        status, out, err = yield defer.Deferred.fromCoroutine(self.runCommand("migrate", "tcp:127.0.0.1:1"))
        self.assertEqual((status, err), (1, "error: There's a migration process in progress\n"))

    @defer.inlineCallbacks
    def test_noDaemon(self) -> Any:
        """
        A control endpoint nobody listens on gives exit status 1 and says
        which endpoint.
        """
        args = buildParser().parse_args(["query-migrate", "--control", "unix:" + socketPath(self)])
        err = io.StringIO()
        status = yield cli.runHandler(self.reactor, _handlerOf(args), args, io.StringIO(), err)
        self.assertEqual(status, 1)
        self.assertIn("cannot connect to unix:", err.getvalue())

    @defer.inlineCallbacks
    def test_events(self) -> Any:
        """
        C{events --until completed} prints each MIGRATION event as a JSON
        line and exits 0 at C{completed}.
        """
        d = defer.Deferred.fromCoroutine(self.runCommand("events", "--until", "completed"))
        while not self.manager.subscribers:
            yield _later(self.reactor)
        for status in ("active", "postcopy-active", "completed"):
            self.manager.emit(status)
        status, out, _ = yield d
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(status, 0)
        self.assertEqual([e["data"]["status"] for e in lines], ["active", "postcopy-active", "completed"])


def _handlerOf(args: argparse.Namespace) -> cli.Handler:
    """
    Find the handler of a parsed subcommand.

    @param args: the parsed arguments.
    @return: the handler registered for C{args.command}.
    """
    return {name: handler for name, _, handler, _ in cli._COMMANDS}[args.command]


def _later(reactor: Any) -> defer.Deferred:
    """
    Wait a short while on the reactor.

    @param reactor: the reactor.
    @return: a Deferred firing soon.
    """
    return task.deferLater(reactor, 0.01, lambda: None)
