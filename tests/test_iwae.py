"""iwae.py, the importance-weighted objective: each piece's backward and the whole objective against
central finite differences in float64, for the IWAE bound and the mean of k ELBOs, for k = 1, 2, 5;
and what the bound is: L_1 is the ELBO, L_k rises with k toward log p(x), and its gradient weights
each draw by its normalised weight."""
import json

import numpy as np
import pytest

import iwae
from autograd import ReLU, Tanh, grad_check
from test_vae import NETWORK_PARAMS, assert_grads_close

from lab import runs
from lab import training

from conftest import one_line_error, run_cli


def test_log_weights_backward_matches_finite_differences():
    rng = np.random.default_rng(31)
    k, batch, latent, pixels = 3, 4, 2, 5
    inputs = {"logits": rng.standard_normal((k, batch, pixels)) * 2,
              "x": rng.uniform(0, 1, (batch, pixels)),
              "z": rng.standard_normal((k, batch, latent)),
              "mu": rng.standard_normal((batch, latent)),
              "log_var": rng.uniform(-1, 1, (batch, latent))}
    dlog_w = rng.uniform(0.5, 1.5, (k, batch))
    _, cache = iwae.log_weights_forward(**inputs)
    dlogits, dz, dmu, dlog_var = iwae.log_weights_backward(dlog_w, cache)
    def loss():
        log_w, _ = iwae.log_weights_forward(**inputs)
        return float((dlog_w * log_w).sum())
    analytic = {"logits": dlogits, "z": dz, "mu": dmu, "log_var": dlog_var}
    params = {name: inputs[name] for name in analytic}
    assert_grads_close(grad_check(loss, params, analytic), 1e-7)


@pytest.mark.parametrize("bound", ["iwae", "vae"])
def test_bound_backward_matches_finite_differences(bound):
    rng = np.random.default_rng(32)
    forward = {"iwae": iwae.iwae_bound_forward, "vae": iwae.vae_bound_forward}[bound]
    backward = {"iwae": iwae.iwae_bound_backward, "vae": iwae.vae_bound_backward}[bound]
    # log w of k = 5 draws for B = 4 images, a nat or so apart (no w~ near 0, where a relative
    # error of the finite difference means nothing)
    log_w = rng.standard_normal((5, 4))
    dbound = rng.uniform(0.5, 1.5, 4)
    _, cache = forward(log_w)
    dlog_w = backward(dbound, cache)
    def loss():
        out, _ = forward(log_w)
        return float((dbound * out).sum())
    assert_grads_close(grad_check(loss, {"log_w": log_w}, {"log_w": dlog_w}), 1e-7)


def test_the_bound_of_weights_far_below_one_neither_underflows_nor_loses_its_softmax():
    # real log w are hundreds of nats below 0 (log p(x) of an MNIST digit is about -90): exp would
    # underflow to 0 without the log-sum-exp's shift
    log_w = np.random.default_rng(33).standard_normal((5, 4)) * 3
    bound, w_tilde = iwae.iwae_bound_forward(log_w)
    far_bound, far_w_tilde = iwae.iwae_bound_forward(log_w - 1000)
    np.testing.assert_allclose(far_bound, bound - 1000, rtol=1e-12)
    np.testing.assert_allclose(far_w_tilde, w_tilde, rtol=1e-9)


def small_iwae(objective, samples, activation=ReLU, seed=280):
    """A float64 IWAE (12 pixels, 7 hidden units, 3 latents, two hidden layers), a batch and its
    draws eps (k, B, Z)."""
    model = iwae.IWAE(12, 7, 3, seed, np.float64, layers=2, activation=activation,
                      objective=objective, samples=samples)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (5, 12))
    eps = rng.standard_normal((samples, 5, 3))
    return model, x, eps


@pytest.mark.parametrize("activation", [ReLU, Tanh])
@pytest.mark.parametrize("objective, samples", [("iwae", 1), ("iwae", 2), ("iwae", 5),
                                                ("vae", 5)])
def test_objective_backward_matches_finite_differences_for_every_parameter(
        objective, samples, activation):
    model, x, eps = small_iwae(objective, samples, activation)
    loss0, _, _ = model.forward(x, eps)
    model.backward()
    analytic = {k: g.copy() for k, g in model.grads().items()}

    def objective_less_its_value():
        loss, _, _ = model.forward(x, eps)
        return loss - loss0

    errors = grad_check(objective_less_its_value, model.params(), analytic)
    assert set(errors) == NETWORK_PARAMS | {"enc.4.W", "enc.4.b", "dec.4.W", "dec.4.b"}
    # 1e-5, not test_vae's 1e-6: at h = 1e-5 the difference's rounding (~1e-10 here, the log-sum-
    # exp of k draws' weights) is 2e-6 of the smallest gradients of these two-layer networks (~3e-6
    # at seed 280, where no ReLU input is within h of its kink); a wrong path errs by 1e-2 or more.
    assert_grads_close(errors, 1e-5)


def test_one_draw_is_the_elbo_for_both_bounds_and_its_kl_in_expectation_the_closed_form():
    model, x, eps = small_iwae("iwae", 1)
    loss, recon, kl = model.forward(x, eps)
    assert loss == pytest.approx(recon + kl, rel=1e-12)        # L_1 = E log p(x|z) - KL, sampled
    model.objective = "vae"
    assert model.forward(x, eps)[0] == pytest.approx(loss, rel=1e-12)
    # the sampled KL's mean over many draws is the closed form vae.py uses
    many = np.random.default_rng(3).standard_normal((20000, 5, 3))
    _, _, sampled_kl = model.forward(x, many)
    mu, log_var = model.encode(x)
    closed = float((-0.5 * (1 + log_var - mu ** 2 - np.exp(log_var)).sum(1)).mean())
    assert sampled_kl == pytest.approx(closed, abs=0.03)


def test_the_bound_rises_with_k_and_stays_below_the_log_likelihood():
    # L_1 <= L_k <= L_m <= log p(x) for k <= m (Burda et al. Theorem 1), each as a mean over 100
    # batches of draws; log p(x) itself from 50,000 draws. (The steps between them, 0.2 and 0.05
    # nats, are ten times the spread of those means over seeds.)
    model, x, _ = small_iwae("iwae", 1)
    rng = np.random.default_rng(4)
    bounds = []
    for k in (1, 5, 50):
        eps = rng.standard_normal((100, k, 5, 3))
        bounds.append(np.mean([-model.forward(x, e)[0] for e in eps]))
    log_px = -model.forward(x, rng.standard_normal((50000, 5, 3)))[0]
    assert bounds[0] < bounds[1] < bounds[2] < log_px + 0.01


def test_the_gradient_weights_each_draw_by_its_normalised_weight():
    # For the IWAE, d(-L_k)/dlogits of draw i is w~_i times draw i's own gradient; for the mean of
    # k ELBOs it is 1/k of it.
    model, x, eps = small_iwae("iwae", 4)
    model.forward(x, eps)
    w_tilde = model.bound_cache
    assert np.allclose(w_tilde.sum(0), 1) and not np.allclose(w_tilde, 0.25)
    dlog_w = iwae.iwae_bound_backward(np.full(5, -1 / 5), w_tilde)
    np.testing.assert_allclose(dlog_w, -w_tilde / 5)
    uniform = iwae.vae_bound_backward(np.full(5, -1 / 5), 4)
    np.testing.assert_allclose(uniform, np.full((4, 5), -1 / 20))


def test_a_kl_weight_is_refused():
    model, x, eps = small_iwae("iwae", 2)
    model.forward(x, eps)
    with pytest.raises(ValueError, match="no KL weight"):
        model.backward(0.5)


# ---- in the lab: the paper's setting as options --------------------------------------------------

@pytest.mark.usefixtures("no_figures")
def test_a_run_in_the_papers_setting_trains_measures_and_reloads_as_it_was(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli("--data-dir", data_dir, "--hidden", "16", "--latent", "3", "--layers", "2",
                   "--activation", "tanh", "--objective", "iwae", "--samples", "5",
                   "--binarize", "--batch-size", "20", "--adam-eps", "1e-4",
                   "--lr-schedule", "burda", "--epochs", "2", "--iw-samples", "10",
                   "--gmm-components", "2", "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert (config["objective"], config["samples"], config["layers"]) == ("iwae", 5, 2)
    assert metrics["iw_nll"] <= metrics["test_loss"] + 0.5       # the bound of S = 10 is tighter
    model, _ = runs.load_model(str(out / "model.npz"))
    assert isinstance(model, iwae.IWAE) and model.samples == 5 and model.activation is Tanh
    # Linear, tanh, Linear, tanh, Linear
    assert len(model.encoder.layers) == 5


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("flags, message", [
    (["--objective", "iwae", "--prior", "mog"], "take neither --objective iwae"),
    (["--layers", "2", "--prior", "vamp"], "take neither --objective iwae"),
    (["--samples", "5", "--likelihood", "cb"], "written for the Bernoulli likelihood"),
    (["--objective", "iwae", "--beta", "0.5"], "no KL weight"),
    (["--objective", "iwae", "--kl-warmup", "2"], "no KL weight"),
    (["--samples", "0"], "--samples: must be > 0"),
])
def test_options_the_bounds_cannot_take_are_refused_in_one_line(capsys, flags, message):
    assert message in one_line_error(capsys, *flags, code=2)


def test_burdas_schedule_gives_stage_i_its_3_to_the_i_epochs_at_lr_times_10_to_the_minus_i_over_7():
    cfg = {"lr": 1e-3, "lr_schedule": "burda"}
    stage_of_epoch = {0: 0, 1: 1, 3: 1, 4: 2, 12: 2, 13: 3, 39: 3, 40: 4, 1092: 6, 1093: 7, 3279: 7}
    for epoch, stage in stage_of_epoch.items():
        assert training.learning_rate(cfg, epoch) == pytest.approx(1e-3 * 10 ** (-stage / 7))
    assert training.learning_rate({"lr": 1e-3, "lr_schedule": "constant"}, 500) == 1e-3
