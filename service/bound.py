"""The importance-weighted bound of POST /log-likelihood: bounded chunks, no padded rows, off the event loop.

eps is `numpy.random.default_rng(seed).standard_normal((N, S, d), dtype=float32)`, but drawn chunk by
chunk as the chunks are submitted: a Generator's draws do not depend on how a run of them is split, so
these are the same numbers, and at most `window` chunks of them exist at once.

Layout: each image's S samples are cut into k slices of L samples (k = ceil(S / max_rows), L =
ceil(S / k), the last slice zero-padded), and a row of the bound graph is (x_n, one slice of eps_n).
GraphRunner runs the bound graph one row per call, so no call is padded with rows of zeros: an image
costs k * L < S + k decoder rows (the work the admission budget counts), one call never has more than
`max_rows` samples, and a sample's log_w depends only on its image, its eps, S and its place in its
slice: never on what its request was batched with (tests/service/test_batcher.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.batcher import GraphRunner
from service.numerics import bounds_from_log_weights
from service.postprocess import NonFiniteOutputError, Offload


def max_work(settings) -> int:
    """Largest N x S (images x importance samples) of one POST /log-likelihood; 413 beyond it."""
    return settings.max_images * settings.max_importance_samples // 4


@dataclass(frozen=True)
class BoundPlan:
    images: int  # N
    samples: int  # S
    slices: int  # k: rows of the bound graph per image
    slice_len: int  # L: samples per row
    images_per_chunk: int  # whole images per item queued at the runner

    @property
    def rows_per_image(self) -> int:
        return self.slices * self.slice_len

    @property
    def cost(self) -> int:
        """Decoder rows computed for the whole request, padding included."""
        return self.images * self.rows_per_image


def plan(images: int, samples: int, max_rows: int) -> BoundPlan:
    k = -(-samples // max_rows)
    L = -(-samples // k)
    return BoundPlan(images, samples, k, L, max(1, max_rows // (k * L)))


def make_feeds(p: BoundPlan, rng: np.random.Generator, x: np.ndarray, latent_dim: int) -> dict[str, np.ndarray]:
    """The bound graph's rows for images `x` [g, D]: the next g * S * d numbers of `rng` as their eps."""
    g, k, L, S = len(x), p.slices, p.slice_len, p.samples
    eps = rng.standard_normal((g, S, latent_dim), dtype=np.float32)
    if k * L != S:
        padded = np.zeros((g, k * L, latent_dim), dtype=np.float32)
        padded[:, :S] = eps
        eps = padded
    return {"x": np.repeat(x, k, axis=0), "eps": eps.reshape(g * k, L, latent_dim)}


def reducer(p: BoundPlan, first: int) -> Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The chunk's `post` (runs in the inference thread): log_w rows -> (ELBO, IW bound) per image.

    ELBO and IW bound: service/numerics.py bounds_from_log_weights (models/README.md).
    NonFiniteOutputError names the image (`first` + its place in the chunk) whose figures are not finite.
    """

    def post(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        elbo, iw = bounds_from_log_weights(out["log_w"].reshape(-1, p.rows_per_image)[:, :p.samples])
        bad = ~(np.isfinite(elbo) & np.isfinite(iw))
        if bad.any():
            raise NonFiniteOutputError("log_w", first + int(np.argmax(bad)))
        return elbo, iw

    return post


async def evaluate(runner: GraphRunner, x: np.ndarray, p: BoundPlan, seed: int, latent_dim: int, *, window: int,
                   offload: Offload) -> tuple[np.ndarray, np.ndarray]:
    """(ELBO [N], IW bound [N]) for images `x` [N, D] as planned by `p` (`plan(N, S, max_rows)`), float64.

    Chunks are prepared (eps drawn) one after another and at most `window` of them are queued or running
    at once. When one fails (429 from the queue, a non-finite result) or the caller is cancelled (its
    client went away), the chunks still queued are cancelled: the runner drops them unrun.
    """
    rng = np.random.default_rng(seed)
    starts = list(range(0, p.images, p.images_per_chunk))
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(starts)
    pending: set[asyncio.Task] = set()

    async def one(c: int, first: int, feeds: dict[str, np.ndarray]) -> None:
        results[c] = await runner.run(feeds, cost=len(feeds["x"]) * p.slice_len, post=reducer(p, first))

    try:
        for c, first in enumerate(starts):
            xs = x[first:first + p.images_per_chunk]
            feeds = await offload.run(len(xs) * p.samples * latent_dim, make_feeds, p, rng, xs, latent_dim)
            while len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                _raise_first(done)
            pending.add(asyncio.create_task(one(c, first, feeds)))
        if pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            _raise_first(done)
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
            for t in pending:
                if not t.cancelled():
                    t.exception()  # retrieved: only the first failure is the request's answer
    elbo = np.concatenate([r[0] for r in results])  # type: ignore[index]
    iw = np.concatenate([r[1] for r in results])  # type: ignore[index]
    return elbo, iw


def _raise_first(done: set[asyncio.Task]) -> None:
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if errors:
        raise errors[0]
