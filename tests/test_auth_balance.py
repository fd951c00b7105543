"""NGINX's kept-alive connections to the auth service are spread over its workers (issue 15, item 2).

A worker of the event-loop service keeps the connections it accepts. On one shared Unix socket a
burst of connections went to whichever worker woke first (asyncio accepts up to the backlog at once),
so one core made every decision while the other idled. Each worker now has a socket of its own
(``server.socket_per_worker``) and NGINX's upstream names them all: round robin spreads the
connections. Real NGINX, gunicorn and Redis (the devstack); the connections each worker holds are
read from /proc.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from geo_route.config import load_settings
from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.processes import descendants, fetch_from, wait_until

CONCURRENT = 24  # requests in flight at once: NGINX opens a connection to the service for each


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackClient]:
    with started_stack(tmp_path_factory.mktemp("balance") / "stack") as client:
        yield client


def connected_unix_sockets(paths: set[str]) -> set[int]:
    """Inodes of the connected Unix sockets on the server side of ``paths`` (an accepted socket
    carries its listener's path in /proc/net/unix; state 03 is connected)."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[5] == "03" and fields[7].split("\x00")[0] in paths:
            inodes.add(int(fields[6]))
    return inodes


def held_by(pid: int, inodes: set[int]) -> int:
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            held += 1
    return held


def ask(address: str) -> int:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/v2/")  # decided by the service (no token: its 401 challenge)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_burst_of_nginx_connections_is_spread_over_the_auth_workers(client: StackClient) -> None:
    """Both workers held still while NGINX opens a connection for each of 24 requests, then let go:
    before, the first worker to run accepted all of them (24 + 0 seen); now each holds about half."""
    assert client.stack is not None
    settings = load_settings(client.info.site_file, environ={})
    paths = {bind.removeprefix("unix:") for bind in settings.auth_servers if bind.startswith("unix:")}
    assert paths, settings.auth_servers
    workers = descendants(client.stack.processes["auth"].pid)
    assert len(workers) == 2, workers
    address = client.info.secondary_url.removeprefix("http://")
    since = client.access_log_offset()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            answers = [pool.submit(ask, address) for _ in range(CONCURRENT)]
            time.sleep(0.5)  # NGINX has connected (into the backlog) and sent every subrequest
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        statuses = [answer.result() for answer in answers]
    assert statuses == [401] * CONCURRENT, statuses
    entries = [entry for entry in client.access_log(since) if entry.uri == "/v2/"]
    assert len(entries) == CONCURRENT, entries
    assert {(entry.route, entry.reason) for entry in entries} == {("", "no-token")}, entries  # decided here
    inodes = connected_unix_sockets(paths)
    held = [held_by(pid, inodes) for pid in workers]
    assert sum(held) >= CONCURRENT // 2, held  # NGINX keeps them alive (keepalive 16 per NGINX worker)
    assert min(held) >= sum(held) // 4, f"connections per worker: {held}"


def serves(bind: str) -> bool:
    try:
        return fetch_from(bind, "/healthz", timeout=1.0).status == 200
    except OSError:
        return False


def test_a_worker_that_died_is_replaced_on_its_own_socket(client: StackClient) -> None:
    """Each worker socket has a worker after one is killed: the master gives the new worker the
    socket fewest live workers serve (its predecessor's), not one another worker already serves."""
    assert client.stack is not None
    settings = load_settings(client.info.site_file, environ={})
    master = client.stack.processes["auth"].pid
    assert all(serves(bind) for bind in settings.auth_servers)
    killed = descendants(master)[0]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: killed not in descendants(master) and len(descendants(master)) == 2, 30, "a new worker")
    wait_until(lambda: all(serves(bind) for bind in settings.auth_servers), 30, "every worker socket served")
