# -*- test-case-name: tests.test_control_qmpinterop -*-
"""
The QMP endpoint against the tools written for QEMU: the C{qemu.qmp}
client library, its C{qmp-shell} driving a whole postcopy migration
between two real C{twistd postcopy} daemons, and one probe script run
against both a daemon and a real QEMU 7.2 (TCG) giving the same shapes and
error texts.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_postcopy.control.daemon import startDaemon
from twisted_postcopy.testing.qemuhost import qemuBinary, qemuSkipReason
from twisted_postcopy.testing.real import missingReal


def requireQMPClient() -> None:
    """
    @raise SkipTest: the C{qemu.qmp} package is missing (via
        L{missingReal}).
    """
    try:
        import qemu.qmp.qmp_shell  # noqa: F401
    except ImportError:
        missingReal("the qemu.qmp package is missing (pip install qemu.qmp)")


def shapes(path: str) -> dict[str, Any]:
    """
    Run L{twisted_postcopy.testing.qmpshapes} against a QMP socket
    (blocking: call in a thread).

    @param path: the socket.
    @return: its JSON output.
    """
    result = subprocess.run([sys.executable, "-m", "twisted_postcopy.testing.qmpshapes", path],
                            capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise AssertionError(f"qmpshapes failed on {path}:\n{result.stderr}")
    return json.loads(result.stdout)


def qmpShell(path: str, lines: list[str], home: str) -> list[Any]:
    """
    Run C{qmp-shell PATH} with C{lines} on its standard input (blocking:
    call in a thread).

    @param path: the QMP socket.
    @param lines: the commands, in qmp-shell's C{name key=value} syntax.
    @param home: the C{HOME} for its history file.
    @return: the banner line naming the QEMU version, then each reply.
    """
    result = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", path],
                            input="".join(line + "\n" for line in lines),
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HOME": home})
    if result.returncode:
        raise AssertionError(f"qmp-shell failed:\n{result.stdout}\n{result.stderr}")
    return parseShell(result.stdout)


def parseShell(output: str) -> list[Any]:
    """
    @param output: what C{qmp-shell} printed.
    @return: the C{Connected to QEMU ...} line, then the replies (JSON)
        and events (printed as Python dicts).
    """
    parsed: list[Any] = []
    for chunk in output.replace("(QEMU) ", "\n").splitlines():
        chunk = chunk.strip()
        if chunk.startswith("Connected to"):
            parsed.append(chunk)
        elif chunk.startswith("{"):
            try:
                parsed.append(json.loads(chunk))
            except ValueError:
                parsed.append(ast.literal_eval(chunk))
    return parsed


class DaemonTestCase(TestCase):
    """
    Starts C{twistd postcopy} daemons with a QMP socket.
    """

    timeout = 300

    def setUp(self) -> None:
        """
        Make a short work directory (Unix socket paths are short).
        """
        from twisted.internet import reactor

        requireQMPClient()
        self.reactor = reactor
        self.workdir = Path(tempfile.mkdtemp(prefix="pc-qmp-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    async def start(self, name: str, *arguments: str) -> Any:
        """
        Start a daemon serving QMP; it is stopped after the test.

        @param name: its name.
        @param arguments: its options.
        @return: the L{twisted_postcopy.control.daemon.Daemon}.
        """
        daemon = await startDaemon(self.reactor, name, self.workdir, arguments, qmp=True)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(daemon.stop(self.reactor)))
        return daemon


class ShapesTests(DaemonTestCase):
    """
    The same probes against a daemon and QEMU 7.2.
    """

    @defer.inlineCallbacks
    def test_sameAsQEMU(self) -> Any:
        """
        Greeting, queries, errors (their texts too), and the events and
        C{query-migrate} of a migration that fails to connect have the
        same shapes; our parameters are QEMU's with its defaults, our commands a subset
        of its commands, and the capability lists the same, but for our
        own extensions, which all have C{x-} names.
        """
        reason = qemuSkipReason()
        if reason:
            missingReal(reason)
        daemon = yield defer.Deferred.fromCoroutine(
            self.start("source", "--role", "source", "--guest", "stress", "--ram", "16M",
                       "--workers", "1"))
        path = daemon.qmp[len("unix:"):]
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        ours = yield deferToThread(shapes, path)
        qemuPath = str(self.workdir / "qemu.qmp")
        qemu = subprocess.Popen(
            [qemuBinary(), "-accel", "tcg", "-M", "pc", "-m", "32", "-display", "none",
             "-nodefaults", "-S", "-qmp", f"unix:{qemuPath},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(qemu.wait)
        self.addCleanup(qemu.kill)
        while not os.path.exists(qemuPath):
            self.assertIsNone(qemu.poll(), "QEMU exited")
            yield deferLater(self.reactor, 0.05, lambda: None)
        theirs = yield deferToThread(shapes, qemuPath)

        ourValues, theirValues = ours.pop("values"), theirs.pop("values")
        ourParameters = ours.pop("query-migrate-parameters")["return"]
        theirParameters = theirs.pop("query-migrate-parameters")["return"]
        # Our own extensions QEMU lacks all carry an x- name; the rest
        # matches QEMU's names, shapes and defaults.
        extensions = {name for name in ourParameters if name not in theirParameters}
        self.assertEqual({name for name in extensions if not name.startswith("x-")}, set())
        for name, kind in ourParameters.items():
            if name in extensions:
                continue
            self.assertEqual(theirParameters.get(name), kind, name)
            self.assertEqual(ourValues["parameters"][name], theirValues["parameters"][name], name)
        self.assertEqual(ours, theirs)
        ourCapabilities = [name for name in ourValues["capabilities"]
                           if name in theirValues["capabilities"] or not name.startswith("x-")]
        self.assertEqual(ourCapabilities, theirValues["capabilities"])
        extraCommands = set(ourValues["commands"]) - set(theirValues["commands"])
        self.assertIn("x-query-guest", extraCommands)
        self.assertEqual({name for name in extraCommands if not name.startswith("x-")}, set())
        self.assertEqual(ours["event-statuses"], ["setup", "failed"])


class MigrationShapesTests(DaemonTestCase):
    """
    One postcopy migration driven over QMP by the same script, between two
    daemons and between two QEMU 7.2 processes.
    """

    def startQEMU(self, name: str, image: str, *extra: str) -> str:
        """
        Start a QEMU booting the test guest, killed after the test.

        @param name: its name (the QMP socket's).
        @param image: the boot image.
        @param extra: more arguments.
        @return: its QMP socket path.
        """
        from twisted_postcopy.testing.qemuhost import machineArguments

        path = str(self.workdir / f"{name}.qemu.qmp")
        process = subprocess.Popen(
            [qemuBinary(), *machineArguments(image, 32), "-qmp", f"unix:{path},server=on,wait=off",
             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        return path

    @defer.inlineCallbacks
    def test_postcopyAsQEMU(self) -> Any:
        """
        Both sides go through the same statuses, emit C{MIGRATION_PASS},
        and end with C{query-migrate} answers of the same shape (the
        destination's with QEMU's blocktime fields).
        """
        from twisted_postcopy.errors import UffdUnavailableError
        from twisted_postcopy.ram.support import checkUserfaultfd
        from twisted_postcopy.testing.bootsector import writeBootImage
        from twisted_postcopy.testing.qemubaseline import layoutFor

        reason = qemuSkipReason()
        if reason:
            missingReal(reason)
        try:
            checkUserfaultfd()
        except UffdUnavailableError as error:
            missingReal(f"userfaultfd unavailable: {error}")
        image = writeBootImage(str(self.workdir / "boot.img"), layoutFor(32))
        qemuSource = self.startQEMU("source", image)
        qemuDestination = self.startQEMU("destination", image, "-incoming", "defer")
        guest = ("--guest", "stress", "--ram", "32M", "--workers", "1")
        destination = yield defer.Deferred.fromCoroutine(
            self.start("destination", "--role", "destination", *guest))
        source = yield defer.Deferred.fromCoroutine(self.start("source", "--role", "source", *guest))
        while not (yield source.client.queryGuest()).get("running"):
            yield deferLater(self.reactor, 0.05, lambda: None)
        ours = yield deferToThread(migrationShapes, source.qmp[5:], destination.qmp[5:])
        while not (os.path.exists(qemuSource) and os.path.exists(qemuDestination)):
            yield deferLater(self.reactor, 0.05, lambda: None)
        theirs = yield deferToThread(migrationShapes, qemuSource, qemuDestination)
        # Our vCPUs are the worker threads that reported themselves, which
        # they do once they run; a migration that completes first lists
        # none (docs/qmp.md, differences).  QEMU's vCPUs exist from the start.
        vcpus = ours["destination"]["query-migrate"]["postcopy-vcpu-blocktime"]
        self.assertIn(vcpus, ([], ["integer"]))
        ours["destination"]["query-migrate"]["postcopy-vcpu-blocktime"] = ["integer"]
        for side in ("source", "destination"):
            explained = f"{side}: ours {json.dumps(ours)} QEMU's {json.dumps(theirs)}"
            self.assertEqual(ours[side]["statuses"], theirs[side]["statuses"], explained)
            self.assertEqual(ours[side]["query-migrate"], theirs[side]["query-migrate"], explained)
        self.assertEqual(ours["source"]["statuses"][-1], "completed")
        self.assertGreater(ours["source"]["passes"], 0)
        self.assertGreater(theirs["source"]["passes"], 0)
        self.assertIn("postcopy-blocktime", ours["destination"]["query-migrate"])
        self.assertEqual(ours["listening"], theirs["listening"])


def migrationShapes(source: str, destination: str) -> dict[str, Any]:
    """
    Run C{qmpshapes --migrate} (blocking: call in a thread), the
    destination listening on a free port.

    @param source: the source's QMP socket.
    @param destination: the destination's QMP socket.
    @return: its JSON output.
    """
    result = subprocess.run([sys.executable, "-m", "twisted_postcopy.testing.qmpshapes",
                             "--migrate", source, destination, "tcp:127.0.0.1:0"],
                            capture_output=True, text=True, timeout=180)
    if result.returncode:
        raise AssertionError(f"qmpshapes --migrate failed:\n{result.stderr}")
    return json.loads(result.stdout)


class ShellMigrationTests(DaemonTestCase):
    """
    C{qmp-shell} drives a postcopy migration between two daemons.
    """

    @defer.inlineCallbacks
    def test_postcopy(self) -> Any:
        """
        Capabilities, C{migrate-incoming}, parameters, C{migrate} and
        C{migrate-start-postcopy} typed into C{qmp-shell}; C{query-migrate}
        polled there until both sides completed; the source's session saw
        C{MIGRATION} and C{MIGRATION_PASS} events; the destination guest's
        memory checks out (C{x-query-guest}).
        """
        from twisted_postcopy.errors import UffdUnavailableError
        from twisted_postcopy.ram.support import checkUserfaultfd

        try:
            checkUserfaultfd()
        except UffdUnavailableError as error:
            missingReal(f"userfaultfd unavailable: {error}")
        guest = ("--guest", "stress", "--ram", "32M", "--workers", "1")
        destination = yield defer.Deferred.fromCoroutine(
            self.start("destination", "--role", "destination", *guest))
        source = yield defer.Deferred.fromCoroutine(self.start("source", "--role", "source", *guest))
        home = str(self.workdir)
        capabilities = ('capabilities=[{"capability":"postcopy-ram","state":true},'
                        '{"capability":"events","state":true}]')
        while not (yield source.client.queryGuest()).get("running"):
            yield deferLater(self.reactor, 0.05, lambda: None)

        replies = yield deferToThread(qmpShell, destination.qmp[5:], [
            f"migrate-set-capabilities {capabilities}", "migrate-incoming uri=tcp:127.0.0.1:0",
            "query-migrate"], home)
        self.assertEqual(replies[:3], ["Connected to QEMU 7.2.0", {"return": {}}, {"return": {}}])
        [address] = replies[3]["return"]["socket-address"]
        uri = f"tcp:{address['host']}:{address['port']}"

        shell = subprocess.Popen([sys.executable, "-m", "qemu.qmp.qmp_shell", source.qmp[5:]],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": home})
        self.addCleanup(lambda: shell.poll() is None and shell.kill())
        shell.stdin.write(f"migrate-set-capabilities {capabilities}\n"
                          f"migrate-set-parameters max-bandwidth={1 << 30}\n"
                          f"migrate uri={uri}\n"
                          "migrate-start-postcopy\n")
        shell.stdin.flush()
        for daemon in (source, destination):
            while True:
                [_, reply] = yield deferToThread(qmpShell, daemon.qmp[5:], ["query-migrate"], home)
                if reply["return"].get("status") in ("completed", "failed", "cancelled"):
                    break
                yield deferLater(self.reactor, 0.2, lambda: None)
            self.assertEqual(reply["return"]["status"], "completed", daemon.name)

        shell.stdin.write("query-status\n\n")
        output, errors = yield deferToThread(shell.communicate, timeout=60)
        parsed = parseShell(output)
        self.assertEqual(parsed[:5], ["Connected to QEMU 7.2.0"] + [{"return": {}}] * 4, errors)
        self.assertEqual(parsed[5], {"return": {"status": "postmigrate", "singlestep": False,
                                                "running": False}})
        events = parsed[6:]
        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        self.assertEqual(statuses, ["setup", "active", "postcopy-active", "completed"])
        passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
        self.assertEqual(passes, list(range(1, len(passes) + 1)))
        self.assertTrue(passes)
        for event in events:
            self.assertEqual(sorted(event["timestamp"]), ["microseconds", "seconds"])

        [_, guestReply] = yield deferToThread(qmpShell, destination.qmp[5:], ["x-query-guest"], home)
        self.assertTrue(guestReply["return"]["verified"], guestReply)
