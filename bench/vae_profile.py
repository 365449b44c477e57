"""Where one training epoch of the amortized flow-VAE goes (bench/vae_speed.py's setting), from torch.profiler.

    .venv/bin/python -m bench.vae_profile [--threads 1 2] [--flow-type amortized]

Profiles one epoch after two warm-up epochs and splits its CPU time (the main thread's, which is the wall
time: intra-op threads run inside its operator calls): the encoder output layer's matrix products (forward
and backward) and the flow outputs' share of them (810 of its 890 columns), `u_hat` and the K flow steps
(forward: the calls in `training.vae`, labelled; backward: the autograd nodes those calls created, matched
by sequence number), Adam's step, and the rest. Works on any checkout whose training/vae.py calls `u_hat`,
`planar_flows_fast` or `fused_planar_flows` by name. Prints only.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import training.vae as vae_module
from bench.vae_speed import Trainer

LABELS = {"u_hat": "u_hat", "planar_flows_fast": "flows", "fused_planar_flows": "flows"}


def _labelled(fn, label):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return call


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def split(flows: int, flow_type: str, threads: int) -> tuple[float, dict[str, float]]:
    """(the profiled epoch's ms, {part: ms})."""
    torch.set_num_threads(threads)
    trainer = Trainer(flows, flow_type)
    for _ in range(2):
        trainer.run_epoch()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.run_epoch()
    events = prof.events()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    parts: dict[str, float] = {}
    seqs: dict[str, set[int]] = {}
    for e in events:
        if e.name in LABELS.values():
            parts[f"{e.name} forward"] = parts.get(f"{e.name} forward", 0.0) + e.cpu_time_total / 1e3
            seqs.setdefault(e.name, set()).update(c.sequence_nr for c in _descendants(e) if c.sequence_nr >= 0)
    for label, nrs in seqs.items():
        parts[f"{label} backward"] = sum(e.cpu_time_total for e in events if e.sequence_nr in nrs and e.name
                                         .startswith("autograd::engine::evaluate_function:")) / 1e3
    out_cols = 2 * 40 + (flows * 81 if flow_type == "amortized" else 0)
    layer = sum(e.self_cpu_time_total for e in events if e.name in ("aten::mm", "aten::addmm")
                and any(out_cols in shape for shape in e.input_shapes)) / 1e3
    parts["encoder output layer, mean and log_var columns (matmul fwd + bwd)"] = layer * 80 / out_cols
    if out_cols > 80:
        parts["encoder output layer, the 810 flow columns (matmul fwd + bwd)"] = layer * (out_cols - 80) / out_cols
    parts["Adam step"] = sum(e.cpu_time_total for e in events if e.name.startswith("Optimizer.step")) / 1e3
    parts["rest (other layers' matmuls, likelihood, autograd engine, ...)"] = total - sum(parts.values())
    return total, parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--flow-type", default="amortized", choices=["amortized", "global"])
    args = p.parse_args(argv)
    for name, label in LABELS.items():
        if hasattr(vae_module, name):
            setattr(vae_module, name, _labelled(getattr(vae_module, name), label))
    for threads in args.threads:
        total, parts = split(10, args.flow_type, threads)
        print(f"\n{args.flow_type} flow-vae, {threads} thread(s): profiled epoch {total:.0f} ms (CPU, main thread)")
        for part, ms in parts.items():
            print(f"  {part:70s} {ms:7.1f} ms  {100 * ms / total:5.1f} %")


if __name__ == "__main__":
    main()
