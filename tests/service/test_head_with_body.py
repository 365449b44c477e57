"""service/server.py HeadWithBody: a response's head goes out with its first body bytes in one write, and
everything else as before; over real HTTP, answers on a kept-alive connection stay well framed."""

from __future__ import annotations

import gc
import http.client
import weakref

import numpy as np
import orjson

from service.server import HeadWithBody


class Transport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Cycle:
    """What HeadWithBody reads of uvicorn's RequestResponseCycle, as uvicorn sets it before writing a head."""

    def __init__(self, method: str = "POST", chunked: bool | None = False, length: int = 4):
        self.scope = {"method": method}
        self.response_started = False
        self.chunked_encoding, self.expected_content_length = chunked, length


def _started(cycle: Cycle) -> Cycle:
    cycle.response_started = True
    return cycle


def test_head_and_first_body_bytes_in_one_write_the_rest_as_before():
    t = Transport()
    cycle = Cycle()
    w = HeadWithBody(t, cycle)
    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts: at once
    assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    _started(cycle)
    w.write(b"HEAD\r\n\r\n")
    assert len(t.writes) == 1  # held
    w.write(b"ab")
    w.write(b"cd")
    assert t.writes[1:] == [b"HEAD\r\n\r\nab", b"cd"]
    assert b"".join(t.writes[1:]) == b"HEAD\r\n\r\nabcd"


def test_heads_without_a_known_body_and_large_bodies_are_written_as_before():
    for cycle in (Cycle(chunked=True, length=0), Cycle(method="HEAD"), Cycle(length=0)):
        t = Transport()
        w = HeadWithBody(t, _started(cycle))
        w.write(b"HEAD\r\n\r\n")
        assert t.writes == [b"HEAD\r\n\r\n"], vars(cycle)
    t = Transport()
    big = b"x" * (HeadWithBody.JOIN_LIMIT + 1)
    w = HeadWithBody(t, _started(Cycle(length=len(big))))
    w.write(b"HEAD\r\n\r\n")
    w.write(big)
    assert t.writes == [b"HEAD\r\n\r\n", big]  # not copied into one


def test_close_writes_a_held_head_first_and_the_cycle_is_not_kept_alive():
    t = Transport()
    cycle = _started(Cycle())
    w = HeadWithBody(t, cycle)
    w.write(b"HEAD\r\n\r\n")
    w.close()
    assert t.writes == [b"HEAD\r\n\r\n"] and t.closed
    # The cycle holds its transport; the transport holds the cycle weakly: no reference cycle per request.
    ref = weakref.ref(cycle)
    cycle.transport = HeadWithBody(Transport(), cycle)
    gc.disable()
    try:
        del cycle
        assert ref() is None
    finally:
        gc.enable()


def test_answers_on_a_kept_alive_connection_are_well_framed(live, digits):
    """Binary and JSON OIP answers, a HEAD and an error, one after another on one connection."""
    x = digits.test[:2].astype("<f4")
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    c = http.client.HTTPConnection(live.url.removeprefix("http://"), timeout=30)
    try:
        means = []
        for _ in range(3):
            c.request("POST", "/v2/models/ppca-digits.encoder/infer", body=head + x.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(head))})
            r = c.getresponse()
            body = r.read()
            assert r.status == 200 and len(body) == int(r.getheader("content-length"))
            n = int(r.getheader("inference-header-content-length"))
            meta = orjson.loads(body[:n])
            size = meta["outputs"][0]["parameters"]["binary_data_size"]
            means.append(np.frombuffer(body[n:n + size], "<f4"))
        assert all(np.array_equal(m, means[0]) for m in means)
        c.request("POST", "/v2/models/ppca-digits.encoder/infer", body=orjson.dumps(
            {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}))
        r = c.getresponse()
        out = orjson.loads(r.read())
        assert r.status == 200 and np.array_equal(np.array(out["outputs"][0]["data"], np.float32), means[0])
        c.request("HEAD", "/health")
        r = c.getresponse()
        assert r.status in (200, 405) and r.read() == b""
        c.request("POST", "/v2/models/nope.encoder/infer", body=b"{}")
        r = c.getresponse()
        assert r.status == 404 and "error" in orjson.loads(r.read())
    finally:
        c.close()
