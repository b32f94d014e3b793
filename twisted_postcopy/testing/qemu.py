# -*- test-case-name: tests.test_qemu -*-
"""
Drive a real QEMU 7.2 (TCG) from tests and benches.

L{QEMUInstance} runs one C{qemu-system-x86_64} process booting the
boot-sector guest of L{twisted_postcopy.testing.bootsector}, with its QMP
monitor on a Unix socket in a private directory, its stderr and serial port
in files there, and every wait bounded by a timeout.  L{machineArguments}
holds the options shared by a migration source and its destination, so a
restore target always matches (it and the other host facts live in
L{twisted_postcopy.testing.qemuhost} and are importable from here).
L{startBootedQEMU} starts one for a test case.

Everything here is synchronous (QMP through L{qemu.qmp.legacy}); it never
touches the Twisted reactor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING, Any, Iterable

from attrs import define, field

from twisted_postcopy.errors import QEMUError, QEMUTimeoutError
from twisted_postcopy.testing.qemuhost import (
    DEFAULT_TIMEOUT,
    MACHINE,
    QEMU_BINARY,
    machineArguments,
    qemuAvailable,
    qemuBinary,
    qemuMissing,
    qemuSkipReason,
    requireQEMU,
    waitFor,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

__all__ = [
    "DEFAULT_TIMEOUT", "MACHINE", "QEMU_BINARY", "QEMUInstance", "machineArguments",
    "qemuAvailable", "qemuBinary", "qemuMissing", "qemuSkipReason", "requireQEMU", "startBootedQEMU",
    "waitFor",
]


@define
class QEMUInstance:
    """
    One running C{qemu-system-x86_64}.

    @ivar directory: the private directory holding the QMP socket, the
        stderr log (C{stderr.log}) and the serial output (C{serial.out}).
    @ivar process: the QEMU process.
    @ivar name: a label used in error messages (C{source}, C{destination}).
    @ivar socketDirectory: a short private directory under the system
        temporary directory holding the QMP socket (Unix socket paths are
        limited to 107 bytes); removed by L{kill}.
    """

    directory: str
    process: subprocess.Popen[bytes]
    name: str
    socketDirectory: str
    _monitor: Any = field(default=None)

    @classmethod
    def start(
        cls,
        directory: str,
        arguments: Iterable[str],
        name: str = "qemu",
        timeout: float = DEFAULT_TIMEOUT,
        wrapper: Iterable[str] = (),
    ) -> QEMUInstance:
        """
        Start QEMU and connect to its QMP monitor.

        @param directory: an existing, private directory for its files.
        @param arguments: the machine arguments (see L{machineArguments})
            plus extra ones such as C{-incoming defer} or C{-S}.
        @param name: a label used in error messages.
        @param timeout: seconds allowed for QMP to come up.
        @param wrapper: a command that runs QEMU (for example C{ip netns
            exec NAME}, which execs it).
        @return: the running instance.
        @raise QEMUError: when QEMU exits or QMP does not come up; the
            process is killed and reaped first.
        """
        socketDirectory = tempfile.mkdtemp(prefix="qmp-")
        socketPath = os.path.join(socketDirectory, "qmp.sock")
        command = [
            *wrapper, qemuBinary() or QEMU_BINARY, *arguments,
            "-qmp", f"unix:{socketPath},server=on,wait=off",
            "-serial", f"file:{os.path.join(directory, 'serial.out')}",
        ]
        try:
            with open(os.path.join(directory, "stderr.log"), "wb") as log:
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
        except OSError as error:
            shutil.rmtree(socketDirectory, ignore_errors=True)
            raise QEMUError(f"{name}: cannot run {command[0]}: {error}") from error
        instance = cls(directory, process, name, socketDirectory)
        try:
            instance._connect(socketPath, timeout)
        except BaseException:
            instance.kill()
            raise
        return instance

    def _connect(self, socketPath: str, timeout: float) -> None:
        """
        Wait for the QMP socket and negotiate capabilities.

        @param socketPath: the QMP Unix socket.
        @param timeout: seconds allowed.
        @raise QEMUError: when QEMU exits first.
        """
        from qemu.qmp.legacy import QEMUMonitorProtocol
        from qemu.qmp.protocol import ConnectError

        def connected() -> Any:
            """
            QEMU creates the socket file before it listens on it, so a
            refused connection is retried.

            @return: a negotiated monitor, or L{None} to try again.
            """
            self.checkAlive()
            if not os.path.exists(socketPath):
                return None
            monitor = QEMUMonitorProtocol(socketPath, nickname=self.name)
            try:
                monitor.connect(negotiate=True)
            except ConnectError:
                monitor.close()
                return None
            return monitor

        self._monitor = waitFor(connected, timeout, f"for the QMP socket of {self.name}")
        self._monitor.settimeout(timeout)

    def stderrTail(self, lines: int = 10) -> str:
        """
        @param lines: how many lines to return at most.
        @return: the last lines QEMU wrote to stderr.
        """
        with open(os.path.join(self.directory, "stderr.log"), "rb") as log:
            text = log.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str) -> QEMUError:
        """
        Build an error about this instance.

        @param message: what went wrong.
        @return: a L{QEMUError} naming the instance and its stderr tail.
        """
        return QEMUError(f"{self.name}: {message}\n--- stderr:\n{self.stderrTail()}")

    def checkAlive(self) -> None:
        """
        @raise QEMUError: when the process has exited.
        """
        code = self.process.poll()
        if code is not None:
            raise self.fail(f"QEMU exited with status {code}")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """
        Run one QMP command synchronously.

        @param command: the QMP command name, e.g. C{query-migrate}.
        @param arguments: its arguments (use C{**{"dashed-name": v}} for
            dashed names).
        @return: the command's C{return} value.
        @raise QEMUError: when QMP answers with an error or QEMU died.
        """
        from qemu.qmp import QMPError

        if self._monitor is None:
            raise self.fail(f"QMP is closed, cannot run {command}")
        try:
            return self._monitor.cmd(command, **arguments)
        except (QMPError, EOFError, ConnectionError) as error:
            raise self.fail(f"{command} {arguments}: {error}") from error
        except TimeoutError as error:
            raise QEMUTimeoutError(f"{self.name}: {command} timed out") from error

    def waitEvent(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """
        Wait for a QMP event, discarding others.

        @param name: the event name, e.g. C{STOP}.
        @param timeout: seconds to wait at most.
        @return: the event message.
        @raise QEMUTimeoutError: when it does not arrive in time.
        """

        def arrived() -> dict | None:
            """
            @return: the next event if it is the awaited one, else L{None}.
            """
            self.checkAlive()
            event = self._monitor.pull_event(wait=False)
            return event if event is not None and event["event"] == name else None

        return waitFor(arrived, timeout, f"for event {name} on {self.name}")

    def status(self) -> str:
        """
        @return: the run state from C{query-status}, e.g. C{running}.
        """
        return self.qmp("query-status")["status"]

    def waitStatus(self, statuses: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> str:
        """
        Wait until the run state is one of C{statuses}.

        @param statuses: acceptable run states.
        @param timeout: seconds to wait at most.
        @return: the run state reached.
        @raise QEMUTimeoutError: when none is reached in time.
        """
        wanted = set(statuses)

        def reached() -> str | None:
            """
            @return: the run state if wanted, else L{None}.
            """
            status = self.status()
            return status if status in wanted else None

        return waitFor(reached, timeout, f"for {self.name} run state in {wanted}")

    def setCapabilities(self, **capabilities: bool) -> None:
        """
        Set migration capabilities.

        @param capabilities: QEMU capability names with underscores for
            dashes, e.g. C{postcopy_ram=True}.
        """
        self.qmp("migrate-set-capabilities", capabilities=[
            {"capability": name.replace("_", "-"), "state": state}
            for name, state in capabilities.items()
        ])

    def setParameters(self, **parameters: Any) -> None:
        """
        Set migration parameters.

        @param parameters: QEMU parameter names with underscores for
            dashes, e.g. C{max_bandwidth=1 << 20}.
        """
        self.qmp("migrate-set-parameters", **{
            name.replace("_", "-"): value for name, value in parameters.items()
        })

    def migrate(self, uri: str) -> None:
        """
        Start an outgoing migration (returns at once).

        @param uri: a QEMU migration URI (C{tcp:...}, C{exec:...}).
        """
        self.qmp("migrate", uri=uri)

    def migrateIncoming(self, uri: str) -> None:
        """
        Start listening for an incoming migration (QEMU started with
        C{-incoming defer}).

        @param uri: a QEMU migration URI.
        """
        self.qmp("migrate-incoming", uri=uri)

    def queryMigrate(self) -> dict:
        """
        @return: the C{query-migrate} answer.
        """
        return self.qmp("query-migrate")

    def waitMigration(
        self, statuses: Iterable[str], timeout: float = DEFAULT_TIMEOUT
    ) -> dict:
        """
        Poll C{query-migrate} until its status is one of C{statuses}.

        @param statuses: acceptable migration statuses, e.g. C{completed}.
        @param timeout: seconds to wait at most.
        @return: the C{query-migrate} answer that matched.
        @raise QEMUError: when the migration fails (unless C{failed} is
            wanted) or QEMU exits.
        @raise QEMUTimeoutError: when no wanted status comes in time.
        """
        wanted = set(statuses)

        def reached() -> dict | None:
            """
            @return: the C{query-migrate} answer if its status is wanted,
                else L{None}.
            @raise QEMUError: when the migration failed.
            """
            info = self.queryMigrate()
            status = info.get("status")
            if status in wanted:
                return info
            if status == "failed":
                raise self.fail(f"migration failed: {info.get('error-desc')}")
            return None

        return waitFor(reached, timeout, f"for {self.name} migration in {wanted}")

    def pmemsave(self, address: int, size: int) -> bytes:
        """
        Read guest-physical memory (stop the guest first for a consistent
        snapshot).

        @param address: the first guest-physical address.
        @param size: the number of bytes.
        @return: the memory contents.
        """
        path = os.path.join(self.directory, "pmemsave.bin")
        self.qmp("pmemsave", val=address, size=size, filename=path)
        with open(path, "rb") as dump:
            data = dump.read()
        os.unlink(path)
        return data

    def serialOutput(self) -> bytes:
        """
        @return: everything the guest wrote to its serial port so far.
        """
        path = os.path.join(self.directory, "serial.out")
        if not os.path.exists(path):
            return b""
        with open(path, "rb") as serial:
            return serial.read()

    def waitSerial(self, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """
        Wait until the guest wrote at least C{count} serial bytes.

        @param count: the number of bytes awaited.
        @param timeout: seconds to wait at most.
        @return: the serial output so far.
        """

        def written() -> bytes | None:
            """
            @return: the serial output once long enough, else L{None}.
            """
            self.checkAlive()
            output = self.serialOutput()
            return output if len(output) >= count else None

        return waitFor(written, timeout, f"for {count} serial bytes from {self.name}")

    def kill(self, timeout: float = 10.0) -> None:
        """
        Stop QEMU: close QMP, terminate, then kill if needed, and reap it.
        Safe to call more than once.

        @param timeout: seconds allowed for a graceful exit.
        """
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.close()
            except Exception:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        shutil.rmtree(self.socketDirectory, ignore_errors=True)


def startBootedQEMU(case: SynchronousTestCase, name: str, extraArguments: Iterable[str] = (),
                    memoryMiB: int = 32) -> QEMUInstance:
    """
    Start QEMU booting the boot-sector guest in a temporary directory, both
    removed after the test.

    @param case: the test case (its C{addCleanup} is used).
    @param name: the instance's label (C{source}, C{destination}).
    @param extraArguments: arguments after the machine ones, such as
        C{-S -incoming defer}.
    @param memoryMiB: guest RAM size in MiB.
    @return: the running instance.
    """
    from twisted_postcopy.testing.bootsector import writeBootImage

    requireQEMU()
    directory = tempfile.mkdtemp(prefix="tpq")
    case.addCleanup(shutil.rmtree, directory, True)
    image = writeBootImage(os.path.join(directory, "boot.img"))
    qemu = QEMUInstance.start(directory, [*machineArguments(image, memoryMiB), *extraArguments], name)
    case.addCleanup(qemu.kill)
    return qemu
