"""The development stack's parts: pure pieces in-process, then the real token service, two real
docker-registry 2.8 processes sharing one signing key, and the real skopeo pushing, pulling and
replicating a real multi-layer OCI image. Every process is stopped by PID, even when a test fails."""

from __future__ import annotations

import ast
import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from werkzeug.test import Client

from geo_route.access import Access
from geo_route.config import TokenSettings
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.keys import SigningKeyFiles, generate_signing_key, load_private_key
from geo_route.devstack.processes import (
    free_port,
    require_binary,
    start_process,
    stop_pid,
    wait_until,
)
from geo_route.devstack.registry import (
    NotificationEndpoint,
    RegistryProcess,
    TokenAuth,
    render_registry_config,
    start_registry,
)
from geo_route.devstack.replicate import replicate_image
from geo_route.devstack.skopeo import Credentials, Skopeo, SkopeoError, docker_reference
from geo_route.devstack.token_config import TokenServiceConfig, TokenUser, read_config, require_loopback
from geo_route.devstack.token_scopes import Scope, grant_access, parse_scope, parse_scopes
from geo_route.devstack.token_service import TokenService, TokenServiceProcess, start_token_service
from geo_route.errors import DevstackError
from geo_route.tokens import TokenVerifier

ISSUER = "devstack-issuer"
SERVICE = "container_registry"
ALICE = Credentials("alice", "alice-secret")  # every repository, every action
BOB = Credentials("bob", "bob-secret")  # group/app only
GEO = Credentials("geo", "geo-secret")  # the replication user
USERS = {
    ALICE.username: TokenUser(ALICE.password, {"*": ["pull", "push", "delete"], "registry:catalog": ["*"]}),
    BOB.username: TokenUser(BOB.password, {"group/app": ["pull", "push"]}),
    GEO.username: TokenUser(GEO.password, {"*": ["pull", "push"]}),
}
PACKAGE = Path(__file__).resolve().parent.parent / "geo_route"


# --- pure parts: scopes and grants ----------------------------------------------------------------


def test_a_scope_splits_type_on_the_left_and_actions_on_the_right() -> None:
    assert parse_scope("repository:group/app:pull,push") == Scope("repository", "group/app", ("pull", "push"))
    assert parse_scope("repository:127.0.0.1:5000/group/app:pull") == Scope(
        "repository", "127.0.0.1:5000/group/app", ("pull",)
    )
    assert parse_scope("registry:catalog:*") == Scope("registry", "catalog", ("*",))
    assert parse_scope("repository(plugin):x:pull").type == "repository(plugin)"
    assert parse_scope("repository:group/app:") == Scope("repository", "group/app", ())


@pytest.mark.parametrize("text", ["repository", "repository:group/app", ":group/app:pull", "repository::pull"])
def test_a_malformed_scope_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="type:name:actions"):
        parse_scope(text)


def test_scopes_repeat_and_each_may_hold_several() -> None:
    scopes = parse_scopes(["repository:a/b:pull repository:c/d:pull,push", "registry:catalog:*"])
    assert [(s.type, s.name, s.actions) for s in scopes] == [
        ("repository", "a/b", ("pull",)),
        ("repository", "c/d", ("pull", "push")),
        ("registry", "catalog", ("*",)),
    ]


@pytest.mark.parametrize(
    ("rules", "asked", "granted"),
    [
        ({"group/app": ["pull"]}, "repository:group/app:pull,push", [("group/app", ["pull"])]),
        ({"group/app": ["pull", "push"]}, "repository:group/app:push,pull", [("group/app", ["push", "pull"])]),
        ({"group/*": ["pull"]}, "repository:group/app/sub:pull", [("group/app/sub", ["pull"])]),
        ({"group/*": ["pull"]}, "repository:other/app:pull", []),
        ({"*": ["*"]}, "repository:x/y:pull,push,delete", [("x/y", ["pull", "push", "delete"])]),
        ({"x/y": ["pull"]}, "repository:x/y:*", []),
        ({"x/y": ["*"]}, "repository:x/y:*", [("x/y", ["*"])]),
        ({"x/y": ["pull"], "x/*": ["push"]}, "repository:x/y:pull,push", [("x/y", ["pull", "push"])]),
        ({"x/y": ["pull"]}, "repository:x/y:pull repository:x/y:pull,push", [("x/y", ["pull"])]),
        ({"*": ["pull"]}, "registry:catalog:*", []),
        ({"registry:catalog": ["*"]}, "registry:catalog:*", [("catalog", ["*"])]),
    ],
)
def test_the_grant_is_the_intersection_of_asked_and_allowed(
    rules: dict[str, list[str]], asked: str, granted: list[tuple[str, list[str]]]
) -> None:
    access = grant_access(parse_scopes([asked]), rules)
    assert [(entry["name"], entry["actions"]) for entry in access] == granted


# --- the token service as a WSGI app --------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyFiles:
    return generate_signing_key(tmp_path_factory.mktemp("signing-key"))


@pytest.fixture(scope="module")
def token_client(signing_key: SigningKeyFiles) -> Client:
    users = {name: (user.password, user.access) for name, user in USERS.items()}
    return Client(TokenService(ISSUER, SERVICE, load_private_key(signing_key.private_key), users))


@pytest.fixture(scope="module")
def verifier(signing_key: SigningKeyFiles) -> TokenVerifier:
    settings = TokenSettings(
        realm="http://127.0.0.1/jwt/auth", service=SERVICE, issuer=ISSUER, rootcertbundle=str(signing_key.certificate)
    )
    return TokenVerifier.from_settings(settings)


def basic(credentials: Credentials) -> dict[str, str]:
    encoded = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def ask(client: Client, *scopes: str, headers: dict[str, str] | None = None, service: str = SERVICE) -> Any:
    query = [("service", service), ("account", "ignored"), *(("scope", scope) for scope in scopes)]
    return client.get("/jwt/auth", query_string=query, headers=headers or {})


def test_an_issued_token_verifies_like_the_registry_verifies_it(
    token_client: Client, verifier: TokenVerifier, signing_key: SigningKeyFiles
) -> None:
    response = ask(token_client, "repository:group/app:pull,push", headers=basic(ALICE))
    assert response.status_code == 200
    body = response.get_json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert time.strptime(body["issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    header = jwt.get_unverified_header(body["token"])
    assert header == {"alg": "RS256", "kid": signing_key.kid, "typ": "JWT"}
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["iss"] == ISSUER and claims["aud"] == SERVICE and claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 300 and claims["iat"] - claims["nbf"] == 5
    assert abs(claims["iat"] - time.time()) < 10 and claims["jti"]
    grants = verifier.verify(body["token"])
    assert grants.subject == "alice"
    assert grants.allows(Access("repository", "group/app", "push"))
    assert not grants.allows(Access("repository", "group/app", "delete"))  # allowed, but not asked for


def test_a_restricted_user_gets_only_its_repository(token_client: Client, verifier: TokenVerifier) -> None:
    response = ask(token_client, "repository:group/app:pull,push,delete repository:other/repo:pull", headers=basic(BOB))
    assert response.status_code == 200
    token = response.get_json()["token"]
    assert jwt.decode(token, options={"verify_signature": False})["access"] == [
        {"type": "repository", "name": "group/app", "actions": ["pull", "push"]}
    ]
    grants = verifier.verify(token)
    assert not grants.allows(Access("repository", "other/repo", "pull"))


def test_scopes_may_repeat_in_the_query(token_client: Client) -> None:
    response = ask(token_client, "repository:a/b:pull", "repository:c/d:push", headers=basic(ALICE))
    access = jwt.decode(response.get_json()["token"], options={"verify_signature": False})["access"]
    assert [(a["name"], a["actions"]) for a in access] == [("a/b", ["pull"]), ("c/d", ["push"])]


@pytest.mark.parametrize(
    "authorization",
    [
        basic(Credentials("alice", "wrong"))["Authorization"],
        basic(Credentials("mallory", "alice-secret"))["Authorization"],
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Bearer some.jwt.token",
    ],
)
def test_bad_credentials_are_401_with_a_basic_challenge(token_client: Client, authorization: str) -> None:
    response = ask(token_client, "repository:group/app:pull", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="')
    assert "token" not in response.get_json()


def test_no_credentials_get_an_anonymous_token_without_access(token_client: Client, verifier: TokenVerifier) -> None:
    response = ask(token_client, "repository:group/app:pull")
    assert response.status_code == 200
    grants = verifier.verify(response.get_json()["token"])
    assert grants.subject == "" and dict(grants.actions) == {}


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("/jwt/auth", "service=other&scope=repository:a:pull", 400),
        ("/jwt/auth", "scope=repository:a:pull", 400),
        ("/jwt/auth", f"service={SERVICE}&scope=repository", 400),
        ("/elsewhere", "", 404),
        ("/healthz", "", 200),
    ],
)
def test_requests_the_service_refuses_or_answers(token_client: Client, path: str, query: str, status: int) -> None:
    assert token_client.get(path, query_string=query, headers=basic(ALICE)).status_code == status


def test_only_get_is_served(token_client: Client) -> None:
    assert token_client.post("/jwt/auth", headers=basic(ALICE)).status_code == 405


def test_the_config_is_loopback_only_and_round_trips(tmp_path: Path, signing_key: SigningKeyFiles) -> None:
    for bind in ("127.0.0.1:1", "localhost:1", "[::1]:1", "127.0.0.2:1"):
        require_loopback(bind)
    for bind in ("0.0.0.0:1", "10.0.0.5:1", "example.com:1", "127.0.0.1"):
        with pytest.raises(DevstackError):
            require_loopback(bind)
    config = TokenServiceConfig(ISSUER, SERVICE, str(signing_key.private_key), "127.0.0.1:1", USERS)
    path = config.write(tmp_path / "token.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_config(path) == config


# --- images and registry config ---------------------------------------------------------------------


def test_images_are_deterministic_and_a_variant_moves_the_digest(tmp_path: Path) -> None:
    first = build_oci_image(tmp_path / "a", "v1", layer_count=3)
    again = build_oci_image(tmp_path / "b", "v1", layer_count=3)
    moved = build_oci_image(tmp_path / "a", "v1", variant="moved", layer_count=3)
    assert first.digest == again.digest
    assert moved.digest != first.digest
    assert moved.layers[0] == first.layers[0] and moved.layers[1] != first.layers[1]
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [entry["digest"] for entry in index["manifests"]] == [moved.digest]  # the tag was re-pointed


def test_an_image_is_a_valid_oci_layout(tmp_path: Path) -> None:
    image = build_oci_image(tmp_path / "layout", "v1", layer_count=2, layer_bytes=1000)

    def blob(digest: str) -> bytes:
        data = (tmp_path / "layout" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        return data

    manifest = json.loads(blob(image.digest))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        tar = gzip.decompress(blob(layer["digest"]))
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            assert len(archive.getnames()) == 2
    assert image.reference == f"oci:{tmp_path / 'layout'}:v1"


def test_the_registry_config_has_token_auth_and_filtered_notifications(tmp_path: Path) -> None:
    auth = TokenAuth("http://127.0.0.1:1/jwt/auth", SERVICE, ISSUER, tmp_path / "bundle.crt")
    endpoint = NotificationEndpoint("index", "http://127.0.0.1:2/events", authorization="Bearer s3cret")
    config = render_registry_config(tmp_path, 5000, auth, [endpoint])
    assert config["http"]["addr"] == "127.0.0.1:5000"
    assert config["auth"]["token"]["rootcertbundle"] == str(tmp_path / "bundle.crt")
    [entry] = config["notifications"]["endpoints"]
    assert entry["headers"] == {"Authorization": ["Bearer s3cret"]}
    assert entry["ignore"] == {"mediatypes": ["application/x-none"], "actions": ["pull"]}
    assert render_registry_config(tmp_path, 5000, auth)["http"]["secret"] != config["http"]["secret"]
    assert "notifications" not in render_registry_config(tmp_path, 5000, auth)


# --- processes ------------------------------------------------------------------------------------


def test_a_missing_binary_names_its_apt_package() -> None:
    with pytest.raises(DevstackError, match="apt-get install docker-registry"):
        require_binary("no-such-binary-geo-route", package="docker-registry")


def test_waiting_stops_early_when_the_process_dies(tmp_path: Path) -> None:
    process = start_process(["sh", "-c", "echo boom; exit 3"], tmp_path, "dies")
    try:
        started = time.monotonic()
        with pytest.raises(DevstackError, match=r"(?s)status 3.*boom"):
            wait_until(lambda: False, 30, "never", process=process)
        assert time.monotonic() - started < 10
    finally:
        process.stop()


def test_stop_pid_escalates_to_sigkill(tmp_path: Path) -> None:
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    process = start_process([sys.executable, "-c", script], tmp_path, "stubborn")
    try:
        wait_until(lambda: "ready" in process.read_log_tail(), 10, "stubborn process", process=process)
        assert stop_pid(process.pid, timeout=0.5)
        assert process.popen.poll() is not None
    finally:
        process.stop()
    with pytest.raises(ValueError):
        stop_pid(0)


def test_nothing_outside_the_devstack_imports_it() -> None:
    """Only the devstack itself and the CLI's `devstack`/`demo` commands (lazily) use it."""
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "devstack" or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("geo_route.devstack"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("geo_route.devstack") for a in node.names), path


# --- the real stack -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    tokens: TokenServiceProcess
    primary: RegistryProcess
    secondary: RegistryProcess
    auth: TokenAuth
    skopeo: Skopeo
    base: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKeyFiles) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("devstack")
    config = TokenServiceConfig(ISSUER, SERVICE, str(signing_key.private_key), f"127.0.0.1:{free_port()}", USERS)
    with contextlib.ExitStack() as cleanup:
        tokens = start_token_service(config, base / "token")
        cleanup.callback(tokens.stop)
        auth = TokenAuth(tokens.realm, SERVICE, ISSUER, signing_key.certificate)
        primary = start_registry(base / "primary", auth, name="primary")
        cleanup.callback(primary.stop)
        secondary = start_registry(base / "secondary", auth, name="secondary")
        cleanup.callback(secondary.stop)
        yield Stack(tokens, primary, secondary, auth, Skopeo(base / "skopeo", timeout=30), base)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OciImage]:
    layout = tmp_path_factory.mktemp("images") / "layout"
    return {
        "v1": build_oci_image(layout, "v1", layer_count=3),
        "v2": build_oci_image(layout, "v2", variant="two", layer_count=3),
    }


@pytest.fixture(scope="module")
def pushed(stack: Stack, images: dict[str, OciImage]) -> dict[str, str]:
    """group/app:v1 and :v2 on the primary, pushed by bob (whose rules allow exactly group/app)."""
    return {
        tag: stack.skopeo.copy(
            image.reference, docker_reference(stack.primary.address, "group/app", tag), dest_creds=BOB
        )
        for tag, image in images.items()
    }


def test_a_push_keeps_the_digest_and_pulls_back_identical(
    stack: Stack, images: dict[str, OciImage], pushed: dict[str, str]
) -> None:
    assert pushed == {tag: image.digest for tag, image in images.items()}
    reference = docker_reference(stack.primary.address, "group/app", "v1")
    assert stack.skopeo.manifest_digest(reference, BOB) == images["v1"].digest
    out = stack.base / "pulled"
    stack.skopeo.copy(reference, f"oci:{out}:v1", src_creds=ALICE)
    [entry] = json.loads((out / "index.json").read_text())["manifests"]
    assert entry["digest"] == images["v1"].digest
    for digest in images["v1"].blob_digests:
        assert (out / "blobs" / "sha256" / digest.split(":")[1]).exists()


def test_replication_copies_every_tag_with_the_same_digests(stack: Stack, pushed: dict[str, str]) -> None:
    missing = docker_reference(stack.secondary.address, "group/app", "v1")
    with pytest.raises(SkopeoError):
        stack.skopeo.inspect_raw(missing, GEO)
    replicated = replicate_image(
        stack.skopeo,
        stack.primary.address,
        stack.secondary.address,
        "group/app",
        source_creds=GEO,
        destination_creds=GEO,
    )
    assert {r.tag: r.digest for r in replicated} == pushed
    for tag, digest in pushed.items():
        assert stack.skopeo.manifest_digest(docker_reference(stack.secondary.address, "group/app", tag), BOB) == digest


def test_a_wrong_password_fails_cleanly(stack: Stack, pushed: dict[str, str]) -> None:
    started = time.monotonic()
    with pytest.raises(SkopeoError) as failure:
        stack.skopeo.inspect_raw(
            docker_reference(stack.primary.address, "group/app", "v1"), Credentials("alice", "wrong")
        )
    assert failure.value.returncode not in (0, None)
    assert "invalid username/password" in failure.value.stderr
    assert "wrong" not in str(failure.value)
    assert time.monotonic() - started < 15


def test_anonymous_pulls_are_refused_by_the_registry(stack: Stack, pushed: dict[str, str]) -> None:
    with pytest.raises(SkopeoError) as failure:
        stack.skopeo.inspect_raw(docker_reference(stack.primary.address, "group/app", "v1"), None)
    assert failure.value.returncode not in (0, None)
    assert "unauthorized" in failure.value.stderr.lower() or "authentication required" in failure.value.stderr


def test_a_user_limited_to_group_app_cannot_read_or_write_other_repositories(
    stack: Stack, images: dict[str, OciImage], pushed: dict[str, str]
) -> None:
    other = docker_reference(stack.primary.address, "other/repo", "v1")
    assert stack.skopeo.copy(images["v1"].reference, other, dest_creds=ALICE) == images["v1"].digest
    with pytest.raises(SkopeoError) as read:
        stack.skopeo.inspect_raw(other, BOB)
    assert read.value.returncode not in (0, None)
    with pytest.raises(SkopeoError):
        stack.skopeo.copy(
            images["v2"].reference, docker_reference(stack.primary.address, "other/repo", "v2"), dest_creds=BOB
        )
    assert stack.skopeo.manifest_digest(docker_reference(stack.primary.address, "group/app", "v1"), BOB)


class Recorder(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers.get("Authorization", ""), json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_registry_with_a_notification_endpoint_delivers_push_events_and_no_pulls(
    stack: Stack, images: dict[str, OciImage]
) -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (Recorder,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = NotificationEndpoint("capture", f"http://127.0.0.1:{server.server_port}/events", "Bearer s3cret")
    try:
        with contextlib.ExitStack() as cleanup:
            registry = start_registry(stack.base / "notifying", stack.auth, name="notifying", notifications=[endpoint])
            cleanup.callback(registry.stop)
            stack.skopeo.copy(
                images["v1"].reference, docker_reference(registry.address, "n/app", "v1"), dest_creds=ALICE
            )
            stack.skopeo.inspect_raw(docker_reference(registry.address, "n/app", "v1"), ALICE)  # pull events: ignored
            stack.skopeo.copy(
                images["v2"].reference, docker_reference(registry.address, "n/app", "v2"), dest_creds=ALICE
            )

            def manifest_pushes() -> list[dict[str, Any]]:
                events = [event for _, envelope in list(received) for event in envelope["events"]]
                return [e for e in events if e["action"] == "push" and e["target"].get("tag")]

            wait_until(lambda: len(manifest_pushes()) == 2, 10, "two manifest push events")
            assert {e["target"]["tag"]: e["target"]["digest"] for e in manifest_pushes()} == {
                "v1": images["v1"].digest,
                "v2": images["v2"].digest,
            }
            assert {authorization for authorization, _ in received} == {"Bearer s3cret"}
            assert not [e for _, env in received for e in env["events"] if e["action"] == "pull"]
    finally:
        server.shutdown()
        server.server_close()
