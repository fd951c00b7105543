"""Token attacks and path tricks through real NGINX, judged against the registry itself.

Every request is sent twice with the same token: through the site (NGINX → auth_request → a
registry) and straight to the primary registry (Distribution 2.8, token auth, the same key). A
refusal must be the registry's refusal: the same status, the same ``WWW-Authenticate`` challenge
(realm, service, scope, error) and the same error code. Positive controls prove the tokens and
requests are otherwise right, so a refusal is the attack's doing.

Path tricks: a token for repository A never reads repository B, whatever the URI looks like, and
the URI a registry receives is byte for byte the URI the auth service decided on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from support import RecordingRelay

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import load_private_key
from geo_route.devstack.processes import HttpAnswer, wait_until
from geo_route.devstack.registry import registry_binary, registry_major_version
from geo_route.devstack.stack import ISSUER, SERVICE, bring_up
from geo_route.tokens import libtrust_kid

pytestmark = pytest.mark.integration

REPO_A = "attack/a"
REPO_B = "attack/b"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True)
class Site:
    client: StackClient
    key: rsa.RSAPrivateKey
    certificate_pem: bytes
    image_a: OciImage
    image_b: OciImage
    primary_relay: RecordingRelay


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("attacks")
    relays: list[RecordingRelay] = []
    stack = bring_up(root / "stack", primary_front=lambda target: record_requests(target, relays))
    client = StackClient(stack.info, stack)
    try:
        settings = load_settings(stack.info.site_file, environ={})
        key = load_private_key(Path(settings.updater.signing_key))
        assert isinstance(key, rsa.RSAPrivateKey)
        image_a = build_oci_image(root / "image-a", "v1", variant="a", layer_count=2)
        image_b = build_oci_image(root / "image-b", "v1", variant="b", layer_count=2)
        client.push(image_a, REPO_A, "v1")
        client.push(image_b, REPO_B, "v1")
        client.replicate(REPO_A)
        client.replicate(REPO_B)  # B is local too: a trick that reached the local registry would succeed
        yield Site(client, key, Path(settings.token.rootcertbundle).read_bytes(), image_a, image_b, relays[0])
    finally:
        client.close()
        stack.stop()
        for relay in relays:
            relay.close()


def record_requests(target: str, relays: list[RecordingRelay]) -> str:
    """The primary behind a relay that records every request target it receives."""
    relays.append(RecordingRelay(target))
    return relays[-1].address


def claims(access: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "mallory",
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 5,
        "iat": now,
        "jti": str(uuid.uuid4()),
        "access": access,
    }
    base.update(overrides)
    return base


def grant(repository: str, *actions: str) -> dict[str, Any]:
    return {"type": "repository", "name": repository, "actions": list(actions)}


def signed(key: rsa.RSAPrivateKey, payload: dict[str, Any], kid: str | None = None) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid or libtrust_kid(key.public_key())})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT assembled by hand: PyJWT refuses to HMAC with a PEM key, an attacker does not."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def send(site: Site, base_url: str, method: str, uri: str, token: str | None) -> HttpAnswer:
    """One raw request: the URI goes on the wire exactly as given (no client-side normalization)."""
    host = base_url.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=15)
    try:
        headers = {"Accept": MANIFEST_TYPES}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        connection.putrequest(method, uri, skip_host=False, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def error_code(answer: HttpAnswer) -> str:
    try:
        return str(json.loads(answer.body)["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def refusal(answer: HttpAnswer) -> tuple[int, str, str]:
    return answer.status, normalized_challenge(answer.headers.get("www-authenticate", "")), error_code(answer)


def normalized_challenge(challenge: str) -> str:
    """Registry 2.8 lists scopes, and the actions of a scope, in Go map order (random): sort both."""
    match = re.search(r'scope="([^"]*)"', challenge)
    if match is None:
        return challenge
    scopes = " ".join(sorted(sort_actions(scope) for scope in match.group(1).split(" ")))
    return challenge[: match.start(1)] + scopes + challenge[match.end(1) :]


def assert_refused_like_the_registry(site: Site, method: str, uri: str, token: str | None) -> tuple[int, str, str]:
    through_site = refusal(send(site, site.client.info.secondary_url, method, uri, token))
    at_registry = refusal(send(site, site.client.info.primary_url, method, uri, token))
    assert through_site == at_registry, f"{method} {uri}: site {through_site} vs registry {at_registry}"
    assert through_site[0] == 401, through_site
    return through_site


def sort_actions(scope: str) -> str:
    kind, name, actions = scope.rsplit(":", 2) if scope.count(":") >= 2 else (scope, "", "")
    return f"{kind}:{name}:{','.join(sorted(actions.split(',')))}" if name else scope


# -- positive controls: the tokens and requests are right, so each refusal below is the attack's doing


def test_a_valid_pull_token_reads_its_repository_through_the_site(site: Site) -> None:
    token = signed(site.key, claims([grant(REPO_A, "pull")]))
    manifest = f"/v2/{REPO_A}/manifests/{site.image_a.digest}"
    answer = send(site, site.client.info.secondary_url, "GET", manifest, token)
    assert answer.status == 200
    assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == site.image_a.digest


# -- token attacks


@pytest.fixture(scope="module")
def bad_tokens(site: Site) -> dict[str, str]:
    """Every attack's token, made once for the module (the outsider key is a fresh RSA-2048 key)."""
    return attack_tokens(site)


def attack_tokens(site: Site) -> dict[str, str]:
    pull_a = [grant(REPO_A, "pull")]
    trusted_kid = libtrust_kid(site.key.public_key())
    outsider = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = site.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    return {
        "alg none": hand_made({"typ": "JWT", "alg": "none", "kid": trusted_kid}, claims(pull_a), None),
        "HS256 keyed with the public key": hand_made(
            {"typ": "JWT", "alg": "HS256", "kid": trusted_kid}, claims(pull_a), public_pem
        ),
        "HS256 keyed with the certificate": hand_made(
            {"typ": "JWT", "alg": "HS256", "kid": trusted_kid}, claims(pull_a), site.certificate_pem
        ),
        "forged kid (outside key claims the trusted kid)": signed(outsider, claims(pull_a), kid=trusted_kid),
        "key outside the bundle": signed(outsider, claims(pull_a)),
        "expired": signed(site.key, claims(pull_a, exp=now - 600, nbf=now - 900, iat=now - 900)),
        "not yet valid": signed(site.key, claims(pull_a, nbf=now + 600)),
        "wrong iss": signed(site.key, claims(pull_a, iss="someone-else")),
        "wrong aud": signed(site.key, claims(pull_a, aud="another-registry")),
        "tampered payload": tamper(signed(site.key, claims(pull_a))),
        # Signed by the trusted key, but with claims registry 2.8's Go types cannot hold:
        "exp not an integer": signed(site.key, claims(pull_a, exp=now + 300.5)),
        "nbf a string": signed(site.key, claims(pull_a, nbf=str(now - 5))),
        "iat not an integer": signed(site.key, claims(pull_a, iat=now + 0.25)),
        "sub a number": signed(site.key, claims(pull_a, sub=42)),
        "jti a number": signed(site.key, claims(pull_a, jti=7)),
        "aud a list": signed(site.key, claims(pull_a, aud=[SERVICE])),
    }


def tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["access"] = [grant(REPO_B, "pull", "push", "delete")]
    return f"{header}.{b64(json.dumps(body).encode())}.{signature}"


ATTACKS = [
    "alg none",
    "HS256 keyed with the public key",
    "HS256 keyed with the certificate",
    "forged kid (outside key claims the trusted kid)",
    "key outside the bundle",
    "expired",
    "not yet valid",
    "wrong iss",
    "wrong aud",
    "tampered payload",
    "exp not an integer",
    "nbf a string",
    "iat not an integer",
    "sub a number",
    "jti a number",
    "aud a list",
]


# Distribution 3 returns go-jose's own error for a signature that does not verify with the key the
# token names, or claims it cannot decode (v3.0.0 registry/auth/token/token.go, Verify: the error of
# t.JWT.Claims as is), and its challenge names an error only for ErrInvalidToken/ErrMalformedToken
# (accesscontroller.go, SetHeaders): no error= for these. It decodes aud as a string or a list
# (token.go: AudienceList, containsAny), and the devstack gives it the libtrust kid in its JWKS: that
# token is valid there.
UNVERIFIABLE_ON_3 = {
    "HS256 keyed with the public key",
    "HS256 keyed with the certificate",
    "forged kid (outside key claims the trusted kid)",
    "tampered payload",
    "exp not an integer",
    "nbf a string",
    "iat not an integer",
    "sub a number",
    "jti a number",
}
VALID_ON_3 = {"aud a list"}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_bad_token_is_refused_exactly_as_the_registry_refuses_it(
    site: Site, bad_tokens: dict[str, str], attack: str
) -> None:
    token = bad_tokens[attack]
    since = site.client.access_log_offset()
    uris = (
        ("GET", f"/v2/{REPO_A}/manifests/{site.image_a.digest}"),
        ("GET", f"/v2/{REPO_A}/blobs/{site.image_a.blob_digests[0]}"),
        ("HEAD", f"/v2/{REPO_A}/manifests/v1"),
    )
    version_3 = registry_major_version(registry_binary()) >= 3
    if version_3 and attack in VALID_ON_3:
        for method, uri in uris:
            through_site = refusal(send(site, site.client.info.secondary_url, method, uri, token))
            at_registry = refusal(send(site, site.client.info.primary_url, method, uri, token))
            assert through_site == at_registry and through_site[0] == 200, (method, uri, through_site, at_registry)
        return
    for method, uri in uris:
        status, challenge, _ = assert_refused_like_the_registry(site, method, uri, token)
        if version_3 and attack in UNVERIFIABLE_ON_3:
            assert "error=" not in challenge, (attack, status, challenge)
        else:
            assert 'error="invalid_token"' in challenge, (attack, status, challenge)
    # Refused by the auth service itself, not passed to a registry that happened to refuse it too.
    entries = [e for e in site.client.access_log(since) if e.uri.startswith(f"/v2/{REPO_A}/")]
    assert [(e.status, e.route, e.reason) for e in entries] == [(401, "", "invalid-token")] * len(uris)


def test_a_token_for_repository_a_is_refused_on_repository_b(site: Site) -> None:
    token = signed(site.key, claims([grant(REPO_A, "pull")]))
    for method, uri in (
        ("GET", f"/v2/{REPO_B}/manifests/v1"),
        ("GET", f"/v2/{REPO_B}/manifests/{site.image_b.digest}"),
        ("HEAD", f"/v2/{REPO_B}/blobs/{site.image_b.blob_digests[0]}"),
        ("GET", f"/v2/{REPO_B}/tags/list"),
    ):
        _, challenge, code = assert_refused_like_the_registry(site, method, uri, token)
        assert f'scope="repository:{REPO_B}:pull",error="insufficient_scope"' in challenge
        assert code == ("" if method == "HEAD" else "UNAUTHORIZED")


def test_a_pull_token_cannot_push_delete_or_mount(site: Site) -> None:
    pull_a = signed(site.key, claims([grant(REPO_A, "pull")]))
    blob_a = site.image_a.blob_digests[0]
    for method, uri in (
        ("POST", f"/v2/{REPO_A}/blobs/uploads/"),
        ("PUT", f"/v2/{REPO_A}/manifests/v2"),
        ("DELETE", f"/v2/{REPO_A}/manifests/{site.image_a.digest}"),
        ("DELETE", f"/v2/{REPO_A}/blobs/{blob_a}"),
    ):
        _, challenge, _ = assert_refused_like_the_registry(site, method, uri, pull_a)
        assert 'error="insufficient_scope"' in challenge
    # Mount into B (push granted there) from A, which this token cannot read.
    push_b = signed(site.key, claims([grant(REPO_B, "pull", "push")]))
    mount = f"/v2/{REPO_B}/blobs/uploads/?mount={blob_a}&from={REPO_A}"
    _, challenge, _ = assert_refused_like_the_registry(site, "POST", mount, push_b)
    assert f"repository:{REPO_A}:pull" in challenge and 'error="insufficient_scope"' in challenge


def test_the_attacks_never_reach_a_registry_with_a_routed_decision(site: Site, bad_tokens: dict[str, str]) -> None:
    """Refusals come from the auth service (NGINX answers 401 itself), never from a proxied upstream."""
    since = site.client.access_log_offset()
    token = bad_tokens["key outside the bundle"]
    assert send(site, site.client.info.secondary_url, "GET", f"/v2/{REPO_A}/manifests/v1", token).status == 401
    entries = [e for e in site.client.access_log(since) if e.uri == f"/v2/{REPO_A}/manifests/v1"]
    assert [(e.status, e.route, e.reason) for e in entries] == [(401, "", "invalid-token")]


# -- path tricks: a token for A, URIs that try to reach B


PATH_TRICKS = [
    "/v2/{A}/../b/manifests/v1",
    "/v2/{A}/../../v2/{B}/manifests/{manifest_b}",
    "/v2/{A}/blobs/../../b/blobs/{blob_b}",
    "/v2/attack%2fb/manifests/v1",
    "/v2/attack/%62/manifests/v1",
    "/v2/attack/a%2f..%2fb/manifests/v1",
    "/v2/attack/a/%2e%2e/b/manifests/v1",
    "/v2/{A}//../b/manifests/v1",
    "//v2/{B}/manifests/v1",
    "/v2//{B}/manifests/v1",
    "/v2/{B}/manifests/v1?scope=repository:{A}:pull",
    "/v2/{A}/manifests/v1/../../../b/manifests/v1",
    "/v2/ATTACK/B/manifests/v1",
    "/v2/{A}/blobs/{blob_a}/../../../b/blobs/{blob_b}",
    "/v2/{A}/blobs/{blob_b};/../../../b/blobs/{blob_b}",
    "/v2/{A}/manifests/v1%00/../../b/manifests/v1",
    "/v2/{B}/manifests/v1#/v2/{A}/manifests/v1",
    "/v2/{A}/manifests/v1?/../../b/manifests/v1",
    "/v2/{A}/blobs/{blob_b}%23/../../../b",
]


def trick_uri(site: Site, template: str) -> str:
    return template.format(
        A=REPO_A,
        B=REPO_B,
        manifest_b=site.image_b.digest,
        blob_a=site.image_a.blob_digests[0],
        blob_b=site.image_b.blob_digests[0],
    )


def local_registry_uris(site: Site, since: int) -> list[str]:
    """Request URIs in the local registry's access log (one line per request, whatever the log level)
    after byte offset ``since``."""
    log_path = site.client.stack.processes["secondary"].log_path  # type: ignore[union-attr]
    with open(log_path, "rb") as log:
        log.seek(since)
        text = log.read().decode("utf-8", "replace")
    return re.findall(r'^\S+ - \S+ \[[^]]*\] "[A-Z]+ (\S+) HTTP/1\.[01]"', text, flags=re.MULTILINE)


def local_log_offset(site: Site) -> int:
    return site.client.stack.processes["secondary"].log_path.stat().st_size  # type: ignore[union-attr]


def received_upstream(site: Site, route: str, since_relay: int, since_local: int) -> list[str]:
    if route == "local":
        return local_registry_uris(site, since_local)
    return site.primary_relay.request_targets(since_relay)


@pytest.mark.parametrize("template", PATH_TRICKS)
def test_a_path_trick_never_reads_another_repository(site: Site, template: str) -> None:
    uri = trick_uri(site, template)
    token = signed(site.key, claims([grant(REPO_A, "pull")]))
    b_bodies = {site.image_b.digest.split(":")[1]} | {d.split(":")[1] for d in site.image_b.blob_digests}
    since_log = site.client.access_log_offset()
    since_relay, since_local = len(site.primary_relay.request_targets()), local_log_offset(site)
    answer = send(site, site.client.info.secondary_url, "GET", uri, token)
    assert hashlib.sha256(answer.body).hexdigest() not in b_bodies, f"{uri} served B's content"
    if 200 <= answer.status < 300:
        assert REPO_B not in json.dumps(answer.body.decode("utf-8", "replace")), uri
    # What NGINX logged as the request URI is what the auth service was asked about; a routed
    # request must reach the registry with exactly that URI (pinned tags aside, rewritten by design).
    (entry,) = site.client.access_log(since_log)
    if entry.route:  # routed (not refused by NGINX itself)
        received = lambda: received_upstream(site, entry.route, since_relay, since_local)  # noqa: E731
        wait_until(lambda: bool(received()), 5, f"{uri} ({entry}) to reach a registry")
        # A pinned tag is rewritten to its digest by design: the decision named that digest of A.
        expected = f"/v2/{REPO_A}/manifests/{site.image_a.digest}" if entry.reason == "tag-pinned" else entry.uri
        assert received() == [expected], f"decided on {entry.uri!r}, the {entry.route} registry got {received()}"
