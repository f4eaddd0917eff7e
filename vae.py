"""The variational autoencoder (Kingma & Welling 2014), forward and backward written out by hand.

    encoder:  x (B, D) -> h -> [mu, log_var] (B, 2Z)    q(z|x) = N(mu, diag(sigma^2)), sigma = exp(log_var / 2)
    sample:   z = mu + sigma * eps,  eps ~ N(0, I)       the reparameterization z = g(eps, x) (K&W section 2.4)
    decoder:  z (B, Z) -> h -> logits (B, D)             p(x|z) = Bernoulli(sigmoid(logits)), pixel by pixel
    loss:     -ELBO = -log p(x|z) + KL(q(z|x) || p(z))   K&W eq. 10 with one z per image, averaged over the batch
    prior:    p(z) = N(0, I)

This file is the standard VAE and nothing else. It reads top to bottom: the formulas (each written once); the loss
and the reparameterization as three forward/backward pairs in the CS231n style (forward(...) -> out, cache;
backward(d<out>, cache) -> gradients; each grad-checked alone); and the model, whose forward and backward compose
those pairs in the paper's order. A learned prior is a subclass in priors.py that replaces the prior's four
methods (the class's middle section) and adds its parameters; the training step is this one (the VampPrior adds
its pseudo-inputs' encoder gradients in backward). Other likelihoods p(x|z) are the last section of this file.
"""
import math

import numpy as np

from autograd import MLP

LOG_2PI = math.log(2 * math.pi)     # a Python float: it leaves float32 arrays float32 (a NumPy float64 would not)


# ---- the formulas ------------------------------------------------------------------------------------------

def sigmoid(logits):                    # 1 / (1 + exp(-l)) = (1 + tanh(l / 2)) / 2, with no exp to overflow
    return 0.5 + 0.5 * np.tanh(0.5 * logits)


def log_normal(z, mean, log_var):
    """log N(z; mean, diag(var)) = -1/2 sum_d [(z_d - mean_d)^2 / var_d + log var_d + log 2 pi], var = exp(log_var),
    summed over the last axis; z, mean and log_var broadcast against each other."""
    return -0.5 * (((z - mean) ** 2 * np.exp(-log_var)).sum(-1) + log_var.sum(-1) + z.shape[-1] * LOG_2PI)


def log_bernoulli(x, logits, e=None):
    """log p(x|z) = sum_j x_j l_j - softplus(l_j) over the last axis (for x in {0, 1}: sum_j x_j log p_j + (1 - x_j)
    log(1 - p_j), p = sigmoid(l)). softplus(l) = max(l, 0) + log(1 + e), e = exp(-|l|) in (0, 1]: stable for any l
    (e may be given); sum_j max(l_j, 0) = (sum_j l_j + sum_j |l_j|) / 2. Pixel sums are products with ones (1.7, not
    5.6 ns a pixel); log(1 + e), not log1p (no SIMD float32 log1p on AVX2), off by <= 1.2e-7 (docs, section 6)."""
    ones, t = np.ones(logits.shape[-1], logits.dtype), np.abs(logits)    # t: one scratch array, overwritten in place
    sum_max = 0.5 * (logits @ ones + t @ ones)                              # sum_j max(l_j, 0)
    e = np.exp(np.negative(t, out=t), out=t) if e is None else e           # e = exp(-|l|)
    np.log(np.add(e, 1, out=t), out=t)                                      # log(1 + e)
    return np.einsum("...j,...j->...", x, logits) - sum_max - t @ ones


# ---- the loss, piece by piece: forward(...) -> (out, cache), backward(d<out>, cache) -> gradients ------------
# Each loss term returns one value per example (B,); its backward takes the loss's gradient with respect to that
# value (B,): 1/B for a batch mean. The reparameterization maps (mu, log_var) (B, Z) to z (B, Z), backward dz to both.

def bernoulli_nll_forward(logits, x):
    """Reconstruction term -log p(x|z) per example, from the decoder's logits (B, D) and images x (B, D) in [0, 1].
    e = exp(-|l|) is computed once and shared: the loss takes log(1 + e), the gradient needs no other transcendental."""
    e = np.exp(-np.abs(logits))
    return -log_bernoulli(x, logits, e), (logits, x, e)


def bernoulli_nll_backward(dnll, cache):
    logits, x, e = cache                                # d/dl [softplus(l) - x l] = sigmoid(l) - x, from e:
    g = np.maximum(e, logits >= 0)                      # exp(min(l, 0)) = 1 for l >= 0, e = exp(l) for l < 0
    g /= np.add(e, 1)                                   # sigmoid(l) = exp(min(l, 0)) / (1 + exp(-|l|)), either sign
    g -= x; g *= dnll[:, None]                          # (sigmoid(l) - x) * dnll
    return g


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


# ---- the model ---------------------------------------------------------------------------------------------

class Bernoulli:
    """p(x|z) = prod_j Bernoulli(x_j; sigmoid(l_j)), the recipe's likelihood: the pair above, log p(x|z), the mean
    E[x|z] = sigmoid(l) and a draw. On grey levels x in [0, 1] it is a cross-entropy, not a normalised density: the
    end of this file has the variations."""
    name, decoder_sigma, params, grads = "bernoulli", None, {}, {}
    forward, backward = staticmethod(bernoulli_nll_forward), staticmethod(bernoulli_nll_backward)
    log_density, mean = staticmethod(log_bernoulli), staticmethod(sigmoid)

    def sample(self, logits, rng):                      # x_j ~ Bernoulli(sigmoid(l_j)): 0 or 1
        return (rng.random(logits.shape) < sigmoid(logits)).astype(logits.dtype)


class VAE:
    """The standard VAE: an MLP encoder for q(z|x), z = mu + sigma * eps, an MLP decoder for p(x|z), prior N(0, I)."""
    prior_name, components = "standard", 0              # p(z) = N(0, I), no components; priors.py: learned ones

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, likelihood="bernoulli",
                 decoder_sigma=None):
        rng = np.random.default_rng(seed)               # seed: an int (or the Generator a subclass goes on using)
        self.n_in, self.hidden, self.latent = n_in, hidden, latent
        # 2Z outputs split into mu and log_var (the recipe's heads fc21, fc22 in one product); log_var, not sigma:
        # any real output is valid, and sigma = exp(log_var / 2) is positive whatever the network gives.
        self.encoder = MLP([n_in, hidden, 2 * latent], rng, dtype)
        self.decoder = MLP([latent, hidden, n_in], rng, dtype)
        # p(x|z): the Bernoulli, or one of the variations defined at the end of this file ('gaussian', 'cb').
        self.likelihood = Bernoulli() if likelihood == "bernoulli" else LIKELIHOODS[likelihood](decoder_sigma, dtype)

    def params(self):
        """{name: array} of every parameter, by reference (updating one updates the model)."""
        return {**self.encoder.named("params", "enc"), **self.decoder.named("params", "dec"),
                **{"likelihood." + k: p for k, p in self.likelihood.params.items()}}

    def grads(self):
        """{name: dL/dparam}, filled by backward(), by reference."""
        return {**self.encoder.named("grads", "enc"), **self.decoder.named("grads", "dec"),
                **{"likelihood." + k: g for k, g in self.likelihood.grads.items()}}

    def encode(self, x):
        """x (B, D) in [0, 1] -> mu, log_var (B, Z) of q(z|x)."""
        out = self.encoder.forward(x)
        return out[:, :self.latent], out[:, self.latent:]

    def decode(self, z):
        """z (B, Z) -> logits (B, D), the parameters of p(x|z)."""
        return self.decoder.forward(z)

    # ---- training: the negative ELBO and its gradient ------------------------------------------------------

    def forward(self, x, eps):
        """Negative ELBO of the batch x (B, D) for the noise eps (B, Z): (loss, recon, kl), each the batch mean
        in nats per example, loss = recon + kl. A deterministic function of (params, x, eps)."""
        mu, log_var = self.encode(x)                                    # q(z|x) = N(mu, diag(exp(log_var)))
        z, self.z_cache = reparameterize_forward(mu, log_var, eps)      # z = mu + sigma * eps
        logits = self.decoder.forward(z)                                # the parameters of p(x|z)
        recon, self.recon_cache = self.likelihood.forward(logits, x)    # -log p(x|z): bernoulli_nll_forward
        kl = self.kl_forward(mu, log_var, z, eps)                       # KL(q(z|x) || p(z))
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
        dlogits = self.likelihood.backward(drecon, self.recon_cache)    # Bernoulli: (sigmoid(logits) - x) / B
        dz = self.decoder.backward(dlogits)
        dmu_rec, dlog_var_rec = reparameterize_backward(dz, self.z_cache)   # dz, and dz * eps * sigma / 2
        # KL(q(z|x) || p(z)) -> (mu, log_var).
        dmu_kl, dlog_var_kl = self.kl_backward(dkl)     # N(0, I): beta * mu / B, and beta * (sigma^2 - 1) / (2B)
        dmu = dmu_rec + dmu_kl                  # dL/dmu = dz + beta * mu / B                       (N(0, I))
        dlog_var = dlog_var_rec + dlog_var_kl   # dL/dlog_var = dz * eps * sigma / 2 + beta * (sigma^2 - 1) / (2B)
        self.paths = {"recon_mu": dmu_rec, "kl_mu": dmu_kl, "recon_log_var": dlog_var_rec, "kl_log_var": dlog_var_kl}
        # [mu, log_var] -> encoder weights. dL/dx is never needed: x is data.
        self.encoder.backward(np.concatenate([dmu, dlog_var], axis=1), need_dx=False)

    # ---- the prior, N(0, I): its KL term, and drawing from it. priors.py replaces these four methods. ----------

    def kl_forward(self, mu, log_var, z, eps):
        """KL(q(z|x) || p(z)) per example: for N(0, I) in closed form, from mu and log_var alone."""
        kl, self.kl_cache = kl_normal_forward(mu, log_var)
        return kl

    def kl_backward(self, dkl):
        """(dmu, dlog_var) of the KL term."""
        return kl_normal_backward(dkl, self.kl_cache)

    def sample_z(self, n, rng):
        """n draws (float64) from the prior: z ~ N(0, I)."""
        return rng.standard_normal((n, self.latent))

    def log_prior(self, z):
        """log p(z) = log N(z; 0, I) per row of z (no gradient; for the analysis)."""
        return log_normal(z, 0.0, np.zeros(self.latent))

    # ---- using a trained model -----------------------------------------------------------------------------

    def reconstruct(self, x):
        """The means E[x|z] of p(x|z) at z = mu(x), the posterior's centre: (B, D)."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))

    def sample_prior(self, n, rng):
        """n draws z ~ p(z), the prior, decoded to the means E[x|z] of p(x|z) (likelihood.sample draws x itself)."""
        return self.likelihood.mean(self.decode(self.sample_z(n, rng).astype(self.dtype)))

    def sample_posterior(self, x, n, rng):
        """n images (the means of p(x|z)) for each row of x, decoded from z ~ q(z|x) = N(mu(x), sigma(x)^2):
        variations of x. Returns (len(x), n, D)."""
        mu, log_var = self.encode(x)
        eps = rng.standard_normal((n, len(x), self.latent)).astype(self.dtype)
        z, _ = reparameterize_forward(mu, log_var, eps)                 # (n, len(x), Z)
        return self.likelihood.mean(self.decode(z.reshape(-1, self.latent))).reshape(n, len(x), -1).transpose(1, 0, 2)

    @property
    def dtype(self):
        return self.encoder.layers[0].params["W"].dtype

    @property
    def arch(self):
        return {"n_in": self.n_in, "hidden": self.hidden, "latent": self.latent, "prior": self.prior_name,
                "components": self.components, "likelihood": self.likelihood.name,
                "decoder_sigma": self.likelihood.decoder_sigma}


# ---- variations: other likelihoods p(x|z), each replacing the Bernoulli pair ------------------------------------
# The decoder and its logits l stay the same; what changes is the distribution they parameterise, its negative
# log-density, and so the gradient that flows back into the decoder: dL/dl.

def gaussian_nll_forward(logits, x, log_sigma):
    """-log N(x; m, sigma^2 I) per example, with mean m = sigmoid(l) (in [0, 1], like the pixels, from the same
    decoder as the Bernoulli's) and one sigma for every pixel:
        sum_j (x_j - m_j)^2 / (2 sigma^2) + D log sigma + D/2 log 2 pi.
    With sigma fixed this is the squared error scaled by 1 / (2 sigma^2): the "MSE" VAE, whose KL weighs 2 sigma^2
    against the squared error."""
    m = sigmoid(logits)
    diff = m - x
    inv_var = np.exp(-2 * log_sigma)                    # 1 / sigma^2
    sse = (diff * diff).sum(-1)                         # sum_j (x_j - m_j)^2
    return 0.5 * inv_var * sse + x.shape[-1] * (log_sigma + 0.5 * LOG_2PI), (m, diff, inv_var, sse)


def gaussian_nll_backward(dnll, cache):
    m, diff, inv_var, sse = cache
    dlogits = diff * (inv_var * dnll[:, None]) * m * (1 - m)   # d/dm = (m - x) / sigma^2, dm/dl = m (1 - m)
    dlog_sigma = (dnll * (diff.shape[-1] - inv_var * sse)).sum()   # d/dlog sigma = D - sum_j (x_j - m_j)^2 / sigma^2
    return dlogits, dlog_sigma


def cb_log_normalizer(logits):
    """log C(l), the continuous Bernoulli's normaliser (Loaiza-Ganem & Cunningham 2019) at lambda = sigmoid(l):
    C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), which is l / tanh(l / 2) in logits (1 - 2 lambda = -tanh(l / 2),
    and artanh(-tanh(l / 2)) = -l / 2). Its removable singularity at l = 0 (lambda = 1/2) causes no cancellation in
    this form: tanh(l / 2) is l / 2 to the last bit for small l, so the ratio is exact to rounding everywhere,
    and its limit 2 is taken at l = 0."""
    ratio = np.full_like(logits, 2.0)
    np.divide(logits, np.tanh(0.5 * logits), out=ratio, where=logits != 0)
    return np.log(ratio)


def cb_log_normalizer_grad(logits):
    """d log C / dl = 1/l - 1/sinh(l). The two terms cancel as l -> 0, so for |l| < 0.2 the Taylor series
    l/6 - 7 l^3/360 + 31 l^5/15120 - 127 l^7/604800 + 73 l^9/3421440 - 1414477 l^11/653837184000 (the next term is
    below 6e-15 of the sum there; the direct form loses at most 1.7e-15 / l^2 relative, 4.2e-14 at l = 0.2). Computed
    in float64 and rounded once to the logits' dtype: float32's direct form would lose 6e-7 / l^2."""
    dtype, logits = np.asarray(logits).dtype, np.asarray(logits, np.float64)
    small = np.abs(logits) < 0.2
    l = np.where(small, logits, 0.2)                    # either branch stays finite where it is not used
    l2 = l * l
    series = l * (1 / 6 + l2 * (-7 / 360 + l2 * (31 / 15120 + l2 * (-127 / 604800 + l2 * (
        73 / 3421440 - l2 * 1414477 / 653837184000)))))
    big = np.where(small, 1.0, logits)
    with np.errstate(over="ignore"):                    # sinh overflows to inf for |l| > 710: 1/inf = 0
        direct = 1 / big - 1 / np.sinh(big)
    return np.where(small, series, direct).astype(dtype)


def cb_nll_forward(logits, x):
    """-log p(x|z) for the continuous Bernoulli, p(x|l) = C(l) lambda^x (1 - lambda)^(1 - x) on [0, 1]: a density
    over grey levels. It is the Bernoulli's cross-entropy less the log normaliser, summed over the pixels."""
    bce, cache = bernoulli_nll_forward(logits, x)
    return bce - cb_log_normalizer(logits).sum(-1), cache


def cb_nll_backward(dnll, cache):
    logits = cache[0]                                   # d/dl = sigmoid(l) - x - d log C / dl = E[x|l] - x
    return bernoulli_nll_backward(dnll, cache) - cb_log_normalizer_grad(logits) * dnll[:, None]


def cb_mean(logits):
    """E[x] under the continuous Bernoulli: lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)), which is
    sigmoid(l) - d log C / dl in logits; not lambda itself (the error the paper warns of). 1/2 at l = 0."""
    return sigmoid(logits) - cb_log_normalizer_grad(logits)


class Gaussian:
    """Replaces the Bernoulli: p(x|z) = N(x; sigmoid(l), sigma^2 I), with sigma fixed (decoder_sigma, a number) or
    learned (decoder_sigma='learned': one log sigma shared by every pixel, the parameter 'likelihood.log_sigma',
    the calibrated decoder of Rybkin et al. 2021)."""
    name = "gaussian"

    def __init__(self, sigma, dtype):
        self.decoder_sigma = "learned" if sigma in (None, "learned") else float(sigma)     # the setting
        learned = self.decoder_sigma == "learned"
        self.params = {"log_sigma": np.zeros(1, dtype)} if learned else {}
        self.grads = {"log_sigma": np.zeros(1, dtype)} if learned else {}
        self.fixed_log_sigma = None if learned else np.full(1, math.log(self.decoder_sigma), dtype)   # model's dtype

    def log_sigma(self):
        return self.params["log_sigma"] if self.params else self.fixed_log_sigma

    def forward(self, logits, x):
        return gaussian_nll_forward(logits, x, self.log_sigma())

    def backward(self, dnll, cache):
        dlogits, dlog_sigma = gaussian_nll_backward(dnll, cache)
        if self.grads:
            self.grads["log_sigma"][...] = dlog_sigma
        return dlogits

    def log_density(self, x, logits):
        return -gaussian_nll_forward(logits, x, self.log_sigma())[0]

    def mean(self, logits):
        return sigmoid(logits)

    def sample(self, logits, rng):                      # m + sigma * noise: grey levels, some outside [0, 1]
        return (sigmoid(logits) + np.exp(self.log_sigma()) * rng.standard_normal(logits.shape)).astype(logits.dtype)


class ContinuousBernoulli:
    """Replaces the Bernoulli: p(x|z) = prod_j CB(x_j; sigmoid(l_j)), the Bernoulli normalised over [0, 1]."""
    name, decoder_sigma, params, grads = "cb", None, {}, {}
    forward, backward, mean = staticmethod(cb_nll_forward), staticmethod(cb_nll_backward), staticmethod(cb_mean)

    def log_density(self, x, logits):
        return -cb_nll_forward(logits, x)[0]

    def sample(self, logits, rng):
        """By the inverse of the CDF F(x) = (e^(l x) - 1) / (e^l - 1): x = log(1 + u (e^l - 1)) / l, u ~ U(0, 1),
        written for -|l| (no overflow) and mirrored, x -> 1 - x, for l > 0; x = u at l = 0."""
        l = np.asarray(logits, np.float64)
        u = rng.random(l.shape)
        neg = -np.abs(l)
        u = np.where(l > 0, 1 - u, u)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(neg == 0, u, np.log1p(u * np.expm1(neg)) / np.where(neg == 0, 1, neg))
        return np.where(l > 0, 1 - x, x).astype(logits.dtype)


LIKELIHOODS = {"gaussian": Gaussian, "cb": lambda sigma, dtype: ContinuousBernoulli()}  # (decoder_sigma, dtype)
