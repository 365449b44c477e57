"""Operations over real HTTP against `python -m service` on 127.0.0.1: bounded metrics labels, the API key (blank
refused, OPTIONS guarded), slow clients (read deadlines, connection cap) and shutdown (drain, every request answered).

No assertion on timing beyond generous sanity bounds; the figures themselves are benchmarks (bench/).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from svc_helpers import ROOT, image_bytes, start_server

from service.metrics import UNKNOWN_MODEL


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _metric_lines(text: str) -> list[str]:
    return [ln.rsplit(" ", 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")]


# --------------------------------------------------------------------------------------------------
# 5. Metrics label values are bounded
# --------------------------------------------------------------------------------------------------

def test_unknown_model_names_share_one_metrics_label(live):
    def hammer(n: int) -> None:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            for _ in range(n):
                name = uuid.uuid4().hex
                assert c.get(f"/models/{name}").status_code == 404
                assert c.post("/encode", params={"model": name}, json={"images": [[0.0] * 64]}).status_code == 404

    httpx.get(f"{live.url}/metrics", timeout=30)  # its own series exist from now on
    hammer(50)
    first = httpx.get(f"{live.url}/metrics", timeout=30).text
    hammer(300)
    second = httpx.get(f"{live.url}/metrics", timeout=30).text
    # The same unknown-model series after 300 more invented names (only their counts moved), and no new
    # series to speak of (other tests' requests on the shared server may add a few).
    unknown = [[ln for ln in _metric_lines(t) if UNKNOWN_MODEL in ln] for t in (first, second)]
    assert unknown[0] and unknown[0] == unknown[1]
    assert len(_metric_lines(second)) - len(_metric_lines(first)) < 50
    assert f'model="{UNKNOWN_MODEL}"' in second and 'endpoint="/models/{name}"' in second
    models = {ln.split('model="', 1)[1].split('"', 1)[0] for ln in second.splitlines() if 'model="' in ln}
    assert models <= {"ppca-digits", "vae-digits", "flow-vae-digits", UNKNOWN_MODEL, "-"}, models
    # Unmatched paths share one endpoint value too.
    for _ in range(20):
        httpx.get(f"{live.url}/{uuid.uuid4().hex}", timeout=10)
    third = httpx.get(f"{live.url}/metrics", timeout=30).text
    endpoints = {ln.split('endpoint="', 1)[1].split('"', 1)[0] for ln in third.splitlines() if 'endpoint="' in ln}
    assert "unmatched" in endpoints and all(e == "unmatched" or e.startswith("/") for e in endpoints)
    assert not any(len(e) == 33 and e[1:].isalnum() for e in endpoints)


# --------------------------------------------------------------------------------------------------
# 6. API key
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "   "])
def test_blank_api_key_is_refused_at_start_up(value, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    env.update(LATENTSERVE_API_KEY=value, LATENTSERVE_MODELS_DIR=str(tmp_path), LATENTSERVE_PORT="0")
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "LATENTSERVE_API_KEY" in proc.stderr and "empty or blank" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def keyed(model_repo, tmp_path_factory):
    server = start_server(model_repo, tmp_path_factory.mktemp("keyed") / "server.log", api_key="s3cret",
                          cors_origins='["https://ok.example"]', default_model="ppca-digits")
    yield server
    server.stop()


def test_options_needs_the_key_except_an_allowed_cors_preflight(keyed):
    url = keyed.url
    for path in ("/encode", "/models", "/metrics", "/openapi.json", "/nowhere"):
        r = httpx.options(f"{url}{path}", timeout=10)
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", (path, r.text)
        assert "allow" not in r.headers  # no route enumeration
    assert httpx.options(f"{url}/encode", headers={"X-API-Key": ""}, timeout=10).status_code == 401
    # An empty key never matches (the server refuses to start with one).
    assert httpx.get(f"{url}/models", headers={"X-API-Key": ""}, timeout=10).status_code == 401
    preflight = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{url}/encode", headers=preflight, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
    r = httpx.options(f"{url}/encode", headers={**preflight, "Origin": "https://evil.example"}, timeout=10)
    assert r.status_code in (400, 401) and "access-control-allow-origin" not in r.headers
    # OPTIONS with Origin but no Access-Control-Request-Method is no preflight: the key is needed.
    assert httpx.options(f"{url}/encode", headers={"Origin": "https://ok.example"}, timeout=10).status_code == 401
    assert httpx.get(f"{url}/models", headers={"X-API-Key": "s3cret"}, timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------------
# 9. Slow clients
# --------------------------------------------------------------------------------------------------

HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: one-byte-a-second\r\nAccept: */*\r\n\r\n"


async def _trickle(port: int, prefix: bytes, seconds: float) -> tuple[bytes, float | None]:
    """Connect, send `prefix` then one byte of HEAD a second; what came back, and when the server closed."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(prefix)
    got = b""
    try:
        for i in range(int(seconds)):
            writer.write(HEAD[i:i + 1])
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                continue
            got += chunk
            if not chunk:  # the server closed the connection
                return got, time.monotonic() - t0
            while chunk := await asyncio.wait_for(reader.read(65536), 5.0):
                got += chunk
            return got, time.monotonic() - t0
        return got, None
    except (ConnectionResetError, BrokenPipeError):
        return got, time.monotonic() - t0
    finally:
        writer.close()


def _health_probe(url: str, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    """GET /health every 0.1 s until `stop` (a thread of its own: the slow sockets' event loop does not delay it)."""
    with httpx.Client(base_url=url, timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = c.get("/health")
            out.append((r.status_code, time.perf_counter() - t0))
            time.sleep(0.1)


@pytest.fixture(scope="module")
def guarded(model_repo, tmp_path_factory):
    server = start_server(model_repo, tmp_path_factory.mktemp("guarded") / "server.log", header_timeout_s="2",
                          body_timeout_s="2", max_connections="1000", default_model="ppca-digits")
    yield server
    server.stop()


def test_slow_clients_are_cut_off_and_others_are_served(guarded):
    """300 connections sending their request head one byte a second, and 50 their body, next to a normal
    client: the slow ones get 408 and are closed after the 2 s deadlines; /health answers throughout."""
    port = int(guarded.url.rsplit(":", 1)[1])
    rss_before = _rss_kib(guarded.proc.pid)
    body_head = (b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")

    async def main():
        heads = [asyncio.create_task(_trickle(port, b"", 8)) for _ in range(300)]
        bodies = [asyncio.create_task(_trickle(port, body_head, 8)) for _ in range(50)]
        await asyncio.sleep(1.0)
        rss_during = _rss_kib(guarded.proc.pid)
        return await asyncio.gather(*heads, *bodies), rss_during

    stop, probes = threading.Event(), []
    probe = threading.Thread(target=_health_probe, args=(guarded.url, stop, probes))
    probe.start()
    try:
        results, rss_during = asyncio.run(main())
    finally:
        stop.set()
        probe.join(30)
    for got, closed_after in results:
        assert closed_after is not None, "a slow connection was left open"
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert b"application/problem+json" in got and b"did not arrive within 2 s" in got
        assert closed_after < 7.0  # sanity: the deadline is 2 s
    assert b"the request body did not arrive" in results[-1][0]
    assert b"the request line and headers did not arrive" in results[0][0]
    assert probes and all(status == 200 for status, _ in probes)
    assert max(t for _, t in probes) < 2.0, probes  # generous: a stalled server would show seconds
    assert rss_during - rss_before < 50 * 1024, (rss_before, rss_during)
    assert "Traceback" not in guarded.log()


def test_oversized_request_head_gets_431(guarded):
    port = int(guarded.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(100):
                s.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]


def test_connections_beyond_the_limit_get_503(model_repo, tmp_path):
    server = start_server(model_repo, tmp_path / "server.log", max_connections="20", header_timeout_s="3")
    port = int(server.url.rsplit(":", 1)[1])
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(26)]
        time.sleep(0.5)
        answers = []
        for s in socks[20:]:
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            answers.append(got)
        assert all(a.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in a for a in answers), answers[0][:300]
        for s in socks:
            s.close()
        # The held connections were closed (by their clients here, or by the head deadline): room again.
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# 8. Shutdown
# --------------------------------------------------------------------------------------------------

def test_ready_is_503_while_draining_and_the_server_still_serves(model_repo, tmp_path):
    server = start_server(model_repo, tmp_path / "server.log", drain_s="5", default_model="ppca-digits")
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    png = image_bytes(np.random.default_rng(0).random((8, 8)))
    r = httpx.get(f"{server.url}/ready", timeout=10)
    assert r.status_code == 503 and r.json()["detail"] == "the server is shutting down", r.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    e = httpx.post(f"{server.url}/encode", files=[("images", ("a.png", png, "image/png"))], timeout=10)
    assert e.status_code == 200, e.text
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    log = server.log()
    assert "draining" in log and "Finished server process" in log and "Traceback" not in log


def _wait_until_read(port: int, requests: int, answered, timeout: float = 60.0) -> None:
    """Wait until each of `requests` is answered (`answered()` counts them) or held by the server on an established
    connection with nothing left unread (Linux: an empty receive queue in /proc/net/tcp), so that SIGTERM comes
    after every request was read."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux's /proc/net/tcp to know when the server has read the requests")
    deadline = time.monotonic() + timeout
    while True:
        done = answered()
        with open("/proc/net/tcp") as f:
            rows = [ln.split() for ln in f.readlines()[1:]]
        held = [r for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "01"]
        if len(held) + done >= requests and all(int(r[4].split(":")[1], 16) == 0 for r in held):
            return
        assert time.monotonic() < deadline, f"the server did not read {requests} requests: {done} answered, {held}"
        time.sleep(0.02)


def test_every_request_accepted_before_sigterm_is_answered(model_repo, tmp_path):
    """At the graceful timeout (here 0.3 s), requests still waiting for their body, queued in a batcher or
    running get a 503 problem; the others their result. None is cut off without an answer."""
    server = start_server(model_repo, tmp_path / "server.log", timeout_graceful_shutdown="0.3",
                          inference_workers="1", body_timeout_s="60", default_model="vae-digits",
                          max_inflight_work="100000000")  # all 24 admitted: in flight when the signal comes
    port = int(server.url.rsplit(":", 1)[1])
    rng = np.random.default_rng(0)
    images = [rng.random(64).round(3).tolist() for _ in range(16)]
    statuses: list[int | str] = []
    lock = threading.Lock()

    sent: list[int] = []

    def trace(event: str, info) -> None:
        if event == "http11.send_request_body.complete":
            with lock:
                sent.append(1)

    def heavy():
        try:
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{server.url}/log-likelihood", params={"samples": 2000}, json={"images": images},
                           extensions={"trace": trace})
            out: int | str = r.status_code
            if r.status_code == 503 and not (r.headers["content-type"] == "application/problem+json"
                                             and "shutting down" in r.text):
                out = f"503 without the shutdown problem: {r.text[:200]}"
        except httpx.TransportError as e:
            out = f"no answer: {e!r}"
        with lock:
            statuses.append(out)

    # A request whose body is still on its way when the signal comes.
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
                 b"\r\n{\"images\": ")
    threads = [threading.Thread(target=heavy) for _ in range(24)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(sent) < 24:  # every request sent ...
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _wait_until_read(port, 25, lambda: len(statuses))  # ... and read by the server
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    got = b""
    while chunk := slow.recv(65536):
        got += chunk
    slow.close()
    rc = server.proc.wait(60)
    assert got.startswith(b"HTTP/1.1 503 ") and b"shutting down" in got, got[:300]
    assert len(statuses) == 24 and all(s in (200, 503) for s in statuses), statuses
    assert rc in (0, -signal.SIGTERM)
    log = server.log()
    assert "answered 503 to" in log and "Traceback" not in log, log[-3000:]
    print(f"statuses: {sorted(statuses)}")
