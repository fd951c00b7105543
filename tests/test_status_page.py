"""The operator's view on a real stack: a demo run (pulls served by the primary, then locally, then
fallbacks), then NGINX's counters by operation, the updater's and the auth service's new metrics,
``geo-route status`` and the auth service's ``/status`` page rendered in headless Chromium (its DOM
and its screenshot), each checked against the access log NGINX wrote for the same requests.

``STATUS_SCREENSHOT=docs/img/status-page.png`` keeps the screenshot (the README's).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from geo_route.cli import main
from geo_route.config import load_settings
from geo_route.devstack.client import AccessLogEntry, StackClient, started_stack
from geo_route.devstack.images import OciImage, build_oci_image
from geo_route.devstack.processes import fetch, require_binary
from geo_route.index.model import BlobPresence, ManifestPresence
from geo_route.status import percent
from geo_route.web import create_app

WINDOW = (1280, 1750)
CONTENT = re.compile(r"^/v2/.+/(blobs/(?!uploads)|manifests/)")


@dataclass
class Demo:
    client: StackClient
    local: OciImage  # pushed, pulled from the primary, replicated, pulled here
    unreplicated: OciImage  # pushed; the index claims it is here, the local registry has none: fallbacks
    chromium: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    chromium = require_binary("chromium")
    root = tmp_path_factory.mktemp("status")
    with started_stack(root / "stack") as client:
        local = build_oci_image(root / "image", "v1", layer_count=3, layer_bytes=256 * 1024)
        client.push(local, "status/app", "v1")
        client.pull("status/app", "v1", root / "pull-primary")  # right after the push: the primary
        client.replicate("status/app")
        client.pull("status/app", "v1", root / "pull-local")  # every byte local
        client.pull("status/app", "v1", root / "pull-local-2")
        other = build_oci_image(root / "other", "v1", variant="other", layer_count=2, layer_bytes=64 * 1024)
        client.push(other, "status/other", "v1")
        client.wait_for_pin("status/other", "v1", other.digest)
        claims = [BlobPresence("status/other", digest, True) for digest in other.blob_digests]
        client.index.apply([*claims, ManifestPresence("status/other", other.digest, True)])
        client.pull("status/other", "v1", root / "pull-fallback")  # routed here, 404 here, served by the primary
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # what an operator runs after a restart
            reconciled = main(["reconcile", "-c", client.info.site_file, "--once", "--verify"])
        assert reconciled == 0, printed.getvalue()
        client.wait_for_quiet_log()
        yield Demo(client, local, other, chromium)


def routed_entries(client: StackClient) -> list[AccessLogEntry]:
    """The access log's registry requests that got a route (NGINX's counters count the same)."""
    return [e for e in client.access_log(0) if e.uri.startswith("/v2/") and e.route]


def expected_hit_ratio(entries: list[AccessLogEntry]) -> float:
    reads = [e for e in entries if e.method in ("GET", "HEAD") and CONTENT.match(e.uri.split("?")[0])]
    return sum(e.route in ("local", "stale") for e in reads) / len(reads)


def expected_bytes_saved(entries: list[AccessLogEntry]) -> int:
    return sum(e.bytes_sent for e in entries if e.route in ("local", "stale"))


class Cells(HTMLParser):
    """Text by element id, and the data-bytes of every cell of the routes table."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.route_bytes: list[int] = []
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self._open.append(str(found["id"]))
            self.by_id.setdefault(str(found["id"]), "")
        if found.get("data-bytes") is not None:
            self.route_bytes.append(int(str(found["data-bytes"])))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("div", "table", "p") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            self.by_id[element] += data


def chromium(demo: Demo, *arguments: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    command = [
        demo.chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium'}",
        *arguments,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def status_url(demo: Demo) -> str:
    return f"{demo.client.info.nodes[0].auth_url}/status"


def test_nginx_counts_requests_and_bytes_by_route_and_operation(demo: Demo) -> None:
    metrics = demo.client.nginx_metrics()
    entries = routed_entries(demo.client)
    blobs_here = sum(e.bytes_sent for e in entries if e.route == "local" and "/blobs/" in e.uri)
    assert metrics['geo_route_nginx_operation_sent_bytes_total{route="local",operation="blob"}'] == blobs_here > 0
    tags_here = sum(1 for e in entries if e.route == "local" and "/manifests/v1" in e.uri)
    assert metrics['geo_route_nginx_operation_requests_total{route="local",operation="manifest-by-tag"}'] == tags_here
    assert metrics['geo_route_nginx_operation_requests_total{route="primary",operation="upload-start"}'] >= 2
    fallbacks = [e for e in entries if e.route == "fallback"]
    assert fallbacks and {e.fallback_status for e in fallbacks} == {"404"}
    by_cause = {k: v for k, v in metrics.items() if k.startswith("geo_route_nginx_fallback_causes_total")}
    assert sum(by_cause.values()) == len(fallbacks) == metrics['geo_route_nginx_fallbacks_total{local_status="404"}']
    assert set(re.findall(r'cause="([^"]+)"', " ".join(by_cause))) == {"not-found"}
    for series in metrics:  # bounded labels: never a repository or a tag
        assert "status/" not in series and "v1" not in series, series


def test_the_updater_exports_its_queues_and_last_runs_and_the_lag_by_source(demo: Demo) -> None:
    answer = fetch(f"{demo.client.info.updater_url}/metrics")
    text = answer.body.decode()
    values = dict(re.findall(r"^(geo_route_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE))
    assert values["geo_route_index_up"] == "1.0"
    for gauge in ("geo_route_resolution_queue", "geo_route_verification_queue", "geo_route_quarantined"):
        assert float(values[gauge]) >= 0, gauge
    now = demo.client.index.now()
    for gauge in ("geo_route_last_reconcile_timestamp_seconds", "geo_route_last_verify_pass_timestamp_seconds"):
        assert 0 <= now - float(values[gauge]) < 600, gauge
    assert float(values['geo_route_notification_lag_seconds_count{source="local"}']) > 0
    assert float(values['geo_route_notification_lag_seconds_count{source="primary"}']) > 0


def test_the_auth_service_observes_the_age_of_each_pin_a_tag_read_finds(demo: Demo) -> None:
    text = fetch(f"{demo.client.info.nodes[0].auth_url}/metrics").body.decode()
    count = re.search(r"^geo_route_tag_pin_age_seconds_count (\S+)$", text, re.MULTILINE)
    total = re.search(r"^geo_route_tag_pin_age_seconds_sum (\S+)$", text, re.MULTILINE)
    assert count and total and float(count.group(1)) >= 2  # the two local pulls found the pin
    settings = load_settings(demo.client.info.site_file, environ={})
    assert 0 < float(total.group(1)) / float(count.group(1)) < settings.routing.max_tag_age
    bound = re.search(r"^geo_route_max_tag_age_seconds (\S+)$", text, re.MULTILINE)
    assert bound and float(bound.group(1)) == settings.routing.max_tag_age


def test_geo_route_status_prints_the_figures_the_access_log_shows(demo: Demo) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["status", "-c", demo.client.info.site_file])
    text = out.getvalue()
    assert code == 0, text
    entries = routed_entries(demo.client)
    assert f"hit ratio: {percent(expected_hit_ratio(entries))} of" in text
    assert re.search(r"^notification lag \(local\): [\d.]+ m?s \(last event", text, re.MULTILINE), text
    assert re.search(r"^last reconciliation: [\d.]+ (ms|s|min) ago, ok", text, re.MULTILINE), text
    assert re.search(r"^last verification: [\d.]+ (ms|s|min) ago", text, re.MULTILINE), text
    assert re.search(rf"^  status/app:v1 {demo.local.digest[:19]} [\d.]+ m?s fresh$", text, re.MULTILINE), text
    assert re.search(r"^  \d\d:\d\d:\d\d fallback .* local 404 +not-found", text, re.MULTILINE), text
    redis_port = demo.client.info.redis_url.rsplit(":", 1)[1].split("/")[0]
    assert re.search(rf"^redis: single, primary 127\.0\.0\.1:{redis_port} \(master,", text, re.MULTILINE), text


def test_the_status_page_in_chromium_shows_the_figures(demo: Demo, tmp_path: Path) -> None:
    dom = chromium(demo, "--dump-dom", status_url(demo), tmp_path=tmp_path).stdout
    cells = Cells()
    cells.feed(dom)
    entries = routed_entries(demo.client)
    hit_ratio = expected_hit_ratio(entries)
    assert 0 < hit_ratio < 1
    assert cells.by_id["hit-ratio"].startswith(percent(hit_ratio)), cells.by_id["hit-ratio"]
    routes = re.findall(r'<td>([a-z-]+)</td><td class="n">\d+</td>\s*<td class="n" data-bytes="(\d+)"', dom)
    saved = sum(int(sent) for route, sent in routes if route in ("local", "stale"))
    assert saved == expected_bytes_saved(entries) > 0
    assert "bytes saved" in cells.by_id["bytes-saved"]
    assert re.match(r"[\d.]+ m?s / [\d.]+ m?s", cells.by_id["notification-lag"]), cells.by_id["notification-lag"]
    assert "status/app:v1" in cells.by_id["pins"] and "fresh" in cells.by_id["pins"]
    assert "not-found" in cells.by_id["recent"] and "fallback" in cells.by_id["recent"]
    assert "not-found" in cells.by_id["fallback-causes"]
    assert re.search(r"last reconciliation\s*[\d.]+ (ms|s|min) ago", cells.by_id["updater"]), cells.by_id["updater"]
    assert re.search(r"last verification\s*[\d.]+ (ms|s|min) ago", cells.by_id["updater"]), cells.by_id["updater"]
    assert "single" in cells.by_id["redis"] and "master" in cells.by_id["redis"]
    assert demo.client.info.password not in dom and "Bearer" not in dom and "secret" not in dom.lower()


def test_the_status_page_screenshot_is_a_rendered_page(demo: Demo, tmp_path: Path) -> None:
    shot = tmp_path / "status.png"
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    chromium(demo, f"--screenshot={shot}", size, "--hide-scrollbars", status_url(demo), tmp_path=tmp_path)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        gray = image.convert("L")
        spread = ImageStat.Stat(gray).stddev[0]
        colors = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert spread > 10, f"a blank page (stddev {spread:.1f})"
    assert colors > 50, f"only {colors} colours: no text rendered"
    keep = os.environ.get("STATUS_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_the_status_page_answers_only_on_loopback(demo: Demo) -> None:
    settings = load_settings(demo.client.info.site_file, environ={})
    client = create_app(settings).test_client()
    assert client.get("/status", environ_base={"REMOTE_ADDR": "192.0.2.7"}).status_code == 404
    assert client.get("/status", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    assert client.post("/status", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 405
