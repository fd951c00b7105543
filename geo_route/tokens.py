"""Bearer-token verification: what any configured registry dialect accepts, and nothing else.

The union of Distribution 2.8, 3.x and GitLab's registry (shared/registry-dialects.md §1): the
signing key is found as ``geo_route.trusted_keys`` describes (x5c chain to the bundle, jwk of a
trusted key, or a ``kid`` that names a trusted key as libtrust fingerprint, RFC 7638 thumbprint or
JWKS id). The header ``alg`` must be allowed by ``token.algorithms`` and fit the key (RSA: RS*/PS*;
EC: the ES* of its curve; Ed25519: EdDSA). Then, in Distribution 3's order: the claims must decode
into the registry's Go types, ``iss`` must equal ``token.issuer``, ``aud`` must be ``token.service``
or a list holding it, ``exp`` (required) and ``nbf`` are checked with ``token.leeway``. A token
without ``iss``/``aud`` (GitLab's nested ``user`` token) is therefore never accepted.
Nothing here ever logs or embeds a token in an error message.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.types import SigOptions

from geo_route.access import Grants, parse_access_claim
from geo_route.config import TokenSettings
from geo_route.errors import TokenError
from geo_route.lru import Lru
from geo_route.trusted_keys import Candidate, PublicKey, TrustedKeys, libtrust_kid, load_certificates, load_jwks

__all__ = ["PublicKey", "TokenProblem", "TokenVerifier", "TrustedKeys", "libtrust_kid", "load_trusted_keys"]

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
LIBTRUST_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512"})
# In Distribution 3's default signingalgorithms: with a public key they fail as a bad signature.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
INT64 = range(-(2**63), 2**63)
SIGNATURE_ONLY: SigOptions = {"verify_signature": True}


class UnverifiableToken(TokenError):
    """The signature does not verify with the trusted key, or the claims do not decode into the
    registry's types: Distribution 3 answers these without ``error=`` in its challenge."""


def load_trusted_keys(bundle: str | Path, jwks: str | Path = "", *, v3_0_ec_quirk: bool = False) -> TrustedKeys:
    """Keys of ``token.rootcertbundle`` (and ``token.jwks``), under every accepted ``kid``."""
    return TrustedKeys.build(load_certificates(bundle), load_jwks(jwks) if jwks else None, v3_0_ec_quirk=v3_0_ec_quirk)


class TokenProblem(Enum):
    """Why a request has no usable credential; drives the challenge's ``error`` attribute."""

    MISSING = "missing"
    INVALID = "invalid"
    # Bad signature or claims the registry cannot decode: no ``error=`` in Distribution 3's challenge.
    UNVERIFIABLE = "unverifiable"


Credential = Grants | TokenProblem


@dataclass(frozen=True, slots=True)
class AlgorithmCheck:
    allowed: frozenset[str]

    def fits(self, algorithm: str, candidate: Candidate) -> bool:
        """Whether ``algorithm`` is one the key can verify (allowed or not) when named this way."""
        key = candidate.key
        if candidate.libtrust and algorithm not in LIBTRUST_ALGORITHMS:
            return False
        if isinstance(key, rsa.RSAPublicKey):
            return algorithm in RSA_ALGORITHMS
        if isinstance(key, ec.EllipticCurvePublicKey):
            return EC_ALGORITHM_BY_CURVE.get(key.curve.name) == algorithm
        return isinstance(key, ed25519.Ed25519PublicKey) and algorithm == "EdDSA"


class TokenCache:
    """A bounded LRU of verified tokens; an entry is never served at or past the token's ``exp``."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: Lru[str, Grants] = Lru(size)
        self._lock = threading.Lock()

    def get(self, token: str) -> Grants | None:
        with self._lock:
            grants = self._entries.get(token)
            if grants is not None and self._clock() >= grants.expires_at:
                self._entries.discard(token)
                return None
            return grants

    def put(self, token: str, grants: Grants) -> None:
        with self._lock:
            self._entries.put(token, grants)

    def __len__(self) -> int:
        return len(self._entries)


class TokenVerifier:
    """Turns an ``Authorization`` header into ``Grants`` or a ``TokenProblem``."""

    def __init__(
        self,
        settings: TokenSettings,
        keys: TrustedKeys,
        *,
        clock: Callable[[], float] = time.time,
        on_cache: Callable[[bool], None] | None = None,
        on_cache_entries: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._algorithms = AlgorithmCheck(frozenset(settings.algorithms))
        self._clock = clock
        self._cache = TokenCache(settings.cache_size, clock)
        self._on_cache = on_cache or (lambda hit: None)
        self._on_cache_entries = on_cache_entries or (lambda entries: None)

    @classmethod
    def from_settings(cls, settings: TokenSettings, **kwargs: Any) -> TokenVerifier:
        keys = load_trusted_keys(settings.rootcertbundle, settings.jwks, v3_0_ec_quirk=settings.accept_v3_0_ec_quirk)
        return cls(settings, keys, **kwargs)

    def authenticate(self, authorization: str | None) -> Credential:
        """Registry rule: anything but ``Bearer <token>`` counts as no token at all."""
        token = bearer_token(authorization)
        if token is None:
            return TokenProblem.MISSING
        try:
            return self.verify(token)
        except UnverifiableToken:
            return TokenProblem.UNVERIFIABLE
        except TokenError:
            return TokenProblem.INVALID

    def verify(self, token: str) -> Grants:
        cached = self._cache.get(token)
        self._on_cache(cached is not None)
        if cached is not None:
            return cached
        grants = self._verify_uncached(token)
        self._cache.put(token, grants)
        self._on_cache_entries(len(self._cache))
        return grants

    def _verify_uncached(self, token: str) -> Grants:
        if len(token) > self._settings.max_token_bytes:
            raise TokenError("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token header") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or not (
            algorithm in self._algorithms.allowed or algorithm in HMAC_ALGORITHMS
        ):
            raise TokenError("token algorithm not allowed")
        claims, candidate = self._verified_claims(token, algorithm, self._signing_keys(header))
        try:
            return self._grants_from(claims, libtrust_only=candidate.libtrust)
        except UnverifiableToken as exc:
            if candidate.libtrust:  # Distribution 3 would not have found this key: its invalid_token
                raise TokenError(str(exc)) from None
            raise

    def _signing_keys(self, header: dict[str, Any]) -> tuple[Candidate, ...]:
        """The registries' order: ``x5c``, else ``jwk``, else ``kid``; the first present decides."""
        if header.get("x5c"):
            return (Candidate(self._keys.for_chain(header["x5c"], self._clock())),)
        if header.get("jwk") is not None:
            return self._keys.for_jwk(header["jwk"], self._clock())
        return self._keys.for_kid(header.get("kid"))

    def _verified_claims(
        self, token: str, algorithm: str, candidates: tuple[Candidate, ...]
    ) -> tuple[dict[str, Any], Candidate]:
        """The claims, once one candidate key verifies the signature. A failure with a key that
        Distribution 3 would also have found is its bad-signature case (``UnverifiableToken``)."""
        unverifiable = False
        for candidate in candidates:
            unverifiable = unverifiable or not candidate.libtrust
            if not self._algorithms.fits(algorithm, candidate):
                continue  # HS* never fits: a public key is no shared secret
            try:
                payload = jwt.api_jws.decode_complete(token, candidate.key, [algorithm], SIGNATURE_ONLY)["payload"]
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                raise TokenError("malformed token") from None
            try:
                claims = json.loads(payload)
            except ValueError:
                claims = None
            if not isinstance(claims, dict):
                raise (TokenError if candidate.libtrust else UnverifiableToken)("token claims are not an object")
            return claims, candidate
        if unverifiable:
            raise UnverifiableToken("token signature does not verify with its trusted key")
        raise TokenError("token signature does not verify with its trusted key")

    def _grants_from(self, claims: dict[str, Any], *, libtrust_only: bool) -> Grants:
        """``libtrust_only``: the key was found the way only 2.8 and GitLab find it, and they decode
        ``aud`` as a string."""
        check_go_types(claims)
        try:
            actions = parse_access_claim(claims.get("access"))
        except ValueError as exc:
            raise UnverifiableToken(f"token access claim malformed: {exc}") from None
        if claims.get("iss") != self._settings.issuer:
            raise TokenError("token issuer mismatch")
        audience = claims.get("aud")
        if libtrust_only and isinstance(audience, list):
            raise TokenError("token aud is a list, which registries naming keys the libtrust way refuse")
        if not audience_matches(audience, self._settings.service):
            raise TokenError("token audience mismatch")
        now, leeway = self._clock(), self._settings.leeway
        expires = claims.get("exp") or 0  # Go: absent or null is 0, long past
        if now > expires + leeway:
            raise TokenError("token expired (or has no exp)")
        if now < (claims.get("nbf") or 0) - leeway:
            raise TokenError("token not yet valid")
        subject = claims.get("sub")
        return Grants(subject=subject if isinstance(subject, str) else "", expires_at=float(expires), actions=actions)


def audience_matches(audience: object, service: str) -> bool:
    """2.8 and GitLab: a string; Distribution 3 also a list, any element matching."""
    if isinstance(audience, str):
        return audience == service
    return isinstance(audience, list) and service in audience


INTEGER_CLAIMS = ("exp", "nbf", "iat")  # int64 in the registries' ClaimSet (null decodes to 0)
STRING_CLAIMS = ("iss", "sub", "jti")  # string (JSON null decodes to "")


def check_go_types(claims: dict[str, Any]) -> None:
    """The registries decode the claims into Go types and refuse a token whose claim does not fit
    (``exp: 1.5``, ``sub: 42``, ``aud: 7``, ``aud: [7]`` are malformed there): refuse the same ones."""
    for name in INTEGER_CLAIMS:
        value = claims.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value not in INT64):
            raise UnverifiableToken(f"token {name} is not an integer")
    for name in STRING_CLAIMS:
        if claims.get(name) is not None and not isinstance(claims[name], str):
            raise UnverifiableToken(f"token {name} is not a string")
    audience = claims.get("aud")
    if not (
        audience is None
        or isinstance(audience, str)
        or (isinstance(audience, list) and all(isinstance(item, str) for item in audience))
    ):
        raise UnverifiableToken("token aud is neither a string nor a list of strings")


def bearer_token(authorization: str | None) -> str | None:
    """The token of a ``Bearer`` header (scheme case-insensitive), else ``None``."""
    if not authorization:
        return None
    parts = authorization.split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]
