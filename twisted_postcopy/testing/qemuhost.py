# -*- test-case-name: tests.test_qemu -*-
"""
Whether and how this host runs QEMU 7.2 for tests and benches: the binary,
the reason real-QEMU tests are skipped, the machine options every source
and destination share, bounded polling, and recordings made once per test
process.

Everything here is synchronous; it never touches the Twisted reactor.
L{twisted_postcopy.testing.qemu} re-exports every name.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Callable, TypeVar

from twisted_postcopy.errors import QEMUTimeoutError
from twisted_postcopy.testing.real import requireReal, unlessStrict

QEMU_BINARY = "qemu-system-x86_64"
MACHINE = "pc-i440fx-7.2"
DEFAULT_TIMEOUT = 30.0
_POLL = 0.02
_T = TypeVar("_T")


def qemuBinary() -> str | None:
    """
    @return: the path of C{qemu-system-x86_64}, or L{None} when missing.
    """
    return shutil.which(QEMU_BINARY)


def qemuMissing() -> str | None:
    """
    Explain why real-QEMU tests cannot run here.

    @return: what is missing and how to get it, or L{None} when QEMU and
        the C{qemu.qmp} package are both available.
    """
    if qemuBinary() is None:
        return f"{QEMU_BINARY} not found (run tools/install-deps)"
    try:
        import qemu.qmp.legacy  # noqa: F401
    except ImportError:
        return "the qemu.qmp package is missing (pip install qemu.qmp)"
    return None


def qemuSkipReason() -> str | None:
    """
    The C{skip} attribute of a real-QEMU test class.

    @return: L{qemuMissing}'s reason outside strict mode; L{None} in strict
        mode (C{POSTCOPY_REQUIRE_REAL=1}), where the tests run and
        L{requireQEMU} (called by L{recordOnce}, C{startBootedQEMU} or the
        test's C{setUp}) fails them with the reason instead.
    """
    return unlessStrict(qemuMissing())


def requireQEMU() -> None:
    """
    Give up on the running test (L{missingReal}) when QEMU or C{qemu.qmp}
    is missing: a skip by hand, a failure in strict mode.
    """
    requireReal(qemuMissing())


def qemuAvailable() -> bool:
    """
    @return: whether real-QEMU tests can run here.
    """
    return qemuMissing() is None


def machineArguments(image: str, memoryMiB: int = 32) -> list[str]:
    """
    The machine options shared by every source and destination QEMU.

    @param image: the raw boot-sector image (an IDE disk: SeaBIOS boots it
        faster than a floppy).
    @param memoryMiB: guest RAM size in MiB.
    @return: C{qemu-system-x86_64} arguments (no monitor, serial or
        incoming options).
    """
    return [
        "-M", MACHINE, "-accel", "tcg", "-m", str(memoryMiB),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-drive", f"file={image},format=raw,if=ide,snapshot=on",
    ]


def waitFor(
    check: Callable[[], _T | None], timeout: float, what: str
) -> _T:
    """
    Poll C{check} until it returns something other than L{None}.

    @param check: the condition; its non-L{None} result is returned.
    @param timeout: seconds to wait at most.
    @param what: what is awaited, for the error message.
    @return: the first non-L{None} result of C{check}.
    @raise QEMUTimeoutError: when C{timeout} elapses first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise QEMUTimeoutError(f"timed out after {timeout} s waiting {what}")
        time.sleep(_POLL)


_recordings: dict[str, Any] = {}


def recordOnce(key: str, record: Callable[[], _T]) -> _T:
    """
    Make a real-QEMU recording on first use; later calls with the same key
    return the same result, or raise the same error, without running QEMU
    again.

    @param key: names the recording (one per test module).
    @param record: makes the recording.
    @return: what C{record} returned.
    @raise SkipTest: when QEMU cannot run here (L{requireQEMU}: a
        failure in strict mode).
    """
    requireQEMU()
    if key not in _recordings:
        try:
            _recordings[key] = record()
        except Exception as error:
            _recordings[key] = error
    result = _recordings[key]
    if isinstance(result, Exception):
        raise result
    return result


def inTemporaryDirectory(prefix: str, run: Callable[[str], _T]) -> _T:
    """
    Run C{run} in a new temporary directory, removed afterwards.

    @param prefix: the directory name's prefix.
    @param run: called with the directory's path.
    @return: what C{run} returned.
    """
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        return run(directory)
    finally:
        shutil.rmtree(directory, True)
