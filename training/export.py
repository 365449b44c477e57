"""Export a fitted model to ONNX: the graphs of `models/README.md`, a `card.json`, and checks.

    python -m training export runs/vae --out models/vae-mnist

Every graph is checked with `onnx.checker` and run in ONNX Runtime against the torch module it came
from, on random and real inputs at batch 1 and 64; an export whose outputs differ beyond the
tolerances below fails and leaves the target folder as it was. The folder is written under a hidden
name beside the target and renamed into place once its card validates (training/staging.py), so a
service polling the repository never reads a half-written model.

Exporter: `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter. The TorchScript
exporter (`dynamo=False`) is deprecated; the dynamo exporter takes `dynamic_shapes` (the batch axis
and the sample axis S stay symbolic) and, with `external_data=False`, writes each graph with its
weights as one self-contained `.onnx` file (the models here are a few MB, far below protobuf's 2 GB).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model_repository.card import CARD, sha256_file, write_card
from model_repository.graphs import EPS, GRAPHS, X, Z
from training.common import METRICS, load_checkpoint, read_json
from training.drivers import driver_for
from training.shards import reopen_dataset
from training.staging import staged
from training.user_data import DataError
from training.vae import export_modules

OPSET = 18
# Parity tolerances (float32): absolute on encoder/decoder outputs, relative on log-densities.
ABS_TOL = 1e-4
REL_TOL = 1e-3
PARITY_BATCHES = (1, 64)
PARITY_SAMPLES = 8  # S for the bound graph's parity check

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported graphs do not reproduce the torch model, or could not be written."""


@dataclass
class GraphSpec:
    """One graph to export: a module whose forward takes `inputs` in order and returns `outputs`."""

    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    # Outputs compared with a relative tolerance (log-densities of size ~D); the rest absolutely.
    relative: set[str] = field(default_factory=set)


# ------------------------------------------------------------------------------------------------
# PPCA graphs: float64 algebra done once here, float32 constants in the graphs.
# ------------------------------------------------------------------------------------------------


class _PPCAEncoder(nn.Module):
    """x -> exact posterior mean M^-1 W^T (x - mu) and log diag(sigma2 M^-1)."""

    def __init__(self, model):
        super().__init__()
        M_inv = torch.linalg.inv(model.M().detach())
        self.register_buffer("mu", model.mu.detach().float())
        self.register_buffer("B", (model.W.detach() @ M_inv).float())  # [D, d]
        self.register_buffer("post_log_var", (model.sigma2.detach() * M_inv.diagonal()).log().float())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (x - self.mu) @ self.B
        return mean, torch.zeros_like(mean) + self.post_log_var


class _PPCADecoder(nn.Module):
    """z -> E[x | z] = mu + W z."""

    def __init__(self, model):
        super().__init__()
        self.register_buffer("mu", model.mu.detach().float())
        self.register_buffer("Wt", model.W.detach().T.contiguous().float())

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.Wt + self.mu


class _PPCALogLik(nn.Module):
    """x -> exact log N(x; mu, W W^T + sigma2 I), as in `PPCA.log_prob` with A = L^-1 W^T precomputed."""

    def __init__(self, model):
        super().__init__()
        D, d = model.config.data_dim, model.config.latent_dim
        W, sigma2 = model.W.detach(), model.sigma2.detach()
        L = torch.linalg.cholesky(model.M().detach())
        A = torch.linalg.solve_triangular(L, W.T, upper=False)  # [d, D]
        log_det_C = (D - d) * sigma2.log() + 2.0 * L.diagonal().log().sum()
        const = -0.5 * (D * np.log(2.0 * np.pi) + log_det_C)
        self.register_buffer("mu", model.mu.detach().float())
        self.register_buffer("At", A.T.contiguous().float())
        self.register_buffer("inv_2sigma2", (0.5 / sigma2).float())
        self.register_buffer("const", const.float())

    def forward(self, x: Tensor) -> Tensor:
        xc = x - self.mu
        quad = xc.pow(2).sum(-1) - (xc @ self.At).pow(2).sum(-1)
        return self.const - self.inv_2sigma2 * quad


def _spec(role: str, module: nn.Module, outputs: tuple[str, ...] | list[str] | None = None) -> GraphSpec:
    """The graph of `role` with the contract's input names, and its outputs (by default the contract's)."""
    io = GRAPHS[role]
    outputs = list(io.outputs if outputs is None else outputs)
    # The log-densities (sums over D pixels) are compared relatively, the rest absolutely.
    return GraphSpec(module, list(io.inputs), outputs, relative={"log_w", "log_px"} & set(outputs))


def _ppca_graphs(model) -> dict[str, GraphSpec]:
    return {"encoder": _spec("encoder", _PPCAEncoder(model)), "decoder": _spec("decoder", _PPCADecoder(model)),
            "loglik": _spec("loglik", _PPCALogLik(model))}


def _vae_graphs(model) -> dict[str, GraphSpec]:
    return {role: _spec(role, module, outputs) for role, (module, _, outputs) in export_modules(model).items()}


# kind -> function building the graphs of a fitted torch model of that kind.
GRAPH_BUILDERS = {"ppca": _ppca_graphs, "vae": _vae_graphs, "flow-vae": _vae_graphs}


def graphs_for(kind: str, model) -> dict[str, GraphSpec]:
    try:
        builder = GRAPH_BUILDERS[kind]
    except KeyError:
        raise ValueError(f"cannot export model kind {kind!r}: expected one of {', '.join(GRAPH_BUILDERS)}") from None
    return builder(model)


# ------------------------------------------------------------------------------------------------
# Export, checks, card
# ------------------------------------------------------------------------------------------------


def _example_inputs(name: str, n: int, D: int, d: int, S: int, rng: np.random.Generator,
                    real_x: np.ndarray | None) -> np.ndarray:
    if name == X:
        if real_x is not None and len(real_x):
            return real_x[rng.integers(0, len(real_x), n)].astype(np.float32)
        return rng.random((n, D), dtype=np.float32)
    if name == Z:
        return rng.standard_normal((n, d), dtype=np.float32)
    if name == EPS:
        return rng.standard_normal((n, S, d), dtype=np.float32)
    raise ValueError(f"no example input for graph input {name!r} (expected x, z or eps)")


def _dynamic_shapes(inputs: list[str]) -> dict:
    N = torch.export.Dim("N", min=1)
    S = torch.export.Dim("S", min=1)
    return {name: ({0: N, 1: S} if name == EPS else {0: N}) for name in inputs}


def export_graph(spec: GraphSpec, path: Path, *, D: int, d: int) -> None:
    """Write one graph to `path` with named inputs/outputs, dynamic batch (and S) axes, opset OPSET."""
    import onnx

    rng = np.random.default_rng(0)
    # Trace with batch >= 2 (and S >= 2) so no axis is specialised to 1.
    example = tuple(torch.from_numpy(_example_inputs(n, 3, D, d, 4, rng, None)) for n in spec.inputs)
    spec.module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            spec.module, example, str(path), input_names=spec.inputs, output_names=spec.outputs,
            dynamic_shapes=_dynamic_shapes(spec.inputs), opset_version=OPSET, dynamo=True,
            external_data=False, verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def check_parity(spec: GraphSpec, path: Path, *, D: int, d: int, real_x: np.ndarray | None) -> dict[str, float]:
    """Run the graph in ONNX Runtime and the torch module on the same inputs; raise if they differ.

    Returns the worst error per output (absolute, or relative for `spec.relative` outputs).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_names = [o.name for o in session.get_outputs()]
    if got_names != spec.outputs:
        raise ExportError(f"{path.name}: outputs {got_names}, expected {spec.outputs}")
    rng = np.random.default_rng(1)
    worst = dict.fromkeys(spec.outputs, 0.0)
    for source in ("random", "real"):
        for n in PARITY_BATCHES:
            feeds = {name: _example_inputs(name, n, D, d, PARITY_SAMPLES, rng,
                                           real_x if source == "real" else None) for name in spec.inputs}
            ort_out = session.run(None, feeds)
            with torch.no_grad():
                torch_out = spec.module(*(torch.from_numpy(feeds[name]) for name in spec.inputs))
            if isinstance(torch_out, Tensor):
                torch_out = (torch_out,)
            for name, a, b in zip(spec.outputs, ort_out, torch_out, strict=True):
                b = b.numpy()
                if a.shape != b.shape:
                    raise ExportError(f"{path.name}: output {name!r} has shape {a.shape} in ONNX Runtime "
                                      f"but {b.shape} in torch ({source} inputs, batch {n})")
                if not np.isfinite(a).all():
                    raise ExportError(f"{path.name}: output {name!r} is not finite ({source} inputs, batch {n})")
                err = np.abs(a - b)
                if name in spec.relative:
                    err = err / np.maximum(np.abs(b), 1.0)
                worst[name] = max(worst[name], float(err.max()))
    for name, err in worst.items():
        tol = REL_TOL if name in spec.relative else ABS_TOL
        if err > tol:
            kind = "relative" if name in spec.relative else "absolute"
            raise ExportError(f"{path.name}: ONNX Runtime and torch differ on {name!r} by {err:.3g} "
                              f"({kind}), more than the tolerance {tol:g}")
    return worst


def _card_metrics(kind: str, metrics: dict) -> dict:
    exact = kind == "ppca"
    return {
        "test_elbo": None if exact else metrics.get("test_elbo"),
        "test_log_likelihood": metrics.get("test_log_likelihood"),
        "log_likelihood_exact": exact,
        "importance_samples": None if exact else metrics.get("importance_samples"),
        "bits_per_dim": metrics.get("test_bits_per_dim"),
        "bits_per_dim_note": metrics.get("bits_per_dim_note"),
    }


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, name: str | None = None) -> dict:
    """Export the model in `checkpoint` (a checkpoint.pt or its run folder) into `out_dir`; return the card.

    The run folder's `metrics.json` supplies the card's test figures. The card is written last,
    after every graph passed its checks, and is read back through the contract's reader (the one the
    service uses) before it stays.
    """
    checkpoint = Path(checkpoint)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    ckpt = load_checkpoint(checkpoint)
    model = driver_for(ckpt["kind"]).build_model(ckpt)
    target = Path(out_dir)
    name = name or target.resolve().name
    # Whatever else the folder holds (a run's checkpoint, metrics and plots, when `fit` exports into its own
    # folder) stays; the model's own files are the new ones.
    old_model_files = _model_files(target)
    with staged(target, carry=lambda f: f not in old_model_files) as out:
        return _export_into(ckpt, model, run_dir, out, name)


def _model_files(folder: Path) -> set[str]:
    """The files of a model folder that an export writes: the card, the graphs, and what the card lists."""
    names = {CARD, *(p.name for p in folder.glob("*.onnx"))}
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        names |= set(read_json(folder / CARD).get("files", {}))
    return names


def _export_into(ckpt: dict, model, run_dir: Path, out: Path, name: str) -> dict:
    kind, meta, config = ckpt["kind"], ckpt["meta"], ckpt["config"]
    D, d = int(config["data_dim"]), int(config["latent_dim"])
    real_x = _real_inputs(meta)
    graphs, files, parity = {}, {}, {}
    for role, spec in graphs_for(kind, model).items():
        fname = f"{role}.onnx"
        path = out / fname
        export_graph(spec, path, D=D, d=d)
        parity[role] = check_parity(spec, path, D=D, d=d, real_x=real_x)
        graphs[role] = fname
        files[fname] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}

    metrics_path = run_dir / METRICS
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    if not metrics:
        log.warning("%s: no %s beside the checkpoint; the card carries no test figures", run_dir, METRICS)
    training = dict(meta.get("training", {}))
    card = {
        "name": name,
        "kind": kind,
        "image_shape": list(meta["image_shape"]),
        "channels": int(meta.get("channels", 1)),
        "data_dim": D,
        "latent_dim": d,
        "likelihood": config.get("likelihood", "gaussian"),
        "flows": int(config.get("flows", 0)),
        "flow_type": config.get("flow_type") if int(config.get("flows", 0)) else None,
        "noise_variance": float(model.sigma2.detach()) if kind == "ppca" else None,
        "dataset": meta.get("dataset_summary", {"name": meta.get("dataset")}),
        "training": training,
        "metrics": _card_metrics(kind, metrics),
        "onnx_opset": OPSET,
        "graphs": graphs,
        "files": files,
        "parity": {"max_error": parity, "abs_tol": ABS_TOL, "rel_tol": REL_TOL, "batches": list(PARITY_BATCHES)},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return write_card(out, card).raw


def _real_inputs(meta: dict) -> np.ndarray | None:
    """Test rows of the model's dataset, for the parity check on real images (None if unavailable)."""
    try:
        data = reopen_dataset(meta)  # a .npy / IDX file stays mapped: only the rows drawn are read
    except (DataError, OSError, ValueError) as e:
        log.warning("parity on real inputs skipped: cannot reload dataset %r (%s)", meta.get("dataset"), e)
        return None
    return data.test
