"""Fits under real torchrun launches on this machine's CPUs (gloo): 2 processes on one host, and 2 "nodes" of
1 process each that meet through a c10d rendezvous on 127.0.0.1. Each is checked against the same fit in one
process: PPCA to 1e-9 (float64), the VAE's parameters to float32 rounding after a whole epoch of steps.
Also: only rank 0 writes, a hung or dead rank ends the job with a clear error in bounded time, and a rank
maps and reads only its own rows of a memory-mapped file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training import shards
from training.cli import main
from training.common import load_checkpoint, read_json
from training.data import digits_raw, load_dataset
from training.distributed import Dist
from training.ppca import PPCA, PPCAConfig, closed_form, mean_log_prob
from training.user_data import DataError
from training.vae_epoch import GlobalBatches

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 300  # s: a launch on a busy 2-core machine; the fits themselves take a few seconds


def _env() -> dict:
    # One torch thread per rank: the ranks are the parallelism (torchrun sets this too, with a warning).
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(fit_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m training fit ...` on this host."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "fit", *fit_args]
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _node_cmd(port: int, fit_args: list[str]) -> list[str]:
    """One of two "nodes" of one process each, meeting at a c10d rendezvous on 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
            "-m", "training", "fit", *fit_args]


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory) -> Path:
    """scikit-learn's digits as uint8 [N, 8, 8] in a .npy file: read by memory map under torchrun."""
    path = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(path, np.round(digits_raw() * 255).astype(np.uint8).reshape(-1, 8, 8))
    return path


def _ppca_params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["state_dict"]


# ------------------------------------------------------------------------------------------------
# Rows per rank (no process group needed: the reads depend only on rank and world size)
# ------------------------------------------------------------------------------------------------


def test_shares_of_rows_in_memory_cover_every_row_once():
    for n in (0, 1, 5, 1294):
        for world in (1, 2, 3, 8):
            x = np.arange(n, dtype=float)[:, None]
            parts = [shards.local(x, Dist(rank=r, world_size=world)) for r in range(world)]
            assert np.array_equal(np.concatenate([p for p, _ in parts]), np.arange(n))
            assert np.array_equal(np.concatenate([rows for _, rows in parts])[:, 0], x[:, 0])
            assert max(len(p) for p, _ in parts) - min(len(p) for p, _ in parts) <= 1


@pytest.mark.parametrize("n, batch, world", [(10, 4, 2), (11, 4, 2), (1294, 100, 2), (101, 9, 3), (7, 8, 4)])
def test_the_ranks_rows_of_each_global_step_are_the_one_process_batch(n, batch, world):
    """DistributedSampler deals each step's rows; together they are one process's batch (same seed), in the same
    places of the global batch, with the sampler's padding copies left out."""
    one = GlobalBatches(n, batch, Dist(), seed=3)
    ranks = [GlobalBatches(n, batch, Dist(rank=r, world_size=world), seed=3) for r in range(world)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == -(-n // batch)
    for epoch in (1, 2):
        for steps in zip(one.epoch(epoch), *(b.epoch(epoch) for b in ranks), strict=True):
            (n_step, rows, places), parts = steps[0], steps[1:]
            assert all(p[0] == n_step == len(rows) for p in parts)
            assert torch.equal(places, torch.arange(n_step))
            got = torch.full((n_step,), -1)
            for _, r_rows, r_places in parts:
                assert (got[r_places] == -1).all()  # no place twice
                got[r_places] = r_rows
            assert torch.equal(got, rows)
    assert not torch.equal(next(one.epoch(1))[1], next(one.epoch(2))[1])  # set_epoch reshuffles


def test_the_global_batch_must_split_evenly_over_the_ranks():
    with pytest.raises(ValueError, match="--batch-size 101 is the global batch of all 2 ranks"):
        GlobalBatches(1000, 101, Dist(rank=0, world_size=2), seed=0)


def test_a_rank_maps_and_reads_only_its_own_rows_of_the_file(tmp_path, monkeypatch):
    """Rank 1 of 2 opens a float file whose rank-0 rows are NaN: reading any of them would raise (checked
    below), and every memory map it makes lies inside its own rows' bytes. Pixel 0 of file row i is i / N,
    so each row handed out says which file row it is."""
    n, world, rank = 600, 2, 1
    x = np.random.default_rng(0).random((n, 8, 8)).astype(np.float32)
    x[:, 0, 0] = np.arange(n) / n
    lo, hi = n * rank // world, n * (rank + 1) // world
    x[:lo] = np.nan  # the other rank's rows
    path = tmp_path / "poisoned.npy"
    np.save(path, x)
    header = path.stat().st_size - x.nbytes
    row_bytes = 64 * 4

    maps = []
    real_memmap = np.memmap

    def spy(*args, **kwargs):
        m = real_memmap(*args, **kwargs)
        maps.append((kwargs["offset"], m.nbytes))
        return m

    monkeypatch.setattr(shards.np, "memmap", spy)
    # The ranks' notes on their rows are exchanged by a collective; rank 0's would say its rows are fine.
    monkeypatch.setattr(Dist, "gather", lambda self, note: [note] * self.world_size)
    me = Dist(rank=rank, world_size=world)
    data = shards.open_dataset(path, me, valid_fraction=0.1, test_fraction=0.2)
    held = []
    for split in ("train", "valid", "test"):
        positions, rows = shards.local(getattr(data, split), me)
        file_rows = np.round(rows[:, 0] * n).astype(int)
        assert np.array_equal(rows, x[file_rows].reshape(len(rows), -1).astype(np.float64)), split
        held.append(file_rows)
    held = np.concatenate(held)
    assert sorted(held) == list(range(lo, hi))  # each own row in exactly one split, no other row
    assert maps and all(header + lo * row_bytes <= off and off + size <= header + hi * row_bytes
                        for off, size in maps), maps
    with pytest.raises(DataError, match="NaN"):  # the poison is real: the other rank's rows cannot be read
        data.train.images.read([0])


def _write_idx(path: Path, x: np.ndarray) -> None:
    """An MNIST-style IDX file of unsigned bytes (type code 0x08)."""
    path.write_bytes(bytes([0, 0, 0x08, x.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in x.shape) + x.tobytes())


@pytest.mark.parametrize("kind", ["idx", "flat npy", "colour npy as gray", "colour npy"])
def test_mapped_rows_equal_the_whole_file_loader(tmp_path, monkeypatch, kind):
    """Each split read through the map (all ranks' shares put together) is load_dataset's split of the same file."""
    monkeypatch.setattr(Dist, "gather", lambda self, note: [note] * self.world_size)  # no rank finds a bad row
    rng = np.random.default_rng(1)
    if kind == "idx":
        path, channels = tmp_path / "images-idx3-ubyte", None
        _write_idx(path, rng.integers(0, 256, (103, 9, 10), dtype=np.uint8))
    elif kind == "flat npy":
        path, channels = tmp_path / "flat.npy", None
        np.save(path, rng.random((103, 81)))
    else:
        path, channels = tmp_path / "rgb.npy", (1 if kind == "colour npy as gray" else None)
        np.save(path, rng.integers(0, 256, (103, 8, 11, 3), dtype=np.uint8))
    whole = load_dataset(path, channels=channels)
    assert shards.mappable(path)
    for world in (1, 3):
        parts = [shards.open_dataset(path, Dist(rank=r, world_size=world), channels=channels) for r in range(world)]
        assert parts[0].summary() == whole.summary()
        for split in ("train", "valid", "test"):
            got = [shards.local(getattr(part, split), Dist(rank=r, world_size=world)) for r, part in enumerate(parts)]
            positions = np.concatenate([pos for pos, _ in got])
            assert sorted(positions) == list(range(len(getattr(whole, split))))  # every row once
            assert np.array_equal(np.concatenate([rows for _, rows in got]), getattr(whole, split)[positions])


def test_a_bad_row_in_another_ranks_rows_stops_this_rank_with_its_message(tmp_path, monkeypatch, digits_npy):
    """Rank 0's rows are fine; the notes gathered from the ranks say rank 1 found a NaN: rank 0 stops too."""
    theirs = f"{digits_npy}: the array holds NaN or infinite values (expected floats in [0, 1])"
    monkeypatch.setattr(Dist, "gather", lambda self, note: [note, (theirs, False)])
    with pytest.raises(DataError, match=r"holds NaN .* \(found by rank 1\)"):
        shards.open_dataset(digits_npy, Dist(rank=0, world_size=2))
    # Binary data only if every rank's rows are 0 or 1.
    binary = tmp_path / "binary.npy"
    np.save(binary, (np.load(digits_npy) > 127).astype(np.uint8) * 255)
    for theirs_binary in (True, False):
        monkeypatch.setattr(Dist, "gather", lambda self, note, b=theirs_binary: [note, (None, b)])
        data = shards.open_dataset(binary, Dist(rank=0, world_size=2))
        assert data.binary is theirs_binary and isinstance(data.train, shards.RowView)


# ------------------------------------------------------------------------------------------------
# Real launches
# ------------------------------------------------------------------------------------------------


def test_ppca_em_on_two_ranks_equals_one_process(tmp_path):
    args = ["--model", "ppca", "--method", "em", "--dataset", "digits", "--latent-dim", "10", "--no-export",
            "--quiet"]
    _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    assert main(["fit", *args, "--out", str(tmp_path / "one")]) == 0
    one, two = _ppca_params(tmp_path / "one"), _ppca_params(tmp_path / "two")
    for name in ("mu", "W", "log_sigma2"):
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-9), name
    m1, m2 = read_json(tmp_path / "one" / "metrics.json"), read_json(tmp_path / "two" / "metrics.json")
    assert m2["iterations"] == m1["iterations"] > 10
    for split in ("train", "valid", "test"):
        assert m2[f"{split}_log_likelihood"] == pytest.approx(m1[f"{split}_log_likelihood"], abs=1e-9)
    assert (m2["world_size"], m2["backend"], m1["world_size"], m1["backend"]) == (2, "gloo", 1, None)


def test_ppca_closed_form_on_two_nodes_of_mapped_rows_equals_one_process_and_only_rank_0_writes(
        tmp_path, digits_npy):
    """Each node runs in its own folder with a relative --out: whatever rank 1 wrote would land in its folder."""
    port, nodes = _free_port(), [tmp_path / "node-a", tmp_path / "node-b"]
    fit = ["--model", "ppca", "--method", "closed-form", "--dataset", str(digits_npy), "--latent-dim", "10",
           "--quiet", "--no-export", "--out", "run"]
    procs = []
    for node in nodes:
        node.mkdir()
        procs.append(subprocess.Popen(_node_cmd(port, fit), cwd=node, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=LAUNCH_TIMEOUT)
        assert p.returncode == 0, err[-4000:]
    wrote = [node for node in nodes if any(node.iterdir())]
    assert len(wrote) == 1  # rank 0's node wrote, rank 1's nothing
    run = wrote[0] / "run"
    assert {"checkpoint.pt", "metrics.json", "directions.png", "samples.png"} <= {f.name for f in run.iterdir()}
    training = load_checkpoint(run)["meta"]["training"]  # what export writes as the card's training section
    assert (training["world_size"], training["backend"]) == (2, "gloo")

    x = torch.as_tensor(load_dataset(digits_npy).train)
    mu, W, sigma2 = closed_form(x, 10)  # one process, by the SVD of the centred rows
    two = _ppca_params(run)
    W2 = two["W"]
    assert torch.allclose(two["mu"], mu, rtol=0, atol=1e-9)
    assert torch.allclose(W2 @ W2.T, W @ W.T, rtol=0, atol=1e-9)  # W up to the signs of its columns
    assert float(two["log_sigma2"].exp()) == pytest.approx(float(sigma2), abs=1e-9)
    best = mean_log_prob(PPCA(PPCAConfig(64, 10)).set_parameters(mu, W, sigma2), x)
    assert read_json(run / "metrics.json")["train_log_likelihood"] == pytest.approx(best, abs=1e-9)


def test_ppca_stochastic_em_on_two_ranks_reaches_the_optimum(tmp_path, digits_npy):
    """Per-rank minibatches of 50 + 50 rows, one all-reduced step each: the log-likelihood nears the ML value."""
    _torchrun(["--model", "ppca", "--method", "sem", "--dataset", str(digits_npy), "--latent-dim", "10",
               "--iterations", "8", "--batch-size", "100", "--no-export", "--quiet", "--out", "run"], tmp_path)
    x = torch.as_tensor(load_dataset(digits_npy).train)
    best = mean_log_prob(PPCA(PPCAConfig(64, 10)).set_parameters(*closed_form(x, 10)), x)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert best - 0.5 < metrics["train_log_likelihood"] <= best + 1e-9
    assert metrics["world_size"] == 2


def test_flow_vae_on_two_ranks_takes_the_one_process_steps(tmp_path):
    """One epoch (36 global steps of 100 rows, 50 per rank) of dynamically binarized mnist5k-bin. 3,599
    training rows: DistributedSampler pads rank 1's last batch with a copy, which must not count."""
    # float32 products: bf16 (the flow-VAE's default) rounds a 50-row product differently from a 100-row one
    args = ["--model", "flow-vae", "--dataset", "mnist5k-bin", "--valid-fraction", "0.10025", "--epochs", "1",
            "--hidden", "16", "--latent-dim", "4", "--flows", "2", "--batch-size", "100", "--eval-samples", "5",
            "--precision", "fp32", "--no-export", "--quiet"]
    _torchrun([*args, "--out", "two"], tmp_path)
    assert main(["fit", *args, "--out", str(tmp_path / "one")]) == 0
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert one["meta"]["dataset_summary"]["n_train"] == 3599
    assert two["meta"]["training"]["dynamic_binarization"] is True
    for name, p in one["state_dict"].items():
        assert torch.allclose(two["state_dict"][name], p, rtol=1e-4, atol=1e-5), name
    # The validation bound (the default objective's: IW with k = 4): each rank's rows with the one-process noise,
    # reduced as a sum and a count.
    assert two["meta"]["training"]["objective"] == "iwae" and two["meta"]["training"]["k"] == 4
    for curve in ("train ELBO", "valid IW bound (S=4)"):
        assert two["meta"]["history"][curve] == pytest.approx(one["meta"]["history"][curve], abs=1e-3)
    metrics = read_json(tmp_path / "two" / "metrics.json")
    assert (metrics["world_size"], metrics["backend"]) == (2, "gloo")
    assert metrics["test_elbo"] == pytest.approx(read_json(tmp_path / "one" / "metrics.json")["test_elbo"], abs=1.0)



def test_iwae_with_residual_layers_on_two_ranks_takes_the_one_process_steps(tmp_path):
    """--objective iwae --k 2: each step draws [rows, 2, d] noise for the global batch, as one process does;
    the validation bound of metrics.json is reduced over the ranks' rows as the test figures are."""
    args = ["--model", "vae", "--dataset", "digits", "--epochs", "1", "--hidden", "16", "16", "--latent-dim", "4",
            "--objective", "iwae", "--k", "2", "--layer", "residual", "--lr-warmup-epochs", "0.5",
            "--eval-samples", "5", "--no-export", "--quiet"]
    _torchrun([*args, "--out", "two"], tmp_path)
    assert main(["fit", *args, "--out", str(tmp_path / "one")]) == 0
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert two["meta"]["training"]["objective"] == "iwae" and two["meta"]["training"]["world_size"] == 2
    for name, p in one["state_dict"].items():
        assert torch.allclose(two["state_dict"][name], p, rtol=1e-4, atol=1e-5), name
    for curve in ("train ELBO", "valid IW bound (S=4)"):
        assert two["meta"]["history"][curve] == pytest.approx(one["meta"]["history"][curve], abs=1e-3)
    m1, m2 = read_json(tmp_path / "one" / "metrics.json"), read_json(tmp_path / "two" / "metrics.json")
    # each rank's own validation rows with its own noise: equal within Monte Carlo error
    assert m2["valid_log_likelihood"] == pytest.approx(m1["valid_log_likelihood"], abs=1.0)

def _workers(marker: str) -> dict[int, int]:
    """RANK -> pid of the torchrun workers whose command line holds `marker`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if marker.encode() in cmd and b"torch.distributed.run" not in cmd and b"TORCHELASTIC_RUN_ID" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_a_hung_rank_then_a_dead_one_end_the_job_with_clear_errors_in_bounded_time(tmp_path):
    """Two nodes; once training runs, rank 1 is stopped (SIGSTOP): rank 0 waits --dist-timeout 3 s in the
    gradients' all-reduce, then stops with an error that says so. Rank 1 is then killed: its launcher ends too."""
    port, out = _free_port(), tmp_path / "run"
    fit = ["--model", "vae", "--dataset", "digits", "--epochs", "100000", "--hidden", "8", "--latent-dim", "2",
           "--dist-timeout", "3", "--out", str(out)]
    procs = [subprocess.Popen(_node_cmd(port, fit), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    logs = [bytearray(), bytearray()]

    def drain(i):
        for chunk in iter(lambda: procs[i].stderr.read1(4096), b""):
            logs[i].extend(chunk)

    threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while b"epoch" not in logs[0] + logs[1]:  # rank 0's progress bar: both ranks are past DDP's setup
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (logs[0] + logs[1])[-3000:]
            time.sleep(0.1)
        workers = _workers(str(out))
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        first = next(i for i in range(2) if b"epoch" in logs[i])  # the launcher of rank 0
        procs[first].wait(timeout=120)
        took = time.monotonic() - stopped
        for t in threads:
            t.join(timeout=0.5)
        text = logs[first].decode(errors="replace")
        assert procs[first].returncode != 0 and took < 3 + 60, took
        # where rank 1 stopped decides which collective rank 0 waits in: a training step's (DDP's forward, the
        # backward's all-reduce) or the epoch's end (the validation sums, rank 0's early-stopping decision)
        assert any(f"rank 0 of 2: {what} failed, so the job stops" in text for what in (
            "the gradients' all-reduce in backward", "the forward pass's synchronisation",
            "an all-reduce of sums", "a broadcast from rank 0")), text[-3000:]
        assert "Timed out" in text and "--dist-timeout" in text

        os.kill(workers[1], signal.SIGKILL)
        other = procs[1 - first]
        other.wait(timeout=120)
        assert other.returncode != 0
        assert not any(out.rglob("*"))  # nothing half-written
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
