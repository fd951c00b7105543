"""Token verification with real RSA/EC/Ed25519 keys and certificates: every token form of the
registry dialects (shared/registry-dialects.md §1), and the JWT attack classes."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import ISSUER, REALM, SERVICE, MakeToken, SigningKey, access
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

from geo_route.access import Access, Grants
from geo_route.config import Settings
from geo_route.errors import KeyBundleError, TokenError
from geo_route.tokens import TokenProblem, TokenVerifier, bearer_token, libtrust_kid, load_trusted_keys
from geo_route.trusted_keys import distribution_ec_thumbprint, generator_kid, jwk_thumbprint, load_jwks
from geo_route.updater.pull_tokens import PullTokens, SigningKeyError, load_signing_key, signing_certificate

# The example key of docs/spec/auth/jwt.md (distribution v2.8.2), whose kid the spec gives.
SPEC_EXAMPLE_JWK = {
    "x": "m7zUpx3b-zmVE5cymSs64POG9QcyEpJaYCD82-549_Q",
    "y": "dU3biz8sZ_8GPB-odm8Wxz3lNDr1xcAQQPQaOcr1fmc",
}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(settings: Settings, clock: Clock) -> TokenVerifier:
    return TokenVerifier.from_settings(settings.token, clock=clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, object], claims: dict[str, object], signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])


def forge_signed(header: dict[str, object], claims: dict[str, object], key: SigningKey, hash_name: str) -> str:
    """A JWS signed by ``key`` with any header PyJWT itself would refuse to produce."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from jwt.utils import der_to_raw_signature

    algorithm = {"SHA256": hashes.SHA256(), "SHA384": hashes.SHA384(), "SHA512": hashes.SHA512()}[hash_name]
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
    if isinstance(key.private, rsa.RSAPrivateKey):
        signature = key.private.sign(signing_input, padding.PKCS1v15(), algorithm)
    else:
        signature = der_to_raw_signature(key.private.sign(signing_input, ec.ECDSA(algorithm)), key.private.curve)
    return f"{signing_input.decode()}.{b64(signature)}"


def test_libtrust_kid_matches_the_spec_example() -> None:
    def coordinate(name: str) -> int:
        text = SPEC_EXAMPLE_JWK[name]
        return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")

    key = ec.EllipticCurvePublicNumbers(coordinate("x"), coordinate("y"), ec.SECP256R1()).public_key()
    assert libtrust_kid(key) == "PYYO:TEWU:V7JH:26JV:AQTZ:LJC3:SXVJ:XGHA:34F2:2LAQ:ZRMK:Z7Q6"


def test_bundle_keys_are_loaded_as_objects_keyed_by_libtrust_kid_and_thumbprint(
    bundle_path: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    keys = load_trusted_keys(bundle_path)
    assert set(keys.by_libtrust) == {rsa_key.kid, ec_key.kid}
    for signer in (rsa_key, ec_key):
        assert keys.by_id[jwk_thumbprint(signer.private.public_key())] == (keys.by_libtrust[signer.kid],)


def test_thumbprints_match_rfc_7638() -> None:
    """RFC 7638 §3.1's example key and thumbprint."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5"
        "hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    key = RSAAlgorithm.from_jwk({"kty": "RSA", "e": "AQAB", "n": n})
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(
    "content", [b"", b"not pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_unusable_bundle_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(KeyBundleError):
        load_trusted_keys(path)


def test_missing_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyBundleError, match="cannot read"):
        load_trusted_keys(tmp_path / "absent.pem")


def test_valid_rsa_token_yields_grants(verifier: TokenVerifier, make_token: MakeToken) -> None:
    grants = verifier.verify(make_token([access("group/app", "pull", "push")]))
    assert grants.subject == "alice"
    assert grants.allows(Access("repository", "group/app", "push"))
    assert not grants.allows(Access("repository", "group/app", "delete"))
    assert not grants.allows(Access("repository", "group/other", "pull"))


def test_valid_ec_token_yields_grants(verifier: TokenVerifier, make_token: MakeToken, ec_key: SigningKey) -> None:
    grants = verifier.verify(make_token([access("group/app", "pull")], key=ec_key))
    assert grants.allows(Access("repository", "group/app", "pull"))


def test_wildcard_action_matches_any_action(verifier: TokenVerifier, make_token: MakeToken) -> None:
    grants = verifier.verify(make_token([access("group/app", "*"), access("catalog", "*", kind="registry")]))
    for action in ("pull", "push", "delete"):
        assert grants.allows(Access("repository", "group/app", action))
    assert grants.allows(Access("registry", "catalog", "*"))


@pytest.mark.parametrize("algorithm", ["RS384", "RS512"])
def test_rsa_key_accepts_every_rs_algorithm(verifier: TokenVerifier, rsa_key: SigningKey, algorithm: str) -> None:
    token = jwt.encode(
        {"iss": ISSUER, "aud": SERVICE, "exp": int(time.time()) + 60, "access": []},
        rsa_key.private,
        algorithm=algorithm,
        headers={"kid": rsa_key.kid},
    )
    assert verifier.verify(token).subject == ""


def test_sub_null_is_accepted_like_the_registry(verifier: TokenVerifier, make_token: MakeToken) -> None:
    assert verifier.verify(make_token(sub=None)).subject == ""


def claims_now(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 5,
        "sub": "mallory",
        "access": [access("group/app", "*")],
    }
    claims.update(overrides)
    return claims


class TestAttacks:
    """Each of these must be refused: TokenError from verify, INVALID from authenticate."""

    def assert_refused(self, verifier: TokenVerifier, token: str) -> None:
        with pytest.raises(TokenError):
            verifier.verify(token)
        assert verifier.authenticate(f"Bearer {token}") is TokenProblem.INVALID, "2.8's answer in every dialect"

    def test_alg_none(self, verifier: TokenVerifier, rsa_key: SigningKey) -> None:
        self.assert_refused(verifier, forge({"alg": "none", "typ": "JWT", "kid": rsa_key.kid}, claims_now()))

    @pytest.mark.parametrize("secret_source", ["public_key_pem", "certificate_pem", "kid"])
    def test_hs256_signed_with_public_material(
        self, verifier: TokenVerifier, rsa_key: SigningKey, secret_source: str
    ) -> None:
        secret = {
            "public_key_pem": rsa_key.public_pem(),
            "certificate_pem": rsa_key.certificate_pem(),
            "kid": rsa_key.kid.encode(),
        }[secret_source]
        import hashlib
        import hmac

        header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims_now()).encode())}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        self.assert_refused(verifier, f"{signing_input}.{b64(signature)}")

    def test_unknown_kid(self, verifier: TokenVerifier, make_token: MakeToken, rsa_key: SigningKey) -> None:
        self.assert_refused(
            verifier, make_token(headers={"kid": "AAAA:BBBB:CCCC:DDDD:EEEE:FFFF:GGGG:HHHH:IIII:JJJJ:KKKK:LLLL"})
        )

    @pytest.mark.parametrize("kid", ["../../etc/passwd", "", 42, None, ["a"]])
    def test_kid_that_is_not_a_libtrust_fingerprint(
        self, verifier: TokenVerifier, rsa_key: SigningKey, kid: object
    ) -> None:
        header = {"alg": "RS256", "typ": "JWT", "kid": kid}
        self.assert_refused(verifier, forge_signed(header, claims_now(), rsa_key, "SHA256"))

    def test_key_not_in_bundle(self, verifier: TokenVerifier, make_token: MakeToken, untrusted_key: SigningKey) -> None:
        self.assert_refused(verifier, make_token(key=untrusted_key))

    def test_untrusted_key_claiming_a_trusted_kid(
        self, verifier: TokenVerifier, make_token: MakeToken, untrusted_key: SigningKey, rsa_key: SigningKey
    ) -> None:
        self.assert_refused(verifier, make_token(key=untrusted_key, headers={"kid": rsa_key.kid}))

    def test_embedded_jwk_and_x5c_are_not_trusted(self, verifier: TokenVerifier, untrusted_key: SigningKey) -> None:
        cert = base64.b64encode(
            __import__("cryptography.x509", fromlist=["x"])
            .load_pem_x509_certificate(untrusted_key.certificate_pem())
            .public_bytes(serialization.Encoding.DER)
        ).decode()
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(untrusted_key.private.public_key()))
        for header in ({"x5c": [cert]}, {"jwk": jwk}, {"x5c": [cert], "kid": untrusted_key.kid}):
            token = jwt.encode(claims_now(), untrusted_key.private, algorithm="RS256", headers=header)
            self.assert_refused(verifier, token)

    def test_algorithm_must_match_key_type(
        self, verifier: TokenVerifier, ec_key: SigningKey, rsa_key: SigningKey
    ) -> None:
        # An EC token that claims the RSA key's kid, and an EC P-256 key used with ES384.
        self.assert_refused(
            verifier, jwt.encode(claims_now(), ec_key.private, algorithm="ES256", headers={"kid": rsa_key.kid})
        )
        header = {"alg": "ES384", "typ": "JWT", "kid": ec_key.kid}
        self.assert_refused(verifier, forge_signed(header, claims_now(), ec_key, "SHA384"))
        # The control: the same forging path with the right algorithm is accepted.
        header = {"alg": "ES256", "typ": "JWT", "kid": ec_key.kid}
        assert verifier.verify(forge_signed(header, claims_now(), ec_key, "SHA256")).subject == "mallory"

    def test_ps256_is_not_a_libtrust_algorithm(self, verifier: TokenVerifier, rsa_key: SigningKey) -> None:
        self.assert_refused(
            verifier, jwt.encode(claims_now(), rsa_key.private, algorithm="PS256", headers={"kid": rsa_key.kid})
        )

    def test_expired_beyond_leeway(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        now = int(time.time())
        self.assert_refused(verifier, make_token(exp=now - 61, nbf=now - 600, iat=now - 600))

    def test_missing_exp(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        self.assert_refused(verifier, make_token(exp=None))

    def test_not_yet_valid_beyond_leeway(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        self.assert_refused(verifier, make_token(nbf=int(time.time()) + 120))

    def test_wrong_issuer(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        self.assert_refused(verifier, make_token(iss="evil-issuer"))
        self.assert_refused(verifier, make_token(iss=ISSUER + "x"))
        self.assert_refused(verifier, make_token(iss=ISSUER[:-1]))

    def test_wrong_audience(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        self.assert_refused(verifier, make_token(aud="other_registry"))
        self.assert_refused(verifier, make_token(aud=None))

    def test_audience_as_a_list_with_a_libtrust_kid(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        self.assert_refused(verifier, make_token(aud=[SERVICE]))

    def test_tampered_payload(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        header, payload, signature = make_token([access("group/app", "pull")]).split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["access"] = [access("group/app", "*")]
        self.assert_refused(verifier, f"{header}.{b64(json.dumps(claims).encode())}.{signature}")

    @pytest.mark.parametrize(
        "claim",
        [
            "not a list",
            [["repository"]],
            [{"type": "repository"}],
            [{"type": "repository", "name": "a", "actions": "pull"}],
        ],
    )
    def test_malformed_access_claim(self, verifier: TokenVerifier, make_token: MakeToken, claim: object) -> None:
        self.assert_refused(verifier, make_token(claim))

    @pytest.mark.parametrize("garbage", ["x", "a.b.c", "....", "e30.e30.", "\u00e9.\u00e9.\u00e9"])
    def test_garbage(self, verifier: TokenVerifier, garbage: str) -> None:
        self.assert_refused(verifier, garbage)

    def test_oversized_token(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        self.assert_refused(verifier, make_token(padding="x" * 20_000))


def test_leeway_accepts_small_clock_skew(verifier: TokenVerifier, make_token: MakeToken) -> None:
    now = int(time.time())
    assert verifier.verify(make_token(exp=now - 30, nbf=now - 600))
    assert verifier.verify(make_token(nbf=now + 30))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("bearer tok", "tok"),
        ("BEARER tok", "tok"),
        ("Bearer tok", "tok"),
    ],
)
def test_bearer_parsing(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


def test_non_bearer_credentials_count_as_missing(verifier: TokenVerifier) -> None:
    assert verifier.authenticate("Basic dXNlcjpwYXNz") is TokenProblem.MISSING
    assert verifier.authenticate(None) is TokenProblem.MISSING


class TestCache:
    def test_second_verification_is_a_cache_hit(self, settings: Settings, make_token: MakeToken, clock: Clock) -> None:
        hits: list[bool] = []
        verifier = TokenVerifier.from_settings(settings.token, clock=clock, on_cache=hits.append)
        token = make_token()
        first, second = verifier.verify(token), verifier.verify(token)
        assert first is second
        assert hits == [False, True]

    def test_reports_its_entries_up_to_its_size(self, settings: Settings, make_token: MakeToken, clock: Clock) -> None:
        entries: list[int] = []
        bounded = dataclasses.replace(settings.token, cache_size=2)
        verifier = TokenVerifier.from_settings(bounded, clock=clock, on_cache_entries=entries.append)
        tokens = [make_token() for _ in range(4)]
        for token in [tokens[0], tokens[0], *tokens[1:]]:
            verifier.verify(token)
        assert entries == [1, 2, 2, 2]  # after each insertion (a hit inserts nothing)

    def test_never_served_past_exp(self, settings: Settings, make_token: MakeToken, clock: Clock) -> None:
        hits: list[bool] = []
        verifier = TokenVerifier.from_settings(settings.token, clock=clock, on_cache=hits.append)
        exp = int(clock.now) + 100
        token = make_token(exp=exp)
        verifier.verify(token)
        clock.now = exp  # at exp: not served from the cache, verified again (leeway still accepts)
        verifier.verify(token)
        assert hits == [False, False]

    def test_entries_are_bounded(self, settings: Settings, make_token: MakeToken, clock: Clock) -> None:
        import dataclasses

        small = dataclasses.replace(settings.token, cache_size=3)
        hits: list[bool] = []
        verifier = TokenVerifier.from_settings(small, clock=clock, on_cache=hits.append)
        tokens = [make_token(jti=str(i)) for i in range(5)]
        for token in tokens:
            verifier.verify(token)
        verifier.verify(tokens[0])  # evicted: a miss
        verifier.verify(tokens[4])  # most recent: a hit
        assert hits[-2:] == [False, True]

    def test_refused_tokens_are_not_cached(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
        token = make_token(iss="evil")
        for _ in range(2):
            with pytest.raises(TokenError):
                verifier.verify(token)


def test_grants_are_exactly_what_was_granted() -> None:
    grants = Grants("u", 0.0, {("repository", "a"): frozenset({"pull"})})
    assert grants.allows_all([Access("repository", "a", "pull")])
    assert not grants.allows_all([Access("repository", "a", "pull"), Access("repository", "a", "push")])


# ---------------------------------------------------------------------------------------------
# Every token form of shared/registry-dialects.md §1, against the verifier: accepted exactly when
# some dialect accepts it (the union), refused otherwise with the challenge each dialect sends.

D28, D300, D31, GITLAB = "2.8", "3.0.0", "3.1", "gitlab"
EVERY_DIALECT = frozenset({D28, D300, D31, GITLAB})
LIBTRUST_DIALECTS = frozenset({D28, GITLAB})
V3 = frozenset({D300, D31})
NOBODY: frozenset[str] = frozenset()


def make_certificate(
    key: Any,
    name: str,
    *,
    issuer_key: Any = None,
    issuer: x509.Certificate | None = None,
    ca: bool | None = None,
    valid: tuple[int, int] = (-1, 30),
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid[0]))
        .not_valid_after(now + datetime.timedelta(days=valid[1]))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    signer = issuer_key or key
    return builder.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def der64(certificate: x509.Certificate) -> str:
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


@dataclass(frozen=True)
class Pki:
    """Bundle: the RSA and EC signing certificates, an Ed25519 one and a CA; a JWKS file with a key
    of its own; a leaf of the CA, a leaf through an intermediate, and a chain to a stranger root."""

    rsa: Any
    ec: Any
    ed: Any
    jwks_key: Any
    leaf_key: Any
    stranger: Any
    rsa_cert: x509.Certificate
    ed_cert: x509.Certificate
    leaf: x509.Certificate
    intermediate: x509.Certificate
    deep_leaf: x509.Certificate
    expired_leaf: x509.Certificate
    stranger_leaf: x509.Certificate
    bundle: Path
    jwks: Path
    registry_bundle: Path  # the bundle less its Ed25519 certificate, which libtrust (2.8) cannot load


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory, rsa_key: SigningKey, ec_key: SigningKey) -> Pki:
    ca_key, intermediate_key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "ab")
    stranger_root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed = ed25519.Ed25519PrivateKey.generate()
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_certificate(ca_key, "token CA", ca=True)
    rsa_cert = make_certificate(rsa_key.private, "rsa signer")
    ec_cert = make_certificate(ec_key.private, "ec signer")
    ed_cert = make_certificate(ed, "ed25519 signer", ca=True)
    intermediate = make_certificate(intermediate_key, "intermediate", issuer_key=ca_key, issuer=ca, ca=True)
    stranger_root = make_certificate(stranger_root_key, "stranger root", ca=True)
    directory = tmp_path_factory.mktemp("forms")
    bundle = directory / "bundle.pem"
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (rsa_cert, ec_cert, ed_cert, ca)))
    registry_bundle = directory / "registry-bundle.pem"
    registry_bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (rsa_cert, ec_cert, ca)))
    jwks_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(jwks_key.public_key(), as_dict=True), "kid": "jwks-only-key", "use": "sig"}
    oct_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "a-shared-secret"}  # skipped, as Distribution 3 cannot use it
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk, oct_key]}))
    return Pki(
        rsa=rsa_key.private,
        ec=ec_key.private,
        ed=ed,
        jwks_key=jwks_key,
        leaf_key=leaf_key,
        stranger=stranger_root_key,
        rsa_cert=rsa_cert,
        ed_cert=ed_cert,
        leaf=make_certificate(leaf_key, "leaf", issuer_key=ca_key, issuer=ca),
        intermediate=intermediate,
        deep_leaf=make_certificate(leaf_key, "deep leaf", issuer_key=intermediate_key, issuer=intermediate),
        expired_leaf=make_certificate(leaf_key, "old leaf", issuer_key=ca_key, issuer=ca, valid=(-30, -1)),
        stranger_leaf=make_certificate(leaf_key, "stranger leaf", issuer_key=stranger_root_key, issuer=stranger_root),
        bundle=bundle,
        jwks=jwks,
        registry_bundle=registry_bundle,
    )


@pytest.fixture
def forms_verifier(settings: Settings, pki: Pki) -> TokenVerifier:
    token = dataclasses.replace(settings.token, rootcertbundle=str(pki.bundle), jwks=str(pki.jwks), cache_size=0)
    return TokenVerifier.from_settings(token)


def sign(key: Any, algorithm: str, header: dict[str, Any], **claims: Any) -> str:
    return jwt.encode(claims_now(**claims), key, algorithm=algorithm, headers=header)


def public_jwk(key: Any, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return {**RSAAlgorithm.to_jwk(public, as_dict=True), **extra}
    return {**jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True), **extra}


def thumbprint(key: Any) -> str:
    return jwk_thumbprint(key.public_key())


def tampered(token: str) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps(claims_now(access=[access('other/app', '*')])).encode())}.{signature}"


def hs256(secret: bytes, header: dict[str, Any]) -> str:
    signing_input = f"{b64(json.dumps({'alg': 'HS256', **header}).encode())}.{b64(json.dumps(claims_now()).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def user_token(p: Pki) -> str:
    """GitLab's nested ``user`` claim (and notifications' actor.user): same key, no iss/aud."""
    exp = int(time.time()) + 300
    claims = {"user_info": {"token_type": "personal_access_token", "username": "mallory"}, "exp": exp}
    return jwt.encode(claims, p.rsa, algorithm="RS256", headers={"kid": libtrust_kid(p.rsa.public_key())})


@dataclass(frozen=True)
class Form:
    name: str
    build: Callable[[Pki], str]
    accepted_by: frozenset[str]
    # For a form nobody accepts: what Distribution 3 answers (2.8 and GitLab always say invalid_token).
    v3_error: str = "invalid_token"


def lt(key: Any) -> str:
    return libtrust_kid(key.public_key())


FORMS = [
    Form("libtrust kid, RSA", lambda p: sign(p.rsa, "RS256", {"kid": lt(p.rsa)}), LIBTRUST_DIALECTS),
    Form("libtrust kid, EC", lambda p: sign(p.ec, "ES256", {"kid": lt(p.ec)}), LIBTRUST_DIALECTS),
    Form("thumbprint kid, RSA", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}), V3),
    Form("thumbprint kid, EC", lambda p: sign(p.ec, "ES256", {"kid": thumbprint(p.ec)}), frozenset({D31})),
    Form("thumbprint kid, Ed25519", lambda p: sign(p.ed, "EdDSA", {"kid": thumbprint(p.ed)}), frozenset({D31})),
    Form("x5c only", lambda p: sign(p.rsa, "RS256", {"x5c": [der64(p.rsa_cert)]}), EVERY_DIALECT),
    Form(
        "thumbprint kid + x5c",
        lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa), "x5c": [der64(p.rsa_cert)]}),
        EVERY_DIALECT,
    ),
    Form(
        "libtrust kid + x5c (minted)",
        lambda p: sign(p.rsa, "RS256", {"kid": lt(p.rsa), "x5c": [der64(p.rsa_cert)]}),
        EVERY_DIALECT,
    ),
    Form("x5c leaf of a bundle CA", lambda p: sign(p.leaf_key, "ES256", {"x5c": [der64(p.leaf)]}), EVERY_DIALECT),
    Form(
        "x5c chain via an intermediate",
        lambda p: sign(p.leaf_key, "ES256", {"x5c": [der64(p.deep_leaf), der64(p.intermediate)]}),
        EVERY_DIALECT,
    ),
    Form(
        "x5c without its intermediate",
        lambda p: sign(p.leaf_key, "ES256", {"x5c": [der64(p.deep_leaf)]}),
        NOBODY,
    ),
    Form(
        "x5c to an untrusted root, trusted kid",
        lambda p: sign(p.leaf_key, "ES256", {"x5c": [der64(p.stranger_leaf)], "kid": lt(p.ec)}),
        NOBODY,
    ),
    Form("x5c of an expired leaf", lambda p: sign(p.leaf_key, "ES256", {"x5c": [der64(p.expired_leaf)]}), NOBODY),
    Form(
        "x5c of the bundle, signed by another key",
        lambda p: sign(p.stranger, "RS256", {"x5c": [der64(p.rsa_cert)]}),
        NOBODY,
        v3_error="",
    ),
    Form("jwk of a bundle key", lambda p: sign(p.rsa, "RS256", {"jwk": public_jwk(p.rsa)}), LIBTRUST_DIALECTS),
    Form(
        "jwk with its thumbprint kid",
        lambda p: sign(p.rsa, "RS256", {"jwk": public_jwk(p.rsa, kid=thumbprint(p.rsa))}),
        V3,
    ),
    Form(
        "jwk with its libtrust kid",
        lambda p: sign(p.rsa, "RS256", {"jwk": public_jwk(p.rsa, kid=lt(p.rsa))}),
        LIBTRUST_DIALECTS,
    ),
    Form(
        "jwk whose x5c chains to the bundle",
        lambda p: sign(p.leaf_key, "ES256", {"jwk": public_jwk(p.leaf_key, x5c=[der64(p.leaf)])}),
        EVERY_DIALECT,
    ),
    Form("jwk of an untrusted key", lambda p: sign(p.stranger, "RS256", {"jwk": public_jwk(p.stranger)}), NOBODY),
    Form(
        "jwk of an untrusted key naming a trusted kid",
        lambda p: sign(p.stranger, "RS256", {"jwk": public_jwk(p.stranger, kid=thumbprint(p.rsa))}),
        NOBODY,
        v3_error="",
    ),
    Form("aud list with a match", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, aud=["x", SERVICE]), V3),
    Form(
        "aud list with a match, libtrust kid",
        lambda p: sign(p.rsa, "RS256", {"kid": lt(p.rsa)}, aud=[SERVICE]),
        NOBODY,  # 2.8 and GitLab cannot decode a list; 3.x do not know the kid
    ),
    Form("aud list without a match", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, aud=["x"]), NOBODY),
    Form("aud null", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, aud=None), NOBODY),
    Form("aud []", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, aud=[]), NOBODY),
    Form("aud 7", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, aud=7), NOBODY, v3_error=""),
    Form("PS256, thumbprint kid", lambda p: sign(p.rsa, "PS256", {"kid": thumbprint(p.rsa)}), V3),
    Form("PS256, libtrust kid", lambda p: sign(p.rsa, "PS256", {"kid": lt(p.rsa)}), NOBODY),
    Form("RS512, thumbprint kid", lambda p: sign(p.rsa, "RS512", {"kid": thumbprint(p.rsa)}), V3),
    Form("RS512, libtrust kid", lambda p: sign(p.rsa, "RS512", {"kid": lt(p.rsa)}), LIBTRUST_DIALECTS),
    Form("EdDSA with the x5c of its certificate", lambda p: sign(p.ed, "EdDSA", {"x5c": [der64(p.ed_cert)]}), V3),
    Form("key only in the JWKS file", lambda p: sign(p.jwks_key, "RS256", {"kid": "jwks-only-key"}), V3),
    Form("JWKS key under its libtrust kid", lambda p: sign(p.jwks_key, "RS256", {"kid": lt(p.jwks_key)}), NOBODY),
    Form("JWKS shared secret as HS256", lambda p: hs256(b"secret", {"kid": "a-shared-secret"}), NOBODY),
    Form("actor.user token (no iss/aud)", user_token, NOBODY),
    Form("alg none", lambda p: forge({"alg": "none", "kid": thumbprint(p.rsa)}, claims_now()), NOBODY),
    Form("HS256 keyed with the public key, libtrust kid", lambda p: hs256(pem(p.rsa), {"kid": lt(p.rsa)}), NOBODY),
    Form(
        "HS256 keyed with the public key, thumbprint kid",
        lambda p: hs256(pem(p.rsa), {"kid": thumbprint(p.rsa)}),
        NOBODY,
        v3_error="",  # in Distribution 3's default signingalgorithms: a failed signature there
    ),
    Form("ES256 with an RSA key's thumbprint", lambda p: sign(p.ec, "ES256", {"kid": thumbprint(p.rsa)}), NOBODY, ""),
    Form(
        "untrusted key, its own thumbprint",
        lambda p: sign(p.stranger, "RS256", {"kid": thumbprint(p.stranger)}),
        NOBODY,
    ),
    Form("tampered claims, libtrust kid", lambda p: tampered(sign(p.rsa, "RS256", {"kid": lt(p.rsa)})), NOBODY),
    Form(
        "tampered claims, thumbprint kid",
        lambda p: tampered(sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)})),
        NOBODY,
        v3_error="",
    ),
    Form(
        "exp a string, thumbprint kid",
        lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, exp="9999999999"),
        NOBODY,
        v3_error="",
    ),
    Form("expired, thumbprint kid", lambda p: sign(p.rsa, "RS256", {"kid": thumbprint(p.rsa)}, exp=1), NOBODY),
]


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("form", FORMS, ids=[form.name for form in FORMS])
def test_token_form_is_accepted_exactly_when_some_dialect_accepts_it(
    forms_verifier: TokenVerifier, pki: Pki, form: Form
) -> None:
    token = form.build(pki)
    credential = forms_verifier.authenticate(f"Bearer {token}")
    if form.accepted_by:
        assert isinstance(credential, Grants), f"{form.name}: accepted by {sorted(form.accepted_by)}"
        assert credential.subject == "mallory" or form.name.startswith("actor")
    else:
        assert isinstance(credential, TokenProblem), f"{form.name}: no dialect accepts it"


DIALECT_SETTINGS = {"distribution-2.8": D28, "distribution-3": D31, "gitlab": GITLAB}


@pytest.mark.parametrize("dialect", sorted(DIALECT_SETTINGS))
@pytest.mark.parametrize("form", [f for f in FORMS if not f.accepted_by], ids=lambda f: f.name)
def test_refused_token_form_gets_the_dialects_challenge(
    forms_verifier: TokenVerifier, pki: Pki, form: Form, dialect: str
) -> None:
    from geo_route.operations import classify_request
    from geo_route.routing import Policy, authorize

    credential = forms_verifier.authenticate(f"Bearer {form.build(pki)}")
    policy = Policy(realm=REALM, service=SERVICE, dialect=dialect)  # type: ignore[arg-type]
    decision = authorize(classify_request("GET", "/v2/group/app/manifests/v1"), credential, policy)
    assert decision is not None and decision.status == 401
    error = form.v3_error if dialect == "distribution-3" else "invalid_token"
    expected = f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:group/app:pull"'
    assert decision.www_authenticate == expected + (f',error="{error}"' if error else "")


def test_thumbprint_kid_as_distribution_3_1_computes_it_for_short_ec_coordinates(
    settings: Settings, tmp_path: Path
) -> None:
    """Go's big.Int.Bytes() drops leading zero bytes: 3.1's id differs from RFC 7638's for such keys."""
    while True:
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        if numbers.x < 2**248:
            break
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(make_certificate(key, "short x").public_bytes(serialization.Encoding.PEM))
    verifier = TokenVerifier.from_settings(dataclasses.replace(settings.token, rootcertbundle=str(bundle)))
    go_kid = distribution_ec_thumbprint("P-256", numbers.x, numbers.y)
    assert go_kid != jwk_thumbprint(key.public_key())
    for kid in (go_kid, jwk_thumbprint(key.public_key())):
        assert isinstance(verifier.authenticate(f"Bearer {sign(key, 'ES256', {'kid': kid})}"), Grants)


def test_v3_0_ec_quirk_is_accepted_only_when_asked(settings: Settings, pki: Pki, ec_key: SigningKey) -> None:
    """Distribution 3.0.0 names each P-256 key by the curve's generator; off by default."""
    quirk_kid = generator_kid(ec.SECP256R1())
    token = sign(ec_key.private, "ES256", {"kid": quirk_kid})
    base = dataclasses.replace(settings.token, rootcertbundle=str(pki.bundle))
    assert TokenVerifier.from_settings(base).authenticate(f"Bearer {token}") is TokenProblem.INVALID
    quirky = TokenVerifier.from_settings(dataclasses.replace(base, accept_v3_0_ec_quirk=True))
    assert isinstance(quirky.authenticate(f"Bearer {token}"), Grants)
    forged = sign(ec.generate_private_key(ec.SECP256R1()), "ES256", {"kid": quirk_kid})
    assert isinstance(quirky.authenticate(f"Bearer {forged}"), TokenProblem), "still only the bundle's key"


def test_algorithms_setting_narrows_every_form(settings: Settings, pki: Pki) -> None:
    narrow = dataclasses.replace(settings.token, rootcertbundle=str(pki.bundle), algorithms=("RS256",))
    verifier = TokenVerifier.from_settings(narrow)
    assert isinstance(verifier.authenticate(f"Bearer {sign(pki.rsa, 'RS256', {'kid': thumbprint(pki.rsa)})}"), Grants)
    for algorithm in ("PS256", "RS512"):
        token = sign(pki.rsa, algorithm, {"kid": thumbprint(pki.rsa)})
        assert verifier.authenticate(f"Bearer {token}") is TokenProblem.INVALID


def test_jwks_file_problems_are_reported(tmp_path: Path) -> None:
    for content, message in (("not json", "not JSON"), ('{"nokeys": 1}', 'no "keys" list')):
        path = tmp_path / "jwks.json"
        path.write_text(content)
        with pytest.raises(KeyBundleError, match=message):
            load_jwks(path)
    with pytest.raises(KeyBundleError, match="cannot read"):
        load_jwks(tmp_path / "absent.json")


class TestMintedTokens:
    """geo-route's own reconcile tokens: libtrust kid plus the x5c of the signing key's certificate."""

    def pull_tokens(self, pki: Pki, certificate: x509.Certificate | None, clock: Clock) -> PullTokens:
        return PullTokens(pki.rsa, issuer=ISSUER, service=SERVICE, certificate=certificate, clock=clock)

    def test_minted_token_carries_libtrust_kid_and_x5c_and_verifies(
        self, forms_verifier: TokenVerifier, pki: Pki, clock: Clock
    ) -> None:
        authorization = self.pull_tokens(pki, pki.rsa_cert, clock).authorization("group/app")
        header = jwt.get_unverified_header(authorization.split(" ", 1)[1])
        assert header["kid"] == lt(pki.rsa) and header["x5c"] == [der64(pki.rsa_cert)]
        grants = forms_verifier.authenticate(authorization)
        assert isinstance(grants, Grants) and grants.allows(Access("repository", "group/app", "pull"))

    def test_without_a_valid_certificate_only_the_kid(self, pki: Pki, clock: Clock) -> None:
        expired = make_certificate(pki.rsa, "expired", valid=(-30, -1))
        for certificate in (None, expired):
            token = self.pull_tokens(pki, certificate, clock).mint("group/app", clock.now)
            assert jwt.get_unverified_header(token).keys() == {"alg", "kid", "typ"}

    def test_from_settings_finds_the_certificate_by_key(self, settings: Settings, pki: Pki, tmp_path: Path) -> None:
        key_path = tmp_path / "signing.key"
        key_path.write_bytes(
            pki.rsa.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        site = dataclasses.replace(
            settings,
            token=dataclasses.replace(settings.token, rootcertbundle=str(pki.bundle)),
            updater=dataclasses.replace(settings.updater, signing_key=str(key_path)),
        )
        token = PullTokens.from_settings(site).mint(None, time.time())
        assert jwt.get_unverified_header(token)["x5c"] == [der64(pki.rsa_cert)]
        assert signing_certificate(load_signing_key(str(key_path)), str(pki.bundle)) == pki.rsa_cert
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with pytest.raises(SigningKeyError, match="no certificate"):
            signing_certificate(stranger, str(pki.bundle))


@pytest.fixture(scope="module")
def registry_2_8(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    """A real Distribution 2.8 registry trusting the forms' bundle (less the Ed25519 certificate)."""
    from geo_route.devstack.registry import TokenAuth, start_registry

    auth = TokenAuth(realm=REALM, service=SERVICE, issuer=ISSUER, rootcertbundle=pki.registry_bundle)
    registry = start_registry(tmp_path_factory.mktemp("registry-2.8"), auth, name="registry-2.8")
    try:
        yield registry.url
    finally:
        registry.stop()


@pytest.mark.parametrize("form", FORMS, ids=[form.name for form in FORMS])
def test_the_real_registry_2_8_answers_each_form_as_the_table_says(registry_2_8: str, pki: Pki, form: Form) -> None:
    """The table's 2.8 column, and geo-route's 2.8 challenge, against the registry itself."""
    from geo_route.devstack.processes import http_get

    status, headers = http_get(f"{registry_2_8}/v2/", {"Authorization": f"Bearer {form.build(pki)}"})
    assert status == (200 if D28 in form.accepted_by else 401), form.name
    if status == 401:
        challenge = {k.lower(): v for k, v in headers.items()}["www-authenticate"]
        assert challenge == f'Bearer realm="{REALM}",service="{SERVICE}",error="invalid_token"'


def test_the_real_registry_2_8_accepts_the_minted_token(registry_2_8: str, pki: Pki, clock: Clock) -> None:
    from geo_route.devstack.processes import http_get

    tokens = PullTokens(pki.rsa, issuer=ISSUER, service=SERVICE, certificate=pki.rsa_cert)
    assert "x5c" in jwt.get_unverified_header(tokens.authorization(None).split(" ", 1)[1])
    assert http_get(f"{registry_2_8}/v2/_catalog", {"Authorization": tokens.authorization(None)})[0] == 200
