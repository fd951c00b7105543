"""Layered fixtures: real keys and certificates → tokens → settings → real redis-server → store → app."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from support import RedisServer

from geo_route.config import Settings, load_settings
from geo_route.tokens import libtrust_kid

ISSUER = "test-issuer"
SERVICE = "container_registry"
REALM = "https://gitlab.test/jwt/auth"


@dataclass(frozen=True)
class SigningKey:
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    algorithm: str

    @property
    def kid(self) -> str:
        return libtrust_kid(self.private.public_key())

    def certificate_pem(self) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"signer-{self.algorithm}")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self.private, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return SigningKey(ec.generate_private_key(ec.SECP256R1()), "ES256")


@pytest.fixture(scope="session")
def untrusted_key() -> SigningKey:
    return SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="session")
def bundle_path(tmp_path_factory: pytest.TempPathFactory, rsa_key: SigningKey, ec_key: SigningKey) -> Path:
    path = tmp_path_factory.mktemp("keys") / "bundle.pem"
    path.write_bytes(rsa_key.certificate_pem() + ec_key.certificate_pem())
    return path


def access(name: str, *actions: str, kind: str = "repository") -> dict[str, Any]:
    return {"type": kind, "name": name, "actions": list(actions)}


MakeToken = Callable[..., str]


@pytest.fixture
def make_token(rsa_key: SigningKey) -> MakeToken:
    """``make_token(access=[...], key=..., headers=..., **claim_overrides)``; a claim set to None is dropped."""

    def make(
        access_list: list[dict[str, Any]] | None = None,
        *,
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        key = key or rsa_key
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": "alice",
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 5,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "access": access_list if access_list is not None else [access("group/app", "pull")],
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"kid": key.kid, **(headers or {})}
        return jwt.encode(claims, key.private, algorithm=key.algorithm, headers=header)

    return make


SITE_YAML = """\
local_registry: {{url: "http://127.0.0.1:5000"}}
primary: {{url: "http://127.0.0.1:5001"}}
token:
  realm: "{realm}"
  service: "{service}"
  issuer: "{issuer}"
  rootcertbundle: "{bundle}"
redis:
  url: "{redis_url}"
  key_prefix: "{prefix}"
"""


@pytest.fixture
def site_file(tmp_path: Path, bundle_path: Path) -> Callable[..., Path]:
    def write(redis_url: str = "redis://127.0.0.1:1/0", prefix: str = "test:", extra: str = "") -> Path:
        path = tmp_path / "site.yaml"
        text = SITE_YAML.format(
            realm=REALM, service=SERVICE, issuer=ISSUER, bundle=bundle_path, redis_url=redis_url, prefix=prefix
        )
        path.write_text(text + extra)
        return path

    return write


@pytest.fixture
def settings(site_file: Callable[..., Path]) -> Settings:
    return load_settings(site_file(), environ={})


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def redis_settings(site_file: Callable[..., Path], redis_server: RedisServer) -> Settings:
    """Settings pointing at the session's redis-server, with a key prefix of this test's own."""
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    return load_settings(site_file(redis_url=redis_server.url, prefix=prefix), environ={})
