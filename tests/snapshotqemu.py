"""
Helpers of the snapshot tests with a real QEMU 7.2: the C{postcopy
snapshot} commands run as child processes (they run their own reactor),
while the test drives QEMU synchronously through
L{twisted_postcopy.testing.qemu}.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

from twisted_postcopy.testing.bootsector import GuestLayout, writeBootImage
from twisted_postcopy.testing import qemuhost
from twisted_postcopy.testing.qemu import QEMUInstance
from twisted_postcopy.testing.qemubaseline import layoutFor, listenIncoming, startGuest
from twisted_postcopy.testing.real import requireUserfaultfd

MEMORY_MIB = 32
LAYOUT: GuestLayout = layoutFor(MEMORY_MIB, pages=1024)
TIMEOUT = 60.0


def requireQEMU() -> None:
    """
    Give up (L{missingReal}: a skip by hand, a failure in strict mode) when
    QEMU or userfaultfd (for QEMU's postcopy destinations) is not usable
    here.
    """
    qemuhost.requireQEMU()
    requireUserfaultfd()


def bootImage(directory: str) -> str:
    """
    @param directory: where to write it.
    @return: the boot-sector image of L{LAYOUT}.
    """
    return writeBootImage(os.path.join(directory, "boot.img"), LAYOUT)


def snapshotCommand(*arguments: str) -> subprocess.Popen[bytes]:
    """
    Start C{postcopy snapshot ARGUMENTS...} as a child process.

    @param arguments: the subcommand and its arguments.
    @return: the process (stdout and stderr piped).
    """
    return subprocess.Popen([sys.executable, "-m", "twisted_postcopy.cli", "snapshot", *arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> tuple[int, bytes, bytes]:
    """
    Wait for a command.

    @param process: from L{snapshotCommand}.
    @param timeout: seconds.
    @return: (exit status, stdout, stderr).
    """
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def summaries(stdout: bytes) -> list[dict[str, Any]]:
    """
    @param stdout: a restore command's output.
    @return: its per-destination C{query-migrate} lines.
    """
    return [json.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]


def restoreTarget(directory: str, name: str, image: str, postcopy: bool,
                  memoryMiB: int = MEMORY_MIB, preempt: bool = False) -> tuple[QEMUInstance, str]:
    """
    Start a fresh QEMU waiting for an incoming migration.

    @param directory: the parent directory.
    @param name: the instance name.
    @param image: the boot image (same machine options as the source).
    @param postcopy: enable C{postcopy-ram} on it.
    @param memoryMiB: its RAM size.
    @param preempt: enable C{postcopy-preempt} too.
    @return: (the instance, its C{tcp:} URI).
    """
    qemu = startGuest(directory, name, image, memoryMiB, "-incoming", "defer")
    try:
        if postcopy:
            qemu.setCapabilities(**{"postcopy-ram": True, "postcopy-blocktime": True,
                                    **({"postcopy-preempt": True} if preempt else {})})
        host, port = listenIncoming(qemu)
    except BaseException:
        qemu.kill()
        raise
    return qemu, f"tcp:{host}:{port}"


def startCapture(directory: str, target: str, postcopy: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """
    Start C{postcopy snapshot capture} and wait until it listens.

    @param directory: unused parent (kept for symmetry).
    @param target: the snapshot directory to create.
    @param postcopy: accept postcopy.
    @return: (the process, the URI QEMU should migrate to).
    """
    process = snapshotCommand("capture", "--listen", "tcp:127.0.0.1:0",
                              *([] if postcopy else ["--no-postcopy"]), target)
    assert process.stdout is not None
    line = process.stdout.readline()
    port = re.search(rb"port=(\d+)", line)
    if not line.startswith(b"listening") or port is None:
        process.kill()
        raise AssertionError(f"capture did not listen: {line!r} {process.stderr.read()!r}")
    return process, f"tcp:127.0.0.1:{int(port.group(1))}"


def runningSource(directory: str, image: str) -> QEMUInstance:
    """
    Start the boot-sector guest and wait for its first pass.

    @param directory: the parent directory.
    @param image: the boot image.
    @return: the running QEMU.
    """
    qemu = startGuest(directory, "source", image, MEMORY_MIB)
    try:
        qemu.waitSerial(1, TIMEOUT)
    except BaseException:
        qemu.kill()
        raise
    return qemu
