"""The two floors: the core (vae.py, autograd.py, mnist.py, train.py, test_vae.py) imports nothing
of the project but itself; the variations import only the core; the lab trains with train.py's step,
to the same numbers; and train.py, the minimal run, writes its model and pictures and nothing
else."""
import argparse
import ast
import os

import numpy as np
import pytest

import train
import vae
from autograd import Adam

from lab import analysis
from lab import runs
from lab import training
from lab.options import DEFAULTS

from conftest import REPO, make_flat_images

CORE = {"vae", "autograd", "mnist", "train", "test_vae"}
VARIATIONS = {"priors", "likelihoods", "iwae"}


def project_imports(path):
    """The top-level names a file imports, anywhere in it (an import inside a function counts)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_imports_nothing_of_the_project_but_itself():
    project = CORE | VARIATIONS | {"lab", "conftest"}
    for name in sorted(CORE):
        imported = project_imports(os.path.join(REPO, name + ".py")) & project
        assert imported <= CORE, f"{name}.py imports {sorted(imported - CORE)}"


def test_the_variations_import_only_the_core():
    for name in sorted(VARIATIONS):
        imported = project_imports(os.path.join(REPO, name + ".py"))
        assert "lab" not in imported and not imported & (VARIATIONS - {name}), (name, imported)


@pytest.mark.parametrize("beta, kl_warmup", [(1.0, 0), (0.5, 1)])
def test_the_lab_trains_with_train_py_step_to_the_same_parameters(beta, kl_warmup):
    # The lab's resumable loop and train.py's plain one, from the same seed: the same batches, eps,
    # KL weights and Adam steps, so every parameter is equal bit for bit after two epochs.
    x_train = make_flat_images(300, np.random.default_rng(4))
    # what train.py's loop reads of its command line
    args = argparse.Namespace(batch_size=50, beta=beta, kl_warmup=kl_warmup)
    core = vae.VAE(784, 16, 3, seed=7)
    core_opt = Adam(core.params(), lr=1e-3)
    rng = np.random.default_rng(7)
    for epoch in range(2):
        train.train_epoch(core, core_opt, x_train, args, rng, epoch)

    cfg = {**DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 50, "seed": 7, "beta": beta,
           "kl_warmup": kl_warmup}
    lab, lab_opt, state = training.new_run(cfg, x_train)
    never = {"requested": False}
    for epoch in range(2):
        training.train_epoch(lab, lab_opt, x_train, state, cfg, never, lambda *a, **k: None)

    for name, p in core.params().items():
        assert np.array_equal(p, lab.params()[name]), name


def test_train_py_test_loss_is_the_labs():
    x_test = make_flat_images(130, np.random.default_rng(5))
    model = vae.VAE(784, 16, 3, seed=2)
    lab_loss, _, _ = analysis.negative_elbo(model, x_test, seed=3)
    assert train.test_loss(model, x_test, seed=3) == pytest.approx(lab_loss, rel=1e-12)


def test_the_kl_weight_warms_up_linearly_to_beta():
    assert train.kl_weight(2.0, 0, 0, 10) == 2.0
    assert train.kl_weight(2.0, 2, 0, 10) == 0.0
    assert train.kl_weight(2.0, 2, 5, 10) == pytest.approx(0.5)
    assert train.kl_weight(2.0, 2, 20, 10) == 2.0


def test_train_py_writes_its_model_and_three_pictures_and_the_lab_reads_the_model(
        tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code = train.main(["--data-dir", data_dir, "--epochs", "2", "--hidden", "16", "--latent", "3",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(out)) == sorted(train.OUTPUTS)
    assert printed.count("test loss") == 2
    assert f"python -m lab --analyze {out / 'model.npz'} --data-dir {data_dir}" in printed
    model, _ = runs.load_model(str(out / "model.npz"))
    assert (model.n_in, model.hidden, model.latent, model.prior_name) == (784, 16, 3, "standard")


def test_train_py_never_writes_into_a_folder_that_holds_other_files(tmp_path, data_dir, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.png").write_bytes(b"mine")
    (photos / "reconstructions.png").write_bytes(b"mine too")
    code = train.main(["--data-dir", data_dir, "--epochs", "1", "--out", str(photos)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "holiday.png" in err
    assert "reconstructions.png" in err                 # a file of the user's by that name
    assert sorted(os.listdir(photos)) == ["holiday.png", "reconstructions.png"]
    assert (photos / "reconstructions.png").read_bytes() == b"mine too"


def test_train_py_never_writes_over_a_users_files_that_bear_its_names(tmp_path, data_dir,
                                                                      capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.npz").write_text("my notes, named like a model")
    code = train.main(["--data-dir", data_dir, "--epochs", "1", "--out", str(mine)])
    assert code == 1 and "did not write (model.npz)" in capsys.readouterr().err
    assert (mine / "model.npz").read_text() == "my notes, named like a model"


def test_train_py_runs_again_into_its_own_folder(tmp_path, data_dir):
    out = tmp_path / "run"
    flags = ["--data-dir", data_dir, "--epochs", "1", "--hidden", "16", "--latent", "3",
             "--out", str(out)]
    assert train.main(flags) == 0
    assert train.main(flags) == 0


def test_a_folder_train_py_cannot_make_stops_it_before_training(tmp_path, data_dir, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(train, "train_epoch", lambda *a: pytest.fail("trained"))
    a_file = tmp_path / "a file"
    a_file.write_text("")
    code = train.main(["--data-dir", data_dir, "--out", str(a_file / "run")])
    assert code == 1 and capsys.readouterr().err.startswith("error: ")


def test_a_diverging_train_py_says_so_in_one_line_and_writes_nothing(
        tmp_path, data_dir, capsys, monkeypatch):
    def forward_nan(self, x, eps):
        return float("nan"), float("nan"), 0.0
    monkeypatch.setattr(vae.VAE, "forward", forward_nan)
    out = tmp_path / "run"
    code = train.main(["--data-dir", data_dir, "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert err == "error: the loss became nan: training diverged; try a smaller --lr\n"
    assert not out.exists()
