"""``podman`` and ``buildah`` with private storage and configuration, against plain-HTTP loopback registries.

Each ``Podman``/``Buildah`` has a directory of its own holding its image store (``--root``,
``--runroot``, the ``vfs`` driver: no mounts, no fuse), its ``storage.conf``, ``registries.conf``
(no search registries: references are always fully qualified), ``policy.json`` (accept anything:
the test images are unsigned; passed with ``--signature-policy``), ``containers.conf`` (cgroupfs,
no events, temporary files inside) and the auth file ``login`` writes (``REGISTRY_AUTH_FILE``). The
host's ``/etc/containers`` files and ``/var/lib/containers`` are never used. Every registry command
gets ``--tls-verify=false``: the site's URL is plain HTTP on 127.0.0.1. Passwords go to ``login`` on
standard input. As root, containers/image would keep its blob-info cache (where it has seen each
blob: cross-repository mount hints) in ``/var/lib/containers/cache``; ``_CONTAINERS_ROOTLESS_UID``
moves it under ``XDG_DATA_HOME`` as for skopeo (storage stays rootful: it asks the effective UID).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from geo_route.devstack.containers import CLIENT_TIMEOUT, private_environment, run_client
from geo_route.devstack.processes import require_binary
from geo_route.devstack.skopeo import ROOTLESS_UID_VARIABLE, Credentials
from geo_route.errors import DevstackError

STORAGE_DRIVER = "vfs"
RUNROOT_LIMIT = 50  # podman refuses a longer --runroot (its lock and socket paths)
ACCEPT_ANYTHING_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class LibpodClient:
    """What podman and buildah share: the private store and configuration, login, push and pull."""

    program = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        if len(str(self.runroot)) > RUNROOT_LIMIT:
            raise DevstackError(f"{self.runroot} is longer than {RUNROOT_LIMIT} characters: use a shorter directory")
        self.binary = require_binary(self.program)
        self.environment = private_environment(self.directory)
        self.write_configuration()

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def runroot(self) -> Path:
        return self.directory / "runroot"

    @property
    def policy(self) -> Path:
        return self.directory / "policy.json"

    def write_configuration(self) -> None:
        storage = self.directory / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "{STORAGE_DRIVER}"\ngraphroot = "{self.root}"\nrunroot = "{self.runroot}"\n',
            encoding="utf-8",
        )
        registries = self.directory / "registries.conf"
        registries.write_text("unqualified-search-registries = []\n", encoding="utf-8")
        self.policy.write_text(json.dumps(ACCEPT_ANYTHING_POLICY) + "\n", encoding="utf-8")
        auth_file = self.directory / "auth.json"  # podman refuses a REGISTRY_AUTH_FILE that does not exist
        auth_file.write_text('{"auths": {}}\n', encoding="utf-8")
        auth_file.chmod(0o600)
        containers = self.directory / "containers.conf"
        containers.write_text(
            f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\ntmp_dir = "{self.directory / "tmp"}"\n',
            encoding="utf-8",
        )
        self.environment.update(
            CONTAINERS_STORAGE_CONF=str(storage),
            CONTAINERS_REGISTRIES_CONF=str(registries),
            CONTAINERS_CONF=str(containers),
            REGISTRY_AUTH_FILE=str(auth_file),
        )
        if os.geteuid() == 0:  # the blob-info cache under XDG_DATA_HOME, not /var/lib/containers/cache
            self.environment[ROOTLESS_UID_VARIABLE] = "65534"

    def add_registries_conf(self, text: str) -> None:
        """Append ``text`` (registries.conf v2 tables, e.g. what ``geo-route client-config --for
        podman`` writes) to this client's ``registries.conf``."""
        path = Path(self.environment["CONTAINERS_REGISTRIES_CONF"])
        path.write_text(path.read_text(encoding="utf-8") + "\n" + text, encoding="utf-8")

    def global_options(self) -> list[str]:
        return ["--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", STORAGE_DRIVER]

    def run(self, arguments: Sequence[str], *, stdin: str | None = None, timeout: float = CLIENT_TIMEOUT) -> str:
        argv = [self.binary, *self.global_options(), *arguments]
        what = f"{self.program} {' '.join(arguments[:1])}"
        return run_client(argv, self.environment, stdin=stdin, timeout=timeout, what=what)

    def login(self, registry: str, credentials: Credentials) -> None:
        """``login --tls-verify=false --password-stdin``: credentials checked at ``registry``, then kept
        in this client's auth file for the pushes and pulls that follow."""
        arguments = ["login", "--tls-verify=false", "--username", credentials.username, "--password-stdin", registry]
        self.run(arguments, stdin=credentials.password)

    def push(self, source: str, destination: str) -> str:
        """Push the local image ``source`` to ``destination`` (``HOST:PORT/repo:tag``); the manifest digest written."""
        digest_file = self.directory / "tmp" / "pushed.digest"
        digest_file.unlink(missing_ok=True)
        self.run(
            [
                "push",
                "--tls-verify=false",
                "--signature-policy",
                str(self.policy),
                "--digestfile",
                str(digest_file),
                source,
                f"docker://{destination}",
            ]
        )
        return digest_file.read_text(encoding="utf-8").strip()

    def pull(self, reference: str) -> str:
        """Pull ``HOST:PORT/repo:tag``; the manifest digest of the image now stored under that name."""
        self.run(["pull", "--tls-verify=false", "--signature-policy", str(self.policy), f"docker://{reference}"])
        return self.image_digest(reference)

    def load(self, source: str) -> str:
        """Copy an image from a local transport (``oci:DIR:TAG``, ``docker-archive:FILE``) into the
        store; its image id."""
        return self.run(["pull", "--quiet", "--signature-policy", str(self.policy), source]).strip().splitlines()[-1]

    def remove_all_images(self) -> None:
        """``rmi --all --force``: the next pull fetches every blob again."""
        self.run(["rmi", "--all", "--force"])

    def image_digest(self, reference: str) -> str:
        raise NotImplementedError


class Podman(LibpodClient):
    program = "podman"

    def global_options(self) -> list[str]:
        return [*super().global_options(), "--tmpdir", str(self.directory / "tmp"), "--events-backend", "none"]

    def image_digest(self, reference: str) -> str:
        return self.run(["image", "inspect", "--format", "{{.Digest}}", reference]).strip()

    def tag(self, source: str, target: str) -> None:
        self.run(["tag", source, target])


class Buildah(LibpodClient):
    program = "buildah"

    def image_digest(self, reference: str) -> str:
        return self.run(["inspect", "--type", "image", "--format", "{{.FromImageDigest}}", reference]).strip()
