"""Other likelihoods p(x|z), each replacing vae.py's Bernoulli.

The decoder and its logits l stay the same; what changes is the distribution they parameterise, its
negative log-density, and so the gradient that flows back into the decoder, dL/dl:

    Gaussian             p(x|z) = N(x; sigmoid(l), sigma^2 I), one sigma for every pixel,
                         fixed or learned
    ContinuousBernoulli  p(x|z) = prod_j C(l_j) lambda_j^x_j (1 - lambda_j)^(1 - x_j),
                         lambda = sigmoid(l)

Both are densities of grey levels, which the Bernoulli is not: the Gaussian over the real line (its
draws can fall outside [0, 1]), the continuous Bernoulli over [0, 1]. Each class has the
Bernoulli's interface: forward/backward (the loss pair), log_density, mean, sample, and its own
params and grads.
"""
import math

import numpy as np

from vae import LOG_2PI, bernoulli_nll_backward, bernoulli_nll_forward, sigmoid


# ---- the Gaussian --------------------------------------------------------------------------------

def gaussian_nll_forward(logits, x, log_sigma):
    """-log N(x; m, sigma^2 I) per example, with mean m = sigmoid(l) (in [0, 1], like the pixels,
    from the same decoder as the Bernoulli's) and one sigma for every pixel:
        sum_j (x_j - m_j)^2 / (2 sigma^2) + D log sigma + D/2 log 2 pi.
    With sigma fixed this is the squared error scaled by 1 / (2 sigma^2): the "MSE" VAE, whose KL
    weighs 2 sigma^2 against the squared error."""
    m = sigmoid(logits)
    diff = m - x
    inv_var = np.exp(-2 * log_sigma)            # 1 / sigma^2
    sse = (diff * diff).sum(-1)                 # sum_j (x_j - m_j)^2
    nll = 0.5 * inv_var * sse + x.shape[-1] * (log_sigma + 0.5 * LOG_2PI)
    return nll, (m, diff, inv_var, sse)


def gaussian_nll_backward(dnll, cache):
    m, diff, inv_var, sse = cache
    # d/dm = (m - x) / sigma^2, and dm/dl = m (1 - m)
    dlogits = diff * (inv_var * dnll[:, None]) * m * (1 - m)
    # d/dlog sigma = D - sum_j (x_j - m_j)^2 / sigma^2, summed over the examples (one sigma, shared)
    n_pixels = diff.shape[-1]
    dlog_sigma = (dnll * (n_pixels - inv_var * sse)).sum()
    return dlogits, dlog_sigma


class Gaussian:
    """Replaces the Bernoulli: p(x|z) = N(x; sigmoid(l), sigma^2 I). sigma: a number (fixed), or
    'learned' (or None): one log sigma shared by every pixel, the parameter 'likelihood.log_sigma',
    the calibrated decoder of Rybkin et al. 2021."""

    name = "gaussian"

    def __init__(self, sigma, dtype):
        learned = sigma in (None, "learned")
        self.params = {}
        self.grads = {}
        if learned:
            self.decoder_sigma = "learned"
            self.params["log_sigma"] = np.zeros(1, dtype)
            self.grads["log_sigma"] = np.zeros(1, dtype)
            self.fixed_log_sigma = None
        else:
            self.decoder_sigma = float(sigma)
            self.fixed_log_sigma = np.full(1, math.log(self.decoder_sigma), dtype)
        sigma_text = "learned" if learned else f"{self.decoder_sigma:g}"
        self.spec = f"gaussian:{sigma_text}"        # how --likelihoods names it

    def log_sigma(self):
        if self.params:
            return self.params["log_sigma"]
        return self.fixed_log_sigma

    def forward(self, logits, x):
        return gaussian_nll_forward(logits, x, self.log_sigma())

    def backward(self, dnll, cache):
        dlogits, dlog_sigma = gaussian_nll_backward(dnll, cache)
        if self.grads:
            self.grads["log_sigma"][...] = dlog_sigma
        return dlogits

    def log_density(self, x, logits):
        nll, _ = gaussian_nll_forward(logits, x, self.log_sigma())
        return -nll

    def mean(self, logits):
        return sigmoid(logits)

    def sample(self, logits, rng):
        """x = m + sigma * noise: grey levels, some outside [0, 1]."""
        sigma = np.exp(self.log_sigma())
        x = sigmoid(logits) + sigma * rng.standard_normal(logits.shape)
        return x.astype(logits.dtype)


# ---- the continuous Bernoulli --------------------------------------------------------------------

def cb_log_normalizer(logits):
    """log C(l), the continuous Bernoulli's normaliser (Loaiza-Ganem & Cunningham 2019) at lambda =
    sigmoid(l): C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), which is l / tanh(l / 2) in logits (1 -
    2 lambda = -tanh(l / 2), and artanh(-tanh(l / 2)) = -l / 2). Its removable singularity at l = 0
    causes no cancellation in this form: tanh(l / 2) is l / 2 to the last bit for small l, so the
    ratio is exact to rounding everywhere, and its limit 2 is taken at l = 0."""
    ratio = np.full_like(logits, 2.0)
    np.divide(logits, np.tanh(0.5 * logits), out=ratio, where=logits != 0)
    return np.log(ratio)


def cb_log_normalizer_grad(logits):
    """d log C / dl = 1/l - 1/sinh(l). The two terms cancel as l -> 0, so for |l| < 0.2 the Taylor
    series
        l/6 - 7 l^3/360 + 31 l^5/15120 - 127 l^7/604800 + 73 l^9/3421440 - 1414477 l^11/653837184000
    (the next term is below 6e-15 of the sum there; the direct form loses at most 1.7e-15 / l^2
    relative, 4.2e-14 at l = 0.2). Computed in float64 and rounded once to the logits' dtype:
    float32's direct form would lose 6e-7 / l^2."""
    dtype = np.asarray(logits).dtype
    logits = np.asarray(logits, np.float64)
    small = np.abs(logits) < 0.2
    l = np.where(small, logits, 0.2)            # either branch stays finite where it is not used
    l2 = l * l
    inner = 73 / 3421440 - l2 * 1414477 / 653837184000
    inner = -127 / 604800 + l2 * inner
    inner = 31 / 15120 + l2 * inner
    inner = -7 / 360 + l2 * inner
    series = l * (1 / 6 + l2 * inner)           # Horner's form of the series above
    big = np.where(small, 1.0, logits)
    with np.errstate(over="ignore"):            # sinh overflows to inf for |l| > 710: 1/inf = 0
        direct = 1 / big - 1 / np.sinh(big)
    return np.where(small, series, direct).astype(dtype)


def cb_nll_forward(logits, x):
    """-log p(x|z) for the continuous Bernoulli, p(x|l) = C(l) lambda^x (1 - lambda)^(1 - x) on [0,
    1]: a density over grey levels. It is the Bernoulli's cross-entropy less the log normaliser,
    summed over the pixels."""
    bce, cache = bernoulli_nll_forward(logits, x)
    nll = bce - cb_log_normalizer(logits).sum(-1)
    return nll, cache


def cb_nll_backward(dnll, cache):
    logits, _ = cache
    # d/dl = sigmoid(l) - x - d log C / dl = E[x|l] - x
    dlogits_bce = bernoulli_nll_backward(dnll, cache)
    return dlogits_bce - cb_log_normalizer_grad(logits) * dnll[:, None]


def cb_mean(logits):
    """E[x] under the continuous Bernoulli: lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)),
    which is sigmoid(l) - d log C / dl in logits; not lambda itself (the error the paper warns of).
    1/2 at l = 0."""
    return sigmoid(logits) - cb_log_normalizer_grad(logits)


class ContinuousBernoulli:
    """Replaces the Bernoulli: p(x|z) = prod_j CB(x_j; sigmoid(l_j)), the Bernoulli normalised over
    [0, 1]."""

    name = "cb"
    spec = "cb"

    def __init__(self):
        self.params = {}
        self.grads = {}

    def forward(self, logits, x):
        return cb_nll_forward(logits, x)

    def backward(self, dnll, cache):
        return cb_nll_backward(dnll, cache)

    def log_density(self, x, logits):
        nll, _ = cb_nll_forward(logits, x)
        return -nll

    def mean(self, logits):
        return cb_mean(logits)

    def sample(self, logits, rng):
        """By the inverse of the CDF F(x) = (e^(l x) - 1) / (e^l - 1): x = log(1 + u (e^l - 1)) / l,
        u ~ U(0, 1), written for -|l| (no overflow) and mirrored, x -> 1 - x, for l > 0; x = u at l
        = 0."""
        l = np.asarray(logits, np.float64)
        u = rng.random(l.shape)
        neg = -np.abs(l)
        u = np.where(l > 0, 1 - u, u)
        safe_neg = np.where(neg == 0, 1, neg)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse_cdf = np.log1p(u * np.expm1(neg)) / safe_neg
        x = np.where(neg == 0, u, inverse_cdf)
        return np.where(l > 0, 1 - x, x).astype(logits.dtype)
