"""The model repository (`models/NAME/card.json` + ONNX graphs): reading and validating it.

This is the one reader of the contract in `models/README.md`. It needs neither torch nor ONNX
Runtime, so the exporter (training) and the server (service) share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Version 2 added `channels` (1 or 3) and the pixel layout; a version-1 card is a grayscale model.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CARD = "card.json"
CHANNELS = (1, 3)
PIXEL_LAYOUT = "row-major HWC"  # x[n, (i * W + j) * C + c] is row i, column j, channel c
KINDS = ("ppca", "vae", "flow-vae")
LIKELIHOODS = ("bernoulli", "gaussian")
# The graphs each kind must have: role -> required.
REQUIRED_GRAPHS = {
    "ppca": ("encoder", "decoder", "loglik"),
    "vae": ("encoder", "decoder", "bound"),
    "flow-vae": ("encoder", "decoder", "bound"),
}

log = logging.getLogger(__name__)


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


def discover_models(models_dir: str | Path) -> tuple[dict[str, ModelCard], dict[str, str]]:
    """Every valid model folder under `models_dir` by name, and the broken ones with the reason.

    A folder is a model folder when it holds a `card.json` or any `.onnx` file, or when it cannot be
    read (then nobody can tell); other entries (README.md, hidden folders) are ignored. Any failure in
    one folder marks that folder broken and never stops the others. The reasons name the files with
    their full paths (for the log); `public_reason` takes those out before a client sees them.
    """
    valid: dict[str, ModelCard] = {}
    broken: dict[str, str] = {}
    for sub in model_folders(models_dir):
        try:
            card = read_model_folder(sub)
        except ModelRepositoryError as e:
            broken[sub.name] = str(e)
            log.warning("skipping model folder %s: %s", sub, broken[sub.name])
        else:
            valid[card.name] = card
    return valid, broken


def model_folders(models_dir: str | Path) -> list[Path]:
    """The model folders of `models_dir` (see `discover_models`), by name; raises when it cannot be read.

    Hidden entries are never model folders: writers stage a folder under a hidden name and rename it into
    place when it is complete (training/staging.py).
    """
    models_dir = Path(models_dir)
    try:
        entries = sorted(models_dir.iterdir())
    except OSError as e:
        raise ModelRepositoryError(f"{models_dir}: the models directory cannot be read "
                                   f"({e.strerror or type(e).__name__})") from e
    folders = []
    for sub in entries:
        if sub.name.startswith("."):
            continue
        try:
            if not sub.is_dir() or (not (sub / CARD).exists() and not any(sub.glob("*.onnx"))):
                continue
        except OSError:
            pass  # unreadable: a model folder as far as anyone can tell (read_model_folder says why)
        folders.append(sub)
    return folders


def read_model_folder(sub: Path) -> ModelCard:
    """The validated card of the model folder `sub`; ModelRepositoryError with the reason for any fault."""
    try:
        card = load_model_card(sub)
        if card.name != sub.name:
            raise ModelRepositoryError(f"{sub / CARD}: name {card.name!r} differs from the folder name "
                                       f"{sub.name!r}")
    except ModelRepositoryError:
        raise
    except OSError as e:
        raise ModelRepositoryError(f"{sub}: the folder cannot be read ({e.strerror or type(e).__name__})") from e
    except Exception as e:  # noqa: BLE001 - one folder's fault, whatever it is, must not stop the others
        raise ModelRepositoryError(f"{sub}: {type(e).__name__}: {e}") from e
    return card


def public_reason(message: str, models_dir: str | Path) -> str:
    """`message` without the server's paths, for a response (the log keeps them).

    Paths inside the repository become relative to it (`ppca-mnist/card.json`), the repository itself
    `$LATENTSERVE_MODELS_DIR`, and any other absolute path its last component.
    """
    models_dir = Path(models_dir)
    roots = {str(models_dir), str(models_dir.absolute()), str(models_dir.resolve())}
    for root in sorted(roots, key=len, reverse=True):
        start = r"(?<![\w./:~-])" + re.escape(root.rstrip("/") or "/")
        message = re.sub(start + "/+", "", message)
        message = re.sub(start + r"(?![\w./-])", "$LATENTSERVE_MODELS_DIR", message)
    return _ABSOLUTE_PATH.sub(r"\1", message)


# An absolute path (not part of a URL or a relative path): its folders are dropped, its last component kept.
_ABSOLUTE_PATH = re.compile(r"(?<![\w./:~-])/(?:[^\s/'\"]+/+)+([^\s/'\"]*)")
