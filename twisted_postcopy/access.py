# -*- test-case-name: tests.test_access -*-
"""
Who may reach the daemon: the one place every listening endpoint of the
daemon goes through (see C{docs/security.md}).

Unix sockets (the control socket, the guest attach socket, a QMP socket,
a migration socket) are created by L{listenUNIX}: mode 0600 from the
moment they exist (the bind happens under a restrictive umask, so there is
no window with a wider mode), then widened to the mode and group an
operator asked for.  Each accepted connection is checked with
C{SO_PEERCRED} against a peer policy (an object with an C{allows} method
taking L{PeerCredentials}) before any protocol is built; a refused peer is
logged and disconnected without a byte read.

Control endpoints, and every other endpoint an operator names for the
daemon to listen on, are parsed by L{parseListening}: C{unix:} is accepted
(owner-only by default), C{ssl:} only with C{caCerts=} so every client
presents a certificate from that CA, plaintext C{tcp:} only on a loopback
interface and only with C{insecure=True} (the C{--insecure-control}
flag), and anything else is refused with a message saying what to use.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import stat
import struct
from typing import Any, Iterable, Protocol as TypingProtocol

from attrs import field, frozen
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twisted_postcopy.errors import AccessError, MigrationError

__all__ = [
    "PeerCredentials", "PeerPolicy", "SocketPolicy", "EndpointSpec", "UNIXAccessEndpoint",
    "peerCredentials", "ownerPolicy", "listenUNIX", "parseListening", "listeningEndpoint",
    "parsePeer", "parseGroup", "DEFAULT_MODE",
]

_log = Logger()

#: The mode of every Unix socket the daemon creates unless asked otherwise.
DEFAULT_MODE = 0o600

#: The umask in effect while a socket is bound: only the owner's rw bits.
_BIND_UMASK = 0o177

_PEERCRED = struct.Struct("3i")

#: Linux's C{SO_PEERGROUPS} (4.13+), missing from the C{socket} module.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@frozen
class PeerCredentials:
    """
    Who is at the other end of a Unix socket, as the kernel recorded it
    at C{connect()} (C{SO_PEERCRED}), plus its supplementary groups.

    @ivar pid: its process id.
    @ivar uid: its effective user id.
    @ivar gid: its effective group id.
    @ivar groups: its supplementary group ids.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        """
        @return: C{pid N uid N gid N}.
        """
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def peerCredentials(sock: socket.socket) -> PeerCredentials:
    """
    @param sock: a connected Unix socket.
    @return: its peer's credentials.
    @raise OSError: not a Unix socket.
    """
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4])
    except OSError:
        groups = _procGroups(pid)
    return PeerCredentials(pid, uid, gid, tuple(groups))


def _procGroups(pid: int) -> tuple[int, ...]:
    """
    Supplementary groups of a process from C{/proc} (more than
    C{SO_PEERGROUPS} fits in one call).

    @param pid: the process.
    @return: its groups, or none if it is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


class PeerChecker(TypingProtocol):
    """
    What a socket's peer policy is: anything with C{allows} and
    C{describe}.
    """

    def allows(self, peer: PeerCredentials) -> bool:
        """
        @param peer: a connected peer.
        @return: whether it may talk to the daemon.
        """

    def describe(self) -> str:
        """
        @return: who is allowed, for log messages.
        """


@frozen
class PeerPolicy:
    """
    A fixed allow list: a peer is allowed when its uid, its pid, or any of
    its groups (primary or supplementary) is listed.

    @ivar uids: allowed user ids.
    @ivar gids: allowed group ids.
    @ivar pids: allowed process ids.
    """

    uids: frozenset[int] = field(default=frozenset(), converter=frozenset)
    gids: frozenset[int] = field(default=frozenset(), converter=frozenset)
    pids: frozenset[int] = field(default=frozenset(), converter=frozenset)

    def allows(self, peer: PeerCredentials) -> bool:
        """
        @param peer: a connected peer.
        @return: whether a listed uid, pid or group matches.
        """
        return (peer.uid in self.uids or peer.pid in self.pids
                or bool(self.gids.intersection((peer.gid, *peer.groups))))

    def union(self, other: PeerPolicy) -> PeerPolicy:
        """
        @param other: another allow list.
        @return: one allowing both's peers.
        """
        return PeerPolicy(self.uids | other.uids, self.gids | other.gids, self.pids | other.pids)

    def describe(self) -> str:
        """
        @return: e.g. C{uid 0, 1000; gid 27}.
        """
        parts = [f"{what} {', '.join(map(str, sorted(ids)))}"
                 for what, ids in (("uid", self.uids), ("gid", self.gids), ("pid", self.pids)) if ids]
        return "; ".join(parts) or "nobody"


def ownerPolicy(gids: Iterable[int] = ()) -> PeerPolicy:
    """
    The policy of the control socket: root, the daemon's own user, and
    members of the groups given.

    @param gids: groups an operator allowed.
    @return: the policy.
    """
    return PeerPolicy({0, os.geteuid()}, gids)


def parseGroup(name: str) -> int:
    """
    @param name: a group name or a numeric gid.
    @return: the gid.
    @raise AccessError: no such group.
    """
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AccessError(f"unknown group {name!r}") from None


def parsePeer(text: str) -> PeerPolicy:
    """
    Parse one entry of an allow list: C{uid=N}, C{user=NAME}, C{gid=N},
    C{group=NAME} or C{pid=N}.

    @param text: the entry.
    @return: a policy allowing just that.
    @raise AccessError: malformed, or an unknown user or group.
    """
    kind, sep, value = text.partition("=")
    try:
        if sep and kind == "uid":
            return PeerPolicy(uids={int(value)})
        if sep and kind == "user":
            return PeerPolicy(uids={int(value) if value.isdigit() else pwd.getpwnam(value).pw_uid})
        if sep and kind in ("gid", "group"):
            return PeerPolicy(gids={parseGroup(value)})
        if sep and kind == "pid":
            return PeerPolicy(pids={int(value)})
    except (ValueError, KeyError):
        raise AccessError(f"bad allow entry {text!r}: unknown user or not a number") from None
    raise AccessError(f"bad allow entry {text!r}: expected uid=N, user=NAME, gid=N, group=NAME or pid=N")


@frozen
class SocketPolicy:
    """
    How one Unix socket is created and who may connect.

    @ivar mode: the socket file's mode (default L{DEFAULT_MODE}).
    @ivar group: the socket file's group id, or L{None} to keep the
        daemon's.
    @ivar peers: who may connect (a L{PeerPolicy} or any object with
        C{allows} and C{describe}).
    @ivar what: what the socket is, for log messages.
    """

    mode: int = DEFAULT_MODE
    group: int | None = None
    peers: Any = field(factory=ownerPolicy)
    what: str = "unix socket"


class _PeerCheck(Protocol):
    """
    Stands in for a connection's protocol until its peer is checked: an
    allowed peer gets the real protocol (built only then, and put in the
    transport's place so it sees the transport directly, descriptor
    passing included); a refused one is logged and cut off.
    """

    def __init__(self, factory: _PeerCheckingFactory, addr: Any) -> None:
        """
        @param factory: the checking factory.
        @param addr: the peer address for the real factory.
        """
        self.checking, self.addr = factory, addr

    def makeConnection(self, transport: Any) -> None:
        """
        Check the peer, then hand over or drop the connection.

        @param transport: the accepted connection.
        """
        self.transport = transport
        policy = self.checking.policy
        try:
            peer = peerCredentials(transport.getHandle())
        except OSError as error:
            _log.warn("{what}: refused a connection: no peer credentials ({error})",
                      what=policy.what, error=error)
            transport.abortConnection()
            return
        if not policy.peers.allows(peer):
            _log.warn("{what}: refused a connection from {peer} (allowed: {allowed})",
                      what=policy.what, peer=str(peer), allowed=policy.peers.describe())
            self.checking.refused.append(peer)
            transport.abortConnection()
            return
        try:
            protocol = self.checking.wrapped.buildProtocol(self.addr)
        except Exception:
            _log.failure("{what}: building the protocol of {peer} failed", what=policy.what, peer=str(peer))
            protocol = None
        if protocol is None:
            transport.abortConnection()
            return
        protocol.peer = peer
        transport.protocol = protocol
        if isinstance(getattr(transport, "logstr", None), str):
            transport.logstr = transport.logstr.replace(type(self).__name__, type(protocol).__name__, 1)
        protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes of a refused peer are dropped.

        @param data: ignored.
        """


class _PeerCheckingFactory(Factory):
    """
    Wraps a factory: every connection is checked before its protocol is
    built.

    @ivar wrapped: the real factory.
    @ivar policy: the L{SocketPolicy}.
    @ivar refused: credentials of the peers refused so far (for tests
        and logs).
    """

    def __init__(self, wrapped: Any, policy: SocketPolicy) -> None:
        """
        @param wrapped: the real factory.
        @param policy: the socket's policy.
        """
        self.wrapped, self.policy = wrapped, policy
        self.refused: list[PeerCredentials] = []

    def doStart(self) -> None:
        """
        Start the real factory too.
        """
        self.wrapped.doStart()

    def doStop(self) -> None:
        """
        Stop the real factory too.
        """
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> _PeerCheck:
        """
        @param addr: the peer address.
        @return: the checking stand-in.
        """
        return _PeerCheck(self, addr)


def _checkDirectory(path: str, what: str) -> None:
    """
    Refuse a socket directory every user can write without the sticky bit
    (anyone could then replace the socket, or a link put in its place
    could redirect the mode change); warn when only its group can.

    @param path: the socket path.
    @param what: what it is.
    @raise AccessError: the directory is world-writable and not sticky.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError:
        return
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise AccessError(f"{what} {path}: its directory {directory} is writable by every user "
                          "(and not sticky); put daemon sockets in a directory only the daemon's "
                          "user can write")
    if info.st_mode & stat.S_IWGRP and not info.st_mode & stat.S_ISVTX:
        _log.warn("{what} {path}: its directory {directory} is writable by its group; "
                  "put daemon sockets in a directory only the daemon's user can write",
                  what=what, path=path, directory=directory)


def _widen(path: str, policy: SocketPolicy) -> None:
    """
    Give a freshly bound socket file its policy's group and mode, through
    an C{O_PATH|O_NOFOLLOW} descriptor (a file swapped in meanwhile is
    never touched).

    @param path: the socket file.
    @param policy: its policy.
    @raise AccessError: the path is no longer a socket.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise AccessError(f"{path}: replaced by a non-socket while it was being created")
        proc = f"/proc/self/fd/{fd}"
        if policy.group is not None:
            os.chown(proc, -1, policy.group)
        if policy.mode != DEFAULT_MODE:
            os.chmod(proc, policy.mode)
    finally:
        os.close(fd)


def listenUNIX(reactor: Any, path: str, factory: Any, policy: SocketPolicy | None = None,
               backlog: int = 50, lockfile: bool = False) -> Any:
    """
    Listen on a Unix socket created race-free with the policy's mode and
    group, checking every peer against the policy before a protocol is
    built.

    @param reactor: an C{IReactorUNIX}.
    @param path: the socket path (or an abstract name starting with NUL).
    @param factory: the factory of allowed connections' protocols (a
        protocol gets the peer's L{PeerCredentials} as C{peer}).
    @param policy: the L{SocketPolicy} (default: 0600, owner only).
    @param backlog: the listen backlog.
    @param lockfile: use a C{PATH.lock} lock file, so a stale socket left
        by a dead daemon is replaced (Twisted's C{lockfile=1}).
    @return: the listening port.
    @raise AccessError: the socket's directory is world-writable without
        the sticky bit.
    """
    policy = SocketPolicy() if policy is None else policy
    inFilesystem = not path.startswith("\0")
    if inFilesystem:
        _checkDirectory(path, policy.what)
    checking = _PeerCheckingFactory(factory, policy)
    previous = os.umask(_BIND_UMASK)
    try:
        port = reactor.listenUNIX(path, checking, backlog, mode=DEFAULT_MODE, wantPID=lockfile)
    finally:
        os.umask(previous)
    if inFilesystem and (policy.group is not None or policy.mode != DEFAULT_MODE):
        try:
            _widen(path, policy)
        except BaseException:
            port.stopListening()
            raise
    port.accessPolicy = policy
    return port


@implementer(IStreamServerEndpoint)
@frozen
class UNIXAccessEndpoint:
    """
    A stream server endpoint listening through L{listenUNIX}.

    @ivar reactor: the reactor.
    @ivar path: the socket path.
    @ivar policy: its L{SocketPolicy}.
    @ivar backlog: the listen backlog.
    @ivar lockfile: replace a stale socket, guarded by a lock file.
    """

    reactor: Any
    path: str
    policy: SocketPolicy = field(factory=SocketPolicy)
    backlog: int = 50
    lockfile: bool = False

    def listen(self, factory: Any) -> Any:
        """
        @param factory: the protocol factory.
        @return: a Deferred firing with the port.
        """
        from twisted.internet.defer import execute

        return execute(listenUNIX, self.reactor, self.path, factory, self.policy, self.backlog,
                       self.lockfile)


@frozen
class EndpointSpec:
    """
    A checked listening endpoint description.

    @ivar kind: C{unix}, C{ssl} or C{tcp}.
    @ivar args: positional parts (the path, or the port).
    @ivar options: the C{key=value} parts.
    @ivar description: the original text.
    """

    kind: str
    args: tuple[str, ...]
    options: dict[str, str]
    description: str


def _splitDescription(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint description as Twisted does (C{:} separates,
    C{\\} escapes).

    @param description: e.g. C{unix:/run/p.sock:mode=660}.
    @return: its type, positional parts and options.
    """
    from twisted.internet.endpoints import _parse

    args, options = _parse(description)
    kind = str(args.pop(0)).lower() if args else ""
    return kind, [str(a) for a in args], {str(k): str(v) for k, v in options.items()}


def _isLoopback(interface: str) -> bool:
    """
    @param interface: an address.
    @return: whether it is a loopback address.
    """
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return interface == "localhost"


def parseListening(description: str, insecure: bool = False, what: str = "control endpoint") -> EndpointSpec:
    """
    Check a listening endpoint description (the control endpoint, or
    another one an operator names) against the daemon's policy.

    @param description: C{unix:PATH[:mode=OCTAL][:group=NAME][:lockfile=1]},
        C{ssl:PORT:privateKey=KEY:certKey=CERT:caCerts=CA[:interface=ADDR]},
        or C{tcp:PORT:interface=LOOPBACK} with C{insecure}.
    @param insecure: plaintext TCP on a loopback interface was explicitly
        allowed (C{--insecure-control}).
    @param what: what the endpoint is, for messages.
    @return: the checked description.
    @raise AccessError: the description is not allowed, saying why and
        what to use instead.
    """
    kind, args, options = _splitDescription(description)
    if kind == "unix":
        if not args and "address" not in options:
            raise AccessError(f"{what} {description!r}: no socket path")
        if "mode" in options:
            _mode(options["mode"])
        if "group" in options:
            parseGroup(options["group"])
        for number in ("backlog", "lockfile"):
            if not options.get(number, "0").isdigit():
                raise AccessError(f"{what} {description!r}: {number} must be a number")
        return EndpointSpec(kind, tuple(args), options, description)
    if kind == "ssl":
        if not options.get("caCerts"):
            raise AccessError(
                f"{what} {description!r}: ssl: control needs caCerts=CA.pem, the CA "
                "whose certificates clients must present (nothing off-host is accepted "
                "without client authentication)")
        return EndpointSpec(kind, tuple(args), options, description)
    if kind in ("tcp", "tcp6"):
        interface = options.get("interface", "")
        if not insecure:
            raise AccessError(
                f"{what} {description!r}: plaintext TCP control is refused (anyone who "
                "can connect controls the daemon); use unix:PATH, or ssl:PORT:privateKey=KEY:"
                "certKey=CERT:caCerts=CA for remote control with client certificates, or "
                "--insecure-control with interface=127.0.0.1 for a loopback-only test setup")
        if not _isLoopback(interface):
            raise AccessError(
                f"{what} {description!r}: --insecure-control allows plaintext TCP only "
                f"on a loopback interface (interface=127.0.0.1 or ::1), not "
                f"{interface or 'every interface'}; use ssl: with caCerts= for remote control")
        return EndpointSpec(kind, tuple(args), options, description)
    raise AccessError(f"{what} {description!r}: type {kind or '(none)'} is not allowed; "
                      "use unix:PATH, ssl:...:caCerts=CA, or tcp: on loopback with "
                      "--insecure-control")


def _mode(text: str) -> int:
    """
    @param text: an octal mode (C{600}, C{0660}).
    @return: the mode.
    @raise AccessError: not an octal mode of rw bits.
    """
    try:
        mode = int(text, 8)
    except ValueError:
        raise AccessError(f"socket mode {text!r} is not octal") from None
    if mode & ~0o666 or (mode & 0o600) != 0o600:
        raise AccessError(f"socket mode {text!r}: only read/write bits, owner rw included")
    return mode


def unixPolicy(options: dict[str, str], what: str) -> SocketPolicy:
    """
    The policy of a C{unix:} description's options: C{mode} (default 600,
    660 when a group is given) and C{group} (whose members may then
    connect).

    @param options: the description's options.
    @param what: what the socket is.
    @return: the policy.
    """
    gid = parseGroup(options["group"]) if "group" in options else None
    default = 0o660 if gid is not None else DEFAULT_MODE
    mode = _mode(options["mode"]) if "mode" in options else default
    return SocketPolicy(mode, gid, ownerPolicy(() if gid is None else (gid,)), what)


def _sslEndpoint(reactor: Any, spec: EndpointSpec) -> Any:
    """
    An SSL server endpoint requiring a client certificate from C{caCerts}.

    @param reactor: the reactor.
    @param spec: a checked C{ssl:} description.
    @return: the endpoint.
    @raise AccessError: pyOpenSSL missing or the files unreadable.
    """
    try:
        from twisted.internet.endpoints import SSL4ServerEndpoint
        from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
    except ImportError as error:  # pragma: no cover (pyOpenSSL is a dependency)
        raise AccessError(f"ssl: control needs pyOpenSSL: {error}") from None
    options = dict(spec.options)
    port = int(spec.args[0] if spec.args else options.pop("port"))
    key = options.get("privateKey", "server.pem")
    try:
        with open(options.get("certKey", key), "rb") as f:
            certificate = f.read()
        with open(key, "rb") as f:
            privateKey = f.read()
        with open(options["caCerts"], "rb") as f:
            authority = Certificate.loadPEM(f.read())
        server = PrivateCertificate.loadPEM(certificate + b"\n" + privateKey)
    except Exception as error:
        raise AccessError(f"{spec.description!r}: {error}") from None
    context = CertificateOptions(privateKey=server.privateKey.original, certificate=server.original,
                                 verify=True, caCerts=[authority.original], requireCertificate=True)
    return SSL4ServerEndpoint(reactor, port, context, int(options.get("backlog", 50)),
                              options.get("interface", ""))


def listeningEndpoint(reactor: Any, description: str, insecure: bool = False,
                      what: str = "control endpoint") -> Any:
    """
    The server endpoint of a listening endpoint description an operator
    gave (the control endpoint, and every other one: a QMP or metrics
    endpoint), checked by L{parseListening}, so the same rules apply to
    all of them.

    @param reactor: the reactor.
    @param description: the endpoint description.
    @param insecure: C{--insecure-control} was given (a warning is
        logged when it is used).
    @param what: what the endpoint is, for messages.
    @return: an C{IStreamServerEndpoint}.
    @raise AccessError: the description is refused.
    """
    spec = parseListening(description, insecure, what)
    if spec.kind == "unix":
        path = spec.args[0] if spec.args else spec.options["address"]
        return UNIXAccessEndpoint(reactor, path, unixPolicy(spec.options, what),
                                  int(spec.options.get("backlog", 50)),
                                  bool(int(spec.options.get("lockfile", 0))))
    if spec.kind == "ssl":
        return _sslEndpoint(reactor, spec)
    from twisted.internet.endpoints import serverFromString

    _log.warn("{what} {description}: plaintext TCP allowed by --insecure-control: any local "
              "user can connect to it", what=what, description=description)
    return serverFromString(reactor, description)



#: The daemon option that allows plaintext migration listeners off the host.
INSECURE_MIGRATION = "--insecure-migration"


def _migrationHost(uri: str) -> str | None:
    """
    @param uri: a migration URI.
    @return: the host of a C{tcp:} URI, L{None} for any other.
    """
    kind, _, rest = uri.partition(":")
    if kind != "tcp":
        return None
    return rest.rpartition(":")[0].strip("[]")


def checkMigrationListener(uri: str, tls: Any, insecure: bool, what: str = "migrate-incoming") -> None:
    """
    The rule for migration listeners (C{migrate-incoming},
    C{migrate-recover}, C{snapshot-capture}): nothing accepts a migration
    from off the host without TLS and authentication.  A C{tcp:} URI on a
    non-loopback address (or every address) needs C{tls-creds} naming
    server credentials with C{verify-peer} on (the client must present a
    certificate from the credentials' CA; C{tls-authz} narrows it to one
    name), unless the operator started the daemon with
    C{--insecure-migration} (then a warning is logged).

    @param uri: the URI to listen on.
    @param tls: the destination's L{twisted_postcopy.tlscreds.TLSPolicy},
        or L{None} for plaintext.
    @param insecure: C{--insecure-migration} was given.
    @param what: the command, for messages.
    @raise MigrationError: the listener is refused.
    """
    host = _migrationHost(uri)
    if host is None or _isLoopback(host):
        return
    if tls is not None and tls.creds.verifyPeer:
        return
    if insecure:
        _log.warn("{what} {uri}: a migration from off this host is accepted without TLS "
                  "authentication ({option})", what=what, uri=uri, option=INSECURE_MIGRATION)
        return
    if tls is None:
        why = "in plaintext, from any host"
    else:
        why = f"over TLS without client authentication (tls-creds {tls.creds.id!r} has verify-peer=off)"
    raise MigrationError(
        f"{what}: {uri} would accept a migration {why}; set tls-creds to server credentials "
        f"with verify-peer=on (and tls-authz), listen on a loopback address or unix:PATH, or "
        f"start the daemon with {INSECURE_MIGRATION} (docs/security.md)")


def warnPlaintextMigration(uri: str, tls: Any, what: str = "migrate") -> bool:
    """
    Log a warning when a migration goes to another host in plaintext (a
    C{tcp:} URI on a non-loopback address without C{tls-creds}): the
    guest's memory then crosses the network readable by anyone on the
    path.

    @param uri: the destination URI.
    @param tls: the source's TLS policy, or L{None}.
    @param what: the command, for the message.
    @return: whether a warning was logged.
    """
    host = _migrationHost(uri)
    if host is None or _isLoopback(host) or tls is not None:
        return False
    _log.warn("{what} {uri}: the guest's memory goes to another host in plaintext; set tls-creds "
              "(docs/tls.md)", what=what, uri=uri)
    return True
