"""The loaded models: every valid folder of the repository, its graphs' ONNX Runtime sessions behind their
batchers (service/batcher.py), checked against the contract at load time and warmed up.

A folder that fails in any way (a malformed card, a graph ONNX Runtime cannot load or run, inputs or
outputs other than the contract's, no dynamic batch axis) is listed broken with its reason and never stops
the others; the reasons shown to clients hold no server path (service/repository.py public_reason).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from model_repository.card import ModelCard, ModelRepositoryError
from model_repository.graphs import EPS, FLOW_PARAMS, GRAPHS, X, Z
from service.admission import WorkBudget
from service.batcher import GraphRunner, session_options
from service.memory import Trimmer
from service.metrics import Metrics
from service.postprocess import INLINE_VALUES, Offload
from service.registry import ModelRegistry
from service.settings import PREFERRED_DEFAULTS, Settings


@dataclass
class LoadedModel:
    card: ModelCard
    runners: dict[str, GraphRunner]

    @property
    def name(self) -> str:
        return self.card.name

    def start(self, settings: Settings) -> None:
        """Start its batchers (on the event loop)."""
        if settings.batching:
            for runner in self.runners.values():
                runner.start(settings.inference_workers)

    async def retire(self) -> None:
        """Stop its batchers once their queues have run (a newer version, or none, serves in its place)."""
        await asyncio.gather(*(runner.retire() for runner in self.runners.values()))


class NotReadyError(Exception):
    """No model can be served yet (still loading, or none could be loaded); the message says which."""


class UnknownModelError(Exception):
    """A request named a model that is not loaded; the message lists the loaded ones, or why that one is not."""


class ModelControlOffError(Exception):
    """Loading and unloading over HTTP needs an API key, and the service has none (service/routes/control.py)."""


class Runtime:
    """Every loaded model, the shared thread pool and the batchers; `registry` loads, swaps and unloads models."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.models: dict[str, LoadedModel] = {}
        self.broken: dict[str, str] = {}
        self.default_model: str | None = None
        self.ready = False
        self.load_error: str | None = None
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_workers, thread_name_prefix="ort")
        self.budget = WorkBudget(settings.max_inflight_work, settings.retry_after_s, metrics)
        self.offload = Offload(settings.postprocess_workers, INLINE_VALUES)
        self.trimmer = Trimmer(self.offload.executor, settings.trim_after_work)
        self.registry = ModelRegistry(self)

    def model(self, name: str) -> LoadedModel:
        """The loaded model called `name`; UnknownModelError naming the alternatives otherwise."""
        if name in self.models:
            return self.models[name]
        if name in self.broken:
            raise UnknownModelError(f"model {name!r} is unavailable: its folder failed validation "
                                    f"({self.broken[name]})")
        raise UnknownModelError(f"model {name!r} is not loaded; loaded models: "
                                f"{', '.join(sorted(self.models)) or 'none'}")

    # -- loading (blocking: service/registry.py calls these in its loader thread) -------------------

    def load_model(self, card: ModelCard) -> LoadedModel:
        """Sessions for every graph of `card`, checked, probed and warmed up; its batchers are not started."""
        model = self._load_model(card, session_options(self.settings))
        self._warm_up(model)
        return model

    def _load_model(self, card: ModelCard, so: ort.SessionOptions) -> LoadedModel:
        runners = {}
        for role in card.graphs:
            if role not in GRAPHS:
                continue
            session = ort.InferenceSession(str(card.graph_path(role)), sess_options=so,
                                           providers=["CPUExecutionProvider"])
            _check_io(card, role, session)
            _check_runs(card, role, session)
            max_cost = self.settings.bound_chunk_rows if role == "bound" else self.settings.max_batch_size
            runners[role] = GraphRunner(card.name, role, session, settings=self.settings, executor=self.executor,
                                        metrics=self.metrics, max_cost=max_cost)
        return LoadedModel(card, runners)

    def choose_default(self) -> str | None:
        """The configured default model when it is loaded, else the first of PREFERRED_DEFAULTS loaded, else any."""
        wanted = self.settings.default_model
        if wanted in self.models:
            return wanted
        for name in PREFERRED_DEFAULTS:
            if name in self.models:
                return name
        return next(iter(sorted(self.models)), None)

    def _warm_up(self, model: LoadedModel) -> None:
        """Run every graph at batch 1 and at the largest merged batch, and probe its rows per call."""
        rng = np.random.default_rng(0)
        c = model.card
        for runner in model.runners.values():
            for n in (32 * self.settings.batch_pad_multiple + 3, 1, self.settings.max_batch_size):
                feeds = {}
                for name in runner.input_names:
                    if name == X:
                        feeds[name] = rng.random((n, c.data_dim), dtype=np.float32)
                    elif name == Z:
                        feeds[name] = rng.standard_normal((n, c.latent_dim), dtype=np.float32)
                    elif name == EPS:
                        feeds[name] = rng.standard_normal((n, 3, c.latent_dim), dtype=np.float32)
                if n == 32 * self.settings.batch_pad_multiple + 3:
                    runner.probe_rows_per_call(feeds)
                else:
                    runner._call(feeds, runner.rows_per_call)

    # -- async lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the repository (service/registry.py), then keep watching it when polling is on."""
        await self.registry.start()

    async def stop(self) -> None:
        await self.registry.stop()
        for model in self.models.values():
            for runner in model.runners.values():
                await runner.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.offload.shutdown()


def _check_io(card: ModelCard, role: str, session: ort.InferenceSession) -> None:
    """The graph's inputs and outputs must be those of models/README.md, with the card's sizes."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    want_in, want_out = list(GRAPHS[role].inputs), GRAPHS[role].outputs
    if sorted(inputs) != sorted(want_in):
        raise ModelRepositoryError(f"{card.graphs[role]}: inputs {sorted(inputs)}, expected {want_in}")
    missing = [o for o in want_out if o not in outputs]
    if role == "encoder" and card.flows > 0:
        missing += [o for o in FLOW_PARAMS if o not in outputs]
    if missing:
        raise ModelRepositoryError(f"{card.graphs[role]}: outputs lack {missing} (has {outputs})")
    # Requests are merged and padded along axis 0: a graph exported with a fixed batch size would fail
    # (or, worse, broadcast) on the first merged call, so it is refused at load time.
    for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for arg in args:
            if not arg.shape or isinstance(arg.shape[0], int):
                raise ModelRepositoryError(f"{card.graphs[role]}: {kind} {arg.name!r} has the shape {arg.shape}, "
                                           "without a dynamic batch axis 0; every input and output needs one "
                                           "(export with dynamic axes)")
    for name, info in inputs.items():
        if info.type != "tensor(float)":
            raise ModelRepositoryError(f"{card.graphs[role]}: input {name!r} is {info.type}, expected tensor(float)")
        last = info.shape[-1] if info.shape else None
        want = card.data_dim if name == X else card.latent_dim
        if isinstance(last, int) and last != want:
            raise ModelRepositoryError(f"{card.graphs[role]}: input {name!r} has last axis {last}, but the card "
                                       f"says {want}")


def _check_runs(card: ModelCard, role: str, session: ort.InferenceSession) -> None:
    """One call with two rows: a graph that loads but cannot run, or whose outputs do not follow the batch
    (a batch size fixed inside the graph), fails here, at load time, and only its own folder."""
    rows, shapes = 2, {X: (card.data_dim,), Z: (card.latent_dim,), EPS: (1, card.latent_dim)}
    feeds = {i.name: np.zeros((rows, *shapes[i.name]), np.float32) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    for info, out in zip(session.get_outputs(), outputs, strict=True):
        if out.ndim == 0 or out.shape[0] != rows:
            raise ModelRepositoryError(f"{card.graphs[role]}: output {info.name!r} has the shape {list(out.shape)} "
                                       f"for {rows} input rows; its axis 0 must follow the batch")
