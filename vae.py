"""The variational autoencoder (Kingma & Welling 2014), forward and backward written out by hand.

    encoder:  x (B, D) -> h -> [mu, log_var] (B, 2Z)    q(z|x) = N(mu, diag(sigma^2)),
                                                         sigma = exp(log_var / 2)
    sample:   z = mu + sigma * eps,  eps ~ N(0, I)       the reparameterization z = g(eps, x)
                                                         (K&W section 2.4)
    decoder:  z (B, Z) -> h -> logits (B, D)             p(x|z) = Bernoulli(sigmoid(logits)),
                                                         pixel by pixel
    loss:     -ELBO = -log p(x|z) + KL(q(z|x) || p(z))   K&W eq. 10, one z per image, batch mean
    prior:    p(z) = N(0, I)

This file is the standard VAE and nothing else. It reads top to bottom:
  1. the formulas, each written once (sigmoid, softplus, log N, the Bernoulli log-likelihood);
  2. the loss and the reparameterization as three forward/backward pairs in the CS231n style:
     forward(...) -> out, cache and backward(d<out>, cache) -> gradients, each grad-checked alone;
  3. the model, whose forward and backward compose those pairs in the paper's order.
Variations live in files of their own: other priors p(z) in priors.py, other likelihoods p(x|z) in
likelihoods.py, another objective (the importance-weighted bound) in iwae.py. Each replaces one
piece named here and says which.
"""
import math

import numpy as np

from autograd import MLP, ReLU

# log(2 pi) as a Python float: it leaves float32 arrays float32 (a NumPy float64 scalar would not).
LOG_2PI = math.log(2 * math.pi)


# ---- the formulas --------------------------------------------------------------------------------

def sigmoid(logits):
    """sigmoid(l) = 1 / (1 + exp(-l)), written as (1 + tanh(l / 2)) / 2: the same function, no exp
    to overflow for large negative l."""
    return 0.5 + 0.5 * np.tanh(0.5 * logits)


def softplus(logits):
    """softplus(l) = log(1 + exp(l)) = max(l, 0) + log(1 + exp(-|l|)): stable for any l."""
    return np.maximum(logits, 0) + np.log1p(np.exp(-np.abs(logits)))


def log_normal(z, mean, log_var):
    """log N(z; mean, diag(var)), var = exp(log_var), summed over the last axis:
        -1/2 sum_d [(z_d - mean_d)^2 / var_d + log var_d + log 2 pi].
    z, mean and log_var broadcast against each other."""
    squared = (z - mean) ** 2 * np.exp(-log_var)
    return -0.5 * (squared.sum(-1) + log_var.sum(-1) + z.shape[-1] * LOG_2PI)


def log_bernoulli(x, logits):
    """log p(x|z) = sum_j x_j l_j - softplus(l_j), over the last axis.

    For x in {0, 1} this is sum_j x_j log p_j + (1 - x_j) log(1 - p_j) with p = sigmoid(l):
    log p = l - softplus(l) and log(1 - p) = -softplus(l). x broadcasts against logits."""
    return (x * logits - softplus(logits)).sum(-1)


# ---- the loss, piece by piece: forward(...) -> (out, cache), backward(d<out>, cache) -> gradients-
# Each loss term returns one value per example (B,); its backward takes the loss's gradient with
# respect to that value (B,): 1/B for a batch mean. The reparameterization maps (mu, log_var) (B, Z)
# to z (B, Z).

def bernoulli_nll_forward(logits, x):
    """The reconstruction term -log p(x|z) per example: sum_j softplus(l_j) - x_j l_j, from the
    decoder's logits (B, D) and the images x (B, D) in [0, 1]."""
    nll = -log_bernoulli(x, logits)
    return nll, (logits, x)


def bernoulli_nll_backward(dnll, cache):
    logits, x = cache
    # d/dl [softplus(l) - x l] = sigmoid(l) - x, times the upstream gradient of each example
    dlogits = (sigmoid(logits) - x) * dnll[:, None]
    return dlogits


def reparameterize_forward(mu, log_var, eps):
    """z = mu + sigma * eps, sigma = exp(log_var / 2): a draw from N(mu, sigma^2) written as a
    function of mu and log_var, the randomness kept in eps ~ N(0, I), outside the model."""
    sigma = np.exp(0.5 * log_var)
    z = mu + sigma * eps
    return z, (eps, sigma)


def reparameterize_backward(dz, cache):
    eps, sigma = cache
    dmu = dz                                    # dz/dmu = 1
    dlog_var = dz * eps * sigma * 0.5           # dz/dsigma = eps, dsigma/dlog_var = sigma / 2
    # eps gets none: it is noise, a function of no parameter
    return dmu, dlog_var


def kl_normal_forward(mu, log_var):
    """KL(N(mu, sigma^2) || N(0, I)) per example in closed form (K&W Appendix B):
        KL = -1/2 sum_d (1 + log_var - mu^2 - exp(log_var))."""
    var = np.exp(log_var)
    kl = -0.5 * (1.0 + log_var - mu * mu - var).sum(1)
    return kl, (mu, var)


def kl_normal_backward(dkl, cache):
    # KL = 1/2 sum(mu^2 + exp(log_var) - log_var - 1), so:
    mu, var = cache
    # d/dmu [mu^2 / 2] = mu
    dmu = dkl[:, None] * mu
    # d/dlog_var [(exp(log_var) - log_var) / 2] = (sigma^2 - 1) / 2
    dlog_var = dkl[:, None] * 0.5 * (var - 1.0)
    return dmu, dlog_var


# ---- the model -----------------------------------------------------------------------------------

class Bernoulli:
    """p(x|z) = prod_j Bernoulli(x_j; sigmoid(l_j)), the recipe's likelihood: the pair above, log
    p(x|z), the mean E[x|z] = sigmoid(l), and a draw. On grey levels x in [0, 1] it is a
    cross-entropy, not a normalised density: likelihoods.py has densities over grey levels."""

    # What every likelihood has, so that the lab handles them alike (likelihoods.py's have more):
    # skip these on a first reading.
    name = "bernoulli"
    spec = "bernoulli"      # how the lab's --likelihoods names it
    outputs_per_pixel = 1   # the decoder gives one logit per pixel

    def __init__(self):
        self.params = {}    # the likelihood's own parameters: the Bernoulli has none
        self.grads = {}
        self.state = {}     # nor arrays that no gradient trains

    def forward(self, logits, x):
        return bernoulli_nll_forward(logits, x)

    def backward(self, dnll, cache):
        return bernoulli_nll_backward(dnll, cache)

    def log_density(self, x, logits):
        return log_bernoulli(x, logits)

    def mean(self, logits):
        return sigmoid(logits)

    def sample(self, logits, rng):
        """x_j ~ Bernoulli(sigmoid(l_j)): each pixel 0 or 1."""
        p = sigmoid(logits)
        return (rng.random(logits.shape) < p).astype(logits.dtype)


class VAE:
    """The standard VAE: an MLP encoder for q(z|x), z = mu + sigma * eps, an MLP decoder for p(x|z),
    the prior N(0, I). likelihood: the p(x|z) object (default: the Bernoulli above)."""

    prior_name = "standard"     # p(z) = N(0, I); priors.py has learned ones

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, likelihood=None,
                 layers=1, activation=ReLU):
        # seed: an int, or the Generator a subclass goes on using. layers: hidden layers on each
        # side (the recipe: 1, ReLU; Burda et al.: 2, Tanh).
        rng = np.random.default_rng(seed)
        self.n_in = n_in
        self.hidden = hidden
        self.latent = latent
        self.layers = layers
        self.activation = activation
        # 2Z outputs split into mu and log_var (the recipe's heads fc21 and fc22 in one product).
        # log_var, not sigma: any real output is valid, and sigma = exp(log_var / 2) is positive
        # whatever it is.
        hidden_sizes = [hidden] * layers
        self.encoder = MLP([n_in, *hidden_sizes, 2 * latent], rng, dtype, activation)
        self.likelihood = Bernoulli() if likelihood is None else likelihood
        # D logits (likelihoods.py's PixelGaussian takes 2 x D outputs: a log sigma per pixel too)
        n_out = n_in * self.likelihood.outputs_per_pixel
        self.decoder = MLP([latent, *hidden_sizes, n_out], rng, dtype, activation)

    def params(self):
        """{name: array} of every parameter, by reference (updating one updates the model)."""
        likelihood = {"likelihood." + k: p for k, p in self.likelihood.params.items()}
        encoder = self.encoder.named("params", "enc")
        decoder = self.decoder.named("params", "dec")
        return {**encoder, **decoder, **likelihood}

    def grads(self):
        """{name: dL/dparam}, filled by backward(), by reference."""
        likelihood = {"likelihood." + k: g for k, g in self.likelihood.grads.items()}
        encoder = self.encoder.named("grads", "enc")
        decoder = self.decoder.named("grads", "dec")
        return {**encoder, **decoder, **likelihood}

    def encode(self, x):
        """x (B, D) in [0, 1] -> mu, log_var (B, Z) of q(z|x)."""
        out = self.encoder.forward(x)
        mu = out[:, :self.latent]
        log_var = out[:, self.latent:]
        return mu, log_var

    def decode(self, z):
        """z (B, Z) -> logits (B, D), the parameters of p(x|z)."""
        return self.decoder.forward(z)

    # ---- training: the negative ELBO and its gradient --------------------------------------------

    def forward(self, x, eps):
        """Negative ELBO of the batch x (B, D) for the noise eps (B, Z): (loss, recon, kl), each the
        batch mean in nats per example, loss = recon + kl. A deterministic function of (params, x,
        eps)."""
        # q(z|x) = N(mu, diag(exp(log_var)))
        mu, log_var = self.encode(x)
        z, self.z_cache = reparameterize_forward(mu, log_var, eps)  # z = mu + sigma * eps
        logits = self.decode(z)                                     # the parameters of p(x|z)
        # -log p(x|z): Bernoulli.forward, that is bernoulli_nll_forward
        recon, self.recon_cache = self.likelihood.forward(logits, x)
        # KL(q(z|x) || p(z)): self.kl_forward below, that is kl_normal_forward
        kl = self.kl_forward(mu, log_var, z, eps)
        recon = float(recon.mean())
        kl = float(kl.mean())
        return recon + kl, recon, kl

    def backward(self, beta=1.0):
        """Gradients of mean_b(recon_b + beta * kl_b) at the last forward() into self.grads(); beta
        = 1 is the negative ELBO. self.paths keeps the four gradients that meet at the encoder's
        outputs (of the batch mean: an example's own gradient is B times its row)."""
        eps, sigma = self.z_cache
        # each example's share of the mean
        drecon = np.full(len(eps), 1.0 / len(eps), sigma.dtype)
        # the KL weight beta enters every KL path through dkl
        dkl = beta * drecon
        # Reconstruction: -log p(x|z) -> logits -> decoder -> z -> (mu, log_var).
        # the Bernoulli's: (sigmoid(logits) - x) / B (likelihoods.py has the others')
        dlogits = self.likelihood.backward(drecon, self.recon_cache)
        dz = self.decoder.backward(dlogits)
        # z = mu + sigma * eps: dmu_rec = dz, dlog_var_rec = dz * eps * sigma / 2
        dmu_rec, dlog_var_rec = reparameterize_backward(dz, self.z_cache)
        # KL(q(z|x) || p(z)) -> (mu, log_var).
        # N(0, I)'s: beta mu / B and beta (sigma^2 - 1) / (2B) (priors.py has the others')
        dmu_kl, dlog_var_kl = self.kl_backward(dkl)
        # The two paths meet at the encoder's outputs (for N(0, I) and the Bernoulli):
        dmu = dmu_rec + dmu_kl                  # dL/dmu = dz + beta mu / B
        # dL/dlog_var = dz eps sigma / 2 + beta (sigma^2 - 1) / (2B)
        dlog_var = dlog_var_rec + dlog_var_kl
        self.paths = {"recon_mu": dmu_rec, "kl_mu": dmu_kl,
                      "recon_log_var": dlog_var_rec, "kl_log_var": dlog_var_kl}
        # [mu, log_var] -> the encoder's weights. dL/dx is never needed: x is data.
        dout = np.concatenate([dmu, dlog_var], axis=1)
        self.encoder.backward(dout, need_dx=False)

    # ---- the prior, N(0, I): its KL term, and drawing from it. priors.py replaces these four. ----

    def kl_forward(self, mu, log_var, z, eps):
        """KL(q(z|x) || p(z)) per example: for N(0, I) in closed form, from mu and log_var alone (z
        and eps are for priors.py's KL, estimated at the sampled z)."""
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

    # ---- using a trained model -------------------------------------------------------------------

    def reconstruct(self, x):
        """The means E[x|z] of p(x|z) at z = mu(x), the posterior's centre: (B, D)."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))

    def sample_prior(self, n, rng):
        """n draws z ~ p(z), decoded to the means E[x|z] of p(x|z) (likelihood.sample draws x
        itself)."""
        z = self.sample_z(n, rng).astype(self.dtype)
        return self.likelihood.mean(self.decode(z))

    def sample_posterior(self, x, n, rng):
        """n images (the means of p(x|z)) for each row of x, decoded from z ~ q(z|x) = N(mu(x),
        sigma(x)^2): variations of x. Returns (len(x), n, D)."""
        mu, log_var = self.encode(x)
        eps = rng.standard_normal((n, len(x), self.latent)).astype(self.dtype)
        z, _ = reparameterize_forward(mu, log_var, eps)             # (n, len(x), Z)
        images = self.likelihood.mean(self.decode(z.reshape(-1, self.latent)))
        return images.reshape(n, len(x), -1).transpose(1, 0, 2)

    @property
    def dtype(self):
        return self.encoder.layers[0].params["W"].dtype
