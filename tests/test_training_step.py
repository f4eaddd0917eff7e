"""A training step: in float32 throughout, Adam's update against Kingma & Ba's algorithm by hand,
the KL weight's warm-up applied at each step, the gradient paths recorded per unit, and binary
pixels drawn afresh for every batch."""
import numpy as np
import pytest

import mnist
import train
import vae
from autograd import Adam

from lab import command
from lab import models
from lab import training

from conftest import make_flat_images, no_progress


@pytest.mark.parametrize("prior, likelihood, sigma", [
    ("standard", "bernoulli", None), ("mog", "gaussian", "learned"), ("vamp", "cb", None),
    ("standard", "gaussian", 0.5)])
def test_a_training_step_stays_in_float32(prior, likelihood, sigma):
    rng = np.random.default_rng(12)
    model = models.build(prior, 3, n_in=784, hidden=16, latent=4, seed=0, likelihood=likelihood,
                         decoder_sigma=sigma)
    opt = Adam(model.params())
    pixels = rng.integers(0, 256, (8, 784)).astype(np.uint8)
    eps = rng.standard_normal((8, 4), dtype=np.float32)
    model.forward(mnist.to_float(pixels), eps)
    model.backward(0.5)
    opt.step(model.grads())
    arrays = dict(model.params())
    arrays.update({f"grad.{k}": a for k, a in model.grads().items()})
    arrays.update({f"path.{k}": a for k, a in model.paths.items()})
    arrays.update({f"m.{k}": a for k, a in opt.m.items()})
    arrays.update({f"v.{k}": a for k, a in opt.v.items()})
    assert {k: a.dtype for k, a in arrays.items() if a.dtype != np.float32} == {}


# ---- Adam ----------------------------------------------------------------------------------------

def test_adam_matches_a_step_computed_by_hand():
    p = np.array([1.0, -2.0, 3.0])
    g1 = np.array([0.1, -0.5, 2.0])
    g2 = np.array([0.3, 0.2, -1.0])
    opt = Adam({"p": p}, lr=0.01)
    opt.step({"p": g1})
    opt.step({"p": g2})
    # Kingma & Ba, Algorithm 1, written out for t = 1, 2.
    b1 = 0.9
    b2 = 0.999
    eps = 1e-8
    want = np.array([1.0, -2.0, 3.0])
    m = 0
    v = 0
    for t, g in ((1, g1), (2, g2)):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        want = want - 0.01 * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_adam_updates_every_element_of_a_2d_parameter_and_of_a_strided_view_in_place():
    # A 2-D parameter, updated in place as by hand; then a transposed (strided) view, which must
    # update its base.
    rng = np.random.default_rng(4)
    shape = (5, 39325)
    p = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    want = p.astype(np.float64)
    m = 0.0
    v = 0.0
    opt = Adam({"p": p}, lr=0.01)
    for t, g in enumerate(grads, 1):
        opt.step({"p": g})
        g64 = g.astype(np.float64)
        m = 0.9 * m + 0.1 * g64
        v = 0.999 * v + 0.001 * g64 ** 2
        want -= 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert opt.params["p"] is p
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
    before = p.copy()
    g = rng.standard_normal(shape).astype(np.float32)
    Adam({"p": p.T}, lr=0.01).step({"p": g.T})          # the first step: m_hat = g, v_hat = g^2
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(p, before - 0.01 * g64 / (np.abs(g64) + 1e-8), rtol=1e-5, atol=1e-6)


def test_adam_never_holds_subnormal_moments_and_still_matches_the_update_by_hand():
    # After one gradient, 1500 steps with none: m decays by beta1 and would pass below float32's
    # smallest normal number (1.2e-38, where arithmetic is ~10x slower) near step 830. The
    # parameters still follow Adam in float64.
    p = np.linspace(-1, 1, 50).astype(np.float32)
    want = p.astype(np.float64)
    m = 0.0
    v = 0.0
    opt = Adam({"p": p}, lr=1e-3)
    g1 = np.linspace(0.5, 2, 50).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    for t in range(1, 1501):
        if t == 1:
            g = g1
        else:
            g = np.zeros_like(g1)
        opt.step({"p": g})
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        want -= 1e-3 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        for moment in (opt.m["p"], opt.v["p"]):
            assert not np.any((moment != 0) & (np.abs(moment) < tiny)), t
    np.testing.assert_allclose(p, want, rtol=1e-5)


# ---- the KL weight -------------------------------------------------------------------------------

def test_kl_warmup_rises_linearly_from_zero_and_reaches_beta_after_n_epochs():
    weights = [train.kl_weight(2.0, 2, t, n_steps=10) for t in range(40)]
    assert weights[0] == 0
    assert weights[5] == pytest.approx(0.5)
    assert weights[10] == pytest.approx(1.0)
    assert weights[19] == pytest.approx(1.9)
    assert weights[20:] == [2.0] * 20                   # epoch 3 on: beta itself
    assert [train.kl_weight(2.0, 0, t, 10) for t in (0, 7, 33)] == [2.0] * 3


def test_training_applies_the_warmed_up_kl_weight_at_each_step(monkeypatch):
    x_train = make_flat_images(300, np.random.default_rng(2))
    cfg = {**command.DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 50, "beta": 0.6,
           "kl_warmup": 2}
    model, opt, state = training.new_run(dict(cfg), x_train)
    used = []
    real_backward = model.backward
    def recording_backward(beta=1.0):
        used.append(beta)
        return real_backward(beta)
    monkeypatch.setattr(model, "backward", recording_backward)
    for _ in range(3):
        training.train_epoch(model, opt, x_train, state, cfg, {"requested": False}, no_progress)
    want = [0.6 * min(1, t / 12) for t in range(18)]   # 6 steps an epoch
    np.testing.assert_allclose(used, want)
    np.testing.assert_allclose(state["kl_weight"], [0.6 * 2.5 / 12, 0.6 * 8.5 / 12, 0.6])
    objective = state["train_recon"][2] + 0.6 * state["train_kl"][2]
    np.testing.assert_allclose(state["train_objective"][2], objective)
    assert state["train_loss"][2] == pytest.approx(state["train_recon"][2] + state["train_kl"][2])


# ---- the gradient paths and binary pixels --------------------------------------------------------

def test_an_epoch_records_the_rms_of_each_gradient_path_per_unit():
    x_train = make_flat_images(100, np.random.default_rng(3))
    cfg = {**command.DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 100, "beta": 0.5}   # 1 step
    model, opt, state = training.new_run(dict(cfg), x_train)
    before = vae.VAE(784, 16, 3, seed=0)
    for name, p in before.params().items():
        p[...] = model.params()[name]
    training.train_epoch(model, opt, x_train, state, cfg, {"requested": False}, no_progress)
    replay = np.random.default_rng(0)                   # the run's stream: permutation, then eps
    x, eps = training.batch(x_train, replay.permutation(100), 0, cfg, replay, 3)
    before.forward(x, eps)
    before.backward(0.5)
    for name in training.PATHS:
        g = before.paths[name] * 100                    # per-example gradients
        unit = state["gradient_paths_per_unit"][name][0]
        np.testing.assert_allclose(unit["rms"], np.sqrt(np.mean(g * g, axis=0)), rtol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(unit["mean"], g.mean(0), rtol=1e-5, atol=1e-7, err_msg=name)
        rms = np.sqrt(np.mean(g * g))
        assert state["gradient_paths"][name][0] == pytest.approx(rms, rel=1e-5)


def test_dynamic_binarization_draws_each_pixel_afresh_with_its_intensity():
    images = np.tile(np.array([0, 51, 128, 204, 255], np.uint8), (4000, 1))
    rng = np.random.default_rng(19)
    draws = np.stack([mnist.binarize(images, rng) for _ in range(5)])
    assert set(np.unique(draws)) == {0, 255}
    np.testing.assert_allclose(draws.mean((0, 1)) / 255, [0, 0.2, 128 / 255, 0.8, 1], atol=0.01)
    # The same images in two batches of a run get different draws (not one binarization reused).
    cfg = {**command.DEFAULTS, "batch_size": 4000, "binarize": True}
    perm = np.arange(4000)
    run_rng = np.random.default_rng(0)
    first, _ = training.batch(images, perm, 0, cfg, run_rng, 2)
    second, _ = training.batch(images, perm, 0, cfg, run_rng, 2)
    assert set(np.unique(first)) == {0.0, 1.0}
    assert np.mean(first != second) > 0.2
