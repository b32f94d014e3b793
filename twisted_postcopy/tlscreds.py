# -*- test-case-name: tests.test_tls -*-
"""
TLS credentials and authorization objects, as QEMU 7.2 names them
(docs/tls.md): C{tls-creds-x509} (C{dir}, C{endpoint}, C{verify-peer}) and
C{authz-simple} (C{identity}), created with C{object-add} or the daemon's
C{--object}, and looked up by the C{tls-creds} and C{tls-authz} migration
parameters.

The checks follow QEMU's C{crypto/tlssession.c}: with C{verify-peer} on
(the default) the peer's chain must lead to C{ca-cert.pem}; a client also
checks the server certificate against the hostname (C{tls-hostname}, else
the host of the migration URI); a server asks for a client certificate and
requires one; C{tls-authz} compares the client certificate's subject
(as GnuTLS prints it: RDNs in certificate order, e.g.
C{O=Example,CN=client}) with the C{authz-simple} identity.  With
C{verify-peer} off nothing about the peer is checked, not even
C{tls-authz} (as in QEMU).

No reactor here: L{TLSPolicy} builds pyOpenSSL connections and checks a
completed handshake; L{twisted_postcopy.protocols.tls} runs them.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Callable

import attrs

from twisted_postcopy.errors import MigrationError

#: QEMU's file names in a C{tls-creds-x509} directory.
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: The object types C{object-add} creates.
TLS_CREDS_X509 = "tls-creds-x509"
AUTHZ_SIMPLE = "authz-simple"

#: OpenSSL X509_V_ERR codes, in QEMU's words (C{crypto/tlssession.c}).
_VERIFY_REASONS = {
    2: "The certificate hasn't got a known issuer",
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    18: "The certificate hasn't got a known issuer",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
    26: "The certificate is not trusted (unsuitable purpose)",
}


class TLSError(MigrationError):
    """
    A TLS credential could not be used, or a peer failed a check; the
    message is QEMU's text where QEMU has one.
    """


def _boolean(value: Any, name: str) -> bool:
    """
    @param value: a QMP boolean or QEMU's C{on}/C{off} text.
    @param name: the property, for the error.
    @return: the value.
    @raise TLSError: neither.
    """
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise TLSError(f"Parameter '{name}' expects 'on' or 'off'")


@attrs.frozen
class AuthzSimple:
    """
    C{authz-simple}: allows exactly one identity.

    @ivar id: the object id.
    @ivar identity: the allowed identity (for TLS: the client
        certificate's distinguished name as GnuTLS prints it, e.g.
        C{C=GB,O=Example,CN=client}; see L{distinguishedName}).
    """

    id: str
    identity: str

    def isAllowed(self, identity: str) -> bool:
        """
        @param identity: who asks.
        @return: whether it is the allowed one.
        """
        return identity == self.identity

    def describe(self) -> dict[str, Any]:
        """
        @return: the object's type and properties.
        """
        return {"qom-type": AUTHZ_SIMPLE, "id": self.id, "identity": self.identity}


@attrs.define
class TLSCredsX509:
    """
    C{tls-creds-x509}: a directory of PEM files for one endpoint.  The
    files are read and checked when the object is created (QEMU's
    sanity check: present, parseable, in their validity period, the
    certificate issued by the CA, the key matching it).

    @ivar id: the object id.
    @ivar dir: the directory.
    @ivar endpoint: C{server} (the migration destination) or C{client}
        (the source).
    @ivar verifyPeer: check the peer's certificate (default on).
    @ivar context: the pyOpenSSL context built from the files.
    """

    id: str
    dir: str
    endpoint: str = "client"
    verifyPeer: bool = True
    context: Any = attrs.field(default=None, repr=False)

    @classmethod
    def create(cls, id: str, dir: str, endpoint: str = "client",
               verifyPeer: bool | str = True) -> TLSCredsX509:
        """
        Load and check the credentials.

        @param id: the object id.
        @param dir: the directory.
        @param endpoint: C{server} or C{client}.
        @param verifyPeer: check the peer.
        @return: the loaded object.
        @raise TLSError: a bad property, a missing or unusable file.
        """
        if endpoint not in ("server", "client"):
            raise TLSError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        creds = cls(id, dir, endpoint, _boolean(verifyPeer, "verify-peer"))
        creds.context = creds._load()
        return creds

    def describe(self) -> dict[str, Any]:
        """
        @return: the object's type and properties.
        """
        return {"qom-type": TLS_CREDS_X509, "id": self.id, "dir": self.dir,
                "endpoint": self.endpoint, "verify-peer": self.verifyPeer}

    def _path(self, name: str, required: bool) -> str | None:
        """
        @param name: a file name of QEMU's layout.
        @param required: whether it must exist.
        @return: its path, or None when optional and absent.
        @raise TLSError: required and missing (QEMU's text).
        """
        path = os.path.join(self.dir, name)
        if os.path.exists(path):
            return path
        if required:
            raise TLSError(f"Unable to access credentials {path}: No such file or directory")
        return None

    def _load(self) -> Any:
        """
        @return: a pyOpenSSL context with the CA, this endpoint's
            certificate and key, TLS 1.2 or later.
        @raise TLSError: a missing or unusable file.
        """
        from OpenSSL import SSL

        server = self.endpoint == "server"
        ca = self._path(CA_CERT, True)
        cert = self._path(SERVER_CERT if server else CLIENT_CERT, server)
        key = self._path(SERVER_KEY if server else CLIENT_KEY, server)
        authorities = _readCertificates(ca)
        if cert is not None:
            own = _readCertificates(cert)[0]
            _checkTimes(own, cert)
            if not any(_issuedBy(own, issuer) for issuer in authorities):
                kind = "server" if server else "client"
                raise TLSError(f"Unable to verify {kind} certificate {cert} against "
                               f"CA certificate {ca}")
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        try:
            context.load_verify_locations(ca)
            if cert is not None and key is not None:
                context.use_certificate_chain_file(cert)
                context.use_privatekey_file(key)
                context.check_privatekey()
        except SSL.Error as error:
            raise TLSError(f"Cannot load certificate '{cert}' & key '{key}': {_sslText(error)}") \
                from None
        return context


def _readCertificates(path: str) -> list[Any]:
    """
    @param path: a PEM file.
    @return: its certificates.
    @raise TLSError: none, or unparseable.
    """
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise TLSError(f"Unable to import certificate {path}: {error}") from None
    if not certificates:
        raise TLSError(f"Unable to import certificate {path}: no certificate")
    return certificates


def _checkTimes(certificate: Any, path: str) -> None:
    """
    @param certificate: a certificate.
    @param path: its file, for the error.
    @raise TLSError: expired or not yet valid (QEMU's texts).
    """
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        raise TLSError(f"The certificate {path} has expired")
    if certificate.not_valid_before_utc > now:
        raise TLSError(f"The certificate {path} is not yet active")


def _issuedBy(certificate: Any, issuer: Any) -> bool:
    """
    @param certificate: a certificate.
    @param issuer: a candidate CA certificate.
    @return: whether C{issuer} signed it.
    """
    try:
        certificate.verify_directly_issued_by(issuer)
    except Exception:
        return False
    return True


def _sslText(error: Exception) -> str:
    """
    @param error: an C{OpenSSL.SSL.Error}.
    @return: its OpenSSL reasons, joined.
    """
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [entry[-1] for entry in args[0] if isinstance(entry, tuple) and entry[-1]]
        if reasons:
            return "; ".join(reasons)
    return str(error) or error.__class__.__name__


def matchesHostname(certificate: Any, hostname: str) -> bool:
    """
    Check a server certificate against a hostname as GnuTLS's
    C{gnutls_x509_crt_check_hostname} does for QEMU: an IP address matches
    C{iPAddress} entries; a name matches C{dNSName} entries (a C{*} only as
    the whole leftmost label), or the CN when there is no C{dNSName}.

    @param certificate: a C{cryptography} certificate.
    @param hostname: the expected name or address.
    @return: whether it matches.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        alternatives = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alternatives = None
    try:
        address = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        return alternatives is not None and address in alternatives.get_values_for_type(
            x509.IPAddress)
    wanted = hostname.rstrip(".").lower()
    names = alternatives.get_values_for_type(x509.DNSName) if alternatives is not None else []
    if not names:
        names = [attribute.value for attribute in
                 certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return any(_nameMatches(str(name).rstrip(".").lower(), wanted) for name in names)


def _nameMatches(pattern: str, hostname: str) -> bool:
    """
    @param pattern: a certificate name, maybe C{*.example.com}.
    @param hostname: the wanted name.
    @return: whether they match.
    """
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        first, _, rest = hostname.partition(".")
        return bool(first) and rest == pattern[2:] and rest.count(".") >= 1
    return pattern == hostname


@attrs.frozen
class TLSPolicy:
    """
    One side of one TLS migration connection: the credentials and what to
    check on the peer.

    @ivar creds: the C{tls-creds-x509} object.
    @ivar hostname: (client) the name the server certificate must carry.
    @ivar authz: (server) the C{authz-simple} object the client's
        distinguished name must pass, or None.
    """

    creds: TLSCredsX509
    hostname: str | None = None
    authz: AuthzSimple | None = None

    @property
    def isClient(self) -> bool:
        """
        @return: whether this side sends the ClientHello (the migration
            source).
        """
        return self.creds.endpoint == "client"

    def connection(self, onVerifyError: Callable[[str], object]) -> Any:
        """
        @param onVerifyError: called with QEMU's text when the peer's
            chain fails to verify (the handshake then fails).
        @return: a new memory-BIO C{OpenSSL.SSL.Connection}, in client or
            server state, verifying the peer when C{verify-peer} is on.
        """
        from OpenSSL import SSL

        def verify(connection: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
            """
            Record why OpenSSL refused the peer's chain.

            @return: OpenSSL's verdict.
            """
            if not ok:
                onVerifyError(_VERIFY_REASONS.get(
                    errno, f"The certificate is not trusted (X509 verify error {errno})"))
            return bool(ok)

        connection = SSL.Connection(self.creds.context, None)
        if self.creds.verifyPeer:
            mode = SSL.VERIFY_PEER
            if not self.isClient:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            connection.set_verify(mode, verify)
        else:
            connection.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        if self.isClient:
            if self.hostname and not _isAddress(self.hostname):
                connection.set_tlsext_host_name(self.hostname.encode("idna"))
            connection.set_connect_state()
        else:
            connection.set_accept_state()
        return connection

    def checkPeer(self, certificate: Any) -> str | None:
        """
        The checks after a completed handshake (OpenSSL already verified
        the chain): the hostname (client) and C{tls-authz} (server).

        @param certificate: the peer's C{OpenSSL.crypto.X509}, or None.
        @return: the peer's distinguished name (None when not verified).
        @raise TLSError: a check failed (QEMU's text).
        """
        if not self.creds.verifyPeer:
            return None
        if certificate is None:
            raise TLSError("No certificate peers")
        peer = certificate.to_cryptography() if hasattr(certificate, "to_cryptography") else certificate
        name = distinguishedName(peer)
        if self.isClient:
            if not self.hostname:
                raise TLSError("No hostname for certificate validation")
            if not matchesHostname(peer, self.hostname):
                raise TLSError(f"Certificate does not match the hostname {self.hostname}")
        elif self.authz is not None and not self.authz.isAllowed(name):
            raise TLSError(f"TLS x509 authz check for {name} is denied")
        return name


def distinguishedName(certificate: Any) -> str:
    """
    The subject of a certificate as QEMU 7.2 compares it with an
    C{authz-simple} identity: GnuTLS's C{gnutls_x509_crt_get_dn} text, the
    RDNs in the certificate's order (most general first, e.g.
    C{C=GB,O=Example,CN=client}), each escaped as RFC 4514 says.

    @param certificate: a C{cryptography} certificate.
    @return: its distinguished name.
    """
    return ",".join(rdn.rfc4514_string() for rdn in certificate.subject.rdns)


def _isAddress(hostname: str) -> bool:
    """
    @param hostname: a host.
    @return: whether it is an IP address (no SNI is sent for one).
    """
    try:
        ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return False
    return True


def sslErrorText(error: Exception) -> str:
    """
    @param error: what a failed handshake raised.
    @return: a readable reason.
    """
    return _sslText(error)


class ObjectRegistry:
    """
    The daemon's user-created objects by id (QEMU's C{/objects}):
    C{object-add}, C{object-del}, lookups for the migration parameters.

    @ivar objects: id -> object.
    """

    def __init__(self) -> None:
        """
        Start empty.
        """
        self.objects: dict[str, Any] = {}

    def add(self, qomType: str, id: str, **properties: Any) -> Any:
        """
        C{object-add}.

        @param qomType: C{tls-creds-x509} or C{authz-simple}.
        @param id: the new id.
        @param properties: the type's properties (QEMU's names, with
            dashes: C{dir}, C{endpoint}, C{verify-peer}, C{identity}).
        @return: the object.
        @raise TLSError: duplicate id, unknown type or property, or the
            credentials cannot be loaded.
        """
        if not id or not all(c.isalnum() or c in "-_." for c in id) or not id[0].isalpha():
            raise TLSError("Parameter 'id' expects an identifier")
        if id in self.objects:
            raise TLSError(f"attempt to add duplicate property '{id}' to object (type 'container')")
        if qomType == TLS_CREDS_X509:
            unknown = set(properties) - {"dir", "endpoint", "verify-peer"}
            if unknown:
                raise TLSError(f"Property '{sorted(unknown)[0]}' not found")
            if "dir" not in properties:
                raise TLSError("Parameter 'dir' is missing")
            made: Any = TLSCredsX509.create(id, str(properties["dir"]),
                                            str(properties.get("endpoint", "client")),
                                            properties.get("verify-peer", True))
        elif qomType == AUTHZ_SIMPLE:
            unknown = set(properties) - {"identity"}
            if unknown:
                raise TLSError(f"Property '{sorted(unknown)[0]}' not found")
            if "identity" not in properties:
                raise TLSError("The 'identity' property must be set")
            made = AuthzSimple(id, str(properties["identity"]))
        else:
            raise TLSError(f"Invalid parameter type for 'qom-type', expected: "
                           f"{TLS_CREDS_X509} or {AUTHZ_SIMPLE}")
        self.objects[id] = made
        return made

    def remove(self, id: str) -> None:
        """
        C{object-del}.

        @param id: the object's id.
        @raise TLSError: no such object.
        """
        if id not in self.objects:
            raise TLSError(f"object '{id}' not found")
        del self.objects[id]

    def describe(self) -> list[dict[str, Any]]:
        """
        @return: every object's type and properties, by id.
        """
        return [self.objects[id].describe() for id in sorted(self.objects)]

    def creds(self, id: str, endpoint: str) -> TLSCredsX509:
        """
        @param id: the C{tls-creds} parameter.
        @param endpoint: the side needed (C{client}: source, C{server}:
            destination).
        @return: the credentials.
        @raise TLSError: QEMU's texts for a missing id, another type or
            the wrong endpoint.
        """
        found = self.objects.get(id)
        if found is None:
            raise TLSError(f"No TLS credentials with id '{id}'")
        if not isinstance(found, TLSCredsX509):
            raise TLSError(f"Object with id '{id}' is not TLS credentials")
        if found.endpoint != endpoint:
            raise TLSError(f"Expected TLS credentials for a {endpoint} endpoint")
        return found

    def authz(self, id: str) -> AuthzSimple:
        """
        @param id: the C{tls-authz} parameter.
        @return: the authorization object.
        @raise TLSError: missing, or another type.
        """
        found = self.objects.get(id)
        if found is None:
            raise TLSError(f"No authorization object with id '{id}'")
        if not isinstance(found, AuthzSimple):
            raise TLSError(f"Object '{id}' is not a authz instance")
        return found

    def clientPolicy(self, parameters: dict[str, Any], uriHost: str | None) -> TLSPolicy | None:
        """
        @param parameters: the migration parameters.
        @param uriHost: the host of the migration URI (None for C{unix:}).
        @return: the source's policy, or None when C{tls-creds} is empty.
        @raise TLSError: unusable credentials.
        """
        if not parameters.get("tls-creds"):
            return None
        creds = self.creds(parameters["tls-creds"], "client")
        return TLSPolicy(creds, parameters.get("tls-hostname") or uriHost)

    def serverPolicy(self, parameters: dict[str, Any]) -> TLSPolicy | None:
        """
        @param parameters: the migration parameters.
        @return: the destination's policy, or None when C{tls-creds} is
            empty.
        @raise TLSError: unusable credentials or authz object.
        """
        if not parameters.get("tls-creds"):
            return None
        creds = self.creds(parameters["tls-creds"], "server")
        authz = self.authz(parameters["tls-authz"]) if parameters.get("tls-authz") else None
        return TLSPolicy(creds, authz=authz)


def parseObjectOption(text: str) -> tuple[str, str, dict[str, str]]:
    """
    Parse QEMU's C{-object} syntax,
    C{tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server}
    (a doubled comma is a literal comma).

    @param text: the option value.
    @return: (type, id, other properties).
    @raise TLSError: no type or no id.
    """
    parts: list[str] = []
    current = ""
    index = 0
    while index < len(text):
        if text[index] == ",":
            if text[index + 1 : index + 2] == ",":
                current += ","
                index += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[index]
        index += 1
    parts.append(current)
    qomType, properties = parts[0], {}
    for part in parts[1:]:
        name, equals, value = part.partition("=")
        if not equals:
            raise TLSError(f"Expected '=' after parameter '{name}'")
        properties[name] = value
    if not qomType or "=" in qomType:
        raise TLSError("Parameter 'qom-type' is missing")
    if "id" not in properties:
        raise TLSError("Parameter 'id' is missing")
    return qomType, properties.pop("id"), properties
