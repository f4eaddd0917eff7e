"""The variational autoencoder (Kingma & Welling 2014), forward and backward written out by hand.

    encoder:  x (B, D) -> h -> [mu, log_var] (B, 2Z)    q(z|x) = N(mu, diag(sigma^2)), sigma = exp(log_var / 2)
    sample:   z = mu + sigma * eps,  eps ~ N(0, I)       the reparameterization z = g(eps, x) (K&W section 2.4)
    decoder:  z (B, Z) -> h -> logits (B, D)             p(x|z) = Bernoulli(sigmoid(logits)), pixel by pixel
    loss:     -ELBO = -log p(x|z) + KL(q(z|x) || p(z))   K&W eq. 10 with one z per image, averaged over the batch
    prior:    p(z) = N(0, I), or learned: a mixture of Gaussians ('mog') or the VampPrior ('vamp')

The file reads top to bottom: the formulas (each written once), the loss and the reparameterization as four
forward/backward pairs in the CS231n style (forward(...) -> out, cache; backward(dout, cache) -> gradients, each grad-checked alone), the
three priors, and the model, whose forward and backward compose those pieces in the paper's order.
"""
import math

import numpy as np

from autograd import MLP

LOG_2PI = math.log(2 * math.pi)     # a Python float: it leaves float32 arrays float32 (a NumPy float64 would not)


# ---- the formulas ------------------------------------------------------------------------------------------

def sigmoid(logits):
    # 1 / (1 + exp(-l)) = (1 + tanh(l / 2)) / 2: the same function, with no exp to overflow for any l.
    return 0.5 + 0.5 * np.tanh(0.5 * logits)


def logsumexp(a, axis):
    """log sum_i exp(a_i) = m + log sum_i exp(a_i - m), m = max_i a_i: no overflow, no log(0) for finite a."""
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def log_normal(z, mean, log_var, pairs=False):
    """log N(z; mean, diag(var)) = -1/2 sum_d [(z_d - mean_d)^2 / var_d + log var_d + log 2 pi], var = exp(log_var).

    Summed over the last axis; z, mean and log_var broadcast against each other. pairs=True takes z (N, Z) and
    mean, log_var (K, Z) and returns every row of z against every row of mean, (N, K), with the square expanded
    into matrix products, (z - m)^2 / v = z^2 / v - 2 z m / v + m^2 / v: for N = K = 10,000 (the ELBO surgery)
    about a second instead of 15-20 s here. Its rounding error is ~1e-16 times the terms, so where they pass
    1e10 (variances near 0, as with no KL term) it falls back to the direct form, a chunk of rows at a time."""
    inv_var = np.exp(-log_var)
    if not pairs:
        sq = ((z - mean) ** 2 * inv_var).sum(-1)
    else:
        zz, mm = (z * z) @ inv_var.T, (mean * mean * inv_var).sum(-1)
        if max(zz.max(), mm.max()) < 1e10:
            sq = zz - 2 * z @ (mean * inv_var).T + mm
        else:
            sq = np.concatenate([((z[i:i + 16, None, :] - mean) ** 2 * inv_var).sum(-1) for i in range(0, len(z), 16)])
    return -0.5 * (sq + log_var.sum(-1) + z.shape[-1] * LOG_2PI)


def log_bernoulli(x, logits):
    """log p(x|z) = sum_j x_j l_j - softplus(l_j), summed over the last axis; for x in {0, 1} this is
    sum_j x_j log p_j + (1 - x_j) log(1 - p_j) with p = sigmoid(l). softplus(l) = log(1 + e^l) is written
    max(l, 0) + log1p(e^-|l|), which is stable for any l."""
    return (x * logits - np.maximum(logits, 0) - np.log1p(np.exp(-np.abs(logits)))).sum(-1)


def mixture_log_density(z, means, log_vars, log_pi):
    """log p(z) = log sum_k pi_k N(z; m_k, diag(exp(log_vars_k))) per row of z (B, Z), by log-sum-exp, and the
    responsibilities r_bk = pi_k N(z_b; m_k, .) / p(z_b) (each row sums to 1). means, log_vars (K, Z); log_pi (K,)."""
    a = log_pi + log_normal(z[:, None, :], means, log_vars)            # log pi_k + log N(z_b; m_k, s_k^2), (B, K)
    log_p = logsumexp(a, axis=1)
    return log_p, np.exp(a - log_p[:, None])


# ---- the loss, piece by piece: forward(...) -> (out, cache), backward(dout, cache) -> gradients --------------
# The three loss terms return one value per example (B,), and their backward takes dout (B,), dL/d(that value):
# 1/B for a batch mean. The reparameterization maps (mu, log_var) (B, Z) to z (B, Z); its backward takes dz.

def bernoulli_nll_forward(logits, x):
    """Reconstruction term -log p(x|z) per example, from the decoder's logits (B, D) and images x (B, D) in [0, 1]."""
    return -log_bernoulli(x, logits), (logits, x)


def bernoulli_nll_backward(dnll, cache):
    logits, x = cache
    return (sigmoid(logits) - x) * dnll[:, None]        # d/dl [softplus(l) - x l] = sigmoid(l) - x


def reparameterize_forward(mu, log_var, eps):
    """z = mu + sigma * eps, sigma = exp(log_var / 2): a draw from N(mu, sigma^2) written as a function of mu and
    log_var, the randomness kept in eps ~ N(0, I), outside the model."""
    sigma = np.exp(0.5 * log_var)
    return mu + sigma * eps, (eps, sigma)


def reparameterize_backward(dz, cache):
    eps, sigma = cache
    dmu = dz                                            # dz/dmu = 1
    dlog_var = dz * eps * sigma * 0.5                   # dz/dsigma = eps, dsigma/dlog_var = sigma / 2
    return dmu, dlog_var                                # eps gets none: it is noise, a function of no parameter


def kl_normal_forward(mu, log_var):
    """KL(N(mu, sigma^2) || N(0, I)) per example in closed form (K&W Appendix B):
    KL = -1/2 sum_d (1 + log_var - mu^2 - exp(log_var))."""
    var = np.exp(log_var)
    return -0.5 * (1.0 + log_var - mu * mu - var).sum(1), (mu, var)


def kl_normal_backward(dkl, cache):
    mu, var = cache                                     # KL = 1/2 sum(mu^2 + exp(log_var) - log_var - 1), so:
    dmu = dkl[:, None] * mu                             # d/dmu [mu^2 / 2] = mu
    dlog_var = dkl[:, None] * 0.5 * (var - 1.0)         # d/dlog_var [(exp(log_var) - log_var) / 2] = (sigma^2 - 1) / 2
    return dmu, dlog_var


def kl_mixture_forward(z, eps, log_var, means, log_vars, log_pi):
    """KL(q(z|x) || p(z)) for a mixture prior, which has no closed form: estimated at the same z = mu + sigma * eps
    as the reconstruction, KL ~ log q(z|x) - log p(z) (unbiased over eps). means, log_vars (K, Z), log_pi (K,).
    log q(z|x) = log N(eps; 0, I) - sum_d log sigma_d: the density of eps, divided by the stretch of z = g(eps)."""
    log_p, r = mixture_log_density(z, means, log_vars, log_pi)
    log_q = log_normal(eps, 0.0, np.zeros_like(log_var)) - 0.5 * log_var.sum(-1)
    return log_q - log_p, (z, means, log_vars, r)


def kl_mixture_backward(dkl, cache):
    """Gradients of log q(z|x) - log p(z), as kl_mixture_forward computes it from (z, eps, log_var): log q is the
    density of eps less sum log sigma, so z enters only log p. (Through z = mu + sigma * eps, z's route into
    log q(z|x) would cancel its routes through mu and sigma; writing log q in eps makes that explicit.)
    Returns dz (the prior's pull on z, which the caller sends on through z = mu + sigma * eps), dlog_var, and the
    mixture's dmeans, dlog_vars, dlog_pi. Below, w_bk = dout_b * r_bk: the responsibilities, weighted."""
    z, means, log_vars, r = cache
    w = r * dkl[:, None]                                # w_bk = dout_b r_bk, (B, K)
    diff = z[:, None, :] - means                        # z_b - m_k, (B, K, Z)
    scaled = diff * np.exp(-log_vars)                   # (z_b - m_k) / s_k^2
    dz = np.einsum("bk,bkz->bz", w, scaled)             # d/dz (-log p) = sum_k r_k (z - m_k) / s_k^2
    dlog_var = np.broadcast_to(-0.5 * dkl[:, None], z.shape)    # d/dlog_var (-sum_d log_var_d / 2) = -1/2
    dmeans = -np.einsum("bk,bkz->kz", w, scaled)        # d/dm_k (-log p) = -r_k (z - m_k) / s_k^2
    dlog_vars = -0.5 * np.einsum("bk,bkz->kz", w, scaled * diff - 1.0)   # -r_k ((z - m_k)^2 / s_k^2 - 1) / 2
    dlog_pi = -w.sum(0)                                 # d/dlog pi_k (-log p) = -r_k
    return dz, dlog_var, dmeans, dlog_vars, dlog_pi


def sample_mixture(means, log_vars, log_pi, n, rng):
    """n draws from sum_k pi_k N(m_k, diag(exp(log_vars_k))): a component k ~ pi, then z = m_k + s_k * eps."""
    pi = np.exp(log_pi - log_pi.max())
    k = rng.choice(len(pi), size=n, p=pi / pi.sum())
    return reparameterize_forward(means[k], log_vars[k], rng.standard_normal((n, means.shape[1])))[0]


# ---- the priors: each gives its KL pair and its density as a (means, log_vars, log_pi) mixture -------------

class StandardPrior:
    """p(z) = N(0, I): no parameters, and the KL in closed form. As a mixture, one component N(0, I)."""

    def __init__(self, latent, dtype):
        self.params, self.grads, self.latent, self.dtype = {}, {}, latent, dtype

    def mixture(self):
        return np.zeros((1, self.latent), self.dtype), np.zeros((1, self.latent), self.dtype), np.zeros(1, self.dtype)

    def kl_forward(self, z, eps, mu, log_var, out_u):
        return kl_normal_forward(mu, log_var)

    def kl_backward(self, dkl, cache, z_cache):
        dmu, dlog_var = kl_normal_backward(dkl, cache)
        return dmu, dlog_var, np.zeros((0, 2 * self.latent), self.dtype)   # no pseudo-input rows

    def with_pseudo_inputs(self, x):
        return x                                        # the encoder sees the batch alone

    def pseudo_input_backward(self, du):
        pass


class MixturePrior:
    """p(z) = sum_k pi_k N(z; m_k, diag(exp(log_vars_k))), pi = softmax(log_weights): K means, log-variances and
    unnormalised log-weights, learned with the rest. The KL has no closed form: it is estimated at the sampled z."""

    def __init__(self, latent, dtype, k, rng):
        self.params = {"means": rng.standard_normal((k, latent)).astype(dtype),
                       "log_vars": np.zeros((k, latent), dtype), "log_weights": np.zeros(k, dtype)}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.latent, self.dtype = latent, dtype

    def mixture(self, out_u=None):
        a = self.params["log_weights"]
        return self.params["means"], self.params["log_vars"], a - logsumexp(a, axis=0)     # log pi = a - logsumexp(a)

    def kl_forward(self, z, eps, mu, log_var, out_u):
        return kl_mixture_forward(z, eps, log_var, *self.mixture(out_u))

    def kl_backward(self, dkl, cache, z_cache):
        dz, dlog_var_q, dmeans, dlog_vars, dlog_pi = kl_mixture_backward(dkl, cache)
        dmu, dlog_var = reparameterize_backward(dz, z_cache)    # the prior's pull on z, on to mu and log_var
        return dmu, dlog_var + dlog_var_q, self.mixture_backward(dmeans, dlog_vars, dlog_pi)

    def mixture_backward(self, dmeans, dlog_vars, dlog_pi):
        self.grads["means"][...] = dmeans
        self.grads["log_vars"][...] = dlog_vars
        pi = np.exp(self.mixture()[2])          # log pi = a - logsumexp(a): d log pi_j / d a_k = delta_jk - pi_k,
        self.grads["log_weights"][...] = dlog_pi - pi * dlog_pi.sum()    # so dL/da_k = dlog_pi_k - pi_k sum_j dlog_pi_j
        return np.zeros((0, 2 * self.latent), self.dtype)            # no pseudo-input rows

    with_pseudo_inputs = StandardPrior.with_pseudo_inputs           # no pseudo-inputs either
    pseudo_input_backward = StandardPrior.pseudo_input_backward


class VampPrior(MixturePrior):
    """p(z) = (1/K) sum_k q(z|u_k) (Tomczak & Welling 2018): the components are the encoder's own posteriors of K
    learned pseudo-inputs, K pseudo-images u_k = clip(w_k, 0, 1) (PyTorch's Hardtanh(0, 1), as in the paper's code,
    so that they stay images); the parameters are the w_k. The pseudo-inputs ride along as extra rows of the
    batch's encoder pass, and their gradient comes back through it."""

    def __init__(self, latent, dtype, k, rng, n_in, encoder):
        self.params = {"w": rng.uniform(0, 1, (k, n_in)).astype(dtype)}  # u = clip(w); train.py starts w at images
        self.grads = {"w": np.zeros_like(self.params["w"])}
        self.latent, self.dtype, self.k, self.encoder = latent, dtype, k, encoder

    def mixture(self, out_u=None):
        out_u = self.encoder.forward(self.pseudo_inputs()) if out_u is None else out_u
        return out_u[:, :self.latent], out_u[:, self.latent:], np.full(self.k, -math.log(self.k), out_u.dtype)

    def mixture_backward(self, dmeans, dlog_vars, dlog_pi):
        return np.concatenate([dmeans, dlog_vars], axis=1)      # rows of d[mu, log_var] for the pseudo-inputs

    def pseudo_inputs(self):
        return np.clip(self.params["w"], 0, 1)

    def with_pseudo_inputs(self, x):
        return np.concatenate([x, self.pseudo_inputs()])

    def pseudo_input_backward(self, du):
        w = self.params["w"]
        self.grads["w"][...] = du * ((w > 0) & (w < 1))         # dL/dw = dL/du * clip'(w): 1 inside [0, 1], else 0


PRIORS = {"standard": 0, "mog": 10, "vamp": 100}   # the priors, with their default number of components K


# ---- the model ---------------------------------------------------------------------------------------------

class VAE:
    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, prior="standard",
                 components=None):
        rng = np.random.default_rng(seed)
        self.n_in, self.hidden, self.latent = n_in, hidden, latent
        # One output layer of 2Z units, split into mu and log_var: the same as two heads of Z units each
        # (the reference recipe's fc21 and fc22), with one matrix product instead of two.
        self.encoder = MLP([n_in, hidden, 2 * latent], rng, dtype)
        self.decoder = MLP([latent, hidden, n_in], rng, dtype)
        # The prior, and its own parameters (drawn after the networks', so a seed gives the same networks).
        self.components = (components or PRIORS[prior]) if prior != "standard" else 0
        self.prior_name = prior
        if prior == "mog":
            self.prior = MixturePrior(latent, dtype, self.components, rng)
        elif prior == "vamp":
            self.prior = VampPrior(latent, dtype, self.components, rng, n_in, self.encoder)
        else:
            self.prior = StandardPrior(latent, dtype)

    def params(self):
        """{name: array} of every parameter, by reference (updating one updates the model)."""
        return {**self.encoder.named("params", "enc"), **self.decoder.named("params", "dec"),
                **{"prior." + k: v for k, v in self.prior.params.items()}}

    def grads(self):
        """{name: dL/dparam}, filled by backward(), by reference."""
        return {**self.encoder.named("grads", "enc"), **self.decoder.named("grads", "dec"),
                **{"prior." + k: v for k, v in self.prior.grads.items()}}

    def encode(self, x):
        """x (B, D) in [0, 1] -> mu, log_var (B, Z) of q(z|x)."""
        out = self.encoder.forward(x)
        return out[:, :self.latent], out[:, self.latent:]

    def decode(self, z):
        """z (B, Z) -> Bernoulli logits (B, D)."""
        return self.decoder.forward(z)

    # ---- training: the negative ELBO and its gradient ------------------------------------------------------

    def forward(self, x, eps):
        """Negative ELBO of the batch x (B, D) for the noise eps (B, Z): (loss, recon, kl), each the batch mean
        in nats per example, loss = recon + kl. A deterministic function of (params, x, eps)."""
        B, Z = len(x), self.latent
        out = self.encoder.forward(self.prior.with_pseudo_inputs(x))   # [mu, log_var]; rows B.. for the VampPrior
        mu, log_var = out[:B, :Z], out[:B, Z:]                          # q(z|x) = N(mu, diag(exp(log_var)))
        z, self.z_cache = reparameterize_forward(mu, log_var, eps)      # z = mu + sigma * eps
        logits = self.decoder.forward(z)                                # p(x|z) = Bernoulli(sigmoid(logits))
        recon, self.recon_cache = bernoulli_nll_forward(logits, x)      # -log p(x|z)
        kl, self.kl_cache = self.prior.kl_forward(z, eps, mu, log_var, out[B:])   # KL(q(z|x) || p(z))
        recon, kl = float(recon.mean()), float(kl.mean())
        return recon + kl, recon, kl

    def backward(self, beta=1.0):
        """Gradients of mean_b(recon_b + beta * kl_b) at the last forward() into self.grads(); beta = 1 is the
        negative ELBO. self.paths keeps the four gradients that meet at the encoder's outputs (of the batch mean:
        an example's own gradient is B times its row)."""
        eps, sigma = self.z_cache
        drecon = np.full(len(eps), 1.0 / len(eps), sigma.dtype)     # each example's share of the batch mean
        dkl = beta * drecon                             # the KL weight beta enters every KL path through dkl
        # Reconstruction: -log p(x|z) -> logits -> decoder -> z -> (mu, log_var).
        dlogits = bernoulli_nll_backward(drecon, self.recon_cache)      # (sigmoid(logits) - x) / B
        dz = self.decoder.backward(dlogits)
        dmu_rec, dlog_var_rec = reparameterize_backward(dz, self.z_cache)   # dz, and dz * eps * sigma / 2
        # KL(q(z|x) || p(z)) -> (mu, log_var), and into a learned prior's own parameters.
        dmu_kl, dlog_var_kl, dout_u = self.prior.kl_backward(dkl, self.kl_cache, self.z_cache)
        dmu = dmu_rec + dmu_kl                  # dL/dmu = dz + beta * mu / B                    (N(0, I) prior)
        dlog_var = dlog_var_rec + dlog_var_kl   # dL/dlog_var = dz * eps * sigma / 2 + beta * (sigma^2 - 1) / (2B)
        self.paths = {"recon_mu": dmu_rec, "kl_mu": dmu_kl, "recon_log_var": dlog_var_rec, "kl_log_var": dlog_var_kl}
        # [mu, log_var] -> encoder weights. dL/dx is never needed (x is data), but the VampPrior's pseudo-input
        # rows (dout_u; none for other priors) go on through the encoder to dL/du.
        dout = np.concatenate([np.concatenate([dmu, dlog_var], axis=1), dout_u])     # dL/d(encoder's out)
        self.prior.pseudo_input_backward(self.encoder.backward(dout, need_dx=slice(len(eps), None)))

    # ---- using a trained model -----------------------------------------------------------------------------

    def reconstruct(self, x):
        """Bernoulli means of p(x|z) at z = mu(x), the posterior's centre: (B, D) in [0, 1]."""
        mu, _ = self.encode(x)
        return sigmoid(self.decode(mu))

    def sample_z(self, n, rng):
        """n draws (float64) from the prior p(z)."""
        return sample_mixture(*(a.astype(np.float64) for a in self.prior.mixture()), n, rng)

    def sample_prior(self, n, rng):
        """n images decoded from z ~ p(z), the prior: draws from the whole data distribution."""
        return sigmoid(self.decode(self.sample_z(n, rng).astype(self.dtype)))

    def sample_posterior(self, x, n, rng):
        """n images for each row of x, decoded from z ~ q(z|x) = N(mu(x), sigma(x)^2): variations of x.
        Returns (len(x), n, D)."""
        mu, log_var = self.encode(x)
        eps = rng.standard_normal((n, len(x), self.latent)).astype(self.dtype)
        z, _ = reparameterize_forward(mu, log_var, eps)                 # (n, len(x), Z)
        return sigmoid(self.decode(z.reshape(-1, self.latent))).reshape(n, len(x), -1).transpose(1, 0, 2)

    def log_prior(self, z, chunk=1000):
        """log p(z) per row of z, in float64 (no gradient)."""
        mixture = [a.astype(np.float64) for a in self.prior.mixture()]
        return np.concatenate([mixture_log_density(np.asarray(z[i:i + chunk], np.float64), *mixture)[0]
                               for i in range(0, len(z), chunk)])

    @property
    def dtype(self):
        return self.encoder.layers[0].params["W"].dtype

    @property
    def arch(self):
        return {"n_in": self.n_in, "hidden": self.hidden, "latent": self.latent, "prior": self.prior_name,
                "components": self.components}
