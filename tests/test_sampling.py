"""Sampling: the reconstruction and the posterior's draws, every prior's draws and the fitted
mixture's, and the draws of each likelihood p(x|z), against their means, spreads and covariances."""
import numpy as np
import pytest

from lab.gmm import gmm_sample

from conftest import small_vae_batch


def weights(layer):
    """A Linear layer's W and b."""
    return layer.params["W"], layer.params["b"]


def test_reconstruct_is_the_decoded_posterior_mean_written_out():
    model, x, _ = small_vae_batch()
    W1, b1 = weights(model.encoder.layers[0])
    W2, b2 = weights(model.encoder.layers[2])
    W3, b3 = weights(model.decoder.layers[0])
    W4, b4 = weights(model.decoder.layers[2])
    mu = (np.maximum(x @ W1 + b1, 0) @ W2 + b2)[:, :model.latent]
    want = 1 / (1 + np.exp(-(np.maximum(mu @ W3 + b3, 0) @ W4 + b4)))
    np.testing.assert_allclose(model.reconstruct(x), want, rtol=1e-12)


class RecordingDecoder:
    """Stands in for the decoder: records every z it is given and returns the logit 0.3 for each of
    2 pixels."""
    def forward(self, z):
        self.z = z.copy()
        return np.full((len(z), 2), 0.3)


def test_posterior_samples_are_drawn_from_n_mu_sigma_squared():
    model, x, _ = small_vae_batch(batch=2)
    mu, log_var = model.encode(x)
    model.decoder = RecordingDecoder()
    images = model.sample_posterior(x, 50_000, np.random.default_rng(9))
    assert images.shape == (2, 50_000, 2)
    assert np.allclose(images, 1 / (1 + np.exp(-0.3)))
    z = model.decoder.z.reshape(50_000, 2, model.latent)            # draws for image 0 and image 1
    np.testing.assert_allclose(z.mean(0), mu, atol=0.03)
    np.testing.assert_allclose(z.std(0), np.exp(0.5 * log_var), rtol=0.02)   # sigma, not sigma^2


# ---- the priors' draws and the fitted mixture's --------------------------------------------------

def mixture_moments(pi, means, variances):
    """The mean and covariance of a mixture of diagonal Gaussians: weights pi (K,), means and
    variances (K, Z)."""
    mean = pi @ means
    second_moment = 0
    for k in range(len(pi)):
        component = np.diag(variances[k]) + np.outer(means[k], means[k])   # E[z z^T] of component k
        second_moment = second_moment + pi[k] * component
    return mean, second_moment - np.outer(mean, mean)


def assert_samples_follow_the_mixture(z, pi, means, variances):
    """Each draw belongs to the nearest of well-separated means: the share, mean and spread per
    component."""
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
    z = model.sample_z(200_000, np.random.default_rng(11))
    assert_samples_follow_the_mixture(z, pi, p["means"], np.exp(p["log_vars"]))


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
    full = np.array([[[1.0, 0.5], [0.5, 1.0]],
                     [[0.2, 0.0], [0.0, 0.4]],
                     [[2.0, -0.3], [-0.3, 0.5]]])
    variances = np.diagonal(full, axis1=1, axis2=2)
    covs = full if covariance == "full" else variances.copy()
    pi = np.array([0.2, 0.5, 0.3])
    mixture = {"log_pi": np.log(pi), "means": means, "covs": covs}
    z = gmm_sample(mixture, 200_000, np.random.default_rng(13))
    assert_samples_follow_the_mixture(z, pi, means, variances)
    if covariance == "full":
        k = ((z[:, None, :] - means) ** 2).sum(-1).argmin(1)
        np.testing.assert_allclose(np.cov(z[k == 0].T), full[0], atol=0.03)   # the correlation too


# ---- the likelihoods' draws ----------------------------------------------------------------------

@pytest.mark.parametrize("likelihood, sigma", [("bernoulli", None), ("gaussian", 0.2),
                                               ("cb", None)])
def test_samples_of_p_x_given_z_have_the_likelihoods_mean_and_spread(likelihood, sigma):
    model, _, _ = small_vae_batch(likelihood=likelihood, decoder_sigma=sigma)
    logits = np.tile(np.array([[-3.0, -0.5, 0.0, 1e-3, 0.7, 4.0]]), (100_000, 1))
    x = model.likelihood.sample(logits, np.random.default_rng(24))
    np.testing.assert_allclose(x.mean(0), model.likelihood.mean(logits[0]), atol=0.006)
    if likelihood == "gaussian":
        np.testing.assert_allclose(x.std(0), 0.2, rtol=0.01)
    if likelihood == "cb":                              # on [0, 1], CDF (e^(l x) - 1) / (e^l - 1)
        assert x.min() >= 0 and x.max() <= 1
        l = logits[0, 5]
        below_half = np.expm1(l * 0.5) / np.expm1(l)
        assert np.mean(x[:, 5] < 0.5) == pytest.approx(below_half, abs=0.005)
    if likelihood == "bernoulli":
        assert set(np.unique(x)) == {0.0, 1.0}
