"""The variations' gradients, as test_vae.py checks the standard VAE's: each piece that priors.py
and likelihoods.py add (the KL to a mixture, the Gaussians, the continuous Bernoulli), alone, then
the whole objective for every prior x likelihood x KL weight, all against central finite
differences in float64."""
import numpy as np
import pytest

import likelihoods
import priors
from autograd import grad_check
from test_vae import NETWORK_PARAMS, assert_grads_close, check_piece, objective_errors

from conftest import small_vae_batch


# ---- each piece alone ----------------------------------------------------------------------------

def test_kl_mixture_backward_matches_finite_differences():
    rng = np.random.default_rng(8)
    inputs = {"z": rng.standard_normal((6, 3)), "log_var": rng.uniform(-2, 1, (6, 3)),
              "means": rng.standard_normal((4, 3)), "log_vars": rng.uniform(-1, 1, (4, 3)),
              "log_pi": np.log(rng.dirichlet(np.ones(4)))}
    eps = rng.standard_normal((6, 3))
    def forward(z, log_var, means, log_vars, log_pi):  # eps is held fixed: it is not differentiated
        return priors.kl_mixture_forward(z, eps, log_var, means, log_vars, log_pi)
    def backward(dkl, cache):
        dz, dlog_var, dmeans, dlog_vars, dlog_pi = priors.kl_mixture_backward(dkl, cache)
        return {"z": dz, "log_var": dlog_var, "means": dmeans, "log_vars": dlog_vars,
                "log_pi": dlog_pi}
    assert_grads_close(check_piece(forward, backward, inputs), 1e-7)


def test_gaussian_nll_backward_matches_finite_differences():
    rng = np.random.default_rng(22)
    logits = rng.standard_normal((6, 9)) * 2
    x = rng.uniform(0, 1, (6, 9))
    log_sigma = np.array([-1.3])
    dnll = rng.uniform(0.5, 1.5, 6)
    _, cache = likelihoods.gaussian_nll_forward(logits, x, log_sigma)
    dlogits, dlog_sigma = likelihoods.gaussian_nll_backward(dnll, cache)
    def loss():
        nll, _ = likelihoods.gaussian_nll_forward(logits, x, log_sigma)
        return float((dnll * nll).sum())
    errors = grad_check(loss, {"logits": logits, "log_sigma": log_sigma},
                        {"logits": dlogits, "log_sigma": np.array([dlog_sigma])})
    assert_grads_close(errors, 1e-7)


def test_optimal_sigma_needs_no_gradient_path_of_its_own():
    # The envelope theorem: with sigma* recomputed from the logits at every difference, the batch
    # mean's gradient equals the backward's, which holds sigma* fixed, only because sigma* is the
    # minimiser (a sigma* without its square root, log sigma = log MSE, fails by ~1e-1).
    rng = np.random.default_rng(24)
    logits = rng.standard_normal((6, 9)) * 2
    x = rng.uniform(0, 1, (6, 9))
    dnll = np.full(6, 1 / 6)                            # the batch mean
    log_sigma = likelihoods.optimal_log_sigma(logits, x)
    _, cache = likelihoods.gaussian_nll_forward(logits, x, log_sigma)
    dlogits, _ = likelihoods.gaussian_nll_backward(dnll, cache)
    def loss():
        sigma_star = likelihoods.optimal_log_sigma(logits, x)
        nll, _ = likelihoods.gaussian_nll_forward(logits, x, sigma_star)
        return float(nll.mean())
    assert_grads_close(grad_check(loss, {"logits": logits}, {"logits": dlogits}), 1e-7)


def test_per_pixel_gaussian_nll_backward_matches_finite_differences():
    # the decoder's 2 x D outputs: 9 logits of the means, then 9 log sigmas
    rng = np.random.default_rng(25)
    outputs = np.concatenate([rng.standard_normal((6, 9)) * 2, rng.uniform(-2, 1, (6, 9))], 1)
    inputs = {"outputs": outputs, "x": rng.uniform(0, 1, (6, 9))}
    def backward(dnll, cache):
        return {"outputs": likelihoods.pixel_gaussian_nll_backward(dnll, cache)}
    errors = check_piece(likelihoods.pixel_gaussian_nll_forward, backward, inputs)
    assert_grads_close(errors, 1e-7)


def test_continuous_bernoulli_nll_backward_matches_finite_differences():
    rng = np.random.default_rng(23)
    logits = rng.standard_normal((6, 9)) * 3
    logits[0, :4] = [0.0, 1e-3, -0.15, 0.25]            # either side of the switch at |l| = 0.2
    inputs = {"logits": logits, "x": rng.uniform(0, 1, (6, 9))}
    def backward(dnll, cache):
        return {"logits": likelihoods.cb_nll_backward(dnll, cache)}
    assert_grads_close(check_piece(likelihoods.cb_nll_forward, backward, inputs), 1e-7)


# ---- the whole objective -------------------------------------------------------------------------

MOG_PARAMS = {"prior.means", "prior.log_vars", "prior.log_weights"}
LIKELIHOOD_CASES = [("bernoulli", None, set()), ("gaussian", 0.3, set()),
                    ("gaussian", "learned", {"likelihood.log_sigma"}),
                    ("gaussian", "optimal", set()), ("gaussian", "per-pixel", set()),
                    ("cb", None, set())]


@pytest.mark.parametrize("beta", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("prior, prior_params", [("standard", set()), ("mog", MOG_PARAMS),
                                                  ("vamp", {"prior.w"})])
@pytest.mark.parametrize("likelihood, sigma, likelihood_params", LIKELIHOOD_CASES)
def test_objective_backward_matches_finite_differences_for_every_parameter(
        prior, prior_params, beta, likelihood, sigma, likelihood_params):
    # The objective is recon + beta * KL; beta = 1 is the negative ELBO. A beta applied to the
    # reconstruction path, or missing from one KL path, fails here for beta != 1; so does any
    # likelihood's wrong dL/dlogits.
    # The check works near its floor: a central difference errs by a few ulp(L) / 2h ~ 1e-10 from
    # rounding alone, so an entry with |dL/dp| < 1e-4 can miss 1e-6 (at seed 3, prior.w[2, 6] =
    # -2.6e-5 did, at 1.07e-6, on NumPy 1.24, whose exp and log round differently). Hence:
    # (1) the differences are of (recon - recon0) + beta (kl - kl0) (test_vae.objective_errors): the
    #     same gradient, without the rounding of adding the 8.5 nats of recon (both subtractions
    #     are exact, Sterbenz);
    # (2) seed 280, at which every check stays below 5e-7 on NumPy 1.24 and 2.x with x and eps
    #     moved by +-1 ulp (another platform's rounding), and every ReLU input of the batch and the
    #     pseudo-inputs is at least 2.7e-3 from its kink (a step of h moves one by <= 1e-5);
    # (3) six pseudo-input pixels outside [0, 1], whose gradient must be exactly 0: a dropped clip
    #     mask fails here too.
    model, x, eps = small_vae_batch(seed=280, prior=prior, likelihood=likelihood,
                                    decoder_sigma=sigma)
    if prior == "vamp":
        model.prior["w"][0, :3] = -0.3
        model.prior["w"][1, :3] = 1.4
    if sigma == "learned":
        model.likelihood.params["log_sigma"][...] = -0.7
    # (4) the per-pixel Gaussian sums larger terms (exp(-2 s) of 12 more outputs): at h = 1e-5
    #     its rounding, ~2.5e-10, is 2e-6 of its smallest gradient here; at h = 1e-4 that is ten
    #     times less, and the truncation (~h^2) keeps every check below 5e-7 on both NumPys.
    h = 1e-5
    if sigma == "per-pixel":
        h = 1e-4
    errors = objective_errors(model, x, eps, beta, h)
    assert set(errors) == NETWORK_PARAMS | prior_params | likelihood_params
    assert_grads_close(errors, 1e-6)


def test_vamp_pseudo_inputs_stay_in_0_1_and_get_no_gradient_where_clipped():
    model, x, eps = small_vae_batch(prior="vamp")
    w = model.prior["w"]
    w[0, :6] = -0.3                                     # pushed outside [0, 1]
    w[1, :6] = 1.4
    model.forward(x, eps)
    model.backward()
    used = model.pseudo_inputs()
    assert used.min() >= 0 and used.max() <= 1
    assert np.all(used[0, :6] == 0) and np.all(used[1, :6] == 1)
    dw = model.prior_grads["w"]
    assert np.all(dw[:2, :6] == 0) and np.any(dw[:2, 6:] != 0)
