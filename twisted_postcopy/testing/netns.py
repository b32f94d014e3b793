"""
Real network failures for tests and benches: two network namespaces
joined through a third, the router, by two veth pairs::

    A (10.231.1.1) -- veth -- R (10.231.1.2 | 10.231.2.2) -- veth -- B (10.231.2.1)

L{NetnsPath.cut} takes both of the router's links down: packets between
A and B vanish with no FIN, no RST and no error at either end (each sees
its own link up, with no carrier behind it), which is what a failing
switch or cable looks like.  L{NetnsPath.restore} brings them back.

Traffic stays inside the namespaces made here.  The namespaces' names
carry this process's pid, so a later run removes those left behind by a
process that died (L{sweep}); at most L{MAX_PATHS} exist at a time per
process, and every command is bounded by L{COMMAND_TIMEOUT}.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Sequence

from attrs import define, field

from twisted_postcopy.testing.real import missingReal

#: Prefix of every namespace made here.
PREFIX = "tpcdl"
#: Namespace paths one process may hold at once.
MAX_PATHS = 4
#: Seconds any one C{ip} command may take.
COMMAND_TIMEOUT = 10.0
#: The two ends' addresses.
SOURCE_ADDRESS = "10.231.1.1"
DESTINATION_ADDRESS = "10.231.2.1"

_made: list["NetnsPath"] = []
_counter = [0]


def _ip() -> str:
    """
    @return: the C{ip} command's path.
    """
    path = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)
    if path is None:
        missingReal("the ip command (iproute2) is not installed")
    return path


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """
    Run one command, bounded in time.

    @param argv: the command.
    @param check: raise on failure.
    @return: the finished process.
    """
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and done.returncode:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def _namespaces() -> list[str]:
    """
    @return: the names of the existing namespaces made here.
    """
    listed = _run(_ip(), "netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(PREFIX)]


def _delete(name: str) -> None:
    """
    Kill what runs in a namespace, then remove it.

    @param name: the namespace.
    """
    pids = _run(_ip(), "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run(_ip(), "netns", "del", name, check=False)


def sweep() -> None:
    """
    Remove namespaces left by processes made here that no longer exist.
    """
    for name in _namespaces():
        owner = name[len(PREFIX):].split("x", 1)[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            _delete(name)


@define
class NetnsPath:
    """
    Two namespaces and a router between them.

    @ivar base: the namespaces' common prefix.
    @ivar up: whether the path carries packets.
    """

    base: str
    up: bool = field(default=True)

    @property
    def source(self) -> str:
        """
        The namespace of the migration's source (address L{SOURCE_ADDRESS}).
        """
        return self.base + "a"

    @property
    def router(self) -> str:
        """
        The router's namespace.
        """
        return self.base + "r"

    @property
    def destination(self) -> str:
        """
        The namespace of the destination (address L{DESTINATION_ADDRESS}).
        """
        return self.base + "b"

    def execIn(self, namespace: str) -> list[str]:
        """
        @param namespace: one of this path's namespaces.
        @return: the command prefix that runs a program in it.
        """
        return [_ip(), "netns", "exec", namespace]

    def _make(self) -> None:
        """
        Create the namespaces, links, addresses and routes.
        """
        ip = _ip()
        a, r, b = self.source, self.router, self.destination
        for name in (a, r, b):
            _run(ip, "netns", "add", name)
            _run(ip, "-n", name, "link", "set", "lo", "up")
        _run(ip, "-n", a, "link", "add", "dla", "type", "veth", "peer", "name", "dlra", "netns", r)
        _run(ip, "-n", b, "link", "add", "dlb", "type", "veth", "peer", "name", "dlrb", "netns", r)
        for name, device, address in ((a, "dla", SOURCE_ADDRESS), (r, "dlra", "10.231.1.2"),
                                      (r, "dlrb", "10.231.2.2"), (b, "dlb", DESTINATION_ADDRESS)):
            _run(ip, "-n", name, "addr", "add", f"{address}/24", "dev", device)
            _run(ip, "-n", name, "link", "set", device, "up")
        _run(ip, "-n", a, "route", "add", "default", "via", "10.231.1.2")
        _run(ip, "-n", b, "route", "add", "default", "via", "10.231.2.2")
        _run(ip, "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.waitCarrier()

    def waitCarrier(self, timeout: float = 5.0) -> None:
        """
        Wait until the router's links carry packets (a link set up takes
        a moment to report its carrier).

        @param timeout: seconds to wait at most.
        @raise OSError: still no carrier after C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = _run(_ip(), "-n", self.router, "-br", "link", "show", "up").stdout
            if all(f"{device}@" in states and "LOWER_UP" in line and "NO-CARRIER" not in line
                   for device in ("dlra", "dlrb")
                   for line in states.splitlines() if line.startswith(f"{device}@")):
                return
            if time.monotonic() > deadline:
                raise OSError(f"no carrier on {self.router}'s links: {states}")
            time.sleep(0.02)

    def _links(self, state: str) -> None:
        """
        @param state: C{up} or C{down}, for both of the router's links.
        """
        for device in ("dlra", "dlrb"):
            _run(_ip(), "-n", self.router, "link", "set", device, state)

    def cut(self) -> None:
        """
        A silent cut: the router's links go down.
        """
        self._links("down")
        self.up = False

    def restore(self) -> None:
        """
        The router's links come back.
        """
        self._links("up")
        self.waitCarrier()
        self.up = True

    def remove(self) -> None:
        """
        Remove the namespaces (and what runs in them, and their links).
        """
        for name in (self.source, self.router, self.destination):
            _delete(name)
        if self in _made:
            _made.remove(self)


def makePath() -> NetnsPath:
    """
    Make a namespace path, or give up through L{missingReal} where network
    namespaces cannot be made (no iproute2, no privilege).

    @return: the path; call L{NetnsPath.remove} when done.
    @raise RuntimeError: more than L{MAX_PATHS} at once.
    """
    if len(_made) >= MAX_PATHS:
        raise RuntimeError(f"more than {MAX_PATHS} namespace paths at once")
    _ip()
    sweep()
    _counter[0] += 1
    path = NetnsPath(f"{PREFIX}{os.getpid()}x{_counter[0]}")
    try:
        path._make()
    except (OSError, subprocess.SubprocessError) as error:
        path.remove()
        missingReal(f"cannot make network namespaces here: {error}")
    _made.append(path)
    return path


def commands(path: NetnsPath) -> Sequence[str]:
    """
    @param path: a namespace path.
    @return: its namespaces (for logs).
    """
    return [path.source, path.router, path.destination]
