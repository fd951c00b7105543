"""The sites' shared token-signing key: an RSA-2048 private key and its self-signed certificate.

The token service signs with the key; every registry (primary and secondary) and the geo-route auth
service trust the certificate as their ``rootcertbundle``. The token service's tokens name the key by
its libtrust fingerprint (``kid``), as GitLab's do; geo-route's own reconcile tokens add this
certificate as ``x5c`` (a CA certificate, so it also verifies as a one-certificate chain), the form
every registry dialect accepts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from geo_route.tokens import libtrust_kid

PRIVATE_KEY_FILE = "token-signing.key"
CERTIFICATE_FILE = "token-signing.crt"
COMMON_NAME = "geo-route devstack token signer"


@dataclass(frozen=True)
class SigningKeyFiles:
    """Where the key pair was written and the ``kid`` tokens signed with it carry."""

    private_key: Path
    certificate: Path
    kid: str


def generate_signing_key(directory: Path, *, valid_days: int = 365) -> SigningKeyFiles:
    """Write a new RSA-2048 key (mode 0600, PKCS#8 PEM) and a self-signed certificate (PEM) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = directory / PRIVATE_KEY_FILE
    write_private(key_path, serialize_private_key(private))
    certificate_path = directory / CERTIFICATE_FILE
    certificate_path.write_bytes(self_signed_certificate_pem(private, valid_days))
    return SigningKeyFiles(key_path, certificate_path, libtrust_kid(private.public_key()))


def serialize_private_key(private: rsa.RSAPrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def self_signed_certificate_pem(private: rsa.RSAPrivateKey, valid_days: int) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, before any secret byte is written."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA private key of a PEM file written by ``generate_signing_key``."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key")
    return key


def main(argv: list[str] | None = None) -> int:
    """``python -m geo_route.devstack.keys DIR``: write the key pair once (docker/compose.yaml's ``keys``)."""
    import sys

    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m geo_route.devstack.keys DIR", file=sys.stderr)
        return 2
    directory = Path(arguments[0])
    if (directory / CERTIFICATE_FILE).exists():
        print(f"{directory / CERTIFICATE_FILE} exists; keeping it")
        return 0
    files = generate_signing_key(directory)
    print(f"wrote {files.private_key} and {files.certificate} (kid {files.kid})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
