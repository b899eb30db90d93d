"""A throwaway PKI for TLS tests, made with ``cryptography``: CAs, a broker and client certificates.

A :class:`Pki` writes PEM files into a folder (the ``pki`` fixture: a module-scoped tmp dir):
``pki.ca("fleet")`` makes a CA, ``pki.server(ca, "broker")`` a server certificate for
127.0.0.1/localhost, ``pki.client(ca, "pi-kitchen-01")`` a client certificate whose CN is the
given name. Keys are EC P-256: fast to make, accepted by every OpenSSL a broker links against.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk (PEM), with what signing further ones needs."""

    cert_file: Path
    key_file: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class Pki:
    """Makes certificates under ``directory``, in files named after their CN (and issuer)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str) -> Issued:
        """A self-signed CA that may sign end-entity certificates."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        builder = (
            _base(subject, subject, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        return self._save(name, builder.sign(key, hashes.SHA256()), key)

    def server(
        self, ca: Issued, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> Issued:
        """A TLS server certificate signed by ``ca`` for ``hosts`` (IPs and DNS names: SAN)."""
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._leaf(
            ca, name, ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(names)
        )

    def client(self, ca: Issued, name: str) -> Issued:
        """A TLS client certificate signed by ``ca`` with CN ``name`` (e.g. the device id)."""
        return self._leaf(ca, name, ExtendedKeyUsageOID.CLIENT_AUTH)

    def _leaf(
        self,
        ca: Issued,
        name: str,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _base(_name(name), ca.cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        # the issuer in the file name: two CAs may issue for the same CN (an impostor's cert)
        issuer = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return self._save(f"{name}.by-{issuer!s}", builder.sign(ca.key, hashes.SHA256()), key)

    def _save(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
        cert_file = self.dir / f"{name}.crt"
        key_file = self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return Issued(cert_file, key_file, cert, key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _base(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # a little clock skew is no failure
        .not_valid_after(now + dt.timedelta(days=1))
    )
