"""One fit from its settings to a run folder: load the data, fit with the kind's driver, export the graphs.

`python -m training fit` and `build-defaults` both call :func:`fit`.
"""

from __future__ import annotations

from pathlib import Path

from training.config import FitJob
from training.data import load_dataset
from training.drivers import driver_for
from training.export import export_checkpoint


def fit(job: FitJob, out: str | Path, *, export: bool = True) -> dict:
    """Fit `job` into the folder `out` (checkpoint, metrics.json, plots, and with `export` the ONNX graphs
    and card.json); the metrics."""
    out = Path(out)
    d = job.data
    data = load_dataset(d.dataset, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                        image_size=d.image_size, channels=d.channels)
    metrics = driver_for(job.kind).fit(job, data, out)
    if export:
        export_checkpoint(out, out)
    return metrics
