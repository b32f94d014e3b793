# -*- test-case-name: tests.test_control_qmp -*-
"""
Tests for L{twisted_postcopy.control.qmp}: the QMP wire protocol (QEMU
7.2's texts and shapes) over a L{StringTransport}, against a real
L{MigrationManager} on a memory reactor.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.enginevm import OutgoingTestVM, PAGE
from twisted_postcopy.control import qmp
from twisted_postcopy.manager import CAPABILITIES, PARAMETERS, TLS_PARAMETERS, MigrationManager


class SlowGuest:
    """
    A guest stand-in whose C{query()} answers only when the test fires
    L{answer}: a command that takes a while.

    @ivar answer: the Deferred C{query()} returns.
    """

    def __init__(self) -> None:
        """
        Start unanswered.
        """
        self.answer: Deferred = Deferred()

    def query(self) -> Deferred:
        """
        @return: L{answer}.
        """
        return self.answer


class QMPTestCase(SynchronousTestCase):
    """
    A connected L{qmp.QMPProtocol} over a source manager.
    """

    def setUp(self) -> None:
        """
        Connect a protocol to a string transport and read the greeting.
        """
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1700000000.25)
        self.vm = OutgoingTestVM({"pc.ram": 4 * PAGE})
        self.manager = MigrationManager(self.reactor, self.vm)
        self.guest = SlowGuest()
        self.protocol = qmp.QMPFactory(self.manager, self.guest).buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.greeting = self.received()[0]

    def received(self) -> list[Any]:
        """
        @return: the messages written since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        self.assertTrue(data.endswith(b"\r\n") or not data)
        return [json.loads(line) for line in data.split(b"\r\n") if line]

    def send(self, *messages: Any) -> list[Any]:
        """
        Send messages (JSON values, or raw bytes).

        @param messages: what to send.
        @return: what came back.
        """
        for message in messages:
            self.protocol.dataReceived(
                message if isinstance(message, bytes) else json.dumps(message).encode())
        return self.received()

    def execute(self, name: str, **arguments: Any) -> Any:
        """
        Run one command and return its one reply.

        @param name: the command.
        @param arguments: its arguments.
        @return: the reply.
        """
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        [reply] = self.send(message)
        return reply

    def negotiate(self, *enable: str) -> None:
        """
        Negotiate, enabling C{enable}.

        @param enable: capabilities.
        """
        self.assertEqual(self.execute("qmp_capabilities", enable=list(enable)), {"return": {}})

    def assertError(self, reply: Any, desc: str, errorClass: str = "GenericError") -> None:
        """
        @param reply: a reply.
        @param desc: the expected text.
        @param errorClass: the expected class.
        """
        self.assertEqual(reply["error"], {"class": errorClass, "desc": desc})


class NegotiationTests(QMPTestCase):
    """
    The greeting and C{qmp_capabilities}.
    """

    def test_greeting(self) -> None:
        """
        The greeting names QEMU 7.2 (the dialect), our package and the oob
        capability.
        """
        self.assertEqual(self.greeting, {"QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": qmp.PACKAGE},
            "capabilities": ["oob"]}})
        self.assertTrue(qmp.PACKAGE.startswith("twisted-postcopy "))

    def test_beforeNegotiation(self) -> None:
        """
        Any command but C{qmp_capabilities}, known or not, gets QEMU's
        text, with the C{id} first.
        """
        for name in ("query-status", "nosuch"):
            [reply] = self.send({"execute": name, "id": 1})
            self.assertEqual(list(reply), ["id", "error"])
            self.assertError(reply, "Expecting capabilities negotiation with 'qmp_capabilities'",
                             "CommandNotFound")

    def test_negotiateOnce(self) -> None:
        """
        C{qmp_capabilities} enters command mode; a second one is refused
        with QEMU's text.
        """
        self.negotiate()
        self.assertFalse(self.protocol.oob)
        self.assertError(self.execute("qmp_capabilities"),
                         "Capabilities negotiation is already complete, command ignored",
                         "CommandNotFound")

    def test_unknownCapability(self) -> None:
        """
        An unknown capability is refused with QEMU's (odd) text and
        negotiation stays pending.
        """
        self.assertError(self.execute("qmp_capabilities", enable=["foo"]),
                         "Parameter 'null' does not accept value 'foo'")
        self.assertFalse(self.protocol.negotiated)


class RequestTests(QMPTestCase):
    """
    Request checks, in QEMU's words.
    """

    def setUp(self) -> None:
        """
        Negotiate.
        """
        super().setUp()
        self.negotiate()

    def test_notAnObject(self) -> None:
        """
        Arrays and scalars are not requests.
        """
        for raw in (b"[1]", b"42 ", b'"abc"'):
            [reply] = self.send(raw)
            self.assertError(reply, "QMP input must be a JSON object")

    def test_members(self) -> None:
        """
        Unknown members, a missing C{execute}, wrong member types.
        """
        cases = [({"execute": "query-status", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
                 ({"id": 3}, "QMP input lacks member 'execute'"),
                 ({"execute": 5}, "QMP input member 'execute' must be a string"),
                 ({"execute": "migrate", "arguments": []},
                  "QMP input member 'arguments' must be an object"),
                 ({"exec-oob": "migrate-pause"}, "QMP input member 'exec-oob' is unexpected")]
        for message, desc in cases:
            self.assertError(self.send(message)[0], desc)

    def test_unknownCommand(self) -> None:
        """
        QEMU's C{CommandNotFound} text; the C{id} is echoed.
        """
        [reply] = self.send({"execute": "nosuch", "id": "x"})
        self.assertEqual(reply, {"id": "x", "error": {
            "class": "CommandNotFound", "desc": "The command nosuch has not been found"}})

    def test_arguments(self) -> None:
        """
        Missing, unexpected and mistyped arguments, nested ones named by
        their path, as QEMU's input visitor does.
        """
        self.assertError(self.execute("migrate"), "Parameter 'uri' is missing")
        self.assertError(self.execute("migrate", uri=5),
                         "Invalid parameter type for 'uri', expected: string")
        self.assertError(self.execute("migrate", uri="tcp:127.0.0.1:1", bogus=1),
                         "Parameter 'bogus' is unexpected")
        self.assertError(self.execute("migrate-set-capabilities", capabilities={}),
                         "Invalid parameter type for 'capabilities', expected: array")
        self.assertError(self.execute("migrate-set-capabilities",
                                      capabilities=[{"capability": "events"}]),
                         "Parameter 'capabilities[0].state' is missing")
        self.assertError(self.execute("migrate-set-capabilities",
                                      capabilities=[{"capability": "events", "state": "yes"}]),
                         "Invalid parameter type for 'capabilities[0].state', expected: boolean")
        self.assertError(self.execute("migrate-set-parameters", **{"downtime-limit": "1"}),
                         "Invalid parameter type for 'downtime-limit', expected: integer")

    def test_managerErrors(self) -> None:
        """
        The manager's errors come back as C{GenericError} with its text
        (QEMU's).
        """
        cases = [("migrate-set-capabilities",
                  {"capabilities": [{"capability": "nope", "state": True}]},
                  "Parameter 'capability' does not accept value 'nope'"),
                 ("migrate-set-parameters", {"nope": 1}, "Parameter 'nope' is unexpected"),
                 ("migrate-start-postcopy", {},
                  "Enable postcopy with migrate_set_capability before the start of migration"),
                 ("migrate-pause", {},
                  "migrate-pause is currently only supported during postcopy-active state"),
                 ("migrate-recover", {"uri": "tcp:127.0.0.1:0"},
                  "Migrate recover can only be run when postcopy is paused.")]
        for name, arguments, desc in cases:
            self.assertError(self.execute(name, **arguments), desc)

    def test_blockMigration(self) -> None:
        """
        C{migrate} with C{blk} is refused: there are no disks to copy.
        """
        self.assertError(self.execute("migrate", uri="tcp:127.0.0.1:1", blk=True),
                         "Block migration (blk, inc) is not supported by twisted-postcopy")
        self.assertEqual(self.manager.outgoing, None)


class CommandTests(QMPTestCase):
    """
    Each command calls the manager and answers in QEMU's shape.
    """

    def setUp(self) -> None:
        """
        Negotiate.
        """
        super().setUp()
        self.negotiate()

    def test_capabilities(self) -> None:
        """
        C{migrate-set-capabilities} reaches the manager;
        C{query-migrate-capabilities} lists every capability in QEMU's
        order.
        """
        reply = self.execute("migrate-set-capabilities",
                             capabilities=[{"capability": "postcopy-ram", "state": True}])
        self.assertEqual(reply, {"return": {}})
        self.assertTrue(self.manager.capabilities["postcopy-ram"])
        answer = self.execute("query-migrate-capabilities")["return"]
        self.assertEqual([each["capability"] for each in answer], CAPABILITIES)
        self.assertIn({"capability": "postcopy-ram", "state": True}, answer)

    def test_parameters(self) -> None:
        """
        C{migrate-set-parameters} takes QEMU's flat arguments.
        """
        self.assertEqual(self.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 20}),
                         {"return": {}})
        self.assertEqual(self.execute("query-migrate-parameters"),
                         {"return": {**PARAMETERS, **TLS_PARAMETERS, "max-bandwidth": 1 << 20}})

    def test_objectsAndTLSParameters(self) -> None:
        """
        C{object-add} takes QEMU's flat arguments (a C{tls-creds-x509}
        whose files are checked), C{migrate-set-parameters} the TLS
        strings, C{object-del} removes the object; errors are QEMU's.
        """
        from twisted_postcopy.testing import pki

        directory = self.mktemp()
        pki.writeCredentials(directory)
        reply = self.execute("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                              "dir": directory, "endpoint": "client"})
        self.assertEqual(reply, {"return": {}})
        self.assertEqual(self.execute("migrate-set-parameters", **{"tls-creds": "tls0"}),
                         {"return": {}})
        self.assertEqual(self.execute("query-migrate-parameters")["return"]["tls-creds"], "tls0")
        self.assertError(self.execute("object-add", **{"qom-type": "tls-creds-x509", "id": "bad",
                                                       "dir": "/nonexistent"}),
                         "Unable to access credentials /nonexistent/ca-cert.pem: "
                         "No such file or directory")
        self.assertEqual(self.execute("object-del", id="tls0"), {"return": {}})
        self.assertError(self.execute("object-del", id="tls0"), "object 'tls0' not found")

    def test_migrateAndCancel(self) -> None:
        """
        C{migrate} starts the manager's migration; C{query-migrate} and
        C{query-status} report it; C{migrate_cancel} cancels it.
        """
        self.assertEqual(self.execute("query-migrate"), {"return": {}})
        self.assertEqual(self.execute("migrate", uri="tcp:127.0.0.1:1", detach=True),
                         {"return": {}})
        self.assertEqual(self.execute("query-migrate")["return"]["status"], "setup")
        self.assertEqual(self.execute("query-status"),
                         {"return": {"status": "running", "singlestep": False, "running": True}})
        self.assertEqual(self.execute("migrate_cancel"), {"return": {}})
        self.assertEqual(self.manager.status.value, "cancelled")

    def test_version(self) -> None:
        """
        C{query-version}: QEMU's shape, our package.
        """
        self.assertEqual(self.execute("query-version")["return"],
                         {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": qmp.PACKAGE})

    def test_commands(self) -> None:
        """
        C{query-commands} lists every command served.
        """
        names = [each["name"] for each in self.execute("query-commands")["return"]]
        self.assertEqual(names, list(qmp.COMMANDS))
        for name in ("query-migrate", "migrate", "migrate-incoming", "migrate-set-capabilities",
                     "migrate-set-parameters", "query-migrate-capabilities",
                     "query-migrate-parameters", "migrate-start-postcopy", "migrate-pause",
                     "migrate-recover", "migrate_cancel", "query-status", "query-version",
                     "query-commands", "qmp_capabilities"):
            self.assertIn(name, names)

    def test_idShapes(self) -> None:
        """
        Any JSON C{id} is echoed after C{return}.
        """
        [reply] = self.send({"execute": "query-status", "id": {"a": [1]}})
        self.assertEqual(list(reply), ["return", "id"])
        self.assertEqual(reply["id"], {"a": [1]})


class OrderTests(QMPTestCase):
    """
    In-band commands run one at a time; C{exec-oob} runs at once.
    """

    def test_inOrder(self) -> None:
        """
        A command queued behind a slow one answers after it.
        """
        self.negotiate()
        self.assertEqual(self.send({"execute": "x-query-guest", "id": 1},
                                   {"execute": "query-status", "id": 2}), [])
        self.guest.answer.callback({"name": "slow"})
        self.assertEqual([reply["id"] for reply in self.received()], [1, 2])

    def test_outOfBand(self) -> None:
        """
        With oob enabled, C{migrate-pause} by C{exec-oob} answers while an
        in-band command is still running; commands without QEMU's
        C{allow-oob} are refused.
        """
        self.negotiate("oob")
        self.assertEqual(self.send({"execute": "x-query-guest", "id": 1}), [])
        [reply] = self.send({"exec-oob": "migrate-pause", "id": 2})
        self.assertEqual(reply["id"], 2)
        self.assertError(reply, "migrate-pause is currently only supported during "
                                "postcopy-active state")
        self.assertError(self.send({"exec-oob": "query-status"})[0],
                         "The command query-status does not support OOB")
        self.guest.answer.callback({})
        self.assertEqual(self.received(), [{"return": {}, "id": 1}])

    def test_queueBounded(self) -> None:
        """
        Past L{qmp.MAX_QUEUED} waiting commands the connection stops being
        read, and resumes once they ran.
        """
        self.negotiate()
        self.send(*[{"execute": "x-query-guest"}] * (qmp.MAX_QUEUED + 1))
        self.assertEqual(self.transport.producerState, "paused")
        self.guest.answer.callback({})
        self.assertEqual(len(self.received()), qmp.MAX_QUEUED + 1)
        self.assertEqual(self.transport.producerState, "producing")

    def test_slowReader(self) -> None:
        """
        A client that does not read its replies stops being read.
        """
        self.negotiate()
        self.protocol.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")


class InputLimitTests(QMPTestCase):
    """
    Bounded input, with a clear error, and the connection goes on.
    """

    def setUp(self) -> None:
        """
        Negotiate.
        """
        super().setUp()
        self.negotiate()

    def test_tooLarge(self) -> None:
        """
        An object over L{qmp.MAX_INPUT_SIZE} gets one error; what follows it
        runs.
        """
        big = json.dumps({"execute": "query-status", "id": "x" * qmp.MAX_INPUT_SIZE}).encode()
        replies = self.send(big[:1000], big[1000:], {"execute": "query-status", "id": 1})
        self.assertEqual(len(replies), 2)
        self.assertTrue(replies[0]["error"]["desc"].startswith("JSON token size limit exceeded"))
        self.assertEqual(replies[1]["id"], 1)

    def test_tooDeep(self) -> None:
        """
        Nesting over L{qmp.MAX_NESTING} gets one error.
        """
        deep = b'{"execute": "query-status", "id": ' + b"[" * 100 + b"]" * 100 + b"}"
        replies = self.send(deep, {"execute": "query-status", "id": 1})
        self.assertEqual(len(replies), 2)
        self.assertTrue(replies[0]["error"]["desc"].startswith("JSON nesting depth limit exceeded"))
        self.assertEqual(replies[1]["id"], 1)

    def test_parseErrors(self) -> None:
        """
        Malformed JSON gets QEMU's C{JSON parse error, ...} prefix; a
        stray bracket is QEMU's C{expecting value}.
        """
        [bad, stray] = self.send(b'{"execute": tru}', b"]")
        self.assertTrue(bad["error"]["desc"].startswith("JSON parse error, "))
        self.assertError(stray, "JSON parse error, expecting value")

    def test_split(self) -> None:
        """
        A request split anywhere, strings with escaped quotes and brackets
        included, is one request.
        """
        raw = json.dumps({"execute": "query-status", "id": 'a"}]\\'}).encode()
        for index in range(len(raw)):
            self.protocol.dataReceived(raw[index:index + 1])
        self.assertEqual(self.received()[0]["id"], 'a"}]\\')


class SplitterTests(SynchronousTestCase):
    """
    Tests for L{qmp.JSONSplitter} alone.
    """

    def test_values(self) -> None:
        """
        Objects, arrays, strings and scalars are split at their ends.
        """
        splitter = qmp.JSONSplitter()
        self.assertEqual(splitter.feed(b'{"a": [1, {"b": "}"}]} 42 "s t"[1]'),
                         [("value", b'{"a": [1, {"b": "}"}]}'), ("value", b"42"),
                          ("value", b'"s t"'), ("value", b"[1]")])

    def test_discardToEnd(self) -> None:
        """
        A value over the limit is discarded to its end without keeping it.
        """
        splitter = qmp.JSONSplitter(maxSize=8, maxNesting=2)
        self.assertEqual(splitter.feed(b'{"aaaaaaaaaa": ['), [
            ("error", "JSON token size limit exceeded (limits: 8 bytes, 2 levels)")])
        self.assertEqual(splitter.feed(b'"]}", ' * 1000 + b'1]} {}'), [("value", b"{}")])


class EventTests(QMPTestCase):
    """
    C{MIGRATION} and C{MIGRATION_PASS} events.
    """

    def test_events(self) -> None:
        """
        With the C{events} capability on, status changes and dirty syncs
        are sent with a timestamp.
        """
        self.negotiate()
        self.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        self.assertEqual(self.send({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}}), [
            {"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": "MIGRATION",
             "data": {"status": "setup"}},
            {"return": {}}])
        self.manager.outgoing.onPass(1)
        self.assertEqual(self.received(), [
            {"timestamp": {"seconds": 1700000000, "microseconds": 250000},
             "event": "MIGRATION_PASS", "data": {"pass": 1}}])

    def test_eventsCapabilityOff(self) -> None:
        """
        Without the C{events} capability, no events (QEMU's rule).
        """
        self.negotiate()
        self.execute("migrate", uri="tcp:127.0.0.1:1")
        self.execute("migrate_cancel")
        self.assertEqual(self.received(), [])

    def test_notBeforeNegotiation(self) -> None:
        """
        A connection still negotiating gets no events.
        """
        self.manager.setCapabilities({"events": True})
        self.manager.migrate("tcp:127.0.0.1:1")
        self.assertEqual(self.received(), [])

    def test_lostUnsubscribes(self) -> None:
        """
        A lost connection no longer receives events.
        """
        self.negotiate()
        self.protocol.connectionLost(None)
        self.assertEqual(self.manager._subscribers, [])
        self.assertEqual(self.manager._passSubscribers, [])

    def test_lostWhileRunning(self) -> None:
        """
        A command answering after its connection was lost writes nothing
        and runs nothing more.
        """
        self.negotiate()
        self.send({"execute": "x-query-guest"}, {"execute": "query-status"})
        self.protocol.connectionLost(None)
        self.guest.answer.callback({})
        self.assertEqual(self.received(), [])


class StatusTests(SynchronousTestCase):
    """
    C{query-status} (L{MigrationManager.queryStatus}) on each kind of
    daemon.
    """

    def test_destination(self) -> None:
        """
        A destination is C{inmigrate} until its guest runs.
        """
        from twisted_postcopy.testing.enginevm import IncomingTestVM

        manager = MigrationManager(MemoryReactorClock(), IncomingTestVM())
        self.assertEqual(manager.queryStatus(),
                         {"status": "inmigrate", "singlestep": False, "running": False})
        manager.migrateIncoming("tcp:127.0.0.1:0")
        self.assertEqual(manager.queryStatus()["status"], "inmigrate")

    def test_noGuest(self) -> None:
        """
        A daemon without a guest is C{prelaunch}.
        """
        manager = MigrationManager(MemoryReactorClock(), None)
        self.assertEqual(manager.queryStatus(),
                         {"status": "prelaunch", "singlestep": False, "running": False})


class TapTests(SynchronousTestCase):
    """
    C{twistd postcopy --qmp}.
    """

    def test_serves(self) -> None:
        """
        C{--qmp unix:PATH} adds a listener, mode 0600 and peer-checked like
        the control socket, whose protocols act on the daemon's manager.
        """
        from twisted.python import usage

        from twisted_postcopy import tap

        options = tap.Options()
        options.parseOptions(["--control", "unix:/tmp/x.sock", "--guest", "none",
                              "--qmp", "unix:/tmp/x.qmp"])
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        paths = {port[0]: port for port in reactor.unixServers}
        self.assertEqual(paths["/tmp/x.qmp"][3], 0o600)
        checking = paths["/tmp/x.qmp"][1]
        self.assertIsInstance(checking, type(paths["/tmp/x.sock"][1]))
        protocol = checking.wrapped.buildProtocol(None)
        self.assertIsInstance(protocol, qmp.QMPProtocol)
        self.assertIs(protocol.manager, service.manager)
        bad = tap.Options()
        self.assertRaises(usage.UsageError, bad.parseOptions,
                          ["--control", "unix:/tmp/x.sock", "--qmp", "tcp:4444"])


class SplitterPropertyTests(SynchronousTestCase):
    """
    L{qmp.JSONSplitter} over any chunking of any sequence of JSON values.
    """

    def test_anyChunking(self) -> None:
        """
        Values (objects, arrays, strings and other scalars) written one
        after another, blank-separated, cut anywhere, come out whole and in
        order, each parsing back to what was written.
        """
        from hypothesis import given, settings, strategies as st

        scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
        values = st.recursive(scalars, lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
            max_leaves=12)

        @settings(max_examples=200, deadline=None)
        @given(st.lists(values, min_size=1, max_size=5), st.lists(st.integers(0, 400)))
        def check(written: list[Any], cuts: list[int]) -> None:
            stream = b"".join(json.dumps(value).encode() + b" \r\n" for value in written)
            splitter = qmp.JSONSplitter()
            out: list[tuple[str, Any]] = []
            start = 0
            for cut in sorted(set(cut for cut in cuts if cut < len(stream))) + [len(stream)]:
                out += splitter.feed(stream[start:cut])
                start = cut
            self.assertEqual([json.loads(text) for kind, text in out if kind == "value"], written)
            self.assertEqual([kind for kind, _ in out], ["value"] * len(written))

        check()
