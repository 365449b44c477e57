"""The `python -m training` commands for PPCA, end to end on digits."""

import json

import pytest

from training.cli import driver_for, main
from training.common import read_json


@pytest.mark.parametrize("method", ["em", "sem", "closed-form"])
def test_fit_writes_metrics_and_plots(tmp_path, method, capsys):
    out = tmp_path / method
    args = ["fit", "--model", "ppca", "--method", method, "--dataset", "digits", "--latent-dim", "4",
            "--out", str(out), "--no-export", "--quiet"]
    if method == "sem":
        args += ["--iterations", "3"]
    assert main(args) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["log_likelihood_exact"] is True
    assert {"train_log_likelihood", "valid_log_likelihood", "test_log_likelihood", "seconds"} <= set(metrics)
    for png in ["directions.png", "samples.png"] + ([] if method == "closed-form" else ["loglik.png"]):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"], abs=1e-9)


def test_unknown_kind_and_bad_dataset_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model kind 'gan'"):
        driver_for("gan")
    assert main(["fit", "--model", "ppca", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


@pytest.mark.parametrize("model, option", [("ppca", "--method"), ("vae", "--epochs"), ("flow-vae", "--flows")])
def test_fit_help_lists_the_chosen_models_options(model, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", model, "--help"])  # no --out: help comes before the required options
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out
