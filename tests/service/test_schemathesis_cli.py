"""The schemathesis CLI run from outside, as a client would: `st run URL/openapi.json --checks all` against a real
server, from the repository root so that schemathesis.toml and its hooks (tests/schemathesis_hooks.py) apply.

Every check counts (no 5xx, responses and statuses as documented, schema-valid requests accepted, schema-violating
ones refused): the OpenAPI schema says exactly what the service accepts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_schemathesis_cli_all_checks(live):
    st = Path(sys.executable).with_name("st")
    if not st.is_file():
        pytest.skip("the schemathesis CLI (st) is not installed next to this Python")
    # A bounded run (about 15 s on 2 cores): every phase, few examples per operation, one worker.
    cmd = [str(st), "run", f"{live.url}/openapi.json", "--checks", "all", "--max-examples", "25", "--workers", "1",
           "--continue-on-failure", "--no-color"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "schemathesis.toml" in out, "st did not read the project's schemathesis.toml:\n" + out[-3000:]
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out[-20000:]}"
