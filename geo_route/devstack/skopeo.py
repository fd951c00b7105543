"""Run the real ``skopeo`` (1.9) against the loopback registries, isolated from the host's container config.

Each ``Skopeo`` has a work directory that serves as its HOME, XDG dirs, auth file and temp dir, so the
host's ``~/.docker``/``auth.json`` are never read, and its blob-info cache lives there rather than in
``/var/lib/containers/cache`` (see ``skopeo_environment``). Signature policy is off (``--insecure-policy``),
TLS verification is off per command (the registries speak plain HTTP on 127.0.0.1), and every run
has a timeout: a hung skopeo is killed by its PID and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from geo_route.devstack.processes import require_binary
from geo_route.errors import DevstackError

ROOTLESS_UID_VARIABLE = "_CONTAINERS_ROOTLESS_UID"
MESSAGE_CHARS = 500


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def as_option(self) -> str:
        return f"{self.username}:{self.password}"


class SkopeoError(DevstackError):
    """skopeo exited non-zero or timed out; ``stderr`` holds its message (never the credentials)."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def docker_reference(address: str, repository: str, reference: str) -> str:
    """``docker://127.0.0.1:PORT/repo:tag`` (or ``@sha256:…`` for a digest)."""
    separator = "@" if ":" in reference else ":"
    return f"docker://{address}/{repository}{separator}{reference}"


def creds_options(prefix: str, credentials: Credentials | None) -> list[str]:
    """``--src-creds u:p`` (or ``--src-no-creds``) and ``--src-tls-verify=false`` for a prefix."""
    if credentials is None:
        return [f"--{prefix}no-creds", f"--{prefix}tls-verify=false"]
    return [f"--{prefix}creds", credentials.as_option(), f"--{prefix}tls-verify=false"]


class Skopeo:
    """``Skopeo(workdir).copy(…)`` / ``.inspect_raw(…)``: one isolated skopeo configuration."""

    def __init__(self, workdir: Path, timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.timeout = timeout
        self.binary = require_binary("skopeo")
        for name in ("home", "config", "data", "runtime", "tmp"):
            (workdir / name).mkdir(parents=True, exist_ok=True, mode=0o700)

    def run(self, arguments: Sequence[str], timeout: float | None = None) -> str:
        """skopeo's stdout; ``SkopeoError`` on a non-zero exit or a timeout."""
        argv = [self.binary, "--insecure-policy", "--tmpdir", str(self.workdir / "tmp"), *arguments]
        command = " ".join(arguments[:1])
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
                env=skopeo_environment(self.workdir),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise SkopeoError(f"skopeo {command} timed out after {exc.timeout}s", None, stderr) from None
        if result.returncode != 0:
            message = " ".join(result.stderr.split())[-MESSAGE_CHARS:] or "(no message)"
            failure = f"skopeo {command} failed ({result.returncode}): {message}"
            raise SkopeoError(failure, result.returncode, result.stderr)
        return result.stdout

    def copy(
        self,
        source: str,
        destination: str,
        *,
        src_creds: Credentials | None = None,
        dest_creds: Credentials | None = None,
    ) -> str:
        """``skopeo copy --all --preserve-digests``; returns the manifest digest written to the destination."""
        descriptor, name = tempfile.mkstemp(prefix="digest-", dir=self.workdir / "tmp")
        os.close(descriptor)
        digest_file = Path(name)
        arguments = ["copy", "--all", "--preserve-digests", "--quiet", "--digestfile", str(digest_file)]
        arguments += options_for(source, "src-", src_creds) + options_for(destination, "dest-", dest_creds)
        try:
            self.run([*arguments, source, destination])
            return digest_file.read_text().strip()
        finally:
            digest_file.unlink(missing_ok=True)

    def inspect_raw(self, reference: str, creds: Credentials | None = None) -> bytes:
        """The manifest exactly as the registry stores it (``skopeo inspect --raw``)."""
        return self.run(["inspect", "--raw", *options_for(reference, "", creds), reference]).encode()

    def manifest_digest(self, reference: str, creds: Credentials | None = None) -> str:
        return "sha256:" + hashlib.sha256(self.inspect_raw(reference, creds)).hexdigest()

    def list_tags(self, reference: str, creds: Credentials | None = None) -> list[str]:
        """Tags of ``docker://host/repo`` (no tag in the reference)."""
        answer = json.loads(self.run(["list-tags", *options_for(reference, "", creds), reference]))
        return [str(tag) for tag in answer.get("Tags") or []]


def options_for(reference: str, prefix: str, credentials: Credentials | None) -> list[str]:
    """Credentials and TLS options apply to registry references only."""
    return creds_options(prefix, credentials) if reference.startswith("docker://") else []


def skopeo_environment(workdir: Path) -> dict[str, str]:
    """The host environment, with HOME, XDG dirs, auth file and temp dir inside ``workdir``.

    containers/image keeps its blob-info cache in ``/var/lib/containers/cache`` when the effective
    UID is 0 and in ``$XDG_DATA_HOME/containers/cache`` otherwise; it reads the effective UID from
    ``_CONTAINERS_ROOTLESS_UID`` when set, which keeps the cache (and its cross-repository mount
    hints) per work directory when the tests run as root.
    """
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "REGISTRY_AUTH"))}
    environment.update(
        HOME=str(workdir / "home"),
        XDG_CONFIG_HOME=str(workdir / "config"),
        XDG_DATA_HOME=str(workdir / "data"),
        XDG_RUNTIME_DIR=str(workdir / "runtime"),
        TMPDIR=str(workdir / "tmp"),
        REGISTRY_AUTH_FILE=str(workdir / "auth.json"),
        DOCKER_CONFIG=str(workdir / "docker"),
    )
    if os.geteuid() == 0:
        environment[ROOTLESS_UID_VARIABLE] = "65534"
    return environment
