"""Training from the command line, on generated data: what a run writes, Ctrl-C and --resume to the
same numbers, a loss that stops being finite, and a run with binary pixels, a KL warm-up and a
learned prior, measured again with --analyze."""
import json
import os
import signal

import numpy as np
import pytest

import mnist
import vae

from lab import analysis
from lab import codes
from lab import console
from lab import runs
from lab import training

from conftest import SMALL, drawing_only, one_line_error, run_cli


def test_training_on_generated_data_lowers_the_loss_and_writes_every_output(finished_run):
    m = json.loads((finished_run / "metrics.json").read_text())
    assert len(m["train_loss"]) == len(m["epoch_seconds"]) == len(m["test_loss_curve"]) == 2
    assert m["train_loss"][-1] < 0.95 * m["train_loss"][0], m["train_loss"]
    assert m["test_loss"] == pytest.approx(m["test_recon"] + m["test_kl"])
    assert m["config"]["hidden"] == 32 and m["config"]["epochs"] == 2
    for f in ("model.npz", "checkpoint.npz", "reconstructions.png", "samples_prior.png",
              "loss_curves.png", "samples_three_ways.png", "prior_vs_aggregate.png"):
        assert (finished_run / f).stat().st_size > 0, f
    assert not [f for f in os.listdir(finished_run) if ".tmp" in f]
    assert m["iw_nll"] < m["test_loss"]
    assert m["aggregate_posterior"]["average_kl"] == pytest.approx(m["test_kl"], rel=1e-5)


# ---- Ctrl-C and --resume -------------------------------------------------------------------------

@pytest.mark.usefixtures("no_figures")
def test_ctrl_c_saves_a_checkpoint_and_resume_gives_the_uninterrupted_numbers(
        tmp_path, data_dir, finished_run):
    def interrupt_at_step_7_of_epoch_2(state, n_steps, seen):
        if state["epoch"] == 1 and state["step"] == 7:
            signal.raise_signal(signal.SIGINT)          # a real Ctrl-C, through the lab's handler
    def training_progress():                                # stands in for console.TrainingProgress
        return interrupt_at_step_7_of_epoch_2
    out = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:     # undone after; no_figures stays
        patch.setattr(console, "TrainingProgress", training_progress)
        assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    assert (out / "checkpoint.npz").exists() and not (out / "model.npz").exists()
    checkpoint = str(out / "checkpoint.npz")
    assert run_cli("--data-dir", data_dir, "--epochs", "2", "--resume", checkpoint) == 0
    a = json.loads((finished_run / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["train_loss"] == b["train_loss"]
    assert a["test_loss"] == b["test_loss"]                 # the same seed, too
    uninterrupted, _ = runs.load_model(str(finished_run / "model.npz"))
    resumed, _ = runs.load_model(str(out / "model.npz"))
    for k in uninterrupted.params():
        np.testing.assert_array_equal(uninterrupted.params()[k], resumed.params()[k])


@pytest.mark.usefixtures("no_work")
def test_resume_says_what_it_will_train_and_keeps_the_epoch_target(finished_run, data_dir, capsys):
    model_bytes = (finished_run / "model.npz").read_bytes()
    ckpt = str(finished_run / "checkpoint.npz")         # trained with --epochs 2
    assert run_cli("--data-dir", data_dir, "--resume", ckpt) == 0
    assert "the run is finished, at epoch 2 of 2" in capsys.readouterr().out
    assert run_cli("--data-dir", data_dir, "--resume", ckpt, "--epochs", "2") == 0
    assert "nothing to do" in capsys.readouterr().out
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", ckpt, "--epochs", "1")
    assert "is at epoch 2: --epochs 1 would train nothing" in err
    assert (finished_run / "model.npz").read_bytes() == model_bytes


@pytest.mark.usefixtures("no_figures")
def test_resume_of_an_interrupted_run_trains_on_to_its_own_target(tmp_path, data_dir, capsys,
                                                                 monkeypatch):
    def interrupt_in_epoch_1(state, n_steps, seen):
        if state["step"] == 3:
            signal.raise_signal(signal.SIGINT)
    def training_progress():                            # stands in for console.TrainingProgress
        return interrupt_in_epoch_1
    real_progress = console.TrainingProgress
    monkeypatch.setattr(console, "TrainingProgress", training_progress)
    out = tmp_path / "cut"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    monkeypatch.setattr(console, "TrainingProgress", real_progress)
    capsys.readouterr()
    checkpoint = str(out / "checkpoint.npz")
    assert run_cli("--data-dir", data_dir, "--resume", checkpoint, "--iw-samples", "2") == 0
    assert "training epochs 1-2 (epoch 1 from step 4)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss"]) == 2              # 2, not the default 10


# ---- a loss that is not finite -------------------------------------------------------------------

def a_copy_of_the_finished_runs_checkpoint(tmp_path, finished_run):
    """(a new folder holding a copy of the finished run's checkpoint, that checkpoint's bytes)."""
    out = tmp_path / "run"
    out.mkdir()
    good = (finished_run / "checkpoint.npz").read_bytes()
    (out / "checkpoint.npz").write_bytes(good)
    return out, good


def test_a_loss_that_turns_nan_stops_and_keeps_the_last_good_checkpoint(
        tmp_path, data_dir, finished_run, capsys, monkeypatch):
    out, good = a_copy_of_the_finished_runs_checkpoint(tmp_path, finished_run)
    real_forward = vae.VAE.forward
    calls = []
    def forward_that_fails_at_call_5(self, x, eps):
        calls.append(1)
        loss, recon, kl = real_forward(self, x, eps)
        if len(calls) == 5:
            return float("nan"), recon, kl
        return loss, recon, kl
    monkeypatch.setattr(vae.VAE, "forward", forward_that_fails_at_call_5)
    checkpoint = str(out / "checkpoint.npz")
    assert run_cli("--data-dir", data_dir, "--epochs", "3", "--resume", checkpoint) == 1
    err = capsys.readouterr().err
    assert "became nan at epoch 3, step 5" in err and "last good checkpoint" in err
    assert err.count("\n") == 1
    assert (out / "checkpoint.npz").read_bytes() == good
    assert sorted(os.listdir(out)) == ["checkpoint.npz"]


def test_a_test_loss_that_turns_nan_stops_the_run_before_its_checkpoint(
        tmp_path, data_dir, finished_run, capsys, monkeypatch):
    # a density that breaks on the test set (a sigma per pixel on binary pixels did) is not a
    # good checkpoint: the run stops before writing that epoch's
    out, good = a_copy_of_the_finished_runs_checkpoint(tmp_path, finished_run)
    def test_loss_nan(model, images, seed):
        return float("nan"), float("nan"), 0.0
    monkeypatch.setattr(analysis, "negative_elbo", test_loss_nan)
    checkpoint = str(out / "checkpoint.npz")
    assert run_cli("--data-dir", data_dir, "--epochs", "3", "--resume", checkpoint) == 1
    err = capsys.readouterr().err
    assert "the test loss became nan after epoch 3" in err and "last good checkpoint" in err
    assert (out / "checkpoint.npz").read_bytes() == good


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, data_dir, capsys):
    out = str(tmp_path / "r")
    code = run_cli("--data-dir", data_dir, *SMALL, "--lr", "1e6", "--epochs", "1", "--out", out)
    assert code == 1
    err = capsys.readouterr().err
    assert "error: the loss became" in err and "no checkpoint was written" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "r").exists()


# ---- binary pixels, a KL warm-up and a learned prior ---------------------------------------------

@pytest.fixture(scope="module")
def binary_warmup_run(tmp_path_factory, data_dir):
    """A small VampPrior run on dynamically binarized images, with a KL warm-up of 1 epoch and beta
    0.5."""
    out = tmp_path_factory.mktemp("runs") / "binary"
    with drawing_only("gradient_paths.png"):
        assert run_cli("--data-dir", data_dir, *SMALL, "--prior", "vamp", "--prior-components", "5",
                       "--binarize", "--beta", "0.5", "--kl-warmup", "1", "--epochs", "2",
                       "--gmm-components", "3", "--out", str(out)) == 0
    return out


def test_a_binarized_run_is_tested_on_one_fixed_binarization_and_reports_the_true_elbo(
        binary_warmup_run, data_dir):
    m = json.loads((binary_warmup_run / "metrics.json").read_text())
    model, _ = runs.load_model(str(binary_warmup_run / "model.npz"))
    _, _, x_test, _ = mnist.load("mnist", data_dir)
    seed = m["config"]["seed"]
    binary = mnist.binarize(x_test, np.random.default_rng(mnist.TEST_BINARIZATION_SEED))
    fixed, _, _ = analysis.negative_elbo(model, binary, seed)
    assert m["test_loss"] == pytest.approx(fixed, rel=1e-12)
    another_draw = np.random.default_rng(mnist.TEST_BINARIZATION_SEED + 7)
    other, _, _ = analysis.negative_elbo(model, mnist.binarize(x_test, another_draw), seed)
    assert m["test_loss"] != pytest.approx(other, rel=1e-6)
    assert m["test_loss"] == pytest.approx(m["test_recon"] + m["test_kl"])     # beta 1, not 0.5
    assert m["config"]["binarize"] is True
    assert m["config"]["beta"] == 0.5 and m["kl_weight"][1] == 0.5


@pytest.mark.usefixtures("no_figures")
def test_analyze_into_a_new_folder_takes_the_runs_options_from_beside_the_model(
        binary_warmup_run, data_dir, tmp_path):
    assert run_cli("--data-dir", data_dir, "--analyze", str(binary_warmup_run / "model.npz"),
                   "--iw-samples", "2", "--gmm-components", "2",
                   "--out", str(tmp_path / "again")) == 0
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    a = metrics["aggregate_posterior"]
    model, _ = runs.load_model(str(binary_warmup_run / "model.npz"))
    _, _, x_test, _ = mnist.load("mnist", data_dir)
    binary = mnist.binarize(x_test, np.random.default_rng(mnist.TEST_BINARIZATION_SEED))
    mu, _ = codes.encode_all(model, binary)          # the binarized test set, as the run used
    np.testing.assert_allclose(a["mean"], mu.mean(0), rtol=1e-9)
    grey, _ = codes.encode_all(model, x_test)
    assert not np.allclose(a["mean"], grey.mean(0), rtol=1e-6)


def test_a_learned_prior_run_trains_and_keeps_its_pseudo_inputs_images(binary_warmup_run, data_dir,
                                                                       capsys):
    m = json.loads((binary_warmup_run / "metrics.json").read_text())
    assert m["config"]["prior"] == "vamp" and m["config"]["prior_components"] == 5
    assert m["train_loss"][-1] < m["train_loss"][0]
    assert m["iw_nll"] < m["test_loss"]
    model, _ = runs.load_model(str(binary_warmup_run / "model.npz"))
    u = model.pseudo_inputs()
    assert u.min() >= 0 and u.max() <= 1 and len(u) == 5
    checkpoint = str(binary_warmup_run / "checkpoint.npz")
    assert run_cli("--data-dir", data_dir, "--prior", "standard", "--resume", checkpoint) == 1
    assert "another architecture" in capsys.readouterr().err


def test_every_run_records_and_draws_its_gradient_paths(binary_warmup_run):
    m = json.loads((binary_warmup_run / "metrics.json").read_text())
    assert set(m["gradient_paths"]) == set(m["gradient_paths_per_unit"]) == set(training.PATHS)
    for name, per_epoch in m["gradient_paths"].items():
        assert len(per_epoch) == 2 and min(per_epoch) > 0, name        # one value per epoch
    for name, per_epoch in m["gradient_paths_per_unit"].items():
        assert len(per_epoch) == 2, name
        first = per_epoch[0]
        assert len(first["rms"]) == len(first["mean"]) == 4, name
    assert (binary_warmup_run / "gradient_paths.png").stat().st_size > 0
