# -*- test-case-name: tests.test_tls -*-
"""
TLS on the migration channels between two of our managers over real
loopback TCP (docs/tls.md): certificates are generated per test by
L{twisted_postcopy.testing.pki}; a migration over TLS arrives intact; a
peer with a certificate from another CA, a wrong C{tls-hostname}, a client
refused by C{tls-authz} and a plaintext peer are refused on both sides with
QEMU's texts, and the destination keeps waiting for a good source.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

import tests.test_migration_loopback as loopback
import tests.test_recovery_loopback as recovery
from twisted_postcopy.testing.enginevm import IncomingTestVM, OutgoingTestVM
from twisted_postcopy.errors import MigrationError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.protocols.sockets import transportSocket
from twisted_postcopy.protocols.tls import MigrationTLSProtocol
from twisted_postcopy.testing import pki
from twisted_postcopy.tlscreds import (
    ObjectRegistry, TLSError, matchesHostname, parseObjectOption)

MiB = 1 << 20


def credentials(case: Any, name: str = "pki", authority: Any = None, **options: Any) -> str:
    """
    @param case: the test case (its temporary directory).
    @param name: the directory's name.
    @param authority: the CA to issue from (default: a new one).
    @param options: more arguments of L{pki.writeCredentials}.
    @return: a fresh credentials directory.
    """
    directory = os.path.join(os.path.abspath(case.mktemp()), name)
    pki.writeCredentials(directory, authority, **options)
    return directory


def useTLS(manager: MigrationManager, directory: str, endpoint: str, **parameters: str) -> None:
    """
    Create C{tls0} on a manager and set C{tls-creds} (plus more parameters).

    @param manager: the manager.
    @param directory: the credentials directory.
    @param endpoint: C{server} (destination) or C{client} (source).
    @param parameters: more TLS parameters (Python names, e.g.
        C{tls_hostname}).
    """
    manager.objectAdd("tls-creds-x509", "tls0", dir=directory, endpoint=endpoint)
    manager.setParameters({"tls-creds": "tls0",
                           **{k.replace("_", "-"): v for k, v in parameters.items()}})


class ObjectTests(SynchronousTestCase):
    """
    C{object-add} and the TLS parameters, without connections.
    """

    def setUp(self) -> None:
        """
        A credentials directory.
        """
        self.directory = credentials(self)

    def test_parameters(self) -> None:
        """
        The three TLS parameters are strings, empty by default, shown by
        C{query-migrate-parameters}; null resets one; a number is refused.
        """
        manager = MigrationManager(reactor, OutgoingTestVM({"pc.ram": MiB}))
        self.assertEqual({k: manager.queryParameters()[k] for k in
                          ("tls-creds", "tls-hostname", "tls-authz")},
                         {"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
        manager.setParameters({"tls-creds": "tls0", "tls-hostname": "host.example"})
        manager.setParameters({"tls-hostname": None})
        self.assertEqual(manager.queryParameters()["tls-creds"], "tls0")
        self.assertEqual(manager.queryParameters()["tls-hostname"], "")
        error = self.assertRaises(MigrationError, manager.setParameters, {"tls-creds": 5})
        self.assertEqual(str(error), "Invalid parameter type for 'tls-creds', expected: string")

    def test_migrateWithoutObject(self) -> None:
        """
        C{migrate} with C{tls-creds} naming nothing, or server credentials,
        is refused with QEMU's text before connecting.
        """
        manager = MigrationManager(reactor, OutgoingTestVM({"pc.ram": MiB}))
        manager.setParameters({"tls-creds": "missing"})
        error = self.assertRaises(MigrationError, manager.migrate, "tcp:127.0.0.1:1")
        self.assertEqual(str(error), "No TLS credentials with id 'missing'")
        useTLS(manager, self.directory, "server")
        error = self.assertRaises(MigrationError, manager.migrate, "tcp:127.0.0.1:1")
        self.assertEqual(str(error), "Expected TLS credentials for a client endpoint")
        self.assertIsNone(manager.outgoing)

    def test_incomingWithWrongObjects(self) -> None:
        """
        C{migrate-incoming} needs server credentials, and C{tls-authz}
        must name an C{authz-simple} object.
        """
        manager = MigrationManager(reactor, IncomingTestVM())
        useTLS(manager, self.directory, "client")
        error = self.assertRaises(MigrationError, manager.migrateIncoming, "tcp:127.0.0.1:0")
        self.assertEqual(str(error), "Expected TLS credentials for a server endpoint")
        manager.objectAdd("tls-creds-x509", "server0", dir=self.directory, endpoint="server")
        manager.setParameters({"tls-creds": "server0", "tls-authz": "nobody"})
        error = self.assertRaises(MigrationError, manager.migrateIncoming, "tcp:127.0.0.1:0")
        self.assertEqual(str(error), "No authorization object with id 'nobody'")
        self.assertIsNone(manager.incoming)

    def test_objectErrors(self) -> None:
        """
        Missing files, unknown types and properties and duplicate ids get
        specific errors; C{object-del} removes an object.
        """
        objects = ObjectRegistry()
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        error = self.assertRaises(TLSError, objects.add, "tls-creds-x509", "a", dir=empty,
                                  endpoint="server")
        self.assertEqual(str(error), f"Unable to access credentials {empty}/ca-cert.pem: "
                                     "No such file or directory")
        self.assertRaises(TLSError, objects.add, "tls-creds-psk", "a", dir=empty)
        self.assertRaises(TLSError, objects.add, "tls-creds-x509", "a", dir=empty, bogus="1")
        self.assertRaises(TLSError, objects.add, "tls-creds-x509", "a", dir=self.directory,
                          endpoint="middle")
        objects.add("tls-creds-x509", "a", dir=self.directory, endpoint="server")
        error = self.assertRaises(TLSError, objects.add, "authz-simple", "a", identity="x")
        self.assertIn("duplicate", str(error))
        self.assertEqual(objects.describe(), [{"qom-type": "tls-creds-x509", "id": "a",
                                               "dir": self.directory, "endpoint": "server",
                                               "verify-peer": True}])
        objects.remove("a")
        self.assertEqual(objects.describe(), [])
        self.assertRaises(TLSError, objects.remove, "a")

    def test_foreignServerCertificate(self) -> None:
        """
        A server certificate not issued by the directory's CA is refused
        when the object is created (QEMU's sanity check).
        """
        other = credentials(self, "other")
        os.remove(os.path.join(self.directory, "ca-cert.pem"))
        os.link(os.path.join(other, "ca-cert.pem"), os.path.join(self.directory, "ca-cert.pem"))
        error = self.assertRaises(TLSError, ObjectRegistry().add, "tls-creds-x509", "a",
                                  dir=self.directory, endpoint="server")
        self.assertIn("Unable to verify server certificate", str(error))

    def test_objectOption(self) -> None:
        """
        QEMU's C{-object} syntax: type, then C{name=value} pairs, C{,,} for
        a comma.
        """
        self.assertEqual(
            parseObjectOption("tls-creds-x509,id=tls0,dir=/etc/a,,b,endpoint=server"),
            ("tls-creds-x509", "tls0", {"dir": "/etc/a,b", "endpoint": "server"}))
        self.assertRaises(TLSError, parseObjectOption, "tls-creds-x509,dir=/x")
        self.assertRaises(TLSError, parseObjectOption, "id=x")

    def test_hostnames(self) -> None:
        """
        Host names match C{dNSName} entries (leftmost wildcard too) and IP
        addresses C{iPAddress} entries, as GnuTLS checks them for QEMU.
        """
        from cryptography import x509

        authority = pki.newAuthority()
        pem, _ = pki.issue(authority, "server", True, ["localhost", "*.example.com", "10.0.0.1"])
        certificate = x509.load_pem_x509_certificate(pem)
        for name in ("localhost", "LOCALHOST", "a.example.com", "10.0.0.1"):
            self.assertTrue(matchesHostname(certificate, name), name)
        for name in ("example.com", "a.b.example.com", "10.0.0.2", "127.0.0.1", "server"):
            self.assertFalse(matchesHostname(certificate, name), name)
        pem, _ = pki.issue(authority, "cn.example", True)
        self.assertTrue(matchesHostname(x509.load_pem_x509_certificate(pem), "cn.example"))


class TLSLoopbackTests(TestCase):
    """
    Two managers, real loopback TCP, TLS on.
    """

    timeout = 60

    def setUp(self) -> None:
        """
        A source VM with a pattern, a destination, one credentials
        directory for both ends.
        """
        self.source = OutgoingTestVM({"pc.ram": 4 * MiB, "pc.rom": 128 * 1024},
                                     device=loopback.ownDevice(b"cpu state"))
        loopback.fill(self.source, 3)
        self.destination = IncomingTestVM()
        self.src = MigrationManager(reactor, self.source)
        self.dst = MigrationManager(reactor, lambda: self.destination)
        self.src.setCapabilities({"return-path": True})
        self.directory = credentials(self)

    @inlineCallbacks
    def listen(self):
        """
        Start the destination on an ephemeral loopback port.

        @return: a Deferred firing with the URI.
        """
        port = yield self.dst.migrateIncoming("tcp:127.0.0.1:0")
        self.addCleanup(port.stopListening)
        return f"tcp:127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def migrate(self, uri: str):
        """
        Migrate and wait for both ends.

        @param uri: the destination.
        @return: a Deferred firing with (source status, destination status).
        """
        self.src.migrate(uri)
        source = yield self.src.whenStatus("completed", "failed")
        destination = yield self.dst.whenStatus("completed", "failed")
        return source, destination

    @inlineCallbacks
    def test_precopy(self) -> None:
        """
        Precopy with the return path over one TLS session: both complete,
        RAM and device state arrive intact, the main connection was TLS
        with the client certificate verified, and the socket under it is
        reachable for socket options.
        """
        useTLS(self.src, self.directory, "client")
        useTLS(self.dst, self.directory, "server")
        uri = yield self.listen()
        result = yield self.migrate(uri)
        self.assertEqual(result, ("completed", "completed"))
        self.assertEqual(self.destination.contents(), self.source.contents())
        self.assertEqual(self.destination.devices, [loopback.ownDevice(b"cpu state")])
        transport = self.dst.destinationFactory.main.transport
        self.assertIsInstance(transport, MigrationTLSProtocol)
        self.assertEqual(transport.peerIdentity, "O=twisted-postcopy tests,CN=migration-client")
        self.assertEqual(self.dst.tlsRefused, [])

    @inlineCallbacks
    def test_nothingInTheClear(self) -> None:
        """
        Through a recording relay, both directions of a TLS migration are
        TLS records only: neither the stream's magic, nor the device state,
        nor a page's pattern, nor the return path's messages appear in the
        clear (the source's batched C{sendmsg} from guest memory must not
        bypass TLS).
        """
        from twisted_postcopy.testing.relay import RecordingRelay

        useTLS(self.src, self.directory, "client")
        useTLS(self.dst, self.directory, "server")
        uri = yield self.listen()
        relay = RecordingRelay(("127.0.0.1", int(uri.rpartition(":")[2])))
        self.addCleanup(relay.close)
        result = yield self.migrate(relay.uri)
        self.assertEqual(result, ("completed", "completed"))
        self.assertEqual(self.destination.contents(), self.source.contents())
        [connection] = relay.waitConnections(1)
        forward, backward = bytes(connection.forward), bytes(connection.backward)
        self.assertGreater(len(forward), 4 * MiB // 2)
        self.assertEqual((forward[:1], backward[:1]), (b"\x16", b"\x16"))
        page = self.source.contents()["pc.ram"][2 * 4096 * 7:][:64]
        for secret in (b"QEVM", b"cpu state", page):
            self.assertNotIn(secret, forward)
        self.assertNotIn(b"\x00\x01\x00\x04\x00\x00\x00\x00", backward)  # SHUT(0)

    @inlineCallbacks
    def test_unixNeedsHostname(self) -> None:
        """
        Over a C{unix:} URI there is no host to check the certificate
        against: without C{tls-hostname} the source refuses with QEMU's
        text; with it the migration completes.
        """
        import tempfile

        directory = tempfile.mkdtemp(prefix="tpc-tls")
        self.addCleanup(__import__("shutil").rmtree, directory)
        uri = f"unix:{directory}/migration.sock"
        useTLS(self.dst, self.directory, "server")
        port = yield self.dst.migrateIncoming(uri)
        self.addCleanup(port.stopListening)
        useTLS(self.src, self.directory, "client")
        self.src.migrate(uri)
        status = yield self.src.whenStatus("completed", "failed")
        self.assertEqual(status, "failed")
        self.assertIn("No hostname for certificate validation", self.src.queryMigrate()["error-desc"])
        good = MigrationManager(reactor, self.source)
        useTLS(good, self.directory, "client", tls_hostname="localhost")
        good.migrate(uri)
        status = yield good.whenStatus("completed", "failed")
        self.assertEqual(status, "completed", good.queryMigrate().get("error-desc"))
        yield self.dst.whenStatus("completed")
        self.assertEqual(self.destination.contents(), self.source.contents())

    def test_socketUnderTLS(self) -> None:
        """
        L{transportSocket} finds the socket under a TLS layer.
        """
        from twisted.internet.protocol import Protocol
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
        from twisted.internet.testing import StringTransport

        class Handle(StringTransport):
            def getHandle(self):
                return self.sock

        lower = Handle()
        lower.sock = socket.socket()
        self.addCleanup(lower.sock.close)
        wrapper = ProtocolWrapper(WrappingFactory(None), Protocol())
        wrapper.makeConnection(lower)
        self.assertIs(transportSocket(wrapper), lower.sock)
        self.assertIsNone(transportSocket(StringTransport()))

    @inlineCallbacks
    def assertRefused(self, sourceText: str, destinationText: str, thenGood: bool = True):
        """
        Migrate to a TLS destination and expect the handshake refused on
        both sides; then a good source still migrates to it.

        @param sourceText: expected in the source's error.
        @param destinationText: expected in the destination's refusal.
        @param thenGood: then migrate from a good source.
        """
        uri = yield self.listen()
        self.src.migrate(uri)
        status = yield self.src.whenStatus("completed", "failed")
        self.assertEqual(status, "failed")
        self.assertIn(sourceText, self.src.queryMigrate()["error-desc"])
        while not self.dst.tlsRefused:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertIn(destinationText, " | ".join(self.dst.tlsRefused))
        self.assertEqual(self.dst.status.value, "setup")
        self.assertIsNone(self.dst.destinationFactory.main)
        if not thenGood:
            return
        good = MigrationManager(reactor, self.source)
        useTLS(good, self.directory, "client")
        good.migrate(uri)
        status = yield good.whenStatus("completed", "failed")
        self.assertEqual(status, "completed", good.queryMigrate().get("error-desc"))
        yield self.dst.whenStatus("completed")
        self.assertEqual(self.destination.contents(), self.source.contents())

    def test_foreignCA(self) -> None:
        """
        A source whose CA did not issue the destination's certificate
        refuses it; the destination refuses the source's certificate.
        """
        other = credentials(self, "other")
        useTLS(self.src, other, "client")
        useTLS(self.dst, self.directory, "server")
        return self.assertRefused("The certificate hasn't got a known issuer",
                                  "TLS handshake failed (server)")

    def test_foreignClientCertificate(self) -> None:
        """
        A source trusting the right CA (and its own) but holding a client
        certificate from another CA is refused by the destination, which
        names the reason; the source sees the connection fail.
        """
        mixed = credentials(self, "mixed")
        other = credentials(self, "other")
        for name in ("client-cert.pem", "client-key.pem"):
            os.remove(os.path.join(mixed, name))
            os.link(os.path.join(other, name), os.path.join(mixed, name))
        with open(os.path.join(self.directory, "ca-cert.pem"), "rb") as ours, \
                open(os.path.join(other, "ca-cert.pem"), "rb") as theirs:
            bundle = ours.read() + theirs.read()
        with open(os.path.join(mixed, "ca-cert.pem"), "wb") as f:
            f.write(bundle)
        self.src.objectAdd("tls-creds-x509", "tls0", dir=mixed, endpoint="client")
        self.src.setParameters({"tls-creds": "tls0"})
        useTLS(self.dst, self.directory, "server")
        return self.assertRefused("TLS", "The certificate hasn't got a known issuer")

    def test_clientCertificateAsServer(self) -> None:
        """
        A destination presenting a certificate made for clients (extended
        key usage clientAuth only) is refused by the source.
        """
        wrong = os.path.abspath(self.mktemp())
        os.makedirs(wrong)
        for source, name in (("ca-cert.pem", "ca-cert.pem"), ("client-cert.pem", "server-cert.pem"),
                             ("client-key.pem", "server-key.pem")):
            os.link(os.path.join(self.directory, source), os.path.join(wrong, name))
        useTLS(self.src, self.directory, "client")
        self.dst.objectAdd("tls-creds-x509", "tls0", dir=wrong, endpoint="server")
        self.dst.setParameters({"tls-creds": "tls0"})
        return self.assertRefused("unsuitable purpose", "TLS", thenGood=False)

    def test_wrongHostname(self) -> None:
        """
        A C{tls-hostname} the server certificate does not carry is refused
        by the source with QEMU's text.
        """
        useTLS(self.src, self.directory, "client", tls_hostname="elsewhere.example")
        useTLS(self.dst, self.directory, "server")
        return self.assertRefused("Certificate does not match the hostname elsewhere.example",
                                  "TLS")

    def test_authzRefused(self) -> None:
        """
        C{tls-authz} names an C{authz-simple} object whose identity is not
        the client's distinguished name: the destination refuses the
        client with QEMU's text.
        """
        useTLS(self.src, self.directory, "client")
        useTLS(self.dst, self.directory, "server", tls_authz="auth0")
        self.dst.objectAdd("authz-simple", "auth0", identity="CN=somebody-else")
        d = self.assertRefused(
            "", "TLS x509 authz check for O=twisted-postcopy tests,CN=migration-client is denied",
            thenGood=False)
        return d

    def test_plaintextSource(self) -> None:
        """
        A source without TLS cannot migrate to a TLS destination.
        """
        useTLS(self.dst, self.directory, "server")
        return self.assertRefused("", "TLS handshake failed (server)")

    @inlineCallbacks
    def test_authzAllowed(self) -> None:
        """
        C{tls-authz} with the client's distinguished name lets it in.
        """
        useTLS(self.src, self.directory, "client")
        useTLS(self.dst, self.directory, "server", tls_authz="auth0")
        self.dst.objectAdd("authz-simple", "auth0", identity=pki.distinguishedName(
            os.path.join(self.directory, "client-cert.pem")))
        uri = yield self.listen()
        result = yield self.migrate(uri)
        self.assertEqual(result, ("completed", "completed"))
        self.assertEqual(self.destination.contents(), self.source.contents())


class _BothOverTLS:
    """
    A mixin for a loopback test case with C{src} and C{dst} managers: TLS
    credentials on both sides once the base setup made them.
    """

    def setUp(self) -> None:
        """
        The base setup, then TLS credentials on both sides.
        """
        super().setUp()
        directory = credentials(self)
        useTLS(self.src, directory, "client")
        useTLS(self.dst, directory, "server")


class TLSPostcopyLoopbackTests(_BothOverTLS, loopback.PostcopyLoopbackTests):
    """
    L{tests.test_migration_loopback.PostcopyLoopbackTests} (postcopy with
    a real faulting guest process, page requests on the return path) with
    TLS on both managers.
    """



class TLSRecoveryTests(_BothOverTLS, recovery.RecoveryLoopbackTests):
    """
    L{tests.test_recovery_loopback.RecoveryLoopbackTests} (cuts,
    C{migrate-pause} from either side, which shuts the socket under the
    TLS layer, bad recovery handshakes) with TLS on both managers, so the
    recovery connection (C{migrate-recover} / C{migrate} with C{resume})
    is TLS too.
    """

    def assertRecoveryWire(self, relay: Any) -> None:
        """
        The recovery connection is TLS from its first byte: a handshake
        record, and no RECV_BITMAP or block name in the clear.

        @param relay: the recovery relay.
        """
        forward = bytes(relay.connections[0].forward)
        self.assertEqual(forward[:1], b"\x16")
        self.assertNotIn(b"pc.ram", forward)
        self.assertNotIn(b"pc.ram", bytes(relay.connections[0].backward))

    @inlineCallbacks
    def test_badHandshakesPauseAgain(self) -> None:
        """
        Over TLS a plaintext intruder on the recovery port never reaches
        the recovery handshake: TLS refuses it and the destination stays
        C{postcopy-paused} (no C{postcopy-recover}); a refused resume
        connect leaves the source paused; then a TLS recovery completes.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        relay = yield self.startPostcopy()
        relay.cut()
        yield recovery.within(self.src.whenStatus("postcopy-paused"))
        yield recovery.within(self.dst.whenStatus("postcopy-paused"))
        recoverPort = yield self.dst.migrateRecover("tcp:127.0.0.1:0")
        intruder = recovery._Peer(send=recovery.recvBitmapCommand("xyz"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", recoverPort.getHost().port),
                              intruder)
        yield recovery.within(intruder.done)
        self.assertIn("TLS handshake failed (server)", " ".join(self.dst.tlsRefused))
        self.assertEqual(self.events["dst"][-2:], ["postcopy-paused", "setup"])
        self.assertEqual(self.dst.status.value, "postcopy-paused")
        closed = socket.create_server(("127.0.0.1", 0))
        closedPort = closed.getsockname()[1]
        closed.close()
        self.src.migrate(f"tcp:127.0.0.1:{closedPort}", resume=True)
        for _ in range(int(recovery.WAIT / 0.01)):
            if self.src.outgoing.stats.error:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.src.status.value, "postcopy-paused")
        self.src.migrate(f"tcp:127.0.0.1:{recoverPort.getHost().port}", resume=True)
        status = yield recovery.within(self.src.whenStatus("completed", "failed"))
        self.assertEqual(status, "completed")
        digests = yield recovery.within(self.destination.done)
        self.assertEqual(digests, [hashlib.sha256(data).hexdigest()
                                   for data in self.source.contents().values()])


class HandshakeTimeoutTests(SynchronousTestCase):
    """
    A peer that connects and never completes the handshake is dropped.
    """

    def test_silentPeerDropped(self) -> None:
        """
        After L{HANDSHAKE_TIMEOUT} seconds without a completed handshake
        the connection is aborted and reported refused; the migration
        factory never builds a protocol.
        """
        from twisted.internet.protocol import Factory
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from twisted_postcopy.protocols.tls import HANDSHAKE_TIMEOUT, MigrationTLSFactory

        objects = ObjectRegistry()
        objects.add("tls-creds-x509", "s", dir=credentials(self), endpoint="server")
        built, refused = [], []
        migration = Factory()
        migration.buildProtocol = lambda addr: built.append(addr)
        clock = Clock()
        factory = MigrationTLSFactory(objects.serverPolicy({"tls-creds": "s"}), migration,
                                      refused.append, clock)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        clock.advance(HANDSHAKE_TIMEOUT - 1)
        self.assertEqual((refused, transport.disconnecting), ([], False))
        clock.advance(1)
        self.assertEqual([str(e) for e in refused], ["TLS handshake timed out after 30 s"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(built, [])
