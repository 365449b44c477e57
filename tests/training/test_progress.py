"""Live progress of parallel fits (training/progress.py): what a fit reports on its pipe, and what build-defaults
shows of it in a terminal (bars, checked through a pseudo-terminal) and without one (plain lines)."""

from __future__ import annotations

import io
import json
import math
import os
import pty
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

from service.repository import load_model_card
from training.progress import Board, Reporter

ROOT = Path(__file__).resolve().parents[2]


def _events(r: int) -> list[dict]:
    with os.fdopen(r) as f:
        return [json.loads(line) for line in f]


def test_reporter_sends_the_last_step_before_a_phase_and_estimates_where_em_stops():
    r, w = os.pipe()
    rep = Reporter(w)
    tol, ratio = 1e-6, 0.9
    stop = math.ceil(math.log(tol) / math.log(ratio))  # gains 0.9^n fall below tol at this step
    for n in range(1, 31):
        rep.step(n, 5000, "iteration", gain=(ratio ** n, tol), **{"log-lik": -n})
    rep.phase("evaluating")
    rep._file.close()
    events = _events(r)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["n"] == 1 and steps[-1]["n"] == 30  # throttled in between, the last one kept
    assert steps[-1]["figures"] == {"log-lik": -30.0} and steps[-1]["total"] == 5000
    assert abs(steps[-1]["expected"] - stop) <= 1, (steps[-1]["expected"], stop)
    assert events[-1] == {"event": "phase", "phase": "evaluating"}


def test_plain_board_prints_a_line_per_model_at_its_interval():
    out = io.StringIO()
    board = Board(["vae-a", "ppca-b"], live=False, every=0.3, stream=out)
    board.start("vae-a")
    board.event("vae-a", {"event": "step", "n": 10, "total": 100, "unit": "epoch",
                          "figures": {"train ELBO": -98.123, "valid ELBO": -99.5}})
    time.sleep(0.2)
    board.event("vae-a", {"event": "step", "n": 20, "total": 100, "unit": "epoch",
                          "figures": {"train ELBO": -97.0, "valid ELBO": -98.25}})
    time.sleep(1.6)
    board.phase("vae-a", "evaluating")
    board.close()
    lines = out.getvalue().splitlines()
    ticks = [ln for ln in lines if "epoch 20/100" in ln]
    assert len(ticks) >= 2, lines  # one per interval while it runs
    assert ticks[0].startswith("[build-defaults] vae-a: epoch 20/100, train ELBO -97.00, valid ELBO -98.25, 0:0")
    assert "ETA 0:" in ticks[0]
    assert lines[-1].startswith("[build-defaults] vae-a: evaluating")
    assert not any("ppca-b" in ln for ln in lines)  # not started: nothing to say


# Two default models for the command-line runs: a quick PPCA fitted by EM (it reports iterations), and a fit
# that fails before training (a dataset path that does not exist): its own message.
TINY_DEFAULTS = """
import sys
from training import defaults, progress
from training.config import DataOptions, FitJob
from training.train_ppca import PPCAFit
defaults.DEFAULT_MODELS = {
    "ppca-em": FitJob("ppca", PPCAFit(method="em", latent_dim=3, tol=1e-9), DataOptions("digits")),
    "no-data": FitJob("ppca", PPCAFit(), DataOptions("/nonexistent/data.npz")),
}
"""


def test_build_defaults_in_a_terminal_shows_a_bar_per_model_and_a_failed_fit(tmp_path):
    code = TINY_DEFAULTS + (f"from training.cli import main\nsys.exit(main(['build-defaults', '--models-dir', "
                            f"'{tmp_path}/models', '--runs-dir', '{tmp_path}/runs', '--jobs', '2']))")
    master, slave = pty.openpty()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 140, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, TERM="xterm"))
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(30) == 1
    text = b"".join(chunks).decode(errors="replace")
    assert "\x1b[A" in text and "\r" in text  # bars redrawn in place
    bars = [seg for seg in text.replace("\n", "\r").split("\r") if "%|" in seg]
    assert any(seg.startswith("ppca-em ") and "iteration" in seg and "log-lik" in seg for seg in bars), bars[-10:]
    assert any(seg.startswith("no-data ") and "failed" in seg for seg in bars)
    assert "[build-defaults] no-data: the fit failed: " in text
    assert "/nonexistent/data.npz: no such file or directory" in text  # the fit's own error
    assert "[build-defaults] ppca-em: fitted in" in text
    assert load_model_card(tmp_path / "models" / "ppca-em").latent_dim == 3


def test_the_parent_can_give_a_fit_more_threads():
    torch = __import__("torch")
    before = torch.get_num_threads()
    r, w = os.pipe()
    try:
        with os.fdopen(r) as control, os.fdopen(w, "w", buffering=1) as parent:
            rep = Reporter(None, control)
            want = 1 if before != 1 else 2
            parent.write(f"threads {want}\n")
            deadline = time.monotonic() + 10
            while rep._threads != want and time.monotonic() < deadline:
                time.sleep(0.01)
            rep.step(1, 10, "epoch")  # applied by the fit's own thread, at its next step
            assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
