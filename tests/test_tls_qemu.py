# -*- test-case-name: tests.test_tls_qemu -*-
"""
TLS migrations with a REAL QEMU 7.2 (TCG) in both directions
(docs/tls.md), certificates generated per test: QEMU's C{tls-creds-x509}
objects and ours read the same directory.

- A QEMU source with TLS, postcopy and C{postcopy-preempt} migrates into
  our destination (main stream, return path and preempt channel all over
  TLS; our C{tls-authz} checks QEMU's client certificate); our RAM equals
  the stopped source's.
- Our source with TLS migrates into a QEMU destination whose C{tls-authz}
  names our client certificate's distinguished name (so GnuTLS and we
  agree on its text), by precopy with the return path and by postcopy;
  QEMU's RAM equals ours.
- A peer whose certificates come from another CA is refused, in both
  directions, and the other side reports why.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

import hashlib

from tests.test_destination_qemu import qemuStatus
from tests.test_migration_loopback import skipWithoutUserfaultfd
from tests.test_source_qemu import RAM_RANGES, OurSourceIntoQEMU
from twisted_postcopy.testing.qemuguest import listenIncoming
from tests.test_tls import credentials, useTLS
from twisted_postcopy.testing.enginevm import OutgoingTestVM, PAGE
from twisted_postcopy.testing.workerguest import WorkerGuestVM
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.testing import pki
from twisted_postcopy.testing.relay import relayFor
from twisted_postcopy.testing.qemu import QEMUInstance, qemuSkipReason, startBootedQEMU
from twisted_postcopy.testing.waiting import waitUntil
from twisted_postcopy.testing.real import missingReal

MiB = 1 << 20


def qemuTLS(qemu: QEMUInstance, directory: str, endpoint: str, authz: str | None = None) -> None:
    """
    Give QEMU a C{tls-creds-x509} object C{tls0} and set C{tls-creds}
    (and C{tls-authz} with an C{authz-simple} C{auth0} allowing C{authz}).

    @param qemu: the instance.
    @param directory: the credentials directory.
    @param endpoint: C{server} or C{client}.
    @param authz: the identity allowed, if any.
    """
    qemu.qmp("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": directory,
                              "endpoint": endpoint})
    parameters = {"tls-creds": "tls0"}
    if authz is not None:
        qemu.qmp("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": authz})
        parameters["tls-authz"] = "auth0"
    qemu.qmp("migrate-set-parameters", **parameters)


def step(case: Any, waiting: Any, what: str, seconds: float = 60.0) -> Any:
    """
    Bound one wait of a test and say which one failed.

    @param case: the test case (with C{qemu} and C{manager}).
    @param waiting: a Deferred.
    @param what: what is awaited.
    @param seconds: the bound.
    @return: C{waiting}, failing with an assertion naming C{what} (and
        both sides' state) after C{seconds}.
    """
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    def timedOut(failure: Any) -> Any:
        failure.trap(DeferredTimeout)
        worker = getattr(getattr(case, "vm", None), "worker", None)
        raise AssertionError(
            f"{what}: not within {seconds} s; ours: {case.manager.status.value} "
            f"{case.manager.tlsRefused}; worker: {worker and worker.transport and worker.transport.pid} "
            f"{worker and getattr(worker, '_buffer', None)!r}; QEMU: {case.qemu.stderrTail()}")

    return waiting.addTimeout(seconds, reactor).addErrback(timedOut)


def requireQEMU() -> None:
    """
    Give up (strict mode: fail) without QEMU 7.2.
    """
    reason = qemuSkipReason()
    if reason:
        missingReal(reason)


class QEMUSourceTLSTests(TestCase):
    """
    Source: C{qemu-system-x86_64} with TLS.  Destination: ours.
    """

    timeout = 150

    def setUp(self) -> None:
        """
        QEMU, credentials, our destination with a faulting guest.
        """
        requireQEMU()
        skipWithoutUserfaultfd()
        self.directory = credentials(self)
        self.qemu = startBootedQEMU(self, "source")
        self.vm = WorkerGuestVM(reactor, touchFirst=[-1 - self.URGENT_STRIDE * n for n in range(self.URGENT_PAGES)])
        self.manager = MigrationManager(reactor, self.vm, self.vm.faultServiceFactory)

    #: How many pages near the end of C{pc.ram} the guest reads first
    #: (see L{tests.test_preempt_qemu.QEMUPreemptSourceTests}).
    URGENT_PAGES = 8
    #: ... one every this many pages, going down.
    URGENT_STRIDE = 16

    @inlineCallbacks
    def test_postcopyPreemptFromQEMU(self) -> None:
        """
        Postcopy with preempt from a QEMU source over TLS: both
        connections pass our checks (QEMU's client certificate, our
        C{tls-authz}), our guest worker's faults become page requests on
        the return path (the main TLS session) whose pages arrive on the
        preempt channel (TLS), which ends with its EOS; QEMU completes, the
        worker read exactly our RAM, which equals the stopped source's.

        The faults are made by construction, as in
        L{tests.test_preempt_qemu.QEMUPreemptSourceTests}: both bandwidths are 1000 B/s, so the
        streams cannot reach the end of C{pc.ram}, where the guest first
        reads L{URGENT_PAGES} pages with gaps; each is requested and
        arrives on the preempt channel.  Then the throttle is lifted.
        """
        qemuTLS(self.qemu, self.directory, "client")
        useTLS(self.manager, self.directory, "server", tls_authz="auth0")
        self.manager.objectAdd("authz-simple", "auth0", identity=pki.distinguishedName(
            os.path.join(self.directory, "client-cert.pem")))
        capabilities = {"postcopy-ram": True, "postcopy-preempt": True}
        self.qemu.setCapabilities(**capabilities)
        self.manager.setCapabilities(capabilities)
        self.qemu.setParameters(**{"max-bandwidth": 1000, "max-postcopy-bandwidth": 1000})
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{listening.getHost().port}")
        # QEMU 7.2 runs an outgoing TLS handshake with blocking reads on
        # its main loop, and our QMP calls block this reactor: query QEMU
        # only once both of its connections were accepted here.
        yield step(self, self.manager.destinationFactory.accepted, "main channel accepted")
        yield step(self, self.manager.destinationFactory.preempt.accepted,
                   "preempt channel accepted")
        yield step(self, qemuStatus(self.qemu, {"active"}), "QEMU active")
        yield step(self, self.vm.ready, "guest worker ready")
        self.qemu.qmp("migrate-start-postcopy")
        touched = yield step(self, self.vm.touchedFirst, "urgent pages read")
        self.assertEqual(self.manager.destinationFactory.preempt.preempt.recordsReceived,
                         self.URGENT_PAGES, touched)
        self.qemu.setParameters(**{"max-postcopy-bandwidth": 1 << 30})
        ours = yield step(self, self.manager.whenStatus("completed", "failed"), "our end")
        self.assertEqual(ours, "completed", str(self.vm.failure))
        info = yield step(self, qemuStatus(self.qemu, {"completed"}), "QEMU completed")
        self.assertEqual(info["status"], "completed", self.qemu.stderrTail())
        factory = self.manager.destinationFactory
        preempt = factory.preempt.preempt
        yield step(self, preempt.ended, "preempt EOS")
        digests = yield step(self, self.vm.done, "guest worker done")
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest()
                                   for data in self.vm.contents().values()])
        self.assertEqual(self.manager.tlsRefused, [])
        identity = "O=twisted-postcopy tests,CN=migration-client"
        self.assertEqual((factory.main.transport.peerIdentity, preempt.transport.peerIdentity),
                         (identity, identity))
        self.assertGreaterEqual(info["ram"]["postcopy-requests"], self.URGENT_PAGES)
        self.assertGreaterEqual(preempt.recordsReceived, self.URGENT_PAGES)
        self.assertTrue(preempt.decoder.complete)
        ram = self.vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(self.qemu.pmemsave(start, length), ram[start : start + length])

    @inlineCallbacks
    def test_foreignCA(self) -> None:
        """
        A QEMU source whose credentials come from another CA is refused:
        QEMU's migration fails naming our certificate's issuer, we log the
        refused handshake and stay in C{setup}.
        """
        qemuTLS(self.qemu, credentials(self, "other"), "client")
        useTLS(self.manager, self.directory, "server")
        listening = yield self.manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        self.qemu.migrate(f"tcp:127.0.0.1:{listening.getHost().port}")
        # (No QMP call before our side answered the handshake: see above.)
        while not self.manager.tlsRefused:
            yield deferLater(reactor, 0.01, lambda: None)
        info = yield qemuStatus(self.qemu, {"completed"})
        self.assertEqual(info["status"], "failed")
        self.assertIn("The certificate hasn't got a known issuer", info.get("error-desc", ""))
        self.assertIn("TLS handshake failed (server)", self.manager.tlsRefused[0])
        self.assertEqual(self.manager.status.value, "setup")


class QEMUDestinationTLSTests(OurSourceIntoQEMU, TestCase):
    """
    Source: ours with TLS.  Destination: C{qemu-system-x86_64 -incoming
    defer -S} with TLS.
    """

    timeout = 90

    def setUp(self) -> None:
        """
        QEMU, credentials, our source VM with a pattern.
        """
        requireQEMU()
        self.directory = credentials(self)
        self.startSourceAndQEMU()

    def prepareMigration(self) -> None:
        """
        TLS on both ends: QEMU's C{tls-authz} allows our client
        certificate's name.
        """
        qemuTLS(self.qemu, self.directory, "server",
                authz=pki.distinguishedName(os.path.join(self.directory, "client-cert.pem")))
        useTLS(self.manager, self.directory, "client")

    def test_precopyToQEMU(self) -> None:
        """
        Precopy with the return path (PING/SHUT over the same TLS session).
        """
        return self._migrate(False)

    def test_postcopyToQEMU(self) -> None:
        """
        Immediate postcopy: page requests come back over TLS.
        """
        return self._migrate(True)

    def test_postcopyPreemptToQEMU(self) -> None:
        """
        Immediate postcopy with C{postcopy-preempt}: our preempt channel
        is a second TLS session, which QEMU accepts as its preempt channel
        after its own handshake; QEMU completes with our RAM.
        """
        return self._migrate(True, preempt=True)

    @inlineCallbacks
    def test_foreignCA(self) -> None:
        """
        Our source, trusting another CA, refuses QEMU's server certificate
        with QEMU's text; QEMU reports the failed handshake.
        """
        qemuTLS(self.qemu, self.directory, "server")
        useTLS(self.manager, credentials(self, "other"), "client")
        host, port = listenIncoming(self.qemu)
        self.manager.migrate(f"tcp:{host}:{port}")
        status = yield self.manager.whenStatus("completed", "failed")
        self.assertEqual(status, "failed")
        self.assertIn("The certificate hasn't got a known issuer",
                      self.manager.queryMigrate()["error-desc"])
        while "TLS" not in self.qemu.stderrTail(20) and "tls" not in self.qemu.stderrTail(20):
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.qemu.status(), "inmigrate")


class QEMUSnapshotTLSTests(TestCase):
    """
    Snapshots over TLS: capture a running QEMU 7.2 source (precopy
    switched to postcopy) into a snapshot, then restore it by postcopy
    into a fresh QEMU, both connections over TLS.
    """

    timeout = 120

    @inlineCallbacks
    def test_captureAndRestore(self) -> None:
        """
        The captured RAM equals the paused source's memory above 1 MiB;
        the restored QEMU completes and its guest runs consistently.
        """
        from tests.snapshotqemu import (
            LAYOUT, MEMORY_MIB, TIMEOUT, bootImage, restoreTarget, runningSource)
        from twisted_postcopy.snapshot.capture import captureSnapshot
        from twisted_postcopy.snapshot.restore import restoreSnapshot
        from twisted_postcopy.testing.bootsector import checkCounterPattern
        from twisted_postcopy.testing.qemubaseline import MIB, stopAndCheck
        from twisted_postcopy.tlscreds import ObjectRegistry

        requireQEMU()
        skipWithoutUserfaultfd()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        credentialsDir = credentials(self)
        objects = ObjectRegistry()
        objects.add("tls-creds-x509", "server0", dir=credentialsDir, endpoint="server")
        objects.add("tls-creds-x509", "client0", dir=credentialsDir, endpoint="client")
        image = bootImage(directory)
        source = runningSource(directory, image)
        self.addCleanup(source.kill)
        target = os.path.join(directory, "snapshot")
        listening, vm = captureSnapshot(reactor, "tcp:127.0.0.1:0", target, objects=objects,
                                        tls={"tls-creds": "server0"})
        port = yield listening
        qemuTLS(source, credentialsDir, "client")
        source.setCapabilities(**{"postcopy-ram": True, "return-path": True})
        source.setParameters(**{"max-bandwidth": 16 << 20})
        source.migrate(f"tcp:127.0.0.1:{port.getHost().port}")
        # QEMU's TLS handshake blocks its monitor until we answered it.
        yield vm.migration.destinationFactory.accepted
        yield qemuStatus(source, {"active"})
        source.qmp("migrate-start-postcopy")
        snapshot = yield vm.stored
        info = yield qemuStatus(source, {"completed"})
        self.assertEqual(info["status"], "completed", source.stderrTail())
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
        self.assertIsNotNone(vm.migration.destinationFactory.main.transport.peerIdentity)
        stored = snapshot.read("pc.ram", 0, MEMORY_MIB * MIB)
        self.assertTrue(stored[MIB:] == source.pmemsave(0, MEMORY_MIB * MIB)[MIB:],
                        "captured RAM differs from the source")
        checkCounterPattern(stored, LAYOUT)

        qemu, uri = restoreTarget(directory, "restored", image, True)
        self.addCleanup(qemu.kill)
        qemuTLS(qemu, credentialsDir, "server",
                authz=pki.distinguishedName(os.path.join(credentialsDir, "client-cert.pem")))
        managers, done = restoreSnapshot(reactor, target, [uri], postcopy=True, objects=objects,
                                         tls={"tls-creds": "client0"})
        statuses = yield done
        self.assertEqual(statuses, ["completed"])
        qemu.waitMigration(["completed"], TIMEOUT)
        qemu.waitSerial(len(qemu.serialOutput()) + 2, TIMEOUT)
        stopAndCheck(qemu, LAYOUT)

        # The standalone command line, into another QEMU.
        from tests.snapshotqemu import finish, snapshotCommand, summaries

        clone, uri = restoreTarget(directory, "clone", image, True)
        self.addCleanup(clone.kill)
        qemuTLS(clone, credentialsDir, "server")
        code, out, err = finish(snapshotCommand(
            "restore", target, "--to", uri, "--postcopy",
            "--object", f"tls-creds-x509,id=c,dir={credentialsDir},endpoint=client",
            "--tls-creds", "c", "--tls-hostname", "localhost"))
        self.assertEqual(code, 0, err.decode())
        self.assertEqual([s["status"] for s in summaries(out)], ["completed"])
        clone.waitMigration(["completed"], TIMEOUT)
        clone.waitSerial(len(clone.serialOutput()) + 2, TIMEOUT)
        stopAndCheck(clone, LAYOUT)


class QEMURecoveryTLSTests(TestCase):
    """
    Postcopy recovery over TLS with a real QEMU 7.2 peer, both ways: the
    first connection goes through a relay that is cut during postcopy;
    the recovery connection (C{migrate-recover}, C{migrate} with
    C{resume}) is TLS too.
    """

    timeout = 90

    def setUp(self) -> None:
        """
        Credentials; QEMU comes per test.
        """
        requireQEMU()
        self.directory = credentials(self)

    @inlineCallbacks
    def test_recoverIntoQEMU(self) -> None:
        """
        Ours to a QEMU destination over TLS: cut, QEMU's C{migrate-recover},
        our C{migrate} resume over TLS; QEMU completes with our RAM.
        """
        from tests.test_recovery_loopback import within
        from tests.test_recovery_qemu import qemuStatus as qemuReached
        from twisted_postcopy.testing.qemuguest import incomingAddress

        qemu = startBootedQEMU(self, "destination", ["-S", "-incoming", "defer"])
        vm = OutgoingTestVM({"pc.ram": 32 * MiB})
        for offset in range(0, 32 * MiB, 3 * PAGE):
            vm.write(0, offset, struct.pack(">Q", offset) * 64)
        manager = MigrationManager(reactor, vm)
        manager.setCapabilities({"postcopy-ram": True})
        manager.setParameters({"max-bandwidth": 0, "max-postcopy-bandwidth": 4 * MiB})
        useTLS(manager, self.directory, "client")
        qemu.setCapabilities(**{"postcopy-ram": True})
        qemuTLS(qemu, self.directory, "server")
        first = relayFor(self, listenIncoming(qemu))
        manager.migrate(first.uri)
        manager.startPostcopy()
        yield within(manager.whenStatus("postcopy-active"))
        # PONG 3: QEMU ran POSTCOPY_RUN, so it pauses (before that a cut
        # fails it).
        yield waitUntil(reactor, lambda: manager.outgoing.destinationRunning, 30)
        first.cut()
        yield within(manager.whenStatus("postcopy-paused"))
        yield qemuReached(qemu, "postcopy-paused")
        qemu.qmp("migrate-recover", uri="tcp:127.0.0.1:0")
        second = relayFor(self, incomingAddress(qemu))
        manager.migrate(second.uri, resume=True)
        status = yield within(manager.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed",
                         f"{manager.queryMigrate().get('error-desc')} {qemu.stderrTail()}")
        info = qemu.waitMigration(["completed"], timeout=30)
        self.assertEqual(info["status"], "completed")
        ram = vm.blocks[0].map
        for start, length in RAM_RANGES:
            self.assertEqual(qemu.pmemsave(start, length), ram[start : start + length])
        forward = bytes(second.connections[0].forward)
        self.assertEqual(forward[:1], b"\x16")
        self.assertNotIn(b"pc.ram", forward)

    @inlineCallbacks
    def test_recoverFromQEMU(self) -> None:
        """
        A QEMU source over TLS into ours: cut, our C{migrate-recover},
        QEMU's C{migrate} resume over TLS; both complete and our RAM
        equals the stopped source's.
        """
        from tests.test_recovery_loopback import within
        from tests.test_recovery_qemu import qemuStatus as qemuReached

        skipWithoutUserfaultfd()
        qemu = startBootedQEMU(self, "source")
        vm = WorkerGuestVM(reactor)
        manager = MigrationManager(reactor, vm, vm.faultServiceFactory)
        manager.setCapabilities({"postcopy-ram": True})
        useTLS(manager, self.directory, "server")
        qemu.setCapabilities(**{"postcopy-ram": True})
        qemu.setParameters(**{"max-bandwidth": 100000, "max-postcopy-bandwidth": 40000})
        qemuTLS(qemu, self.directory, "client")
        listening = yield manager.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(listening.stopListening)
        first = relayFor(self, ("127.0.0.1", listening.getHost().port))
        qemu.migrate(first.uri)
        yield manager.destinationFactory.accepted
        yield qemuReached(qemu, "active")
        qemu.qmp("migrate-start-postcopy")
        yield within(manager.whenStatus("postcopy-active"))
        yield deferLater(reactor, 0.5, lambda: None)
        first.cut()
        yield within(manager.whenStatus("postcopy-paused"))
        yield qemuReached(qemu, "postcopy-paused")
        port = yield manager.migrateRecover("tcp:127.0.0.1:0")
        second = relayFor(self, ("127.0.0.1", port.getHost().port))
        qemu.setParameters(**{"max-postcopy-bandwidth": 0})
        qemu.qmp("migrate", uri=second.uri, resume=True)
        # (QEMU's handshake blocks its monitor until we answered it.)
        yield within(manager.whenStatus("postcopy-recover", "postcopy-active", "completed"))
        ours = yield within(manager.whenStatus("completed", "failed"))
        self.assertEqual(ours, "completed", str(vm.failure))
        info = yield qemuReached(qemu, "completed")
        self.assertGreater(info["ram"]["postcopy-bytes"], 0)
        digests = yield within(vm.done)
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest()
                                   for data in vm.contents().values()])
        ram = vm.contents()["pc.ram"]
        for start, length in RAM_RANGES:
            self.assertEqual(qemu.pmemsave(start, length), ram[start : start + length])
        forward = bytes(second.connections[0].forward)
        self.assertEqual(forward[:1], b"\x16")
        self.assertEqual(manager.tlsRefused, [])
