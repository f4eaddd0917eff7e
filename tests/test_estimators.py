"""The estimators against exact values: the closed-form KL against Monte Carlo, the test ELBO's
draws, the importance-weighted bound iw_nll against the likelihood where it is known (an exact
posterior, quadrature) and against the ELBO, and bits per dimension."""
import math

import numpy as np
import pytest

import likelihoods
import mnist
import priors
import vae

from lab import analysis

from conftest import direct_log_normal, make_flat_images, quiet, small_vae_batch


def test_kl_closed_form_matches_monte_carlo():
    rng = np.random.default_rng(4)
    mu = np.array([[0.5, -1.0, 2.0]])
    log_var = np.array([[0.3, -0.7, -2.0]])
    kl = vae.kl_normal_forward(mu, log_var)[0][0]
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], z ~ q, 10^6 draws, densities written out here.
    sigma = np.exp(0.5 * log_var)
    z = mu + sigma * rng.standard_normal((1_000_000, 3))
    diff = direct_log_normal(z, mu, sigma ** 2) - direct_log_normal(z, 0.0, 1.0)
    mc = diff.mean()
    se = diff.std() / np.sqrt(len(diff))
    assert abs(kl - mc) < 4 * se, f"closed form {kl:.5f}, Monte Carlo {mc:.5f} +- {se:.5f}"


def test_the_test_elbo_draws_z_from_the_posterior_not_z_equals_mu():
    # The test loss is the negative ELBO, E_q[-log p(x|z)] + KL: its reconstruction term averages
    # over z ~ q(z|x). Decoding z = mu instead (a common slip) gives another number, far outside the
    # Monte Carlo error.
    model, x, _ = small_vae_batch(batch=1)
    model.encoder.layers[-1].params["b"][model.latent:] = 1.0   # sigma = e^0.5: draws far from mu
    for layer in model.decoder.layers[::2]:
        layer.params["W"] *= 3
    images = np.repeat((x * 255).round().astype(np.uint8), 4000, axis=0)
    loss, recon, kl = analysis.negative_elbo(model, images, seed=0)
    xf = mnist.to_float(images[:1], np.float64)
    mu, log_var = model.encode(xf)
    eps = np.random.default_rng(1).standard_normal((20000, model.latent))
    z = mu + np.exp(0.5 * log_var) * eps
    per_draw = -vae.log_bernoulli(xf, model.decode(z))  # -log p(x|z) at independent draws
    expected = per_draw.mean()
    se = per_draw.std() / np.sqrt(len(images))
    at_mu = -vae.log_bernoulli(xf, model.decode(mu))[0]
    assert abs(recon - expected) < 4 * se, (recon, expected, se, at_mu)
    assert abs(at_mu - expected) > 20 * se, (recon, expected, se, at_mu)
    assert kl == pytest.approx(vae.kl_normal_forward(mu, log_var)[0][0])
    assert loss == pytest.approx(recon + kl)


# ---- the importance-weighted bound ---------------------------------------------------------------

def model_whose_posterior_is_exact(prior):
    """The decoder ignores z (its first layer is zero), so the true posterior p(z|x) is the prior;
    the encoder outputs that prior for every x. Then every weight p(x|z) p(z) / q(z|x) equals p(x),
    for every K."""
    model, x, _ = small_vae_batch(prior=prior)
    model.decoder.layers[0].params["W"][...] = 0
    out = model.encoder.layers[-1].params
    out["W"][...] = 0
    if prior == "standard":
        m = np.zeros(3)
        lv = np.zeros(3)
    else:
        m = np.array([0.4, -1.0, 2.0])
        lv = np.log([0.5, 2.0, 1.5])
    if prior == "mog":                                  # K equal components: N(m, exp(lv)) in all
        model.prior["means"][...] = m
        model.prior["log_vars"][...] = lv
        model.prior["log_weights"][...] = [0.3, -2.0, 1.0, 0.0]
    # The VampPrior's components are q(z|u_k) = N(m, exp(lv)).
    out["b"][...] = np.concatenate([m, lv])
    return model, (x * 255).round().astype(np.uint8)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_iw_nll_is_exact_for_every_k_when_the_posterior_is_the_true_posterior(prior):
    model, images = model_whose_posterior_is_exact(prior)
    x = mnist.to_float(images, np.float64)
    logits = model.decode(np.zeros((1, 3)))[0]          # the same for every z
    p = 1 / (1 + np.exp(-logits))
    exact = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)   # -log p(x), written out
    for k in (1, 7, 100):
        got = analysis.iw_nll(model, images, k, np.random.default_rng(k))
        np.testing.assert_allclose(got, exact, rtol=1e-10)


def test_iw_nll_approaches_the_likelihood_computed_by_quadrature():
    # A 1-D latent: -log p(x) = -log int p(x|z) N(z; 0, 1) dz, on a dense grid (trapezoid rule in
    # log space).
    model, x, _ = small_vae_batch(latent=1, batch=4)
    for layer in model.decoder.layers[::2]:
        layer.params["W"] *= 3                          # a decoder that depends on z strongly
    images = (x * 255).round().astype(np.uint8)
    xf = mnist.to_float(images, np.float64)
    grid = np.linspace(-9, 9, 20001)[:, None]
    log_likelihood = vae.log_bernoulli(xf[:, None, :], model.decode(grid)[None])
    log_joint = log_likelihood + direct_log_normal(grid, 0.0, 1.0)
    dz = grid[1, 0] - grid[0, 0]
    exact = -(priors.logsumexp(log_joint, axis=1) + np.log(dz))
    k_many = analysis.iw_nll(model, np.repeat(images, 10, axis=0), 2000, np.random.default_rng(1))
    per_image = k_many.reshape(4, 10).mean(1)
    np.testing.assert_allclose(per_image, exact, atol=0.02)                 # 3 standard errors
    k1 = analysis.iw_nll(model, np.repeat(images, 200, axis=0), 1, np.random.default_rng(0))
    # K = 1, the ELBO, is a looser bound (here by ~0.9 nats).
    assert k1.mean() - exact.mean() > 0.3


def test_iw_nll_is_the_same_for_each_image_whatever_the_batching():
    model, x, _ = small_vae_batch(batch=9)
    images = (x * 255).round().astype(np.uint8)
    eps = np.random.default_rng(14).standard_normal((6, 9, 3))
    one_batch = analysis.iw_nll(model, images, 6, None, eps=eps, batch_size=25)
    three_batches = analysis.iw_nll(model, images, 6, None, eps=eps, batch_size=4)   # 4, 4, 1
    np.testing.assert_allclose(one_batch, three_batches, rtol=1e-12)


def test_iw_nll_in_blocks_equals_its_formula_computed_directly():
    # iw_nll decodes ten slices of codes per product and takes the log-density a slice at a time;
    # with S = 700 samples of 30 images (8 samples per slice, 80 per product, the last block short)
    # it must equal -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x), computed for all draws at once.
    model, x, _ = small_vae_batch(batch=30)
    images = (x * 255).round().astype(np.uint8)
    xf = mnist.to_float(images, np.float64)
    s = 700
    eps = np.random.default_rng(15).standard_normal((s, 30, 3))
    got = analysis.iw_nll(model, images, s, None, eps=eps, batch_size=30)
    mu, log_var = model.encode(xf)
    z = mu + np.exp(0.5 * log_var) * eps                                    # (S, B, Z)
    logits = model.decode(z.reshape(-1, 3)).reshape(s, 30, -1)
    log_px = vae.log_bernoulli(xf, logits)                                   # log p(x|z_s)
    log_pz = direct_log_normal(z, 0.0, 1.0)                                 # log p(z_s)
    log_qz = direct_log_normal(z, mu, np.exp(log_var))                      # log q(z_s|x)
    log_w = log_px + log_pz - log_qz
    top = log_w.max(0)
    want = -(top + np.log(np.exp(log_w - top).mean(0)))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_iw_nll_never_exceeds_the_elbo_of_the_same_draws_and_falls_as_k_grows():
    model, x, _ = small_vae_batch(batch=40)
    images = (x * 255).round().astype(np.uint8)
    xf = mnist.to_float(images, np.float64)
    eps = np.random.default_rng(11).standard_normal((1000, len(x), model.latent))
    mu, log_var = model.encode(xf)
    z = mu + np.exp(0.5 * log_var) * eps                                     # (K, B, Z)
    logits = model.decode(z.reshape(-1, 3)).reshape(1000, 40, -1)
    log_p_x_given_z = vae.log_bernoulli(xf, logits)
    log_p_z = direct_log_normal(z, 0.0, 1.0)
    log_q_z = direct_log_normal(z, mu, np.exp(log_var))
    neg_elbo = -(log_p_x_given_z + log_p_z - log_q_z)                       # one per draw
    previous = np.inf
    for k in (1, 10, 100, 1000):
        iw = analysis.iw_nll(model, images, k, None, eps=eps[:k]).mean()
        elbo_k = neg_elbo[:k].mean()
        assert iw <= elbo_k + 1e-9, (k, iw, elbo_k)     # Jensen, for the same draws
        assert iw <= previous + 1e-9, (k, iw, previous)
        previous = iw
    k1 = analysis.iw_nll(model, images, 1, None, eps=eps[:1])
    np.testing.assert_allclose(k1, neg_elbo[0], rtol=1e-12)


def index_of_each_image(model, images, n_samples, rng, progress):
    """Stands in for iw_nll (the same arguments): image i's value is i."""
    return np.arange(len(images), dtype=float)


def test_iw_nll_of_the_test_set_is_the_mean_over_images_not_over_chunks(monkeypatch):
    # Each image weighs the same in the reported value, however the set is cut into batches.
    rng = np.random.default_rng(21)
    x_train = make_flat_images(200, rng)
    x_test = make_flat_images(80, rng)
    monkeypatch.setattr(analysis, "iw_nll", index_of_each_image)
    model = vae.VAE(784, 16, 2, seed=2)
    metrics, _ = analysis.analyze(model, x_train, x_test, 0, 2, 3, "diag", log=quiet)
    assert metrics["iw_nll"] == 39.5


def test_the_bits_per_dimension_bound_uses_dequantized_pixels():
    # With q(z|x) the true posterior, -log p(x) is exact for every S, so the bound is
    # E_u[-log p((pixel + u)/256)] + D log 256 in bits per dimension: check it against a direct
    # computation with the same draws.
    model, _, _ = small_vae_batch(likelihood="cb")
    # p(x|z) = p(x): the true posterior is the prior N(0, I), and q(z|x) is made N(0, I) too.
    model.decoder.layers[0].params["W"][...] = 0
    for p in model.encoder.layers[-1].params.values():
        p[...] = 0
    pixels = np.random.default_rng(25).integers(0, 256, (30, 12)).astype(np.uint8)
    bits_per_dim = analysis.bits_per_dim(model, pixels, 3, np.random.default_rng(26))
    u = np.random.default_rng(26).random(pixels.shape)
    logits = model.decode(np.zeros((1, 3)))
    nll, _ = likelihoods.cb_nll_forward(np.broadcast_to(logits, pixels.shape), (pixels + u) / 256)
    nats = nll.mean() + 12 * math.log(256)              # 12 pixels
    assert bits_per_dim == pytest.approx(nats / (12 * math.log(2)), rel=1e-6)
