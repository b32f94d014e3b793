# -*- test-case-name: tests.test_control_daemon -*-
"""
Start C{twistd postcopy} daemons as child processes and reach their
control API: what C{postcopy demo} and the end-to-end tests do.

Each daemon runs in the foreground (C{twistd -n}), logs to
C{WORKDIR/NAME.log} and listens for control on C{unix:WORKDIR/NAME.sock}.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from twisted_postcopy.childprocess import IMPORT_ROOT, childEnvironment, pythonArguments
from twisted_postcopy.control.client import ControlClient, connectControl
from twisted_postcopy.errors import DaemonError

#: How C{twistd} is run: by the current interpreter, so the daemon sees
#: the same installation.
TWISTD = "from twisted.scripts.twistd import run; run()"

#: The directory above the package, holding C{twisted/plugins/} in a checkout.
CHECKOUT = IMPORT_ROOT


def pluginEnvironment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment under which C{twistd} finds the C{postcopy} plugin and
    imports the same C{twisted_postcopy} as this process.

    An editable install does not put the checkout on C{sys.path}, so the
    plugin in its C{twisted/plugins/} would stay unseen; and a daemon
    started from inside a checkout must not import that checkout instead
    of the installed package.  See
    L{twisted_postcopy.childprocess.childEnvironment}.

    @param environ: the base environment (default: C{os.environ}).
    @return: a new environment.
    """
    return childEnvironment(environ)


def logTail(path: Path, lines: int = 15) -> str:
    """
    The last lines of a log file.

    @param path: the file.
    @param lines: how many lines.
    @return: the lines, or a note that there is no log.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class _DaemonProtocol(ProcessProtocol):
    """
    Collects a daemon's output and notices its end.

    @ivar output: what the daemon wrote to standard output and error
        (before its log file took over: usage errors, tracebacks at import).
    @ivar ended: a Deferred firing with the exit code (or signal as a
        negative number) when the process ends.
    """

    def __init__(self) -> None:
        """
        Start with an empty buffer.
        """
        self.output = b""
        self.ended: Deferred = Deferred()
        self.status: int | None = None

    def outReceived(self, data: bytes) -> None:
        """
        Keep the output (its last 64 KiB).

        @param data: the bytes.
        """
        self.output = (self.output + data)[-65536:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        """
        Record the exit status and fire L{ended}.

        @param reason: a Failure of L{twisted.internet.error.ProcessDone}
            or C{ProcessTerminated}.
        """
        value = reason.value
        self.status = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        self.ended.callback(self.status)


@define
class Daemon:
    """
    A running C{twistd postcopy} child process and its control connection.

    @ivar name: a short name (C{source}, C{destination}).
    @ivar workdir: where its socket and log live.
    @ivar process: the process transport.
    @ivar protocol: its process protocol.
    @ivar client: the control connection, once connected.
    """

    name: str
    workdir: Path
    process: Any
    protocol: _DaemonProtocol
    client: ControlClient | None = field(default=None)

    @property
    def control(self) -> str:
        """
        The control endpoint description.
        """
        return f"unix:{self.workdir / (self.name + '.sock')}"

    @property
    def qmp(self) -> str:
        """
        The QMP endpoint description (served when started with C{qmp}).
        """
        return f"unix:{self.workdir / (self.name + '.qmp')}"

    @property
    def log(self) -> Path:
        """
        The daemon's log file.
        """
        return self.workdir / (self.name + ".log")

    def failure(self, what: str) -> DaemonError:
        """
        Describe a daemon failure with the end of its output.

        @param what: what went wrong.
        @return: the error to raise.
        """
        output = self.protocol.output.decode(errors="replace").strip()
        return DaemonError(f"{self.name} daemon {what}\n{output}\n{logTail(self.log)}".rstrip())

    async def stop(self, reactor: Any, timeout: float = 10.0) -> int | None:
        """
        Close the control connection and end the process (SIGTERM, then
        SIGKILL after C{timeout}).

        @param reactor: the reactor.
        @param timeout: seconds to wait for a clean exit.
        @return: the exit status.
        """
        if self.client is not None:
            self.client.transport.loseConnection()
        if self.protocol.status is None:
            self.process.signalProcess("TERM")
            kill = reactor.callLater(timeout, self._kill)
            await self.protocol.ended
            if kill.active():
                kill.cancel()
        return self.protocol.status

    def _kill(self) -> None:
        """
        Kill a daemon that did not stop.
        """
        if self.protocol.status is None:
            self.process.signalProcess(signal.SIGKILL)


async def startDaemon(
    reactor: Any, name: str, workdir: Path, arguments: Sequence[str], timeout: float = 30.0,
    qmp: bool = False,
    wrapper: Sequence[str] = (),
) -> Daemon:
    """
    Spawn C{twistd -n postcopy} and connect to its control socket.

    @param reactor: the reactor.
    @param name: the daemon's name, also its socket and log file names.
    @param workdir: the directory for the socket and log.
    @param arguments: the plugin's options other than C{--control}.
    @param timeout: seconds to wait for the control socket.
    @param qmp: also serve QMP on L{Daemon.qmp}.
    @param wrapper: a command that runs the daemon (for example
        C{ip netns exec NAME}, which execs it: the process is the daemon).
    @return: the connected L{Daemon}.
    @raise DaemonError: the daemon exited or did not listen in time.
    """
    protocol = _DaemonProtocol()
    daemon = Daemon(name, workdir, None, protocol)
    argv = [*wrapper, *pythonArguments("-c", TWISTD), "-n", "--pidfile=", f"--logfile={daemon.log}",
            "postcopy", "--control", daemon.control, *arguments]
    if qmp:
        argv += ["--qmp", daemon.qmp]
    daemon.process = reactor.spawnProcess(
        protocol, argv[0], argv, env=pluginEnvironment(), childFDs={0: "w", 1: "r", 2: "r"}
    )
    deadline = reactor.seconds() + timeout
    while daemon.client is None:
        if protocol.status is not None:
            raise daemon.failure(f"exited with status {protocol.status}")
        if reactor.seconds() > deadline:
            await daemon.stop(reactor)
            raise daemon.failure(f"did not listen on {daemon.control} within {timeout} s")
        try:
            daemon.client = await connectControl(reactor, daemon.control)
        except ConnectError:
            await deferLater(reactor, 0.05, lambda: None)
    return daemon
