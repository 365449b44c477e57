"""The `python -m training` commands for PPCA, end to end on digits."""

import json

import pytest
import torch

from training.cli import main
from training.common import read_json
from training.drivers import driver_for


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


@pytest.mark.parametrize("step, sampling", [("natural", "with-replacement"), ("plain", "epochs")])
def test_sem_with_one_row_per_step_runs(tmp_path, step, sampling, capsys):
    out = tmp_path / "sem1"
    assert main(["fit", "--model", "ppca", "--method", "sem", "--batch-size", "1", "--dataset", "digits",
                 "--latent-dim", "10", "--step", step, "--sampling", sampling, "--iterations", "1",
                 "--out", str(out), "--no-export", "--quiet"]) == 0
    training = torch.load(out / "checkpoint.pt", weights_only=True)["meta"]["training"]
    assert training["batch_size"] == 1 and training["step"] == step and training["sampling"] == sampling
    assert training["kappa0"] == "auto"


def test_sem_divergence_is_a_clear_error_and_keeps_the_last_good_parameters(tmp_path, capsys):
    out = tmp_path / "diverged"
    code = main(["fit", "--model", "ppca", "--method", "sem", "--batch-size", "1", "--dataset", "digits",
                 "--latent-dim", "10", "--kappa0", "1e6", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "cholesky" not in err.lower()
    assert "stochastic EM diverged at step 1" in err and "kappa = 1e+06" in err and "--kappa0 auto" in err
    assert str(out / "checkpoint.pt") in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "diverged at step 1" in ckpt["meta"]["training"]["diverged"]
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no metrics, no export


def test_sem_kappa0_must_be_auto_or_a_number(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model", "ppca", "--method", "sem", "--kappa0", "fast", "--out", str(tmp_path)])
    assert "expected 'auto' or a positive number, got 'fast'" in capsys.readouterr().err
