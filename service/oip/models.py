"""The model registry as the Open Inference Protocol sees it: every graph of every model folder is a model.

`vae-mnist/encoder.onnx` is the OIP model `vae-mnist.encoder`: its real inputs and outputs, FP32, -1 for
dynamic axes, platform `onnx_onnxv1`, and the version its card gives (`version`), else 1. The graph is
the part after the last dot (graph roles have none; folder names may). Everything is read from the
Runtime at request time, so models loaded or unloaded at run time show at once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from starlette.requests import Request

from service.batcher import GraphRunner
from service.errors import ProblemError
from service.oip.tensors import GraphSpec
from service.runtime import LoadedModel, Runtime

PLATFORM = "onnx_onnxv1"
_SPECS: weakref.WeakKeyDictionary[GraphRunner, GraphSpec] = weakref.WeakKeyDictionary()
# The Graph of each runner, made on its first request rather than on every one (a runner is one graph of one
# loaded model: a model swapped or reloaded has new runners).
_GRAPHS: weakref.WeakKeyDictionary[GraphRunner, Graph] = weakref.WeakKeyDictionary()


def spec_of(runner: GraphRunner) -> GraphSpec:
    """The graph's inputs and outputs, read from its session once per runner."""
    spec = _SPECS.get(runner)
    if spec is None:
        spec = _SPECS[runner] = GraphSpec.of_session(runner.session)
    return spec


def version_of(model: LoadedModel) -> str:
    """The card's `version` (a positive integer or a non-empty string without '/'), else 1."""
    v = model.card.raw.get("version")
    ok = (type(v) is int and v > 0) or (isinstance(v, str) and v and "/" not in v and len(v) <= 64)
    return str(v) if ok else "1"


@dataclass(frozen=True)
class Graph:
    name: str  # the OIP name, folder.graph
    model: LoadedModel
    role: str
    runner: GraphRunner
    version: str  # version_of(model)

    def metadata(self) -> dict:
        spec = spec_of(self.runner)
        return {"name": self.name, "versions": [self.version], "platform": PLATFORM,
                "inputs": [t.metadata() for t in spec.inputs], "outputs": [t.metadata() for t in spec.outputs]}


def not_ready(request: Request) -> ProblemError | None:
    """503 (with Retry-After) while the models load, or when none could be loaded; None when ready."""
    runtime: Runtime = request.app.state.runtime
    if runtime.ready:
        return None
    task = request.app.state.loading_task
    detail = runtime.load_error or ("no models could be loaded" if task is not None and task.done()
                                    else "the models are still loading")
    return ProblemError(503, "Not ready", detail, slug="not-ready",
                        headers={"Retry-After": str(request.app.state.settings.retry_after_s)})


def resolve(request: Request, name: str, version: str | None) -> Graph:
    """The graph called `name` (folder.graph) at `version` (None: the one it has); 404 naming what exists."""
    if (err := not_ready(request)) is not None:
        raise err
    runtime: Runtime = request.app.state.runtime
    folder, _, role = name.rpartition(".")
    request.scope.setdefault("state", {})["model"] = folder or name  # the metrics' model label (bounded)
    model = runtime.models.get(folder)
    runner = model.runners.get(role) if model is not None else None
    if runner is None:
        if folder in runtime.broken:
            detail = f"model {name!r} is unavailable: its folder failed validation ({runtime.broken[folder]})"
        elif model is not None:
            detail = (f"model {folder!r} has no graph {role!r}; its OIP models are "
                      + ", ".join(f"{folder}.{r}" for r in model.runners))
        else:
            detail = (f"no model {name[:200]!r}; models are named folder.graph, e.g. "
                      + ", ".join(names(runtime)[:8]))
        raise ProblemError(404, "Unknown model", detail, slug="unknown-model")
    graph = _GRAPHS.get(runner)
    if graph is None or graph.model is not model:
        graph = _GRAPHS[runner] = Graph(name, model, role, runner, version_of(model))
    if version is not None and version != graph.version:
        raise ProblemError(404, "Unknown model version", f"model {name!r} has version {graph.version}, not "
                           f"{version[:40]!r}", slug="unknown-model")
    return graph


def names(runtime: Runtime) -> list[str]:
    return [f"{m}.{role}" for m in sorted(runtime.models) for role in runtime.models[m].runners]


def index(runtime: Runtime, ready_only: bool) -> list[dict]:
    """The repository index: every graph of every loaded folder READY; every broken folder, and every one unloaded
    on request, UNAVAILABLE."""
    out = [{"name": f"{m.name}.{role}", "version": version_of(m), "state": "READY"}
           for m in sorted(runtime.models.values(), key=lambda m: m.name) for role in m.runners]
    if not ready_only:
        out += [{"name": folder, "version": "", "state": "UNAVAILABLE", "reason": reason}
                for folder, reason in sorted(runtime.broken.items())]
        out += [{"name": m["name"], "version": "", "state": "UNAVAILABLE", "reason": m["reason"]}
                for m in runtime.registry.index() if m["state"] == "UNLOADED"]
    return out
