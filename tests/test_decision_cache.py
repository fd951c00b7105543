"""NGINX reusing the auth service's decisions (nginx.decision_cache), with the real stack."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import build_oci_image
from geo_route.devstack.processes import descendants, wait_until


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StackClient]:
    # Refetch memory off: here the same blob is fetched again and again on purpose, which with it on
    # is a refetch, decided anew (its own cache key) and not reused while it is verified.
    overrides = {"routing": {"refetch_window": 0}}
    with started_stack(tmp_path / "stack", decision_cache=True, site_overrides=overrides) as client:
        yield client


def decisions_made(client: StackClient) -> float:
    bind = load_settings(client.info.site_file, environ={}).server.bind[0]
    with urllib.request.urlopen(f"http://{bind}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(v) for v in re.findall(r"^geo_route_decisions_total\{[^}]*\} ([\d.e+]+)$", text, re.MULTILINE))


def get(client: StackClient, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{client.info.secondary_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_a_reusable_decision_is_served_from_nginx_and_still_routed_locally(stack: StackClient, tmp_path: Path) -> None:
    image = build_oci_image(tmp_path / "image", "v1")
    stack.push(image, "group/app", "v1")
    stack.replicate("group/app")
    token = stack.token("repository:group/app:pull")
    blob = f"/v2/group/app/blobs/{image.layers[0].digest}"
    assert get(stack, blob, token) == 200
    before = decisions_made(stack)
    since = stack.access_log_offset()
    for _ in range(5):
        assert get(stack, blob, token) == 200
    assert decisions_made(stack) == before, "the decision came from NGINX's cache"
    wait_until(lambda: len([e for e in stack.access_log(since) if e.uri == blob]) == 5, 5, "access log")
    assert {(e.route, e.reason) for e in stack.access_log(since) if e.uri == blob} == {("local", "blob-local")}


def test_denials_and_tags_are_not_reused(stack: StackClient, tmp_path: Path) -> None:
    image = build_oci_image(tmp_path / "image", "v1")
    stack.push(image, "group/app", "v1")
    stack.replicate("group/app")
    token = stack.token("repository:group/app:pull")
    before = decisions_made(stack)
    for _ in range(3):
        assert get(stack, "/v2/group/app/blobs/" + image.layers[0].digest, None) == 401
        assert get(stack, "/v2/group/app/manifests/v1", token) in (200, 404)  # 404: OCI type not accepted
    assert decisions_made(stack) == before + 6


def test_another_token_gets_its_own_decision(stack: StackClient, tmp_path: Path) -> None:
    image = build_oci_image(tmp_path / "image", "v1")
    stack.push(image, "group/app", "v1")
    stack.replicate("group/app")
    blob = "/v2/group/app/blobs/" + image.layers[0].digest
    first = stack.token("repository:group/app:pull")
    assert get(stack, blob, first) == 200
    before = decisions_made(stack)
    assert get(stack, blob, stack.token("repository:group/app:pull")) == 200
    assert decisions_made(stack) == before + 1


def test_a_client_gone_while_its_decision_is_pending_is_logged_as_valid_json(stack: StackClient) -> None:
    """NGINX logs a request it never answered with status "000": here a client that closed while the
    auth subrequest waited on the (cacheable, so not aborted) decision. The log format maps it to 0,
    so the line stays JSON (a bare 000 is not a JSON number) for every reader and log shipper."""
    assert stack.stack is not None
    workers = descendants(stack.stack.processes["auth"].pid)
    uri = "/v2/group/app/blobs/sha256:" + "0" * 64
    token = stack.token("repository:group/app:pull")
    host, port = stack.info.secondary_url.removeprefix("http://").rsplit(":", 1)
    since = stack.access_log_offset()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(f"GET {uri} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            time.sleep(0.3)  # NGINX has sent the subrequest to the stopped auth service
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: stack.access_log_offset() > since, 10, "NGINX to log the abandoned request")
    with open(stack.info.nginx_access_log, "rb") as stream:
        stream.seek(since)
        lines = [line for line in stream.read().decode().splitlines() if uri in line]
    assert len(lines) == 1, lines
    assert json.loads(lines[0])["status"] == 0, lines[0]
    [entry] = [e for e in stack.access_log(since) if e.uri == uri]
    assert (entry.status, entry.bytes_sent, entry.route) == (0, 0, "")
