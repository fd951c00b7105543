"""Bearer-token verification with Docker Distribution 2.8 semantics.

Keys come only from the configured PEM certificate bundle, loaded once as key objects and keyed by
their libtrust fingerprint (the JWT ``kid``). ``x5c``/``jwk``/``jku`` headers are ignored: a token
without a ``kid`` of a trusted key is invalid. The header ``alg`` must be allowed by the settings and
match the key type (RSA: RS256/384/512; EC: exactly the ES* of its curve). ``iss`` and ``aud`` are
compared exactly (``aud`` must be a string, as in 2.8), ``exp``/``nbf`` with leeway.
Nothing here ever logs or embeds a token in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from geo_route.access import Grants, parse_access_claim
from geo_route.config import TokenSettings
from geo_route.errors import KeyBundleError, TokenError

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
KID_PATTERN = re.compile(r"[A-Z2-7]{4}(?::[A-Z2-7]{4}){11}")
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512"})
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
DECODE_OPTIONS = {
    "require": ["exp"],
    "verify_signature": True,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iat": False,  # the registry ignores iat
    "verify_aud": False,  # checked exactly below: 2.8 accepts only a string
    "verify_iss": False,  # checked exactly below
    "verify_sub": False,  # GitLab sends sub: null for deploy tokens; the registry accepts it
    "verify_jti": False,
}


def libtrust_kid(key: PublicKey) -> str:
    """The libtrust key ID: SHA-256 of the DER SubjectPublicKeyInfo, 30 bytes, base32, 4-char groups."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii")
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


def load_trusted_keys(bundle: str | Path) -> dict[str, PublicKey]:
    """Public keys of every certificate in a PEM bundle, keyed by libtrust kid (like ``rootcertbundle``)."""
    try:
        pem = Path(bundle).read_bytes()
    except OSError as exc:
        raise KeyBundleError(f"cannot read certificate bundle {bundle}: {exc.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise KeyBundleError(f"certificate bundle {bundle} is not PEM certificates: {exc}") from None
    keys: dict[str, PublicKey] = {}
    for certificate in certificates:
        key = certificate.public_key()
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            keys[libtrust_kid(key)] = key
    if not keys:
        raise KeyBundleError(f"certificate bundle {bundle} holds no RSA or EC public key")
    return keys


class TokenProblem(Enum):
    """Why a request has no usable credential; drives the challenge's ``error`` attribute."""

    MISSING = "missing"
    INVALID = "invalid"


Credential = Grants | TokenProblem


@dataclass(frozen=True, slots=True)
class AlgorithmCheck:
    allowed: frozenset[str]

    def accepts(self, algorithm: str, key: PublicKey) -> bool:
        if algorithm not in self.allowed:
            return False
        if isinstance(key, rsa.RSAPublicKey):
            return algorithm in RSA_ALGORITHMS
        return EC_ALGORITHM_BY_CURVE.get(key.curve.name) == algorithm


class TokenCache:
    """A bounded LRU of verified tokens; an entry is never served at or past the token's ``exp``."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[str, Grants] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> Grants | None:
        with self._lock:
            grants = self._entries.get(token)
            if grants is None:
                return None
            if self._clock() >= grants.expires_at:
                del self._entries[token]
                return None
            self._entries.move_to_end(token)
            return grants

    def put(self, token: str, grants: Grants) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._entries[token] = grants
            self._entries.move_to_end(token)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class TokenVerifier:
    """Turns an ``Authorization`` header into ``Grants`` or a ``TokenProblem``."""

    def __init__(
        self,
        settings: TokenSettings,
        keys: Mapping[str, PublicKey],
        *,
        clock: Callable[[], float] = time.time,
        on_cache: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._keys = dict(keys)
        self._algorithms = AlgorithmCheck(frozenset(settings.algorithms))
        self._clock = clock
        self._cache = TokenCache(settings.cache_size, clock)
        self._on_cache = on_cache or (lambda hit: None)

    @classmethod
    def from_settings(cls, settings: TokenSettings, **kwargs: Any) -> TokenVerifier:
        return cls(settings, load_trusted_keys(settings.rootcertbundle), **kwargs)

    def authenticate(self, authorization: str | None) -> Credential:
        """Registry rule: anything but ``Bearer <token>`` counts as no token at all."""
        token = bearer_token(authorization)
        if token is None:
            return TokenProblem.MISSING
        try:
            return self.verify(token)
        except TokenError:
            return TokenProblem.INVALID

    def verify(self, token: str) -> Grants:
        cached = self._cache.get(token)
        self._on_cache(cached is not None)
        if cached is not None:
            return cached
        grants = self._verify_uncached(token)
        self._cache.put(token, grants)
        return grants

    def _verify_uncached(self, token: str) -> Grants:
        if len(token) > self._settings.max_token_bytes:
            raise TokenError("token too large")
        key, algorithm = self._select_key(token)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                options=DECODE_OPTIONS,  # type: ignore[arg-type]
                leeway=self._settings.leeway,
            )
        except jwt.PyJWTError as exc:
            raise TokenError(f"token rejected: {type(exc).__name__}") from None
        return self._grants_from(claims)

    def _select_key(self, token: str) -> tuple[PublicKey, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token header") from None
        kid, algorithm = header.get("kid"), header.get("alg")
        if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
            raise TokenError("token has no libtrust kid")
        key = self._keys.get(kid)
        if key is None:
            raise TokenError("token signed by an untrusted key")
        if not isinstance(algorithm, str) or not self._algorithms.accepts(algorithm, key):
            raise TokenError("token algorithm not allowed for its key")
        return key, algorithm

    def _grants_from(self, claims: dict[str, Any]) -> Grants:
        if claims.get("iss") != self._settings.issuer:
            raise TokenError("token issuer mismatch")
        audience = claims.get("aud")
        if not isinstance(audience, str) or audience != self._settings.service:
            raise TokenError("token audience mismatch")
        expires = claims["exp"]
        check_go_types(claims)
        try:
            actions = parse_access_claim(claims.get("access"))
        except ValueError as exc:
            raise TokenError(f"token access claim malformed: {exc}") from None
        subject = claims.get("sub")
        return Grants(subject=subject if isinstance(subject, str) else "", expires_at=float(expires), actions=actions)


INTEGER_CLAIMS = ("exp", "nbf", "iat")  # int64 in registry 2.8's ClaimSet
STRING_CLAIMS = ("iss", "sub", "jti")  # string (JSON null decodes to "")


def check_go_types(claims: dict[str, Any]) -> None:
    """Registry 2.8 decodes the claims into Go types and refuses a token whose claim does not fit
    (``exp: 1.5`` or ``sub: 42`` is a malformed token there): refuse the same ones."""
    for name in INTEGER_CLAIMS:
        value = claims.get(name)
        if name in claims and (not isinstance(value, int) or isinstance(value, bool)):
            raise TokenError(f"token {name} is not an integer")
    for name in STRING_CLAIMS:
        if claims.get(name) is not None and not isinstance(claims[name], str):
            raise TokenError(f"token {name} is not a string")


def bearer_token(authorization: str | None) -> str | None:
    """The token of a ``Bearer`` header (scheme case-insensitive), else ``None``."""
    if not authorization:
        return None
    parts = authorization.split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]
