"""The objective's value, against computations written out here: its reconstruction and KL parts,
each learned prior's KL and log p(z), and its stability where the sigmoid saturates."""
import numpy as np
import pytest

from conftest import direct_log_normal, small_vae_batch


def test_loss_is_a_deterministic_function_of_params_x_and_eps():
    model, x, eps = small_vae_batch(prior="mog")
    assert model.forward(x, eps) == model.forward(x, eps)
    loss, _, _ = model.forward(x, eps)
    moved, _, _ = model.forward(x, eps + 0.1)
    assert loss != moved


def test_loss_parts_match_a_direct_computation():
    model, x, eps = small_vae_batch()
    loss, recon, kl = model.forward(x, eps)
    mu, log_var = model.encode(x)
    p = 1 / (1 + np.exp(-model.decode(mu + np.exp(0.5 * log_var) * eps)))
    direct_recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1).mean()
    direct_kl = 0.5 * (mu ** 2 + np.exp(log_var) - 1 - log_var).sum(1).mean()
    assert recon == pytest.approx(direct_recon, rel=1e-12)
    assert kl == pytest.approx(direct_kl, rel=1e-12)
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
    components = [pi[k] * np.exp(direct_log_normal(z, p["means"][k], np.exp(p["log_vars"][k])))
                  for k in range(4)]
    density = sum(components)
    log_q = direct_log_normal(z, mu, np.exp(log_var))
    assert kl == pytest.approx((log_q - np.log(density)).mean(), rel=1e-10)


def test_vamp_prior_is_the_mean_of_the_pseudo_inputs_posteriors():
    model, _, _ = small_vae_batch(prior="vamp")
    z = np.random.default_rng(1).standard_normal((7, 3))
    mu_u, log_var_u = model.encode(model.pseudo_inputs())
    densities = [np.exp(direct_log_normal(z, m, np.exp(lv))) for m, lv in zip(mu_u, log_var_u)]
    direct = np.log(np.mean(densities, 0))
    np.testing.assert_allclose(model.log_prior(z), direct, rtol=1e-10)


def test_reconstruction_loss_is_stable_for_huge_logits():
    model, x, eps = small_vae_batch()
    model.decoder.layers[-1].params["b"][:] = 1e4       # sigmoid saturates: log(sigmoid) is -inf
    loss, recon, _ = model.forward(x, eps)
    assert np.isfinite(loss)
    assert recon > 1e4
