"""Short-lived registry pull tokens that geo-route mints for itself (reconciliation).

The sites share one token-signing key (``updater.signing_key``, a PEM private key), so a token signed
with it is accepted by the local registry and by the primary. Tokens look like GitLab's (protocol
notes §2.4): RS256 (or the ES* of an EC key's curve), header ``kid`` = libtrust fingerprint and
``typ: JWT``, claims ``iss``/``aud`` from ``token.*``, ``exp``/``nbf``/``iat``/``jti``; plus
``x5c`` = the key's own certificate from ``token.rootcertbundle`` while it is valid, the one form
Distribution 2.8, 3.x and GitLab's registry all accept (registry-dialects §1; 3.x refuses a libtrust
``kid`` alone). Without that certificate the token has the ``kid`` only and ``check-config`` warns. One token per
resource: ``registry:catalog:*`` for the catalog, ``repository:<name>:pull`` for a repository; each
is cached and re-minted when less than a third of its lifetime is left. Tokens are never logged.
"""

from __future__ import annotations

import base64
import datetime
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from geo_route.config import Settings
from geo_route.errors import GeoRouteError, KeyBundleError
from geo_route.lru import Lru
from geo_route.tokens import EC_ALGORITHM_BY_CURVE, libtrust_kid
from geo_route.trusted_keys import certificate_for_key, load_certificates

SUBJECT = "geo-route-reconcile"
DEFAULT_LIFETIME = 300
CACHE_SIZE = 1024  # repositories whose pull token is kept for reuse
NOT_BEFORE_SKEW = 5  # seconds, as GitLab does: a registry clock slightly behind still accepts the token
CATALOG = None  # the resource key of ``registry:catalog:*``

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class SigningKeyError(GeoRouteError):
    """``updater.signing_key`` is missing, unreadable or not an RSA/EC private key."""


def load_signing_key(path: str) -> PrivateKey:
    if not path:
        raise SigningKeyError("updater.signing_key is not set: reconciliation mints its own pull tokens with it")
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SigningKeyError(f"cannot read updater.signing_key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"updater.signing_key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SigningKeyError(f"updater.signing_key {path} is neither an RSA nor an EC key")
    return key


def signing_certificate(key: PrivateKey, bundle: str) -> x509.Certificate:
    """The certificate of ``token.rootcertbundle`` whose key is ``updater.signing_key``'s, valid now."""
    certificate = certificate_for_key(load_certificates(bundle), key.public_key())
    if certificate is None:
        raise SigningKeyError(
            "updater.signing_key has no certificate in token.rootcertbundle: the tokens reconciliation mints "
            "carry only a libtrust kid, which Distribution 3 registries refuse"
        )
    if not valid_at(certificate, time.time()):
        raise SigningKeyError(
            "the certificate of updater.signing_key in token.rootcertbundle is not valid now: minted tokens "
            "carry only a libtrust kid, which Distribution 3 registries refuse (and no registry accepts its x5c)"
        )
    return certificate


def valid_at(certificate: x509.Certificate, now: float) -> bool:
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc


def algorithm_for(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    algorithm = EC_ALGORITHM_BY_CURVE.get(key.curve.name)
    if algorithm is None:
        raise SigningKeyError(f"EC curve {key.curve.name} is not one the registry accepts")
    return algorithm


def access_claim(repository: str | None) -> list[dict[str, Any]]:
    if repository is None:
        return [{"type": "registry", "name": "catalog", "actions": ["*"]}]
    return [{"type": "repository", "name": repository, "actions": ["pull"]}]


class PullTokens:
    """``authorization(repository)`` → ``Bearer …`` for that repository's pull (``None``: the catalog)."""

    def __init__(
        self,
        key: PrivateKey,
        *,
        issuer: str,
        service: str,
        lifetime: int = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.time,
        certificate: x509.Certificate | None = None,
    ) -> None:
        self._key = key
        self._algorithm = algorithm_for(key)
        self._headers: dict[str, Any] = {"kid": libtrust_kid(key.public_key()), "typ": "JWT"}
        self._certificate = certificate
        self._x5c = (
            [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()] if certificate else []
        )
        self._issuer = issuer
        self._service = service
        self._lifetime = lifetime
        self._clock = clock
        # The last CACHE_SIZE repositories' headers (about 2.2 KiB each), least recently used out:
        # reconciliation and verification walk every repository of the site, once per interval.
        self._cache: Lru[str | None, tuple[str, float]] = Lru(CACHE_SIZE)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, lifetime: int = DEFAULT_LIFETIME) -> PullTokens:
        key = load_signing_key(settings.updater.signing_key)
        try:
            certificates = load_certificates(settings.token.rootcertbundle)
        except KeyBundleError:
            certificates = []  # the auth service reports the bundle; the kid alone still serves 2.8
        return cls(
            key,
            issuer=settings.token.issuer,
            service=settings.token.service,
            lifetime=lifetime,
            certificate=certificate_for_key(certificates, key.public_key()),
        )

    def headers(self, now: float) -> dict[str, Any]:
        """``kid`` and ``typ``, and ``x5c`` while the certificate is valid (an expired chain is refused
        by every registry, where the ``kid`` alone still passes 2.8 and GitLab)."""
        if self._certificate is not None and valid_at(self._certificate, now):
            return {**self._headers, "x5c": self._x5c}
        return self._headers

    def authorization(self, repository: str | None) -> str:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(repository)
            if cached is not None and cached[1] - now > self._lifetime / 3:
                return cached[0]
        header = "Bearer " + self.mint(repository, now)
        with self._lock:
            self._cache.put(repository, (header, now + self._lifetime))
        return header

    def cached(self) -> int:
        """How many repositories' headers are kept."""
        with self._lock:
            return len(self._cache)

    def mint(self, repository: str | None, now: float) -> str:
        issued = int(now)
        claims = {
            "iss": self._issuer,
            "sub": SUBJECT,
            "aud": self._service,
            "exp": issued + self._lifetime,
            "nbf": issued - NOT_BEFORE_SKEW,
            "iat": issued,
            "jti": str(uuid.uuid4()),
            "access": access_claim(repository),
        }
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=self.headers(now))
