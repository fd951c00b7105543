"""Token verification with real RSA/EC keys, including the JWT attack classes."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from conftest import ISSUER, SERVICE, MakeToken, SigningKey, access
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from geo_route.access import Access, Grants
from geo_route.config import Settings
from geo_route.errors import KeyBundleError, TokenError
from geo_route.tokens import TokenProblem, TokenVerifier, bearer_token, libtrust_kid, load_trusted_keys

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


def test_bundle_keys_are_loaded_as_objects_keyed_by_kid(
    bundle_path: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    keys = load_trusted_keys(bundle_path)
    assert set(keys) == {rsa_key.kid, ec_key.kid}


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
        assert verifier.authenticate(f"Bearer {token}") is TokenProblem.INVALID

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

    def test_ps256_is_not_a_registry_algorithm(self, verifier: TokenVerifier, rsa_key: SigningKey) -> None:
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

    def test_audience_as_a_list_like_registry_2_8(self, verifier: TokenVerifier, make_token: MakeToken) -> None:
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
