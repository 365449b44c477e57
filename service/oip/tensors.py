"""Open Inference Protocol tensors: an inference request's bytes -> float32 arrays, outputs -> response bytes.

A request is a JSON object, optionally followed by raw tensor bytes (the binary tensor data extension:
the `Inference-Header-Content-Length` header gives the JSON's length, and each binary input says its
`binary_data_size`; the sizes, in input order, must add up to the bytes after the JSON). JSON `data` is
flat or nested, row-major. Everything is checked against the graph's own inputs (names, rank, fixed axes,
FP32) before any work, and every fault is a ProblemError 400 that names the input and what is expected.

This is the hot path of POST /v2/models/{name}/infer: orjson, one numpy conversion per input
(np.frombuffer for binary data), no pydantic.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import orjson

from service.errors import ProblemError
from service.postprocess import dumps

# ONNX element types -> OIP datatypes (the graphs of models/README.md take and give float32 only; the others
# are here so that metadata names any graph's outputs truthfully).
DATATYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
             "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int8)": "INT8", "tensor(uint8)": "UINT8",
             "tensor(bool)": "BOOL"}
# The binary tensor data extension's FP32: little-endian, whatever the host (a dtype made once: parsing "<f4"
# costs as much as reading the tensor).
_LITTLE_F32 = np.dtype("<f4")
# Inputs whose values are pixel intensities; the other inputs (z, eps) are latent values.
PIXEL_INPUTS = frozenset({"x"})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic axis

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {self.datatype}"


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of_session(cls, session) -> GraphSpec:
        def spec(arg) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
            return TensorSpec(arg.name, DATATYPES.get(arg.type, arg.type), shape)

        return cls(tuple(spec(a) for a in session.get_inputs()), tuple(spec(a) for a in session.get_outputs()))


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]  # in the graph's input order, float32, batch axis 0
    outputs: list[tuple[str, bool]]  # (name, binary) in the order answered
    rows: int


def bad(detail: str, status: int = 400) -> ProblemError:
    return ProblemError(status, "Invalid inference request", detail, slug="invalid-inference-request")


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib) request body, inflated to at most `limit` bytes (413 beyond: a zip bomb)."""
    if encoding not in ("gzip", "deflate"):
        raise ProblemError(415, "Unsupported content encoding", f"Content-Encoding {encoding!r} is not supported; "
                           "send the body as it is, or gzip or deflate", slug="unsupported-media-type")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise bad(f"the body is not valid {encoding} data ({e})") from e
    if len(out) > limit:
        raise ProblemError(413, "Content too large", f"the {encoding} body inflates to more than the limit of "
                           f"{limit} bytes", slug="content-too-large")
    if not inflater.eof:
        raise bad(f"the {encoding} body is truncated")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON part, the binary part) by the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise bad(f"Inference-Header-Content-Length is {header_length!r}, but the body has {len(body)} bytes; it "
                  "must be the length of the JSON object that starts the body (1 to the body's length)")
    return body[:n], memoryview(body)[n:]


def parse_json(header: bytes, max_values: int) -> dict:
    # Every value but the first follows a comma: the count bounds the parse before it starts (as for /encode).
    if (values := header.count(b",") + 1) > max_values:
        raise ProblemError(413, "Too many values", f"the JSON holds about {values} values, more than the limit of "
                           f"{max_values} per request; send the tensors as binary data (the binary tensor data "
                           "extension), which costs less to read", slug="too-many-values")
    try:
        payload = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise bad(f"the request is not valid JSON ({e}); expected an inference request object "
                  '{"inputs": [{"name", "shape", "datatype", "data"}, ...]}') from e
    if not isinstance(payload, dict):
        raise bad(f"the request must be a JSON object with 'inputs', got {type(payload).__name__}")
    return payload


def read_request(payload: dict, binary: memoryview, spec: GraphSpec, name: str, max_rows: int,
                 max_latent_abs: float) -> InferRequest:
    """The request `payload` (+ its `binary` part) for the graph `spec` of model `name`, checked."""
    rid = payload.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad(f"'id' must be a string, got {type(rid).__name__}")
    params = payload.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad(f"'parameters' must be an object, got {type(params).__name__}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("'inputs' must be a non-empty list of tensors; model " + name + " takes "
                  + ", ".join(t.describe() for t in spec.inputs))
    wanted = {t.name: t for t in spec.inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise bad(f"inputs[{i}] must be an object with name, shape, datatype and data")
        given = tensor.get("name")
        t = wanted.get(given) if isinstance(given, str) else None
        if t is None:
            raise bad(f"inputs[{i}]: unexpected input {str(tensor.get('name'))[:100]!r} for model {name}; it takes "
                      + ", ".join(s.describe() for s in spec.inputs))
        if t.name in arrays:
            raise bad(f"input {t.name!r} is given twice")
        a, used = _tensor(tensor, t, binary, offset, name)
        offset += used
        _check_values(a, t.name, max_latent_abs)
        arrays[t.name] = a
    missing = [t.describe() for t in spec.inputs if t.name not in arrays]
    if missing:
        raise bad(f"model {name} needs the input(s) {', '.join(missing)}")
    if offset != len(binary):
        raise bad(f"the binary_data_size of the inputs add up to {offset} bytes, but {len(binary)} bytes follow the "
                  "JSON (Inference-Header-Content-Length); they must be equal")
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) > 1:
        raise bad("the inputs have different batch sizes (axis 0): "
                  + ", ".join(f"{k} {a.shape[0]}" for k, a in arrays.items()))
    n = rows.pop()
    if not 1 <= n <= max_rows:
        raise ProblemError(413 if n else 400, "Invalid inference request", f"the batch (axis 0) has {n} rows; "
                           f"send 1 to {max_rows} per request", slug="invalid-inference-request")
    ordered = {t.name: arrays[t.name] for t in spec.inputs}  # the order native requests use (batcher key)
    return InferRequest(rid, ordered, _requested(payload, params, spec, name), n)


def _tensor(tensor: dict, t: TensorSpec, binary: memoryview, offset: int, model: str) -> tuple[np.ndarray, int]:
    """One input's array (float32, its declared shape) and the binary bytes it took."""
    if tensor.get("datatype") != "FP32":
        raise bad(f"input {t.name!r} has datatype {str(tensor.get('datatype'))[:40]!r}; model {model} expects FP32")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)
            or len(shape) != len(t.shape)
            or any(want != -1 and got != want for got, want in zip(shape, t.shape, strict=True))):
        raise bad(f"input {t.name!r} has shape {str(shape)[:100]}; model {model} expects {list(t.shape)} "
                  "(-1: any size)")
    if 0 in shape:
        raise bad(f"input {t.name!r} has shape {shape}; every axis needs at least 1 element")
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"input {t.name!r}: 'parameters' must be an object")
    if "shared_memory_region" in params:
        raise bad(f"input {t.name!r}: the shared-memory extension is not supported; send the data in JSON or as "
                  "binary data")
    size = params.get("binary_data_size")
    data = tensor.get("data")
    if size is not None:
        if data is not None:
            raise bad(f"input {t.name!r} has both 'data' and binary_data_size; send one of them")
        if type(size) is not int or size != 4 * count:
            raise bad(f"input {t.name!r}: binary_data_size is {size!r}, but shape {shape} of FP32 needs "
                      f"{4 * count} bytes")
        if offset + size > len(binary):
            raise bad(f"input {t.name!r}: binary_data_size {size} at byte {offset} runs past the {len(binary)} "
                      "bytes of binary data after the JSON")
        # A copy: native byte order, aligned (the JSON before it has any length), not a view of the body.
        return np.frombuffer(binary, _LITTLE_F32, count, offset).astype(np.float32).reshape(shape), size
    if data is None:
        raise bad(f"input {t.name!r} has no 'data' (nor a binary_data_size parameter)")
    if not isinstance(data, list):
        raise bad(f"input {t.name!r}: 'data' must be a list of numbers, flat or nested by the shape")
    try:
        a = np.asarray(data)
    except (ValueError, OverflowError) as e:  # ragged nesting, an integer beyond every numeric type
        raise bad(f"input {t.name!r}: 'data' must be numbers, flat or nested as the shape {shape} (row-major)") from e
    if a.dtype.kind not in "fiu" and a.size:  # strings, booleans, null (object)
        raise bad(f"input {t.name!r}: 'data' must hold numbers only (FP32), got {a.dtype.kind!r} values")
    if a.shape != tuple(shape) and not (a.ndim == 1 and a.size == count):
        raise bad(f"input {t.name!r}: 'data' holds {a.size} values as {list(a.shape)}; shape {shape} needs "
                  f"{count}, flat or nested as the shape")
    return a.astype(np.float32).reshape(shape), 0


def _check_values(a: np.ndarray, name: str, max_latent_abs: float) -> None:
    # NaN fails both comparisons, so it is refused with the out-of-range values.
    if name in PIXEL_INPUTS:
        if a.size and not (a.min() >= 0.0 and a.max() <= 1.0):
            raise bad(f"input {name!r} must hold pixel intensities in [0, 1] (ink = 1), got min {a.min():.4g}, "
                      f"max {a.max():.4g} (NaN: not a number)")
    elif a.size and not np.abs(a).max() <= max_latent_abs:
        raise bad(f"input {name!r} must hold finite values with |v| <= {max_latent_abs:g} (the prior is "
                  f"N(0, I)), got up to {np.abs(a).max():.4g}")


def _requested(payload: dict, params: dict | None, spec: GraphSpec, model: str) -> list[tuple[str, bool]]:
    """(name, binary) of the outputs to answer: those requested, in that order, else all of the graph's."""
    binary_default = (params or {}).get("binary_data_output") is True
    requested = payload.get("outputs")
    if requested is None:
        return [(t.name, binary_default) for t in spec.outputs]
    if not isinstance(requested, list):
        raise bad("'outputs' must be a list of {\"name\": ...} objects")
    names = {t.name for t in spec.outputs}
    out: list[tuple[str, bool]] = []
    for i, o in enumerate(requested):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or o["name"] not in names:
            got = o.get("name") if isinstance(o, dict) else o
            raise bad(f"outputs[{i}]: unknown output {str(got)[:100]!r} of model {model}; it has "
                      + ", ".join(t.describe() for t in spec.outputs))
        if any(n == o["name"] for n, _ in out):
            raise bad(f"output {o['name']!r} is requested twice")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise bad(f"outputs[{i}]: 'parameters' must be an object")
        binary = p.get("binary_data", binary_default)
        out.append((o["name"], binary is True))
    return out


def response_body(model: str, version: str, rid: str | None, outputs: dict[str, np.ndarray],
                  requested: list[tuple[str, bool]]) -> tuple[bytes, int | None]:
    """(body, JSON length when binary outputs follow it, else None) of an inference response."""
    tensors, raw = [], []
    for name, binary in requested:
        a = outputs[name]
        t = {"name": name, "datatype": "FP32", "shape": list(a.shape)}
        if binary:
            data = a.astype("<f4", copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            t["data"] = a.reshape(-1)
        tensors.append(t)
    head = {"model_name": model, "model_version": version, "outputs": tensors}
    if rid is not None:
        head["id"] = rid
    body = dumps(head)
    if not raw:
        return body, None
    return b"".join([body, *raw]), len(body)
