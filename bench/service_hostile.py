"""Hostile and heavy requests against a live service (issue 11): statuses, /health latency, memory, /metrics.

    .venv/bin/python -m bench.service_hostile --models-dir models

Starts `python -m service` on 127.0.0.1 (a free port) and records the resident memory of its process
(VmRSS, sampled every 50 ms in a thread). Then, for each class of hostile request, runs `--clients`
concurrent hostile clients (raw HTTP/1.1 over asyncio sockets: some bodies are bytes no HTTP library
sends) next to two ordinary clients in a separate process (so that the load generator's own work does
not delay them): one polls GET /health, the other POSTs a 28x28 PNG to /encode. Per class: the statuses
of the hostile responses, GET /health p50/p99/worst, the peak RSS during the class and the RSS once the
server is quiet again, and the size and fetch time of GET /metrics. The auth class runs against a second
server with an API key. Every loop is bounded in count and time; traffic goes to 127.0.0.1 only.
Also the median latency of POST /log-likelihood for one image at samples=1000 (one client).
`--quick` runs every class briefly. Records its section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing as mp
import os
import random
import resource
import socket
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.bodies import image_parts, multipart_type
from bench.bodies import multipart as multipart_body
from bench.servers import cpu_seconds, free_port, rss_mb

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BOUNDARY = "hostilebench"

# Goals of issue 11.
GOAL_HEALTH_P99_MS = 20.0
GOAL_PEAK_RSS_MB = 400.0
GOAL_RSS_BACK_MB = 50.0
GOAL_METRICS_BYTES = 1_000_000
GOAL_METRICS_MS = 50.0
GOAL_LOGLIK_MS = 40.0


# --------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/bench/test_service_hostile.py)
# --------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def format_statuses(counts: Counter) -> str:
    """'200: 3, 422: 5, reset: 1': HTTP codes in numeric order, then the transport outcomes by name."""
    if not counts:
        return "-"
    codes = sorted(k for k in counts if isinstance(k, int))
    other = sorted((k for k in counts if not isinstance(k, int)), key=str)
    return ", ".join(f"{k}: {counts[k]}" for k in [*codes, *other])


def count_5xx(counts: Counter) -> int:
    return sum(n for k, n in counts.items() if isinstance(k, int) and k >= 500)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of an HTTP/1.1 response head (without the final blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return int(parts[1]), headers


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """The raw bytes of one HTTP/1.1 request (keep-alive), built once and sent many times."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------------------------------
# A small HTTP/1.1 client (asyncio) for the hostile traffic
# --------------------------------------------------------------------------------------------------


class RawConn:
    """One keep-alive connection; `send` returns (status or 'reset' / 'timeout', body)."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def send(self, raw: bytes) -> tuple[int | str, bytes]:
        """Send on the kept connection; when the server had closed it (after its previous answer), once more on
        a fresh one, so that a connection closed after one request's answer is not blamed on the next."""
        reused = self.writer is not None
        status, body = await self._attempt(raw)
        if status == "reset" and reused:
            status, body = await self._attempt(raw)
        return status, body

    async def _attempt(self, raw: bytes) -> tuple[int | str, bytes]:
        try:
            return await asyncio.wait_for(self._send(raw), self.timeout)
        except TimeoutError:
            await self.close()
            return "timeout", b""
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await self.close()
            return "reset", b""

    async def _send(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
        self.writer.write(raw)  # not drained: the server may answer (413) before it has read the body
        status, headers = parse_head((await self.reader.readuntil(b"\r\n\r\n"))[:-4])
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(c[:-2] for c in chunks)
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close" or self.writer.transport.get_write_buffer_size():
            await self.close()  # the server did not read all of the body: this connection is done
        return status, body


# --------------------------------------------------------------------------------------------------
# The ordinary clients: a separate process, blocking sockets, one thread each
# --------------------------------------------------------------------------------------------------


def _blocking_send(sock_file: list, port: int, raw: bytes, timeout: float) -> int | str:
    """Send `raw` on the kept connection sock_file[0] (reconnecting when needed); the status."""
    try:
        if sock_file[0] is None:
            s = socket.create_connection((HOST, port), timeout=timeout)
            sock_file[0] = (s, s.makefile("rb"))
        s, f = sock_file[0]
        s.sendall(raw)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = f.readline(65536)
            if not line:
                raise ConnectionError("closed")
            head += line
        status, headers = parse_head(head[:-4])
        f.read(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            raise ConnectionError("closed by the server")
        return status
    except (OSError, ValueError) as e:
        if sock_file[0] is not None:
            with contextlib.suppress(OSError):
                sock_file[0][0].close()
            sock_file[0] = None
        return "timeout" if isinstance(e, TimeoutError | socket.timeout) else "reset"


def ordinary_clients(port: int, headers: dict[str, str], encode_body: bytes, encode_ctype: str, pause: float,
                     max_seconds: float, started, stop, results) -> None:
    """Poll GET /health and POST /encode until `stop` (or `max_seconds`); send the figures to `results`."""
    health_raw = http_request("GET", "/health")
    encode_raw = http_request("POST", "/encode", encode_body, {**headers, "Content-Type": encode_ctype})
    latencies: list[float] = []
    health_status: Counter = Counter()
    encode_status: Counter = Counter()
    encode_lat: list[float] = []
    deadline = time.monotonic() + max_seconds

    def loop(raw, statuses, lat, first=None):
        conn = [None]
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            status = _blocking_send(conn, port, raw, timeout=30.0)
            lat.append((time.perf_counter() - t0) * 1000)
            statuses[status] += 1
            if first is not None:
                first.set()
            time.sleep(pause)
        if conn[0] is not None:
            conn[0][0].close()

    t = threading.Thread(target=loop, args=(encode_raw, encode_status, encode_lat), daemon=True)
    t.start()
    loop(health_raw, health_status, latencies, started)
    t.join(60)
    results.send({"health_ms": latencies, "health_status": dict(health_status), "encode_status": dict(encode_status),
                  "encode_ms": encode_lat})


# --------------------------------------------------------------------------------------------------
# The server and its memory
# --------------------------------------------------------------------------------------------------


class Server:
    """`python -m service` on 127.0.0.1 with an RSS sampler; `rss_abort_mb` protects a shared machine."""

    def __init__(self, models_dir: Path, log_path: Path, rss_abort_mb: float, **env: str):
        self.models_dir, self.log_path, self.rss_abort_mb, self.env = models_dir, log_path, rss_abort_mb, env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.peak = 0.0
        self.killed_at: float | None = None
        self._stop = threading.Event()

    def start(self, timeout: float = 180.0) -> Server:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
        env.update({"LATENTSERVE_MODELS_DIR": str(self.models_dir), "LATENTSERVE_HOST": HOST,
                    "LATENTSERVE_PORT": str(self.port), "LATENTSERVE_LOG_LEVEL": "warning",
                    **{f"LATENTSERVE_{k.upper()}": v for k, v in self.env.items()}})
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        raw = http_request("GET", "/ready")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            if _blocking_send([None], self.port, raw, 2.0) == 200:
                self._stop.clear()
                threading.Thread(target=self._sample, daemon=True).start()
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout:g} s; see {self.log_path}")

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            r = rss_mb(self.proc.pid)
            if r == r:
                self.peak = max(self.peak, r)
                if r > self.rss_abort_mb:
                    self.killed_at = r
                    self.proc.kill()
                    return
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> float:
        return rss_mb(self.proc.pid) if self.alive() else float("nan")

    def wait_quiet(self, min_s: float, max_s: float) -> tuple[float, bool]:
        """Wait until the server uses under 5 % of a core over 0.5 s (bounded): seconds waited, whether quiet."""
        t0 = time.monotonic()
        time.sleep(min_s)
        while self.alive() and time.monotonic() - t0 < max_s:
            c0 = cpu_seconds(self.proc.pid)
            time.sleep(0.5)
            if cpu_seconds(self.proc.pid) - c0 < 0.025:
                return time.monotonic() - t0, True
        return time.monotonic() - t0, False

    def stop(self) -> None:
        self._stop.set()
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --------------------------------------------------------------------------------------------------
# The request bodies (built once)
# --------------------------------------------------------------------------------------------------


def _png(array, fmt: str = "PNG", **save) -> bytes:
    """An image file of `array`; Pillow picks the mode from the dtype (bool: "1", uint16: "I;16", int32: "I")."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save)
    return buf.getvalue()


def digit(seed: int = 0):
    import numpy as np

    return (np.random.default_rng(seed).random((28, 28)) * 255).astype(np.uint8)


def multipart(files: list[tuple[bytes, str]], disposition: str | None = None) -> bytes:
    """A multipart body of file parts named `images`; `disposition` replaces the parameters after form-data."""
    parts = image_parts(files) if disposition is None else [(data, disposition) for data, _ in files]
    return multipart_body(parts, BOUNDARY)


MP = multipart_type(BOUNDARY)
JSON = {"Content-Type": "application/json"}


# Requests per client of the classes whose requests are cheap to answer: those run for their time limit,
# so that /health is polled long enough next to them.
CHEAP = 2000
# Requests per client of the classes that cost the server work (big bodies, big answers): as many as their
# time limit allows once the server refuses them early, a handful when it does the work.
HEAVY = 200


@dataclass
class HostileClass:
    key: str
    title: str
    sends: str
    variants: list[tuple[str, bytes]]  # (label, raw request), sent round-robin
    count: int  # requests per client
    seconds: float
    timeout: float = 60.0
    server: str = "main"
    stats: dict = field(default_factory=dict)


def build_classes(args) -> list[HostileClass]:
    import numpy as np

    q = args.quick
    png = _png(digit())
    bad = b"this is not an image"

    def c(n):  # requests per client (quick: fewer)
        return max(1, n // 8) if q else n

    def t(s):
        return max(3.0, s / 5) if q else s

    classes = [HostileClass("control", "0 control", "nothing: the ordinary clients alone (this machine's baseline)",
                            [], 1, t(10))]
    # 1 deep JSON
    depth = 100_000
    deep = b"[" * depth + b"]" * depth
    classes.append(HostileClass(
        "deep-json", "1 deep JSON", f"JSON nested {depth:,} levels to /encode, /decode, /log-likelihood",
        [("/encode", http_request("POST", "/encode", b'{"images":' + deep + b"}", JSON)),
         ("/decode", http_request("POST", "/decode", b'{"z":' + deep + b"}", JSON)),
         ("/log-likelihood", http_request("POST", "/log-likelihood", b'{"images":' + deep + b"}", JSON))],
        c(CHEAP), t(8)))
    # 2 huge numbers
    digits = b"1" * 5000
    row = b"[" + b",".join([b"0"] * 27) + b","
    classes.append(HostileClass(
        "numbers", "2 huge JSON numbers", "a 5,000-digit JSON integer (and float) as a pixel and as z; a 400-digit "
        "integer (too large for a float) in a 28x28 pixel array",
        [("5000-digit int pixel", http_request("POST", "/encode", b'{"images":[[' + digits + b"]]}", JSON)),
         ("5000-digit float pixel", http_request("POST", "/encode", b'{"images":[[0.' + digits + b"e1]]}", JSON)),
         ("5000-digit int z", http_request("POST", "/decode", b'{"z":[[' + digits + b"]]}", JSON)),
         ("1e400 int in 28x28", http_request("POST", "/encode", b'{"images":[[' + row + b"1" + b"0" * 400 + b"]"
                                             + (b"," + row + b"0]") * 27 + b"]]}", JSON)),
         ("1e400 int z", http_request("POST", "/decode", b'{"z":[[1' + b"0" * 400 + b"]]}", JSON))],
        c(CHEAP), t(8)))
    # 3 multipart RFC 2231 parameters
    charsets = [("unknown charset", "x-unknown-bench", "%41.png", png),
                ("charset 'undefined'", "undefined", "%41.png", png),
                ("charset punycode", "punycode", "%41-%7a.png", png),
                ("charset rot13 (not text)", "rot13", "%41.png", png),
                ("utf-7 lone surrogate, good image", "utf-7", "%2B2AA-.png", png),
                ("unicode_escape lone surrogate, bad image", "unicode_escape", "%5Cud800.png", bad)]
    variants = [(f"filename*= {label}", http_request("POST", "/encode", multipart(
        [(data, "")], disposition=f"name=\"images\"; filename*={cs}''{value}"), {"Content-Type": MP}))
        for label, cs, value, data in charsets]
    for label, cs in (("unknown charset", "x-unknown-bench"), ("charset 'undefined'", "undefined"),
                      ("charset punycode", "punycode")):
        variants.append((f"boundary*= {label}", http_request("POST", "/encode", multipart([(png, "d.png")]), {
            "Content-Type": f"multipart/form-data; boundary*={cs}''{BOUNDARY}%41"})))
    classes.append(HostileClass("multipart", "3 multipart RFC 2231", "POST /encode with `filename*=` / `boundary*=` "
                                "in unknown, non-text or odd charsets and charsets giving lone surrogates, with a "
                                "good and a bad image", variants, c(CHEAP), t(8)))
    # 4 decode stall: one-bit 2048x2048 PNGs
    one_bit = _png(np.zeros((2048, 2048), dtype=bool), optimize=True)
    files = [(one_bit, f"b{i}.png") for i in range(64)]
    body = multipart(files)
    classes.append(HostileClass(
        "decode-stall", "4 one-bit 2048x2048 PNGs",
        f"POST /encode with 64 one-bit 2048x2048 PNGs ({len(body) / 1024:.0f} KB)",
        [("64 x 1-bit 2048^2", http_request("POST", "/encode", body, {"Content-Type": MP}))], c(HEAVY), t(30)))
    # 5 8 MiB /decode body of tiny rows
    rows = 2_000_000
    body = b'{"z":[' + b",".join([b"[0]"] * rows) + b"]}"
    classes.append(HostileClass(
        "decode-rows", "5 /decode 2M tiny rows", f"POST /decode with {rows:,} rows `[0]` ({len(body) / 2**20:.1f} MiB)",
        [("2M rows", http_request("POST", "/decode", body, JSON))], c(HEAVY), t(30)))
    # 6 big sample canvas
    classes.append(HostileClass(
        "sample-canvas", "6 /sample n=256 scale=16", "GET /sample?n=256&scale=16&format=png (a 7168x7168 canvas)",
        [("n=256 scale=16 png", http_request("GET", "/sample?n=256&scale=16&format=png"))],
        c(HEAVY), t(30)))
    # 7 big JSON image
    side = 1400
    line = b"[" + b",".join([b"0.5"] * side) + b"]"
    body = b'{"images":[[' + b",".join([line] * side) + b"]]}"
    classes.append(HostileClass(
        "json-image", "7 1400x1400 JSON image", f"POST /encode with one {side}x{side} JSON image "
        f"({len(body) / 2**20:.1f} MiB)", [("1400x1400", http_request("POST", "/encode", body, JSON))], c(HEAVY),
        t(30)))
    # 8 log-likelihood memory and work
    body = multipart([(_png(digit(i)), f"d{i}.png") for i in range(16)])
    classes.append(HostileClass(
        "loglik-work", "8 /log-likelihood S=5000 x 16", "POST /log-likelihood?samples=5000 with 16 images",
        [("S=5000 x 16", http_request("POST", "/log-likelihood?samples=5000", body, {"Content-Type": MP}))],
        c(4), t(30), timeout=60.0))
    # 9 unknown model names
    n_names = args.unknown_names
    per = max(1, n_names // args.clients)
    rng = random.Random(0)
    names = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=16)) for _ in range(per * args.clients)]
    classes.append(HostileClass(
        "unknown-names", "9 unknown model names", f"{per * args.clients:,} GET /sample?model=<random 16 characters>",
        [(f"name {i}", http_request("GET", f"/sample?model={n}&n=1")) for i, n in enumerate(names)], per,
        30.0 if q else 90.0))
    # 10 auth (a second server with an API key)
    routes = ["/encode", "/decode", "/sample", "/log-likelihood", "/models", "/models/ppca-mnist", "/metrics",
              "/openapi.json", "/nonexistent"]
    variants = [(f"OPTIONS {r}", http_request("OPTIONS", r)) for r in routes]
    variants += [(f"empty X-API-Key {r}", http_request("GET", r, headers={"X-API-Key": ""}))
                 for r in ("/models", "/metrics", "/sample?n=1")]
    variants += [("empty Bearer /models", http_request("GET", "/models", headers={"Authorization": "Bearer "}))]
    variants += [("empty X-API-Key POST /encode", http_request("POST", "/encode", multipart([(png, "d.png")]), {
        "Content-Type": MP, "X-API-Key": ""}))]
    classes.append(HostileClass("auth", "10 auth", "against a server with LATENTSERVE_API_KEY set: OPTIONS on each "
                                "route and empty X-API-Key / Bearer, no key (goal: every answer 401)", variants,
                                c(CHEAP), t(8), server="auth"))
    # 11 slow clients (special-cased in run_class)
    classes.append(HostileClass(
        "slow-clients", "11 slow clients", f"{args.slow_connections:,} connections sending one byte a second for "
        f"{args.slow_seconds:g} s (half in the headers, half in a declared 100 KB body)", [], 1, args.slow_seconds))
    # 12 pixel types
    u8 = digit(1) // 2  # max <= 127: a 16-bit copy scaled by its own maximum would double every value
    i32 = u8.astype(np.int32) * 16843009
    f32 = u8.astype(np.float32) / 255
    strings = json.dumps({"images": [[[str(v / 255) for v in r] for r in u8.tolist()]]}).encode()
    bools = json.dumps({"images": [[[bool(v > 60) for v in r] for r in u8.tolist()]]}).encode()
    variants = [("16-bit PNG", http_request("POST", "/encode", multipart([(_png(u8.astype(np.uint16)), "a.png")]),
                                            {"Content-Type": MP})),
                ("32-bit int TIFF", http_request("POST", "/encode", multipart([(_png(i32, "TIFF"), "a.tif")]),
                                                 {"Content-Type": MP})),
                ("32-bit float TIFF", http_request("POST", "/encode", multipart([(_png(f32, "TIFF"), "a.tif")]),
                                                   {"Content-Type": MP})),
                ("JSON strings", http_request("POST", "/encode", strings, JSON)),
                ("JSON booleans", http_request("POST", "/encode", bools, JSON))]
    classes.append(HostileClass("pixels", "12 pixel types", "POST /encode with 16-bit PNG, 32-bit int and float "
                                "TIFF, and JSON pixels as strings or booleans (goal: JSON strings/booleans 422)",
                                variants, c(CHEAP), t(8)))
    return classes


# --------------------------------------------------------------------------------------------------
# Running a class
# --------------------------------------------------------------------------------------------------


async def hostile_traffic(cls: HostileClass, port: int, clients: int) -> dict[str, Counter]:
    """`clients` workers send the class's requests round-robin, each at most `cls.count` and `cls.seconds`."""
    per_variant: dict[str, Counter] = {label: Counter() for label, _ in cls.variants}
    deadline = time.monotonic() + cls.seconds

    async def worker(w: int) -> None:
        conn = RawConn(port, cls.timeout)
        try:
            for i in range(cls.count):
                if time.monotonic() >= deadline:
                    break
                label, raw = cls.variants[(w * cls.count + i) % len(cls.variants)]
                status, _ = await conn.send(raw)
                per_variant[label][status] += 1
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(clients)))
    return {k: v for k, v in per_variant.items() if v}


async def slow_traffic(port: int, connections: int, seconds: float) -> dict[str, Counter]:
    """Connections that send one byte a second; at the end, what the server had done with each."""
    head = http_request("POST", "/encode", b"", {"Content-Type": MP})
    body_head = http_request("POST", "/encode", b"", {"Content-Type": MP}).replace(
        b"Content-Length: 0", b"Content-Length: 100000")
    outcome: dict[str, Counter] = {"slow headers": Counter(), "slow body": Counter()}
    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        label = "slow headers" if i % 2 == 0 else "slow body"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
        except (OSError, TimeoutError):
            outcome[label]["connect failed"] += 1
            return
        try:
            if label == "slow body":
                writer.write(body_head)
            data = head if label == "slow headers" else b"x" * 100000
            pos = 0
            read = asyncio.ensure_future(reader.read(1024))
            while time.monotonic() < deadline:
                if read.done():
                    break
                writer.write(data[pos:pos + 1])
                pos += 1
                await asyncio.wait([read], timeout=1.0)
            if read.done():
                got = read.result() if not read.exception() else b""
                outcome[label][parse_status(got) if got else "closed by server"] += 1
            else:
                read.cancel()
                outcome[label]["open at the end"] += 1
        except (ConnectionError, OSError):
            outcome[label]["reset"] += 1
        finally:
            writer.transport.abort()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return outcome


def parse_status(data: bytes) -> int | str:
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "garbage"


def fetch(port: int, raw: bytes, timeout: float = 60.0) -> tuple[int | str, bytes, float]:
    """One request on a fresh connection: status, body, milliseconds."""
    async def go():
        conn = RawConn(port, timeout)
        t0 = time.perf_counter()
        status, body = await conn.send(raw)
        ms = (time.perf_counter() - t0) * 1000
        await conn.close()
        return status, body, ms

    return asyncio.run(go())


def metrics_figures(port: int, headers: dict[str, str], tries: int) -> tuple[int, float]:
    """Size in bytes of GET /metrics and the best of `tries` fetch times (ms)."""
    raw = http_request("GET", "/metrics", headers=headers)
    sizes, times = [], []
    for _ in range(tries):
        status, body, ms = fetch(port, raw)
        if status == 200:
            sizes.append(len(body))
            times.append(ms)
    return (max(sizes), min(times)) if sizes else (0, float("nan"))


def run_class(cls: HostileClass, server: Server, args, headers: dict[str, str], encode: tuple[bytes, str]) -> dict:
    ctx = mp.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    rx, tx = ctx.Pipe(duplex=False)
    max_s = cls.seconds + 180
    proc = ctx.Process(target=ordinary_clients, args=(server.port, headers, encode[0], encode[1], args.pause_ms / 1000,
                                                      max_s, started, stop, tx), daemon=True)
    proc.start()
    started.wait(60)
    start_rss = server.peak = server.rss()
    t0 = time.monotonic()
    if cls.key == "control":
        time.sleep(cls.seconds)
        statuses = {}
    elif cls.key == "slow-clients":
        statuses = asyncio.run(slow_traffic(server.port, args.slow_connections, cls.seconds))
    else:
        statuses = asyncio.run(hostile_traffic(cls, server.port, args.clients))
    wall = time.monotonic() - t0
    stop.set()
    ordinary = rx.recv() if rx.poll(90) else {"health_ms": [], "health_status": {}, "encode_status": {},
                                              "encode_ms": []}
    proc.join(10)
    peak = server.peak
    settle, quiet = server.wait_quiet(args.settle, args.quiet_max)
    after = server.rss()
    m_size, m_ms = (metrics_figures(server.port, headers, 3 if cls.key == "unknown-names" else 1) if server.alive()
                    else (0, float("nan")))
    total = Counter()
    for v in statuses.values():
        total.update(v)
    h = ordinary["health_ms"]
    return {"statuses": total, "variants": statuses, "wall": wall, "health_n": len(h),
            "health_p50": percentile(h, 50), "health_p99": percentile(h, 99),
            "health_max": max(h, default=float("nan")),
            "health_status": Counter(ordinary["health_status"]), "encode_status": Counter(ordinary["encode_status"]),
            "encode_p99": percentile(ordinary["encode_ms"], 99), "start": start_rss, "peak": peak, "after": after,
            "settle": settle,
            "metrics_bytes": m_size, "metrics_ms": m_ms, "killed_at": server.killed_at, "quiet": quiet,
            "alive": server.alive()}


def loglik_latency(port: int, model: str | None, calls: int) -> tuple[float, list[int | str]]:
    """Median ms of POST /log-likelihood?samples=1000 with one 28x28 PNG, one client, `calls` calls."""
    path = "/log-likelihood?samples=1000&seed=1" + (f"&model={model}" if model else "")
    raw = http_request("POST", path, multipart([(_png(digit(3)), "d.png")]), {"Content-Type": MP})

    async def go():
        conn = RawConn(port, 60)
        times, statuses = [], []
        for _ in range(calls + 2):
            t0 = time.perf_counter()
            status, _ = await conn.send(raw)
            times.append((time.perf_counter() - t0) * 1000)
            statuses.append(status)
        await conn.close()
        return times[2:], statuses

    times, statuses = asyncio.run(go())
    return percentile(times, 50), statuses


def pixel_scaling_check(port: int) -> str:
    """Do 16-bit PNGs and 32-bit float TIFFs encode as the intensities their type's range gives them?

    Each file is compared with a JSON image of the expected intensities (on ppca-mnist): equal latent means
    (to 1e-4) when the file is scaled by its type's range, not by its own maximum.
    """
    import numpy as np

    u8 = digit(1) // 2  # maximum 127
    cases = [("16-bit PNG, values up to 127 of 65535", _png(u8.astype(np.uint16)), u8 / 65535),
             ("16-bit PNG, values up to 127 * 257", _png(u8.astype(np.uint16) * 257), u8 / 255),
             ("32-bit float TIFF in [0, 0.5]", _png((u8 / 255).astype(np.float32), "TIFF"), u8 / 255)]
    out = []
    for label, data, expected in cases:
        means = []
        for raw in (http_request("POST", "/encode?model=ppca-mnist", multipart([(data, "a")]), {"Content-Type": MP}),
                    http_request("POST", "/encode?model=ppca-mnist", json.dumps(
                        {"images": [np.asarray(expected, dtype=np.float32).tolist()]}).encode(), JSON)):
            status, body, _ = fetch(port, raw)
            means.append(np.array(json.loads(body)["results"][0]["mean"]) if status == 200 else None)
        if means[0] is None or means[1] is None:
            out.append(f"{label}: not answered 200")
            continue
        diff = float(np.abs(means[0] - means[1]).max())
        out.append(f"{label}: {'yes' if diff < 1e-4 else '**no**'} (max difference of the latent means {diff:.2g})")
    return "; ".join(out)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def goals_row(cls: HostileClass, r: dict, baseline: float) -> list[str]:
    hostile = r["statuses"]
    if cls.key == "slow-clients":  # a 503 of a connection limit is an answer to the slow clients, not a failure
        hostile = Counter({k: n for k, n in hostile.items() if k != 503})
    fivexx = count_5xx(hostile) + count_5xx(r["encode_status"]) + count_5xx(r["health_status"])
    cells = [cls.title, verdict(fivexx == 0), verdict(r["health_p99"] <= GOAL_HEALTH_P99_MS),
             verdict(r["peak"] <= GOAL_PEAK_RSS_MB), verdict(r["after"] <= baseline + GOAL_RSS_BACK_MB)]
    if cls.key == "unknown-names":
        cells.append(verdict(r["metrics_bytes"] < GOAL_METRICS_BYTES and r["metrics_ms"] < GOAL_METRICS_MS))
    elif cls.key == "auth":
        cells.append(verdict(set(r["statuses"]) <= {401}) + " (every answer 401)")
    elif cls.key == "pixels":
        strict = [r["variants"].get(k, Counter()) for k in ("JSON strings", "JSON booleans")]
        cells.append(verdict(all(set(c) == {422} for c in strict)) + " (JSON strings/booleans 422)")
    else:
        cells.append("-")
    return cells


def report(classes: list[HostileClass], results: dict[str, dict], baselines: dict[str, float], extra: list[str],
           args) -> str:
    from bench.report import table

    models = sorted(d.name for d in args.models_dir.iterdir() if (d / "card.json").is_file())
    lines = [f"Models loaded: {', '.join(models)} (the default model answers). {args.clients} concurrent hostile "
             "clients per class (raw HTTP/1.1, asyncio) next to two ordinary clients in their own process: GET /health "
             f"and POST /encode (one 28x28 PNG) in a loop, {args.pause_ms:g} ms apart. RSS: VmRSS of the server "
             "process, sampled every 50 ms; *after*: once the server used under 5 % of a core for 0.5 s (at least "
             f"{args.settle:g} s, at most {args.quiet_max:g} s). Baseline RSS (after start-up and a few ordinary "
             "requests): " + ", ".join(f"{k} server {v:.0f} MB" for k, v in baselines.items()) + ". A class that "
             f"leaves the server busy or more than {GOAL_RSS_BACK_MB:g} MB above its baseline is followed by a "
             "fresh server, so that each row's figures are its own."
             + (" **Quick mode** (short, not for the record)." if args.quick else ""), ""]
    lines.append("| class | sends |\n| --- | --- |")
    lines += [f"| {c.title} | {c.sends} |" for c in classes if c.key in results]
    lines.append("")
    rows = []
    for c in classes:
        r = results.get(c.key)
        if r is None:
            continue
        note = ""
        if r["killed_at"]:
            note = f" (server killed by the bench at {r['killed_at']:.0f} MB)"
        elif not r["alive"]:
            note = " (server died)"
        elif not r["quiet"]:
            note = f" (server still busy {args.quiet_max:g} s after: restarted for the next class)"
        elif r["after"] > baselines["auth" if c.server == "auth" else "main"] + GOAL_RSS_BACK_MB:
            note = " (restarted for the next class)"
        rows.append([c.title, format_statuses(r["statuses"]) + note, count_5xx(r["statuses"]), f"{r['wall']:.1f}",
                     f"{r['health_p50']:.1f}", f"{r['health_p99']:.1f}", f"{r['health_max']:.0f}",
                     str(r["health_n"]) + ("" if set(r["health_status"]) <= {200}
                                           else f" ({format_statuses(r['health_status'])})"),
                     format_statuses(r["encode_status"]), f"{r['encode_p99']:.0f}", f"{r['start']:.0f}",
                     f"{r['peak']:.0f}",
                     f"{r['after']:.0f} ({r['settle']:.0f} s)", f"{r['metrics_bytes'] / 1024:.0f}",
                     f"{r['metrics_ms']:.0f}"])
    lines.append(table(["class", "hostile statuses", "5xx", "s", "/health p50 ms", "p99 ms", "worst ms", "polls",
                        "ordinary /encode statuses", "/encode p99 ms", "RSS at start MB", "peak RSS MB",
                        "RSS after MB (settle)",
                        "/metrics KB", "/metrics ms"], rows))
    lines += ["", "Goals per class: 0 responses of 5xx (hostile and ordinary; class 11: a 503 to a slow client from a "
              "connection limit is allowed); /health p99 <= "
              f"{GOAL_HEALTH_P99_MS:g} ms; peak RSS <= {GOAL_PEAK_RSS_MB:g} MB; RSS after within "
              f"{GOAL_RSS_BACK_MB:g} MB of the baseline; class 9: /metrics < 1 MB fetched in < {GOAL_METRICS_MS:g} ms.",
              ""]
    goal_rows = []
    for c in classes:
        if c.key in results:
            base = baselines["auth" if c.server == "auth" else "main"]
            goal_rows.append(goals_row(c, results[c.key], base))
    lines.append(table(["class", "0 5xx", "/health p99", "peak RSS", "RSS back", "class goal"], goal_rows))
    lines += ["", "Statuses per request variant:", ""]
    var_rows = []
    for c in classes:
        r = results.get(c.key)
        if r is None or c.key == "unknown-names":
            continue
        for label, counts in r["variants"].items():
            var_rows.append([c.title, label, format_statuses(counts)])
    lines.append(table(["class", "request", "statuses"], var_rows))
    lines += ["", *extra]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def warm_up(server: Server, headers: dict[str, str], encode: tuple[bytes, str]) -> float:
    raw = http_request("POST", "/encode", encode[0], {**headers, "Content-Type": encode[1]})
    for _ in range(20):
        fetch(server.port, raw)
    server.wait_quiet(1.0, 20.0)
    return server.rss()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--clients", type=int, default=8, help="concurrent hostile clients per class")
    p.add_argument("--classes", nargs="+", default=None, help="run only these classes (keys or numbers)")
    p.add_argument("--unknown-names", type=int, default=20_000, help="class 9: requests with random model names")
    p.add_argument("--slow-connections", type=int, default=1000, help="class 11: connections")
    p.add_argument("--slow-seconds", type=float, default=10.0, help="class 11: seconds of one byte a second")
    p.add_argument("--pause-ms", type=float, default=10.0, help="pause of each ordinary client between requests")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a class before RSS is read (at least)")
    p.add_argument("--quiet-max", type=float, default=45.0, help="at most this many seconds waiting for a quiet server")
    p.add_argument("--loglik-calls", type=int, default=30, help="calls of POST /log-likelihood samples=1000")
    p.add_argument("--rss-abort-mb", type=float, default=6000.0, help="kill the server above this RSS (a shared "
                   "machine); it is restarted for the next class")
    p.add_argument("--api-key", default="hostile-bench-key", help="the key of the auth class's server")
    p.add_argument("--quick", action="store_true", help="every class briefly (a smoke run; not recorded)")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.unknown_names = min(args.unknown_names, 2000)
        args.slow_connections = min(args.slow_connections, 200)
        args.slow_seconds = min(args.slow_seconds, 3.0)
        args.loglik_calls = min(args.loglik_calls, 5)
        args.settle = min(args.settle, 1.0)
        args.quiet_max = min(args.quiet_max, 15.0)
    for name in ("clients", "unknown_names", "slow_connections", "loglik_calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.slow_connections + 512
    if soft < want:  # this process and the servers it starts (inherited)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    key_header = {"X-API-Key": args.api_key}
    classes = build_classes(args)
    if args.classes:
        wanted = set(args.classes)
        classes = [c for c in classes if c.key in wanted or c.title.split()[0] in wanted]
    encode = (multipart([(_png(digit()), "d.png")]), MP)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    log_path = log_dir / f"service_hostile-{os.getpid()}.log"
    print(f"server log: {log_path}", flush=True)

    results: dict[str, dict] = {}
    baselines: dict[str, float] = {}
    extra: list[str] = []
    main_classes = [c for c in classes if c.server == "main"]
    auth_classes = [c for c in classes if c.server == "auth"]
    server = Server(args.models_dir, log_path, args.rss_abort_mb).start() if main_classes else None
    try:
        if server is not None:
            baselines["main"] = warm_up(server, {}, encode)
            print(f"baseline RSS {baselines['main']:.0f} MB", flush=True)
            for c in main_classes:
                last = results[list(results)[-1]] if results else None
                if not server.alive() or (last and (not last["quiet"] or last["after"] > baselines["main"]
                                                    + GOAL_RSS_BACK_MB)):
                    # Dead, still busy, or still holding memory after the previous class: a fresh server, so that
                    # each class's figures are its own.
                    server.stop()
                    server = Server(args.models_dir, log_path, args.rss_abort_mb).start()
                    warm_up(server, {}, encode)
                print(f"class {c.title}: {c.sends}", flush=True)
                results[c.key] = r = run_class(c, server, args, {}, encode)
                print(f"  statuses {format_statuses(r['statuses'])}; /health p50 {r['health_p50']:.1f} p99 "
                      f"{r['health_p99']:.1f} worst {r['health_max']:.0f} ms; peak {r['peak']:.0f} MB, after "
                      f"{r['after']:.0f} MB; /metrics {r['metrics_bytes'] / 1024:.0f} KB in {r['metrics_ms']:.0f} ms",
                      flush=True)
            last = results[list(results)[-1]] if results else None
            if not server.alive() or (last and not last["quiet"]):
                server.stop()
                server = Server(args.models_dir, log_path, args.rss_abort_mb).start()
            ll_rows = []
            for model in [None, "vae-mnist"]:
                if model and not (args.models_dir / model / "card.json").is_file():
                    continue
                med, statuses = loglik_latency(server.port, model, args.loglik_calls)
                ll_rows.append(f"| {model or 'default model'} | {med:.1f} | {format_statuses(Counter(statuses))} | "
                               f"{verdict(med <= GOAL_LOGLIK_MS)} |")
                print(f"log-likelihood samples=1000 ({model or 'default'}): median {med:.1f} ms", flush=True)
            extra += [f"POST /log-likelihood?samples=1000, one 28x28 PNG, one client, median of {args.loglik_calls} "
                      f"calls (goal <= {GOAL_LOGLIK_MS:g} ms):", "", "| model | median ms | statuses | goal |",
                      "| --- | --- | --- | --- |", *ll_rows, ""]
            if (args.models_dir / "ppca-mnist" / "card.json").is_file():
                extra.append("Images scaled by their type's range (class 12, on ppca-mnist against a JSON image of the "
                             "expected intensities): " + pixel_scaling_check(server.port) + ".")
            server.stop()
        if auth_classes:
            # An empty key: refused at start-up (the goal), or does it let an empty X-API-Key in?
            empty = Server(args.models_dir, log_path, args.rss_abort_mb, api_key="")
            try:
                empty.start(timeout=60)
                status, _, _ = fetch(empty.port, http_request("GET", "/models", headers={"X-API-Key": ""}))
                extra.append(f"LATENTSERVE_API_KEY= (empty): the server **started**; GET /models with an empty "
                             f"X-API-Key answered {status} (goal: refused at start-up).")
            except RuntimeError:
                extra.append("LATENTSERVE_API_KEY= (empty): refused at start-up (goal met).")
            finally:
                empty.stop()
            server = Server(args.models_dir, log_path, args.rss_abort_mb, api_key=args.api_key).start()
            baselines["auth"] = warm_up(server, key_header, encode)
            for c in auth_classes:
                print(f"class {c.title}: {c.sends}", flush=True)
                results[c.key] = r = run_class(c, server, args, key_header, encode)
                print(f"  statuses {format_statuses(r['statuses'])}", flush=True)
            server.stop()
    finally:
        if server is not None:
            server.stop()
    text = report(classes, results, baselines, extra, args)
    from bench.report import publish

    publish("Service under hostile requests", text, module="bench.service_hostile",
            save=not (args.no_report or args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
