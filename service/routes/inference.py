"""The inference endpoints: encode, decode, sample and log-likelihood, each one declaration (service/endpoint.py).

A handler reads its inputs (service/inputs.py), runs the model's graphs under the work budget
(service/inference.py), applies the numpy math of service/numerics.py and answers orjson bytes rather than
a re-validated `response_model` (which stays for OpenAPI; the tests check the answers against it).
"""

from __future__ import annotations

import secrets

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from model_repository.units import bits_per_dim, bits_per_dim_note
from service import bound
from service import inference as infer
from service import postprocess as post
from service.context import resolve_model
from service.endpoint import Endpoints
from service.errors import ProblemError, non_finite_problem
from service.inputs import check_count, read_images, read_json
from service.numerics import BINARIZATION, binarize, prior_draws
from service.openapi import DECODE_BODY, IMAGE_BODY
from service.runtime import Runtime
from service.schemas import (
    DecodeQuery,
    DecodeRequest,
    EncodeQuery,
    EncodeResponse,
    ImagesResponse,
    LogLikelihoodQuery,
    LogLikelihoodResponse,
    SampleQuery,
    SampleResponse,
)
from service.settings import Settings

endpoints = Endpoints()
IMAGE_ERRORS = (400, 404, 413, 415, 422, 429, 503)  # what reading and running images may answer


@endpoints.post("/encode", query=EncodeQuery, body=IMAGE_BODY, response=EncodeResponse, errors=IMAGE_ERRORS,
                summary="images -> posterior mean and log-variance")
async def encode(request: Request, q: EncodeQuery) -> Response:
    """Encode images: each image's posterior `mean` and `log_var` (the exact posterior for ppca).

    Send the images as multipart/form-data (file parts named `images`: PNG, JPEG, BMP, GIF, TIFF, WebP) or
    as JSON `{"images": [...]}` (H x W arrays, H x W x 3 for colour models, or flat arrays of D intensities in
    [0, 1]). Images are converted to the model's `channels` (grayscale models: colour to gray; colour models:
    RGB; transparent pixels on white); other sizes are resized to the model's
    `image_shape` and the result says `resized`. The models expect light ink on black (MNIST): use
    `invert=true` for dark ink on a light background. Flow models also give `z_k`, the mean pushed through
    the K planar flows.
    """
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    prepared = await read_images(request, settings, model, q.invert)
    x = np.stack([p.x for p in prepared])
    request.state.batch_size = len(prepared)
    flows = model.card.flows > 0
    try:
        out = await infer.run(request, model, "encoder", {"x": x}, post.ENCODER_POST[flows])
    except post.NonFiniteOutputError as e:
        raise non_finite_problem(e, prepared[e.row].source, "the encoder cannot represent this image (the "
                                 "models expect light ink on black: try invert=true)") from e
    results = []
    for i, p in enumerate(prepared):
        r = {"source": p.source, "original_shape": p.original_shape, "resized": p.resized,
             "mean": out["mean"][i], "log_var": out["log_var"][i], "z_k": None, "flow": None}
        if flows:
            r["z_k"] = out["z_k"][i]
            if q.flow_params:
                r["flow"] = {"u": out["flow_u"][i], "w": out["flow_w"][i], "b": out["flow_b"][i]}
        results.append(r)
    content = {"model": model.name, "kind": model.card.kind, "latent_dim": model.card.latent_dim,
               "inverted": q.invert, "results": results}
    d, K = model.card.latent_dim, model.card.flows
    size = len(results) * (3 * d + (K * (2 * d + 1) if q.flow_params else 0))  # numbers answered
    if size > post.INLINE_VALUES:  # off the loop; the common small answer skips the detour
        return await request.app.state.runtime.offload.json(content, size)
    return post.json_response(content)


@endpoints.post("/decode", query=DecodeQuery, body=DECODE_BODY, response=ImagesResponse, errors=IMAGE_ERRORS,
                png="JSON images, or a PNG (one image or a grid)", summary="latent codes -> images (JSON or PNG)")
async def decode(request: Request, q: DecodeQuery) -> Response:
    """Decode latent codes `z` ([N][latent_dim]) to E[x | z], clipped to [0, 1].

    JSON (H x W arrays, H x W x 3 for colour models) or PNG (one image, or a grid for several; RGB for colour
    models): `format=json|png`, or the Accept header
    (`image/png`); JSON by default.
    """
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    d = model.card.latent_dim
    body = await read_json(request, DecodeRequest, f'{{"z": [[...], ...]}}, each code {d} finite numbers',
                           max_arrays=settings.max_images + 1, max_values=settings.max_images * d)
    check_count(len(body.z), settings)
    bad = [i for i, row in enumerate(body.z) if len(row) != d]
    if bad:
        raise ProblemError(422, "Wrong latent size", f"z[{bad[0]}] has {len(body.z[bad[0]])} values; model "
                           f"{model.name!r} has latent_dim {d}", slug="wrong-latent-size")
    z = np.asarray(body.z, dtype=np.float64)
    if not np.isfinite(z).all():
        raise ProblemError(422, "Invalid latent values", "z holds NaN or infinite values (expected finite numbers)",
                           slug="invalid-latent-values")
    if np.abs(z).max() > settings.max_latent_abs:
        raise ProblemError(422, "Invalid latent values", f"|z| must be <= {settings.max_latent_abs:g} (the prior "
                           f"is N(0, I)), got {np.abs(z).max():.4g}", slug="invalid-latent-values")
    request.state.batch_size = len(z)
    png = infer.png_checked(request, model, q.format, "json", len(z), q.scale, settings)
    try:
        x = await infer.run(request, model, "decoder", {"z": z.astype(np.float32)},
                            post.decoder_post(model.card.pixel_shape))
    except post.NonFiniteOutputError as e:
        raise non_finite_problem(e, f"z[{e.row}]", f"use a code closer to the prior N(0, I) (this one has |z| "
                                 f"up to {np.abs(z[e.row]).max():.4g})") from e
    return await infer.image_response(request, model, x, png, q.scale)


@endpoints.get("/sample", query=SampleQuery, response=SampleResponse, errors=(404, 413, 422, 429, 503),
               png="a PNG grid (default) or JSON", summary="samples from the prior through the decoder")
async def sample(request: Request, q: SampleQuery) -> Response:
    """`n` images E[x | z] with z = temperature * N(0, I) drawn by `numpy.random.default_rng(seed)`.

    A PNG grid by default, upscaled 4 times so that a browser shows 28x28 digits at a readable size;
    JSON with `format=json` or Accept: application/json.
    """
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    n, temperature = q.n, q.temperature  # within the service's limits (read_query)
    seed = secrets.randbits(63) if q.seed is None else q.seed
    z = prior_draws(seed, n, model.card.latent_dim, temperature)
    request.state.batch_size = n
    png = infer.png_checked(request, model, q.format, "png", n, q.scale, settings)
    try:
        x = await infer.run(request, model, "decoder", {"z": z}, post.decoder_post(model.card.pixel_shape))
    except post.NonFiniteOutputError as e:
        raise non_finite_problem(e, f"sample {e.row} (seed {seed})", f"lower the temperature (now "
                                 f"{temperature:g})") from e
    return await infer.image_response(request, model, x, png, q.scale,
                                      {"seed": seed, "temperature": temperature, "z": z})


@endpoints.post("/log-likelihood", query=LogLikelihoodQuery, body=IMAGE_BODY, response=LogLikelihoodResponse,
                errors=IMAGE_ERRORS, summary="ELBO, importance-weighted bound (exact for ppca) and bits/dim per image")
async def log_likelihood(request: Request, q: LogLikelihoodQuery) -> Response:
    """Per image: the ELBO, the importance-weighted bound with S samples, bits/dim; exact for ppca.

    Images as for /encode. For the VAEs, eps = `numpy.random.default_rng(seed).standard_normal((N, S, d),
    dtype=float32)` for the N images of the request, fed to the model's bound graph: log_w [N, S]; ELBO = mean
    over S, bound = logsumexp - log S (models/README.md). Bernoulli models evaluate binarized input: each
    intensity >= 0.5 becomes 1, the rest 0 (after resizing and `invert`); `binarize=false` evaluates the
    intensities as they are (no bits/dim then). PPCA's log p(x) is exact (`log_likelihood_exact`).
    """
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    card = model.card
    prepared = await read_images(request, settings, model, q.invert)
    x = np.stack([p.x for p in prepared])
    N = len(x)
    request.state.batch_size = N
    binarized = card.likelihood == "bernoulli" and q.binarize
    if binarized:
        x = binarize(x)
    advice = ("the model gives this image no finite log-likelihood" + (": evaluate it binarized (binarize=true)"
              if card.likelihood == "bernoulli" and not binarized else "; check that it is light ink on black "
              "(invert=true otherwise)"))
    if card.kind == "ppca":
        try:
            out = await infer.run(request, model, "loglik", {"x": x}, post.finite_post(["log_px"]))
        except post.NonFiniteOutputError as e:
            raise non_finite_problem(e, prepared[e.row].source, advice) from e
        ll = out["log_px"].astype(np.float64)
        elbo = iw = ll
        S, seed = None, None
    else:
        S = q.samples or settings.default_importance_samples  # at most max_importance_samples (read_query)
        work, limit = N * S, bound.max_work(settings)
        if work > limit:
            raise ProblemError(413, "Too much work", f"{N} images x {S} samples = {work} evaluations; the limit "
                               f"is {limit}: send fewer images or samples", slug="too-much-work")
        seed = secrets.randbits(63) if q.seed is None else q.seed
        runtime: Runtime = request.app.state.runtime
        plan = bound.plan(N, S, settings.bound_chunk_rows)
        try:
            elbo, iw = await infer.admit(request, model, plan.cost, lambda: bound.evaluate(
                model.runners["bound"], x, plan, seed, card.latent_dim, window=settings.inference_workers,
                offload=runtime.offload))
        except post.NonFiniteOutputError as e:
            raise non_finite_problem(e, prepared[e.row].source, advice) from e
        ll = iw
    note = bits_per_dim_note(card.likelihood, binarized)
    results = [{"source": p.source, "original_shape": list(p.original_shape), "resized": p.resized,
                "log_likelihood": float(ll[i]), "log_likelihood_exact": card.kind == "ppca",
                "elbo": float(elbo[i]), "iw_bound": float(iw[i]),
                "bits_per_dim": bits_per_dim(float(ll[i]), card.data_dim, card.likelihood, binarized)}
               for i, p in enumerate(prepared)]
    return post.json_response({"model": model.name, "kind": card.kind, "likelihood": card.likelihood, "samples": S,
                               "seed": seed, "binarized": binarized,
                               "binarization": BINARIZATION if binarized else None, "bits_per_dim_note": note,
                               "results": results})
