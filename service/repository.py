"""The repository as the service sees it: which folders of `LATENTSERVE_MODELS_DIR` to serve, which are
broken and why, and those reasons without the server's paths. The card format itself is the contract's
(model_repository/card.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from model_repository.card import CARD, ModelCard, ModelRepositoryError, load_model_card

log = logging.getLogger("service.repository")


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
