# -*- test-case-name: tests.test_control_snapshot -*-
"""
Tests for the C{snapshot-*} commands of the control API: each command and
its errors round-trip between a L{ControlClient} and a L{ControlAMP} over
an in-memory connection (L{twisted.test.iosim}), acting on a real
L{SnapshotJobs} over real snapshot directories.  The reactor is a
L{MemoryReactorClock} (listeners and connections are recorded, not made)
whose thread pool runs work at once; the real-QEMU path is in
C{tests/test_qemu_snapshot_daemon.py}.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.amp import UnknownRemoteError
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tests.test_control_server import ConnectedMixin
from twisted_postcopy import errors
from twisted_postcopy.control.client import ControlClient
from twisted_postcopy.control.server import ControlAMP
from twisted_postcopy.snapshot.jobs import LIVE_READ_TIMEOUT, MAX_READ, SnapshotJobs, addressURI
from twisted_postcopy.snapshot.store import writeSnapshot
from twisted_postcopy.wire.config import encodeHeader

PAGE = 4096
RAM_PAGES = 40


class _ImmediatePool:
    """
    A thread pool that runs each call in the calling thread.
    """

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None],
                                 function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """
        Run C{function} now and report its outcome.

        @param onResult: called with (success, result or Failure).
        @param function: the work.
        @param args: its arguments.
        @param kwargs: its keyword arguments.
        """
        from twisted.python.failure import Failure

        try:
            result = function(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class _SilentSource:
    """
    A unit-test stand-in for the capture's fault service whose QEMU source
    never answers: the daemon's own page requests never complete.
    """

    def requestPage(self, block: str, offset: int) -> Deferred:
        """
        @param block: the block.
        @param offset: the page.
        @return: a Deferred that never fires.
        """
        return Deferred()


class ImmediateReactor(MemoryReactorClock):
    """
    A memory reactor whose thread pool and C{callFromThread} run at once.
    """

    def getThreadPool(self) -> _ImmediatePool:
        """
        @return: a pool running work synchronously.
        """
        return _ImmediatePool()

    def callFromThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """
        Call at once.

        @param function: the callable.
        @param args: its arguments.
        @param kwargs: its keyword arguments.
        """
        function(*args, **kwargs)


def storedSnapshot(path: str) -> bytes:
    """
    Write a snapshot of one C{pc.ram} block whose page N is filled with
    byte N.

    @param path: the directory to create.
    @return: the block's bytes.
    """
    ram = b"".join(bytes([n]) * PAGE for n in range(RAM_PAGES))
    fd = os.memfd_create("ram")
    try:
        os.pwrite(fd, ram, 0)
        writeSnapshot(path, "pc-i440fx-7.2", encodeHeader("pc-i440fx-7.2")[9:], "precopy",
                      b"", [("pc.ram", len(ram), PAGE, fd)], 1.0)
    finally:
        os.close(fd)
    return ram


class SnapshotCommandTests(SynchronousTestCase):
    """
    Round trips of the snapshot commands.
    """

    def setUp(self) -> None:
        """
        A stored snapshot, and a client connected to a server whose jobs
        run on an L{ImmediateReactor}.
        """
        self.path = os.path.abspath(self.mktemp())
        self.ram = storedSnapshot(self.path)
        self.reactor = ImmediateReactor()
        self.jobs = SnapshotJobs(self.reactor)
        self.client, _, self.pump = iosim.connectedServerAndClient(
            lambda: ControlAMP(None, None, self.jobs), ControlClient)

    call = ConnectedMixin.call

    def test_info(self) -> None:
        """
        C{snapshot-info} returns the stored machine and blocks.
        """
        info = self.successResultOf(self.call(self.client.snapshotInfo(self.path)))
        self.assertEqual(info["machine"], "pc-i440fx-7.2")
        self.assertEqual([(b["idstr"], b["length"]) for b in info["blocks"]],
                         [("pc.ram", RAM_PAGES * PAGE)])

    def test_infoMissing(self) -> None:
        """
        C{snapshot-info} of a directory that holds no snapshot fails with
        a typed L{errors.SnapshotError}.
        """
        failure = self.failureResultOf(self.call(self.client.snapshotInfo(self.mktemp())))
        failure.trap(errors.SnapshotError)

    def test_verify(self) -> None:
        """
        C{snapshot-verify} of an intact snapshot returns its info.
        """
        info = self.successResultOf(self.call(self.client.snapshotVerify(self.path)))
        self.assertEqual(info["path"], self.path)

    def test_verifyTampered(self) -> None:
        """
        C{snapshot-verify} of a snapshot whose RAM file changed fails with
        L{errors.SnapshotError} naming the file.
        """
        info = self.successResultOf(self.call(self.client.snapshotInfo(self.path)))
        name = os.path.join(self.path, info["blocks"][0]["file"])
        with open(name, "r+b") as f:
            f.write(b"X")
        failure = self.failureResultOf(self.call(self.client.snapshotVerify(self.path)))
        failure.trap(errors.SnapshotError)
        self.assertIn("sha256", failure.getErrorMessage())

    def test_read(self) -> None:
        """
        C{snapshot-read} longer than one AMP value is split by the client
        and returns the stored bytes.
        """
        offset, length = PAGE - 7, 2 * MAX_READ + 100
        data = self.successResultOf(self.call(
            self.client.snapshotRead(self.path, "pc.ram", offset, length)))
        self.assertEqual(data, self.ram[offset:offset + length])

    def test_readTooLarge(self) -> None:
        """
        One C{snapshot-read} call over L{MAX_READ} bytes fails with
        L{errors.SnapshotReadTooLargeError}.
        """
        failure = self.failureResultOf(self.call(
            self.client.snapshotRead(self.path, "pc.ram", 0, MAX_READ + 1, chunk=MAX_READ + 1)))
        failure.trap(errors.SnapshotReadTooLargeError)

    def test_readOutside(self) -> None:
        """
        C{snapshot-read} past the block's end, of an unknown block, or of
        a negative length fails with L{errors.SnapshotError}.
        """
        for block, offset, length in [("pc.ram", RAM_PAGES * PAGE - 1, 2), ("nope", 0, 1),
                                      ("pc.ram", 0, -1)]:
            failure = self.failureResultOf(self.call(
                self.client.snapshotRead(self.path, block, offset, length)))
            failure.trap(errors.SnapshotError)

    def test_readNoCapture(self) -> None:
        """
        C{snapshot-read} of the live capture (empty directory) with no
        capture running fails with L{errors.SnapshotError}.
        """
        failure = self.failureResultOf(self.call(self.client.snapshotRead("", "pc.ram", 0, 1)))
        failure.trap(errors.SnapshotError)

    def test_queryIdle(self) -> None:
        """
        C{query-snapshot} of an idle daemon reports no capture and no
        restore.
        """
        info = self.successResultOf(self.call(self.client.querySnapshot()))
        self.assertEqual(info, {"capture": None, "restores": []})

    def test_capture(self) -> None:
        """
        C{snapshot-capture} answers with the URI listened on;
        C{query-snapshot} reports the capture; a second capture while it
        runs fails with L{errors.SnapshotBusyError}.
        """
        target = os.path.abspath(self.mktemp())
        uri = self.successResultOf(self.call(
            self.client.snapshotCapture("tcp:127.0.0.1:4444", target)))
        self.assertTrue(uri.startswith("tcp:"), uri)
        self.assertEqual(self.reactor.tcpServers[0][0], 4444)
        capture = self.successResultOf(self.call(self.client.querySnapshot()))["capture"]
        self.assertEqual((capture["dir"], capture["postcopy"], capture["status"]),
                         (target, True, "setup"))
        failure = self.failureResultOf(self.call(
            self.client.snapshotCapture("tcp:127.0.0.1:4445", self.mktemp())))
        failure.trap(errors.SnapshotBusyError)

    def test_captureBadURI(self) -> None:
        """
        C{snapshot-capture} on a URI QEMU would not accept fails typed,
        and the daemon can capture again afterwards.
        """
        failure = self.failureResultOf(self.call(
            self.client.snapshotCapture("bogus:1", self.mktemp())))
        self.assertIsInstance(failure.value, errors.PostcopyError)
        self.successResultOf(self.call(self.client.snapshotCapture("tcp:127.0.0.1:0", self.mktemp())))

    def test_captureLiveRead(self) -> None:
        """
        Before postcopy, a read of the capture in progress (by its
        directory or by C{""}) returns what was received so far: zeros
        for pages not yet sent.
        """
        target = os.path.abspath(self.mktemp())
        self.successResultOf(self.call(self.client.snapshotCapture("tcp:127.0.0.1:0", target)))
        self.jobs.capture.vm.ramBlocksListed([("pc.ram", 4 * PAGE, None)])
        for path in (target, ""):
            data = self.successResultOf(self.call(self.client.snapshotRead(path, "pc.ram", 10, 20)))
            self.assertEqual(data, bytes(20))

    def test_liveReadTimeout(self) -> None:
        """
        A live read in postcopy whose page never arrives from the source
        fails with L{errors.SnapshotError} after L{LIVE_READ_TIMEOUT}
        seconds, rather than hanging.
        """
        self.successResultOf(self.call(self.client.snapshotCapture("tcp:127.0.0.1:0", self.mktemp())))
        vm = self.jobs.capture.vm
        vm.ramBlocksListed([("pc.ram", 4 * PAGE, None)])
        vm.inPostcopy = lambda: True
        vm.faults = _SilentSource
        d = self.call(self.client.snapshotRead("", "pc.ram", 0, 10))
        self.assertNoResult(d)
        self.reactor.advance(LIVE_READ_TIMEOUT)
        self.pump.flush()
        self.failureResultOf(d).trap(errors.SnapshotError)

    def test_captureStored(self) -> None:
        """
        Once the capture is stored, C{query-snapshot} reports it
        C{completed} and reads of it (by directory or C{""}) return the
        stored bytes.
        """
        target = os.path.abspath(self.mktemp())
        self.successResultOf(self.call(self.client.snapshotCapture("tcp:127.0.0.1:0", target)))
        vm = self.jobs.capture.vm
        vm.ramBlocksListed([("pc.ram", 4 * PAGE, None)])
        vm.blocks["pc.ram"].write(PAGE, b"x" * PAGE)
        vm.completed()
        capture = self.successResultOf(self.call(self.client.querySnapshot()))["capture"]
        self.assertEqual((capture["status"], capture["page-requests"]), ("completed", False))
        for path in (target, ""):
            data = self.successResultOf(self.call(self.client.snapshotRead(path, "pc.ram", PAGE - 2, 4)))
            self.assertEqual(data, b"\0\0xx")

    def test_captureFailed(self) -> None:
        """
        A failed capture is reported C{failed} with its reason, and a new
        capture may start.
        """
        self.successResultOf(self.call(self.client.snapshotCapture("tcp:127.0.0.1:0", self.mktemp())))
        self.jobs.capture.vm.failed("QEMU went away")
        capture = self.successResultOf(self.call(self.client.querySnapshot()))["capture"]
        self.assertEqual(capture["status"], "failed")
        self.assertIn("QEMU went away", capture["error"])
        self.successResultOf(self.call(self.client.snapshotCapture("tcp:127.0.0.1:0", self.mktemp())))

    def test_restore(self) -> None:
        """
        C{snapshot-restore} verifies the snapshot, connects to every
        destination, and C{query-snapshot} lists one clone per URI.
        """
        uris = ["tcp:127.0.0.1:5001", "tcp:127.0.0.1:5002"]
        self.successResultOf(self.call(self.client.snapshotRestore(self.path, uris, bandwidth=1 << 20)))
        self.assertEqual([c[1] for c in self.reactor.tcpClients], [5001, 5002])
        restores = self.successResultOf(self.call(self.client.querySnapshot()))["restores"]
        self.assertEqual(len(restores), 1)
        self.assertEqual([clone["uri"] for clone in restores[0]["clones"]], uris)
        self.assertEqual((restores[0]["dir"], restores[0]["postcopy"], restores[0]["status"]),
                         (self.path, True, "active"))

    def test_restorePreemptAndParameters(self) -> None:
        """
        C{snapshot-restore} with C{postcopy-preempt} and C{parameters}
        starts every clone with the capability on and those parameters
        set (the C{x-} ones of docs/prefetch.md, like the command line's
        C{--parameter}).
        """
        uris = ["tcp:127.0.0.1:5001", "tcp:127.0.0.1:5002"]
        self.successResultOf(self.call(self.client.snapshotRestore(
            self.path, uris, preempt=True, parameters={"x-readahead-pages": 8, "x-scan-follows-faults": 0})))
        managers = self.jobs.restores[0].managers
        self.assertEqual(len(managers), 2)
        for manager in managers:
            self.assertTrue(manager.capabilities["postcopy-preempt"])
            self.assertEqual((manager.parameters["x-readahead-pages"], manager.parameters["x-scan-follows-faults"]),
                             (8, 0))

    def test_restoreBadParameter(self) -> None:
        """
        C{snapshot-restore} with a parameter C{migrate-set-parameters}
        refuses fails with QEMU's text before anything starts: nothing is
        verified, no connection is made, no restore is listed.
        """
        for parameters, text in (({"x-no-such": 1}, "Parameter 'x-no-such' is unexpected"),
                                 ({"x-readahead-pages": 100000},
                                  "Parameter 'x-readahead-pages' expects an integer in the range of 0 to 512")):
            failure = self.failureResultOf(self.call(self.client.snapshotRestore(
                self.path, ["tcp:127.0.0.1:5001"], parameters=parameters)))
            failure.trap(errors.MigrationError)
            self.assertEqual(str(failure.value), text)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.jobs.restores, [])

    def test_restoreTampered(self) -> None:
        """
        C{snapshot-restore} of a tampered snapshot fails with
        L{errors.SnapshotError}, connects nowhere, and is reported failed.
        """
        info = self.successResultOf(self.call(self.client.snapshotInfo(self.path)))
        with open(os.path.join(self.path, info["blocks"][0]["file"]), "r+b") as f:
            f.write(b"X")
        failure = self.failureResultOf(self.call(
            self.client.snapshotRestore(self.path, ["tcp:127.0.0.1:5001"])))
        failure.trap(errors.SnapshotError)
        self.assertEqual(self.reactor.tcpClients, [])
        restores = self.successResultOf(self.call(self.client.querySnapshot()))["restores"]
        self.assertEqual(restores[0]["status"], "failed")

    def test_restoreNoDestination(self) -> None:
        """
        C{snapshot-restore} with no destination fails with
        L{errors.SnapshotError}.
        """
        failure = self.failureResultOf(self.call(self.client.snapshotRestore(self.path, [])))
        failure.trap(errors.SnapshotError)

    def test_noJobs(self) -> None:
        """
        A server built without snapshot jobs refuses the commands with
        L{errors.SnapshotError}, not an unknown remote error.
        """
        client, _, pump = iosim.connectedServerAndClient(lambda: ControlAMP(None), ControlClient)
        d = Deferred.fromCoroutine(client.querySnapshot())
        pump.flush()
        failure = self.failureResultOf(d)
        self.assertNotIsInstance(failure.value, UnknownRemoteError)
        failure.trap(errors.SnapshotError)


class AddressURITests(SynchronousTestCase):
    """
    L{addressURI} writes addresses as QEMU's migration URIs.
    """

    def test_forms(self) -> None:
        """
        IPv4, IPv6 and Unix addresses.
        """
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        self.assertEqual(addressURI(IPv4Address("TCP", "127.0.0.1", 4444)), "tcp:127.0.0.1:4444")
        self.assertEqual(addressURI(IPv6Address("TCP", "::1", 4444)), "tcp:[::1]:4444")
        self.assertEqual(addressURI(UNIXAddress(b"/run/m.sock")), "unix:/run/m.sock")
