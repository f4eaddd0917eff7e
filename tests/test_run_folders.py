"""A run's folder: named for every training option that differs from the recipe, never another
run's (unless --overwrite), used by one run at a time, and refused before any work when it cannot
be used."""
import json
import os
import shutil
import subprocess
import sys

import pytest


from lab import command
from lab import runs

from conftest import REPO, SMALL, one_line_error, run_cli


def default_folder(flags):
    """The folder a run with these flags writes to when --out is not given."""
    cfg = command.prepare_config(command.parse_args(flags))
    return runs.default_out(cfg, command.DEFAULTS)


@pytest.mark.parametrize("flags", [
    ["--beta", "0.3"],
    ["--kl-warmup", "5"],
    ["--lr", "0.002"],
    ["--batch-size", "64"],
    ["--epochs", "20"],
    ["--prior", "mog"],
    ["--prior", "vamp", "--prior-components", "50"],
    ["--binarize"],
    ["--dequantize"],
    ["--train-images", "5000"],
    ["--likelihood", "gaussian", "--decoder-sigma", "optimal"],
    ["--likelihood", "gaussian", "--decoder-sigma", "per-pixel"],
    ["--hidden", "200"],
    ["--latent", "2"],
    ["--seed", "3"],
    ["--layers", "2"],
    ["--activation", "tanh"],
    ["--objective", "iwae"],
    ["--samples", "5"],
    ["--adam-eps", "1e-4"],
    ["--lr-schedule", "burda"],
])
def test_runs_that_differ_in_a_training_option_never_share_a_default_folder(flags):
    recipe = default_folder([])
    assert default_folder(flags) != recipe
    with_warmup = default_folder(["--beta", "0.3", "--kl-warmup", "5"])
    assert with_warmup != default_folder(["--beta", "0.3"])


@pytest.mark.usefixtures("no_work")
def test_a_new_run_never_replaces_another_runs_files_unless_asked(finished_run, tmp_path, data_dir,
                                                                 capsys):
    names = ("model.npz", "checkpoint.npz", "metrics.json")
    before = {f: (finished_run / f).read_bytes() for f in names}
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--seed", "1",
                         "--out", str(finished_run))
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    other = tmp_path / "other"                  # --analyze into a folder that holds another run
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    err = one_line_error(capsys, "--data-dir", data_dir, "--analyze",
                         str(finished_run / "model.npz"), "--out", str(other))
    assert "holds another run" in err
    assert {f: (finished_run / f).read_bytes() for f in names} == before
    assert (other / "metrics.json").read_text() == "{}"


@pytest.mark.usefixtures("no_figures")
def test_overwrite_replaces_the_old_run_whole(finished_run, tmp_path, data_dir):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "latent_space.png").write_bytes(b"an old run's figure")
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--seed", "2", "--overwrite",
                   "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["seed"] == 2 and m["config"]["epochs"] == 0
    assert not (out / "latent_space.png").exists()
    assert not (out / ".lock").exists()


LOCK_HOLDER = """import sys
import time
from lab import runs
with runs.claim(sys.argv[1], True, False):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.usefixtures("no_figures")
def test_a_folder_in_use_is_refused_and_a_crashed_runs_lock_does_not_stay(tmp_path, data_dir,
                                                                          capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--epochs", "0",
                             "--out", str(out))
        assert "in use by another run" in err
    finally:
        holder.kill()                                   # a crash: no chance to clean up
        holder.wait()
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(out)) == 0


@pytest.mark.usefixtures("no_figures")
def test_the_output_folder_exists_before_anything_is_saved(finished_run, tmp_path, data_dir):
    new = tmp_path / "a" / "new"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(new)) == 0
    assert (new / "model.npz").exists()
    out = tmp_path / "continued"                        # a finished run continued into a new folder
    assert run_cli("--data-dir", data_dir, "--resume", str(finished_run / "checkpoint.npz"),
                   "--epochs", "3", "--out", str(out)) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["epochs"] == 3
    finished = json.loads((finished_run / "metrics.json").read_text())
    assert len(finished["train_loss"]) == 2             # untouched


def a_file(folder):
    (folder / "f").write_text("a file")
    return folder / "f"


def a_folder_inside_a_file(folder):
    (folder / "f").write_text("a file")
    return folder / "f" / "sub"


@pytest.mark.parametrize("make_out, message", [
    (a_file, "is a file, not a folder"),
    (a_folder_inside_a_file, "is a file, not a folder"),
])
@pytest.mark.usefixtures("no_work")
def test_an_output_path_that_cannot_be_used_is_refused_before_any_work(tmp_path, data_dir, capsys,
                                                                       make_out, message):
    err = one_line_error(capsys, "--data-dir", data_dir, "--out", str(make_out(tmp_path)))
    assert message in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"),
                    reason="needs a folder nobody can write in (Linux /proc)")
@pytest.mark.usefixtures("no_work")
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(data_dir, capsys):
    err = one_line_error(capsys, "--data-dir", data_dir, "--out", "/proc/vae-run")
    assert "cannot write in /proc" in err
