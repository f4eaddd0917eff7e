"""The standard VAE's gradient suite, in the reading order of vae.py and autograd.py: the layers'
backward passes, the checker itself, each loss piece's backward, then the whole objective, all
against central finite differences in float64; then what the backward through z = mu + sigma * eps
means. It imports vae.py and autograd.py only, and stands alone: copied with them into an empty
folder, `python -m pytest -q test_vae.py` runs it. The variations' gradients (other priors and
likelihoods, every KL weight) are checked in tests/test_variation_gradients.py, the rest by subject
in tests/."""
import numpy as np
import pytest

import vae
from autograd import MLP, Linear, ReLU, Tanh, grad_check


def small_vae_batch(seed=3, n_in=12, hidden=7, latent=3, batch=5):
    """A float64 VAE (by default 12 pixels, 7 hidden units, 3 latents), a batch x of intensities in
    [0, 1], as the images are, and its eps: what every test of the whole objective starts from."""
    model = vae.VAE(n_in, hidden, latent, seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, n_in))
    eps = rng.standard_normal((batch, latent))
    return model, x, eps


def assert_grads_close(errors, tol):
    """Fail, naming every parameter and its relative error, unless each error is below tol."""
    bad = {k: e for k, e in errors.items() if not e < tol}
    listed = ", ".join(f"{k}={e:.2e}" for k, e in bad.items())
    assert not bad, f"relative error above {tol}: {listed}"


# ---- the layers and the checker ------------------------------------------------------------------

def test_linear_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    layer = Linear(5, 3, rng, dtype=np.float64)
    x = rng.standard_normal((4, 5))
    r = rng.standard_normal((4, 3))
    def loss():
        return float((layer.forward(x) * r).sum())      # L = sum(y * r), so dL/dy = r
    layer.forward(x)
    dx = layer.backward(r.copy())
    errors = grad_check(loss, {**layer.params, "x": x}, {**layer.grads, "x": dx})
    assert_grads_close(errors, 1e-8)


def test_relu_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    x[np.abs(x) < 1e-3] = 0.5                           # keep away from the kink at 0
    r = rng.standard_normal((4, 6))
    relu = ReLU()
    def loss():
        return float((relu.forward(x.copy()) * r).sum())
    relu.forward(x.copy())
    dx = relu.backward(r.copy())
    assert_grads_close(grad_check(loss, {"x": x}, {"x": dx}), 1e-8)


def test_tanh_backward_matches_finite_differences():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6)) * 2
    r = rng.standard_normal((4, 6))
    tanh = Tanh()
    def loss():
        return float((tanh.forward(x.copy()) * r).sum())
    tanh.forward(x.copy())
    dx = tanh.backward(r.copy())
    assert_grads_close(grad_check(loss, {"x": x}, {"x": dx}), 1e-8)


@pytest.mark.parametrize("activation", [ReLU, Tanh])
def test_mlp_backward_matches_finite_differences(activation):
    rng = np.random.default_rng(2)
    mlp = MLP([5, 7, 6, 3], rng, dtype=np.float64, activation=activation)
    x = rng.standard_normal((4, 5))
    r = rng.standard_normal((4, 3))
    def loss():
        return float((mlp.forward(x) * r).sum())
    mlp.forward(x)
    dx = mlp.backward(r.copy())
    params = {**mlp.named("params", "mlp"), "x": x}
    grads = {**mlp.named("grads", "mlp"), "x": dx}
    assert_grads_close(grad_check(loss, params, grads), 1e-6)


def test_grad_check_reports_a_relative_error_near_one_for_a_wrong_gradient():
    # The negative control: a checker that passed wrong gradients would make every check above
    # meaningless.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 5))
    r = rng.standard_normal((4, 5))
    def loss():
        return float((x * x * r).sum())                 # dL/dx = 2 x r
    right = 2 * x * r
    assert grad_check(loss, {"x": x}, {"x": right})["x"] < 1e-8
    flipped_sign = grad_check(loss, {"x": x}, {"x": -right})["x"]
    assert flipped_sign == pytest.approx(1.0)
    dropped_factor_2 = grad_check(loss, {"x": x}, {"x": x * r})["x"]
    assert dropped_factor_2 == pytest.approx(1 / 3)
    zero = grad_check(loss, {"x": x}, {"x": np.zeros_like(x)})["x"]
    assert zero == pytest.approx(1.0)


# ---- each loss piece alone -----------------------------------------------------------------------

def check_piece(forward, backward, inputs, seed=4):
    """Grad-check a forward/backward pair alone: L = sum_b dout_b * out_b for a random dout (B,).
    backward(dout, cache) returns {input name: gradient} for the inputs it differentiates."""
    batch = len(next(iter(inputs.values())))
    dout = np.random.default_rng(seed).uniform(0.5, 1.5, batch)
    _, cache = forward(**inputs)
    grads = backward(dout, cache)
    def loss():
        out, _ = forward(**inputs)
        return float((dout * out).sum())
    return grad_check(loss, {k: inputs[k] for k in grads}, grads)


def test_bernoulli_nll_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    inputs = {"logits": rng.standard_normal((6, 9)) * 3, "x": rng.uniform(0, 1, (6, 9))}
    def backward(dnll, cache):
        return {"logits": vae.bernoulli_nll_backward(dnll, cache)}
    assert_grads_close(check_piece(vae.bernoulli_nll_forward, backward, inputs), 1e-7)


def test_reparameterize_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    mu = rng.standard_normal((6, 3))
    log_var = rng.uniform(-2, 1, (6, 3))
    eps = rng.standard_normal((6, 3))
    r = rng.standard_normal((6, 3))                     # z is (B, Z): reduce it with a random r
    _, cache = vae.reparameterize_forward(mu, log_var, eps)
    dmu, dlog_var = vae.reparameterize_backward(r, cache)
    def loss():
        z, _ = vae.reparameterize_forward(mu, log_var, eps)
        return float((z * r).sum())
    errors = grad_check(loss, {"mu": mu, "log_var": log_var}, {"mu": dmu, "log_var": dlog_var})
    assert_grads_close(errors, 1e-7)


def test_kl_normal_backward_matches_finite_differences():
    rng = np.random.default_rng(7)
    inputs = {"mu": rng.standard_normal((6, 3)), "log_var": rng.uniform(-2, 1, (6, 3))}
    def backward(dkl, cache):
        dmu, dlog_var = vae.kl_normal_backward(dkl, cache)
        return {"mu": dmu, "log_var": dlog_var}
    assert_grads_close(check_piece(vae.kl_normal_forward, backward, inputs), 1e-7)


# ---- the whole objective -------------------------------------------------------------------------

NETWORK_PARAMS = {"enc.0.W", "enc.0.b", "enc.2.W", "enc.2.b",
                  "dec.0.W", "dec.0.b", "dec.2.W", "dec.2.b"}


def objective_errors(model, x, eps, beta, h=1e-5):
    """grad_check of the objective recon + beta * KL at (x, eps) for every parameter of the model,
    against the gradient of one backward(beta). The differences are of (recon - recon0) + beta (kl
    - kl0): L less its value at p, the same gradient without the rounding of adding recon's nats
    (both subtractions are exact, Sterbenz), which matters near the checker's floor: a central
    difference errs by a few ulp(L) / 2h ~ 1e-10 from rounding alone."""
    _, recon0, kl0 = model.forward(x, eps)
    model.backward(beta)
    analytic = {k: g.copy() for k, g in model.grads().items()}

    def objective():
        _, recon, kl = model.forward(x, eps)
        return (recon - recon0) + beta * (kl - kl0)

    return grad_check(objective, model.params(), analytic, h=h)


@pytest.mark.parametrize("beta", [1.0, 0.3, 2.5])
def test_objective_backward_matches_finite_differences_for_every_parameter(beta):
    # The objective is recon + beta * KL; beta = 1 is the negative ELBO. A beta applied to the
    # reconstruction path, or missing from one KL path, fails here for beta != 1. At seed 280
    # every ReLU input of the batch is at least 2.7e-3 from its kink, which a step of h = 1e-5
    # cannot cross.
    model, x, eps = small_vae_batch(seed=280)
    errors = objective_errors(model, x, eps, beta)
    assert set(errors) == NETWORK_PARAMS
    assert_grads_close(errors, 1e-6)


# ---- what the backward through z = mu + sigma * eps means ----------------------------------------

class FixedEncoder:
    """Stands in for the encoder: every row gets the same (mu, log_var); backward records what
    arrives."""
    def __init__(self, mu, log_var):
        self.h = np.concatenate([mu, log_var])

    def forward(self, x):
        return np.tile(self.h, (len(x), 1))

    def backward(self, dy, need_dx=True):               # need_dx: the MLP's interface, unused here
        self.dy = dy


class SquareDecoder:
    """Stands in for the decoder so that the reconstruction's gradient is that of f(z) = sum(z^2):
    backward hands back df/dz = 2z (per example, /B for the batch mean) instead of the decoder's."""
    def forward(self, z):
        self.z = z
        return np.zeros((len(z), 1))

    def backward(self, dlogits):
        return 2 * self.z / len(self.z)


def vae_with_stand_ins(mu, log_var):
    """A VAE whose encoder outputs (mu, log_var) for every x, and whose decoder is f(z) = sum(z^2)
    as far as the gradient goes."""
    model = vae.VAE(1, 1, 2, dtype=np.float64)
    model.encoder = FixedEncoder(mu, log_var)
    model.decoder = SquareDecoder()
    return model


def test_reparameterized_gradient_of_expectation_matches_analytic_value():
    # E_q[sum z^2] = sum(mu^2 + sigma^2), so d/dmu = 2 mu, d/dlog_var = sigma^2. The KL adds mu and
    # (sigma^2 - 1) / 2. VAE.backward's own lines, averaged over many eps, must give these.
    rng = np.random.default_rng(5)
    mu = np.array([0.7, -1.2])
    log_var = np.array([0.4, -0.9])
    sigma2 = np.exp(log_var)
    model = vae_with_stand_ins(mu, log_var)
    n = 400_000
    model.forward(np.zeros((n, 1)), rng.standard_normal((n, 2)))
    model.backward()
    dmu = model.encoder.dy[:, :2].sum(0)                # the sum of per-example gradients / n
    dlog_var = model.encoder.dy[:, 2:].sum(0)
    np.testing.assert_allclose(dmu, 2 * mu + mu, atol=0.02)
    np.testing.assert_allclose(dlog_var, sigma2 + 0.5 * (sigma2 - 1), atol=0.02)


def test_the_gradient_paths_add_up_to_what_reaches_the_encoder():
    rng = np.random.default_rng(18)
    mu = np.array([0.7, -1.2])
    log_var = np.array([0.4, -0.9])
    model = vae_with_stand_ins(mu, log_var)
    eps = rng.standard_normal((6, 2))
    model.forward(np.zeros((6, 1)), eps)
    model.backward(0.4)
    p = model.paths
    B = 6
    np.testing.assert_allclose(p["recon_mu"] + p["kl_mu"], model.encoder.dy[:, :2])
    np.testing.assert_allclose(p["recon_log_var"] + p["kl_log_var"], model.encoder.dy[:, 2:])
    np.testing.assert_allclose(p["kl_mu"] * B, np.tile(0.4 * mu, (6, 1)))      # beta * mu
    kl_log_var = 0.4 * (np.exp(log_var) - 1) / 2                                # beta (s^2 - 1) / 2
    np.testing.assert_allclose(p["kl_log_var"] * B, np.tile(kl_log_var, (6, 1)))
    z = mu + np.exp(0.5 * log_var) * eps
    np.testing.assert_allclose(p["recon_mu"] * B, 2 * z)                        # df/dz, f = sum z^2
    np.testing.assert_allclose(p["recon_log_var"] * B, 2 * z * eps * np.exp(0.5 * log_var) / 2)
