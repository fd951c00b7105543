"""Images for ``docker/compose.yaml`` on a machine that reaches Debian's archive and PyPI but no image
registry (``script/compose-check``): a Debian base image made with ``debootstrap`` from the mirror apt
uses here, the stand-ins of ``docker/stand-ins/`` built FROM it and tagged with the names the compose
file pulls (``python:3.11-slim-bookworm``, ``redis:7-bookworm``, ``registry:2.8.3``), then every image
the compose file builds, from its own unchanged Dockerfiles, tagged with the names compose gives them.

Builds run with ``--network host`` (a dockerd started with ``--bridge=none`` has no default build
network) on the classic builder (BuildKit builds RUN steps through that missing network).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geo_route.devstack.containers import DockerDaemon
from geo_route.devstack.processes import require_binary
from geo_route.errors import DevstackError

SUITE = "bookworm"  # what the official images the compose file names are built on
BASE_IMAGE = "debian:bookworm-slim"
STAND_INS = {
    "python.Dockerfile": "python:3.11-slim-bookworm",
    "redis.Dockerfile": "redis:7-bookworm",
    "registry.Dockerfile": "registry:2.8.3",
}
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
HOST_CA_CERTIFICATES = Path("/usr/local/share/ca-certificates")
DEBOOTSTRAP_TIMEOUT = 600.0
BUILD_TIMEOUT = 1200.0


@dataclass(frozen=True)
class DebianMirrors:
    """Where apt on this machine gets Debian (``archive``) and its security updates (``security``)."""

    archive: str
    security: str = ""

    def sources_list(self, suite: str = SUITE) -> str:
        lines = [f"deb {self.archive} {suite} main", f"deb {self.archive} {suite}-updates main"]
        if self.security:
            lines.append(f"deb {self.security} {suite}-security main")
        return "\n".join(lines) + "\n"


def apt_entries(text: str) -> Iterable[tuple[str, list[str]]]:
    """(URI, suites) of every ``deb`` entry of a one-line ``sources.list`` or a deb822 ``.sources`` text."""
    if re.search(r"^URIs:", text, flags=re.MULTILINE | re.IGNORECASE):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(
                (key.lower(), value.strip())
                for key, value in re.findall(r"^([A-Za-z-]+):(.*)$", stanza, flags=re.MULTILINE)
            )
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()
        return
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]]


def find_debian_mirrors(texts: Iterable[str], suite: str = SUITE) -> DebianMirrors:
    """The first archive serving ``suite`` (any suite of Debian's when none names it) and the first
    serving ``suite-security``; ``DevstackError`` when no apt source is Debian's."""
    entries = [entry for text in texts for entry in apt_entries(text)]
    security = next((uri for uri, suites in entries if f"{suite}-security" in suites), "")
    archive = next((uri for uri, suites in entries if suite in suites), "")
    archive = archive or next((uri for uri, suites in entries if "debian" in uri and "security" not in uri), "")
    if not archive:
        raise DevstackError(f"no Debian archive among apt's sources ({', '.join(map(str, APT_SOURCES))})")
    return DebianMirrors(archive.rstrip("/"), security.rstrip("/"))


def read_apt_sources() -> list[str]:
    files: list[Path] = []
    for source in APT_SOURCES:
        files.extend(sorted(source.glob("*.list")) + sorted(source.glob("*.sources")) if source.is_dir() else [source])
    return [path.read_text(encoding="utf-8", errors="replace") for path in files if path.is_file()]


def build_debian_base(docker: DockerDaemon, directory: Path, mirrors: DebianMirrors) -> str:
    """``debootstrap --variant=minbase`` into ``directory/rootfs``, imported as ``debian:bookworm-slim``
    (apt sources: the same mirrors); the root file system is removed again. Returns the image id."""
    rootfs = directory / "rootfs"
    debootstrap = require_binary("debootstrap", "debootstrap")
    run([debootstrap, "--variant=minbase", SUITE, str(rootfs), mirrors.archive], DEBOOTSTRAP_TIMEOUT, "debootstrap")
    try:
        (rootfs / "etc/apt/sources.list").write_text(mirrors.sources_list(), encoding="utf-8")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imported = subprocess.run(
            [docker.cli(), "import", "-", BASE_IMAGE],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            env=docker.environment(),
            check=False,
            timeout=BUILD_TIMEOUT,
        )
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise DevstackError(f"docker import of the debootstrap root failed: {imported.stderr.strip()[-600:]}")
        return imported.stdout.strip()
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def build_stand_ins(docker: DockerDaemon, stand_ins: Path, directory: Path) -> list[str]:
    """The images of ``docker/stand-ins/``, tagged as the images the compose file names; their build
    context holds this machine's extra CA certificates (pip inside a build trusts what the host does)."""
    context = directory / "stand-in-context"
    certificates = context / "ca-certificates"
    certificates.mkdir(parents=True, exist_ok=True)
    for certificate in sorted(HOST_CA_CERTIFICATES.glob("*.crt")) if HOST_CA_CERTIFICATES.is_dir() else []:
        shutil.copy(certificate, certificates / certificate.name)
    for dockerfile, tag in STAND_INS.items():
        build_image(docker, stand_ins / dockerfile, context, tag)
    return list(STAND_INS.values())


@dataclass(frozen=True)
class ComposeBuild:
    """One Dockerfile the compose file builds, and the image name of every service built from it."""

    context: str
    dockerfile: str
    images: tuple[str, ...]


def compose_builds(config: Mapping[str, Any]) -> list[ComposeBuild]:
    """What ``docker compose config --format json`` says is built: one build per context and Dockerfile;
    a service without ``image`` gets compose's name for it, ``<project>-<service>``."""
    builds: dict[tuple[str, str], list[str]] = {}
    for name, service in sorted(config["services"].items()):
        build = service.get("build")
        if build:
            key = (build["context"], build.get("dockerfile", "Dockerfile"))
            builds.setdefault(key, []).append(service.get("image") or f"{config['name']}-{name}")
    return [ComposeBuild(context, dockerfile, tuple(images)) for (context, dockerfile), images in builds.items()]


def build_compose_images(docker: DockerDaemon, builds: Iterable[ComposeBuild]) -> list[str]:
    """Every build once, tagged with all its services' image names (``up --no-build`` then uses them)."""
    built: list[str] = []
    for build in builds:
        first, *others = build.images
        build_image(docker, Path(build.context) / build.dockerfile, Path(build.context), first)
        for other in others:
            docker.docker(["tag", first, other])
        built.extend(build.images)
    return built


def build_image(docker: DockerDaemon, dockerfile: Path, context: Path, tag: str) -> None:
    environment = {**docker.environment(), "DOCKER_BUILDKIT": "0"}
    argv = [docker.cli(), "build", "--quiet", "--network", "host", "-f", str(dockerfile), "-t", tag, str(context)]
    run(argv, BUILD_TIMEOUT, f"docker build {tag}", environment)


def run(argv: list[str], timeout: float, what: str, env: Mapping[str, str] | None = None) -> str:
    """Run a build step; ``DevstackError`` with the end of its output when it fails."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=dict(env) if env else None
        )
    except subprocess.TimeoutExpired:
        raise DevstackError(f"{what} did not finish within {timeout:.0f}s") from None
    if result.returncode != 0:
        raise DevstackError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout)[-1500:]}")
    return result.stdout
