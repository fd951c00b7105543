"""A simulated WAN link (bandwidth limit + round-trip latency) between a client and a TCP ``target``.

Topology (everything below is created by ``SimulatedWan`` and removed again on exit)::

    client (root ns)                                                         target (root ns)
      |                                                                        ^ 127.0.0.1:P
      v 127.0.0.1:L = listen_address                                          |
    [relay stage 1: delay line, RTT/2 per direction] --socket in ns A-->     [relay stage 2]
                                                       10.213.7.1/30 veth A   socket in ns B,
                                                       ===== tbf both ways ==> 10.213.7.2:7000
                                                       10.213.7.2/30 veth B

* Two network namespaces ``grwan<pid>n<k>a``/``...b`` and one veth pair (``gw<pid>n<k>a`` in A,
  ``gw<pid>n<k>b`` in B) with the private /30 10.213.7.0/30. Nothing is added to the root namespace.
* ``tbf`` (rate ``rate_mbit``) is the root qdisc of *both* veth ends, so each direction is limited
  on its own egress: A->B is client-to-target, B->A is target-to-client.
* One relay process (``relay.py``, root namespace) owns sockets in all three namespaces (it creates
  them after ``setns(2)`` into A or B). Stage 1 delays every chunk by ``rtt_ms / 2`` in each
  direction with a pipelined delay line and makes a new connection cost one RTT before any byte
  passes (the TCP handshake of a real WAN). Stage 2 forwards to ``target`` without delay.

The bytes therefore really cross a rate-limited link between two namespaces; the latency is added
in user space. Limits of the method are in ``README.md`` next to this file. Needs root (or
CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip`` and ``tc`` with the ``tbf`` qdisc; without them
``SimulatedWan`` raises ``WanUnavailable`` with the failing command and its error.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

ADDRESS_A = "10.213.7.1"
ADDRESS_B = "10.213.7.2"
PREFIX = 30
INNER_PORT = 7000
RELAY_SCRIPT = Path(__file__).with_name("relay.py")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
READY_TIMEOUT = 15.0
_COUNTER = itertools.count()


class WanUnavailable(RuntimeError):
    """Network namespaces, veth or tc tbf cannot be used here (not root, missing tools, kernel)."""


class WanError(RuntimeError):
    """The simulated link failed while running or could not be removed completely."""


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise WanUnavailable(f"{name} not found: the simulated WAN needs iproute2 (apt-get install iproute2)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SimulatedWan:
    """Context manager: ``with SimulatedWan(("127.0.0.1", port)) as wan: connect to wan.listen_address``."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rate_mbit: float = 100.0,
        rtt_ms: float = 80.0,
        burst: str = "32kbit",
        tbf_latency_ms: float = 400.0,
        handshake_rtt: bool = True,
        log_dir: Path | None = None,
    ) -> None:
        self.target = target
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self.burst = burst
        self.tbf_latency_ms = tbf_latency_ms
        self.handshake_rtt = handshake_rtt
        tag = f"{os.getpid()}n{next(_COUNTER)}"
        self.netns = (f"grwan{tag}a", f"grwan{tag}b")
        self.veth = (f"gw{tag}a", f"gw{tag}b")
        if max(len(name) for name in self.veth) > 15:
            raise WanError(f"interface names too long: {self.veth}")
        self.listen_address = ("127.0.0.1", free_port())
        self._created_netns: list[str] = []
        self._relay: subprocess.Popen[bytes] | None = None
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="geo-route-wan-")) if log_dir is None else log_dir
        self.relay_log = self.log_dir / "wan-relay.log"
        self._ip = ""
        self._tc = ""

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> SimulatedWan:
        try:
            self.start()
        except BaseException as exc:
            try:
                self.close()
            except WanError as cleanup:
                exc.add_note(str(cleanup))
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        self._ip, self._tc = find_tool("ip"), find_tool("tc")
        existing = self.list_netns()
        for name in self.netns:
            if name in existing:
                raise WanError(f"network namespace {name} already exists; it is not ours, refusing to touch it")
        for name in self.netns:
            self.run_setup([self._ip, "netns", "add", name], "create a network namespace")
            self._created_netns.append(name)
        ns_a, ns_b = self.netns
        veth_a, veth_b = self.veth
        self.run_setup(
            [self._ip, "link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b],
            "create the veth pair",
        )
        for ns, dev, address in ((ns_a, veth_a, ADDRESS_A), (ns_b, veth_b, ADDRESS_B)):
            self.run_setup([self._ip, "-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", dev], "address veth")
            self.run_setup([self._ip, "-n", ns, "link", "set", "lo", "up"], "bring lo up")
            self.run_setup([self._ip, "-n", ns, "link", "set", dev, "up"], "bring veth up")
            tbf = [self._ip, "netns", "exec", ns, self._tc, "qdisc", "add", "dev", dev, *self.tbf_args()]
            self.run_setup(tbf, "add the tbf qdisc")
        self.start_relay()

    def tbf_args(self) -> list[str]:
        return [
            "root",
            "tbf",
            "rate",
            f"{self.rate_mbit:g}mbit",
            "burst",
            self.burst,
            "latency",
            f"{self.tbf_latency_ms:g}ms",
        ]

    def run_setup(self, argv: list[str], what: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise WanUnavailable(
                f"simulated WAN: cannot {what}: `{' '.join(argv)}` exited {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()} "
                "(needs root or CAP_NET_ADMIN/CAP_SYS_ADMIN, network namespaces, veth and the tbf qdisc)"
            )

    def start_relay(self) -> None:
        argv = [
            sys.executable,
            str(RELAY_SCRIPT),
            "--listen",
            f"{self.listen_address[0]}:{self.listen_address[1]}",
            "--ns-a",
            f"/run/netns/{self.netns[0]}",
            "--ns-b",
            f"/run/netns/{self.netns[1]}",
            "--inner",
            f"{ADDRESS_B}:{INNER_PORT}",
            "--target",
            f"{self.target[0]}:{self.target[1]}",
            "--one-way-ms",
            f"{self.rtt_ms / 2}",
            "--handshake-ms",
            f"{self.rtt_ms if self.handshake_rtt else 0}",
        ]
        with open(self.relay_log, "ab") as log:
            self._relay = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        assert self._relay.stdout is not None
        ready, _, _ = select.select([self._relay.stdout], [], [], READY_TIMEOUT)
        line = self._relay.stdout.readline() if ready else b""
        if line.strip() != b"READY":
            tail = self.relay_log.read_text(errors="replace")[-3000:]
            raise WanError(f"the WAN relay did not become ready within {READY_TIMEOUT}s; log {self.relay_log}:\n{tail}")

    # ---------------------------------------------------------------- queries
    def list_netns(self) -> set[str]:
        result = subprocess.run([self._ip or find_tool("ip"), "netns", "list"], capture_output=True, text=True)
        return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}

    def qdisc_stats(self) -> dict[str, str]:
        """``tc -s qdisc`` of each veth end: sent bytes, drops, overlimits (for reports)."""
        stats: dict[str, str] = {}
        for ns, dev in zip(self.netns, self.veth, strict=True):
            result = subprocess.run(
                [self._ip, "netns", "exec", ns, self._tc, "-s", "qdisc", "show", "dev", dev],
                capture_output=True,
                text=True,
                timeout=10,
            )
            stats[dev] = result.stdout.strip()
        return stats

    def describe(self) -> str:
        return (
            f"{self.rate_mbit:g} Mbit/s each way (tbf burst {self.burst}, latency {self.tbf_latency_ms:g} ms on "
            f"{self.veth[0]} in {self.netns[0]} and {self.veth[1]} in {self.netns[1]}), "
            f"RTT {self.rtt_ms:g} ms (+{self.rtt_ms / 2:g} ms per direction in the relay"
            f"{', new connections cost one extra RTT' if self.handshake_rtt else ''}); "
            f"listen {self.listen_address[0]}:{self.listen_address[1]} -> target {self.target[0]}:{self.target[1]}"
        )

    # ---------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Stop the relay (by its PID) and delete exactly the namespaces created here (the veth pair goes with them)."""
        problems: list[str] = []
        relay, self._relay = self._relay, None
        if relay is not None:
            if relay.poll() is None:
                relay.send_signal(signal.SIGTERM)
                try:
                    relay.wait(10)
                except subprocess.TimeoutExpired:
                    relay.kill()
                    relay.wait(10)
            if relay.stdout is not None:
                relay.stdout.close()
        for name in reversed(self._created_netns):
            result = subprocess.run([self._ip, "netns", "del", name], capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                problems.append(f"ip netns del {name}: {result.stderr.strip()}")
        deadline = time.monotonic() + 10
        while self._created_netns and time.monotonic() < deadline:
            left = self.list_netns() & set(self._created_netns)
            if not left:
                break
            time.sleep(0.1)
        left = self.list_netns() & set(self._created_netns) if self._created_netns else set()
        if left:
            problems.append(f"network namespaces still present: {sorted(left)}")
        self._created_netns = []
        if self._own_log_dir and not problems:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if problems:
            raise WanError("simulated WAN cleanup incomplete: " + "; ".join(problems))


class WanFront:
    """``bring_up(..., primary_front=WanFront(owned))``: the primary behind a ``SimulatedWan``.

    Called once by the devstack with the primary's ``host:port``; opens the link in the ``owned``
    ``ExitStack`` (so it closes after the stack it was entered before) and returns the address
    clients use instead. ``direct`` is the primary's own address, ``wan`` the link.
    """

    def __init__(self, owned: contextlib.ExitStack, *, rate_mbit: float, rtt_ms: float) -> None:
        self.owned = owned
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self.direct = ""
        self.wan: SimulatedWan | None = None

    def __call__(self, address: str) -> str:
        host, port = address.rsplit(":", 1)
        self.direct = address
        link = SimulatedWan((host, int(port)), rate_mbit=self.rate_mbit, rtt_ms=self.rtt_ms)
        self.wan = self.owned.enter_context(link)
        listen_host, listen_port = self.wan.listen_address
        return f"{listen_host}:{listen_port}"
