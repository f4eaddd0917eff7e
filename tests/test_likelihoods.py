"""The likelihoods p(x|z) beyond their gradients: the Bernoulli log-likelihood exact at any logit,
the continuous Bernoulli's normalizer and density against exact values, and what a fixed-sigma
Gaussian's objective is."""
import decimal
import math

import numpy as np
import pytest

import likelihoods
import vae

from conftest import small_vae_batch


def exact_log_bernoulli(x, logits):
    """sum_j x_j log p_j + (1 - x_j) log(1 - p_j), p_j = sigmoid(l_j), in 50-digit decimals."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        total = decimal.Decimal(0)
        for xj, lj in zip(x, logits):
            p = 1 / (1 + (-decimal.Decimal(float(lj))).exp())
            xj = decimal.Decimal(float(xj))
            total += xj * p.ln() + (1 - xj) * (1 - p).ln()
        return float(total)


def test_log_bernoulli_is_the_bernoulli_log_likelihood_for_any_logit_and_broadcast_x():
    # The textbook form, sum_j x_j log p_j + (1 - x_j) log(1 - p_j), in 50-digit decimals, at logits
    # up to +-80 (where 1 - p underflows in floats), with x broadcast over a leading samples axis as
    # iw_nll does; the inputs stay unchanged.
    rng = np.random.default_rng(17)
    random_logits = rng.standard_normal((3, 2, 5)) * 4
    extreme_logits = np.tile([-80.0, -30.0, 0.0, 30.0, 80.0], (3, 2, 1))
    logits = np.concatenate([random_logits, extreme_logits], axis=-1)
    x = rng.uniform(0, 1, (2, 10)).round(3)             # grey levels, a row per image, 3 samples
    want = np.array([[exact_log_bernoulli(x[b], logits[s, b]) for b in range(2)] for s in range(3)])
    logits_before = logits.copy()
    x_before = x.copy()
    np.testing.assert_allclose(vae.log_bernoulli(x, logits), want, rtol=1e-13)
    np.testing.assert_array_equal(logits, logits_before)
    np.testing.assert_array_equal(x, x_before)
    got32 = vae.log_bernoulli(x.astype(np.float32), logits.astype(np.float32))
    np.testing.assert_allclose(got32, want, rtol=2e-6)


def exact_log_c_and_grad(l):
    """log C(l) = log(l / tanh(l/2)) and its derivative 1/l - 1/sinh(l), with 60 significant digits
    (decimal)."""
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
    exact_log_c = []
    exact_grad = []
    for l in points:
        log_c, grad = exact_log_c_and_grad(float(l))
        exact_log_c.append(log_c)
        exact_grad.append(grad)
    log_c = likelihoods.cb_log_normalizer(points)
    np.testing.assert_allclose(log_c, np.array(exact_log_c).astype(dtype), rtol=rtol)
    got = likelihoods.cb_log_normalizer_grad(points)
    assert got.dtype == dtype
    assert log_c.dtype == dtype
    np.testing.assert_allclose(got, np.array(exact_grad).astype(dtype), rtol=rtol, atol=rtol * 1e-4)


@pytest.mark.parametrize("lam", [0.02, 0.3, 0.5, 0.5 + 1e-7, 0.7, 0.999])
def test_continuous_bernoulli_is_a_density_whose_mean_is_not_lambda(lam):
    # Quadrature on [0, 1] (Gauss-Legendre, 200 nodes): the density integrates to 1, and its mean
    # is lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)), the paper's formula, which is not
    # lambda.
    nodes, weights = np.polynomial.legendre.leggauss(200)
    x = (nodes + 1) / 2
    w = weights / 2
    logit = math.log(lam / (1 - lam))
    nll, _ = likelihoods.cb_nll_forward(np.full((len(x), 1), logit), x[:, None])
    density = np.exp(-nll)
    assert w @ density == pytest.approx(1, abs=1e-10)
    mean = float(likelihoods.cb_mean(np.array([logit]))[0])
    assert w @ (x * density) == pytest.approx(mean, abs=1e-10)
    if abs(lam - 0.5) > 1e-3:
        papers_mean = lam / (2 * lam - 1) + 1 / (2 * math.atanh(1 - 2 * lam))
        assert mean == pytest.approx(papers_mean, rel=1e-9)
        assert abs(mean - lam) > 0.01                   # lambda as the mean: the paper's error


def test_fixed_sigma_gaussian_gradient_is_mse_plus_beta_kl_with_beta_two_sigma_squared():
    # -log N(x; m, s^2) = |x - m|^2 / (2 s^2) + const: its gradient with KL weight 1 is
    # 1 / (2 s^2) times the gradient of |x - m|^2 + 2 s^2 KL. sigma = 1/sqrt(2) makes the
    # reconstruction term the squared error itself.
    for sigma in (1.0, 0.1):
        gaussian, x, eps = small_vae_batch(likelihood="gaussian", decoder_sigma=sigma)
        squared_error, _, _ = small_vae_batch(likelihood="gaussian", decoder_sigma=1 / math.sqrt(2))
        gaussian.forward(x, eps)
        gaussian.backward(beta=1.0)
        squared_error.forward(x, eps)
        squared_error.backward(beta=2 * sigma ** 2)
        for name, g in gaussian.grads().items():
            np.testing.assert_allclose(g * 2 * sigma ** 2, squared_error.grads()[name], rtol=1e-10,
                                       atol=1e-14, err_msg=name)
        mu, log_var = squared_error.encode(x)
        m = vae.sigmoid(squared_error.decode(mu + np.exp(0.5 * log_var) * eps))
        _, recon, _ = squared_error.forward(x, eps)
        log_normalizer = 12 * 0.5 * math.log(math.pi)  # 12 pixels of 0.5 log(2 pi s^2), s^2 = 1/2
        assert recon == pytest.approx(((x - m) ** 2).sum(1).mean() + log_normalizer, rel=1e-12)
