"""The registry's swap, in the app's own process (polls called by hand): what a request that looked up the old
version gets, that the old version's ONNX Runtime sessions are freed, and what a missed poll does."""

from __future__ import annotations

import asyncio
import os
import shutil
import weakref

import numpy as np
from svc_helpers import run_async, settings_for

from training.staging import copy_model_dir

NAME = "ppca-digits"


def test_swap_keeps_old_requests_whole_and_frees_the_old_sessions(model_repo, tmp_path):
    repo = tmp_path / "models"
    copy_model_dir(model_repo / NAME, repo / NAME)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)

    async def scenario(client, app):
        runtime = app.state.runtime
        registry = runtime.registry
        old = runtime.models[NAME]
        want = (await old.runners["encoder"].run({"x": x}))["mean"]
        sessions = [weakref.ref(r.session) for r in old.runners.values()]
        # A request that looked the old version up, and calls it only after the swap (it was reading its body).
        late = asyncio.Event()

        async def slow_request(model):
            await late.wait()
            return (await model.runners["encoder"].run({"x": x}))["mean"]

        task = asyncio.create_task(slow_request(old))
        # A new version: the same files in a new folder (another inode: a fresh export, as far as the registry sees)
        copy_model_dir(model_repo / NAME, repo / NAME)
        await registry.poll()
        new = runtime.models[NAME]
        assert new is not old
        late.set()
        np.testing.assert_array_equal(await task, want)  # answered by the version it looked up, after the swap
        np.testing.assert_array_equal((await new.runners["encoder"].run({"x": x}))["mean"], want)
        for _ in range(200):  # the old batchers stop once idle
            if not registry._retiring:
                break
            await asyncio.sleep(0.01)
        assert not registry._retiring
        del old, task
        # Freed as soon as nothing holds the old version: by reference counting, not by the cycle collector, which
        # never sees the objects of the start-up (gc.freeze in service/app.py).
        assert [s() for s in sessions] == [None] * len(sessions)
        r = await client.get("/models")
        assert [m["name"] for m in r.json()["models"]] == [NAME] and r.json()["unavailable"] == {}

    run_async(settings_for(repo, repository_poll_seconds=0), scenario)


def test_a_folder_missing_at_one_poll_is_not_unloaded(model_repo, tmp_path):
    repo = tmp_path / "models"
    copy_model_dir(model_repo / NAME, repo / NAME)

    async def scenario(client, app):
        registry, runtime = app.state.runtime.registry, app.state.runtime
        aside = repo / f".{NAME}.old"
        os.rename(repo / NAME, aside)  # the instant of a replacement made by renaming the old folder aside
        await registry.poll()
        assert NAME in runtime.models
        os.rename(aside, repo / NAME)
        await registry.poll()
        await registry.poll()
        assert NAME in runtime.models
        assert registry.index() == [{"name": NAME, "state": "READY", "reason": ""}]
        assert await registry.unload(NAME) and not await registry.unload(NAME)
        assert registry.index() == [{"name": NAME, "state": "UNLOADED", "reason": "unloaded on request"}]
        await registry.poll()
        assert NAME not in runtime.models  # the polls leave it unloaded
        await registry.load(NAME)
        assert NAME in runtime.models
        shutil.rmtree(repo / NAME)
        await registry.poll()
        assert NAME in runtime.models and runtime.ready
        await registry.poll()
        assert NAME not in runtime.models and not runtime.ready
        assert registry.index() == []
        assert (await client.get("/ready")).status_code == 503
        r = await client.post("/encode", json={"images": [[0.5] * 64]})
        assert r.status_code == 503 and r.json()["detail"] == "no models are loaded"

    run_async(settings_for(repo, repository_poll_seconds=0), scenario)


def test_the_openapi_schema_follows_the_served_models(model_repo, tmp_path):
    repo = tmp_path / "models"
    copy_model_dir(model_repo / NAME, repo / NAME)

    async def scenario(client, app):
        def model_enum(schema):
            params = schema["paths"]["/encode"]["post"]["parameters"]
            model = next(p for p in params if p["name"] == "model")["schema"]
            return next(s["enum"] for s in model.get("anyOf", [model]) if "enum" in s)

        assert model_enum((await client.get("/openapi.json")).json()) == [NAME]
        copy_model_dir(model_repo / "vae-digits", repo / "vae-digits")
        await app.state.runtime.registry.poll()
        assert model_enum((await client.get("/openapi.json")).json()) == [NAME, "vae-digits"]

    run_async(settings_for(repo, repository_poll_seconds=0), scenario)
