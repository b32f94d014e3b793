# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd postcopy} plugin's options and service maker.

A source daemon runs a guest and migrates it when told to (C{migrate})::

    twistd -n postcopy --role source --control unix:/run/src.sock --guest stress --ram 256M

A destination daemon prepares the same guest with no memory and waits for
the migration, as QEMU does with C{-incoming}::

    twistd -n postcopy --role destination --control unix:/run/dst.sock \\
        --incoming tcp:127.0.0.1:4444 --guest stress --ram 256M

With C{--hugepages} (on both sides) the guest's RAM is on hugetlbfs with
2 MiB pages; the huge pages it needs are reserved at start if fewer are
free (see C{docs/user-guide.md}).

Every daemon also serves the C{snapshot-*} commands (capture a QEMU
migration into a snapshot directory, restore one into QEMU destinations).
A daemon that does only that runs no guest::

    twistd -n postcopy --role snapshot --control unix:/run/snap.sock
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from twisted.python import usage

from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE

#: Multipliers of the size suffixes (QEMU's C{-m}: a bare number is MiB).
_SIZE_UNITS = {"": 1 << 20, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: The guests' page size.
PAGE_SIZE = TARGET_PAGE_SIZE

ROLES = ("source", "destination", "snapshot")
GUESTS = ("stress", "kv", "none")


def parseSize(text: str) -> int:
    """
    Parse a memory size the way QEMU's C{-m} does: C{256M}, C{1G},
    C{65536K}; a bare number is in MiB.

    @param text: the size.
    @return: the size in bytes.
    @raise ValueError: the text is not a size.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([BKMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"invalid size {text!r} (expected e.g. 256M or 1G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _choice(name: str, choices: tuple[str, ...]) -> Any:
    """
    Make a coercer accepting only C{choices}.

    @param name: the option name, for the error.
    @param choices: the accepted values.
    @return: the coercer.
    """

    def coerce(value: str) -> str:
        """
        Check one value.

        @param value: the value given.
        @return: the value.
        @raise ValueError: it is not one of the choices.
        """
        if value not in choices:
            raise ValueError(f"--{name} must be one of {', '.join(choices)}, not {value!r}")
        return value

    coerce.coerceDoc = f"One of {', '.join(choices)}."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """
    Options of C{twistd postcopy}.
    """

    synopsis = "--role source|destination|snapshot --control ENDPOINT [options]"
    longdesc = (
        "Run a postcopy live migration daemon (a QEMU-like VM host for a "
        "built-in guest), controlled over AMP with QMP's migration commands "
        "(see the 'postcopy' command line)."
    )

    optParameters = [
        ["role", None, "source",
         "source, destination, or snapshot (no guest; snapshot-* commands only).",
         _choice("role", ROLES)],
        ["control", None, None, "Control endpoint, e.g. unix:/run/postcopy.sock (required)."],
        ["incoming", None, None,
         "Destination: listen for the migration on this URI at start "
         "(QEMU's -incoming), e.g. tcp:127.0.0.1:4444 or unix:/run/mig.sock."],
        ["guest", None, "stress", "Built-in guest: stress, kv or none.", _choice("guest", GUESTS)],
        ["ram", None, "256M", "Guest RAM size (QEMU's -m: 256M, 1G; a bare number is MiB).",
         parseSize],
        ["seed", None, 1, "Seed of the stress guest's page contents.", int],
        ["workers", None, 2, "Number of guest worker processes.", int],
        ["attach", None, None,
         "Unix socket where guest workers attach (default: CONTROL_PATH.attach)."],
        ["qmp", None, None,
         "Also serve QMP (QEMU 7.2's monitor protocol) on this endpoint, "
         "e.g. unix:/run/postcopy.qmp (see docs/qmp.md)."],
        ["snapshot-root", None, None,
         "The snapshot-* commands may only name directories under DIR (relative ones are "
         "taken from it; no symbolic link is followed below it)."],
        ["attach-group", None, None,
         "Give the attach socket this group and mode 0660 (external guests of --attach-allow "
         "need it to reach the socket)."],
        ["metrics", None, None,
         "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
         "tcp:9100:interface=127.0.0.1 (needs the 'metrics' extra; plaintext TCP on "
         "loopback only, ssl: with caCerts= off this host)."],
    ]

    optFlags = [
        ["insecure-control", None,
         "Allow a plaintext tcp: control endpoint on a loopback interface (logs a warning; "
         "any local user can then control the daemon)."],
        ["insecure-migration", None,
         "Allow migration listeners (--incoming, migrate-incoming, migrate-recover, "
         "snapshot-capture) on a non-loopback tcp: address without TLS client authentication "
         "(logs a warning; anyone who reaches the port can send a guest)."],
        ["hugepages", None,
         "Guest RAM on hugetlbfs (2 MiB pages; --ram a multiple of 2M). When fewer huge pages "
         "are free than --ram needs, /proc/sys/vm/nr_hugepages is raised by the shortfall at "
         "start and lowered by as much at exit. Both sides of a migration need it."],
    ]

    def __init__(self) -> None:
        """
        Start with no guest options and no capabilities.
        """
        super().__init__()
        self["guest-option"] = {}
        self["capabilities"] = {}
        self["objects"] = []
        self["parameters"] = {}
        self["attach-allow"] = []

    def _checkIncoming(self) -> None:
        """
        An C{--incoming} address off the host needs TLS with client
        authentication or C{--insecure-migration}; without C{tls-creds} the
        refusal is a usage error here (with it, the credentials object is
        checked when the daemon listens).

        @raise usage.UsageError: refused.
        """
        from twisted_postcopy.access import checkMigrationListener
        from twisted_postcopy.errors import MigrationError

        if not self["incoming"] or self["parameters"].get("tls-creds"):
            return
        try:
            checkMigrationListener(self["incoming"], None, self["insecure-migration"], "--incoming")
        except MigrationError as e:
            raise usage.UsageError(str(e)) from None

    def opt_capability(self, value: str) -> None:
        """
        Set a migration capability at start, NAME=on|off (repeatable), as
        QEMU's -global migration.x-NAME=on does.
        """
        from argparse import ArgumentTypeError

        from twisted_postcopy.control.cli import parseAssignments, parseState

        try:
            self["capabilities"].update(parseAssignments([value], parseState))
        except ArgumentTypeError as e:
            raise usage.UsageError(f"--capability: {e}") from None

    def opt_object(self, value: str) -> None:
        """
        Create an object at start, in QEMU's -object syntax (repeatable):
        tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
        or authz-simple,id=ID,identity=DN (docs/tls.md).
        """
        from twisted_postcopy.tlscreds import TLSError, parseObjectOption

        try:
            self["objects"].append(parseObjectOption(value))
        except TLSError as e:
            raise usage.UsageError(f"--object: {e}") from None

    def opt_parameter(self, value: str) -> None:
        """
        Set a migration parameter at start, NAME=VALUE (repeatable), e.g.
        tls-creds=tls0 (before --incoming is listened on).
        """
        from argparse import ArgumentTypeError

        from twisted_postcopy.control.cli import parseAssignments, parseParameter

        parse = str if value.startswith("tls-") else parseParameter
        try:
            self["parameters"].update(parseAssignments([value], parse))
        except ArgumentTypeError as e:
            raise usage.UsageError(f"--parameter: {e}") from None

    def opt_guest_option(self, value: str) -> None:
        """
        Pass KEY=VALUE to the guest (repeatable).
        """
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise usage.UsageError(f"--guest-option expects KEY=VALUE, got {value!r}")
        self["guest-option"][key] = text

    def opt_attach_allow(self, value: str) -> None:
        """
        Let an external guest attach: uid=N, user=NAME, gid=N, group=NAME or
        pid=N (repeatable; the workers the daemon spawns always may).
        """
        from twisted_postcopy.access import parsePeer
        from twisted_postcopy.errors import AccessError

        try:
            self["attach-allow"].append(parsePeer(value))
        except AccessError as e:
            raise usage.UsageError(f"--attach-allow: {e}") from None

    def postOptions(self) -> None:
        """
        Check the combination of options.

        @raise usage.UsageError: C{--control} is missing, or C{--incoming}
            was given to a source.
        """
        if isinstance(self["ram"], str):
            self["ram"] = parseSize(self["ram"])
        if not self["control"]:
            raise usage.UsageError("--control ENDPOINT is required")
        if self["ram"] % PAGE_SIZE or self["ram"] <= 0:
            raise usage.UsageError(f"--ram must be a positive multiple of {PAGE_SIZE}")
        if self["hugepages"] and self["ram"] % (2 << 20):
            raise usage.UsageError("--ram must be a multiple of 2M with --hugepages")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["incoming"] and self["role"] != "destination":
            raise usage.UsageError("--incoming is only for --role destination")
        if self["role"] == "snapshot":
            self["guest"] = "none"
        from twisted_postcopy.access import parseListening, parseGroup
        from twisted_postcopy.errors import AccessError

        try:
            parseListening(self["control"], self["insecure-control"])
            if self["qmp"]:
                parseListening(self["qmp"], self["insecure-control"])
            if self["attach-group"] is not None:
                parseGroup(self["attach-group"])
            if self["snapshot-root"] is not None and not os.path.isdir(self["snapshot-root"]):
                raise AccessError(f"--snapshot-root {self['snapshot-root']}: not a directory")
        except AccessError as e:
            raise usage.UsageError(str(e)) from None
        self._checkIncoming()
        if self["metrics"]:
            from twisted_postcopy.observe.metrics import MetricsError, checkMetricsEndpoint, requirePrometheus

            try:
                requirePrometheus()
                checkMetricsEndpoint(self["metrics"])
            except MetricsError as e:
                raise usage.UsageError(str(e)) from None


def _noIncomingVM() -> Any:
    """
    The incoming VM of a destination run with C{--guest none}.

    @raise MigrationError: always: there is nothing to receive into.
    """
    from twisted_postcopy.errors import MigrationError

    raise MigrationError("This daemon runs no guest (--guest none): nothing to migrate into")


def guestSpec(options: Options) -> Any:
    """
    The built-in guest described by the options: one RAM block of
    C{--ram} bytes shared by C{--workers} worker processes (a C{stress}
    guest's working sets cover the whole block).

    @param options: the parsed L{Options}.
    @return: a L{twisted_postcopy.guests.guest.GuestSpec}.
    """
    from twisted_postcopy.guests.guest import GuestSpec
    from twisted_postcopy.ram.block import HUGE_PAGE_SIZE

    workers = options["workers"]
    arguments: list[str] = []
    if options["guest"] == "stress":
        arguments += ["--working-set", str(options["ram"] // PAGE_SIZE // workers),
                      "--seed", str(options["seed"])]
    elif options["guest"] == "kv":
        arguments += ["--workers", str(workers)]
    for key, value in options["guest-option"].items():
        arguments += [f"--{key}", value]
    return GuestSpec(options["guest"], workers=workers, blocks=(("ram", options["ram"]),),
                     arguments=tuple(arguments), pageSize=HUGE_PAGE_SIZE if options["hugepages"] else PAGE_SIZE)


def reserveGuestHugePages(options: Options, reactor: Any) -> None:
    """
    With C{--hugepages}, make the guest's huge pages available
    (L{twisted_postcopy.ram.support.reserveHugePages}) and give back what
    was added to the pool when the reactor shuts down.

    @param options: the parsed L{Options}.
    @param reactor: the reactor.
    @raise UffdUnavailableError: they cannot be reserved (the message
        names C{/proc/sys/vm/nr_hugepages}).
    """
    if not options["hugepages"] or options["guest"] == "none":
        return
    from twisted_postcopy.ram.block import HUGE_PAGE_SIZE
    from twisted_postcopy.ram.support import reserveHugePages

    release = reserveHugePages(options["ram"] // HUGE_PAGE_SIZE)
    reactor.addSystemEventTrigger("after", "shutdown", release)


def attachPath(options: Options) -> str:
    """
    Where guest workers attach: C{--attach}, else beside a Unix control
    socket, else in a new temporary directory.

    @param options: the parsed L{Options}.
    @return: a Unix socket path.
    """
    if options["attach"]:
        return options["attach"]
    if options["control"].startswith("unix:"):
        return options["control"][len("unix:"):].split(":")[0] + ".attach"
    return os.path.join(tempfile.mkdtemp(prefix="postcopy-"), "attach.sock")


def attachAccess(options: Options) -> Any:
    """
    Who may attach besides the spawned workers (C{--attach-allow}), and
    the attach socket's group (C{--attach-group}: mode 0660).

    @param options: the parsed L{Options}.
    @return: a L{twisted_postcopy.guests.host.AttachAccess}.
    """
    from twisted_postcopy.access import PeerPolicy, parseGroup
    from twisted_postcopy.guests.host import AttachAccess

    allow = PeerPolicy()
    for entry in options["attach-allow"]:
        allow = allow.union(entry)
    if options["attach-group"] is None:
        return AttachAccess(allow)
    return AttachAccess(allow, parseGroup(options["attach-group"]), 0o660)


def buildManager(reactor: Any, options: Options) -> tuple[Any, Any]:
    """
    Build the guest's service (if any) and the MigrationManager over it.

    @param reactor: the reactor.
    @param options: the parsed L{Options}.
    @return: the manager and the guest's service (or L{None}).
    """
    from twisted_postcopy.manager import MigrationManager
    from twisted_postcopy.service import IncomingGuestService, OutgoingGuestService

    if options["guest"] == "none":
        vm = None if options["role"] == "source" else _noIncomingVM
        return MigrationManager(reactor, vm), None
    if options["role"] == "source":
        outgoing = OutgoingGuestService(reactor, guestSpec(options), attachPath(options),
                                        attachAccess(options))
        return MigrationManager(reactor, outgoing), outgoing
    incoming = IncomingGuestService(reactor, guestSpec(options), attachPath(options),
                                    attachAccess(options))
    return MigrationManager(reactor, incoming.guest, incoming.guest.faultServiceFactory), incoming


def makeService(options: Options, reactor: Any = None) -> Any:
    """
    Build the daemon's service.

    @param options: the parsed L{Options}.
    @param reactor: the reactor (default: the global one).
    @return: a L{twisted_postcopy.service.MigrationService}.
    """
    if reactor is None:
        from twisted.internet import reactor
    from twisted_postcopy.service import MigrationService

    from twisted_postcopy.observe.service import addObservability

    from twisted_postcopy.errors import UffdUnavailableError

    try:
        reserveGuestHugePages(options, reactor)
    except UffdUnavailableError as error:
        raise SystemExit(f"twistd postcopy --hugepages: {error}") from None
    manager, guest = buildManager(reactor, options)
    for qomType, id, properties in options["objects"]:
        manager.objectAdd(qomType, id, **properties)
    if options["parameters"]:
        manager.setParameters(options["parameters"])
    service = MigrationService(reactor, manager, options["control"], incoming=options["incoming"],
                               guest=guest, capabilities=options["capabilities"],
                               insecureControl=options["insecure-control"],
                               snapshotRoot=options["snapshot-root"] and os.path.abspath(options["snapshot-root"]),
                               insecureMigration=options["insecure-migration"])
    addObservability(service, options["metrics"])
    if options["qmp"]:
        service.serveQMP(options["qmp"], options["insecure-control"])
    return service
