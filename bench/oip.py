"""Open Inference Protocol load test: latentserve's /v2 against KServe's own ModelServer, side by side.

    .venv/bin/python -m bench.oip --models-dir models

Every round starts, in turn: KServe 0.21's ModelServer (a custom kserve.Model wrapping an ONNX Runtime session on
`vae-mnist/encoder.onnx`; one worker, one intra-op thread, run by .venv-kserve's python: `VENV=.venv-kserve
scripts/setup-venv kserve`) and `python -m service`. Both get the same OIP JSON request: one real MNIST test image
(mnist5k, row 0) as 784 FP32 numbers, to `/v2/models/vae-mnist.encoder/infer`. latentserve also gets the same
image as binary tensor data (the binary tensor data extension, binary outputs) and as native JSON on /encode.
1, 8 and 64 clients under wrk (bench/service_load.py's runner), `--seconds` each, `--repeats` rounds; both servers
run at once and the cells of one concurrency follow each other, so that ratios are taken seconds apart (the
machine's speed drifts). Also each server's resident memory (its processes together).
Records its section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.servers import cpu_seconds, free_port, rss_mb, wait_ready
from bench.service_load import _median, wrk_post

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vae-mnist"
OIP_NAME = f"{MODEL}.encoder"
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


def serve_kserve(port: int, onnx_path: str) -> None:
    """KServe's ModelServer with one model (runs in the KServe venv)."""
    import logging

    import kserve
    import onnxruntime as ort
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.utils.utils import generate_uuid

    class Encoder(kserve.Model):
        def __init__(self, name: str):
            super().__init__(name)
            self.load()

        def load(self) -> bool:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            self.session = ort.InferenceSession(onnx_path, sess_options=so, providers=["CPUExecutionProvider"])
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers=None) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
            mean, log_var = self.session.run(["mean", "log_var"], {"x": x})
            outputs = [InferOutput("mean", list(mean.shape), "FP32", data=mean),
                       InferOutput("log_var", list(log_var.shape), "FP32", data=log_var)]
            # KServe's response needs an id: the request's, or a new one (as KServe's examples do).
            return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or generate_uuid())

    # No line per request from either server (latentserve logs none at level warning).
    server = kserve.ModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False)
    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([Encoder(OIP_NAME)])


def _start(kind: str, args) -> tuple[subprocess.Popen, int]:

    port = free_port()
    env = dict(os.environ, LATENTSERVE_MODELS_DIR=str(args.models_dir.resolve()), LATENTSERVE_LOG_LEVEL="warning",
               LATENTSERVE_DEFAULT_MODEL=MODEL)
    if kind == "kserve":
        cmd = [str(args.kserve_python), "-m", "bench.oip", "--serve-kserve", str(port), "--models-dir",
               str(args.models_dir.resolve())]
    else:
        cmd = [sys.executable, "-m", "service", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_ready(proc, f"http://127.0.0.1:{port}/v2/health/ready", what=kind)
    return proc, port


def _tree(pid: int) -> list[int]:
    """The process and its descendants (KServe may fork)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _rss_mb(pid: int) -> float:
    """Resident memory of the process and its descendants, in MB (a descendant gone meanwhile counts 0)."""
    return sum(v for p in _tree(pid) if (v := rss_mb(p)) == v)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process and its descendants so far (every thread)."""
    return sum(v for p in _tree(pid) if (v := cpu_seconds(p)) == v)


def _bodies(args) -> tuple[dict[str, tuple[str, bytes, dict[str, str]]], np.ndarray]:
    """label -> (path, body, headers) of each kind of request, all carrying the same image; and the image."""
    import orjson

    from training.data import load_dataset

    x = load_dataset("mnist5k", valid_fraction=0.1).test[:1].astype(np.float32)  # a real MNIST digit, [1, 784]
    oip_json = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": x[0]}]},
                            option=orjson.OPT_SERIALIZE_NUMPY)
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    native = orjson.dumps({"images": x}, option=orjson.OPT_SERIALIZE_NUMPY)
    infer = f"/v2/models/{OIP_NAME}/infer"
    json_ct = {"Content-Type": "application/json"}
    return {"OIP JSON": (infer, oip_json, json_ct),
            "OIP binary": (infer, head + x.tobytes(), {"Content-Type": "application/octet-stream",
                                                      "Inference-Header-Content-Length": str(len(head))}),
            "native JSON /encode": (f"/encode?model={MODEL}", native, json_ct)}, x


def _check_answer(port: int, bodies, reference: np.ndarray) -> None:
    """The server encodes the image as ONNX Runtime does (checked before anything is timed)."""
    import httpx

    path, body, headers = bodies["OIP JSON"]
    got = httpx.post(f"http://127.0.0.1:{port}{path}", content=body, headers=headers, timeout=30).json()
    mean = np.array(next(o["data"] for o in got["outputs"] if o["name"] == "mean"), np.float32)
    np.testing.assert_allclose(mean, reference.ravel(), rtol=1e-5, atol=1e-6)


SERVERS = [("KServe ModelServer", "kserve"), ("latentserve", "service")]
CELLS = [("KServe ModelServer", "kserve", "OIP JSON"), ("latentserve", "service", "OIP JSON"),
         ("latentserve", "service", "OIP binary"), ("latentserve", "service", "native JSON /encode")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--kserve-python", type=Path, default=KSERVE_PYTHON)
    p.add_argument("--seconds", type=float, default=8.0, help="time per (server, request, concurrency, round)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3, help="rounds; each starts both servers, in turn")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--serve-kserve", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_kserve is not None:
        serve_kserve(args.serve_kserve, str(args.models_dir.resolve() / MODEL / "encoder.onnx"))
        return 0
    if not args.kserve_python.is_file():
        p.error(f"no KServe venv at {args.kserve_python}: create it with `VENV=.venv-kserve scripts/setup-venv kserve`")
    bodies, x = _bodies(args)
    import onnxruntime as ort

    reference = ort.InferenceSession(str(args.models_dir / MODEL / "encoder.onnx")).run(["mean"], {"x": x})[0]
    rows: dict[tuple[str, str, int], list[dict]] = {(s, r, c): [] for s, _, r in CELLS for c in args.clients}
    rss: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="latentserve-oip-"))
    for round_ in range(1, args.repeats + 1):
        # Both servers up at once (the idle one costs nothing), the cells compared run seconds apart: on a shared
        # machine whose speed drifts within minutes, that keeps each ratio within one stretch of the drift.
        procs: dict[str, tuple[subprocess.Popen, int]] = {}
        try:
            for server, kind in SERVERS:
                procs[server] = _start(kind, args)
                _check_answer(procs[server][1], bodies, reference)
            for c in args.clients:
                for server, _, req in CELLS:
                    path, body, headers = bodies[req]
                    proc, port = procs[server]
                    res = wrk_post(f"http://127.0.0.1:{port}{path}", body, headers, c, args.seconds, workdir,
                                   cpu_seconds=lambda pid=proc.pid: _cpu_seconds(pid))
                    rows[(server, req, c)].append(res)
                    print(f"round {round_}/{args.repeats} {server:18s} {req:20s} c={c:3d} {res['rps']:8.1f} "
                          f"req/s  p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms  "
                          f"cpu {res['cpu_us']:5.0f} us/req  n={res['n']} errors={res['errors']}", flush=True)
            for server, (proc, _) in procs.items():
                rss[server] = max(rss.get(server, 0.0), _rss_mb(proc.pid))
        finally:
            for proc, _ in procs.values():
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
    from bench.report import publish

    publish("Open Inference Protocol (POST /v2/models/vae-mnist.encoder/infer) against KServe",
            _report(rows, rss, args), module="bench.oip", save=not args.no_report)
    return 0


def _report(rows: dict, rss: dict[str, float], args) -> str:
    lines = [f"One real MNIST test image (mnist5k row 0) as 784 FP32 numbers, the same OIP JSON request to both "
             f"servers; wrk (1 thread) on the same machine, {args.seconds:g} s per cell, {args.repeats} round(s), "
             "each starting both servers and running the cells of each concurrency one after the other. "
             "KServe 0.21 ModelServer: a kserve.Model wrapping an ONNX Runtime "
             "session on encoder.onnx (one worker, one intra-op thread, no log line per request). latentserve: "
             "`python -m service` with its defaults (vae-mnist's encoder among the three default models). Cells: "
             "median over rounds (req/s: and the range). Server CPU: user + system time of the server's processes "
             "(every thread) during the cell, per answered request: what a request costs, less sensitive than req/s to "
             "other work on a shared machine.", "",
             "| server | request | clients | req/s | p50 ms | p99 ms | server CPU us/request | requests | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for server, _, req in CELLS:
        for c in args.clients:
            runs = rows[(server, req, c)]
            rps = [r["rps"] for r in runs]
            spread = f" ({min(rps):.0f}-{max(rps):.0f})" if len(runs) > 1 else ""
            lines.append(f"| {server} | {req} | {c} | {_median(rps):.0f}{spread} | "
                         f"{_median([r['p50'] for r in runs]):.1f} | {_median([r['p99'] for r in runs]):.1f} | "
                         f"{_median([r['cpu_us'] for r in runs]):.0f} | {sum(r['n'] for r in runs)} | "
                         f"{sum(r['errors'] for r in runs)} |")
    c = max(args.clients)

    def ratio(a, b, key="rps"):
        xs = [(p[key] / q[key]) ** (1 if key == "rps" else -1) for p, q in zip(rows[a], rows[b], strict=True)]
        return f"{_median(xs):.2f}x" + (f" (rounds: {', '.join(f'{v:.2f}' for v in xs)})" if len(xs) > 1 else "")

    p99 = [r["p99"] for r in rows[("latentserve", "OIP JSON", c)]]
    lines += ["", f"Resident memory after the runs: KServe ModelServer {rss['KServe ModelServer']:.0f} MB (one "
              f"model), latentserve {rss['latentserve']:.0f} MB (three models, nine graphs).", "",
              f"| goal at {c} clients | measured (median over rounds; ratios within a round) | goal |",
              "| --- | --- | --- |",
              f"| OIP JSON req/s, latentserve / KServe | "
              f"{ratio(('latentserve', 'OIP JSON', c), ('KServe ModelServer', 'OIP JSON', c))} | >= 2.5x |",
              f"| latentserve OIP JSON p99 | {_median(p99):.1f} ms (rounds: {', '.join(f'{v:.1f}' for v in p99)}) "
              "| <= 40 ms |",
              f"| the same in server CPU per request (KServe's / latentserve's) | "
              f"{ratio(('latentserve', 'OIP JSON', c), ('KServe ModelServer', 'OIP JSON', c), 'cpu_us')} | - |",
              f"| OIP binary / OIP JSON req/s (latentserve) | "
              f"{ratio(('latentserve', 'OIP binary', c), ('latentserve', 'OIP JSON', c))} | >= 1.3x |",
              f"| the same in server CPU per request (JSON's / binary's) | "
              f"{ratio(('latentserve', 'OIP binary', c), ('latentserve', 'OIP JSON', c), 'cpu_us')} | - |",
              f"| OIP JSON / native JSON /encode req/s (latentserve; no goal) | "
              f"{ratio(('latentserve', 'OIP JSON', c), ('latentserve', 'native JSON /encode', c))} | - |",
              # The table gives latentserve's own JSON figure as native JSON /encode: the binary goal read
              # against that row rather than against OIP JSON (the row above).
              f"| OIP binary / native JSON /encode req/s (latentserve) | "
              f"{ratio(('latentserve', 'OIP binary', c), ('latentserve', 'native JSON /encode', c))} | >= 1.3x |"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
