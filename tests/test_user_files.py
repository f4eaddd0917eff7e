"""Nothing of the user's is ever touched, and every failure is one line that says what to do: a run
writes only into a new, empty or run's folder; --overwrite removes the old run's files by name, once
the new run has a checkpoint; a full disk, a permission denied, a hand-edited record or a damaged
model each end in one `error:` line with the remedy that works; printed commands paste as they are;
SIGTERM is Ctrl-C; a dead run's lock and half-written files are cleared, with a line."""
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

import mnist
import vae

from lab import command
from lab import console
from lab import figures
from lab import runs
from lab import training
from lab.options import UsageError, parse_args

from conftest import SMALL, one_line_error, run_cli


def a_copy_of(finished_run, tmp_path, name="run"):
    """A finished run's folder, copied: the tests below may damage it."""
    out = tmp_path / name
    shutil.copytree(finished_run, out)
    return out


def dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def strict_json(path):
    """A JSON file read by a strict parser: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---- a run writes only where it may --------------------------------------------------------------

@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_other_files_is_refused_naming_them_even_with_overwrite(
        tmp_path, data_dir, capsys, overwrite):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("holiday.png", "cat.png", "reconstructions.png"):
        (photos / name).write_bytes(name.encode())
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--out", str(photos), *overwrite)
    assert "not a run of this project" in err and "cat.png, holiday.png" in err
    assert sorted(os.listdir(photos)) == ["cat.png", "holiday.png", "reconstructions.png"]
    assert (photos / "reconstructions.png").read_bytes() == b"reconstructions.png"


@pytest.mark.usefixtures("no_work")
def test_the_repositorys_own_folders_are_not_run_folders(data_dir, capsys):
    for folder in (".", os.path.join("docs", "figures", "recipe")):
        err = one_line_error(capsys, "--data-dir", data_dir, "--out", folder, "--overwrite")
        assert "not a run of this project" in err


@pytest.mark.usefixtures("no_figures")
def test_overwrite_removes_only_the_runs_own_files_once_the_new_run_has_a_checkpoint(
        tmp_path, data_dir, finished_run, capsys, monkeypatch):
    out = a_copy_of(finished_run, tmp_path)
    (out / "explorer.html").write_text("the page of an older 2-D run")
    (out / "notes.txt").write_text("mine")
    old_model = (out / "model.npz").read_bytes()
    command = ["--data-dir", data_dir, *SMALL, "--epochs", "1", "--seed", "5", "--out", str(out),
               "--overwrite"]
    # the new run fails before its first checkpoint: the old run is as it was
    def forward_nan(self, x, eps):
        return float("nan"), float("nan"), 0.0
    real_forward = vae.VAE.forward
    monkeypatch.setattr(vae.VAE, "forward", forward_nan)
    err = one_line_error(capsys, *command)
    assert f"the old run in {out} is as it was" in err
    assert (out / "model.npz").read_bytes() == old_model
    assert (out / "explorer.html").exists() and (out / "metrics.json").exists()
    monkeypatch.setattr(vae.VAE, "forward", real_forward)
    assert run_cli(*command) == 0
    assert "--overwrite: removed the old run's" in capsys.readouterr().out
    assert not (out / "explorer.html").exists()         # the old 2-D run's page went with it
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.npz").read_bytes() != old_model
    leftover = set(os.listdir(out)) - set(runs.RUN_FILES) - {"notes.txt"}
    assert not leftover, leftover


def test_every_file_a_run_writes_is_one_that_overwrite_may_remove(finished_run):
    assert set(os.listdir(finished_run)) <= set(runs.RUN_FILES)


def test_a_dead_runs_lock_and_half_written_files_are_removed_with_a_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.npz").write_bytes(b"a run's")
    (out / ".lock").write_bytes(b"")
    half = f"checkpoint.npz.tmp-{dead_pid()}"
    (out / half).write_bytes(b"x" * 100)
    alive = f"metrics.json.tmp-{os.getpid()}"           # being written by a live process: kept
    (out / alive).write_bytes(b"{")
    lines = []
    with runs.claim(str(out), False, False, log=lines.append):
        pass
    assert any("removed the .lock of a run that no longer exists" in line for line in lines)
    assert any(f"removed {half}" in line for line in lines), lines
    assert sorted(os.listdir(out)) == sorted(["model.npz", alive])


# ---- a full disk, and what can be written at all -------------------------------------------------

def fail_on_call(count, real):
    """Stands in for a function that writes a file: the count-th call fails as a full disk does."""
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
        return real(*args, **kwargs)
    return write


@pytest.mark.usefixtures("no_figures")
def test_a_full_disk_keeps_the_last_checkpoint_and_names_resume(
        tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", fail_on_call(2, real_save))
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--epochs", "2",
                         "--out", str(out))
    checkpoint = out / "checkpoint.npz"
    assert "No space left on device" in err and "the last good checkpoint" in err
    resume = shlex.split(err.split("go on with: ")[1])
    assert resume[:5] == ["python", "-m", "lab", "--resume", str(checkpoint)]
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    assert run_cli(*resume[3:]) == 0
    assert runs.is_complete(str(out))


@pytest.mark.usefixtures("no_figures")
def test_a_full_disk_while_drawing_names_the_resume_that_finishes_the_run(
        tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(figures, "save", fail_on_call(1, figures.save))
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--epochs", "1",
                         "--out", str(out))
    assert "could not write" in err and "No space left on device" in err
    assert f"--resume {out / 'checkpoint.npz'}" in err and "Traceback" not in err
    assert not runs.is_complete(str(out))


def test_a_folder_that_cannot_be_listed_is_said_to_be_unreadable_and_never_downloaded_into(
        data_dir, monkeypatch):
    # (the tests run as root, whom no mode bit stops: os.access stands in for another user's)
    monkeypatch.setattr(mnist.os, "access", lambda path, mode: False)
    with pytest.raises(mnist.DataError, match="permission denied") as err:
        mnist.load("mnist", data_dir, mirror="http://127.0.0.1:9/")
    assert "download" not in str(err.value)


def test_an_archive_that_cannot_be_read_is_never_called_corrupt(data_dir, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(mnist, "open", denied, raising=False)
    with pytest.raises(mnist.DataError, match="permission denied") as err:
        mnist.load("mnist", data_dir)
    assert "delete" not in str(err.value) and "corrupt" not in str(err.value)


# ---- records: checked by field, strict JSON, read from where they are ----------------------------

@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("edit, message", [
    (lambda m: m["config"].update(train_images="2000"),
     'config.train_images is "2000", expected an integer >= 1 or null'),
    (lambda m: m["config"].update(dequantize="no"), 'config.dequantize is "no", expected true'),
    (lambda m: m["config"]["measure"].update(iw_samples=0),
     "config.measure.iw_samples is 0, expected an integer >= 1"),
    (lambda m: m.update(config=[]), "config is a list, not an object of options"),
    (lambda m: m["config"].update(latent=7), "says latent 7, but the model beside it has 4"),
])
def test_a_hand_edited_record_is_refused_by_name(
        tmp_path, data_dir, finished_run, capsys, edit, message):
    out = a_copy_of(finished_run, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    edit(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics))
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze", str(out / "model.npz"))
    assert message in err


@pytest.mark.usefixtures("no_work")
def test_a_record_that_is_not_an_object_is_refused(tmp_path, data_dir, finished_run, capsys):
    out = a_copy_of(finished_run, tmp_path)
    (out / "metrics.json").write_text("[]")
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze", str(out / "model.npz"))
    assert "holds a JSON list, not a run's record" in err


@pytest.mark.usefixtures("no_figures")
def test_analyze_into_another_folder_keeps_the_whole_record_and_says_what_it_measures_anew(
        tmp_path, data_dir, finished_run, capsys):
    other = tmp_path / "other"
    model = str(finished_run / "model.npz")
    assert run_cli("--data-dir", data_dir, "--analyze", model, "--out", str(other),
                   "--iw-samples", "1", "--gmm-components", "2") == 0
    printed = capsys.readouterr().out
    assert "iw_samples 10 -> 1, gmm_components 3 -> 2" in printed
    before = json.loads((finished_run / "metrics.json").read_text())
    after = strict_json(other / "metrics.json")
    assert set(before) <= set(after)
    assert after["test_loss_curve"] == before["test_loss_curve"]
    assert after["config"]["measure"]["iw_samples"] == 1
    assert after["config"]["measure"]["gmm_components"] == 2


def test_metrics_are_strict_json_with_each_value_that_is_no_number_named(tmp_path):
    path = tmp_path / "metrics.json"
    runs.write_metrics(str(path), {"a": 1.5, "b": [2.0, float("nan")], "c": {"d": float("inf")}})
    written = strict_json(path)
    assert written["b"] == [2.0, None] and written["c"] == {"d": None}
    assert written["not_numbers"] == {"b[1]": "nan", "c.d": "inf"}


@pytest.mark.usefixtures("no_figures")
def test_a_run_of_no_epochs_records_its_speed_as_null(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(out)) == 0
    assert strict_json(out / "metrics.json")["examples_per_second"] is None


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("sigma", ["1e300", "1e-30", "inf"])
def test_a_sigma_outside_float32s_range_is_refused_with_the_range(capsys, sigma):
    err = one_line_error(capsys, "--likelihood", "gaussian", "--decoder-sigma", sigma, code=2)
    assert "must lie in [1e-15, 1e+15]" in err


def test_the_holes_are_not_measured_on_too_few_codes(data_dir, capsys, monkeypatch):
    monkeypatch.setattr(training, "train_epoch", lambda *a: pytest.fail("trained"))
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--train-images", "10",
                         "--batch-size", "10")
    assert "fitted to 10 training codes: it needs at least 15" in err


# ---- the way on: commands that paste, SIGTERM, a damaged model -----------------------------------

def stop_at_step_3(signum):
    """A progress bar that sends the signal at step 3."""
    def progress_factory():
        def progress(state, n_steps, seen):
            if state["step"] == 3:
                signal.raise_signal(signum)
        return progress
    return progress_factory


@pytest.mark.usefixtures("no_figures")
def test_sigterm_is_ctrl_c_and_the_printed_command_pastes_into_a_folder_with_a_space(
        tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "my run"
    command = ["--data-dir", data_dir, *SMALL, "--epochs", "1", "--out", str(out)]
    real_progress = console.TrainingProgress
    monkeypatch.setattr(console, "TrainingProgress", stop_at_step_3(signal.SIGTERM))
    assert run_cli(*command) == 130
    monkeypatch.setattr(console, "TrainingProgress", real_progress)
    printed = capsys.readouterr().out
    words = shlex.split(printed.split("continue with: ")[1])
    assert words[:5] == ["python", "-m", "lab", "--resume", str(out / "checkpoint.npz")]
    assert sorted(os.listdir(out)) == ["checkpoint.npz"]          # no .lock left behind
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    # the run's own command, run again, goes on with it rather than refusing its folder
    assert run_cli(*command) == 0
    assert "holds this run, interrupted or finished: going on with it" in capsys.readouterr().out
    assert runs.is_complete(str(out))


@pytest.mark.usefixtures("no_work")
def test_the_command_in_holds_another_run_pastes_as_printed(tmp_path, data_dir, finished_run,
                                                            capsys):
    out = a_copy_of(finished_run, tmp_path, "a run")
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--seed", "9", "--out", str(out))
    words = shlex.split(err.split("continue it with ")[1].split(", choose")[0])
    assert words == ["python", "-m", "lab", "--resume", str(out / "checkpoint.npz")]


@pytest.mark.usefixtures("no_figures")
def test_a_damaged_model_names_the_resume_that_rebuilds_it(tmp_path, data_dir, finished_run,
                                                           capsys):
    out = a_copy_of(finished_run, tmp_path)
    (out / "model.npz").write_bytes(b"half a model")
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze", str(out / "model.npz"))
    checkpoint = out / "checkpoint.npz"
    assert f"python -m lab --resume {checkpoint} rebuilds it" in err
    assert run_cli("--data-dir", data_dir, "--resume", str(checkpoint)) == 0
    model, _ = runs.load_model(str(out / "model.npz"))
    assert model.latent == 4


@pytest.mark.usefixtures("no_work")
def test_resume_of_a_finished_run_points_new_measurements_to_analyze(data_dir, finished_run,
                                                                     capsys):
    assert run_cli("--data-dir", data_dir, "--resume", str(finished_run), "--iw-samples", "3") == 0
    printed = capsys.readouterr().out
    model = finished_run / "model.npz"
    assert f"python -m lab --analyze {model} --data-dir {data_dir} --iw-samples 3" in printed


@pytest.mark.usefixtures("no_work")
def test_a_second_experiment_never_replaces_anothers_comparison(tmp_path, data_dir, capsys):
    out = tmp_path / "betas"
    out.mkdir()
    (out / "comparison.json").write_text(json.dumps([{"run": "beta = 1"}, {"run": "beta = 3"}]))
    err = one_line_error(capsys, "--data-dir", data_dir, "--betas", "0", "--out", str(out))
    assert "holds another experiment's comparison.json" in err and "beta = 1" in err
    assert json.loads((out / "comparison.json").read_text())[1]["run"] == "beta = 3"


def test_likelihoods_gaussian_is_the_learned_sigma_as_likelihood_gaussian_is():
    assert parse_args(["--likelihoods", "gaussian"]).likelihoods == [("gaussian", "learned",
                                                                       False)]


def test_a_warm_up_epochs_beta_is_labelled_the_epochs_mean():
    state = {"epoch": 1, "epoch_seconds": [1.0], "train_loss": [200.0], "kl_weight": [0.25],
             "decoder_sigma_curve": []}
    assert "mean beta 0.25 (warm-up)" in console.epoch_line(state, 1, 1, 0, 100, warming_up=True)
    assert "  beta 0.25  " in console.epoch_line(state, 1, 1, 0, 100)


# ---- what a careless user met next ---------------------------------------------------------------

@pytest.mark.usefixtures("no_work")
def test_a_file_that_is_no_model_is_never_to_be_deleted(tmp_path, data_dir, capsys):
    photo = tmp_path / "holiday.png"
    photo.write_bytes(b"\x89PNG a photo")
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze", str(photo))
    assert "pass a run's model.npz" in err and "delete" not in err
    assert photo.read_bytes() == b"\x89PNG a photo"


@pytest.mark.usefixtures("no_work")
def test_a_folder_holding_a_model_without_a_checkpoint_is_not_offered_to_resume(
        tmp_path, data_dir, finished_run, capsys):
    out = a_copy_of(finished_run, tmp_path)
    (out / "checkpoint.npz").unlink()                   # as train.py's folders are
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--seed", "8", "--out", str(out))
    assert "holds another run" in err and "--resume" not in err and "--overwrite" in err


def test_a_damaged_record_makes_a_run_unfinished_not_unreadable(tmp_path, finished_run):
    out = a_copy_of(finished_run, tmp_path)
    assert runs.is_complete(str(out))
    (out / "metrics.json").write_text('{"config": ')
    assert not runs.is_complete(str(out))


@pytest.mark.usefixtures("no_figures")
def test_an_interrupted_extension_run_again_goes_on_in_its_own_folder(
        tmp_path, data_dir, finished_run, capsys, monkeypatch):
    old = a_copy_of(finished_run, tmp_path, "old")
    command = ["--data-dir", data_dir, "--resume", str(old / "checkpoint.npz"), "--epochs", "3",
               "--out", str(tmp_path / "longer")]
    real_progress = console.TrainingProgress
    monkeypatch.setattr(console, "TrainingProgress", stop_at_step_3(signal.SIGINT))
    assert run_cli(*command) == 130
    monkeypatch.setattr(console, "TrainingProgress", real_progress)
    assert run_cli(*command) == 0
    assert "holds this extension" in capsys.readouterr().out
    assert runs.is_complete(str(tmp_path / "longer"))


def test_an_experiment_may_add_runs_to_a_comparison_in_any_order_but_never_drop_one(tmp_path):
    (tmp_path / "comparison.json").write_text(json.dumps([{"run": "beta = 0"},
                                                          {"run": "beta = 1"}]))
    command.check_comparison(str(tmp_path), ["beta = 1", "beta = 0", "beta = 3"], False)
    with pytest.raises(UsageError, match=r"does not train \(beta = 1\)"):
        command.check_comparison(str(tmp_path), ["beta = 0", "beta = 3"], False)
    command.check_comparison(str(tmp_path), ["beta = 3"], True)


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("flags, message", [
    (["--analyze", ""], "argument --analyze: is empty"),
    (["--out", ""], "argument --out: is empty"),
    (["--epoch", "0"], "unrecognized arguments: --epoch"),
])
def test_empty_paths_and_shortened_flags_are_refused(capsys, flags, message):
    assert message in one_line_error(capsys, *flags, code=2)


# ---- found by a careless user's review -----------------------------------------------------

@pytest.mark.usefixtures("no_work")
def test_analyze_on_another_dataset_never_replaces_the_runs_own_measurements(finished_run,
                                                                             data_dir, capsys,
                                                                             tmp_path):
    before = (finished_run / "metrics.json").read_bytes()
    err = one_line_error(capsys, "--analyze", str(finished_run), "--dataset", "fashion",
                         "--data-dir", data_dir)
    assert "the run was trained on MNIST" in err and "--out NEW_FOLDER" in err
    err = one_line_error(capsys, "--analyze", str(finished_run), "--dataset", "fashion",
                         "--data-dir", data_dir, "--out", str(finished_run))
    assert "the run was trained on MNIST" in err              # its own folder, named
    assert (finished_run / "metrics.json").read_bytes() == before


@pytest.mark.usefixtures("no_work")
def test_a_single_run_never_replaces_an_experiment_even_with_overwrite(tmp_path, data_dir,
                                                                       capsys):
    experiment = tmp_path / "betas"
    (experiment / "beta-0").mkdir(parents=True)
    (experiment / "comparison.json").write_text("[]")
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--epochs", "1", "--out",
                         str(experiment), "--overwrite")
    assert "holds an experiment (comparison.json)" in err
    assert (experiment / "comparison.json").read_text() == "[]"
