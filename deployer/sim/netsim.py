"""The simulated fleet's network: a userspace TCP proxy that delays each direction, counts bytes and can cut.

tc netem is not in this kernel, so latency is added here. Every chunk read from one side is stamped with
its arrival time + the delay and queued; a second task writes it to the other side once that time has
come. Many chunks are in flight at once, so the delay does not cap throughput (a proxy that slept per
chunk would). Both sockets have TCP_NODELAY. With `cut_after_bytes` N, a connection is reset (SO_LINGER 0,
both sockets) the moment its Nth client->server byte arrives: what was still queued is lost, as on a
pulled cable. N counts per connection.

The proxy writes its counters to a JSON file (temp + rename, so a reader never sees half of it): when it
is listening (the sim's readiness signal), at every connection's open and close, every 0.5 s while
anything changed, and on SIGTERM/SIGINT before it exits. `read_stats` reads that file.

    python -m deployer.netsim proxy --listen 127.0.0.1:PORT --to HOST:PORT --delay-ms MS --stats FILE
                                    [--cut-after-bytes N]

`--delay-ms` is added to each direction: a round trip through the proxy gains twice that.
It imports nothing from deployer: the sim starts it as a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 16
QUEUE_CHUNKS = 256  # per direction: at most 16 MiB in flight before the proxy stops reading that side
CONNECT_TIMEOUT_S = 10.0
SAVE_EVERY_S = 0.5


@dataclass(slots=True)
class Stats:
    """What the stats file holds (plus `pid`, `listen`, `to`, `delay_ms`, `cut_after_bytes`, `updated`)."""

    connections: int = 0  # accepted so far
    active: int = 0
    client_to_server_bytes: int = 0  # read from clients (counted on arrival, cut connections included)
    server_to_client_bytes: int = 0
    cuts: int = 0  # connections reset by cut_after_bytes
    upstream_failures: int = 0  # connections whose server could not be reached


class _Cut(Exception):
    """This connection reached cut_after_bytes."""


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class Proxy:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], *, delay_ms: float, stats: Path,
                 cut_after_bytes: int = 0) -> None:
        self.listen, self.upstream, self.delay_s = listen, upstream, delay_ms / 1000
        self.delay_ms, self.stats_path, self.cut_after = delay_ms, stats, cut_after_bytes
        self.stats = Stats()
        self._dirty = True
        self._writers: set[asyncio.StreamWriter] = set()

    def save(self) -> None:
        document: dict[str, Any] = {
            "pid": os.getpid(), "listen": f"{self.listen[0]}:{self.listen[1]}",
            "to": f"{self.upstream[0]}:{self.upstream[1]}", "delay_ms": self.delay_ms,
            "cut_after_bytes": self.cut_after, **asdict(self.stats), "updated": time.time(),
        }
        temp = self.stats_path.with_name(f".{self.stats_path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(document, indent=1))
        os.replace(temp, self.stats_path)
        self._dirty = False

    async def serve(self, stop: asyncio.Event) -> None:
        server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1], reuse_address=True)
        self.save()  # listening: the file's existence (with this pid) says so
        saver = asyncio.create_task(self._save_periodically())
        try:
            await stop.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                _reset(writer)
            saver.cancel()
            self.save()

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if self._dirty:
                self.save()

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        self.save()
        self._writers.add(client)
        _nodelay(client)
        try:
            try:
                server_reader, server = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError):
                self.stats.upstream_failures += 1
                _reset(client)
                return
            self._writers.add(server)
            _nodelay(server)
            await self._relay(client_reader, client, server_reader, server)
            self._writers.discard(server)
        finally:
            self._writers.discard(client)
            self.stats.active -= 1
            self.save()

    async def _relay(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                     server_reader: asyncio.StreamReader, server: asyncio.StreamWriter) -> None:
        up = asyncio.create_task(self._pump(client_reader, server, upstream=True))
        down = asyncio.create_task(self._pump(server_reader, client, upstream=False))
        try:
            await asyncio.gather(up, down)
        except _Cut:
            self.stats.cuts += 1
            _reset(client)
            _reset(server)
        except (OSError, asyncio.IncompleteReadError):  # a reset on one side resets the other
            _reset(client)
            _reset(server)
        else:
            for writer in (client, server):
                writer.close()
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        """One direction: read, stamp, queue; `_deliver` writes each chunk when its time has come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        deliver = asyncio.create_task(self._deliver(queue, writer))
        passed = 0
        try:
            while True:
                data = await reader.read(CHUNK)
                if upstream:
                    self.stats.client_to_server_bytes += len(data)
                else:
                    self.stats.server_to_client_bytes += len(data)
                self._dirty = True
                passed += len(data)
                if upstream and self.cut_after and passed >= self.cut_after:
                    raise _Cut
                await queue.put((loop.time() + self.delay_s, data))  # b"": end of stream, delayed too
                if not data:
                    break
                if deliver.done():  # the other side failed while we were reading
                    break
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


# --- a network namespace per device, joined to the host by a veth pair shaped with tbf -------------------

SUBNET = "10.213"  # /30s are taken from 10.213.0.0/16, skipping any address already on this machine
IP_TIMEOUT_S = 10.0


class NetworkError(Exception):
    """An `ip` or `tc` command failed (the sim turns it into its own error)."""


@dataclass(frozen=True, slots=True)
class Link:
    """A device's namespace and the veth pair into it: `host_ip` on the host side, `device_ip` inside."""

    netns: str
    veth: str  # the host-side end; the device-side end is the same name ending in "d"
    host_ip: str
    device_ip: str


def _ip(*argv: str) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{' '.join(argv)}: {exc}") from exc
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def _subnet(index: int) -> tuple[str, int]:
    """The /30 number `index` of 10.213.0.0/16: its first three octets and its network's last octet."""
    return f"{SUBNET}.{index >> 6}", (index & 63) * 4


def _free_subnet() -> int:
    """A random /30 of 10.213.0.0/16 (its index) with no address of it on this machine yet."""
    used = _ip("ip", "-4", "-o", "addr", "show")
    for _ in range(64):
        index = secrets.randbelow(1 << 14)
        base, last = _subnet(index)
        if f" {base}.{last + 1}/" not in used:
            return index
    raise NetworkError(f"no free /30 found in {SUBNET}.0.0/16")


def tbf_args(rate_kbit: int) -> list[str]:
    """tbf at `rate_kbit`: a burst of 10 ms of traffic (at least two full frames), up to 200 ms queued."""
    burst = max(rate_kbit * 1000 // 8 // 100, 3200)
    return ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "200ms"]


def make_link(name: str, rate_kbit: int) -> Link:
    """Create a namespace `deploysim-NAME-RAND`, a veth pair into it with a private /30, tbf on both ends
    when `rate_kbit` > 0. Undone (best effort) if any step fails."""
    token = secrets.token_hex(3)
    base, last = _subnet(_free_subnet())
    link = Link(f"deploysim-{name}-{token}", f"dsim{token}h", f"{base}.{last + 1}", f"{base}.{last + 2}")
    inner = link.veth[:-1] + "d"
    steps = [
        ["ip", "netns", "add", link.netns],
        ["ip", "link", "add", link.veth, "type", "veth", "peer", "name", inner, "netns", link.netns],
        ["ip", "addr", "add", f"{link.host_ip}/30", "dev", link.veth],
        ["ip", "link", "set", link.veth, "up"],
        ["ip", "-n", link.netns, "addr", "add", f"{link.device_ip}/30", "dev", inner],
        ["ip", "-n", link.netns, "link", "set", inner, "up"],
        ["ip", "-n", link.netns, "link", "set", "lo", "up"],
    ]
    if rate_kbit > 0:
        steps += [["tc", "qdisc", "add", "dev", link.veth, "root", *tbf_args(rate_kbit)],
                  ["tc", "-n", link.netns, "qdisc", "add", "dev", inner, "root", *tbf_args(rate_kbit)]]
    try:
        for step in steps:
            _ip(*step)
    except NetworkError:
        remove_link(link.netns, link.veth)
        raise
    return link


def remove_link(netns: str | None, veth: str | None) -> None:
    """Delete a namespace and veth made by `make_link` (by their recorded names); missing ones are fine."""
    for argv in (["ip", "link", "del", veth] if veth else None, ["ip", "netns", "del", netns] if netns else None):
        if argv is None:
            continue
        try:
            _ip(*argv)
        except NetworkError:
            pass  # already gone: deleting the namespace also deletes the veth pair


def read_stats(path: Path) -> dict[str, Any]:
    """The counters a proxy last wrote (see `Stats`)."""
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _main(proxy: Proxy) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await proxy.serve(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployer.netsim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("proxy", help="Delay, count and optionally cut TCP connections to one server.")
    run.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept connections on.")
    run.add_argument("--to", type=_address, required=True, help="HOST:PORT of the server.")
    run.add_argument("--delay-ms", type=float, default=0.0, help="Added to each direction (the RTT gains twice).")
    run.add_argument("--stats", type=Path, required=True, help="JSON file of the counters.")
    run.add_argument("--cut-after-bytes", type=int, default=0, help="Reset a connection once this many "
                     "client->server bytes have arrived on it (0: never).")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.cut_after_bytes < 0:
        parser.error("--delay-ms and --cut-after-bytes must not be negative")
    proxy = Proxy(args.listen, args.to, delay_ms=args.delay_ms, stats=args.stats,
                  cut_after_bytes=args.cut_after_bytes)
    asyncio.run(_main(proxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
