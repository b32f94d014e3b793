"""
Test certificates for TLS migrations, generated at run time with the
C{cryptography} package: a CA, a server certificate with the names QEMU
checks (C{DNS:localhost}, C{IP:127.0.0.1}, C{IP:::1} by default), a client
certificate, laid out in a directory the way a C{tls-creds-x509} object
(QEMU's and ours) reads it::

    ca-cert.pem  server-cert.pem  server-key.pem  client-cert.pem  client-key.pem

Both ends of a migration can share one such directory.  Used by the tests
and benches; nothing here is for production keys (no passphrase, 1-day
validity by default).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: QEMU's file names in a x509 credentials directory.
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: The names a loopback migration's server certificate carries.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@attrs.frozen
class Authority:
    """
    A certificate authority able to issue certificates.

    @ivar key: its private key.
    @ivar certificate: its self-signed certificate.
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def pem(self) -> bytes:
        """
        @return: the CA certificate in PEM.
        """
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _name(commonName: str, organization: str = "twisted-postcopy tests") -> x509.Name:
    """
    @param commonName: the CN.
    @param organization: the O.
    @return: the distinguished name C{O=organization, CN=commonName}.
    """
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, commonName),
    ])


def _validity(builder: x509.CertificateBuilder, days: float) -> x509.CertificateBuilder:
    """
    @param builder: a certificate builder.
    @param days: validity from an hour ago (negative: already expired).
    @return: the builder with its validity period.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)
    end = now + datetime.timedelta(days=days)
    if end <= start:
        start = end - datetime.timedelta(days=1)
    return builder.not_valid_before(start).not_valid_after(end)


def newAuthority(commonName: str = "twisted-postcopy test CA", days: float = 1) -> Authority:
    """
    Create a CA (basic constraints CA, key usage certificate and CRL
    signing, as QEMU's sanity check wants).

    @param commonName: the CA's CN.
    @param days: validity.
    @return: the authority.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(commonName)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    return Authority(key, _validity(builder, days).sign(key, hashes.SHA256()))


def issue(authority: Authority, commonName: str, server: bool,
          names: Iterable[str] = (), days: float = 1) -> tuple[bytes, bytes]:
    """
    Issue a server or client certificate.

    @param authority: the issuing CA.
    @param commonName: the subject's CN.
    @param server: a server certificate (extended key usage serverAuth)
        rather than a client one (clientAuth).
    @param names: subject alternative names: IP addresses become
        C{iPAddress} entries, anything else C{dNSName}.
    @param days: validity (negative for an expired certificate).
    @return: (certificate PEM, unencrypted PKCS#8 key PEM).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(commonName))
               .issuer_name(authority.certificate.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=True,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   authority.key.public_key()), critical=False))
    alternatives = [_generalName(name) for name in names]
    if alternatives:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
    certificate = _validity(builder, days).sign(authority.key, hashes.SHA256())
    keyPEM = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), keyPEM


def _generalName(name: str) -> x509.GeneralName:
    """
    @param name: a host name or an IP address.
    @return: the matching subject alternative name.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: str, data: bytes, mode: int) -> None:
    """
    Create a file exclusively with a mode.

    @param path: the file.
    @param data: its contents.
    @param mode: its permission bits.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def writeCredentials(directory: str, authority: Authority | None = None,
                     serverNames: Sequence[str] = LOOPBACK_NAMES,
                     clientName: str = "migration-client", serverName: str = "migration-server",
                     days: float = 1) -> Authority:
    """
    Fill a directory with QEMU's x509 file layout: the CA certificate, a
    server certificate and key, a client certificate and key.

    @param directory: the directory (created 0700 if missing; the files
        must not exist).
    @param authority: the CA to issue from (default: a new one).
    @param serverNames: the server certificate's subject alternative names.
    @param clientName: the client certificate's CN.
    @param serverName: the server certificate's CN.
    @param days: validity of the issued certificates.
    @return: the authority (to issue more, e.g. for another directory).
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    authority = authority or newAuthority()
    _write(os.path.join(directory, CA_CERT), authority.pem(), 0o644)
    serverCert, serverKey = issue(authority, serverName, True, serverNames, days)
    _write(os.path.join(directory, SERVER_CERT), serverCert, 0o644)
    _write(os.path.join(directory, SERVER_KEY), serverKey, 0o600)
    clientCert, clientKey = issue(authority, clientName, False, (), days)
    _write(os.path.join(directory, CLIENT_CERT), clientCert, 0o644)
    _write(os.path.join(directory, CLIENT_KEY), clientKey, 0o600)
    return authority


def distinguishedName(certificatePath: str) -> str:
    """
    @param certificatePath: a PEM certificate.
    @return: its subject as QEMU's C{tls-authz} compares it (GnuTLS's
        text: certificate order, e.g. C{O=...,CN=migration-client}).
    """
    from twisted_postcopy.tlscreds import distinguishedName as name

    with open(certificatePath, "rb") as f:
        return name(x509.load_pem_x509_certificate(f.read()))
