"""One fit from its settings to a run folder: load the data, fit with the kind's driver, export the graphs.

`python -m training fit` (as one process, or as each rank of a torchrun job) and `build-defaults` both
call :func:`fit`. Under torchrun (WORLD_SIZE > 1) every rank calls it: the ranks join one process group
(training/distributed.py), each maps only its own rows of a .npy or IDX file (training/shards.py), and
rank 0 alone writes the run folder and exports it.
"""

from __future__ import annotations

from pathlib import Path

from training.config import FitJob
from training.data import load_dataset
from training.distributed import setup
from training.drivers import driver_for
from training.export import export_checkpoint
from training.shards import open_dataset


def fit(job: FitJob, out: str | Path, *, export: bool = True) -> dict | None:
    """Fit `job` into the folder `out` (checkpoint, metrics.json, plots, and with `export` the ONNX graphs
    and card.json); the metrics, or None on a torchrun rank other than 0 (which writes nothing)."""
    out = Path(out)
    d = job.data
    dist = setup(job.run.device, job.run.dist_timeout)  # one process, or a rank of a torchrun job
    try:
        data = (open_dataset(d.dataset, dist, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                             image_size=d.image_size, channels=d.channels)
                if dist.enabled else
                load_dataset(d.dataset, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                             image_size=d.image_size, channels=d.channels))
        metrics = driver_for(job.kind).fit(job, data, out, dist=dist)
        dist.close(wait=True)
    except (ValueError, FileNotFoundError) as e:
        if not dist.enabled:
            raise
        # which rank says it: the launcher interleaves the ranks' output (a PeerError names its rank itself)
        raise ValueError(f"rank {dist.rank} of {dist.world_size}: {e}") from e
    finally:
        dist.close()
    if not dist.is_main:
        return None
    if export:
        export_checkpoint(out, out)
    return metrics
