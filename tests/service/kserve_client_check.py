"""KServe's InferenceRESTClient (protocol v2) against a running latentserve: run by tests/service/test_oip_live.py
in the KServe venv (.venv-kserve: kserve pins protobuf and pandas below what .venv resolves to).

    .venv-kserve/bin/python tests/service/kserve_client_check.py URL API_KEY MODEL < x.json

Reads x ([N][D] floats) on stdin; prints one JSON object: readiness, the encoder's outputs sent as JSON and as
binary tensors, and the error KServe's client raises for an unknown model.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def main(url: str, key: str, model: str, x: np.ndarray) -> dict:
    headers = {"X-API-Key": key}
    out: dict = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:
        out["live"] = await client.is_server_live(url)
        out["ready"] = await client.is_server_ready(url)
        out["model_ready"] = await client.is_model_ready(url, model, headers=headers)
        for binary in (False, True):
            inp = InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            req = InferRequest(model, [inp], request_id=f"kserve-{binary}",
                               request_outputs=[RequestedOutput("mean", {"binary_data": binary}),
                                                RequestedOutput("log_var", {"binary_data": binary})])
            res = await client.infer(url, req, model, headers=dict(headers))
            out["binary" if binary else "json"] = {"id": res.id, "model_name": res.model_name, "outputs": {
                o.name: o.as_numpy().tolist() for o in res.outputs}}
        try:
            await client.infer(url, {"inputs": []}, "nope.encoder", headers=dict(headers))
        except httpx.HTTPStatusError as e:
            out["unknown_model_error"] = str(e)
    return out


if __name__ == "__main__":
    x = np.asarray(json.load(sys.stdin), dtype=np.float32)
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], x))))
