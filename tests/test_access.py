# -*- test-case-name: tests.test_access -*-
"""
Tests for L{twisted_postcopy.access}: socket modes, peer checks
(C{SO_PEERCRED}, against a real process running as C{nobody}), and the
control endpoint policy; and for the attach socket's worker checks in
L{twisted_postcopy.guests.host}.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols.amp import Box
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.access import (
    DEFAULT_MODE, PeerCredentials, PeerPolicy, SocketPolicy, listenUNIX, ownerPolicy, parseListening,
    parsePeer)
from twisted_postcopy.errors import AccessError, AttachProtocolError
from twisted_postcopy.guests.attach import attach, encodeMessage
from twisted_postcopy.guests.host import AttachAccess, GuestHost
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.service import MigrationService
from twisted_postcopy.tap import Options
from twisted_postcopy.testing.real import missingReal
from tests.test_control_server import FakeManager

SECRET = b"SECRET-GUEST-MEMORY-0001"
STRESS = "twisted_postcopy.guests.stress"
IDLE = ["--working-set", "0"]


def openDirectory(case: Any) -> str:
    """
    A fresh directory every user may traverse (mode 0755), removed after
    the test: only a socket's own mode and peer check then stand between
    another user and the socket.

    @param case: the test case, for the cleanup.
    @return: the directory.
    """
    directory = tempfile.mkdtemp(prefix="pc-access-")
    os.chmod(directory, 0o755)
    case.addCleanup(shutil.rmtree, directory, True)
    return directory


def nobody() -> tuple[int, int]:
    """
    @return: the uid and gid of C{nobody}.
    """
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        missingReal("no 'nobody' user on this machine")
    if os.geteuid() != 0:
        missingReal("running as another user needs root")
    return entry.pw_uid, entry.pw_gid


def asNobody(function: Callable[[], Any]) -> Deferred:
    """
    Run C{function} in a forked child that dropped to C{nobody} (groups,
    gid, uid), and get what it returned (JSON) through a pipe.

    @param function: what the child does; it returns something JSON-able.
    @return: a Deferred firing with that value.
    """
    uid, gid = nobody()
    readEnd, writeEnd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        # Whatever happens, the child never returns into the test runner.
        try:
            try:
                os.close(readEnd)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                result = {"result": function()}
            except BaseException as error:
                result = {"error": repr(error)}
            os.write(writeEnd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(writeEnd)

    def collect() -> Any:
        """
        @return: the child's result, once it exited.
        """
        chunks = []
        while chunk := os.read(readEnd, 65536):
            chunks.append(chunk)
        os.close(readEnd)
        os.waitpid(pid, 0)
        outcome = json.loads(b"".join(chunks))
        if "error" in outcome:
            raise AssertionError(f"child as nobody failed: {outcome['error']}")
        return outcome["result"]

    return deferToThread(collect)


def tryAttach(path: str, worker: str) -> Callable[[], Any]:
    """
    The attack of the finding: connect to an attach socket, say hello as a
    worker, and read the guest's RAM from the memfds the daemon sends.

    @param path: the attach socket.
    @param worker: the worker name to claim.
    @return: a function for L{asNobody} returning C{["connect", errno]},
        C{["read", text]} or C{["refused", bytes received]}.
    """
    def attack() -> Any:
        """
        @return: what happened.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        try:
            sock.connect(path)
        except OSError as error:
            return ["connect", error.errno]
        try:
            sock.sendall(encodeMessage("hello", guest="stress", worker=worker, pid=os.getpid()))
        except OSError as error:
            return ["refused", f"send: {error.errno}"]
        received = b""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 16)
            except OSError as error:
                return ["refused", f"recv: {error.errno} after {received!r}"]
            for fd in fds:
                return ["read", os.pread(fd, 4096, 0).rstrip(b"\0").decode(errors="replace")]
            if not data:
                return ["refused", received.decode(errors="replace")]
            received += data

    return attack


def tryControl(path: str) -> Callable[[], Any]:
    """
    Connect to a control socket as another user and ask C{QueryMigrate}.

    @param path: the control socket.
    @return: a function for L{asNobody} returning C{["connect", errno]},
        C{["answered", bytes]} or C{["closed", bytes]}.
    """
    box = Box({b"_command": b"QueryMigrate", b"_ask": b"1"}).serialize()

    def ask() -> Any:
        """
        @return: what happened.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        try:
            sock.connect(path)
        except OSError as error:
            return ["connect", error.errno]
        received = b""
        try:
            sock.sendall(box)
            while chunk := sock.recv(65536):
                received += chunk
                if received.endswith(b"\0\0"):
                    return ["answered", received.decode(errors="replace")]
        except OSError as error:
            return ["closed", f"{error.errno}: {received!r}"]
        return ["closed", received.decode(errors="replace")]

    return ask


class _Echo(Protocol):
    """
    Answers C{ok} to anything.
    """

    def dataReceived(self, data: bytes) -> None:
        """
        @param data: ignored.
        """
        self.transport.write(b"ok")


class ListenUNIXTests(TestCase):
    """
    Tests for L{listenUNIX}: modes, groups, and peer checks.
    """

    timeout = 60

    def listen(self, policy: SocketPolicy | None = None) -> tuple[str, Any]:
        """
        @param policy: the socket's policy.
        @return: its path and port (stopped at cleanup).
        """
        path = os.path.join(openDirectory(self), "s.sock")
        port = listenUNIX(reactor, path, Factory.forProtocol(_Echo), policy)
        self.addCleanup(port.stopListening)
        return path, port

    def test_mode0600EvenWithUmask0(self) -> None:
        """
        The socket is 0600 whatever the process umask (0 here), and the
        umask is restored.
        """
        previous = os.umask(0)
        try:
            path, _ = self.listen()
            self.assertEqual(os.umask(0), 0)
        finally:
            os.umask(previous)
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), DEFAULT_MODE)

    def test_worldWritableDirectoryRefused(self) -> None:
        """
        A socket directory every user may write, without the sticky bit, is
        refused (another user could swap the socket for a link); a sticky
        one (like C{/tmp}) is accepted.
        """
        directory = openDirectory(self)
        os.chmod(directory, 0o777)
        path = os.path.join(directory, "s.sock")
        error = self.assertRaises(AccessError, listenUNIX, reactor, path, Factory.forProtocol(_Echo))
        self.assertIn("writable by every user", str(error))
        self.assertFalse(os.path.exists(path))
        os.chmod(directory, 0o1777)
        port = listenUNIX(reactor, path, Factory.forProtocol(_Echo))
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_group(self) -> None:
        """
        A group and mode asked for are applied to the socket file.
        """
        gid = os.getegid() if os.geteuid() != 0 else grp.getgrnam("nogroup").gr_gid
        path, _ = self.listen(SocketPolicy(0o660, gid))
        info = os.stat(path)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, gid))

    @inlineCallbacks
    def test_ownerAllowed(self) -> None:
        """
        A peer of the daemon's own user gets the real protocol, which sees
        its credentials.
        """
        path, _ = self.listen()

        def talk() -> bytes:
            """
            @return: the answer.
            """
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                sock.sendall(b"hi")
                return sock.recv(2)

        self.assertEqual((yield deferToThread(talk)), b"ok")

    @inlineCallbacks
    def test_peerRefused(self) -> None:
        """
        A peer the policy does not allow is disconnected without an answer
        and recorded, even when the socket mode lets it connect.
        """
        path, port = self.listen(SocketPolicy(0o666, None, PeerPolicy(uids={12345})))

        def talk() -> bytes:
            """
            @return: everything received.
            """
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                try:
                    sock.sendall(b"hi")
                    return sock.recv(2)
                except (ConnectionResetError, BrokenPipeError):
                    return b""

        self.assertEqual((yield deferToThread(talk)), b"")
        self.assertEqual([peer.pid for peer in port.factory.refused], [os.getpid()])


class PolicyTests(SynchronousTestCase):
    """
    Tests for L{PeerPolicy}, L{parsePeer} and L{parseListening}.
    """

    def test_allows(self) -> None:
        """
        A uid, a pid, or a primary or supplementary group on the list
        allows a peer; nothing else does.
        """
        peer = PeerCredentials(100, 1000, 1000, (27, 44))
        self.assertTrue(PeerPolicy(uids={1000}).allows(peer))
        self.assertTrue(PeerPolicy(pids={100}).allows(peer))
        self.assertTrue(PeerPolicy(gids={44}).allows(peer))
        self.assertTrue(PeerPolicy(gids={1000}).allows(peer))
        self.assertFalse(PeerPolicy(uids={0}, gids={5}, pids={1}).allows(peer))
        self.assertFalse(ownerPolicy().allows(PeerCredentials(1, 65534, 65534)) and os.geteuid() != 65534)

    def test_parsePeer(self) -> None:
        """
        Allow-list entries name uids, users, gids, groups and pids; a bad
        entry is an L{AccessError}.
        """
        self.assertEqual(parsePeer("uid=7"), PeerPolicy(uids={7}))
        self.assertEqual(parsePeer("user=root"), PeerPolicy(uids={0}))
        self.assertEqual(parsePeer("group=root"), PeerPolicy(gids={0}))
        self.assertEqual(parsePeer("pid=9").union(parsePeer("gid=3")), PeerPolicy(gids={3}, pids={9}))
        for bad in ("7", "uid=x", "user=no-such-user-here", "host=a"):
            self.assertRaises(AccessError, parsePeer, bad)

    def test_unix(self) -> None:
        """
        C{unix:} is accepted, with an octal owner-rw mode and a known group.
        """
        self.assertEqual(parseListening("unix:/run/p.sock").args, ("/run/p.sock",))
        self.assertEqual(parseListening("unix:/run/p.sock:mode=660:group=root").options,
                         {"mode": "660", "group": "root"})
        for bad in ("unix:/p:mode=9", "unix:/p:mode=700", "unix:/p:mode=066", "unix:/p:group=no-such-group"):
            self.assertRaises(AccessError, parseListening, bad)

    def test_tcpRefused(self) -> None:
        """
        Plaintext C{tcp:} is refused without C{insecure}, and with it on
        anything but a loopback interface (0.0.0.0 or no interface: every
        interface); each message says what to use.
        """
        error = self.assertRaises(AccessError, parseListening, "tcp:4444:interface=127.0.0.1")
        self.assertIn("--insecure-control", str(error))
        self.assertIn("ssl:", str(error))
        for wide in ("tcp:0.0.0.0:4444", "tcp:4444:interface=0.0.0.0", "tcp:4444", "tcp6:4444:interface=\\:\\:"):
            error = self.assertRaises(AccessError, parseListening, wide, True)
            self.assertIn("loopback", str(error))

    def test_tcpLoopbackInsecure(self) -> None:
        """
        With C{insecure}, plaintext TCP on a loopback address is accepted.
        """
        for loopback in ("tcp:4444:interface=127.0.0.1", "tcp6:4444:interface=\\:\\:1",
                         "tcp:port=0:interface=localhost"):
            self.assertEqual(parseListening(loopback, True).kind, loopback.split(":")[0])

    def test_sslNeedsClientCertificates(self) -> None:
        """
        C{ssl:} without C{caCerts} (so without client certificates) is
        refused; with it, accepted.
        """
        error = self.assertRaises(AccessError, parseListening, "ssl:4444:privateKey=k.pem:certKey=c.pem")
        self.assertIn("caCerts", str(error))
        self.assertEqual(parseListening("ssl:4444:privateKey=k:certKey=c:caCerts=ca").kind, "ssl")

    def test_otherTypesRefused(self) -> None:
        """
        Endpoint types other than unix, ssl and tcp are refused.
        """
        self.assertRaises(AccessError, parseListening, "systemd:domain=INET:index=0")
        self.assertRaises(AccessError, parseListening, "")

    def test_options(self) -> None:
        """
        C{twistd postcopy} refuses a plaintext TCP control endpoint with a
        usage error, and accepts a loopback one with C{--insecure-control}.
        """
        options = Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--control", "tcp:0.0.0.0:4444", "--insecure-control"])
        self.assertIn("loopback", str(error))
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--control", "tcp:4444"])
        options = Options()
        options.parseOptions(["--control", "tcp:4444:interface=127.0.0.1", "--insecure-control",
                              "--attach-allow", "uid=7", "--attach-allow", "group=root"])
        self.assertEqual(options["attach-allow"], [PeerPolicy(uids={7}), PeerPolicy(gids={0})])
        self.assertRaises(usage.UsageError, Options().parseOptions,
                          ["--control", "unix:/p", "--attach-allow", "everyone"])


class DaemonOptionsTests(SynchronousTestCase):
    """
    C{twistd postcopy}'s access options reach the service.
    """

    def test_snapshotRoot(self) -> None:
        """
        C{--snapshot-root} (made absolute) confines the daemon's snapshot
        jobs; a root that is not a directory is a usage error.
        """
        from twisted.internet.testing import MemoryReactorClock

        from twisted_postcopy.tap import makeService

        root = self.mktemp()
        os.mkdir(root)
        options = Options()
        options.parseOptions(["--role", "snapshot", "--control", "unix:/nonexistent/c.sock",
                              "--snapshot-root", root])
        service = makeService(options, MemoryReactorClock())
        self.assertEqual(service.snapshots.root, os.path.abspath(root))
        self.assertRaises(usage.UsageError, Options().parseOptions,
                          ["--control", "unix:/p", "--snapshot-root", "/nonexistent/root"])

    def test_attachAccess(self) -> None:
        """
        C{--attach-allow} entries and C{--attach-group} make the guest's
        L{AttachAccess}.
        """
        from twisted_postcopy.tap import attachAccess

        options = Options()
        options.parseOptions(["--control", "unix:/p", "--attach-allow", "uid=7", "--attach-allow", "pid=9",
                              "--attach-group", "root"])
        self.assertEqual(attachAccess(options), AttachAccess(PeerPolicy(uids={7}, pids={9}), 0, 0o660))
        options = Options()
        options.parseOptions(["--control", "unix:/p"])
        self.assertEqual(attachAccess(options), AttachAccess())


class ControlSocketTests(TestCase):
    """
    The daemon's control socket against another local user.
    """

    timeout = 60

    def startService(self, control: str) -> MigrationService:
        """
        @param control: the control endpoint.
        @return: a started service (stopped at cleanup).
        """
        manager = FakeManager()
        manager.info = {"status": "none"}
        service = MigrationService(reactor, manager, control)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @inlineCallbacks
    def test_nobodyRefused(self) -> None:
        """
        The control socket is 0600: C{nobody} cannot connect.  With the
        mode widened to 0666, it connects and is cut off unanswered by the
        peer check; the daemon's own user is answered.
        """
        path = os.path.join(openDirectory(self), "control.sock")
        self.startService("unix:" + path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        outcome = yield asNobody(tryControl(path))
        self.assertEqual(outcome, ["connect", 13])
        wide = os.path.join(openDirectory(self), "wide.sock")
        self.startService(f"unix:{wide}:mode=666")
        self.assertEqual(stat.S_IMODE(os.stat(wide).st_mode), 0o666)
        outcome = yield asNobody(tryControl(wide))
        self.assertEqual(outcome[0], "closed")
        self.assertNotIn("status", outcome[1])
        answer = yield deferToThread(tryControl(wide))
        self.assertEqual(answer[0], "answered")
        self.assertIn("status", answer[1])

    @inlineCallbacks
    def test_groupAllowed(self) -> None:
        """
        C{unix:PATH:group=NAME} makes the socket 0660 with that group, and a
        member of the group (here C{nobody}, whose group it is) is answered.
        """
        _, gid = nobody()
        path = os.path.join(openDirectory(self), "group.sock")
        self.startService(f"unix:{path}:group={gid}")
        info = os.stat(path)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, gid))
        outcome = yield asNobody(tryControl(path))
        self.assertEqual(outcome[0], "answered")
        self.assertIn("status", outcome[1])

    @inlineCallbacks
    def test_lockfileReplacesStaleSocket(self) -> None:
        """
        With C{lockfile=1} a stale socket left by a dead daemon (its lock
        names a pid that is gone) is replaced, and the new one is 0600.
        """
        path = os.path.join(openDirectory(self), "stale.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        dead = os.fork()
        if dead == 0:  # pragma: no cover (the child)
            os._exit(0)
        os.waitpid(dead, 0)
        os.symlink(str(dead), path + ".lock")
        self.startService(f"unix:{path}:lockfile=1")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        answer = yield deferToThread(tryControl(path))
        self.assertEqual(answer[0], "answered")

    def test_tcpRefusedByService(self) -> None:
        """
        The service itself refuses a plaintext TCP control endpoint (not
        only the command line).
        """
        self.assertRaises(AccessError, MigrationService, reactor, FakeManager(), "tcp:0")

    @inlineCallbacks
    def test_insecureLoopback(self) -> None:
        """
        With C{insecureControl}, plaintext TCP on loopback listens and
        answers, and a warning is logged.
        """
        from twisted.logger import globalLogPublisher

        from twisted_postcopy.control.client import connectControl

        warnings: list[dict] = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        manager = FakeManager()
        manager.info = {"status": "none"}
        service = MigrationService(reactor, manager, "tcp:0:interface=127.0.0.1", insecureControl=True)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.controlService._waitingForPort.result
        client = yield connectControl(reactor, f"tcp:127.0.0.1:{port.getHost().port}")
        self.addCleanup(client.transport.loseConnection)
        info = yield Deferred.fromCoroutine(client.queryMigrate())
        self.assertEqual(info, {"status": "none"})
        self.assertTrue(any("--insecure-control" in str(event.get("log_format", "")) for event in warnings))


class AttachSocketTests(TestCase):
    """
    The attach socket against another local user and against clients
    taking a spawned worker's name.
    """

    timeout = 60

    def makeHost(self, access: AttachAccess | None = None) -> GuestHost:
        """
        @param access: the socket's access.
        @return: a C{plain} host whose one block starts with L{SECRET}.
        """
        block = RAMBlock("pc.ram", 1 << 20)
        self.addCleanup(block.close)
        os.pwrite(block.fd, SECRET, 0)
        path = os.path.join(openDirectory(self), "attach.sock")
        host = GuestHost(reactor, path, [block], "plain", access=access)
        self.addCleanup(host.kill)
        return host

    @inlineCallbacks
    def test_nobodyCannotReadGuestMemory(self) -> None:
        """
        The attach socket is 0600: C{nobody} cannot connect.  With its mode
        widened to 0666, C{nobody} connects but is not a spawned worker: it
        is cut off before any memfd is sent.
        """
        host = self.makeHost()
        self.assertEqual(stat.S_IMODE(os.stat(host.socketPath).st_mode), 0o600)
        outcome = yield asNobody(tryAttach(host.socketPath, "stress-0"))
        self.assertEqual(outcome, ["connect", 13])
        wide = self.makeHost(AttachAccess(mode=0o666))
        self.assertEqual(stat.S_IMODE(os.stat(wide.socketPath).st_mode), 0o666)
        outcome = yield asNobody(tryAttach(wide.socketPath, "stress-0"))
        self.assertEqual(outcome[0], "refused")
        self.assertNotIn(SECRET.decode(), json.dumps(outcome))
        self.assertEqual(wide.workers, {})

    @inlineCallbacks
    def test_allowListedUser(self) -> None:
        """
        A user on the external allow list may attach (and so read the
        guest's memory, as an external guest must).
        """
        uid, _ = nobody()
        host = self.makeHost(AttachAccess(PeerPolicy(uids={uid}), mode=0o666))
        outcome = yield asNobody(tryAttach(host.socketPath, "external-0"))
        self.assertEqual(outcome, ["read", SECRET.decode()])

    @inlineCallbacks
    def test_spawnedWorkersAttach(self) -> None:
        """
        Workers the host spawned attach with no allow list.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 2, IDLE)
        workers = yield host.whenAttached()
        self.assertEqual(sorted(workers), ["stress-0", "stress-1"])
        self.assertEqual({w.pid: name for name, w in workers.items()}, host.spawnedPids())

    @inlineCallbacks
    def test_nameTakenBeforeWorker(self) -> None:
        """
        A client (allowed as an external guest) cannot take a spawned
        worker's name, whether the worker attached already or not; the
        worker attaches under it.
        """
        host = self.makeHost(AttachAccess(PeerPolicy(pids={os.getpid()})))
        host.spawn(STRESS, "stress", 1, IDLE)
        try:
            yield deferToThread(attach, host.socketPath, "stress", "stress-0")
        except AttachProtocolError as error:
            self.assertTrue("belongs to a worker process" in str(error) or "already attached" in str(error),
                            str(error))
        else:
            self.fail("a client took stress-0")
        workers = yield host.whenAttached()
        self.assertEqual(workers["stress-0"].pid, host.processes["stress-0"].transport.pid)

    @inlineCallbacks
    def test_pidLie(self) -> None:
        """
        A C{hello} whose pid is not the connection's is refused.
        """
        host = self.makeHost(AttachAccess(PeerPolicy(pids={os.getpid()})))

        def lie() -> str:
            """
            @return: the daemon's answer.
            """
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(host.socketPath)
                sock.sendall(encodeMessage("hello", guest="g", worker="g-0", pid=1))
                return sock.recv(4096)[4:].decode()

        answer = yield deferToThread(lie)
        self.assertIn("hello says pid 1, the connection is from pid", answer)

    @inlineCallbacks
    def test_workerCannotRename(self) -> None:
        """
        A spawned worker's process may only attach under its own name: a
        peer check on the host tells its pid from others.
        """
        host = self.makeHost()
        host.spawn(STRESS, "stress", 1, IDLE)
        yield host.whenAttached()
        pid = host.processes["stress-0"].transport.pid
        peer = PeerCredentials(pid, 0, 0)
        error = self.assertRaises(AttachProtocolError, host.checkHello, peer, "stress-9", pid)
        self.assertIn("spawned as worker stress-0", str(error))


def makeCertificates(directory: str) -> dict[str, str]:
    """
    A test CA with a server and a client certificate, and a client
    certificate from another CA, made with C{openssl} (EC P-256 keys).

    @param directory: where to write them.
    @return: name -> path: C{ca}, C{server.key}, C{server.pem},
        C{client.key}, C{client.pem}, C{stranger.key}, C{stranger.pem},
        and C{trust}: a directory holding only C{ca.pem}.
    """
    import subprocess

    if shutil.which("openssl") is None:
        missingReal("openssl is needed to make test certificates (apt-get install openssl)")

    def run(*arguments: str) -> None:
        """
        @param arguments: an openssl command.
        """
        subprocess.run(["openssl", *arguments], cwd=directory, check=True, capture_output=True)

    newKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other"):
        run("req", "-x509", *newKey, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=postcopy test {ca}")
    for name, ca in (("server", "ca"), ("client", "ca"), ("stranger", "other")):
        run("req", *newKey, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2")
    trust = os.path.join(directory, "trust")
    os.mkdir(trust)
    shutil.copy(os.path.join(directory, "ca.pem"), trust)
    paths = {name: os.path.join(directory, name) for name in os.listdir(directory)}
    paths["ca"] = paths["ca.pem"]
    paths["trust"] = trust
    return paths


class SSLControlTests(TestCase):
    """
    An C{ssl:} control endpoint takes only clients with a certificate of
    its CA.
    """

    timeout = 60

    @inlineCallbacks
    def test_clientCertificates(self) -> None:
        """
        A client with a certificate of the control CA is answered; one
        without a certificate, or with one of another CA, is refused.
        """
        from twisted_postcopy.control.client import connectControl

        files = makeCertificates(openDirectory(self))
        manager = FakeManager()
        manager.info = {"status": "none"}
        service = MigrationService(
            reactor, manager, f"ssl:0:interface=127.0.0.1:privateKey={files['server.key']}:"
            f"certKey={files['server.pem']}:caCerts={files['ca']}")
        service.startService()
        self.addCleanup(service.stopService)
        port = service.controlService._waitingForPort.result.getHost().port

        @inlineCallbacks
        def ask(client: str) -> Any:
            """
            @param client: the client's key and certificate options.
            @return: query-migrate's answer, or the failure's class name.
            """
            try:
                connection = yield connectControl(
                    reactor, f"ssl:host=127.0.0.1:port={port}:caCertsDir={files['trust']}{client}")
            except Exception as error:
                return type(error).__name__
            try:
                return (yield Deferred.fromCoroutine(connection.queryMigrate()))
            except Exception as error:
                return type(error).__name__
            finally:
                connection.transport.loseConnection()

        good = f":privateKey={files['client.key']}:certKey={files['client.pem']}"
        stranger = f":privateKey={files['stranger.key']}:certKey={files['stranger.pem']}"
        self.assertEqual((yield ask(good)), {"status": "none"})
        self.assertNotIsInstance((yield ask("")), dict)
        self.assertNotIsInstance((yield ask(stranger)), dict)

    def test_unreadableFiles(self) -> None:
        """
        Missing key or CA files are an L{AccessError} naming the endpoint.
        """
        error = self.assertRaises(AccessError, MigrationService, reactor, FakeManager(),
                                  "ssl:0:privateKey=/nonexistent/k:certKey=/nonexistent/c:caCerts=/nonexistent/ca")
        self.assertIn("/nonexistent", str(error))


class OnePlaceTests(SynchronousTestCase):
    """
    The access policy lives in one place: every listening Unix or control
    endpoint of the daemon goes through L{twisted_postcopy.access}.
    """

    def test_noOtherListeners(self) -> None:
        """
        No module of the package but C{access.py} (and the test helpers in
        C{testing/}) calls C{reactor.listenUNIX}, C{serverFromString} or
        C{UNIXServerEndpoint}: a new listening endpoint (a QMP socket, a
        metrics endpoint) must use L{twisted_postcopy.access.listenUNIX} or
        L{twisted_postcopy.access.listeningEndpoint}.  The one other
        module naming C{listenUNIX} is C{protocols/receive.py}: its
        L{twisted_postcopy.protocols.receive.BufferedListening} is the
        reactor that L{twisted_postcopy.access.listenUNIX} listens through
        for migration sockets, and nothing else calls it
        (L{test_bufferedListeningOnlyThroughAccess}).
        """
        import re

        import twisted_postcopy

        package = os.path.dirname(twisted_postcopy.__file__)
        pattern = re.compile(r"\.listenUNIX\(|serverFromString\(|UNIXServerEndpoint\(")
        offenders = []
        for directory, subdirectories, files in os.walk(package):
            subdirectories[:] = [d for d in subdirectories if d not in ("testing", "__pycache__")]
            for name in files:
                path = os.path.join(directory, name)
                allowed = (os.path.join(package, "access.py"), os.path.join(package, "protocols", "receive.py"))
                if name.endswith(".py") and path not in allowed:
                    with open(path) as f:
                        offenders += [f"{os.path.relpath(path, package)}:{number}: {line.strip()}"
                                      for number, line in enumerate(f, 1) if pattern.search(line)]
        self.assertEqual(offenders, [], "listen through twisted_postcopy.access.listeningEndpoint "
                                        "(an operator's endpoint description) or access.listenUNIX")


    def test_bufferedListeningOnlyThroughAccess(self) -> None:
        """
        The package builds a
        L{twisted_postcopy.protocols.receive.BufferedListening} only to
        hand it to a server endpoint: for Unix sockets that is
        L{twisted_postcopy.access.UNIXAccessEndpoint} (so its
        C{listenUNIX} runs inside L{twisted_postcopy.access.listenUNIX}).
        """
        import twisted_postcopy

        package = os.path.dirname(twisted_postcopy.__file__)
        uses = []
        for directory, subdirectories, files in os.walk(package):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(directory, name)) as f:
                        uses += [line.strip() for line in f if "BufferedListening(reactor)" in line]
        self.assertEqual(sorted(uses), sorted([
            'return UNIXAccessEndpoint(BufferedListening(reactor), where, SocketPolicy(what="migration socket"))',
            "return TCP4ServerEndpoint(BufferedListening(reactor), port, interface=where)"]))


class RealDaemonTests(TestCase):
    """
    A real C{twistd postcopy} source daemon with a running stress guest,
    against C{nobody}: the production path (options, service, guest, host).
    """

    timeout = 120

    @inlineCallbacks
    def test_nobodyLockedOut(self) -> Any:
        """
        The daemon's spawned workers attach and run through the peer check;
        its control and attach sockets are 0600 and C{nobody} can connect to
        neither (in a directory it may traverse).
        """
        from pathlib import Path

        from twisted_postcopy.control.daemon import startDaemon
        from twisted_postcopy.demo import waitForGuest

        nobody()
        workdir = Path(openDirectory(self))
        daemon = yield Deferred.fromCoroutine(startDaemon(
            reactor, "source", workdir, ["--role", "source", "--guest", "stress", "--ram", "8M",
                                         "--workers", "2"]))
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop(reactor)))
        yield Deferred.fromCoroutine(waitForGuest(reactor, daemon, reactor.seconds() + 60))
        control = str(workdir / "source.sock")
        attachPath = control + ".attach"
        for path in (control, attachPath):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        self.assertEqual((yield asNobody(tryControl(control))), ["connect", 13])
        self.assertEqual((yield asNobody(tryAttach(attachPath, "stress-0"))), ["connect", 13])
        info = yield Deferred.fromCoroutine(daemon.client.queryGuest())
        self.assertTrue(info["running"])
