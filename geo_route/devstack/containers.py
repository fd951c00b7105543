"""A private containerd and dockerd, and the ``ctr`` and ``docker`` clients that talk to them.

Everything lives under the directory the caller gives: configuration, root, state, sockets, data,
logs and the client's ``DOCKER_CONFIG`` (its credentials). Both daemons are started here and stopped
by their own PIDs (dockerd first). dockerd runs with ``--iptables=false --ip6tables=false
--ip-forward=false --ip-masq=false --bridge=none``: the host's firewall, interfaces and sysctls stay
as they were (without these flags dockerd rewrites iptables and adds ``docker0``); it reads no
``/etc/docker/daemon.json`` (a private ``--config-file``). Images live in the ``vfs`` driver (no
mounts) and ``ctr`` unpacks with the ``native`` snapshotter, so stopping leaves nothing mounted.

The ``docker`` CLI is Debian's (``/usr/bin/docker`` from ``docker.io``, the daemon's own version)
when present, else the first on ``PATH``, which negotiates the daemon's API version down. Registries
on 127.0.0.0/8 are plain HTTP ("insecure") for dockerd by default; ``ctr`` needs ``--plain-http``.
Passwords go to ``docker login`` on standard input; ``ctr`` only takes ``--user user:password`` (it
prompts on a terminal otherwise), so it is on ``ctr``'s command line and in no log or error message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from geo_route.devstack.processes import LoggedProcess, require_binary, start_until_ready
from geo_route.devstack.skopeo import Credentials
from geo_route.errors import DevstackError

CLIENT_TIMEOUT = 120.0
DAEMON_TIMEOUT = 60.0
MESSAGE_CHARS = 600
SOCKET_PATH_LIMIT = 100  # sun_path holds 108 bytes; containerd adds ".ttrpc"
CTR_NAMESPACE = "geo-route"
DOCKERD_NAMESPACE = "moby"  # dockerd's namespace in containerd
CTR_SNAPSHOTTER = "native"  # a plain copy: works on any filesystem, mounts nothing
DEBIAN_DOCKER_CLI = Path("/usr/bin/docker")
CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


class ContainerClientError(DevstackError):
    """A client (docker, ctr, podman, buildah) exited non-zero or timed out; ``stderr`` holds its message."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def run_client(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float = CLIENT_TIMEOUT,
    stdin: str | None = None,
    what: str = "",
) -> str:
    """The client's stdout; ``ContainerClientError`` naming ``what`` (never the arguments, which may
    hold a password) on a non-zero exit or a timeout."""
    what = what or Path(argv[0]).name
    try:
        result = subprocess.run(
            list(argv),
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise ContainerClientError(f"{what} timed out after {timeout}s: {tail(stderr)}", None, stderr) from None
    if result.returncode != 0:
        output = result.stderr or result.stdout
        raise ContainerClientError(f"{what} failed ({result.returncode}): {tail(output)}", result.returncode, output)
    return result.stdout


def tail(text: str) -> str:
    return " ".join(text.split())[-MESSAGE_CHARS:] or "(no message)"


def private_environment(directory: Path) -> dict[str, str]:
    """The host environment with HOME, XDG directories and TMPDIR inside ``directory``: no client
    reads or writes the host's ``~/.docker``, ``auth.json`` or ``containers`` configuration."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "DOCKER_"))}
    for name in ("home", "config", "data", "runtime", "tmp"):
        (directory / name).mkdir(parents=True, exist_ok=True, mode=0o700)
    environment.update(
        HOME=str(directory / "home"),
        XDG_CONFIG_HOME=str(directory / "config"),
        XDG_DATA_HOME=str(directory / "data"),
        XDG_RUNTIME_DIR=str(directory / "runtime"),
        TMPDIR=str(directory / "tmp"),
    )
    return environment


def check_socket_path(path: Path) -> Path:
    if len(str(path)) > SOCKET_PATH_LIMIT:
        raise DevstackError(f"socket path {path} is longer than {SOCKET_PATH_LIMIT} bytes: use a shorter directory")
    return path


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        sock.connect(str(path))
    return True


def answers_ping(path: Path) -> bool:
    """dockerd's ``GET /_ping`` over its unix socket answers 200."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return sock.recv(64).split(b" ", 2)[1:2] == [b"200"]


class Containerd:
    """``Containerd(directory).start()`` … ``stop()``: a containerd of our own (config, root, state,
    sockets under ``directory``; no CRI plugin), and ``ctr`` against it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.socket = check_socket_path(self.directory / "containerd.sock")
        self.logged: LoggedProcess | None = None

    def start(self, timeout: float = DAEMON_TIMEOUT) -> Containerd:
        binary = require_binary("containerd", "containerd")
        config = self.write_config()
        ready = lambda: accepts_connections(self.socket)  # noqa: E731
        self.logged = start_until_ready(
            [binary, "--config", str(config)], self.directory, "containerd", ready, timeout=timeout
        )
        return self

    def write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "containerd.toml"
        text = CONTAINERD_CONFIG.format(
            root=self.directory / "root",
            state=self.directory / "state",
            socket=self.socket,
            opt=self.directory / "opt",
        )
        path.write_text(text, encoding="utf-8")
        return path

    def stop(self) -> None:
        if self.logged is not None:
            self.logged.stop(timeout=20.0)

    def ctr(
        self,
        arguments: Sequence[str],
        *,
        timeout: float = CLIENT_TIMEOUT,
        what: str = "",
        namespace: str = CTR_NAMESPACE,
    ) -> str:
        """``ctr --address SOCKET --namespace geo-route ARGUMENTS``; unpacking uses the native snapshotter."""
        binary = require_binary("ctr", "containerd")
        env = {**private_environment(self.directory / "ctr"), "CONTAINERD_SNAPSHOTTER": CTR_SNAPSHOTTER}
        argv = [binary, "--address", str(self.socket), "--namespace", namespace, *arguments]
        return run_client(argv, env, timeout=timeout, what=what or f"ctr {' '.join(arguments[:2])}")

    def pull(self, reference: str, credentials: Credentials, *, hosts_dir: Path | None = None) -> str:
        """``ctr images pull --plain-http --user`` of ``HOST:PORT/repo:tag``; the manifest digest pulled.
        With ``hosts_dir``, ``--hosts-dir`` instead: each host's ``hosts.toml`` there (its URLs name
        the scheme) says where to pull from, e.g. what ``geo-route client-config --for containerd`` writes."""
        where = ["--hosts-dir", str(hosts_dir)] if hosts_dir is not None else ["--plain-http"]
        self.ctr(["images", "pull", *where, "--user", credentials.as_option(), reference], what="ctr pull")
        return self.image_digest(reference)

    def push(self, reference: str, credentials: Credentials) -> None:
        self.ctr(["images", "push", "--plain-http", "--user", credentials.as_option(), reference], what="ctr push")

    def import_archive(self, archive: Path, name: str) -> str:
        """``ctr images import --base-name`` an OCI or docker archive whose reference is ``name``;
        the manifest digest of ``name``."""
        self.ctr(["images", "import", "--base-name", name.rsplit(":", 1)[0], str(archive)], what="ctr import")
        return self.image_digest(name)

    def tag(self, source: str, target: str) -> None:
        self.ctr(["images", "tag", "--force", source, target])

    def remove_all_images(self) -> None:
        """Every image of our namespace, and (``--sync``: garbage collected at once) its content, so
        the next pull fetches every blob again."""
        names = [line.split()[0] for line in self.ctr(["images", "ls"]).splitlines()[1:] if line.strip()]
        if names:
            self.ctr(["images", "remove", "--sync", *names])

    def remove_content(self, namespace: str) -> None:
        """Every blob and manifest in ``namespace``'s content store."""
        digests = self.ctr(["content", "ls", "--quiet"], namespace=namespace).split()
        if digests:
            self.ctr(["content", "rm", *digests], namespace=namespace)

    def image_digest(self, reference: str) -> str:
        """The digest ``ctr images ls`` lists for exactly ``reference``."""
        for line in self.ctr(["images", "ls"]).splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return fields[2]
        raise DevstackError(f"containerd has no image {reference}")


class DockerDaemon:
    """``with DockerDaemon(directory) as docker:`` a containerd and a dockerd of our own, both stopped
    by PID on exit (also after a failure); ``docker.docker([...])`` runs the CLI against them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.containerd = Containerd(self.directory / "containerd")
        self.socket = check_socket_path(self.directory / "docker.sock")
        self.logged: LoggedProcess | None = None

    def __enter__(self) -> DockerDaemon:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = DAEMON_TIMEOUT) -> DockerDaemon:
        argv = self.daemon_argv()
        self.containerd.start(timeout)
        try:
            ready = lambda: answers_ping(self.socket)  # noqa: E731
            self.logged = start_until_ready(argv, self.directory, "dockerd", ready, timeout=timeout)
        except BaseException:
            self.containerd.stop()
            raise
        return self

    def daemon_argv(self) -> list[str]:
        """How dockerd is started (a subclass may run it inside something else)."""
        return [require_binary("dockerd", "docker.io"), *self.daemon_options()]

    def daemon_options(self) -> list[str]:
        config = self.directory / "daemon.json"
        # dockerd 20.10 keeps its identity key in /etc/docker/key.json unless the file names another
        config.write_text(
            json.dumps({"deprecated-key-path": str(self.directory / "key.json")}) + "\n", encoding="utf-8"
        )
        return [
            f"--config-file={config}",
            f"--containerd={self.containerd.socket}",
            f"--data-root={self.directory / 'data'}",
            f"--exec-root={self.directory / 'exec'}",
            f"--pidfile={self.directory / 'dockerd.pid'}",
            f"--host={self.host}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--log-level=warn",
        ]

    def stop(self) -> None:
        try:
            if self.logged is not None:
                self.logged.stop(timeout=20.0)
        finally:
            self.containerd.stop()

    def environment(self) -> dict[str, str]:
        """The CLI's environment: ``DOCKER_HOST`` this daemon, ``DOCKER_CONFIG`` (credentials) private."""
        environment = private_environment(self.directory / "client")
        environment.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.directory / "client" / "docker"))
        return environment

    def cli(self) -> str:
        return str(DEBIAN_DOCKER_CLI) if DEBIAN_DOCKER_CLI.is_file() else require_binary("docker", "docker.io")

    def docker(self, arguments: Sequence[str], *, stdin: str | None = None, timeout: float = CLIENT_TIMEOUT) -> str:
        what = f"docker {' '.join(arguments[:1])}"
        return run_client([self.cli(), *arguments], self.environment(), stdin=stdin, timeout=timeout, what=what)

    def login(self, registry: str, credentials: Credentials) -> None:
        """``docker login REGISTRY --password-stdin``: the daemon checks the credentials at the registry."""
        self.docker(
            ["login", registry, "--username", credentials.username, "--password-stdin"], stdin=credentials.password
        )

    def load(self, archive: Path) -> None:
        """``docker load`` a docker-archive tar (e.g. what ``skopeo copy … docker-archive:`` writes)."""
        self.docker(["load", "--input", str(archive)])

    def push(self, reference: str) -> str:
        """``docker push``; the manifest digest it reports."""
        return reported_digest(self.docker(["push", reference]), "digest: ")

    def pull(self, reference: str) -> str:
        """``docker pull``; the manifest digest it reports."""
        return reported_digest(self.docker(["pull", reference]), "Digest: ")

    def tag(self, source: str, target: str) -> None:
        self.docker(["tag", source, target])

    def remove_all_images(self) -> None:
        """``docker image prune --all --force`` and the manifests dockerd keeps in containerd: the
        next pull fetches every manifest and blob again. (dockerd 20.10 caches each manifest it
        fetched in containerd's content store, also after a prune, and pulls by digest from there.)"""
        self.docker(["image", "prune", "--all", "--force"])
        self.containerd.remove_content(DOCKERD_NAMESPACE)


def reported_digest(output: str, marker: str) -> str:
    """The ``sha256:…`` after ``marker`` in a client's output."""
    for line in output.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].split()[0]
    raise DevstackError(f"no {marker.strip()!r} in the client's output: {tail(output)}")
