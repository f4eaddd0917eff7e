"""The files a run writes: written whole or not at all, and read back to the same model and the
same numbers: models, checkpoints that resume bit for bit, and model files from before the
likelihoods."""
import builtins
import os

import numpy as np
import pytest

from autograd import Adam

from lab import command
from lab import models
from lab import runs
from lab import training

from conftest import make_flat_images, no_progress, small_vae_batch


class DyingFile:
    """A file whose writes fail with Ctrl-C once `limit` bytes have reached the disk: a write cut
    midway."""
    def __init__(self, f, limit):
        self.f = f
        self.left = limit

    def write(self, data):
        if len(data) >= self.left:
            self.f.write(data[:self.left])
            self.f.flush()
            raise KeyboardInterrupt
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def dying_open(path, mode="r"):
    """Stands in for open: the file dies after 300 bytes."""
    return DyingFile(builtins.open(path, mode), limit=300)


@pytest.mark.parametrize("what", ["model", "checkpoint", "metrics"])
def test_a_write_interrupted_midway_leaves_the_previous_file_intact(tmp_path, monkeypatch, what):
    model, _, _ = small_vae_batch(prior="mog")
    cfg = {**command.DEFAULTS, "hidden": 7, "latent": 3}
    records = {k: [] for k in training.EPOCH_RECORDS}
    state = {**records, "gradient_paths": {}, "epoch": 0, "step": 0, "elapsed": 0.0, "perm": None,
             "rng": np.random.default_rng(0), "sums": None, "path_sums": None}
    target = tmp_path / what
    path = str(target)
    def write():
        if what == "model":
            runs.save_model(model, path)
        elif what == "checkpoint":
            runs.save_checkpoint(path, model, Adam(model.params()), state, cfg)
        else:
            runs.write_metrics(path, {"train_loss": list(np.linspace(0, 1, 5000))})
    write()
    before = target.read_bytes()
    model.params()["dec.0.W"][...] += 1                  # the next write has other bytes
    # runs.py opens the files a run writes.
    monkeypatch.setattr(runs, "open", dying_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == [what]


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_model_save_load_round_trip(tmp_path, prior):
    model, x, eps = small_vae_batch(prior=prior)
    runs.save_model(model, str(tmp_path / "m.npz"))
    loaded, extra = runs.load_model(str(tmp_path / "m.npz"))
    assert models.describe(loaded) == models.describe(model)
    assert models.describe(loaded)["prior"] == prior
    assert extra == {}
    assert loaded.forward(x, eps) == model.forward(x, eps)


# Burda et al.'s setting, small: the IWAE bound of 3 draws, two tanh layers a side, binary pixels
# drawn afresh, Adam's epsilon 1e-4 and the learning rate that falls at epoch 2
PAPER_SETTING = {"objective": "iwae", "samples": 3, "layers": 2, "activation": "tanh",
                 "binarize": True, "adam_eps": 1e-4, "lr_schedule": "burda"}


@pytest.mark.parametrize("prior, options", [("standard", {}), ("mog", {}), ("vamp", {}),
                                            ("standard", PAPER_SETTING)])
def test_a_checkpoint_resumes_to_bit_identical_numbers(tmp_path, prior, options):
    # Train 2 epochs straight; then again, stopped at step 5 of epoch 2, saved, loaded, and
    # finished.
    x_train = make_flat_images(300, np.random.default_rng(1))
    cfg = {**command.DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 50, "prior": prior,
           "prior_components": 3, "epochs": 2, **options}
    straight, straight_opt, straight_state = training.new_run(dict(cfg), x_train)
    never = {"requested": False}                        # a stop that is never requested
    for _ in range(2):
        training.train_epoch(straight, straight_opt, x_train, straight_state, cfg, never,
                             no_progress)
    model, opt, cut = training.new_run(dict(cfg), x_train)
    stop = {"requested": False}
    def stop_at_step_5_of_epoch_2(state, n_steps, seen):
        stop["requested"] = state["epoch"] == 1 and state["step"] == 5
    while training.train_epoch(model, opt, x_train, cut, cfg, stop, stop_at_step_5_of_epoch_2):
        pass
    runs.save_checkpoint(str(tmp_path / "c.npz"), model, opt, cut, cfg)
    resumed, resumed_opt, resumed_state, _ = runs.load_checkpoint(str(tmp_path / "c.npz"))
    assert resumed_state["epoch"] == 1
    assert resumed_state["step"] == 5
    training.train_epoch(resumed, resumed_opt, x_train, resumed_state, cfg, never, no_progress)
    assert resumed_state["train_loss"] == straight_state["train_loss"]
    for name, p in straight.params().items():
        np.testing.assert_array_equal(resumed.params()[name], p, err_msg=name)


def test_a_model_file_from_before_the_likelihoods_loads_as_bernoulli(tmp_path):
    model, x, eps = small_vae_batch()
    runs.save_model(model, str(tmp_path / "m.npz"))
    with np.load(tmp_path / "m.npz") as f:
        old = {k: f[k] for k in f.files if k not in ("likelihood", "decoder_sigma")}
    np.savez(tmp_path / "old.npz", **old)
    loaded, _ = runs.load_model(str(tmp_path / "old.npz"))
    assert loaded.likelihood.name == "bernoulli"
    assert loaded.forward(x, eps) == model.forward(x, eps)
