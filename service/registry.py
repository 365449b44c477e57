"""The model registry: loads, reloads and unloads models while the service runs, as Triton's poll mode does.

Every `repository_poll_seconds` (0: never) the registry compares each folder of the repository with the
version it serves, by the folder's `fingerprint`: the bytes of its card.json (which hold every file's sha256)
and the identity (inode, size, modification time) of the folder, the card and each file the card lists.

- A new valid folder is loaded; a changed one is loaded again and swapped in.
- A folder that is gone at two polls in a row is unloaded (one poll could fall in the instant of a replacement
  made by renaming the old folder aside, then the new one into place).
- A folder that fails to load is listed in `runtime.broken` with its reason (GET /models, the log). When its
  model was loaded already, the previous version goes on serving. A failed version is not tried again until
  the folder changes.

A swap is atomic: `runtime.models[name]` is replaced on the event loop, between two steps of any request.
A request looks its model up once (service/app.py `resolve_model`) and keeps that LoadedModel to its end, so
it sees the old version or the new one, never a mix, and never fails because of the swap. The old version's
batchers run what they had queued, then stop (`GraphRunner.retire`); its ONNX Runtime sessions are freed
when the last request that holds it ends.

`load(name)` and `unload(name)` are the explicit controls (service/routes/control.py, service/oip/repository.py):
a model unloaded so stays unloaded, whatever the polls find, until loaded again. Loading runs in a thread of its
own, never on the event loop nor in the inference threads, one change at a time. Their errors are domain errors
(service/errors.py answers them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from model_repository.card import CARD, ModelRepositoryError
from service.repository import model_folders, public_reason, read_model_folder

if TYPE_CHECKING:
    from service.runtime import LoadedModel, Runtime

log = logging.getLogger("service.registry")

Fingerprint = tuple


class ModelNotFoundError(LookupError):
    """The repository has no model folder of that name (404)."""

    def __init__(self, name: str):
        super().__init__(f"the model repository has no folder {name[:200]!r}")


class ModelLoadError(RuntimeError):
    """A model folder failed to load (409); its message, the `reason`, holds no server path (clients see it)."""

    def __init__(self, name: str, reason: str):
        super().__init__(reason)
        self.name, self.reason = name, reason


class _ChangedError(Exception):
    """The folder changed while it was being read: the next poll (or try) reads the new version."""


def _identity(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (path.name, None)
    return (path.name, st.st_ino, st.st_size, st.st_mtime_ns)


def fingerprint(folder: Path) -> Fingerprint | None:
    """What identifies the version of the model folder `folder`; None when it is not (or no longer) one."""
    try:
        st = folder.stat()
        if not stat.S_ISDIR(st.st_mode):
            return None
        try:
            fd = os.open(folder / CARD, os.O_RDONLY)
        except FileNotFoundError:
            graphs = sorted(folder.glob("*.onnx"))
            return ("no card", st.st_ino, *map(_identity, graphs)) if graphs else None
        with os.fdopen(fd, "rb") as f:
            card_st, data = os.fstat(f.fileno()), f.read()
        try:
            files = json.loads(data).get("files")
            names = sorted(n for n in files if isinstance(n, str) and Path(n).name == n)
        except (ValueError, AttributeError, TypeError):  # a malformed card: read_model_folder says why
            names = []
        return (st.st_ino, hashlib.sha256(data).hexdigest(), card_st.st_ino, card_st.st_mtime_ns,
                *(_identity(folder / n) for n in names))
    except FileNotFoundError:
        return None
    except OSError as e:  # unreadable: still a model folder, whose fault read_model_folder names
        return ("unreadable", e.errno)


class ModelRegistry:
    """Loads the repository at start, then polls it (and takes explicit loads and unloads)."""

    def __init__(self, runtime: Runtime):
        self.runtime, self.settings = runtime, runtime.settings
        self.models_dir = Path(self.settings.models_dir)
        self.started = False
        # Called after every change of the served models (the app drops its cached OpenAPI schema).
        self.listeners: list[Callable[[], None]] = []
        self._versions: dict[str, Fingerprint] = {}  # the folder version each served model was loaded from
        self._failed: dict[str, Fingerprint] = {}  # a version that failed: not tried again until it changes
        self._missing: set[str] = set()  # served models whose folder was gone at the last poll
        self._pinned: set[str] = set()  # unloaded explicitly: the polls leave them alone
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._poller: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:  # the app's lifespan run again (a test client of a test client): loaded already
            return
        await self.poll()  # the first poll loads the whole repository
        self.started = True
        self._changed()
        r = self.runtime
        log.info("models ready: %s (default %s); broken: %s", sorted(r.models), r.default_model, sorted(r.broken))
        if self.settings.default_model and r.default_model != self.settings.default_model:
            self._log_default(r.default_model)
        interval = self.settings.repository_poll_seconds
        if interval > 0:
            self._poller = asyncio.create_task(self._poll_forever(interval), name="repository-poll")
            log.info("polling the model repository every %g s", interval)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        poller, self._poller = self._poller, None
        if poller is not None and poller.get_loop() is not loop:  # started by a lifespan run in another loop
            poller.get_loop().call_soon_threadsafe(poller.cancel)
        elif poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        for task in [t for t in self._retiring if t.get_loop() is loop]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:  # a poll's own fault must not end the polling
                log.exception("polling the model repository failed")

    # -- what the polls and the controls do --------------------------------------------------------

    async def poll(self) -> None:
        """Bring the served models in line with the repository: load new and changed folders, unload removed."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            found, error = await loop.run_in_executor(self._loader, self._scan)
            if error is not None:
                # Keep serving what is loaded: an unreadable repository (a volume being remounted) is no removal.
                self.runtime.load_error = public_reason(error, self.models_dir)
                if error != self._last_error:
                    log.error("the model repository cannot be read: %s", error)
                    self._last_error = error
                    self._changed()
                return
            if self._last_error is not None:
                log.info("the model repository can be read again")
                self.runtime.load_error = self._last_error = None
                self._changed()
            for name, (path, fp) in found.items():
                if name in self._pinned or fp in (self._versions.get(name), self._failed.get(name)):
                    continue
                with contextlib.suppress(ModelLoadError):  # recorded in broken and logged
                    await self._load(name, path, fp)
            for name in [n for n in self.runtime.models if n not in found]:
                if name in self._missing:
                    await self._unload(name, "its folder was removed")
                else:
                    self._missing.add(name)
            self._missing &= set(self.runtime.models) - set(found)
            gone = [n for n in self.runtime.broken if n not in found and n not in self.runtime.models]
            for name in gone:
                del self.runtime.broken[name]
                self._failed.pop(name, None)
            if gone:
                self._changed()

    async def load(self, name: str) -> LoadedModel:
        """Load (or reload) model `name` from its folder now; the polls take it up again if it was unloaded.

        Raises ModelNotFoundError when the repository has no such folder and ModelLoadError when the folder
        fails (a version of it that was loaded goes on serving).
        """
        async with self._lock:
            path = self.models_dir / name
            if name.startswith(".") or Path(name).name != name:
                raise ModelNotFoundError(name)
            loop = asyncio.get_running_loop()
            for _ in range(3):  # a folder caught mid-replacement is read again
                fp = await loop.run_in_executor(self._loader, fingerprint, path)
                if fp is None:
                    raise ModelNotFoundError(name)
                self._pinned.discard(name)
                model = await self._load(name, path, fp)
                if model is not None:
                    return model
            raise ModelLoadError(name, "its folder kept changing while it was read; try again")

    async def unload(self, name: str) -> bool:
        """Stop serving model `name` (its requests in flight finish); the polls leave it alone until `load`.

        False when it was not loaded.
        """
        async with self._lock:
            if name not in self.runtime.models:
                return False
            self._pinned.add(name)
            await self._unload(name, "unloaded on request")
            self._changed()
            return True

    def index(self) -> list[dict]:
        """Every model the registry knows of: name, state (READY, UNAVAILABLE, UNLOADED) and reason."""
        r, out = self.runtime, {}
        for name in self._pinned:
            out[name] = {"name": name, "state": "UNLOADED", "reason": "unloaded on request"}
        for name, reason in r.broken.items():
            out[name] = {"name": name, "state": "UNAVAILABLE", "reason": reason}
        for name in r.models:
            out[name] = {"name": name, "state": "READY", "reason": r.broken.get(name, "")}
        return [out[n] for n in sorted(out)]

    # -- the steps ---------------------------------------------------------------------------------

    def _scan(self) -> tuple[dict[str, tuple[Path, Fingerprint]], str | None]:
        try:
            folders = model_folders(self.models_dir)
        except ModelRepositoryError as e:
            return {}, str(e)
        found = {}
        for sub in folders:
            fp = fingerprint(sub)
            if fp is not None:
                found[sub.name] = (sub, fp)
        return found, None

    def _prepare(self, path: Path, fp: Fingerprint) -> LoadedModel:
        """Read, check, load and warm up the folder (in the loader thread); _ChangedError if it changed meanwhile."""
        try:
            card = read_model_folder(path)
            try:
                model = self.runtime.load_model(card)
            except Exception as e:  # any error class of ONNX Runtime, or ours: this folder alone
                reason = str(e) if isinstance(e, ModelRepositoryError) else f"{type(e).__name__}: {e}"
                raise ModelRepositoryError(f"{path}: {reason}") from e
        except ModelRepositoryError:
            if fingerprint(path) != fp:
                raise _ChangedError() from None  # read mid-replacement: not this version's fault
            raise
        if fingerprint(path) != fp:
            raise _ChangedError()
        return model

    async def _load(self, name: str, path: Path, fp: Fingerprint) -> LoadedModel | None:
        """Load `path` and swap it in as `name`; None when it changed while read; ModelLoadError when it fails."""
        r = self.runtime
        start = time.perf_counter()
        try:
            model = await asyncio.get_running_loop().run_in_executor(self._loader, self._prepare, path, fp)
        except _ChangedError:
            return None
        except ModelRepositoryError as e:
            self._failed[name] = fp
            served = name in r.models
            r.broken[name] = public_reason(str(e), self.models_dir) + (
                " (the version loaded before goes on serving)" if served else "")
            log.warning("%s model folder %s: %s", "not reloading" if served else "skipping", path, e)
            self._changed()
            raise ModelLoadError(name, r.broken[name]) from e
        model.start(self.settings)
        old = r.models.get(name)
        r.models[name] = model
        self._versions[name] = fp
        self._failed.pop(name, None)
        self._missing.discard(name)
        r.broken.pop(name, None)
        self._changed()
        if self.started:
            log.info("model %s %s in %.2f s", name, "reloaded" if old else "loaded", time.perf_counter() - start)
        if old is not None:
            self._retire(old)
        return model

    async def _unload(self, name: str, why: str) -> None:
        model = self.runtime.models.pop(name)
        self._versions.pop(name, None)
        self._missing.discard(name)
        self.runtime.broken.pop(name, None)
        self._failed.pop(name, None)
        self._changed()
        log.info("model %s unloaded: %s", name, why)
        self._retire(model)

    def _retire(self, model: LoadedModel) -> None:
        task = asyncio.create_task(model.retire(), name=f"retire-{model.name}")
        self._retiring.add(task)

        def done(t: asyncio.Task) -> None:
            self._retiring.discard(t)
            # The sessions are freed once no request holds them; hand the memory they leave back to the system.
            self.runtime.trimmer.soon()

        task.add_done_callback(done)

    def _changed(self) -> None:
        r = self.runtime
        default = r.choose_default()
        if self.started and default != r.default_model:
            self._log_default(default)
        r.default_model = default
        r.ready = self.started and bool(r.models)
        r.metrics.known_models = frozenset(r.models) | frozenset(r.broken)
        r.metrics.models_loaded.set(len(r.models))
        r.metrics.models_broken.set(len(r.broken))
        for listener in self.listeners:
            listener()

    def _log_default(self, default: str | None) -> None:
        wanted = self.settings.default_model
        if wanted and default != wanted:
            log.error("default model %r is not loaded (loaded: %s); using %s", wanted, sorted(self.runtime.models),
                      default)
        else:
            log.info("default model: %s", default)

    def missing_required(self) -> list[str]:
        """The models `required_models` names that are not loaded (GET /ready answers 503 until none)."""
        return [n for n in self.settings.required_models if n not in self.runtime.models]
