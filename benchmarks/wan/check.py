"""Measure the simulated WAN against its configuration; exit 1 when RTT or throughput is off by > 15 %.

Run from the repository root as root::

    .venv/bin/python -m benchmarks.wan.check [--rate-mbit 100] [--rtt-ms 80] [--megabytes 50]

It starts a small TCP server of its own on 127.0.0.1 (the "primary"), builds a ``SimulatedWan`` to
it and measures through the link, like the secondary would:

* connection setup: connect + one 1-byte request/response on a fresh connection (expected 2 x RTT:
  the handshake plus the request), median of several;
* RTT: median of 1-byte request/response round trips on one connection (expected RTT);
* throughput client->target: N MB sent, the server acknowledges the last byte; the time minus one
  measured RTT (first byte out, acknowledgement back) is the transfer time;
* throughput target->client: N MB requested; timed from the first to the last byte received.

Throughput is payload (goodput). ``tbf`` counts whole Ethernet frames, so TCP/IPv4 over a 1500-byte
MTU carries at most 1448/1514 = 95.6 % of the link rate as payload; the check compares goodput
with the configured link rate and the 15 % tolerance covers that.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import socketserver
import statistics
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .link import SimulatedWan, WanError, WanUnavailable

TOLERANCE = 0.15
PAYLOAD_SHARE = 1448 / 1514  # MSS with TCP timestamps / Ethernet frame at MTU 1500
SEND_CHUNK = 256 * 1024
HEADER = struct.Struct("!cQ")
PING, UPLOAD, DOWNLOAD = b"p", b"U", b"D"


class SinkHandler(socketserver.BaseRequestHandler):
    """``p`` -> ``p``; ``U`` + n: read n bytes, answer ``K``; ``D`` + n: send n bytes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(SEND_CHUNK)
        while True:
            command = sock.recv(1)
            if not command:
                return
            if command == PING:
                sock.sendall(PING)
                continue
            (size,) = struct.unpack("!Q", recv_exactly(sock, 8))
            if command == UPLOAD:
                left = size
                while left > 0:
                    data = sock.recv(min(left, SEND_CHUNK))
                    if not data:
                        return
                    left -= len(data)
                sock.sendall(b"K")
            elif command == DOWNLOAD:
                left = size
                while left > 0:
                    sock.sendall(payload[: min(left, SEND_CHUNK)])
                    left -= min(left, SEND_CHUNK)
            else:
                return


class SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        data = sock.recv(size - len(parts))
        if not data:
            raise ConnectionError("connection closed early")
        parts += data
    return bytes(parts)


@contextlib.contextmanager
def sink_server() -> Iterator[tuple[str, int]]:
    server = SinkServer(("127.0.0.1", 0), SinkHandler)
    thread = threading.Thread(target=server.serve_forever, name="wan-sink", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ping(sock: socket.socket) -> float:
    start = time.monotonic()
    sock.sendall(PING)
    if recv_exactly(sock, 1) != PING:
        raise ConnectionError("bad ping answer")
    return time.monotonic() - start


def setup_times(address: tuple[str, int], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.monotonic()
        with connect(address) as sock:
            ping(sock)
            times.append(time.monotonic() - start)
    return times


def upload(sock: socket.socket, size: int, rtt: float) -> float:
    """Goodput client->target in Mbit/s."""
    chunk = bytes(SEND_CHUNK)
    start = time.monotonic()
    sock.sendall(HEADER.pack(UPLOAD, size))
    left = size
    while left > 0:
        sock.sendall(chunk[: min(left, SEND_CHUNK)])
        left -= min(left, SEND_CHUNK)
    if recv_exactly(sock, 1) != b"K":
        raise ConnectionError("bad upload acknowledgement")
    return size * 8 / (time.monotonic() - start - rtt) / 1e6


def download(sock: socket.socket, size: int) -> float:
    """Goodput target->client in Mbit/s, from the first to the last byte received."""
    sock.sendall(HEADER.pack(DOWNLOAD, size))
    first = sock.recv(SEND_CHUNK)
    start = time.monotonic()
    left = size - len(first)
    counted = left
    while left > 0:
        data = sock.recv(min(left, SEND_CHUNK))
        if not data:
            raise ConnectionError("download ended early")
        left -= len(data)
    return counted * 8 / (time.monotonic() - start) / 1e6


@dataclass(frozen=True)
class Reading:
    name: str
    measured: float
    expected: float
    unit: str

    @property
    def deviation(self) -> float:
        return (self.measured - self.expected) / self.expected

    @property
    def ok(self) -> bool:
        return abs(self.deviation) <= TOLERANCE

    def line(self) -> str:
        verdict = "ok" if self.ok else "OFF"
        return (
            f"  {self.name:<34} {self.measured:9.2f} {self.unit:<7} expected {self.expected:9.2f} {self.unit:<7}"
            f" {self.deviation * 100:+6.1f} %  {verdict}"
        )


def read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "?"


def measure(wan: SimulatedWan, megabytes: int, pings: int) -> list[Reading]:
    address = wan.listen_address
    setups = setup_times(address, 5)
    with connect(address) as sock:
        ping(sock)  # warm-up
        rtts = [ping(sock) for _ in range(pings)]
        rtt = statistics.median(rtts)
        up = upload(sock, megabytes * 1_000_000, rtt)
        down = download(sock, megabytes * 1_000_000)
    print(
        f"  (RTT samples: min {min(rtts) * 1e3:.2f} ms, max {max(rtts) * 1e3:.2f} ms; "
        f"setup samples: {', '.join(f'{s * 1e3:.1f}' for s in setups)} ms)"
    )
    setup_expected = wan.rtt_ms * (2 if wan.handshake_rtt else 1)
    return [
        Reading("connection setup + 1st reply", statistics.median(setups) * 1e3, setup_expected, "ms"),
        Reading("RTT (median 1-byte round trip)", rtt * 1e3, wan.rtt_ms, "ms"),
        Reading(f"goodput client->target {megabytes} MB", up, wan.rate_mbit, "Mbit/s"),
        Reading(f"goodput target->client {megabytes} MB", down, wan.rate_mbit, "Mbit/s"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the simulated WAN link against its configuration.")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=80.0)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--pings", type=int, default=30)
    args = parser.parse_args(argv)
    print("How the simulation works:")
    print("  bandwidth: tbf qdisc on both ends of a veth pair between two network namespaces created for this run")
    print("             (10.213.7.1/30 <-> 10.213.7.2/30), so each direction is limited on its own egress;")
    print("  latency:   a relay process delays every chunk by RTT/2 in each direction (pipelined delay line,")
    print("             not a sleep per chunk) and holds a new connection's first bytes for one RTT (handshake).")
    print(
        f"  kernel: tcp_rmem={read_sysctl('net.ipv4.tcp_rmem')!r} tcp_wmem={read_sysctl('net.ipv4.tcp_wmem')!r}"
        f" (BDP at {args.rate_mbit:g} Mbit/s x {args.rtt_ms:g} ms = {args.rate_mbit * args.rtt_ms / 8 / 1000:.2f} MB;"
        " the relay splits TCP, so only its delay-line buffer has to hold it)"
    )
    try:
        with sink_server() as target, SimulatedWan(target, rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms) as wan:
            print(f"Link: {wan.describe()}")
            print("Measurements:")
            readings = measure(wan, args.megabytes, args.pings)
            for reading in readings:
                print(reading.line())
            for dev, stats in wan.qdisc_stats().items():
                first = " ".join(stats.splitlines()[1].split()) if len(stats.splitlines()) > 1 else stats
                print(f"  tc {dev}: {first}")
            print(
                f"  (payload can be at most {PAYLOAD_SHARE * 100:.1f} % of the link rate: TCP/IPv4/Ethernet headers"
                f" = {args.rate_mbit * PAYLOAD_SHARE:.1f} Mbit/s at {args.rate_mbit:g} Mbit/s)"
            )
    except WanUnavailable as exc:
        print(f"FAIL: the simulated WAN is not available here: {exc}", file=sys.stderr)
        return 2
    except WanError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 2
    bad = [reading for reading in readings if not reading.ok]
    if bad:
        print(f"FAIL: {len(bad)} reading(s) off by more than {TOLERANCE * 100:.0f} %: {[r.name for r in bad]}")
        return 1
    print(f"OK: every reading within {TOLERANCE * 100:.0f} % of the configuration; link removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
