"""`card.json`, the description of a model folder (`models/README.md`): its format, the one reader and
the one writer.

The exporter (training/export.py) writes cards with `write_card` and the service reads them with
`load_model_card`; both validate against the same rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_repository.graphs import REQUIRED_GRAPHS

# Version 2 added `channels` (1 or 3) and the pixel layout; a version-1 card is a grayscale model.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CARD = "card.json"
CHANNELS = (1, 3)
PIXEL_LAYOUT = "row-major HWC"  # x[n, (i * W + j) * C + c] is row i, column j, channel c
# What every model takes: float32 intensities in [0, 1], ink = 1 (light ink on black, as MNIST).
INPUT = {"dtype": "float32", "range": [0, 1], "layout": PIXEL_LAYOUT, "ink": 1}
KINDS = tuple(REQUIRED_GRAPHS)  # ppca, vae, flow-vae
LIKELIHOODS = ("bernoulli", "gaussian")
FLOW_TYPES = ("amortized", "global")  # flow parameters from the encoder per image, or shared by all
# The card's fields that describe a model to its users (GET /models), with their JSON types: the service
# derives its response schema from this table (service/schemas.py) and `ModelCard.summary` fills it.
SUMMARY_FIELDS: dict[str, tuple[Any, str]] = {
    "name": (str, "model name (= its folder name)"),
    "kind": (str, f"one of {', '.join(KINDS)}"),
    "image_shape": (list[int], "[H, W] of the images the model takes and gives"),
    "channels": (int, "1: grayscale; 3: RGB (images H x W x 3, D = H * W * 3)"),
    "data_dim": (int, "D = H * W * channels"),
    "latent_dim": (int, "d"),
    "likelihood": (str, f"p(x | z): one of {', '.join(LIKELIHOODS)}"),
    "flows": (int, "K planar flows (0 when none)"),
    "flow_type": (str | None, f"{' or '.join(FLOW_TYPES)}; null without flows"),
    "noise_variance": (float | None, "ppca's sigma2; null for the VAEs"),
    "metrics": (dict[str, Any], "test figures in nats per image and bits/dim (models/README.md)"),
    "graphs": (dict[str, str], "role -> ONNX file name"),
}

class ModelRepositoryError(ValueError):
    """A model folder is missing, malformed or corrupt; the message names the file and the fault."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    kind: str
    image_shape: tuple[int, int]
    data_dim: int
    latent_dim: int
    likelihood: str
    flows: int
    flow_type: str | None
    noise_variance: float | None
    metrics: dict
    graphs: dict[str, str]
    path: Path
    raw: dict
    channels: int = 1

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The shape of one image as the models see it: (H, W) for grayscale, (H, W, C) for colour."""
        return self.image_shape if self.channels == 1 else (*self.image_shape, self.channels)

    def summary(self) -> dict[str, Any]:
        """The fields of SUMMARY_FIELDS, as JSON values."""
        out = {name: getattr(self, name) for name in SUMMARY_FIELDS}
        out["image_shape"] = list(self.image_shape)
        return out

    def graph_path(self, role: str) -> Path:
        try:
            return self.path / self.graphs[role]
        except KeyError:
            raise ModelRepositoryError(
                f"model {self.name!r} ({self.kind}) has no {role!r} graph; it has {sorted(self.graphs)}"
            ) from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_card(model_dir: str | Path, *, verify_files: bool = True) -> ModelCard:
    """Read `model_dir/card.json`, check its fields against the contract and every file's sha256."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD
    if not card_path.is_file():
        raise ModelRepositoryError(f"{card_path}: missing (every model folder needs a {CARD})")
    try:
        raw = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelRepositoryError(f"{card_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelRepositoryError(f"{card_path}: expected a JSON object, got {type(raw).__name__}")

    def field(key: str, types: type | tuple[type, ...], *, nullable: bool = False) -> Any:
        if key not in raw:
            raise ModelRepositoryError(f"{card_path}: missing field {key!r}")
        value = raw[key]
        if value is None and nullable:
            return None
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ModelRepositoryError(f"{card_path}: field {key!r} must not be a boolean")
        if not isinstance(value, types):
            expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise ModelRepositoryError(f"{card_path}: field {key!r} must be {expected}, got {value!r}")
        return value

    version = field("format_version", int)
    if version not in READABLE_VERSIONS:
        raise ModelRepositoryError(f"{card_path}: format_version {version} is not supported "
                                   f"(this reader knows versions {', '.join(map(str, READABLE_VERSIONS))})")
    kind = field("kind", str)
    if kind not in KINDS:
        raise ModelRepositoryError(f"{card_path}: kind {kind!r} is unknown (expected one of {', '.join(KINDS)})")
    likelihood = field("likelihood", str)
    if likelihood not in LIKELIHOODS:
        raise ModelRepositoryError(f"{card_path}: likelihood {likelihood!r} is unknown "
                                   f"(expected one of {', '.join(LIKELIHOODS)})")
    shape = field("image_shape", list)
    if len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ModelRepositoryError(f"{card_path}: image_shape must be [H, W] with positive integers, got {shape}")
    channels = field("channels", int) if version >= 2 else 1
    if channels not in CHANNELS:
        raise ModelRepositoryError(f"{card_path}: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    data_dim = field("data_dim", int)
    if data_dim != shape[0] * shape[1] * channels:
        raise ModelRepositoryError(f"{card_path}: data_dim {data_dim} != H * W * C = {shape[0]} * {shape[1]} * "
                                   f"{channels} = {shape[0] * shape[1] * channels}")
    latent_dim = field("latent_dim", int)
    if latent_dim < 1:
        raise ModelRepositoryError(f"{card_path}: latent_dim must be >= 1, got {latent_dim}")
    flows = field("flows", int)
    if flows < 0 or (kind == "flow-vae") != (flows > 0):
        raise ModelRepositoryError(f"{card_path}: flows = {flows} does not fit kind {kind!r} "
                                   "(flow-vae needs flows >= 1, the others 0)")
    graphs = field("graphs", dict)
    missing = [role for role in REQUIRED_GRAPHS[kind] if role not in graphs]
    if missing:
        raise ModelRepositoryError(f"{card_path}: graphs lacks {missing} (a {kind} model needs "
                                   f"{list(REQUIRED_GRAPHS[kind])})")
    files = field("files", dict)
    for role, fname in graphs.items():
        if not isinstance(fname, str) or not fname:
            raise ModelRepositoryError(f"{card_path}: graphs[{role!r}] must be a file name (a string), got {fname!r}")
        if fname not in files:
            raise ModelRepositoryError(f"{card_path}: graph {role!r} file {fname!r} has no entry in 'files'")
    for fname, entry in files.items():
        if Path(fname).name != fname:
            raise ModelRepositoryError(f"{card_path}: file names must be plain names in the folder, got {fname!r}")
        path = model_dir / fname
        if not path.is_file():
            raise ModelRepositoryError(f"{path}: missing (listed in {CARD})")
        if verify_files:
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise ModelRepositoryError(f"{card_path}: files[{fname!r}] needs a 'sha256' string")
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise ModelRepositoryError(f"{path}: sha256 {actual} does not match the card's "
                                           f"{entry['sha256']} (the file is corrupt or was changed)")
    noise_variance = field("noise_variance", (int, float), nullable=True)
    flow_type = field("flow_type", str, nullable=True)
    return ModelCard(
        name=field("name", str),
        kind=kind,
        image_shape=(shape[0], shape[1]),
        data_dim=data_dim,
        latent_dim=latent_dim,
        likelihood=likelihood,
        flows=flows,
        flow_type=flow_type,
        noise_variance=None if noise_variance is None else float(noise_variance),
        metrics=field("metrics", dict),
        graphs=dict(graphs),
        path=model_dir,
        raw=raw,
        channels=channels,
    )


def write_card(model_dir: str | Path, card: dict[str, Any]) -> ModelCard:
    """Write `card` (the fields of models/README.md but `format_version` and `input`, which are this
    contract's) as `model_dir/card.json`, atomically, and read it back through `load_model_card`: a card
    the service would refuse is never left behind."""
    model_dir = Path(model_dir)
    card = {"format_version": FORMAT_VERSION, **card, "input": INPUT}
    path = model_dir / CARD
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
    try:
        return load_model_card(model_dir)
    except ModelRepositoryError:
        path.unlink(missing_ok=True)
        raise
