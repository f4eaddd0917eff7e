"""Learned priors: p(z) other than N(0, I), trained with the model, a remedy for the holes.

    MixturePriorVAE ('mog')    p(z) = sum_k pi_k N(z; m_k, diag(s_k^2)), pi = softmax(log_weights)
    VampPriorVAE ('vamp')      p(z) = (1/K) sum_k q(z|u_k), K pseudo-inputs u_k
                               (Tomczak & Welling 2018)

K is the number of the prior's components. Each is vae.VAE with its four prior methods replaced
(kl_forward, kl_backward, sample_z, log_prior) and parameters of its own added; the training step,
VAE.forward and VAE.backward, is the standard one, to which the VampPrior adds a second gradient of
the encoder's weights. A mixture has no closed-form KL, so the KL is estimated at the same sampled z
= mu + sigma * eps as the reconstruction (K&W eq. 6): KL ~ log q(z|x) - log p(z). Its gradient
reaches mu and log_var through z, so here z's path through the reparameterization carries the KL's
gradient too.
"""
import copy
import math

import numpy as np

from vae import VAE, log_normal, reparameterize_backward, reparameterize_forward


# ---- mixtures of Gaussians: their log-density and their draws ------------------------------------

def exp_floored(a, out=None):
    """exp(a) for a <= 0, with a first raised to log(tiny) + 2 (-706.4 in float64, -85.3 in
    float32), tiny the smallest normal number. Below that, exp is subnormal or 0, and the CPU
    computes it on a slow path (docs/experiments.md). Every term so raised is below e^2 tiny of the
    largest term of a sum, which is 1 in logsumexp: no sum of fewer than 1e290 (float32: 1e29) such
    terms changes in its last bit."""
    floor = math.log(np.finfo(a.dtype).tiny) + 2
    raised = np.maximum(a, floor, out=out)          # out=a: in place
    return np.exp(raised, out=raised)


def logsumexp(a, axis, overwrite=False):
    """log sum_i exp(a_i) = m + log sum_i exp(a_i - m), m = max_i a_i: no overflow, no log(0) for
    finite a. overwrite=True: a is scratch, its values lost (no copy of a large a)."""
    m = a.max(axis=axis, keepdims=True)
    scratch = a if overwrite else None
    shifted = np.subtract(a, m, out=scratch)        # a_i - m <= 0
    e = exp_floored(shifted, out=scratch)           # exp(a_i - m), each <= 1
    total = m + np.log(e.sum(axis=axis, keepdims=True))
    return total.squeeze(axis)


def mixture_log_density(z, means, log_vars, log_pi):
    """log p(z) = log sum_k pi_k N(z; m_k, diag(exp(log_vars_k))) per row of z (B, Z), by
    log-sum-exp, and the responsibilities r_bk = pi_k N(z_b; m_k, .) / p(z_b) (each row sums to 1).
    means, log_vars (K, Z); log_pi (K,)."""
    # log pi_k + log N(z_b; m_k, s_k^2), (B, K)
    a = log_pi + log_normal(z[:, None, :], means, log_vars)
    log_p = logsumexp(a, axis=1)
    r = np.exp(a - log_p[:, None])
    return log_p, r


def draw_components(log_pi, n, rng):
    """n component indices k ~ pi, from log-weights log_pi (normalised here, shifted by their max).
    """
    pi = np.exp(log_pi - log_pi.max())
    return rng.choice(len(pi), size=n, p=pi / pi.sum())


def sample_mixture(means, log_vars, log_pi, n, rng):
    """n draws from sum_k pi_k N(m_k, diag(exp(log_vars_k))): a component k ~ pi, then z = m_k + s_k
    eps."""
    k = draw_components(log_pi, n, rng)
    eps = rng.standard_normal((n, means.shape[1]))
    z, _ = reparameterize_forward(means[k], log_vars[k], eps)
    return z


# ---- the KL to a mixture, as a forward/backward pair (vae.py's style) ----------------------------

def kl_mixture_forward(z, eps, log_var, means, log_vars, log_pi):
    """KL(q(z|x) || p(z)) for a mixture prior, per example, estimated at the sampled z = mu + sigma
    * eps: KL ~ log q(z|x) - log p(z) (unbiased over eps). means, log_vars (K, Z), log_pi (K,). log
    q(z|x) = log N(eps; 0, I) - sum_d log sigma_d: the density of eps, divided by the stretch of z =
    g(eps) (K&W Appendix C.2, the Gaussian encoder's log-density, written in eps)."""
    log_p, r = mixture_log_density(z, means, log_vars, log_pi)
    log_q = log_normal(eps, 0.0, np.zeros_like(log_var)) - 0.5 * log_var.sum(-1)
    return log_q - log_p, (z, means, log_vars, r)


def kl_mixture_backward(dkl, cache):
    """Gradients of log q(z|x) - log p(z), as kl_mixture_forward computes it from (z, eps, log_var):
    log q is the density of eps less sum log sigma, so z enters only log p. (Through z = mu + sigma
    * eps, z's route into log q(z|x) would cancel its routes through mu and sigma; writing log q in
    eps makes that explicit.) Returns dz (the prior's pull on z, which the caller sends on through z
    = mu + sigma * eps), dlog_var, and the mixture's dmeans, dlog_vars, dlog_pi. Below, w_bk = dkl_b
    r_bk: the responsibilities, weighted."""
    z, means, log_vars, r = cache
    w = r * dkl[:, None]                            # w_bk = dkl_b r_bk, (B, K)
    diff = z[:, None, :] - means                    # z_b - m_k, (B, K, Z)
    scaled = diff * np.exp(-log_vars)               # (z_b - m_k) / s_k^2
    # d/dz (-log p) = sum_k r_k (z - m_k) / s_k^2
    dz = np.einsum("bk,bkz->bz", w, scaled)
    # d/dlog_var (-sum_d log_var_d / 2) = -1/2
    dlog_var = np.broadcast_to(-0.5 * dkl[:, None], z.shape)
    # d/dm_k (-log p) = -r_k (z - m_k) / s_k^2
    dmeans = -np.einsum("bk,bkz->kz", w, scaled)
    # d/dlog s_k^2 (-log p) = -r_k ((z - m_k)^2 / s_k^2 - 1) / 2
    dlog_vars = -0.5 * np.einsum("bk,bkz->kz", w, scaled * diff - 1.0)
    # d/dlog pi_k (-log p) = -r_k
    dlog_pi = -w.sum(0)
    return dz, dlog_var, dmeans, dlog_vars, dlog_pi


# ---- the two learned priors ----------------------------------------------------------------------

class MixturePriorVAE(VAE):
    """vae.VAE with p(z) = sum_k pi_k N(z; m_k, diag(exp(log_vars_k))), pi = softmax(log_weights): K
    means, log-variances and unnormalised log-weights, the parameters 'prior.means',
    'prior.log_vars', 'prior.log_weights'."""

    prior_name = "mog"

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, components=10,
                 likelihood=None):
        rng = np.random.default_rng(seed)
        # The networks first, from the same Generator: a seed gives vae.VAE's networks.
        super().__init__(n_in, hidden, latent, rng, dtype, likelihood)
        self.components = components
        self.prior = self.new_prior_params(rng, dtype)
        self.prior_grads = {name: np.zeros_like(p) for name, p in self.prior.items()}

    def new_prior_params(self, rng, dtype):
        k = self.components
        means = rng.standard_normal((k, self.latent)).astype(dtype)
        log_vars = np.zeros((k, self.latent), dtype)
        log_weights = np.zeros(k, dtype)
        return {"means": means, "log_vars": log_vars, "log_weights": log_weights}

    def params(self):
        prior = {"prior." + name: p for name, p in self.prior.items()}
        return {**super().params(), **prior}

    def grads(self):
        prior = {"prior." + name: g for name, g in self.prior_grads.items()}
        return {**super().grads(), **prior}

    def mixture(self):
        """(means, log_vars, log_pi) of p(z): (K, Z), (K, Z), (K,)."""
        a = self.prior["log_weights"]
        log_pi = a - logsumexp(a, axis=0)           # log pi = log softmax(a)
        return self.prior["means"], self.prior["log_vars"], log_pi

    def kl_forward(self, mu, log_var, z, eps):
        """Replaces the closed form: log q(z|x) - log p(z) at the sampled z."""
        means, log_vars, log_pi = self.mixture()
        kl, self.kl_cache = kl_mixture_forward(z, eps, log_var, means, log_vars, log_pi)
        return kl

    def kl_backward(self, dkl):
        """(dmu, dlog_var) of the KL term; the prior's own gradients go into prior_grads."""
        dz, dlog_var_q, dmeans, dlog_vars, dlog_pi = kl_mixture_backward(dkl, self.kl_cache)
        self.mixture_backward(dmeans, dlog_vars, dlog_pi)
        # The prior's pull on z goes on to mu and log_var through z = mu + sigma * eps.
        dmu, dlog_var_z = reparameterize_backward(dz, self.z_cache)
        # The KL's two paths to log_var: through z, and the -1/2 of log q's -sum log sigma.
        return dmu, dlog_var_z + dlog_var_q

    def mixture_backward(self, dmeans, dlog_vars, dlog_pi):
        self.prior_grads["means"][...] = dmeans
        self.prior_grads["log_vars"][...] = dlog_vars
        # log pi = a - logsumexp(a): d log pi_j / d a_k = delta_jk - pi_k, so
        # dL/da_k = dlog_pi_k - pi_k sum_j dlog_pi_j.
        _, _, log_pi = self.mixture()
        pi = np.exp(log_pi)
        self.prior_grads["log_weights"][...] = dlog_pi - pi * dlog_pi.sum()

    def sample_z(self, n, rng):
        """n draws (float64) from the learned mixture."""
        means, log_vars, log_pi = (a.astype(np.float64) for a in self.mixture())
        return sample_mixture(means, log_vars, log_pi, n, rng)

    def log_prior(self, z):
        """log p(z) per row of z, in float64 (no gradient; for the analysis)."""
        means, log_vars, log_pi = (a.astype(np.float64) for a in self.mixture())
        log_p, _ = mixture_log_density(np.asarray(z, np.float64), means, log_vars, log_pi)
        return log_p


def encoder_twin(mlp):
    """A second MLP over the same parameter arrays, with caches and gradients of its own: for a
    second input whose pass must not overwrite the first one's caches. The parameters' gradient is
    then the sum of the two MLPs' grads."""
    twin = copy.copy(mlp)
    twin.layers = [copy.copy(layer) for layer in mlp.layers]    # the same params dicts, new caches
    for layer in twin.layers:
        layer.grads = {k: np.zeros_like(p) for k, p in layer.params.items()}
    return twin


class VampPriorVAE(MixturePriorVAE):
    """vae.VAE with p(z) = (1/K) sum_k q(z|u_k) (Tomczak & Welling 2018): the components are the
    encoder's own posteriors of K learned pseudo-inputs, pseudo-images u_k = clip(w_k, 0, 1)
    (PyTorch's Hardtanh(0, 1), as in the paper's code, so that they stay images); the parameters are
    the w_k, 'prior.w'. The pseudo-inputs take a pass of their own through the encoder's weights, so
    those weights get two gradients, which backward() adds up."""

    prior_name = "vamp"

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, components=100,
                 likelihood=None):
        super().__init__(n_in, hidden, latent, seed, dtype, components, likelihood)
        self.pseudo_encoder = encoder_twin(self.encoder)    # the same weights, caches of its own

    def new_prior_params(self, rng, dtype):  # u = clip(w); the lab starts w at training images
        w = rng.uniform(0, 1, (self.components, self.n_in)).astype(dtype)
        return {"w": w}

    def pseudo_inputs(self):
        return np.clip(self.prior["w"], 0, 1)

    def mixture(self):
        out_u = self.pseudo_encoder.forward(self.pseudo_inputs())   # [mu, log_var] of each q(z|u_k)
        means = out_u[:, :self.latent]
        log_vars = out_u[:, self.latent:]
        log_pi = np.full(self.components, -math.log(self.components), out_u.dtype)     # pi_k = 1/K
        return means, log_vars, log_pi

    def mixture_backward(self, dmeans, dlog_vars, dlog_pi):
        # The weights are fixed at 1/K: dlog_pi goes nowhere. The components' gradients go on
        # through the encoder's second pass to the pseudo-inputs u, then through the clip to w.
        du = self.pseudo_encoder.backward(np.concatenate([dmeans, dlog_vars], axis=1))
        w = self.prior["w"]
        inside = (w > 0) & (w < 1)
        # dL/dw = dL/du clip'(w): 1 inside (0, 1), else 0
        self.prior_grads["w"][...] = du * inside

    def backward(self, beta=1.0):
        super().backward(beta)
        # The encoder's weights served twice, for the batch and for the pseudo-inputs: dL/dW is the
        # sum.
        for layer, twin in zip(self.encoder.layers, self.pseudo_encoder.layers):
            for name, g in layer.grads.items():
                g += twin.grads[name]
