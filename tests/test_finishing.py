"""Nothing half-finished, nothing mislabelled: interrupted measurements and experiments are finished
by the command the run prints, a finished run is never replaced silently, the data is what it says
it is, and what cannot fit is refused before any work starts."""
import gzip
import io
import json
import os
import shlex
import shutil
import signal

import numpy as np
import pytest

import mnist

from lab import console
from lab import figures
from lab import models
from lab import report
from lab import resources

from conftest import SMALL, drawing_only, one_line_error, quiet, run_cli, write_dataset

SAME_NUMBERS = ("test_loss", "test_recon", "test_kl", "iw_nll", "train_loss")


def numbers_of(metrics):
    """What a run measured, without the seconds it took."""
    found = {key: metrics[key] for key in SAME_NUMBERS}
    posterior = dict(metrics["aggregate_posterior"])
    found["aggregate_posterior"] = posterior
    found["interpolation"] = metrics["interpolation"]
    return found


# ---- the data is what it claims ------------------------------------------------------------------

def contents_of(folder):
    """{archive name: md5 of its contents} of a folder's four archives, as mnist.load computes
    them."""
    magics = {"train_images": 2051, "train_labels": 2049, "test_images": 2051, "test_labels": 2049}
    found = {}
    for key, name in mnist.FILES.items():
        array = mnist.parse_idx(os.path.join(folder, name), magics[key])
        found[name] = mnist.content_md5(array, magics[key])
    return found


def test_archives_of_another_dataset_are_refused_with_the_option_that_asks_for_them(
        data_dir, monkeypatch, capsys):
    # Pretend the generated archives are Fashion-MNIST's published ones: asked for as MNIST (the
    # default), the run stops before training and names --dataset fashion; asked for as
    # Fashion-MNIST they load with no warning.
    monkeypatch.setitem(mnist.CONTENTS, "fashion", contents_of(data_dir))
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--epochs", "1", "--out", "x")
    assert "is Fashion-MNIST's" in err and "not MNIST's" in err and "--dataset fashion" in err
    assert not os.path.exists("x")
    lines = []
    mnist.load("fashion", data_dir, log=lines.append)
    assert lines == []


@pytest.mark.parametrize("mnist_part, fashion_part", [("train", "test"), ("test", "train")])
def test_a_folder_mixing_two_datasets_archives_is_refused_whichever_is_asked_for(
        tmp_path, monkeypatch, mnist_part, fashion_part):
    # Two generated sets, one pretending to be MNIST's published archives, the other Fashion-
    # MNIST's; a folder with one's training archives and the other's test archives is neither,
    # whichever archive is checked first (a check of the first archive alone passes one of these).
    as_mnist = tmp_path / "mnist"
    as_fashion = tmp_path / "fashion"
    write_dataset(as_mnist, n_train=50, n_test=20, seed=1)
    write_dataset(as_fashion, n_train=50, n_test=20, seed=2)
    monkeypatch.setitem(mnist.CONTENTS, "mnist", contents_of(as_mnist))
    monkeypatch.setitem(mnist.CONTENTS, "fashion", contents_of(as_fashion))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for key, name in mnist.FILES.items():
        source = as_mnist if key.startswith(mnist_part) else as_fashion
        shutil.copyfile(source / name, mixed / name)
    for dataset in ("mnist", "fashion"):
        with pytest.raises(mnist.DataError, match="not (MNIST|Fashion-MNIST)'s"):
            mnist.load(dataset, str(mixed), log=quiet)


def test_a_well_formed_set_that_matches_nothing_known_is_used_with_one_warning(data_dir):
    lines = []
    x_train, _, _, _ = mnist.load("mnist", data_dir, log=lines.append)
    assert len(x_train) == 600
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "unchecked" in lines[0], lines


def test_an_uncompressed_archive_beside_a_missing_gz_is_used_and_said(tmp_path):
    arrays = write_dataset(tmp_path, n_train=50, n_test=20)
    gz_path = tmp_path / mnist.FILES["test_labels"]
    raw_path = tmp_path / mnist.FILES["test_labels"][:-len(".gz")]
    raw_path.write_bytes(gzip.decompress(gz_path.read_bytes()))
    gz_path.unlink()
    lines = []
    _, _, _, y_test = mnist.load("mnist", str(tmp_path), mirror="http://127.0.0.1:9/",
                                 log=lines.append)
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    assert any("using the uncompressed" in line for line in lines), lines


def test_an_empty_archive_says_it_is_empty(tmp_path):
    write_dataset(tmp_path, n_train=50, n_test=20)
    (tmp_path / mnist.FILES["train_images"]).write_bytes(b"")
    with pytest.raises(mnist.DataError, match="empty or shorter than an IDX header"):
        mnist.load("mnist", str(tmp_path))


def test_a_failed_first_download_leaves_no_empty_folder(tmp_path):
    data_dir = tmp_path / "data" / "mnist"
    with pytest.raises(mnist.DataError, match="could not download"):
        mnist.load("mnist", str(data_dir), mirror="http://127.0.0.1:9/", log=lambda line: None)
    assert os.listdir(tmp_path) == []


# ---- every run can be finished ------------------------------------------------------------------

def ctrl_c(*args, **kwargs):
    """Stands in for the measurements after training: a Ctrl-C as they start."""
    raise KeyboardInterrupt


def test_ctrl_c_in_the_measurements_is_finished_by_resume_to_the_same_numbers(
        tmp_path, data_dir, finished_run, monkeypatch, capsys):
    real_measure = report.measure_and_draw
    monkeypatch.setattr(report, "measure_and_draw", ctrl_c)
    out = tmp_path / "cut"
    with drawing_only():
        assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    err = capsys.readouterr().err
    checkpoint = str(out / "checkpoint.npz")
    assert f"python -m lab --resume {checkpoint}" in err
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(report, "measure_and_draw", real_measure)
    with drawing_only("samples_three_ways.png"):
        assert run_cli("--data-dir", data_dir, "--resume", checkpoint) == 0
    assert "finishing its measurements" in capsys.readouterr().out
    finished = json.loads((finished_run / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert numbers_of(resumed) == numbers_of(finished)
    assert (out / "samples_three_ways.png").exists()


@pytest.mark.usefixtures("no_figures")
def test_a_runs_command_run_again_finishes_its_own_folder_beside_a_finished_twin(
        tmp_path, data_dir, monkeypatch, capsys):
    # the same options finished in the default folder, and cut in its measurements in another:
    # the command run again finishes the other, and never takes the twin for an extension of it
    monkeypatch.chdir(tmp_path)
    command = ["--data-dir", data_dir, *SMALL, "--epochs", "1"]
    assert run_cli(*command) == 0
    out = tmp_path / "other"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "measure_and_draw", ctrl_c)
        assert run_cli(*command, "--out", str(out)) == 130
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    assert run_cli(*command, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "extension" not in printed and "finishing its measurements" in printed
    assert (out / "metrics.json").exists()


def interrupt_the_second_run(monkeypatch):
    """Ctrl-C at step 3 of the second training run of an experiment."""
    started = []

    def progress_factory():
        started.append(1)

        def progress(state, n_steps, seen):
            if len(started) == 2 and state["step"] == 3:
                signal.raise_signal(signal.SIGINT)
        return progress

    monkeypatch.setattr(console, "TrainingProgress", progress_factory)


@pytest.mark.usefixtures("no_figures")
def test_an_interrupted_experiment_run_again_reuses_its_finished_runs_and_compares(
        tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "betas"
    command = ["--data-dir", data_dir, *SMALL, "--epochs", "1", "--iw-samples", "2",
               "--betas", "0", "1", "--out", str(out)]
    out.mkdir()                                     # started with --overwrite, over nothing
    with pytest.MonkeyPatch.context() as patch:     # undone after; no_figures stays
        interrupt_the_second_run(patch)
        assert run_cli(*command, "--overwrite") == 130
    printed = capsys.readouterr().out
    continuing = printed.split("continue with: ")[1].splitlines()[0]
    # the experiment's own command, less --overwrite, which would start it over
    assert continuing == "python -m lab " + shlex.join(command)
    first_model = (out / "beta-0" / "model.npz").read_bytes()
    assert not (out / "comparison.json").exists()
    assert run_cli(*shlex.split(continuing)[3:]) == 0
    printed = capsys.readouterr().out
    assert "beta-0: finished before, reused" in printed
    assert "beta-1/checkpoint.npz: continuing this run of the experiment" in printed
    assert (out / "beta-0" / "model.npz").read_bytes() == first_model
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["beta"] for row in rows] == [0.0, 1.0]
    assert run_cli(*command) == 0                       # a third time: all reused, compared again
    assert "training epochs" not in capsys.readouterr().out


# ---- a finished run is never replaced silently ------------------------------------------------

@pytest.mark.usefixtures("no_figures")
def test_extending_a_finished_run_writes_a_new_folder_and_leaves_the_old_one(
        tmp_path, data_dir, finished_run, monkeypatch, capsys):
    before = {name: (finished_run / name).read_bytes() for name in os.listdir(finished_run)}
    checkpoint = str(finished_run / "checkpoint.npz")
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", checkpoint, "--epochs", "3",
                         "--out", str(finished_run))
    assert "would replace it" in err and "--overwrite" in err
    monkeypatch.chdir(tmp_path)
    assert run_cli("--data-dir", data_dir, "--resume", checkpoint, "--epochs", "3",
                   "--iw-samples", "2") == 0
    printed = capsys.readouterr().out
    new = tmp_path / "runs" / "mnist-h32-z4-s0-b50-e3"
    assert f"training it on to epoch 3 in {os.path.join('runs', new.name)}" in printed
    assert len(json.loads((new / "metrics.json").read_text())["train_loss"]) == 3
    after = {name: (finished_run / name).read_bytes() for name in os.listdir(finished_run)}
    assert after == before


@pytest.mark.usefixtures("no_figures")
def test_analyze_takes_a_runs_folder_and_refuses_a_checkpoint(tmp_path, data_dir, finished_run,
                                                              capsys):
    checkpoint = str(finished_run / "checkpoint.npz")
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze", checkpoint)
    assert "training checkpoint, not a model" in err
    assert f"the run's model is {finished_run / 'model.npz'}" in err
    out = tmp_path / "again"
    assert run_cli("--data-dir", data_dir, "--analyze", str(finished_run), "--iw-samples", "2",
                   "--out", str(out)) == 0
    assert (out / "metrics.json").exists()


@pytest.mark.usefixtures("no_work")
def test_analyze_of_a_run_whose_measurements_never_finished_points_to_resume(tmp_path, data_dir,
                                                                            finished_run, capsys):
    # its model and checkpoint, no metrics.json: the run's options are in the checkpoint, and
    # --analyze with the defaults would measure another run than the one trained
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("model.npz", "checkpoint.npz"):
        shutil.copy(finished_run / name, cut / name)
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze", str(cut))
    assert "measurements never finished" in err
    assert f"--resume {cut / 'checkpoint.npz'}" in err


@pytest.mark.usefixtures("no_work")
def test_out_inside_the_data_folder_and_benchmark_with_out_are_refused(data_dir, capsys):
    inside = os.path.join(data_dir, "run")
    err = one_line_error(capsys, "--data-dir", data_dir, "--out", inside)
    assert "inside the data folder" in err
    err = one_line_error(capsys, "--benchmark", "--out", "x", code=2)
    assert "--benchmark and --out do not go together: it writes nothing" in err


# ---- sizes are checked before work starts ------------------------------------------------------

def test_the_memory_estimate_counts_every_parameter_of_the_model():
    cases = [("standard", 0, "bernoulli", None), ("mog", 7, "bernoulli", None),
             ("vamp", 5, "bernoulli", None), ("standard", 0, "gaussian", "per-pixel")]
    for prior, components, likelihood, sigma in cases:
        cfg = {"hidden": 30, "latent": 6, "batch_size": 16, "prior": prior, "decoder_sigma": sigma}
        model = models.build(prior, components or None, likelihood, sigma, hidden=30, latent=6,
                             n_in=784)
        counted = sum(p.size for p in model.params().values())
        parts = resources.estimate(cfg, 784, components, iw_samples=10, gmm_components=3)
        assert parts[resources.PARAMETERS] == 6 * counted * 4, (prior, sigma)


@pytest.mark.usefixtures("no_work")
def test_a_run_that_would_not_fit_in_memory_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(resources, "available_bytes", lambda: 2 * 10 ** 9)
    err = one_line_error(capsys, "--hidden", "200000")
    assert "would need about" in err and "make --hidden or --latent smaller" in err
    err = one_line_error(capsys, "--latent", "3000")
    assert "the mixture fitted to q(z)" in err and "--latent or --gmm-components" in err
    err = one_line_error(capsys, "--iw-samples", "1000000")
    assert "make --iw-samples smaller" in err


class Log(io.StringIO):
    """A stream that is not a terminal, like a log file."""

    def isatty(self):
        return False


def test_a_long_phase_prints_a_progress_line_to_a_log_every_ten_seconds(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock["now"])
    log = Log()
    progress = console.Progress("iw_nll", stream=log)
    clock["now"] = 105.0
    progress.show(0.2)
    assert log.getvalue() == ""                         # under 10 s: nothing yet
    clock["now"] = 112.0
    progress.show(0.4)
    assert log.getvalue() == "  iw_nll: 40% after 12 s, about 18 s left\n"
    clock["now"] = 115.0
    progress.show(0.5)
    assert log.getvalue().count("\n") == 1              # the next line 10 s after the last


def test_the_latent_plane_names_the_classes_and_its_axes():
    model = models.build(hidden=8, latent=2, n_in=784)
    rng = np.random.default_rng(3)
    mu = rng.standard_normal((50, 2))
    labels = np.arange(50) % 10
    z_prior = rng.standard_normal((100, 2))
    in_hole = np.zeros(100, bool)
    names = mnist.CLASS_NAMES["fashion"]
    figs = figures.latent_plane(model, mu, labels, z_prior, in_hole, names)
    space = figs["latent_space.png"]
    plane, colorbar = space.axes
    assert plane.get_xlabel() == "z0" and plane.get_ylabel() == "z1"
    assert [label.get_text() for label in colorbar.get_yticklabels()] == names


def test_the_uncompressed_fallback_does_not_hide_a_truncated_gz(tmp_path):
    write_dataset(tmp_path, n_train=50, n_test=20)
    name = mnist.FILES["train_labels"]
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2])
    shutil.copy(tmp_path / name, tmp_path / "spare")
    with pytest.raises(mnist.DataError, match="not a valid gzip archive|fewer bytes"):
        mnist.load("mnist", str(tmp_path))


# ---- what a careless first try found --------------------------------------------------------

@pytest.mark.usefixtures("no_figures")
def test_an_epochs_0_run_interrupted_in_its_measurements_is_finished_by_the_printed_command(
        tmp_path, data_dir, monkeypatch, capsys):
    real_measure = report.measure_and_draw
    monkeypatch.setattr(report, "measure_and_draw", ctrl_c)
    out = tmp_path / "zero"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(out)) == 130
    checkpoint = out / "checkpoint.npz"
    assert f"--resume {checkpoint}" in capsys.readouterr().err
    assert checkpoint.exists()
    monkeypatch.setattr(report, "measure_and_draw", real_measure)
    assert run_cli("--data-dir", data_dir, "--resume", str(checkpoint)) == 0
    assert "aggregate_posterior" in json.loads((out / "metrics.json").read_text())


def interrupt_at_step_3():
    def progress(state, n_steps, seen):
        if state["step"] == 3:
            signal.raise_signal(signal.SIGINT)
    return progress


@pytest.mark.usefixtures("no_figures")
def test_resume_refuses_to_end_a_run_before_the_epochs_it_was_started_for(
        tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:     # undone after; no_figures stays
        patch.setattr(console, "TrainingProgress", interrupt_at_step_3)
        assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    capsys.readouterr()
    checkpoint = str(out / "checkpoint.npz")
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", checkpoint, "--epochs", "1")
    assert "started for 2 epochs; --epochs 1 would end it early" in err


def test_resume_takes_a_runs_folder_and_points_from_its_model_to_its_checkpoint(
        data_dir, finished_run, capsys):
    assert run_cli("--data-dir", data_dir, "--resume", str(finished_run)) == 0
    assert "the run is finished" in capsys.readouterr().out
    model = str(finished_run / "model.npz")
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", model)
    assert f"the run's checkpoint is {finished_run / 'checkpoint.npz'}" in err
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze",
                         str(finished_run / "checkpoint.npz"))
    assert f"the run's model is {model}" in err


def test_ctrl_c_stops_a_benchmark_and_a_benchmark_of_no_epochs_is_refused(
        data_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console, "TrainingProgress", interrupt_at_step_3)
    assert run_cli("--data-dir", data_dir, *SMALL, "--benchmark", "--epochs", "2") == 130
    assert "median epoch" not in capsys.readouterr().out
    err = one_line_error(capsys, "--benchmark", "--epochs", "0", code=2)
    assert "trains nothing to time" in err
    assert os.listdir(tmp_path) == []
