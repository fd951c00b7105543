"""Real processes on loopback: free ports, required binaries, log files, readiness waits, stop by PID.

Every process is started here with its stdout and stderr in a log file of a directory the caller
owns, and is stopped by its own PID only: SIGTERM, a wait, then SIGKILL. Nothing here signals a
process group or a process it was not handed.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from geo_route.errors import DevstackError

LOOPBACK = "127.0.0.1"
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
APT_PACKAGE_OF = {
    "buildah": "buildah",
    "containerd": "containerd",
    "ctr": "containerd",
    "docker-registry": "docker-registry",
    "dockerd": "docker.io",
    "nginx": "nginx",
    "podman": "podman",
    "redis-server": "redis-server",
    "skopeo": "skopeo",
    "wrk": "wrk",
}
LOG_TAIL_BYTES = 4000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, package: str | None = None) -> str:
    """The path of a required program; a missing one is a loud error naming its apt package, never a skip."""
    path = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    if path is None:
        package = package or APT_PACKAGE_OF.get(name, name)
        raise DevstackError(f"{name} is not installed: apt-get install {package} (.ci/run installs it)")
    return path


@dataclass(frozen=True)
class LoggedProcess:
    """A process we started, with stdout and stderr in ``log_path``.

    It remembers how it was started (``env``, ``ready``) so a fault test can kill it and ``restart`` it.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    env: Mapping[str, str] | None = None
    ready: Callable[[], bool] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def read_log_tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.popen, timeout)

    def kill(self) -> None:
        """SIGKILL this process and every process it started (gunicorn workers, NGINX workers), by PID:
        what a crash or the OOM killer does. Reaps our child."""
        for pid in [*descendants(self.pid), self.pid]:
            send_signal(pid, signal.SIGKILL)
        self.popen.wait(10.0)

    def pause(self) -> None:
        """SIGSTOP (a process that accepts connections but never answers); ``resume`` undoes it."""
        send_signal(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        send_signal(self.pid, signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> LoggedProcess:
        """Start the same command again (same log, environment and readiness check); the old one must
        be gone. Returns the new process once it is ready."""
        if self.is_running():
            raise DevstackError(f"{self.name} (pid {self.pid}) is still running; stop or kill it first")
        argv = [str(arg) for arg in self.popen.args]  # type: ignore[union-attr]
        fresh = start_process(argv, self.log_path.parent, self.name, env=self.env)
        fresh = dataclasses.replace(fresh, ready=self.ready)
        if self.ready is not None:
            try:
                wait_until(self.ready, timeout, f"{self.name} after a restart", process=fresh)
            except BaseException:
                fresh.stop()
                raise
        return fresh


def descendants(pid: int) -> list[int]:
    """The PIDs below ``pid`` (children first), read from /proc: the processes it started itself."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(child) for child in task.read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            pending.extend(children)
    return found


def cpu_seconds(pid: int, *, with_descendants: bool = True) -> float:
    """User + system CPU seconds ``pid`` (and the processes below it, e.g. gunicorn's or NGINX's
    workers) has used so far, from /proc; a process gone meanwhile counts 0."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for each in [pid, *(descendants(pid) if with_descendants else [])]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text(encoding="ascii", errors="replace").rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


def start_process(
    argv: Sequence[str],
    log_dir: Path,
    name: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> LoggedProcess:
    """Start ``argv`` with stdout and stderr appended to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    return LoggedProcess(name, popen, log_path, env=env)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    process: LoggedProcess | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` (``OSError`` counts as not yet) until it is true; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if process is not None and not process.is_running():
            raise DevstackError(
                f"{what}: {process.name} exited with status {process.popen.returncode}; "
                f"log {process.log_path}:\n{process.read_log_tail()}"
            )
        if time.monotonic() >= deadline:
            tail = f"; log {process.log_path}:\n{process.read_log_tail()}" if process is not None else ""
            raise TimeoutError(f"{what} did not come up within {timeout}s{tail}")
        time.sleep(interval)


def start_until_ready(
    argv: Sequence[str],
    log_dir: Path,
    name: str,
    ready: Callable[[], bool],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> LoggedProcess:
    """``start_process`` then ``wait_until(ready)``; a process that never gets ready is stopped again."""
    logged = dataclasses.replace(start_process(argv, log_dir, name, env=env), ready=ready)
    try:
        wait_until(ready, timeout, name, process=logged)
    except BaseException:
        logged.stop()
        raise
    return logged


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: only the process we started, by its PID."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout``, then SIGKILL it. Only that PID, never a group.

    Reaps it when it is our child. Returns whether it is gone.
    """
    if pid <= 0:
        raise ValueError(f"refusing to signal pid {pid}: it would address a process group")
    if not send_signal(pid, signal.SIGTERM) or wait_gone(pid, timeout):
        return True
    send_signal(pid, signal.SIGKILL)
    return wait_gone(pid, timeout)


def send_signal(pid: int, signum: int) -> bool:
    """Signal one PID; False when it no longer exists."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not is_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def is_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (and, when it is our child, been reaped)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        return reaped == pid
    except ChildProcessError:  # not our child: it is gone when signal 0 no longer finds it
        return not send_signal(pid, 0)


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> HttpAnswer:
    """GET ``url`` directly (never through a proxy); an HTTP error status is an answer, not an exception."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with NO_PROXY_OPENER.open(request, timeout=timeout) as response:
            return HttpAnswer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpAnswer(error.code, dict(error.headers), error.read())


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    """GET ``url``: the status and headers."""
    answer = fetch(url, headers, timeout)
    return answer.status, answer.headers


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix domain socket (a ``unix:PATH`` bind, e.g. the auth service's for NGINX)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch_from(bind: str, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> HttpAnswer:
    """GET ``path`` from a service at one of its binds: ``host:port``, ``[v6]:port`` or ``unix:PATH``."""
    if not bind.startswith("unix:"):
        return fetch(f"http://{bind}{path}", headers, timeout)
    connection = UnixHTTPConnection(bind.removeprefix("unix:"), timeout)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        return HttpAnswer(response.status, dict(response.headers), response.read())
    finally:
        connection.close()
