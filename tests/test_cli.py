"""The command line's mistakes: every option, data folder or file that cannot work ends in one
`error:` line and a non-zero exit, before any download or training wherever it can be known that
early."""
import subprocess
import sys

import pytest

import vae

from lab import command
from lab import runs
from lab import training

from conftest import REPO, fail_if_trained, one_line_error, run_cli


@pytest.mark.parametrize("flag, value", [("--latent", "0"), ("--hidden", "-3"),
                                         ("--batch-size", "0"), ("--lr", "0"), ("--lr", "-1e-3"),
                                         ("--epochs", "-1")])
def test_non_positive_options_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        command.main([flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert flag in err and "Traceback" not in err


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    argv = [sys.executable, "-m", "lab", "--data-dir", str(tmp_path / "none"),
            "--mirror", "http://127.0.0.1:9/"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--betas", "1", "--resume", "c.npz"], "--resume and --betas do not go together"),
    (["--betas", "1", "--analyze", "m.npz"], "--analyze and --betas do not go together"),
    (["--analyze", "m.npz", "--resume", "c.npz"], "--analyze and --resume do not go together"),
    (["--analyze", "m.npz", "--lr", "0.1"], "--analyze and --lr do not go together"),
    (["--betas", "0", "1", "--beta", "2"], "--betas and --beta do not go together"),
    (["--lr", "abc"], "invalid float value"),
    (["--lr", "nan"], "--lr: must be > 0"),
    (["--beta", "inf"], "--beta: must be >= 0 and finite"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--likelihood", "gaussian", "--decoder-sigma", "0"],
     "must be a number > 0, learned, optimal or per-pixel, got '0'"),
    (["--likelihood", "gaussian", "--decoder-sigma", "-1"],
     "must be a number > 0, learned, optimal or per-pixel, got '-1'"),
    (["--likelihood", "gaussian", "--decoder-sigma", "wide"],
     "must be a number > 0, learned, optimal or per-pixel, got 'wide'"),
    (["--decoder-sigma", "1"], "--decoder-sigma needs --likelihood gaussian"),
    (["--likelihood", "cb", "--decoder-sigma", "learned"],
     "--decoder-sigma needs --likelihood gaussian"),
    (["--prior-components", "5"], "--prior-components needs --prior mog or vamp"),
    (["--likelihoods", "gaussian:"], "'gaussian:' is not bernoulli, gaussian:SIGMA"),
    (["--likelihoods", "gaussian", "gaussian:learned"], "--likelihoods repeats a value"),
    (["--likelihoods", "gaussian:1", "gaussian:1+dequantize", "--dequantize"],
     "--likelihoods repeats a value"),
    (["--betas", "0.1", "0.1000001"], "--betas repeats a value"),
    (["--betas", "0", "-0.0"], "--betas repeats a value"),
    (["--likelihoods", "cb:1"], "'cb:1' is not bernoulli"),
    (["--likelihoods", "gaussian:0"], "got '0'"),
    (["--likelihoods", "cb", "--betas", "1"], "--betas and --likelihoods do not go together"),
    (["--analyze", "m.npz", "--likelihood", "cb"], "--analyze and --likelihood do not go together"),
    (["--betas", "0", "-1"], "--betas: must be >= 0 and finite, got -1.0"),
    (["--betas", "1", "1"], "repeats a value"),
    (["--likelihoods", "cb", "cb"], "--likelihoods repeats a value"),
])
@pytest.mark.usefixtures("no_work")
def test_options_that_cannot_work_are_refused_in_one_line(capsys, flags, message):
    assert message in one_line_error(capsys, *flags, code=2)


@pytest.mark.parametrize("flags, message", [
    (["--kl-warmup", "3", "--epochs", "2"], "--kl-warmup 3 is longer than the 2 epochs"),
    (["--kl-warmup", "11"], "--kl-warmup 11 is longer than the 10 epochs"),
])
@pytest.mark.usefixtures("no_work")
def test_a_warm_up_longer_than_the_run_is_refused_before_any_work(tmp_path, data_dir, capsys,
                                                                  flags, message):
    err = one_line_error(capsys, "--data-dir", data_dir, *flags, "--out", str(tmp_path / "r"))
    assert message in err


@pytest.mark.parametrize("flags, message", [
    (["--gmm-components", "601"],
     "--gmm-components 601 is out of range: the mixture is fitted to 600 codes"),
    (["--batch-size", "601"], "--batch-size 601 is out of range: the training set has 600 images"),
    (["--posterior-image", "200"],
     "--posterior-image 200 is out of range: the test set has 200 images"),
    (["--prior", "vamp", "--prior-components", "601"], "--prior-components 601 is out of range"),
])
def test_options_too_large_for_the_data_are_refused_before_training(tmp_path, data_dir, capsys,
                                                                    monkeypatch, flags, message):
    monkeypatch.setattr(training, "train_epoch", fail_if_trained)
    err = one_line_error(capsys, "--data-dir", data_dir, *flags, "--out", str(tmp_path / "r"))
    assert message in err
    assert not (tmp_path / "r").exists()


def test_an_out_of_range_posterior_image_is_refused_before_training(tmp_path, data_dir, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(training, "train_epoch", fail_if_trained)
    out = str(tmp_path / "r")
    assert run_cli("--data-dir", data_dir, "--posterior-image", "200", "--out", out) == 1
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    model = str(tmp_path / "model.npz")
    runs.save_model(vae.VAE(784, 8, 2), model)
    assert run_cli("--data-dir", data_dir, "--analyze", model, "--posterior-image", "100000") == 1
    assert "out of range" in capsys.readouterr().err


def test_a_data_dir_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "archives").write_text("not a folder")
    err = one_line_error(capsys, "--data-dir", str(tmp_path / "archives"))
    assert "is a file, not a folder" in err


# ---- files given to --resume ---------------------------------------------------------------------

def test_resume_rejects_a_corrupt_file_and_another_architecture(tmp_path, data_dir, finished_run,
                                                                capsys):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    assert run_cli("--data-dir", data_dir, "--resume", str(tmp_path / "junk.npz")) == 1
    assert "not a readable model file" in capsys.readouterr().err
    checkpoint = str(finished_run / "checkpoint.npz")
    for flag, value in (("--latent", "8"), ("--prior", "vamp")):
        assert run_cli("--data-dir", data_dir, flag, value, "--resume", checkpoint) == 1
        err = capsys.readouterr().err
        assert "another architecture" in err and flag in err
        assert err.count("\n") == 1
    model_only = str(tmp_path / "model_only.npz")
    runs.save_model(vae.VAE(784, 8, 2), model_only)     # a model, not a training checkpoint
    assert run_cli("--data-dir", data_dir, "--resume", model_only) == 1
    assert "not a training checkpoint" in capsys.readouterr().err


@pytest.mark.usefixtures("no_work")
def test_resuming_a_text_file_says_it_is_not_a_model_file(tmp_path, data_dir, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", str(tmp_path / "notes.txt"))
    assert "not an .npz archive" in err and "pickle" not in err


@pytest.mark.usefixtures("no_work")
def test_a_checkpoint_of_another_likelihood_is_refused(finished_run, data_dir, capsys):
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume",
                         str(finished_run / "checkpoint.npz"), "--likelihood", "gaussian",
                         "--decoder-sigma", "0.5")
    assert "another architecture" in err and "--likelihood bernoulli" in err
