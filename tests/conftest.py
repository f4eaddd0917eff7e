"""What the files in tests/ share: a small model and batch, generated images and datasets, the lab's
command line run in this process, and the fixtures of the runs that several files read. pytest puts
this folder on sys.path (the tests import the helpers below with `from conftest import ...`), and
pytest.ini puts the repository's root there too, for the project's modules. test_vae.py, the core's
gradient suite, uses none of this: it stands alone."""
import contextlib
import os

import numpy as np
import pytest

import mnist

from lab import classifier
from lab import command
from lab import figures
from lab import models
from lab import training

# the repository's root, where train.py is
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A command line small enough for a run of a few seconds on generated data.
SMALL = ["--hidden", "32", "--latent", "4", "--batch-size", "50", "--iw-samples", "10",
         "--gmm-components", "3"]


def direct_log_normal(z, mean, var):
    """log N(z; mean, diag(var)) written out independently of vae.log_normal."""
    return (-0.5 * (z - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)).sum(-1)


def small_vae_batch(seed=3, n_in=12, hidden=7, latent=3, batch=5, prior="standard",
                    likelihood="bernoulli", decoder_sigma=None):
    """A float64 model (by default 12 pixels, 7 hidden units, 3 latents), a batch x of intensities
    and its eps: what every test of a formula starts from."""
    rng = np.random.default_rng(seed)
    model = models.build(prior, 4, n_in=n_in, hidden=hidden, latent=latent, seed=seed,
                         dtype=np.float64, likelihood=likelihood, decoder_sigma=decoder_sigma)
    if prior == "vamp":
        # pseudo-inputs inside (0, 1), away from the clip's kinks
        model.prior["w"][...] = rng.uniform(0.05, 0.95, model.prior["w"].shape)
    x = rng.uniform(0, 1, (batch, n_in))                # intensities in [0, 1], as the images are
    eps = rng.standard_normal((batch, latent))
    return model, x, eps


def make_images(n, rng):
    """n 28x28 uint8 images from 10 blob templates plus noise, and their labels: learnable, like
    digits."""
    yy, xx = np.mgrid[0:28, 0:28]
    row = 7 + 14 * (np.arange(10) // 5)                 # template k's blob centre: 2 rows of 5
    column = 4 + 5 * (np.arange(10) % 5)
    squared_distance = [(yy - row[k]) ** 2 + (xx - column[k]) ** 2 for k in range(10)]
    templates = np.exp(-np.stack(squared_distance) / 18)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    noisy = templates[labels] * 255 + rng.normal(0, 20, (n, 28, 28))
    images = np.clip(noisy, 0, 255).astype(np.uint8)
    return images, labels


def make_flat_images(n, rng):
    """n generated images as the training code holds them: (n, 784) uint8, without their labels."""
    images, _ = make_images(n, rng)
    return images.reshape(n, 784)


def write_dataset(folder, n_train=600, n_test=200, seed=0):
    """Write the four IDX archives of a generated dataset into folder; return its arrays, named as
    mnist.FILES names the archives."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    train_images, train_labels = make_images(n_train, rng)
    test_images, test_labels = make_images(n_test, rng)
    arrays = {"train_images": train_images, "train_labels": train_labels,
              "test_images": test_images, "test_labels": test_labels}
    for key, array in arrays.items():
        mnist.write_idx(os.path.join(folder, mnist.FILES[key]), array)
    return arrays


def run_cli(*args):
    """The lab's command line (python -m lab), run in this process; returns its exit code."""
    return command.main(list(args))


def one_line_error(capsys, *args, code=1):
    """Run the command; assert it failed with exit code `code` and one line 'error: ...'; return
    that line."""
    try:
        got = run_cli(*args)
    except SystemExit as exit_:                         # argparse's own errors
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code, (got, err)
    assert err.startswith("error: "), (got, err)
    assert err.count("\n") == 1, (got, err)
    assert "Traceback" not in err, (got, err)
    return err


def quiet(message):
    """Stands in for a log: prints nothing."""


def no_progress(state, n_steps, seen):
    """Stands in for the training's progress bar: shows nothing."""


def draw_nothing(*args, **kwargs):
    """Stands in for a function that draws figures: no figures."""
    return {}


def fail_if_loaded(*args, **kwargs):
    """Stands in for mnist.load where the command must stop before loading (or downloading)."""
    pytest.fail("loaded data before checking the options")


def fail_if_trained(*args):
    """Stands in for training.train_epoch where the command must stop before training."""
    pytest.fail("trained before checking the options")


@pytest.fixture(scope="session", autouse=True)
def small_classifier():
    """The classifier that measures every run's samples is 784-32-10 in the tests (784-512-10 in
    the lab): its 10 generated classes need no more, and the Frechet distance's eigendecomposition
    of a 32 x 32 covariance, not 512 x 512, keeps each small run fast. What the tests check, the
    measures' formulas on known answers and their place in a run, does not depend on its size."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classifier, "HIDDEN", 32)
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A generated dataset of 600 training and 200 test images, in MNIST's four archives."""
    folder = tmp_path_factory.mktemp("data")
    write_dataset(folder)
    return str(folder)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_dir):
    """One small standard-prior run of 2 epochs, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 0
    return out


@pytest.fixture
def no_figures(monkeypatch):
    """Draw nothing: for tests of files and folders, which do not look at the figures (and run
    faster so)."""
    for name in ("run_figures", "analysis_figures", "sample_figures"):
        monkeypatch.setattr(figures, name, draw_nothing)


@contextlib.contextmanager
def drawing_only(*names):
    """Within: of the figures a run makes, draw and write only the files named. For the fixtures
    whose tests look at those alone: every figure is still made (its code runs), but drawing a PNG
    is most of a small run's time. Every figure is drawn in full by finished_run and
    test_figures."""
    save = figures.save

    def save_the_named(out, figs):
        save(out, {name: fig for name, fig in figs.items() if name in names})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "save", save_the_named)
        yield


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command downloads (loads data) or trains."""
    monkeypatch.setattr(mnist, "load", fail_if_loaded)
    monkeypatch.setattr(training, "train_epoch", fail_if_trained)
