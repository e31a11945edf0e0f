#!/usr/bin/env python3
"""Load generator of the benchmark suite: the client's view of a migration.

Usage:
  loadgen.py --proto http|redis --port P [--path /x] [--conns N] [--rate R]
             [--duration S] [--interval 0.1] --out FILE.json
             (--host ADDR | --migrun BIN --roots R1,R2 --id ID [--host 127.0.0.1]
              | --docker-hosts SOCK1,SOCK2 --docker-name NAME [--host 127.0.0.1])

Why not wrk: wrk prints a summary at the end, not throughput over time, and
it cannot follow a container whose network namespace changes when it moves
(its connections live in the old namespace). This client keeps N
connections busy (closed loop, or R requests/s in total when --rate is set)
and records every answer's completion time and latency.

Where it connects:
  --host ADDR alone            a service address (e.g. issue 6's addresses on
                               the test-bed bridge), from the caller's netns
  --migrun BIN --roots --id    the container's own network namespace: the
                               container is looked up under each --root
                               (`migrun state`, status running), and every
                               new connection is made inside
                               /proc/PID/ns/net (setns); after a failure the
                               container is looked up again, so the client
                               follows it to the host it moved to. A failure
                               or a pause while it moves counts as downtime
                               seen by the client.
  --docker-hosts --docker-name the same for a Docker container: NAME is
                               looked up on each daemon (unix:///PATH.sock,
                               the Engine API's inspect, as `docker inspect`:
                               running, its pid), then as above.

Protocols: http (GET --path over keep-alive HTTP/1.1, 2xx counts as success)
and redis (SET key:N VALUE with --value-size bytes over RESP, +OK counts).
A failed request (error, timeout, bad answer) is counted and the connection
made again; the request is then sent anew (a new request). In netns mode the
client watches the container's process: when it ends (the container moved),
every connection into the old namespace is dropped and its request sent
again in the new one, timed from its first sending (with a service address
and migrated TCP connections the request would be delayed the same way);
those are counted as requests_resent_after_move, not as failures. A
connection attempt that fails while the container is away counts once as a
failed request; while no host runs the container the client waits and
tries again (the longest stall shows it).

Output JSON: start (epoch s), per-interval successes and failures, latency
p50/p99/max over all successes, failures, longest stall (the longest time
without any successful answer, in ms, with its start), requests/s.
"""

import argparse
import asyncio
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path):
    """Moves the calling thread into the network namespace at path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


def docker_inspect(host, name, timeout=2.0):
    """`docker inspect NAME` on the daemon at host (unix:///PATH.sock): the
    container's JSON, or None if the daemon does not know it. Straight to the
    Engine API: no docker process per lookup."""
    path = host[len("unix://"):] if host.startswith("unix://") else host
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(f"GET /containers/{urllib.parse.quote(name, safe='')}/json HTTP/1.0\r\n"
                  "Host: docker\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(None, 2)
    if len(parts) < 2 or parts[1] != b"200":
        return None
    return json.loads(body)


class Target:
    """Where to connect: a fixed address, or a migrun container's netns."""

    def __init__(self, args):
        self.args = args
        self.host = args.host or "127.0.0.1"
        self.own_ns = "/proc/self/ns/net"
        # keep our own namespace reachable (to come back to it)
        self.own_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.netns = None
        self.pid = None
        self.lookups = 0
        # bumped when the container's process is gone (it moved)
        self.generation = 0
        self.writers = set()
        self.moves = 0

    def gone(self):
        """Whether the process we connect through has ended."""
        if not self.pid:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    def moved(self):
        """The container's process ended: drop every connection into its netns."""
        self.generation += 1
        self.moves += 1
        self.pid = self.netns = None
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()

    def resolve(self):
        """Finds the running container; returns False if none is running."""
        a = self.args
        if not a.id and not a.docker_name:
            return True
        self.lookups += 1
        if a.docker_name:
            return self.resolve_docker()
        for root in a.roots.split(","):
            try:
                out = subprocess.run([a.migrun, "--root", root, "state", a.id],
                                     capture_output=True, timeout=5, check=False)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode != 0:
                continue
            try:
                st = json.loads(out.stdout)
            except ValueError:
                continue
            pid = st.get("pid") or 0
            if st.get("status") == "running" and pid > 0 and os.path.exists(f"/proc/{pid}/ns/net"):
                self.pid = pid
                self.netns = f"/proc/{pid}/ns/net"
                return True
        self.pid = self.netns = None
        return False

    def resolve_docker(self):
        """resolve() for a Docker container: each daemon of --docker-hosts."""
        a = self.args
        for host in a.docker_hosts.split(","):
            try:
                st = docker_inspect(host, a.docker_name)
            except (OSError, ValueError):
                continue
            state = (st or {}).get("State") or {}
            pid = state.get("Pid") or 0
            if state.get("Running") and not state.get("Paused") and pid > 0 \
                    and os.path.exists(f"/proc/{pid}/ns/net"):
                self.pid = pid
                self.netns = f"/proc/{pid}/ns/net"
                return True
        self.pid = self.netns = None
        return False

    def socket(self):
        """A new TCP socket in the target's network namespace."""
        if self.args.follow:
            if self.netns is None:
                raise OSError("container not running")
            setns(self.netns)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        return s


class Stats:
    def __init__(self, interval):
        self.t0 = time.time()
        self.m0 = time.monotonic()
        self.interval = interval
        self.ok = {}
        self.fail = {}
        self.lat = []
        self.failures = []
        self.last_ok = None
        self.stall = (0.0, 0.0)  # (length s, start s)
        self.retried = 0

    def bucket(self, now):
        return int((now - self.m0) / self.interval)

    def success(self, start, end):
        b = self.bucket(end)
        self.ok[b] = self.ok.get(b, 0) + 1
        self.lat.append(end - start)
        if self.last_ok is not None and end - self.last_ok > self.stall[0]:
            self.stall = (end - self.last_ok, self.last_ok - self.m0)
        self.last_ok = end

    def failure(self, now, what):
        b = self.bucket(now)
        self.fail[b] = self.fail.get(b, 0) + 1
        if len(self.failures) < 200:
            self.failures.append({"t": round(now - self.m0, 4), "error": what[:160]})


def http_request(path, host):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: migrun-loadgen\r\n\r\n".encode()


async def read_http(reader):
    """Reads one HTTP/1.1 response; returns its status code."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed")
    parts = line.split()
    if len(parts) < 2:
        raise ConnectionError(f"bad status line {line[:40]!r}")
    status = int(parts[1])
    length = None
    chunked = False
    while True:
        h = await reader.readline()
        if not h:
            raise ConnectionError("connection closed in headers")
        if h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v.strip())
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        # no length: the body ends with the connection (CGI under busybox)
        await reader.read()
        raise EOFError(status)
    return status


async def watcher(target, stop):
    """Notices that the container's process ended (it moved to another host)."""
    while not stop.is_set():
        await asyncio.sleep(0.02)
        if target.gone():
            target.moved()


async def worker(n, args, target, stats, stop, pace):
    reader = writer = None
    seq = n * 1_000_000
    value = b"v" * args.value_size
    retry_start = None
    while not stop.is_set():
        if pace is not None and retry_start is None:
            await pace.get()
        if writer is None:
            try:
                if args.follow and target.netns is None and not target.resolve():
                    # between two hosts: a client of a service address would
                    # see its SYN retried; here it waits (the stall counts it)
                    if retry_start is None:
                        retry_start = time.monotonic()
                    await asyncio.sleep(args.retry_delay)
                    continue
                s = target.socket()
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (target.host, args.port)),
                                       args.timeout)
                reader, writer = await asyncio.open_connection(sock=s, limit=1 << 20)
                target.writers.add(writer)
            except (OSError, asyncio.TimeoutError, ValueError) as e:
                if retry_start is None:
                    stats.failure(time.monotonic(), f"connect: {e!r}")
                    retry_start = time.monotonic()
                target.netns = None
                writer = None
                await asyncio.sleep(args.retry_delay)
                continue
        start = retry_start if retry_start is not None else time.monotonic()
        gen = target.generation
        seq += 1
        try:
            if args.proto == "http":
                q = args.path.format(n=seq % args.path_count) if args.path_count else args.path
                if args.query:
                    q = f"{q}{'&' if '?' in q else '?'}n={seq % 100000}"
                writer.write(http_request(q, target.host))
                try:
                    status = await asyncio.wait_for(read_http(reader), args.timeout)
                    keep = True
                except EOFError as e:
                    status, keep = e.args[0], False
                if not 200 <= status < 300:
                    raise ConnectionError(f"HTTP {status}")
                if not keep:
                    target.writers.discard(writer)
                    writer.close()
                    writer = None
            else:
                key = f"key:{seq % args.keys}".encode()
                writer.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
                line = await asyncio.wait_for(reader.readline(), args.timeout)
                if line != b"+OK\r\n":
                    raise ConnectionError(f"redis answered {line[:40]!r}")
            stats.success(start, time.monotonic())
            retry_start = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError) as e:
            if gen != target.generation:
                # the container moved under this request: sent again on a
                # new connection (a migrated TCP connection would carry it)
                stats.retried += 1
                retry_start = start
            else:
                stats.failure(time.monotonic(), f"{type(e).__name__}: {e}")
                retry_start = None
                target.netns = None
            if writer is not None:
                target.writers.discard(writer)
                writer.close()
            writer = None
            await asyncio.sleep(args.retry_delay)
    if writer is not None:
        writer.close()


async def pacer(queue, rate, stop):
    """Puts `rate` tokens per second into queue (open loop up to the queue's size)."""
    step = 1.0 / rate
    nxt = time.monotonic()
    while not stop.is_set():
        nxt += step
        d = nxt - time.monotonic()
        if d > 0:
            await asyncio.sleep(d)
        try:
            queue.put_nowait(1)
        except asyncio.QueueFull:
            pass


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proto", choices=["http", "redis"], default="http")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--query", action="store_true", help="append ?n=SEQ to the path")
    ap.add_argument("--path-count", type=int, default=0,
                    help="the path's {n} is replaced by the request number modulo this")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s in total (0: closed loop)")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds (0: until SIGTERM/SIGINT)")
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--retry-delay", type=float, default=0.01)
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--migrun")
    ap.add_argument("--roots", default="")
    ap.add_argument("--id")
    ap.add_argument("--docker-hosts", default="", help="Docker daemons to look --docker-name up in (comma-separated)")
    ap.add_argument("--docker-name", help="follow this Docker container (name or id)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready-file", help="written once the first answer arrived")
    args = ap.parse_args()
    if args.id and not (args.migrun and args.roots):
        ap.error("--id needs --migrun and --roots")
    if args.docker_name and not args.docker_hosts:
        ap.error("--docker-name needs --docker-hosts")
    if args.id and args.docker_name:
        ap.error("give --id or --docker-name, not both")
    if not args.id and not args.docker_name and not args.host:
        ap.error("give --host, --migrun/--roots/--id or --docker-hosts/--docker-name")
    # follow a container (its netns, looked up again when it moves)
    args.follow = bool(args.id or args.docker_name)

    target = Target(args)
    stats = Stats(args.interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pace = asyncio.Queue(maxsize=max(1, args.conns)) if args.rate > 0 else None
    tasks = [asyncio.create_task(worker(i, args, target, stats, stop, pace)) for i in range(args.conns)]
    if pace is not None:
        tasks.append(asyncio.create_task(pacer(pace, args.rate, stop)))
    if args.follow:
        tasks.append(asyncio.create_task(watcher(target, stop)))
    ready_written = False
    end = stats.m0 + args.duration if args.duration > 0 else None
    while not stop.is_set():
        await asyncio.sleep(0.05)
        if args.ready_file and not ready_written and stats.lat:
            with open(args.ready_file, "w") as f:
                f.write("ready\n")
            ready_written = True
        if end is not None and time.monotonic() >= end:
            stop.set()
    m1 = time.monotonic()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # a stall still going on at the end counts up to the end
    if stats.last_ok is not None and m1 - stats.last_ok > stats.stall[0]:
        stats.stall = (m1 - stats.last_ok, stats.last_ok - stats.m0)
    n_buckets = stats.bucket(m1) + 1
    elapsed = m1 - stats.m0
    ms = lambda x: None if x is None else round(x * 1000, 3)
    out = {
        "proto": args.proto,
        "connects_via": (f"netns of container {args.id} (migrun state under {args.roots}), {target.host}:{args.port}"
                         if args.id else
                         f"netns of Docker container {args.docker_name} (inspect on {args.docker_hosts}), "
                         f"{target.host}:{args.port}"
                         if args.docker_name else f"{args.host}:{args.port} from the caller's netns"),
        "conns": args.conns,
        "rate_limit": args.rate,
        "start_epoch": stats.t0,
        "duration_s": round(elapsed, 3),
        "interval_s": args.interval,
        "requests_ok": len(stats.lat),
        "requests_failed": sum(stats.fail.values()),
        "requests_per_s": round(len(stats.lat) / elapsed, 2) if elapsed > 0 else 0,
        "latency_ms": {"p50": ms(percentile(stats.lat, 50)), "p99": ms(percentile(stats.lat, 99)),
                       "max": ms(max(stats.lat) if stats.lat else None)},
        "longest_stall_ms": ms(stats.stall[0]),
        "longest_stall_start_s": round(stats.stall[1], 4),
        "target_lookups": target.lookups,
        "container_moves_seen": target.moves,
        "requests_resent_after_move": stats.retried,
        "timeline": {"ok": [stats.ok.get(i, 0) for i in range(n_buckets)],
                     "failed": [stats.fail.get(i, 0) for i in range(n_buckets)]},
        "failures": stats.failures,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
        f.write("\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
