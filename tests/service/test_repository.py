"""Model repository isolation over real HTTP: one bad folder, whatever its fault, is listed as broken with its reason
(in /models and in the log) and every other folder loads and serves; no response shows a server path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from svc_helpers import image_bytes, start_server

from model_repository.card import sha256_file
from service.repository import public_reason

GOOD = "ppca-digits"
# A folder owned by another user with mode 0700, as `lost+found` at the root of a fresh volume is to the
# service's user. The tests run as root, who reads any folder: the server then runs without the two
# capabilities that let root bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
STRANGER_UID = 54321


def _copy_model(src: Path, dst: Path) -> dict:
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card["name"] = dst.name
    _write_card(dst, card)
    return card


def _write_card(folder: Path, card: dict) -> None:
    (folder / "card.json").write_text(json.dumps(card, indent=2))


def _replace_graph(folder: Path, fname: str, model: onnx.ModelProto) -> None:
    """Write `model` as `fname` and record its sha256 in the card, as the exporter would."""
    onnx.save(model, str(folder / fname))
    card = json.loads((folder / "card.json").read_text())
    card["files"][fname] = {"sha256": sha256_file(folder / fname), "bytes": (folder / fname).stat().st_size}
    _write_card(folder, card)


def _unknown_op_graph() -> onnx.ModelProto:
    """A well-formed file that ONNX Runtime refuses with InvalidGraph (not its `Fail` class)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("log_px", TensorProto.FLOAT, ["N"])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["log_px"])], "loglik", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _batch_folding_decoder(latent_dim: int) -> onnx.ModelProto:
    """A decoder that loads and whose axis 0 is dynamic for ONNX Runtime's shape inference, but that folds rows
    pairwise: [N, d] -> [N / 2, 2 d] (wrong as soon as a call has two rows)."""
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", latent_dim])
    y = helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, ["N", "D"])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 2 * latent_dim])
    graph = helper.make_graph([helper.make_node("Reshape", ["z", "shape"], ["x_mean"])], "decoder", [z], [y],
                              initializer=[shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fixed_batch(path: Path, batch: int = 1) -> onnx.ModelProto:
    """The graph at `path` re-declared with a fixed batch size on axis 0 of every input and output."""
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    del model.graph.value_info[:]
    return model


def _can_hide_from_root(folder: Path) -> bool:
    probe = subprocess.run([*NO_DAC, "ls", str(folder)], capture_output=True, timeout=30)
    return probe.returncode != 0


@pytest.fixture(scope="module")
def hostile_repo(model_repo, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The good model next to one folder per fault; returns the repo and, per bad folder, a word its reason has."""
    repo = tmp_path_factory.mktemp("hostile") / "models"
    repo.mkdir()
    shutil.copytree(model_repo / GOOD, repo / GOOD)
    expect = {}

    bad = repo / "unknown-op"  # ONNX Runtime: InvalidGraph
    _copy_model(model_repo / GOOD, bad)
    _replace_graph(bad, "loglik.onnx", _unknown_op_graph())
    expect[bad.name] = "InvalidGraph"

    bad = repo / "graphs-list"  # graphs entry of the wrong type (a list)
    card = _copy_model(model_repo / GOOD, bad)
    card["graphs"]["encoder"] = ["encoder.onnx"]
    _write_card(bad, card)
    expect[bad.name] = "must be a file name"

    bad = repo / "graphs-number"  # graphs entry of the wrong type (a number)
    card = _copy_model(model_repo / GOOD, bad)
    card["graphs"]["decoder"] = 7
    _write_card(bad, card)
    expect[bad.name] = "must be a file name"

    bad = repo / "graphs-not-a-dict"
    card = _copy_model(model_repo / GOOD, bad)
    card["graphs"] = ["encoder.onnx", "decoder.onnx", "loglik.onnx"]
    _write_card(bad, card)
    expect[bad.name] = "'graphs' must be dict"

    # Fixed batch size in the LAST graph of the card: encoder and decoder load first, and the model must
    # still not be served at all (no half model).
    bad = repo / "fixed-batch"
    card = _copy_model(model_repo / GOOD, bad)
    assert list(card["graphs"]) == ["encoder", "decoder", "loglik"]
    _replace_graph(bad, "loglik.onnx", _fixed_batch(bad / "loglik.onnx"))
    expect[bad.name] = "dynamic batch axis"

    bad = repo / "folds-batch"  # loads, runs, but its output does not follow the batch
    card = _copy_model(model_repo / GOOD, bad)
    _replace_graph(bad, "decoder.onnx", _batch_folding_decoder(card["latent_dim"]))
    expect[bad.name] = "must follow the batch"

    bad = repo / "lost+found"
    bad.mkdir(mode=0o700)
    (bad / "inode-1234").write_bytes(b"\0" * 16)
    if os.geteuid() == 0:
        os.chown(bad, STRANGER_UID, STRANGER_UID)  # unreadable to root without CAP_DAC_* (see NO_DAC)
    else:
        bad.chmod(0o000)
    expect[bad.name] = "cannot be read"
    return repo, expect


@pytest.fixture(scope="module")
def hostile_server(hostile_repo, tmp_path_factory):
    repo, _ = hostile_repo
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None or not _can_hide_from_root(repo / "lost+found"):
            pytest.skip("running as root without setpriv able to drop CAP_DAC_OVERRIDE: cannot make a folder "
                        "unreadable to the server")
        prefix = NO_DAC
    else:
        prefix = ()
    server = start_server(repo, tmp_path_factory.mktemp("hostile-log") / "server.log", command_prefix=prefix,
                          default_model=GOOD)
    yield server
    server.stop()


def test_every_bad_folder_is_broken_with_its_reason_and_the_good_one_serves(hostile_server, hostile_repo):
    repo, expect = hostile_repo
    url = hostile_server.url
    listing = httpx.get(f"{url}/models", timeout=10).json()
    assert [m["name"] for m in listing["models"]] == [GOOD]
    assert sorted(listing["unavailable"]) == sorted(expect)
    for name, word in expect.items():
        assert word in listing["unavailable"][name], (name, listing["unavailable"][name])
        assert re.search(rf"skipping model folder \S*{re.escape(name)}\b", hostile_server.log()), name
    # The good model answers; the broken ones (fixed-batch included, whose first two graphs did load) do not.
    png = image_bytes(np.random.default_rng(0).random((8, 8)))
    r = httpx.post(f"{url}/encode", params={"model": GOOD}, files=[("images", ("a.png", png, "image/png"))],
                   timeout=30)
    assert r.status_code == 200, r.text
    for name in expect:
        r = httpx.post(f"{url}/encode", params={"model": name}, files=[("images", ("a.png", png, "image/png"))],
                       timeout=30)
        assert r.status_code == 404 and expect[name] in r.json()["detail"], (name, r.text)
    assert httpx.get(f"{url}/ready", timeout=10).json()["models"] == [GOOD]
    assert "Traceback" not in hostile_server.log()


def test_no_server_path_in_any_response(hostile_server, hostile_repo):
    repo, expect = hostile_repo
    url = hostile_server.url
    bodies = [httpx.get(f"{url}{path}", timeout=10).text
              for path in ("/models", "/ready", "/models/fixed-batch", "/models/unknown-op", "/models/lost+found",
                           "/models/nope", "/encode", "/nowhere", "/openapi.json")]
    bodies.append(httpx.post(f"{url}/encode", params={"model": "unknown-op"}, json={"images": [[0.0] * 64]},
                             timeout=10).text)
    for body in bodies:
        assert str(repo) not in body and str(repo.parent) not in body
        assert not re.search(r"(?<![\w.:/])/(tmp|root|home|work|usr|opt|var)/", body), body[:500]
    # ... while the log keeps the full paths for the operator.
    assert str(repo / "unknown-op") in hostile_server.log()


def test_missing_repository_is_reported_without_its_path(tmp_path):
    missing = tmp_path / "no" / "such" / "models"
    server = start_server(missing, tmp_path / "server.log", ready=False)
    try:
        r = httpx.get(f"{server.url}/ready", timeout=10)
        assert r.status_code == 503 and "LATENTSERVE_MODELS_DIR" in r.json()["detail"], r.text
        assert str(tmp_path) not in r.text
        assert str(missing) in server.log()
    finally:
        server.stop()


def test_public_reason_takes_out_server_paths(tmp_path):
    root = tmp_path / "models"
    assert public_reason(f"{root}/m/card.json: missing field 'kind'", root) == "m/card.json: missing field 'kind'"
    assert public_reason(f"{root}: the models directory cannot be read", root).startswith("$LATENTSERVE_MODELS_DIR:")
    assert public_reason("Load model from /opt/x/m.onnx failed; see image/png at http://h/a/b", root) == \
        "Load model from m.onnx failed; see image/png at http://h/a/b"
