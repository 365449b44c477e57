"""The VAEs on a GPU: s/epoch of vae and flow-vae fitted with `--device cuda` (nccl under torchrun), against the
same fits on 2 CPU threads, and on all of the host's GPUs with torchrun when it has several. About 2 minutes.

    .venv/bin/python -m bench.gpu [--epochs 20] [--cpu-epochs 2] [--no-record]
    .venv/bin/python -m bench.gpu --device cpu --epochs 1 --cpu-epochs 1 --no-record   # a rehearsal without GPU

Real `python -m training fit` runs (the default architecture, mnist5k-bin, batch 100); s/epoch from each
fit's metrics.json, its first epoch (CUDA start-up) included. Needs torch with CUDA and a GPU; nothing else
in the project does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.distributed import fit, vae_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs per GPU fit")
    p.add_argument("--cpu-epochs", type=int, default=2, help="epochs per CPU reference fit (2 threads)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to rehearse the script without a GPU")
    p.add_argument("--no-record", action="store_true", help="print only, do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    import torch

    from bench.report import publish, table

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and gpus == 0:
        print(f"bench.gpu: torch {torch.__version__} sees no CUDA device; run it on a GPU host with a CUDA build "
              "of torch (or --device cpu to rehearse)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (rehearsal on the CPU)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("vae", "flow-vae"):
            extra = ["--eval-samples", "10", "--device"]
            cpu = fit([*vae_args(model, "mnist5k-bin", args.cpu_epochs, 2), *extra, "cpu"], Path(tmp) / "cpu",
                      threads=2)["seconds_per_epoch"]
            one = fit([*vae_args(model, "mnist5k-bin", args.epochs, 1), *extra, args.device],
                      Path(tmp) / "gpu")["seconds_per_epoch"]
            rows.append([model, "CPU, 2 threads", f"{cpu:.3f}", "1.0x"])
            rows.append([model, f"1 GPU ({args.device})", f"{one:.3f}", f"{cpu / one:.1f}x"])
            print(f"{model}: CPU (2 threads) {cpu:.3f} s/epoch, 1 {args.device} {one:.3f} s/epoch", flush=True)
            if gpus > 1 and args.device == "cuda":
                many = fit([*vae_args(model, "mnist5k-bin", args.epochs, 1), *extra, "cuda"], Path(tmp) / "ddp",
                           procs=gpus)["seconds_per_epoch"]
                rows.append([model, f"{gpus} GPUs (torchrun, nccl)", f"{many:.3f}", f"{cpu / many:.1f}x"])
    body = (f"GPU: {name}; {gpus} visible; {os.cpu_count()} CPU cores on the host. s/epoch of `fit` "
            f"({args.epochs} epochs on the GPU, {args.cpu_epochs} on the CPU; the first epoch included), speed-up "
            "against the same fit on 2 CPU threads of the same host.\n\n"
            + table(["model", "where", "s/epoch", "speed-up"], rows))
    publish("Distributed training (GPU)", body, module="bench.gpu", save=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
