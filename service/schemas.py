"""Request and response bodies (pydantic), with the examples shown in the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, WithJsonSchema, create_model

from model_repository.card import SUMMARY_FIELDS

# A JSON image is validated with numpy (shape, finiteness, range) so that a wrong pixel gives one clear
# message instead of 784; the schema still says what is expected.
ImageArray = Annotated[
    list[Any],
    WithJsonSchema({
        "description": "one image. For a grayscale model (channels 1 in GET /models): H rows of W intensities "
                       "(every row of the same length; other sizes than the model's are resized), or a flat "
                       "row-major array of exactly the model's D intensities (data_dim in GET /models). For a "
                       "colour model (channels 3): H rows of W pixels [R, G, B], or a flat array of D = H * W * 3 "
                       "(row-major, channels interleaved). Each value a JSON number in [0, 1] with ink = 1 (light "
                       "ink on black, as MNIST). Strings, booleans and arrays of the other model's layout are "
                       "refused (422). At most max_json_pixels values in all the JSON images of a request (see "
                       "the limits in the API description)",
        "oneOf": [
            {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1},
            {"type": "array", "minItems": 1,
             "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1}},
            {"type": "array", "minItems": 1,
             "items": {"type": "array", "minItems": 1, "items": {
                 "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 3,
                 "maxItems": 3}}},
        ],
    }),
]

_EXAMPLE_IMAGE_8x8 = [[0.0] * 8 for _ in range(8)]
for _i in range(2, 6):
    _EXAMPLE_IMAGE_8x8[_i][3] = _EXAMPLE_IMAGE_8x8[_i][4] = 1.0


# ------------------------------------------------------------------------------------------------
# Query parameters of the inference endpoints (validated by service/inputs.py `read_query`)
# ------------------------------------------------------------------------------------------------

Invert = Annotated[bool, Field(description="x -> 1 - x, for dark ink on a light background (the models expect "
                                           "light ink on black, as MNIST)")]
Format = Annotated[Literal["json", "png"] | None, Field(description="response format; default: from the Accept "
                                                          "header")]
Scale = Annotated[int, Field(ge=1, le=64, description="PNG: integer upscaling factor (nearest neighbour)")]
Seed = Annotated[int | None, Field(ge=0, le=2**63 - 1)]


class ModelQuery(BaseModel):
    model: str | None = Field(None, max_length=200, examples=["ppca-mnist"],
                              description="model name (default: the service's default model, see GET /models)")


class EncodeQuery(ModelQuery):
    invert: Invert = False
    flow_params: bool = Field(False, description="flow models: also return the flow parameters (u_hat, w, b)")


class DecodeQuery(ModelQuery):
    format: Format = None
    scale: Scale = 1


class SampleQuery(ModelQuery):
    n: int = Field(16, ge=1, le=1_000_000, description="number of samples (at most the service's max_samples, "
                   "256 by default)")
    seed: Seed = Field(None, description="makes the draw reproducible (default: random, returned in JSON)")
    temperature: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False, description="scales the prior's standard "
                               "deviation")
    format: Format = None
    scale: Scale = 4


class LogLikelihoodQuery(ModelQuery):
    invert: Invert = False
    samples: int | None = Field(None, ge=1, le=1_000_000, description="S importance samples (VAEs; default 100, "
                                "at most the service's max_importance_samples)")
    seed: Seed = Field(None, description="seed of eps ~ N(0, I) (default: random, returned)")
    binarize: bool = Field(True, description="Bernoulli models: threshold the input at 0.5 first (the figures "
                           "are probabilities only for binary images)")


# ------------------------------------------------------------------------------------------------
# Bodies
# ------------------------------------------------------------------------------------------------


class ImagesJSON(BaseModel):
    """JSON alternative to the multipart upload."""

    # extra="forbid": the body holds nothing but its images, which lets service/inputs.py bound its values
    # from a count of its commas before parsing it
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [_EXAMPLE_IMAGE_8x8]}]})
    images: list[ImageArray] = Field(..., min_length=1, description="one or more images")


class FlowParams(BaseModel):
    u: list[list[float]] = Field(..., description="u_hat per flow [K][d] (already constrained)")
    w: list[list[float]] = Field(..., description="w per flow [K][d]")
    b: list[float] = Field(..., description="b per flow [K]")


class ImageInfo(BaseModel):
    source: str = Field(..., description="the file name of the part, or images[i]")
    original_shape: list[int] = Field(..., description="[H, W] as received")
    resized: bool = Field(..., description="true when the image was resized to the model's image_shape")


class EncodeResult(ImageInfo):
    mean: list[float] = Field(..., description="posterior mean of q(z | x) (for ppca: the exact posterior)")
    log_var: list[float] = Field(..., description="log of the posterior variances (diagonal)")
    z_k: list[float] | None = Field(None, description="flow models: z_K = f_K(...f_1(mean)), the mean pushed "
                                    "through the K planar flows")
    flow: FlowParams | None = Field(None, description="flow models, with flow_params=true: the flow parameters")


class EncodeResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "vae-mnist", "kind": "vae", "latent_dim": 2, "inverted": False,
        "results": [{"source": "digit.png", "original_shape": [28, 28], "resized": False,
                     "mean": [0.12, -1.3], "log_var": [-3.1, -2.9], "z_k": None, "flow": None}]}]})
    model: str
    kind: str
    latent_dim: int
    inverted: bool = Field(..., description="whether x -> 1 - x was applied")
    results: list[EncodeResult]


# A JSON number: an integer or a float, never a string or a boolean (pydantic's lax mode converts those).
Number = Annotated[float, Strict()]


class DecodeRequest(BaseModel):
    # extra="forbid": the body holds nothing but numbers and its one key, which lets service/inputs.py
    # count its arrays and values from the raw bytes before parsing it
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"z": [[0.0, 0.5, -1.0, 0.2, 0.0]]}]})
    z: list[Annotated[list[Number], Field(min_length=1)]] = Field(
        ..., min_length=1, description="latent codes, each of the model's latent_dim finite numbers (see GET /models)")


class ImagesResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "ppca-mnist", "image_shape": [2, 2], "images": [[[0.0, 0.5], [1.0, 0.25]]]}]})
    model: str
    image_shape: list[int]
    channels: int = Field(1, description="1: grayscale, images H x W; 3: RGB, images H x W x 3")
    images: list[list[list[float]]] | list[list[list[list[float]]]] = Field(
        ..., description="E[x | z] per code as H x W arrays (H x W x 3 for colour models), clipped to [0, 1] "
        "(Bernoulli probabilities or Gaussian means)")


class SampleResponse(ImagesResponse):
    seed: int = Field(..., description="the seed used (pass it back to reproduce the samples)")
    temperature: float
    z: list[list[float]] = Field(..., description="the prior draws z = temperature * N(0, I)")


class LogLikelihoodResult(ImageInfo):
    log_likelihood: float = Field(..., description="log p(x) in nats: exact for ppca, else the "
                                  "importance-weighted bound")
    log_likelihood_exact: bool
    elbo: float = Field(..., description="ELBO in nats (mean of the S log-weights; equals log p(x) for ppca, "
                        "whose posterior is exact)")
    iw_bound: float = Field(..., description="importance-weighted bound: logsumexp of the S log-weights minus "
                            "log S (log p(x) for ppca)")
    bits_per_dim: float | None = Field(None, description="see bits_per_dim_note; null when it would mean nothing")


class LogLikelihoodResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "vae-mnist", "kind": "vae", "likelihood": "bernoulli", "samples": 100, "seed": 0,
        "binarized": True, "binarization": "x >= 0.5 -> 1, else 0 (after resizing and invert)",
        "bits_per_dim_note": "binary data, a probability mass: -log p(x) / (D ln 2)",
        "results": [{"source": "images[0]", "original_shape": [28, 28], "resized": False,
                     "log_likelihood": -92.1, "log_likelihood_exact": False, "elbo": -96.3,
                     "iw_bound": -92.1, "bits_per_dim": 0.1695}]}]})
    model: str
    kind: str
    likelihood: str
    samples: int | None = Field(None, description="S importance samples (null for ppca: exact)")
    seed: int | None = Field(None, description="seed of eps ~ N(0, I) (numpy default_rng(seed)"
                             ".standard_normal((N, S, d), dtype=float32)); null for ppca")
    binarized: bool
    binarization: str | None
    bits_per_dim_note: str | None
    results: list[LogLikelihoodResult]


# The card's fields as the contract lists them (model_repository/card.py SUMMARY_FIELDS), and `default`.
ModelInfo = create_model(
    "ModelInfo",
    **{name: (kind, Field(..., description=text)) for name, (kind, text) in SUMMARY_FIELDS.items()},
    default=(bool, Field(..., description="whether requests that name no model get this one")),
)


class ModelDetail(ModelInfo):
    card: dict[str, Any] = Field(..., description="the full card.json")


class ModelsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "default_model": "ppca-mnist", "models": [], "unavailable": {"broken-model": "card.json: missing"}}]})
    default_model: str | None
    models: list[ModelInfo]
    unavailable: dict[str, str] = Field(..., description="model folders that failed to load, with the reason (a model "
                                        "also in `models` goes on serving the version loaded before)")


class Health(BaseModel):
    status: str = Field(..., examples=["ok"])


class Ready(BaseModel):
    status: str = Field(..., examples=["ready"])
    models: list[str]
    default_model: str | None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "type": "/problems/unknown-model", "title": "Unknown model", "status": 404,
        "detail": "model 'foo' is not loaded; loaded models: ppca-mnist, vae-mnist"}]})
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
