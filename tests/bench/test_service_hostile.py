"""The pure parts of bench/service_hostile.py (the benchmark itself is not run here)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bench.service_hostile import count_5xx, format_statuses, http_request, parse_head, percentile


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_agrees_with_numpy(q, n):
    values = list(np.random.default_rng(n).exponential(5.0, n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_of_nothing_is_nan():
    assert percentile([], 50) != percentile([], 50)


def test_statuses_codes_in_order_then_transport_outcomes():
    counts = Counter({500: 2, "timeout": 1, 200: 5, 422: 3, "reset": 4})
    assert format_statuses(counts) == "200: 5, 422: 3, 500: 2, reset: 4, timeout: 1"
    assert format_statuses(Counter()) == "-"
    assert count_5xx(counts) == 2
    assert count_5xx(Counter({503: 1, 599: 2, 499: 7, "reset": 9})) == 3


def test_parse_head():
    status, headers = parse_head(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 12\r\nConnection: close")
    assert status == 413
    assert headers == {"content-length": "12", "connection": "close"}
    with pytest.raises(ValueError):
        parse_head(b"garbage")


def test_http_request_bytes():
    raw = http_request("POST", "/encode", b"\x00\xff", {"Content-Type": "application/json"})
    assert raw == (b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 2\r\n\r\n\x00\xff")
    assert http_request("GET", "/health") == b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert http_request("POST", "/encode").endswith(b"Content-Length: 0\r\n\r\n")
