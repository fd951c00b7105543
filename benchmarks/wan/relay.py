"""The relay process of the simulated WAN: two TCP forwarding stages across two network namespaces.

Run by ``link.SimulatedWan`` as ``python relay.py ...`` (stdlib only, so it runs as a plain script).
The process lives in the root network namespace; it creates a few sockets inside the two namespaces
of the link by switching its own thread there with ``setns(2)`` just for the ``socket()`` call (a
socket belongs to the namespace it was created in, whatever thread uses it afterwards):

* stage 1, the **delay line**: listens on ``--listen`` (127.0.0.1 in the root namespace). For each
  connection it opens a socket in namespace A and connects to ``--inner`` (10.213.7.2 in namespace
  B, across the veth pair whose both ends have a ``tbf`` qdisc). Each chunk it reads, in either
  direction, is timestamped and written when ``now >= max(t_read, t_accept + handshake) +
  one_way`` (a pipelined delay line: a queue, never a sleep per chunk, so the delay does not limit
  throughput). ``handshake`` (default one RTT) makes a new connection cost its TCP handshake.
* stage 2, **plain forwarding**: listens on ``--inner`` (a socket created in namespace B) and
  forwards each connection to ``--target`` (a socket of the root namespace, e.g. 127.0.0.1:P).

It prints ``READY`` on stdout once both listeners are bound, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import os
import signal
import socket
import sys
import time

CLONE_NEWNET = 0x40000000
CHUNK = 256 * 1024
DEFAULT_LIMIT_BYTES = 16 * 1024 * 1024  # bytes a delay line may hold per direction: >> rate x one-way delay
_LIBC = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns(CLONE_NEWNET): {os.strerror(errno)}")


def socket_in_netns(ns_path: str) -> socket.socket:
    """A TCP socket created inside the network namespace ``ns_path``; this thread is switched back after."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(ns_path, os.O_RDONLY)
    try:
        setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            setns(own)
    finally:
        os.close(target)
        os.close(own)


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayLine:
    """Chunks in arrival order with their due time; bounded in bytes so a stalled side applies backpressure."""

    def __init__(self, limit_bytes: int) -> None:
        self.items: collections.deque[tuple[float, bytes]] = collections.deque()
        self.held = 0
        self.limit = limit_bytes
        self.has_items = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()

    def put(self, due: float, data: bytes) -> None:
        self.items.append((due, data))
        self.held += len(data)
        self.has_items.set()
        if self.held >= self.limit:
            self.has_room.clear()

    def take_due(self, now: float) -> tuple[list[bytes], bool]:
        """The chunks due at ``now`` and whether the end of stream (an empty chunk) was among them."""
        out: list[bytes] = []
        while self.items and self.items[0][0] <= now:
            _, data = self.items.popleft()
            if not data:
                return out, True
            out.append(data)
            self.held -= len(data)
        if self.held < self.limit:
            self.has_room.set()
        if not self.items:
            self.has_items.clear()
        return out, False


async def read_side(reader: asyncio.StreamReader, line: DelayLine, delay: float, not_before: float) -> None:
    while True:
        await line.has_room.wait()
        data = await reader.read(CHUNK)
        line.put(max(time.monotonic(), not_before) + delay, data)
        if not data:
            return


async def write_side(writer: asyncio.StreamWriter, line: DelayLine) -> None:
    while True:
        await line.has_items.wait()
        wait = line.items[0][0] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunks, ended = line.take_due(time.monotonic())
        if chunks:
            writer.write(b"".join(chunks))
            await writer.drain()
        if ended:
            if writer.can_write_eof():
                writer.write_eof()
            return


async def pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, not_before: float, limit: int
) -> None:
    line = DelayLine(limit)
    async with asyncio.TaskGroup() as group:
        group.create_task(read_side(reader, line, delay, not_before))
        group.create_task(write_side(writer, line))


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    delay: float,
    not_before: float,
    limit: int,
) -> None:
    """Both directions until both ended; a reset on either side closes both."""
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(pump(a[0], b[1], delay, not_before, limit))
            group.create_task(pump(b[0], a[1], delay, not_before, limit))
    except* OSError:  # ConnectionResetError and friends: the TaskGroup has cancelled the other direction
        pass
    finally:
        for writer in (a[1], b[1]):
            writer.close()


class Relay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.ns_a: str = args.ns_a
        self.inner = split_address(args.inner)
        self.target = split_address(args.target)
        self.delay = args.one_way_ms / 1000.0
        self.handshake = args.handshake_ms / 1000.0
        self.limit: int = args.limit_bytes
        self.tasks: set[asyncio.Task[None]] = set()

    async def stage1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = time.monotonic()
        nodelay(writer)
        sock = socket_in_netns(self.ns_a)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.inner)
            upstream = await asyncio.open_connection(sock=sock)
        except OSError as exc:
            sock.close()
            print(f"relay: connect to {self.inner} from namespace A failed: {exc}", file=sys.stderr)
            writer.close()
            return
        nodelay(upstream[1])
        await splice((reader, writer), upstream, self.delay, accepted + self.handshake, self.limit)

    async def stage2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay(writer)
        try:
            upstream = await asyncio.open_connection(*self.target)
        except OSError as exc:
            print(f"relay: connect to target {self.target} failed: {exc}", file=sys.stderr)
            writer.close()
            return
        nodelay(upstream[1])
        await splice((reader, writer), upstream, 0.0, 0.0, self.limit)


async def serve(args: argparse.Namespace) -> None:
    relay = Relay(args)
    inner_sock = socket_in_netns(args.ns_b)
    inner_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    inner_sock.bind(relay.inner)
    inner_sock.listen(512)
    inner = await asyncio.start_server(relay.stage2, sock=inner_sock, limit=CHUNK)
    outer = await asyncio.start_server(relay.stage1, *split_address(args.listen), limit=CHUNK, backlog=512)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("READY", flush=True)
    async with inner, outer:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port in the root namespace (stage 1)")
    parser.add_argument("--ns-a", required=True, help="path of namespace A, e.g. /run/netns/NAME")
    parser.add_argument("--ns-b", required=True, help="path of namespace B")
    parser.add_argument("--inner", required=True, help="host:port of stage 2 inside namespace B")
    parser.add_argument("--target", required=True, help="host:port in the root namespace")
    parser.add_argument("--one-way-ms", type=float, required=True)
    parser.add_argument("--handshake-ms", type=float, default=0.0)
    parser.add_argument("--limit-bytes", type=int, default=DEFAULT_LIMIT_BYTES)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
