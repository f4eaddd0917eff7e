"""The suite: every gradient against finite differences, the estimators against closed forms and exact values,
the data and the training CLI against generated files. Offline (loopback only); about 20 s on 2 cores, under 30 s."""
import builtins
import contextlib
import functools
import gzip
import hashlib
import http.server
import json
import math
import os
import re
import struct
import shutil
import signal
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

import analysis
import console
import figures
import gmm
from gmm import fit_gmm, gmm_log_density, gmm_sample
import likelihoods
import models
import report
import runs
import speed
import mnist
import priors
import train
import vae
from autograd import MLP, Adam, Linear, ReLU, grad_check

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHIVES = list(mnist.FILES.values())      # the four archives' names


def assert_grads_close(errors, tol):
    bad = {k: e for k, e in errors.items() if not e < tol}
    assert not bad, f"relative error above {tol}: " + ", ".join(f"{k}={e:.2e}" for k, e in bad.items())


def direct_log_normal(z, mean, var):
    """log N(z; mean, diag(var)) written out independently of vae.log_normal."""
    return (-0.5 * (z - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)).sum(-1)


# ---- gradients: the layers, the checker, each loss piece, the whole model ----------------------------------

def test_linear_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    layer = Linear(5, 3, rng, dtype=np.float64)
    x, r = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    loss = lambda: float((layer.forward(x) * r).sum())   # L = sum(y * r), so dL/dy = r
    layer.forward(x)
    dx = layer.backward(r.copy())
    assert_grads_close(grad_check(loss, {**layer.params, "x": x}, {**layer.grads, "x": dx}), 1e-8)


def test_relu_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    x[np.abs(x) < 1e-3] = 0.5                           # keep away from the kink at 0
    r = rng.standard_normal((4, 6))
    relu = ReLU()
    loss = lambda: float((relu.forward(x.copy()) * r).sum())
    relu.forward(x.copy())
    dx = relu.backward(r.copy())
    assert_grads_close(grad_check(loss, {"x": x}, {"x": dx}), 1e-8)


def test_mlp_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    mlp = MLP([5, 7, 6, 3], rng, dtype=np.float64)
    x, r = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    loss = lambda: float((mlp.forward(x) * r).sum())
    mlp.forward(x)
    dx = mlp.backward(r.copy())
    assert_grads_close(grad_check(loss, {**mlp.named("params", "mlp"), "x": x},
                                  {**mlp.named("grads", "mlp"), "x": dx}), 1e-6)


def test_grad_check_reports_a_relative_error_near_one_for_a_wrong_gradient():
    # The negative control: a checker that passed wrong gradients would make every check above meaningless.
    rng = np.random.default_rng(3)
    x, r = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    loss = lambda: float((x * x * r).sum())             # dL/dx = 2 x r
    right = 2 * x * r
    assert grad_check(loss, {"x": x}, {"x": right})["x"] < 1e-8
    assert grad_check(loss, {"x": x}, {"x": -right})["x"] == pytest.approx(1.0)         # a flipped sign
    assert grad_check(loss, {"x": x}, {"x": x * r})["x"] == pytest.approx(1 / 3)        # a dropped factor 2
    assert grad_check(loss, {"x": x}, {"x": np.zeros_like(x)})["x"] == pytest.approx(1.0)


def check_piece(forward, backward, inputs, seed=4):
    """Grad-check a forward/backward pair alone: L = sum_b dout_b * out_b for a random dout (B,)."""
    dout = np.random.default_rng(seed).uniform(0.5, 1.5, len(next(iter(inputs.values()))))
    out, cache = forward(**inputs)
    grads = dict(zip(inputs, backward(dout, cache)))
    return grad_check(lambda: float((dout * forward(**inputs)[0]).sum()), {k: inputs[k] for k in grads}, grads)


def small_vae_batch(seed=3, n_in=12, hidden=7, latent=3, batch=5, prior="standard", likelihood="bernoulli",
                    decoder_sigma=None):
    rng = np.random.default_rng(seed)
    model = models.build(prior, 4, n_in=n_in, hidden=hidden, latent=latent, seed=seed, dtype=np.float64,
                         likelihood=likelihood, decoder_sigma=decoder_sigma)
    if prior == "vamp":                                 # pseudo-inputs inside (0, 1), away from the clip's kinks
        model.prior["w"][...] = rng.uniform(0.05, 0.95, model.prior["w"].shape)
    x = rng.uniform(0, 1, (batch, n_in))                # intensities in [0, 1], as the images are
    eps = rng.standard_normal((batch, latent))
    return model, x, eps


def test_bernoulli_nll_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    errors = check_piece(vae.bernoulli_nll_forward, lambda d, c: [vae.bernoulli_nll_backward(d, c)],
                         {"logits": rng.standard_normal((6, 9)) * 3, "x": rng.uniform(0, 1, (6, 9))})
    assert_grads_close(errors, 1e-7)


def test_log_bernoulli_is_the_bernoulli_log_likelihood_for_any_logit_and_broadcast_x():
    # The textbook form, sum_j x_j log p_j + (1 - x_j) log(1 - p_j), in 50-digit decimals, at logits up to +-80
    # (where 1 - p underflows in floats), with x broadcast over a leading samples axis as iw_nll does; the inputs
    # stay unchanged.
    from decimal import Decimal, getcontext
    getcontext().prec = 50
    rng = np.random.default_rng(17)
    logits = np.concatenate([rng.standard_normal((3, 2, 5)) * 4, np.tile([-80.0, -30.0, 0.0, 30.0, 80.0], (3, 2, 1))],
                            axis=-1)
    x = rng.uniform(0, 1, (2, 10)).round(3)             # grey levels, one row per image, shared by the 3 samples
    def exact(xs, ls):
        total = Decimal(0)
        for xj, lj in zip(xs, ls):
            p = 1 / (1 + (-Decimal(float(lj))).exp())
            total += Decimal(float(xj)) * p.ln() + (1 - Decimal(float(xj))) * (1 - p).ln()
        return float(total)
    want = np.array([[exact(x[b], logits[s, b]) for b in range(2)] for s in range(3)])
    before = logits.copy(), x.copy()
    np.testing.assert_allclose(vae.log_bernoulli(x, logits), want, rtol=1e-13)
    for after, saved in zip((logits, x), before):
        np.testing.assert_array_equal(after, saved)
    got32 = vae.log_bernoulli(x.astype(np.float32), logits.astype(np.float32))
    np.testing.assert_allclose(got32, want, rtol=2e-6)


def test_reparameterize_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    mu, log_var, eps = rng.standard_normal((6, 3)), rng.uniform(-2, 1, (6, 3)), rng.standard_normal((6, 3))
    r = rng.standard_normal((6, 3))                     # z is (B, Z): reduce it with a random r
    z, cache = vae.reparameterize_forward(mu, log_var, eps)
    dmu, dlog_var = vae.reparameterize_backward(r, cache)
    errors = grad_check(lambda: float((vae.reparameterize_forward(mu, log_var, eps)[0] * r).sum()),
                        {"mu": mu, "log_var": log_var}, {"mu": dmu, "log_var": dlog_var})
    assert_grads_close(errors, 1e-7)


def test_kl_normal_backward_matches_finite_differences():
    rng = np.random.default_rng(7)
    errors = check_piece(vae.kl_normal_forward, vae.kl_normal_backward,
                         {"mu": rng.standard_normal((6, 3)), "log_var": rng.uniform(-2, 1, (6, 3))})
    assert_grads_close(errors, 1e-7)


def test_kl_mixture_backward_matches_finite_differences():
    rng = np.random.default_rng(8)
    inputs = {"z": rng.standard_normal((6, 3)), "log_var": rng.uniform(-2, 1, (6, 3)),
              "means": rng.standard_normal((4, 3)), "log_vars": rng.uniform(-1, 1, (4, 3)),
              "log_pi": np.log(rng.dirichlet(np.ones(4)))}
    eps = rng.standard_normal((6, 3))
    forward = lambda z, log_var, means, log_vars, log_pi: priors.kl_mixture_forward(z, eps, log_var, means, log_vars,
                                                                                  log_pi)
    assert_grads_close(check_piece(forward, priors.kl_mixture_backward, inputs), 1e-7)


def test_gaussian_nll_backward_matches_finite_differences():
    rng = np.random.default_rng(22)
    logits, x, log_sigma = rng.standard_normal((6, 9)) * 2, rng.uniform(0, 1, (6, 9)), np.array([-1.3])
    dnll = rng.uniform(0.5, 1.5, 6)
    dlogits, dlog_sigma = likelihoods.gaussian_nll_backward(dnll, likelihoods.gaussian_nll_forward(logits, x, log_sigma)[1])
    loss = lambda: float((dnll * likelihoods.gaussian_nll_forward(logits, x, log_sigma)[0]).sum())
    errors = grad_check(loss, {"logits": logits, "log_sigma": log_sigma},
                        {"logits": dlogits, "log_sigma": np.array([dlog_sigma])})
    assert_grads_close(errors, 1e-7)


def test_continuous_bernoulli_nll_backward_matches_finite_differences():
    rng = np.random.default_rng(23)
    logits = rng.standard_normal((6, 9)) * 3
    logits[0, :4] = [0.0, 1e-3, -0.15, 0.25]            # on both sides of the series' switch at |l| = 0.2
    errors = check_piece(likelihoods.cb_nll_forward, lambda d, c: [likelihoods.cb_nll_backward(d, c)],
                         {"logits": logits, "x": rng.uniform(0, 1, (6, 9))})
    assert_grads_close(errors, 1e-7)


def exact_log_c_and_grad(l):
    """log C(l) = log(l / tanh(l/2)) and its derivative 1/l - 1/sinh(l), with 60 significant digits (decimal)."""
    import decimal
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal(l)
        if d == 0:
            return math.log(2), 0.0
        e = d.exp()
        log_c = (d * (e + 1) / (e - 1)).ln()              # l / tanh(l/2) = l (e^l + 1) / (e^l - 1)
        grad = 1 / d - 2 / (e - 1 / e)                     # 1/l - 1/sinh(l)
        return float(log_c), float(grad)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 3e-7)])
def test_continuous_bernoulli_log_normalizer_is_exact_and_smooth_at_one_half(dtype, rtol):
    # log C has a removable singularity at l = 0 (lambda = 1/2): value log 2, derivative 0.
    points = np.array([0.0, 1e-4, -1e-4, 1e-2, -1e-2, 0.19, 0.21, -3.0, 30.0, -80.0], dtype)
    exact = np.array([exact_log_c_and_grad(float(l)) for l in points])
    np.testing.assert_allclose(likelihoods.cb_log_normalizer(points), exact[:, 0].astype(dtype), rtol=rtol)
    got = likelihoods.cb_log_normalizer_grad(points)
    assert got.dtype == dtype and likelihoods.cb_log_normalizer(points).dtype == dtype
    np.testing.assert_allclose(got, exact[:, 1].astype(dtype), rtol=rtol, atol=rtol * 1e-4)


@pytest.mark.parametrize("lam", [0.02, 0.3, 0.5, 0.5 + 1e-7, 0.7, 0.999])
def test_continuous_bernoulli_is_a_density_whose_mean_is_not_lambda(lam):
    # Quadrature on [0, 1] (Gauss-Legendre, 200 nodes): the density integrates to 1, and its mean is
    # lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)), the paper's formula, which is not lambda.
    nodes, weights = np.polynomial.legendre.leggauss(200)
    x, w = (nodes + 1) / 2, weights / 2
    logit = math.log(lam / (1 - lam))
    density = np.exp(-likelihoods.cb_nll_forward(np.full((len(x), 1), logit), x[:, None])[0])
    assert w @ density == pytest.approx(1, abs=1e-10)
    mean = float(likelihoods.cb_mean(np.array([logit]))[0])
    assert w @ (x * density) == pytest.approx(mean, abs=1e-10)
    if abs(lam - 0.5) > 1e-3:
        assert mean == pytest.approx(lam / (2 * lam - 1) + 1 / (2 * math.atanh(1 - 2 * lam)), rel=1e-9)
        assert abs(mean - lam) > 0.01                   # showing lambda as the mean is the error the paper names


def test_fixed_sigma_gaussian_gradient_is_mse_plus_beta_kl_with_beta_two_sigma_squared():
    # -log N(x; m, s^2) = |x - m|^2 / (2 s^2) + const: its gradient with KL weight 1 is 1 / (2 s^2) times the
    # gradient of |x - m|^2 + 2 s^2 KL. sigma = 1/sqrt(2) makes the reconstruction term the squared error itself.
    for sigma in (1.0, 0.1):
        a, x, eps = small_vae_batch(likelihood="gaussian", decoder_sigma=sigma)
        b, _, _ = small_vae_batch(likelihood="gaussian", decoder_sigma=1 / math.sqrt(2))
        a.forward(x, eps)
        a.backward(beta=1.0)
        b.forward(x, eps)
        b.backward(beta=2 * sigma ** 2)
        for name, g in a.grads().items():
            np.testing.assert_allclose(g * 2 * sigma ** 2, b.grads()[name], rtol=1e-10, atol=1e-14, err_msg=name)
        m = vae.sigmoid(b.decode(b.encode(x)[0] + np.exp(0.5 * b.encode(x)[1]) * eps))
        recon = b.forward(x, eps)[1]
        assert recon == pytest.approx(((x - m) ** 2).sum(1).mean() + 12 * 0.5 * math.log(math.pi), rel=1e-12)


@pytest.mark.parametrize("likelihood, sigma", [("bernoulli", None), ("gaussian", 0.2), ("cb", None)])
def test_samples_of_p_x_given_z_have_the_likelihoods_mean_and_spread(likelihood, sigma):
    model, _, _ = small_vae_batch(likelihood=likelihood, decoder_sigma=sigma)
    logits = np.tile(np.array([[-3.0, -0.5, 0.0, 1e-3, 0.7, 4.0]]), (100_000, 1))
    x = model.likelihood.sample(logits, np.random.default_rng(24))
    np.testing.assert_allclose(x.mean(0), model.likelihood.mean(logits[0]), atol=0.006)
    if likelihood == "gaussian":
        np.testing.assert_allclose(x.std(0), 0.2, rtol=0.01)
    if likelihood == "cb":                              # on [0, 1], with the CDF (e^(l x) - 1) / (e^l - 1)
        assert x.min() >= 0 and x.max() <= 1
        l = logits[0, 5]
        assert np.mean(x[:, 5] < 0.5) == pytest.approx(np.expm1(l * 0.5) / np.expm1(l), abs=0.005)
    if likelihood == "bernoulli":
        assert set(np.unique(x)) == {0.0, 1.0}


LIKELIHOOD_CASES = [("bernoulli", None, set()), ("gaussian", 0.3, set()),
                    ("gaussian", "learned", {"likelihood.log_sigma"}), ("cb", None, set())]


@pytest.mark.parametrize("beta", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("prior, prior_params", [("standard", set()),
                                                  ("mog", {"prior.means", "prior.log_vars", "prior.log_weights"}),
                                                  ("vamp", {"prior.w"})])
@pytest.mark.parametrize("likelihood, sigma, likelihood_params", LIKELIHOOD_CASES)
def test_objective_backward_matches_finite_differences_for_every_parameter(prior, prior_params, beta, likelihood,
                                                                          sigma, likelihood_params):
    # The objective is recon + beta * KL; beta = 1 is the negative ELBO. A beta applied to the reconstruction
    # path, or missing from one KL path, fails here for beta != 1; so does any likelihood's wrong dL/dlogits.
    model, x, eps = small_vae_batch(prior=prior, likelihood=likelihood, decoder_sigma=sigma)
    if sigma == "learned":
        model.likelihood.params["log_sigma"][...] = -0.7
    model.forward(x, eps)
    model.backward(beta)
    analytic = {k: g.copy() for k, g in model.grads().items()}
    objective = lambda: (lambda loss, recon, kl: recon + beta * kl)(*model.forward(x, eps))
    errors = grad_check(objective, model.params(), analytic)
    assert set(errors) == {"enc.0.W", "enc.0.b", "enc.2.W", "enc.2.b", "dec.0.W", "dec.0.b", "dec.2.W",
                           "dec.2.b"} | prior_params | likelihood_params
    assert_grads_close(errors, 1e-6)


def test_vamp_pseudo_inputs_stay_in_0_1_and_get_no_gradient_where_clipped():
    model, x, eps = small_vae_batch(prior="vamp")
    w = model.prior["w"]
    w[0, :6], w[1, :6] = -0.3, 1.4                       # pushed outside [0, 1]
    model.forward(x, eps)
    model.backward()
    used = model.pseudo_inputs()
    assert used.min() >= 0 and used.max() <= 1 and np.all(used[0, :6] == 0) and np.all(used[1, :6] == 1)
    assert np.all(model.prior_grads["w"][:2, :6] == 0) and np.any(model.prior_grads["w"][:2, 6:] != 0)


def test_loss_is_a_deterministic_function_of_params_x_and_eps():
    model, x, eps = small_vae_batch(prior="mog")
    assert model.forward(x, eps) == model.forward(x, eps)
    assert model.forward(x, eps)[0] != model.forward(x, eps + 0.1)[0]


def test_loss_parts_match_a_direct_computation():
    model, x, eps = small_vae_batch()
    loss, recon, kl = model.forward(x, eps)
    mu, log_var = model.encode(x)
    p = 1 / (1 + np.exp(-model.decode(mu + np.exp(0.5 * log_var) * eps)))
    direct_recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1).mean()
    direct_kl = 0.5 * (mu ** 2 + np.exp(log_var) - 1 - log_var).sum(1).mean()
    assert recon == pytest.approx(direct_recon, rel=1e-12) and kl == pytest.approx(direct_kl, rel=1e-12)
    assert loss == pytest.approx(recon + kl, rel=1e-15)


def test_mog_prior_kl_is_log_q_minus_log_p_at_the_same_z():
    model, x, eps = small_vae_batch(prior="mog")
    p = model.prior
    p["log_weights"][:] = [0.5, -1.0, 0.0, 2.0]
    p["log_vars"][:] = np.random.default_rng(0).uniform(-1, 1, p["log_vars"].shape)
    _, _, kl = model.forward(x, eps)
    mu, log_var = model.encode(x)
    z = mu + np.exp(0.5 * log_var) * eps
    pi = np.exp(p["log_weights"]) / np.exp(p["log_weights"]).sum()
    density = sum(pi[k] * np.exp(direct_log_normal(z, p["means"][k], np.exp(p["log_vars"][k]))) for k in range(4))
    assert kl == pytest.approx((direct_log_normal(z, mu, np.exp(log_var)) - np.log(density)).mean(), rel=1e-10)


def test_vamp_prior_is_the_mean_of_the_pseudo_inputs_posteriors():
    model, _, _ = small_vae_batch(prior="vamp")
    z = np.random.default_rng(1).standard_normal((7, 3))
    mu_u, log_var_u = model.encode(model.pseudo_inputs())
    direct = np.log(np.mean([np.exp(direct_log_normal(z, m, np.exp(lv))) for m, lv in zip(mu_u, log_var_u)], 0))
    np.testing.assert_allclose(model.log_prior(z), direct, rtol=1e-10)


def test_reconstruction_loss_is_stable_for_huge_logits():
    model, x, eps = small_vae_batch()
    model.decoder.layers[-1].params["b"][:] = 1e4       # sigmoid saturates; naive log(sigmoid) gives -inf
    loss, recon, _ = model.forward(x, eps)
    assert np.isfinite(loss) and recon > 1e4


def test_kl_closed_form_matches_monte_carlo():
    rng = np.random.default_rng(4)
    mu, log_var = np.array([[0.5, -1.0, 2.0]]), np.array([[0.3, -0.7, -2.0]])
    kl = vae.kl_normal_forward(mu, log_var)[0][0]
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], z ~ q, 10^6 draws, densities written out here.
    sigma = np.exp(0.5 * log_var)
    z = mu + sigma * rng.standard_normal((1_000_000, 3))
    diff = direct_log_normal(z, mu, sigma ** 2) - direct_log_normal(z, 0.0, 1.0)
    mc, se = diff.mean(), diff.std() / np.sqrt(len(diff))
    assert abs(kl - mc) < 4 * se, f"closed form {kl:.5f}, Monte Carlo {mc:.5f} +- {se:.5f}"


class FixedEncoder:
    """Stands in for the encoder: every row gets the same (mu, log_var); backward records what arrives."""
    def __init__(self, mu, log_var):
        self.h = np.concatenate([mu, log_var])

    def forward(self, x):
        return np.tile(self.h, (len(x), 1))

    def backward(self, dy, need_dx=True):
        self.dy = dy


class SquareDecoder:
    """Stands in for the decoder so that the reconstruction's gradient is that of f(z) = sum(z^2):
    backward hands back df/dz = 2z (per example, /B for the batch mean) instead of the decoder's."""
    def forward(self, z):
        self.z = z
        return np.zeros((len(z), 1))

    def backward(self, dlogits):
        return 2 * self.z / len(self.z)


def test_reparameterized_gradient_of_expectation_matches_analytic_value():
    # E_q[sum z^2] = sum(mu^2 + sigma^2), so d/dmu = 2 mu, d/dlog_var = sigma^2. The KL adds mu and
    # (sigma^2 - 1) / 2. VAE.backward's own lines, averaged over many eps, must give these.
    rng = np.random.default_rng(5)
    mu, log_var = np.array([0.7, -1.2]), np.array([0.4, -0.9])
    sigma2 = np.exp(log_var)
    model = vae.VAE(1, 1, 2, dtype=np.float64)
    model.encoder, model.decoder = FixedEncoder(mu, log_var), SquareDecoder()
    n = 400_000
    model.forward(np.zeros((n, 1)), rng.standard_normal((n, 2)))
    model.backward()
    dmu, dlog_var = model.encoder.dy[:, :2].sum(0), model.encoder.dy[:, 2:].sum(0)  # sum of per-example / n
    np.testing.assert_allclose(dmu, 2 * mu + mu, atol=0.02)
    np.testing.assert_allclose(dlog_var, sigma2 + 0.5 * (sigma2 - 1), atol=0.02)


@pytest.mark.parametrize("prior, likelihood, sigma", [("standard", "bernoulli", None), ("mog", "gaussian", "learned"),
                                                     ("vamp", "cb", None), ("standard", "gaussian", 0.5)])
def test_a_training_step_stays_in_float32(prior, likelihood, sigma):
    rng = np.random.default_rng(12)
    model = models.build(prior, 3, n_in=784, hidden=16, latent=4, seed=0, likelihood=likelihood, decoder_sigma=sigma)
    opt = Adam(model.params())
    model.forward(mnist.to_float(rng.integers(0, 256, (8, 784)).astype(np.uint8)),
                  rng.standard_normal((8, 4), dtype=np.float32))
    model.backward(0.5)
    opt.step(model.grads())
    arrays = {**model.params(), **model.grads(), **{f"path.{k}": a for k, a in model.paths.items()},
              **{f"m.{k}": a for k, a in opt.m.items()}, **{f"v.{k}": a for k, a in opt.v.items()}}
    assert {k: a.dtype for k, a in arrays.items() if a.dtype != np.float32} == {}


def test_adam_matches_a_step_computed_by_hand():
    p = np.array([1.0, -2.0, 3.0])
    g1, g2 = np.array([0.1, -0.5, 2.0]), np.array([0.3, 0.2, -1.0])
    opt = Adam({"p": p}, lr=0.01)
    opt.step({"p": g1}); opt.step({"p": g2})
    # Kingma & Ba, Algorithm 1, written out for t = 1, 2.
    b1, b2, eps, want = 0.9, 0.999, 1e-8, np.array([1.0, -2.0, 3.0])
    m = v = 0
    for t, g in ((1, g1), (2, g2)):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        want = want - 0.01 * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_adam_updates_every_element_of_a_2d_parameter_and_of_a_strided_view_in_place():
    # A 2-D parameter, updated in place as by hand; then a transposed (strided) view, which must update its base.
    rng = np.random.default_rng(4)
    shape = (5, 39325)
    p = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    want, m, v = p.astype(np.float64), 0.0, 0.0
    opt, param = Adam({"p": p}, lr=0.01), p
    for t, g in enumerate(grads, 1):
        opt.step({"p": g})
        m, v = 0.9 * m + 0.1 * g.astype(np.float64), 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        want -= 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert opt.params["p"] is param
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
    before = p.copy()
    g = rng.standard_normal(shape).astype(np.float32)
    Adam({"p": p.T}, lr=0.01).step({"p": g.T})          # the first step: m_hat = g, v_hat = g^2
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(p, before - 0.01 * g64 / (np.abs(g64) + 1e-8), rtol=1e-5, atol=1e-6)


def test_adam_never_holds_subnormal_moments_and_still_matches_the_update_by_hand():
    # After one gradient, 1500 steps with none: m decays by beta1 and would pass below float32's smallest normal
    # number (1.2e-38, where arithmetic is ~10x slower) near step 830. The parameters still follow Adam in float64.
    p = np.linspace(-1, 1, 50).astype(np.float32)
    want, m, v = p.astype(np.float64), 0.0, 0.0
    opt = Adam({"p": p}, lr=1e-3)
    g1 = np.linspace(0.5, 2, 50).astype(np.float32)
    for t in range(1, 1501):
        g = g1 if t == 1 else np.zeros_like(g1)
        opt.step({"p": g})
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        want -= 1e-3 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        for a in (opt.m["p"], opt.v["p"]):
            assert not np.any((a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)), t
    np.testing.assert_allclose(p, want, rtol=1e-5)


# ---- sampling: the values, the means and the covariances --------------------------------------------------

class RecordingDecoder:
    """Stands in for the decoder: records every z it is given and returns logits z[:, :1] * 0 + 0.3."""
    def forward(self, z):
        self.z = z.copy()
        return np.full((len(z), 2), 0.3)


def test_reconstruct_is_the_decoded_posterior_mean_written_out():
    model, x, _ = small_vae_batch()
    (W1, b1), (W2, b2) = [(l.params["W"], l.params["b"]) for l in model.encoder.layers[::2]]
    (W3, b3), (W4, b4) = [(l.params["W"], l.params["b"]) for l in model.decoder.layers[::2]]
    mu = (np.maximum(x @ W1 + b1, 0) @ W2 + b2)[:, :model.latent]
    want = 1 / (1 + np.exp(-(np.maximum(mu @ W3 + b3, 0) @ W4 + b4)))
    np.testing.assert_allclose(model.reconstruct(x), want, rtol=1e-12)


def test_posterior_samples_are_drawn_from_n_mu_sigma_squared():
    model, x, _ = small_vae_batch(batch=2)
    mu, log_var = model.encode(x)
    model.decoder = RecordingDecoder()
    images = model.sample_posterior(x, 50_000, np.random.default_rng(9))
    assert images.shape == (2, 50_000, 2) and np.allclose(images, 1 / (1 + np.exp(-0.3)))
    z = model.decoder.z.reshape(50_000, 2, model.latent)            # draws for image 0 and image 1
    np.testing.assert_allclose(z.mean(0), mu, atol=0.03)
    np.testing.assert_allclose(z.std(0), np.exp(0.5 * log_var), rtol=0.02)   # sigma, not sigma^2


def mixture_moments(pi, means, variances):
    mean = pi @ means
    cov = sum(p * (np.diag(v) + np.outer(m, m)) for p, m, v in zip(pi, means, variances)) - np.outer(mean, mean)
    return mean, cov


def assert_samples_follow_the_mixture(z, pi, means, variances):
    """Each draw belongs to the nearest of well-separated means: the share, mean and spread per component."""
    k = ((z[:, None, :] - means) ** 2).sum(-1).argmin(1)
    np.testing.assert_allclose(np.bincount(k, minlength=len(pi)) / len(z), pi, atol=0.01)
    for j in range(len(pi)):
        np.testing.assert_allclose(z[k == j].mean(0), means[j], atol=0.05)
        np.testing.assert_allclose(z[k == j].var(0), variances[j], rtol=0.06)


def test_standard_prior_samples_have_mean_zero_and_identity_covariance():
    model, _, _ = small_vae_batch()
    z = model.sample_z(100_000, np.random.default_rng(10))
    np.testing.assert_allclose(z.mean(0), 0, atol=0.015)
    np.testing.assert_allclose(np.cov(z.T), np.eye(3), atol=0.02)


def test_mog_prior_samples_have_the_mixture_weights_means_and_variances():
    model, _, _ = small_vae_batch(prior="mog")
    p = model.prior
    p["means"][...] = [[8, 0, 0], [0, 8, 0], [0, 0, 8], [-8, -8, -8]]
    p["log_vars"][...] = np.log([[0.5, 1, 2], [2, 1, 0.25], [1, 1, 1], [0.3, 3, 1]])
    p["log_weights"][...] = [0.0, 1.0, -1.0, 0.5]
    pi = np.exp(p["log_weights"]) / np.exp(p["log_weights"]).sum()
    assert_samples_follow_the_mixture(model.sample_z(200_000, np.random.default_rng(11)), pi, p["means"],
                                      np.exp(p["log_vars"]))


def test_vamp_prior_samples_have_the_mixture_mean_and_covariance():
    model, _, _ = small_vae_batch(prior="vamp")
    means, log_vars, log_pi = model.mixture()
    mean, cov = mixture_moments(np.exp(log_pi), means, np.exp(log_vars))
    z = model.sample_z(300_000, np.random.default_rng(12))
    np.testing.assert_allclose(z.mean(0), mean, atol=0.01)
    np.testing.assert_allclose(np.cov(z.T), cov, atol=0.01)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_fitted_mixture_samples_have_the_mixture_weights_means_and_covariances(covariance):
    means = np.array([[8.0, 0.0], [-8.0, 2.0], [0.0, -9.0]])
    full = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.2, 0.0], [0.0, 0.4]], [[2.0, -0.3], [-0.3, 0.5]]])
    covs = full if covariance == "full" else np.diagonal(full, axis1=1, axis2=2).copy()
    pi = np.array([0.2, 0.5, 0.3])
    z = gmm_sample({"log_pi": np.log(pi), "means": means, "covs": covs}, 200_000, np.random.default_rng(13))
    assert_samples_follow_the_mixture(z, pi, means, np.diagonal(full, axis1=1, axis2=2))
    if covariance == "full":
        k = ((z[:, None, :] - means) ** 2).sum(-1).argmin(1)
        np.testing.assert_allclose(np.cov(z[k == 0].T), full[0], atol=0.03)   # the correlation too


# ---- the importance-weighted likelihood ---------------------------------------------------------------------

def model_whose_posterior_is_exact(prior):
    """The decoder ignores z (its first layer is zero), so the true posterior p(z|x) is the prior; the encoder
    outputs that prior for every x. Then every weight p(x|z) p(z) / q(z|x) equals p(x), for every K."""
    model, x, _ = small_vae_batch(prior=prior)
    model.decoder.layers[0].params["W"][...] = 0
    out = model.encoder.layers[-1].params
    out["W"][...] = 0
    m, lv = np.array([0.4, -1.0, 2.0]), np.log([0.5, 2.0, 1.5])
    if prior == "standard":
        m, lv = np.zeros(3), np.zeros(3)
    elif prior == "mog":                                # K equal components: the mixture is N(m, exp(lv))
        model.prior["means"][...], model.prior["log_vars"][...] = m, lv
        model.prior["log_weights"][...] = [0.3, -2.0, 1.0, 0.0]
    out["b"][...] = np.concatenate([m, lv])             # the VampPrior's components are q(z|u_k) = N(m, exp(lv))
    return model, (x * 255).round().astype(np.uint8)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_iw_nll_is_exact_for_every_k_when_the_posterior_is_the_true_posterior(prior):
    model, images = model_whose_posterior_is_exact(prior)
    x = mnist.to_float(images, np.float64)
    logits = model.decode(np.zeros((1, 3)))[0]          # the same for every z
    p = 1 / (1 + np.exp(-logits))
    exact = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)   # -log p(x), written out
    for k in (1, 7, 100):
        np.testing.assert_allclose(analysis.iw_nll(model, images, k, np.random.default_rng(k)), exact, rtol=1e-10)


def test_iw_nll_approaches_the_likelihood_computed_by_quadrature():
    # A 1-D latent: -log p(x) = -log int p(x|z) N(z; 0, 1) dz, on a dense grid (trapezoid rule in log space).
    model, x, _ = small_vae_batch(latent=1, batch=4)
    for layer in model.decoder.layers[::2]:
        layer.params["W"] *= 3                          # a decoder that depends on z strongly
    images = (x * 255).round().astype(np.uint8)
    xf = mnist.to_float(images, np.float64)
    grid = np.linspace(-9, 9, 20001)[:, None]
    log_joint = vae.log_bernoulli(xf[:, None, :], model.decode(grid)[None]) + direct_log_normal(grid, 0.0, 1.0)
    exact = -(priors.logsumexp(log_joint, axis=1) + np.log(grid[1, 0] - grid[0, 0]))
    k_many = analysis.iw_nll(model, np.repeat(images, 10, axis=0), 2000, np.random.default_rng(1))
    np.testing.assert_allclose(k_many.reshape(4, 10).mean(1), exact, atol=0.02)     # 3 standard errors
    k1 = analysis.iw_nll(model, np.repeat(images, 200, axis=0), 1, np.random.default_rng(0))
    assert k1.mean() - exact.mean() > 0.3               # K = 1, the ELBO, is a looser bound (here by ~0.9 nats)


def test_the_test_elbo_draws_z_from_the_posterior_not_z_equals_mu():
    # The test loss is the negative ELBO, E_q[-log p(x|z)] + KL: its reconstruction term averages over z ~ q(z|x).
    # Decoding z = mu instead (a common slip) gives another number, far outside the Monte Carlo error.
    model, x, _ = small_vae_batch(batch=1)
    model.encoder.layers[-1].params["b"][model.latent:] = 1.0       # sigma = e^0.5: draws far from mu
    for layer in model.decoder.layers[::2]:
        layer.params["W"] *= 3
    images = np.repeat((x * 255).round().astype(np.uint8), 4000, axis=0)
    loss, recon, kl = analysis.negative_elbo(model, images, seed=0)
    xf = mnist.to_float(images[:1], np.float64)
    mu, log_var = model.encode(xf)
    z = mu + np.exp(0.5 * log_var) * np.random.default_rng(1).standard_normal((20000, model.latent))
    per_draw = -vae.log_bernoulli(xf, model.decode(z))             # -log p(x|z) at independent draws
    expected, se = per_draw.mean(), per_draw.std() / np.sqrt(len(images))
    at_mu = -vae.log_bernoulli(xf, model.decode(mu))[0]
    assert abs(recon - expected) < 4 * se and abs(at_mu - expected) > 20 * se, (recon, expected, se, at_mu)
    assert kl == pytest.approx(vae.kl_normal_forward(mu, log_var)[0][0]) and loss == pytest.approx(recon + kl)


def test_iw_nll_is_the_same_for_each_image_whatever_the_batching():
    model, x, _ = small_vae_batch(batch=9)
    images = (x * 255).round().astype(np.uint8)
    eps = np.random.default_rng(14).standard_normal((6, 9, 3))
    a = analysis.iw_nll(model, images, 6, None, eps=eps, batch_size=25)
    b = analysis.iw_nll(model, images, 6, None, eps=eps, batch_size=4)  # chunks of 4, 4, 1
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_iw_nll_never_exceeds_the_elbo_of_the_same_draws_and_falls_as_k_grows():
    model, x, _ = small_vae_batch(batch=40)
    images = (x * 255).round().astype(np.uint8)
    xf = mnist.to_float(images, np.float64)
    eps = np.random.default_rng(11).standard_normal((1000, len(x), model.latent))
    mu, log_var = model.encode(xf)
    z = mu + np.exp(0.5 * log_var) * eps                                     # (K, B, Z)
    neg_elbo = -(vae.log_bernoulli(xf, model.decode(z.reshape(-1, 3)).reshape(1000, 40, -1))
                 + direct_log_normal(z, 0.0, 1.0) - direct_log_normal(z, mu, np.exp(log_var)))   # one per draw
    previous = np.inf
    for k in (1, 10, 100, 1000):
        iw = analysis.iw_nll(model, images, k, None, eps=eps[:k]).mean()
        assert iw <= neg_elbo[:k].mean() + 1e-9, (k, iw, neg_elbo[:k].mean())   # Jensen, for the same draws
        assert iw <= previous + 1e-9, (k, iw, previous)
        previous = iw
    np.testing.assert_allclose(analysis.iw_nll(model, images, 1, None, eps=eps[:1]), neg_elbo[0], rtol=1e-12)


# ---- the aggregated posterior --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_floored_stays_normal_and_logsumexp_is_exact_far_below_zero(dtype):
    # exp_floored never returns a subnormal (NumPy's slow path) and is exp itself above its floor; logsumexp, which
    # floors the differences a_i - max, still sums terms exactly where every a_i is far below 0.
    a = np.array([0.0, -5.0, -80.0, -300.0, -706.0, -708.0, -745.0, -1e4, -np.inf], dtype)
    got = priors.exp_floored(a.copy())
    assert np.all(got >= np.finfo(dtype).tiny), got
    above = a >= np.log(np.finfo(dtype).tiny) + 2
    np.testing.assert_array_equal(got[above], np.exp(a[above]))
    far = np.array([[-1e3, -1e3 - 1.0, -1e3 - 800.0], [-2.0, -3e4, -np.inf]], dtype)
    want = [-1e3 + math.log1p(math.exp(-1.0)), -2.0]     # exp(-800) and exp(-3e4) vanish beside 1
    np.testing.assert_allclose(priors.logsumexp(far, 1), want, rtol=1e-15 if dtype == np.float64 else 1e-7)
    np.testing.assert_allclose(priors.logsumexp(far.copy(), 1, overwrite=True), want, rtol=1e-15 if dtype == np.float64
                               else 1e-7)

@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_well_separated_clusters_and_its_likelihood_never_decreases(covariance):
    rng = np.random.default_rng(6)
    means, weights = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, -3.0]]), np.array([0.5, 0.3, 0.2])
    sd = np.array([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])
    labels = rng.choice(3, 6000, p=weights)
    z = means[labels] + rng.standard_normal((6000, 2)) * sd[labels]
    gmm = fit_gmm(z, 3, covariance, rng=np.random.default_rng(0))
    order = [int(np.argmin(((gmm["means"] - m) ** 2).sum(1))) for m in means]
    assert sorted(order) == [0, 1, 2], gmm["means"]
    np.testing.assert_allclose(gmm["means"][order], means, atol=0.1)
    np.testing.assert_allclose(np.exp(gmm["log_pi"][order]), weights, atol=0.02)
    variances = gmm["covs"][order] if covariance == "diag" else np.diagonal(gmm["covs"][order], axis1=1, axis2=2)
    np.testing.assert_allclose(variances, sd ** 2, rtol=0.1)
    assert np.all(np.diff(gmm["log_likelihood"]) >= -1e-10), np.diff(gmm["log_likelihood"]).min()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_keeps_covariances_valid_where_the_shortcut_cancels(covariance):
    # Codes far from the origin with a tiny spread: E[z z^T] - m m^T loses every digit and can turn
    # indefinite (a Cholesky error, once a crash of the analysis). Centred, the fit finds the true spread.
    rng = np.random.default_rng(15)
    z = 1e5 + rng.standard_normal((4000, 3)) * [1e-3, 2e-3, 5e-4]
    z[:, 1] += 3e-3 * z[:, 0] - 3e-3 * 1e5              # some correlation
    gmm = fit_gmm(z, 2, covariance, rng=np.random.default_rng(0))
    variances = gmm["covs"] if covariance == "diag" else np.diagonal(gmm["covs"], axis1=1, axis2=2)
    np.testing.assert_allclose(np.exp(gmm["log_pi"]) @ variances, z.var(0), rtol=0.3)
    assert np.all(np.isfinite(gmm_log_density(gmm, z)))
    identical = np.tile([2.0, -1.0, 0.5], (500, 1))     # no spread at all: the floor keeps S_k invertible
    assert np.all(np.isfinite(gmm_log_density(fit_gmm(identical, 2, covariance), identical)))


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recomputing_the_outer_products_chunk_by_chunk_fits_the_same_mixture_as_keeping_them(covariance,
                                                                                                 monkeypatch):
    # Above MAX_KEPT, c c^T's triangles (c^2 for 'diag') are recomputed a chunk of rows at a time (N x 210 > 2^23):
    # the same arrays, so the same fit to the last bit. Uneven chunks: 3000 rows in 700s.
    rng = np.random.default_rng(23)
    z = rng.standard_normal((3000, 5)) * [1, 2, 0.5, 1, 3] + rng.choice([-4.0, 4.0], (3000, 1))
    fits = []
    for limit in (gmm.MAX_KEPT, 0):
        monkeypatch.setattr(gmm, "MAX_KEPT", limit)
        fits.append(fit_gmm(z, 3, covariance, rng=np.random.default_rng(1), chunk=700))
    assert len(fits[0]["log_likelihood"]) > 3
    for key in ("log_likelihood", "log_pi", "means", "covs"):
        assert np.array_equal(fits[0][key], fits[1][key]), key


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_mixture_density_matches_a_direct_computation(covariance):
    rng = np.random.default_rng(7)
    gmm = fit_gmm(rng.standard_normal((500, 3)) * [1, 2, 0.5], 4, covariance, iters=5)
    z = rng.standard_normal((20, 3))
    direct = np.zeros(20)
    for log_pi, m, cov in zip(gmm["log_pi"], gmm["means"], gmm["covs"]):
        cov = cov if cov.ndim == 2 else np.diag(cov)
        diff = z - m
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        direct += np.exp(log_pi) * np.exp(-0.5 * maha) / np.sqrt(np.linalg.det(2 * np.pi * cov))
    np.testing.assert_allclose(gmm_log_density(gmm, z), np.log(direct), rtol=1e-10)


def test_log_normal_pairs_equals_the_direct_form():
    rng = np.random.default_rng(16)
    z, m, lv = rng.standard_normal((7, 4)), rng.standard_normal((5, 4)), rng.uniform(-2, 1, (5, 4))
    direct = np.array([[direct_log_normal(zi, mk, np.exp(lvk)) for mk, lvk in zip(m, lv)] for zi in z])
    np.testing.assert_allclose(np.concatenate(list(analysis.log_normal_pairs(z, m, lv, rows=3))), direct, rtol=1e-12)
    np.testing.assert_allclose(vae.log_normal(z[:, None, :], m, lv), direct, rtol=1e-12)
    # Variances near 0 (a model trained with no KL term): the expansion would cancel every digit.
    lv, z = np.full((5, 4), -45.0), m[[0, 0, 1, 3, 4, 4, 2]] + 1e-10 * rng.standard_normal((7, 4))
    direct = np.array([[direct_log_normal(zi, mk, np.exp(lvk)) for mk, lvk in zip(m, lv)] for zi in z])
    np.testing.assert_allclose(np.concatenate(list(analysis.log_normal_pairs(z, m, lv, rows=3))), direct, rtol=1e-9)


def test_aggregate_posterior_moments_match_a_hand_computation():
    mu = np.array([[1.0, 0.0], [3.0, 0.0]])
    log_var = np.log(np.array([[1.0, 4.0], [3.0, 4.0]]))
    got = analysis.aggregate_posterior_moments(mu, log_var)
    # dim 0: E[z] = 2, E[z^2] = mean(1 + 1, 9 + 3) = 7, Var = 7 - 4 = 3, Var(mu) = 1 (active)
    # dim 1: E[z] = 0, Var = 4, Var(mu) = 0 (inactive)
    np.testing.assert_allclose(got["mean"], [2.0, 0.0])
    np.testing.assert_allclose(got["variance"], [3.0, 4.0])
    assert got["active_units"] == 1 and got["activity"] == [1.0, 0.0]


def test_elbo_surgery_matches_its_known_values():
    log_p = lambda z: direct_log_normal(z, 0.0, 1.0)
    # Every posterior the same N(m, s^2): z says nothing about x (I = 0), and q(z) is that Gaussian, so
    # KL(q(z) || p(z)) is its closed form.
    m, lv = np.array([0.5, -1.0, 0.0]), np.array([-1.0, 0.0, 0.5])
    same = analysis.elbo_surgery(np.tile(m, (2000, 1)), np.tile(lv, (2000, 1)), np.random.default_rng(2), log_p)
    closed = vae.kl_normal_forward(m[None], lv[None])[0][0]
    assert abs(same["mutual_information"]) < 1e-9 and same["kl_aggregate_prior"] == pytest.approx(closed, abs=0.05)
    # Narrow posteriors far apart: z identifies x, so I(x; z) reaches its ceiling log N.
    apart = analysis.elbo_surgery(np.arange(500)[:, None] * [1.0, 0.0], np.full((500, 2), -8.0),
                                  np.random.default_rng(3), log_p)
    assert apart["mutual_information"] == pytest.approx(np.log(500), abs=1e-6)
    # In general the two terms add up to the average KL, within the Monte Carlo error of one draw per point.
    rng = np.random.default_rng(9)
    mu, log_var = rng.standard_normal((3000, 3)) * 1.5, rng.uniform(-3, 0, (3000, 3))
    s = analysis.elbo_surgery(mu, log_var, np.random.default_rng(1), log_p)
    assert s["mutual_information_plus_kl_aggregate_prior"] == pytest.approx(
        vae.kl_normal_forward(mu, log_var)[0].mean(), abs=0.15)


def test_prior_hole_fraction_is_one_percent_when_codes_fill_the_prior_and_all_when_they_miss_it():
    rng = np.random.default_rng(10)
    z_prior = rng.standard_normal((20000, 2))
    covering = rng.standard_normal((20000, 2))
    gmm = fit_gmm(covering, 3, "full", rng=rng)
    assert analysis.prior_hole_fraction(gmm, covering, z_prior)[0] == pytest.approx(0.01, abs=0.004)
    far = rng.standard_normal((20000, 2)) * 0.3 + 5
    gmm = fit_gmm(far, 3, "full", rng=rng)
    assert analysis.prior_hole_fraction(gmm, far, z_prior)[0] > 0.99


# ---- data ------------------------------------------------------------------------------------------------

def make_images(n, rng):
    """n 28x28 uint8 images from 10 blob templates plus noise, and their labels: learnable, like digits."""
    yy, xx = np.mgrid[0:28, 0:28]
    templates = np.stack([np.exp(-((yy - 7 - 14 * (k // 5)) ** 2 + (xx - 4 - 5 * (k % 5)) ** 2) / 18)
                          for k in range(10)])
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.clip(templates[labels] * 255 + rng.normal(0, 20, (n, 28, 28)), 0, 255).astype(np.uint8)
    return images, labels


def write_dataset(folder, n_train=600, n_test=200, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = [*make_images(n_train, rng), *make_images(n_test, rng)]
    for name, array in zip(ARCHIVES, arrays):
        mnist.write_idx(os.path.join(folder, name), array)
    return arrays


def test_pixels_are_scaled_once_with_one_rounding():
    pixels = np.arange(256, dtype=np.uint8)
    x = mnist.to_float(pixels)
    assert x.dtype == np.float32 and x[0] == 0 and x[255] == 1
    np.testing.assert_array_equal(x, (pixels / 255.0).astype(np.float32))   # correctly rounded x / 255


def test_idx_write_parse_round_trip(tmp_path):
    images, labels = make_images(7, np.random.default_rng(0))
    mnist.write_idx(tmp_path / "i.gz", images)
    mnist.write_idx(tmp_path / "l.gz", labels)
    np.testing.assert_array_equal(mnist.parse_idx(tmp_path / "i.gz", 2051), images)
    x, y = mnist.load_split(tmp_path / "i.gz", tmp_path / "l.gz")
    assert x.dtype == np.uint8 and x.shape == (7, 784)
    np.testing.assert_array_equal(y, labels)


def corrupt_deflate_stream(p):
    """Flip a byte early in the compressed data: zlib itself fails ('invalid ...'), not gzip's checks."""
    data = bytearray(p.read_bytes())
    data[20] ^= 0xFF
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(data))
    p.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    write_dataset(folder)
    return folder


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a valid gzip archive"),       # truncated
    (corrupt_deflate_stream, "not a valid gzip archive"),                              # zlib.error
    (lambda p: p.write_bytes(b"not an archive at all"), "IDX magic"),                  # not gzip, not IDX
    (lambda p: mnist.write_idx(p, np.zeros(5, np.uint8)), "IDX magic is 2049"),        # labels, not images
    (lambda p: mnist.write_idx(p, np.zeros((600, 27, 27), np.uint8)), "expected 28x28"),
    (lambda p: mnist.write_idx(p, np.zeros((599, 28, 28), np.uint8)), "labels for 599 images"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10])), "holds fewer bytes"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"\0" * 3)), "holds more bytes"),
    (lambda p: p.write_bytes(gzip.compress(bytes.fromhex("00000803 ffffffff 0000001c 0000001c"))), "claims shape"),
    (lambda p: p.unlink(), "could not download"),
])
def test_bad_archives_give_one_line_errors(tmp_path, capsys, archives, corrupt, message):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ARCHIVES:
        (folder / name).write_bytes((archives / name).read_bytes())
    corrupt(folder / "train-images-idx3-ubyte.gz")
    code = train.main(["--data-dir", str(folder), "--mirror", "http://127.0.0.1:9/", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err) and "train-images-idx3-ubyte.gz" in err, err
    assert not (tmp_path / "run").exists()                  # nothing written for a run that never started


def test_labels_outside_0_to_9_are_rejected(tmp_path):
    write_dataset(tmp_path, n_train=20, n_test=10)
    mnist.write_idx(tmp_path / ARCHIVES[3], np.full(10, 10, np.uint8))
    with pytest.raises(mnist.DataError, match="label 10 is outside 0-9"):
        mnist.load(data_dir=str(tmp_path))


@contextlib.contextmanager
def http_server(folder):
    """An HTTP server on 127.0.0.1 (a free port) serving `folder`, shut down on exit."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_accepts_good_checksum_and_rejects_bad_one_without_caching_it(tmp_path):
    arrays = write_dataset(tmp_path / "served", n_train=50, n_test=20)
    sums = {n: ("sha256", hashlib.sha256((tmp_path / "served" / n).read_bytes()).hexdigest()) for n in ARCHIVES}
    with http_server(tmp_path / "served") as url:
        x_train, y_train, x_test, y_test = mnist.load("mnist", str(tmp_path / "cache"), url, sums, log=lambda m: 0)
        np.testing.assert_array_equal(x_train, arrays[0].reshape(-1, 784))
        np.testing.assert_array_equal(y_test, arrays[3])
        assert sorted(os.listdir(tmp_path / "cache")) == sorted(ARCHIVES)

        bad = {**sums, ARCHIVES[2]: ("sha256", "0" * 64)}   # the third archive is not what was published
        with pytest.raises(mnist.DataError, match="expected 0000"):
            mnist.load("mnist", str(tmp_path / "cache2"), url, bad, log=lambda m: 0)
        assert sorted(os.listdir(tmp_path / "cache2")) == sorted(ARCHIVES[:2])  # no bad file, no .part


def test_no_network_and_no_data_names_the_urls_tried(tmp_path):
    with pytest.raises(mnist.DataError) as err:
        mnist.load("mnist", str(tmp_path / "cache"), "http://127.0.0.1:9/", log=lambda m: 0)
    assert "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in str(err.value) and "--mirror" in str(err.value)
    assert not (tmp_path / "cache").exists()               # no empty cache folder left behind


# ---- files: written whole or not at all ---------------------------------------------------------------------

class DyingFile:
    """A file whose writes fail with Ctrl-C once `limit` bytes have reached the disk: a write cut midway."""
    def __init__(self, f, limit):
        self.f, self.left = f, limit

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


@pytest.mark.parametrize("what", ["model", "checkpoint", "metrics"])
def test_a_write_interrupted_midway_leaves_the_previous_file_intact(tmp_path, monkeypatch, what):
    model, _, _ = small_vae_batch(prior="mog")
    cfg = {**train.DEFAULTS, "hidden": 7, "latent": 3}
    state = {**{k: [] for k in train.EPOCH_RECORDS}, "gradient_paths": {}, "epoch": 0, "step": 0, "elapsed": 0.0,
             "perm": None, "rng": np.random.default_rng(0), "sums": None, "path_sums": None}
    path = str(tmp_path / what)
    write = {"model": lambda: runs.save_model(model, path),
             "checkpoint": lambda: runs.save_checkpoint(path, model, Adam(model.params()), state, cfg),
             "metrics": lambda: runs.write_metrics(path, {"train_loss": list(np.linspace(0, 1, 5000))})}[what]
    write()
    before = open(path, "rb").read()
    model.params()["dec.0.W"][...] += 1                  # the next write has other bytes
    for module in (runs,):                      # the module that opens the files a run writes
        monkeypatch.setattr(module, "open", lambda p, mode="r": DyingFile(builtins.open(p, mode), limit=300),
                            raising=False)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == [what]


# ---- training, checkpoints, the CLI ------------------------------------------------------------------------

SMALL = ["--hidden", "32", "--latent", "4", "--batch-size", "50", "--iw-samples", "10", "--gmm-components", "3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_dataset(folder)
    return str(folder)


def run_cli(*args):
    return train.main(list(args))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    """One small standard-prior run of 2 epochs, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 0
    return out


def test_training_on_generated_data_lowers_the_loss_and_writes_every_output(finished_run):
    m = json.loads((finished_run / "metrics.json").read_text())
    assert len(m["train_loss"]) == len(m["epoch_seconds"]) == len(m["test_loss_curve"]) == 2
    assert m["train_loss"][-1] < 0.95 * m["train_loss"][0], m["train_loss"]
    assert m["test_loss"] == pytest.approx(m["test_recon"] + m["test_kl"])
    assert m["config"]["hidden"] == 32 and m["config"]["epochs"] == 2
    for f in ("model.npz", "checkpoint.npz", "reconstructions.png", "samples_prior.png", "loss_curves.png",
              "samples_three_ways.png", "prior_vs_aggregate.png"):
        assert (finished_run / f).stat().st_size > 0, f
    assert not [f for f in os.listdir(finished_run) if ".tmp" in f]
    a = m["aggregate_posterior"]
    assert m["iw_nll"] < m["test_loss"] and a["average_kl"] == pytest.approx(m["test_kl"], rel=1e-5)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_model_save_load_round_trip(tmp_path, prior):
    model, x, eps = small_vae_batch(prior=prior)
    runs.save_model(model, str(tmp_path / "m.npz"))
    loaded, extra = runs.load_model(str(tmp_path / "m.npz"))
    assert models.describe(loaded) == models.describe(model) and models.describe(loaded)["prior"] == prior
    assert extra == {}
    assert loaded.forward(x, eps) == model.forward(x, eps)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_a_checkpoint_resumes_to_bit_identical_numbers(tmp_path, prior):
    # Train 2 epochs straight; then again, stopped at step 5 of epoch 2, saved, loaded, and finished.
    x_train = make_images(300, np.random.default_rng(1))[0].reshape(300, 784)
    cfg = {**train.DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 50, "prior": prior, "prior_components": 3,
           "epochs": 2}
    quiet = lambda *a, **k: None
    straight, opt, state = train.new_run(dict(cfg), x_train)
    for _ in range(2):
        train.train_epoch(straight, opt, x_train, state, cfg, {"requested": False}, quiet)
    model, opt, cut = train.new_run(dict(cfg), x_train)
    stop = {"requested": False}
    def stop_at_step_5_of_epoch_2(state, n_steps, seen):
        stop["requested"] = state["epoch"] == 1 and state["step"] == 5
    while train.train_epoch(model, opt, x_train, cut, cfg, stop, stop_at_step_5_of_epoch_2):
        pass
    runs.save_checkpoint(str(tmp_path / "c.npz"), model, opt, cut, cfg)
    resumed, opt, state_r, _ = runs.load_checkpoint(str(tmp_path / "c.npz"))
    assert (state_r["epoch"], state_r["step"]) == (1, 5)
    train.train_epoch(resumed, opt, x_train, state_r, cfg, {"requested": False}, quiet)
    assert state_r["train_loss"] == state["train_loss"]
    for name, p in straight.params().items():
        np.testing.assert_array_equal(resumed.params()[name], p, err_msg=name)


def test_ctrl_c_saves_a_checkpoint_and_resume_gives_the_uninterrupted_numbers(tmp_path, data_dir, finished_run,
                                                                              monkeypatch):
    def interrupt_at_step_7_of_epoch_2(state, n_steps, seen):
        if state["epoch"] == 1 and state["step"] == 7:
            signal.raise_signal(signal.SIGINT)              # a real Ctrl-C, through train.py's handler
    monkeypatch.setattr(console, "TrainingProgress", lambda: interrupt_at_step_7_of_epoch_2)
    out = tmp_path / "cut"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    assert (out / "checkpoint.npz").exists() and not (out / "model.npz").exists()
    monkeypatch.undo()
    assert run_cli("--data-dir", data_dir, "--epochs", "2", "--resume", str(out / "checkpoint.npz")) == 0
    a = json.loads((finished_run / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]      # the same seed, too
    pa, pb = runs.load_model(str(finished_run / "model.npz"))[0], runs.load_model(str(out / "model.npz"))[0]
    for k in pa.params():
        np.testing.assert_array_equal(pa.params()[k], pb.params()[k])


def test_resume_rejects_a_corrupt_file_and_another_architecture(tmp_path, data_dir, finished_run, capsys):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    assert run_cli("--data-dir", data_dir, "--resume", str(tmp_path / "junk.npz")) == 1
    assert "not a readable model file" in capsys.readouterr().err
    for flag, value in (("--latent", "8"), ("--prior", "vamp")):
        assert run_cli("--data-dir", data_dir, flag, value, "--resume", str(finished_run / "checkpoint.npz")) == 1
        err = capsys.readouterr().err
        assert "another architecture" in err and flag in err and err.count("\n") == 1
    runs.save_model(vae.VAE(784, 8, 2), str(tmp_path / "model_only.npz"))   # a model, not a training checkpoint
    assert run_cli("--data-dir", data_dir, "--resume", str(tmp_path / "model_only.npz")) == 1
    assert "not a training checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--latent", "0"), ("--hidden", "-3"), ("--batch-size", "0"),
                                         ("--lr", "0"), ("--lr", "-1e-3"), ("--epochs", "-1")])
def test_non_positive_options_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err and "Traceback" not in err


def test_a_loss_that_turns_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, finished_run, capsys,
                                                                        monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    good = (finished_run / "checkpoint.npz").read_bytes()
    (out / "checkpoint.npz").write_bytes(good)
    real_forward, calls = vae.VAE.forward, []
    def forward_that_fails_at_call_5(self, x, eps):
        calls.append(1)
        loss = real_forward(self, x, eps)
        return (float("nan"), *loss[1:]) if len(calls) == 5 else loss
    monkeypatch.setattr(vae.VAE, "forward", forward_that_fails_at_call_5)
    assert run_cli("--data-dir", data_dir, "--epochs", "3", "--resume", str(out / "checkpoint.npz")) == 1
    err = capsys.readouterr().err
    assert "became nan at epoch 3, step 5" in err and "last good checkpoint" in err and err.count("\n") == 1
    assert (out / "checkpoint.npz").read_bytes() == good
    assert sorted(os.listdir(out)) == ["checkpoint.npz"]


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, data_dir, capsys):
    assert run_cli("--data-dir", data_dir, *SMALL, "--lr", "1e6", "--epochs", "1", "--out", str(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "error: the loss became" in err and "no checkpoint was written" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_benchmark_prints_where_the_time_goes_and_writes_nothing(tmp_path, data_dir, capsys):
    assert run_cli("--data-dir", data_dir, *SMALL, "--benchmark", "--epochs", "2", "--out", str(tmp_path / "b")) == 0
    out = capsys.readouterr().out
    for line in ("epoch   2", "median epoch", "per step (median of 12)", "matrix products alone", "epoch / floor",
                 "peak memory", "analysis after training: encode", "em", "surgery", "iw_nll"):
        assert line in out, out
    assert not (tmp_path / "b").exists()


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--data-dir", str(tmp_path / "none"),
                             "--mirror", "http://127.0.0.1:9/"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in result.stderr


def test_an_out_of_range_posterior_image_is_refused_before_training(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(train, "train_epoch", lambda *a: pytest.fail("trained before checking the options"))
    assert run_cli("--data-dir", data_dir, "--posterior-image", "200", "--out", str(tmp_path / "r")) == 1
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "r").exists()
    runs.save_model(vae.VAE(784, 8, 2), str(tmp_path / "model.npz"))
    assert run_cli("--data-dir", data_dir, "--analyze", str(tmp_path / "model.npz"), "--posterior-image",
                   "100000") == 1
    assert "out of range" in capsys.readouterr().err


def test_analysis_measures_a_learned_prior_against_that_prior():
    # Moving a mixture prior's means far from every code must show in every measurement that uses p(z): prior
    # draws land in holes, KL(q(z) || p(z)) and iw_nll grow. A measurement that used N(0, I) would not move.
    rng = np.random.default_rng(17)
    x_train, x_test = make_images(400, rng)[0].reshape(400, 784), make_images(100, rng)[0].reshape(100, 784)
    model = priors.MixturePriorVAE(784, 16, 2, seed=1, components=3)
    model.prior["means"][...] *= 0.3
    near, _ = analysis.analyze(model, x_train, x_test, 0, 5, 3, "full", log=lambda m: None)
    model.prior["means"][...] += 30
    far, _ = analysis.analyze(model, x_train, x_test, 0, 5, 3, "full", log=lambda m: None)
    a, b = near["aggregate_posterior"], far["aggregate_posterior"]
    assert a["prior_hole_fraction"] < 0.5 and b["prior_hole_fraction"] > 0.99
    assert b["kl_aggregate_prior"] > a["kl_aggregate_prior"] + 100 and far["iw_nll"] > near["iw_nll"] + 100
    assert b["average_kl"] > a["average_kl"] + 100


# ---- the KL weight, warm-up, binarization, gradient paths ---------------------------------------------------

def test_kl_warmup_rises_linearly_from_zero_and_reaches_beta_after_n_epochs():
    cfg = {**train.DEFAULTS, "beta": 2.0, "kl_warmup": 2}
    weights = [train.kl_weight(cfg, t, n_steps=10) for t in range(40)]
    assert weights[0] == 0 and weights[5] == pytest.approx(0.5) and weights[10] == pytest.approx(1.0)
    assert weights[19] == pytest.approx(1.9) and weights[20:] == [2.0] * 20       # epoch 3 on: beta itself
    assert [train.kl_weight({**cfg, "kl_warmup": 0}, t, 10) for t in (0, 7, 33)] == [2.0] * 3


def test_training_applies_the_warmed_up_kl_weight_at_each_step(monkeypatch):
    x_train = make_images(300, np.random.default_rng(2))[0].reshape(300, 784)
    cfg = {**train.DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 50, "beta": 0.6, "kl_warmup": 2}
    model, opt, state = train.new_run(dict(cfg), x_train)
    used = []
    real_backward = model.backward
    monkeypatch.setattr(model, "backward", lambda beta=1.0: (used.append(beta), real_backward(beta)))
    for _ in range(3):
        train.train_epoch(model, opt, x_train, state, cfg, {"requested": False}, lambda *a, **k: None)
    np.testing.assert_allclose(used, [0.6 * min(1, t / 12) for t in range(18)])       # 6 steps an epoch
    np.testing.assert_allclose(state["kl_weight"], [0.6 * 2.5 / 12, 0.6 * 8.5 / 12, 0.6])
    np.testing.assert_allclose(state["train_objective"][2], state["train_recon"][2] + 0.6 * state["train_kl"][2])
    assert state["train_loss"][2] == pytest.approx(state["train_recon"][2] + state["train_kl"][2])


def test_the_gradient_paths_add_up_to_what_reaches_the_encoder():
    rng = np.random.default_rng(18)
    mu, log_var = np.array([0.7, -1.2]), np.array([0.4, -0.9])
    model = vae.VAE(1, 1, 2, dtype=np.float64)
    model.encoder, model.decoder = FixedEncoder(mu, log_var), SquareDecoder()
    eps = rng.standard_normal((6, 2))
    model.forward(np.zeros((6, 1)), eps)
    model.backward(0.4)
    p, B = model.paths, 6
    np.testing.assert_allclose(p["recon_mu"] + p["kl_mu"], model.encoder.dy[:, :2])
    np.testing.assert_allclose(p["recon_log_var"] + p["kl_log_var"], model.encoder.dy[:, 2:])
    np.testing.assert_allclose(p["kl_mu"] * B, np.tile(0.4 * mu, (6, 1)))                      # beta * mu
    np.testing.assert_allclose(p["kl_log_var"] * B, np.tile(0.4 * (np.exp(log_var) - 1) / 2, (6, 1)))
    z = mu + np.exp(0.5 * log_var) * eps
    np.testing.assert_allclose(p["recon_mu"] * B, 2 * z)                                      # df/dz, f = sum z^2
    np.testing.assert_allclose(p["recon_log_var"] * B, 2 * z * eps * np.exp(0.5 * log_var) / 2)


def test_an_epoch_records_the_rms_of_each_gradient_path_per_unit():
    x_train = make_images(100, np.random.default_rng(3))[0].reshape(100, 784)
    cfg = {**train.DEFAULTS, "hidden": 16, "latent": 3, "batch_size": 100, "beta": 0.5}   # one step per epoch
    model, opt, state = train.new_run(dict(cfg), x_train)
    before = vae.VAE(784, 16, 3, seed=0)
    for name, p in before.params().items():
        p[...] = model.params()[name]
    train.train_epoch(model, opt, x_train, state, cfg, {"requested": False}, lambda *a, **k: None)
    replay = np.random.default_rng(0)                   # the run's stream: the permutation, then eps
    x, eps = train.batch(x_train, replay.permutation(100), 0, cfg, replay, 3)
    before.forward(x, eps)
    before.backward(0.5)
    for name in train.PATHS:
        g = before.paths[name] * 100                    # per-example gradients
        unit = state["gradient_paths_per_unit"][name][0]
        np.testing.assert_allclose(unit["rms"], np.sqrt(np.mean(g * g, axis=0)), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(unit["mean"], g.mean(0), rtol=1e-5, atol=1e-7, err_msg=name)
        assert state["gradient_paths"][name][0] == pytest.approx(np.sqrt(np.mean(g * g)), rel=1e-5)


def test_dynamic_binarization_draws_each_pixel_afresh_with_its_intensity():
    images = np.tile(np.array([0, 51, 128, 204, 255], np.uint8), (4000, 1))
    rng = np.random.default_rng(19)
    draws = np.stack([mnist.binarize(images, rng) for _ in range(5)])
    assert set(np.unique(draws)) == {0, 255}
    np.testing.assert_allclose(draws.mean((0, 1)) / 255, [0, 0.2, 128 / 255, 0.8, 1], atol=0.01)
    # The same images in two batches of a run get different draws (not one binarization reused).
    cfg = {**train.DEFAULTS, "batch_size": 4000, "binarize": True}
    perm, run_rng = np.arange(4000), np.random.default_rng(0)
    first, second = (train.batch(images, perm, 0, cfg, run_rng, 2)[0] for _ in range(2))
    assert set(np.unique(first)) == {0.0, 1.0} and np.mean(first != second) > 0.2


@pytest.fixture(scope="module")
def binary_warmup_run(tmp_path_factory, data_dir):
    """A small VampPrior run on dynamically binarized images, with a KL warm-up of 1 epoch and beta 0.5."""
    out = tmp_path_factory.mktemp("runs") / "binary"
    assert run_cli("--data-dir", data_dir, *SMALL, "--prior", "vamp", "--prior-components", "5", "--binarize",
                   "--beta", "0.5", "--kl-warmup", "1", "--epochs", "2", "--gmm-components", "3",
                   "--out", str(out)) == 0
    return out


def test_a_binarized_run_is_tested_on_one_fixed_binarization_and_reports_the_true_elbo(binary_warmup_run, data_dir):
    m = json.loads((binary_warmup_run / "metrics.json").read_text())
    model = runs.load_model(str(binary_warmup_run / "model.npz"))[0]
    x_test = mnist.load("mnist", data_dir)[2]
    binary = mnist.binarize(x_test, np.random.default_rng(mnist.TEST_BINARIZATION_SEED))
    assert m["test_loss"] == pytest.approx(analysis.negative_elbo(model, binary, m["config"]["seed"])[0], rel=1e-12)
    other = mnist.binarize(x_test, np.random.default_rng(mnist.TEST_BINARIZATION_SEED + 7))   # another draw
    assert m["test_loss"] != pytest.approx(analysis.negative_elbo(model, other, m["config"]["seed"])[0], rel=1e-6)
    assert m["test_loss"] == pytest.approx(m["test_recon"] + m["test_kl"])         # beta = 1, not 0.5
    assert m["config"]["binarize"] is True and m["config"]["beta"] == 0.5 and m["kl_weight"][1] == 0.5


def test_analyze_into_a_new_folder_takes_the_runs_options_from_beside_the_model(binary_warmup_run, data_dir,
                                                                                tmp_path):
    assert run_cli("--data-dir", data_dir, "--analyze", str(binary_warmup_run / "model.npz"), "--iw-samples", "2",
                   "--gmm-components", "2", "--out", str(tmp_path / "again")) == 0
    a = json.loads((tmp_path / "again" / "metrics.json").read_text())["aggregate_posterior"]
    model = runs.load_model(str(binary_warmup_run / "model.npz"))[0]
    binary = mnist.binarize(mnist.load("mnist", data_dir)[2], np.random.default_rng(mnist.TEST_BINARIZATION_SEED))
    mu = analysis.encode_all(model, binary)[0]          # the binarized test set, as the run was measured on
    np.testing.assert_allclose(a["mean"], mu.mean(0), rtol=1e-9)
    grey = analysis.encode_all(model, mnist.load("mnist", data_dir)[2])[0]
    assert not np.allclose(a["mean"], grey.mean(0), rtol=1e-6)


def test_a_learned_prior_run_trains_and_keeps_its_pseudo_inputs_images(binary_warmup_run, data_dir, capsys):
    m = json.loads((binary_warmup_run / "metrics.json").read_text())
    assert m["config"]["prior"] == "vamp" and m["config"]["prior_components"] == 5
    assert m["train_loss"][-1] < m["train_loss"][0] and m["iw_nll"] < m["test_loss"]
    u = runs.load_model(str(binary_warmup_run / "model.npz"))[0].pseudo_inputs()
    assert u.min() >= 0 and u.max() <= 1 and len(u) == 5
    assert run_cli("--data-dir", data_dir, "--prior", "standard", "--resume",
                   str(binary_warmup_run / "checkpoint.npz")) == 1
    assert "another architecture" in capsys.readouterr().err


def test_every_run_records_and_draws_its_gradient_paths(binary_warmup_run):
    m = json.loads((binary_warmup_run / "metrics.json").read_text())
    assert set(m["gradient_paths"]) == set(m["gradient_paths_per_unit"]) == set(train.PATHS)
    assert all(len(v) == 2 and min(v) > 0 for v in m["gradient_paths"].values())     # one value per epoch
    assert all(len(v) == 2 and len(v[0]["rms"]) == len(v[0]["mean"]) == 4
               for v in m["gradient_paths_per_unit"].values())
    assert (binary_warmup_run / "gradient_paths.png").stat().st_size > 0


@pytest.fixture(scope="module")
def kl_weight_experiment(tmp_path_factory, data_dir):
    """The KL-weight experiment with beta 0 and 2, Z = 2: two runs and their comparison."""
    out = tmp_path_factory.mktemp("runs") / "betas"
    assert run_cli("--data-dir", data_dir, "--hidden", "32", "--latent", "2", "--batch-size", "50", "--epochs", "2",
                   "--iw-samples", "5", "--gmm-components", "3", "--betas", "0", "2", "--out", str(out)) == 0
    return out


def test_the_kl_weight_experiment_trains_one_run_per_beta_and_compares_them(kl_weight_experiment):
    out = kl_weight_experiment
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["beta"] for r in rows] == [0, 2]
    for beta, row in zip(("0", "2"), rows):
        m = json.loads((out / f"beta-{beta}" / "metrics.json").read_text())
        assert m["config"]["beta"] == float(beta) and row["negative_elbo"] == m["test_loss"]
        assert row["prior_hole_fraction"] == m["aggregate_posterior"]["prior_hole_fraction"]
    assert rows[0]["kl"] > rows[1]["kl"]                # without the KL term the posteriors drift from the prior
    for f in ("kl_weight_samples.png", "kl_weight_latent.png"):
        assert (out / f).stat().st_size > 0, f


def test_a_latent_2d_run_draws_the_plane_and_analyze_merges_new_measurements(kl_weight_experiment, data_dir):
    out = kl_weight_experiment / "beta-2"
    for f in ("samples_three_ways.png", "prior_vs_aggregate.png", "latent_space.png", "latent_manifold.png"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    os.remove(out / "samples_three_ways.png")
    assert run_cli("--data-dir", data_dir, "--analyze", str(out / "model.npz"), "--iw-samples", "3",
                   "--gmm-components", "2", "--gmm-covariance", "diag", "--posterior-image", "3") == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["train_loss"] == m["train_loss"] and m2["iw_samples"] == 3           # merged, not replaced
    assert m2["aggregate_posterior"]["gmm"]["covariance"] == "diag" and (out / "samples_three_ways.png").exists()


def test_the_hole_threshold_comes_from_codes_the_mixture_was_not_fitted_on(monkeypatch):
    rng = np.random.default_rng(20)
    x_train, x_test = make_images(300, rng)[0].reshape(300, 784), make_images(80, rng)[0].reshape(80, 784)
    seen = {}
    real_fit, real_holes = analysis.fit_gmm, analysis.prior_hole_fraction
    def fit(z, *args, **kwargs):
        seen["fitted"] = z
        seen["gmm"] = real_fit(z, *args, **kwargs)
        return seen["gmm"]
    def holes(gmm, z_codes, z_draws, *args):
        seen.setdefault("codes", z_codes)
        return real_holes(gmm, z_codes, z_draws, *args)
    monkeypatch.setattr(analysis, "fit_gmm", fit)
    monkeypatch.setattr(analysis, "prior_hole_fraction", holes)
    metrics, _ = analysis.analyze(vae.VAE(784, 16, 2, seed=2), x_train, x_test, 0, 2, 3, "full", log=lambda m: None)
    fitted = {tuple(z) for z in seen["fitted"]}
    assert len(seen["codes"]) == 80 and not any(tuple(z) in fitted for z in seen["codes"])   # the test codes
    assert metrics["aggregate_posterior"]["gmm"]["held_out_log_likelihood"] == pytest.approx(
        gmm_log_density(seen["gmm"], seen["codes"]).mean())


def test_the_comparison_table_shows_every_column_of_every_row():
    row = {"run": "beta = 0.3", "recon": 230.0, "kl": 9.5, "negative_elbo": 239.5, "iw_nll": 237.25, "bits_per_dim": None,
           "active_units": 12, "variance_range": [0.25, 1.5], "kl_aggregate_prior": 2.0, "mutual_information": 7.5,
           "prior_hole_fraction": 0.125, "decoder_sigma": 0.0812, "pulls_on_mu": [5.7, 0.77]}
    lines = report.comparison_table([row]).splitlines()
    assert lines[0].startswith("| run | recon | KL | test -ELBO | iw_nll | bits/dim |") and len(lines) == 3
    assert lines[2] == ("| beta = 0.3 | 230.00 | 9.50 | 239.50 | 237.25 | - | 12 | 0.25-1.50 | 2.00 | 7.50 | 12.5% | "
                        "0.0812 | 5.7 / 0.77 |")


def test_iw_nll_of_the_test_set_is_the_mean_over_images_not_over_chunks(monkeypatch):
    # Each image weighs the same in the reported value, however the set is cut into batches.
    rng = np.random.default_rng(21)
    x_train, x_test = make_images(200, rng)[0].reshape(200, 784), make_images(80, rng)[0].reshape(80, 784)
    monkeypatch.setattr(analysis, "iw_nll", lambda model, images, s, rng, progress: np.arange(len(images), dtype=float))
    metrics, _ = analysis.analyze(vae.VAE(784, 16, 2, seed=2), x_train, x_test, 0, 2, 3, "diag", log=lambda m: None)
    assert metrics["iw_nll"] == 39.5


@pytest.mark.parametrize("latent", [1, 2, 7, 20])
def test_the_marginals_figure_with_its_fixed_margins_keeps_its_labels_in_the_image_and_its_titles_clear(latent,
                                                                                                       tmp_path):
    # Its margins are set in inches and save() keeps them (no bbox_inches="tight"): every title and tick label lies
    # inside the image, the figure's title above the axes' titles, no axes' title on the ticks above it, and every
    # axes at least 0.9 inch tall however many lines the title wraps to.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    rng = np.random.default_rng(22)
    x_train, x_test = make_images(200, rng)[0].reshape(200, 784), make_images(60, rng)[0].reshape(60, 784)
    model = vae.VAE(784, 16, latent, seed=3)
    fig = figures.marginals(model, analysis.analyze(model, x_train, x_test, 0, 2, 3, "diag", log=lambda m: None)[1])
    FigureCanvasAgg(fig).draw()
    box = lambda text: text.get_window_extent()
    axes = [ax for ax in fig.axes if ax.axison]
    drawn = lambda ax, t: t.get_text() and min(ax.get_xlim()) <= t.get_position()[0] <= max(ax.get_xlim())
    ticks = [box(t) for ax in axes for t in ax.get_xticklabels() if drawn(ax, t)]
    titles, top = [box(ax.title) for ax in axes], box(fig._suptitle)
    assert getattr(fig, "margins_set", False) and len(axes) == latent and ticks
    for b in [top, *titles, *ticks]:                                    # inside the image
        assert 0 <= b.x0 and b.x1 <= fig.bbox.width and 0 <= b.y0 and b.y1 <= fig.bbox.height, (b, fig.bbox)
    assert top.y0 >= max(t.y1 for t in titles)                          # the figure's title above every axes title
    for ax, title in zip(axes, titles):                                 # an axes' title clear of the ticks above it
        assert not any(title.overlaps(t) for t in ticks), ax.get_title()
    assert min(ax.get_window_extent().height for ax in axes) >= 0.9 * fig.dpi
    figures.save(str(tmp_path), {"m.png": fig})                         # saved whole: 80 pixels an inch, not trimmed
    width, height = struct.unpack(">2I", (tmp_path / "m.png").read_bytes()[16:24])    # the PNG header's IHDR
    assert (width, height) == tuple(round(80 * s) for s in fig.get_size_inches())


# ---- the command line: every mistake caught before any work, and no run over another -------------------------

def one_line_error(capsys, *args, code=1):
    """Run the command; assert it failed with exit code `code` and one line 'error: ...'; return that line."""
    try:
        got = run_cli(*args)
    except SystemExit as exit_:                         # argparse's own errors
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (got, err)
    return err


@pytest.fixture
def no_figures(monkeypatch):
    """Draw nothing: for tests of files and folders, which do not look at the figures (and run faster so)."""
    for name in ("run_figures", "analysis_figures"):
        monkeypatch.setattr(figures, name, lambda *a, **k: {})


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command downloads (loads data) or trains."""
    monkeypatch.setattr(mnist, "load", lambda *a, **k: pytest.fail("loaded data before checking the options"))
    monkeypatch.setattr(train, "train_epoch", lambda *a: pytest.fail("trained before checking the options"))


@pytest.mark.parametrize("flags", [["--beta", "0.3"], ["--kl-warmup", "5"], ["--lr", "0.002"], ["--batch-size", "64"],
                                   ["--epochs", "20"], ["--prior", "mog"], ["--prior", "vamp", "--prior-components",
                                   "50"], ["--binarize"], ["--hidden", "200"], ["--latent", "2"], ["--seed", "3"]])
def test_runs_that_differ_in_a_training_option_never_share_a_default_folder(flags):
    recipe = runs.default_out(train.prepare_config(train.parse_args([])), train.DEFAULTS)
    assert runs.default_out(train.prepare_config(train.parse_args(flags)), train.DEFAULTS) != recipe
    assert runs.default_out(train.prepare_config(train.parse_args(["--beta", "0.3", "--kl-warmup", "5"])), train.DEFAULTS) != \
        runs.default_out(train.prepare_config(train.parse_args(["--beta", "0.3"])), train.DEFAULTS)


def test_a_new_run_never_replaces_another_runs_files_unless_asked(finished_run, tmp_path, data_dir, capsys, no_work):
    before = {f: (finished_run / f).read_bytes() for f in ("model.npz", "checkpoint.npz", "metrics.json")}
    err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--seed", "1", "--out", str(finished_run))
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    other = tmp_path / "other"                          # --analyze into a folder that holds another run
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    assert "holds another run" in one_line_error(capsys, "--data-dir", data_dir, "--analyze",
                                                 str(finished_run / "model.npz"), "--out", str(other))
    assert {f: (finished_run / f).read_bytes() for f in before} == before and (other / "metrics.json").read_text() == "{}"


def test_overwrite_replaces_the_old_run_whole(finished_run, tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "latent_space.png").write_bytes(b"an old run's figure")
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--seed", "2", "--overwrite", "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["seed"] == 2 and m["config"]["epochs"] == 0 and not (out / "latent_space.png").exists()
    assert not (out / ".lock").exists()


LOCK_HOLDER = """import sys
import time
import runs
with runs.claim(sys.argv[1], True, False):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_folder_in_use_is_refused_and_a_crashed_runs_lock_does_not_stay(tmp_path, data_dir, capsys, no_figures):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=HERE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = one_line_error(capsys, "--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(out))
        assert "in use by another run" in err
    finally:
        holder.kill()                                   # a crash: no chance to clean up
        holder.wait()
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(out)) == 0


def test_the_output_folder_exists_before_anything_is_saved(finished_run, tmp_path, data_dir, capsys, no_figures):
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "0", "--out", str(tmp_path / "a" / "new")) == 0
    assert (tmp_path / "a" / "new" / "model.npz").exists()
    out = tmp_path / "continued"                        # a finished run continued into a new folder
    assert run_cli("--data-dir", data_dir, "--resume", str(finished_run / "checkpoint.npz"), "--epochs", "3",
                   "--out", str(out)) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["epochs"] == 3
    assert len(json.loads((finished_run / "metrics.json").read_text())["train_loss"]) == 2    # untouched


@pytest.mark.parametrize("make_out, message", [
    (lambda p: (p / "f").write_text("a file") and p / "f", "is a file, not a folder"),
    (lambda p: (p / "f").write_text("a file") and p / "f" / "sub", "is a file, not a folder"),
])
def test_an_output_path_that_cannot_be_used_is_refused_before_any_work(tmp_path, data_dir, capsys, no_work, make_out,
                                                                        message):
    assert message in one_line_error(capsys, "--data-dir", data_dir, "--out", str(make_out(tmp_path)))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a folder nobody can write in (Linux /proc)")
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(data_dir, capsys, no_work):
    assert "cannot write in /proc" in one_line_error(capsys, "--data-dir", data_dir, "--out", "/proc/vae-run")


@pytest.mark.parametrize("flags, message", [
    (["--betas", "1", "--resume", "c.npz"], "--resume and --betas do not go together"),
    (["--betas", "1", "--analyze", "m.npz"], "--analyze and --betas do not go together"),
    (["--analyze", "m.npz", "--resume", "c.npz"], "--analyze and --resume do not go together"),
    (["--analyze", "m.npz", "--lr", "0.1"], "--analyze and --lr do not go together"),
    (["--betas", "0", "1", "--beta", "2"], "--betas and --beta do not go together"),
    (["--lr", "abc"], "invalid float value"), (["--lr", "nan"], "--lr: must be > 0"),
    (["--beta", "inf"], "--beta: must be >= 0 and finite"), (["--no-such-option"], "unrecognized arguments"),
    (["--likelihood", "gaussian", "--decoder-sigma", "0"], "must be a number > 0 or 'learned', got '0'"),
    (["--likelihood", "gaussian", "--decoder-sigma", "-1"], "must be a number > 0 or 'learned', got '-1'"),
    (["--likelihood", "gaussian", "--decoder-sigma", "wide"], "must be a number > 0 or 'learned', got 'wide'"),
    (["--decoder-sigma", "1"], "--decoder-sigma needs --likelihood gaussian"),
    (["--likelihood", "cb", "--decoder-sigma", "learned"], "--decoder-sigma needs --likelihood gaussian"),
    (["--prior-components", "5"], "--prior-components needs --prior mog or vamp"),
    (["--likelihoods", "gaussian"], "'gaussian' is not bernoulli, gaussian:SIGMA"),
    (["--likelihoods", "cb:1"], "'cb:1' is not bernoulli"), (["--likelihoods", "gaussian:0"], "got '0'"),
    (["--likelihoods", "cb", "--betas", "1"], "--betas and --likelihoods do not go together"),
    (["--analyze", "m.npz", "--likelihood", "cb"], "--analyze and --likelihood do not go together"),
    (["--betas", "0", "-1"], "--betas: must be >= 0 and finite, got -1.0"), (["--betas", "1", "1"], "repeats a value"),
    (["--likelihoods", "cb", "cb"], "--likelihoods repeats a value"),
])
def test_options_that_cannot_work_are_refused_in_one_line(capsys, no_work, flags, message):
    assert message in one_line_error(capsys, *flags, code=2)


@pytest.mark.parametrize("flags, message", [
    (["--kl-warmup", "3", "--epochs", "2"], "--kl-warmup 3 is longer than the 2 epochs"),
    (["--kl-warmup", "11"], "--kl-warmup 11 is longer than the 10 epochs"),
])
def test_a_warm_up_longer_than_the_run_is_refused_before_any_work(tmp_path, data_dir, capsys, no_work, flags,
                                                                  message):
    assert message in one_line_error(capsys, "--data-dir", data_dir, *flags, "--out", str(tmp_path / "r"))


@pytest.mark.parametrize("flags, message", [
    (["--gmm-components", "601"], "--gmm-components 601 is out of range: the mixture is fitted to 600 codes"),
    (["--batch-size", "601"], "--batch-size 601 is out of range: the training set has 600 images"),
    (["--posterior-image", "200"], "--posterior-image 200 is out of range: the test set has 200 images"),
    (["--prior", "vamp", "--prior-components", "601"], "--prior-components 601 is out of range"),
])
def test_options_too_large_for_the_data_are_refused_before_training(tmp_path, data_dir, capsys, monkeypatch, flags,
                                                                    message):
    monkeypatch.setattr(train, "train_epoch", lambda *a: pytest.fail("trained before checking the options"))
    assert message in one_line_error(capsys, "--data-dir", data_dir, *flags, "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_data_dir_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "archives").write_text("not a folder")
    assert "is a file, not a folder" in one_line_error(capsys, "--data-dir", str(tmp_path / "archives"))


def test_resuming_a_text_file_says_it_is_not_a_model_file(tmp_path, data_dir, capsys, no_work):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", str(tmp_path / "notes.txt"))
    assert "not an .npz archive" in err and "pickle" not in err


def test_resume_says_what_it_will_train_and_keeps_the_epoch_target(finished_run, data_dir, capsys, no_work):
    model_bytes = (finished_run / "model.npz").read_bytes()
    ckpt = str(finished_run / "checkpoint.npz")         # trained with --epochs 2
    assert run_cli("--data-dir", data_dir, "--resume", ckpt) == 0
    assert "already at epoch 2 of 2: nothing to train" in capsys.readouterr().out
    assert run_cli("--data-dir", data_dir, "--resume", ckpt, "--epochs", "2") == 0
    assert "nothing to train" in capsys.readouterr().out
    assert "is at epoch 2: --epochs 1 would train nothing" in one_line_error(capsys, "--data-dir", data_dir, "--resume",
                                                                            ckpt, "--epochs", "1")
    assert (finished_run / "model.npz").read_bytes() == model_bytes


def test_resume_of_an_interrupted_run_trains_on_to_its_own_target(tmp_path, data_dir, capsys, monkeypatch,
                                                                 no_figures):
    def interrupt_in_epoch_1(state, n_steps, seen):
        if state["step"] == 3:
            signal.raise_signal(signal.SIGINT)
    real_progress = console.TrainingProgress
    monkeypatch.setattr(console, "TrainingProgress", lambda: interrupt_in_epoch_1)
    out = tmp_path / "cut"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    monkeypatch.setattr(console, "TrainingProgress", real_progress)
    capsys.readouterr()
    assert run_cli("--data-dir", data_dir, "--resume", str(out / "checkpoint.npz"), "--iw-samples", "2") == 0
    assert "training epochs 1-2 (epoch 1 from step 4)" in capsys.readouterr().out
    assert len(json.loads((out / "metrics.json").read_text())["train_loss"]) == 2      # 2, not the default 10


@pytest.mark.parametrize("platform, maxrss, mb", [("linux", 125 * 1024, 125), ("darwin", 125 * 2 ** 20, 125)])
def test_peak_memory_is_reported_in_megabytes_on_each_platform(monkeypatch, platform, maxrss, mb):
    import types
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(sys, "platform", platform)
    assert speed.peak_memory_mb() == pytest.approx(mb)


def test_peak_memory_without_resource_is_none_or_windows_own_count(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource fails, as on Windows
    monkeypatch.setattr(os, "name", "posix")
    assert speed.peak_memory_mb() is None


# ---- the likelihoods on the command line ----------------------------------------------------------------------

def test_a_checkpoint_of_another_likelihood_is_refused(finished_run, data_dir, capsys, no_work):
    err = one_line_error(capsys, "--data-dir", data_dir, "--resume", str(finished_run / "checkpoint.npz"),
                         "--likelihood", "gaussian", "--decoder-sigma", "0.5")
    assert "another architecture" in err and "--likelihood bernoulli" in err


def test_a_model_file_from_before_the_likelihoods_loads_as_bernoulli(tmp_path):
    model, x, eps = small_vae_batch()
    runs.save_model(model, str(tmp_path / "m.npz"))
    with np.load(tmp_path / "m.npz") as f:
        old = {k: f[k] for k in f.files if k not in ("likelihood", "decoder_sigma")}
    np.savez(tmp_path / "old.npz", **old)
    loaded = runs.load_model(str(tmp_path / "old.npz"))[0]
    assert loaded.likelihood.name == "bernoulli" and loaded.forward(x, eps) == model.forward(x, eps)


@pytest.fixture(scope="module")
def likelihood_experiment(tmp_path_factory, data_dir):
    """The likelihood experiment with a learned-sigma Gaussian and the continuous Bernoulli, one epoch each."""
    out = tmp_path_factory.mktemp("runs") / "likelihoods"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "1", "--likelihoods", "gaussian:learned", "cb",
                   "--out", str(out)) == 0
    return out


def test_the_likelihood_experiment_trains_one_run_per_likelihood_and_compares_them(likelihood_experiment):
    rows = json.loads((likelihood_experiment / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["gaussian, sigma learned", "cb"]
    assert [r["likelihood"] for r in rows] == ["gaussian", "cb"]
    for row, folder in zip(rows, ("gaussian-sigma-learned", "cb")):
        m = json.loads((likelihood_experiment / folder / "metrics.json").read_text())
        assert row["negative_elbo"] == m["test_loss"] and 0 < row["bits_per_dim"] < 1e3, row
        assert (likelihood_experiment / folder / "samples_mean_and_draw.png").stat().st_size > 0
    sigma = float(np.exp(runs.load_model(str(likelihood_experiment / "gaussian-sigma-learned" / "model.npz"))[0]
                         .params()["likelihood.log_sigma"][0]))
    assert rows[0]["decoder_sigma"] == pytest.approx(sigma) and sigma < 1      # learned: down from its start at 1
    assert rows[1]["decoder_sigma"] is None and all(len(r["pulls_on_mu"]) == 2 for r in rows)
    assert (likelihood_experiment / "likelihood_samples.png").stat().st_size > 0


def test_the_bits_per_dimension_bound_uses_dequantized_pixels(monkeypatch):
    # With q(z|x) the true posterior, -log p(x) is exact for every S, so the bound is E_u[-log p((pixel + u)/256)]
    # + D log 256 in bits per dimension: check it against a direct computation with the same draws.
    model, _, _ = small_vae_batch(likelihood="cb")
    model.decoder.layers[0].params["W"][...] = 0        # p(x|z) = p(x): the true posterior is the prior N(0, I),
    for p in model.encoder.layers[-1].params.values():  # and q(z|x) is made N(0, I) too
        p[...] = 0
    pixels = np.random.default_rng(25).integers(0, 256, (30, 12)).astype(np.uint8)
    found = {"bits_per_dim": analysis.bits_per_dim(model, pixels, 3, np.random.default_rng(26))}
    u = np.random.default_rng(26).random(pixels.shape)
    logits = model.decode(np.zeros((1, 3)))
    nll = likelihoods.cb_nll_forward(np.broadcast_to(logits, pixels.shape), (pixels + u) / 256)[0]
    assert found["bits_per_dim"] == pytest.approx((nll.mean() + 12 * math.log(256)) / (12 * math.log(2)), rel=1e-6)


def test_the_floor_script_reports_the_sum_of_its_timed_parts_as_the_epoch():
    # benchmarks/floor.py is the lower bound the docs compare train.py and PyTorch with: its epoch must be the
    # step's three parts added, times the steps of an epoch (ceil(N / B)), and its bound's floor positive.
    root = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "floor.py"), "--n-train", "1000",
                           "--batch-size", "128", "--iw-samples", "2", "--n-test", "5000", "--reps", "3"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    parts = result["step_ms"]
    assert all(parts[k] > 0 for k in ("products", "adam", "exp_log")) and result["iw_nll_floor_s"] > 0
    assert result["epoch_s_median"] == pytest.approx(sum(parts.values()) / 1e3 * 8, rel=1e-12)     # 8 steps
