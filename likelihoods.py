"""Other likelihoods p(x|z), each replacing vae.py's Bernoulli.

The decoder and its logits l stay the same (but for PixelGaussian, which adds a log sigma per
pixel); what changes is the distribution they parameterise, its negative log-density, and so the
gradient that flows back into the decoder, dL/dl:

    Gaussian             p(x|z) = N(x; sigmoid(l), sigma^2 I), one sigma for every pixel,
                         fixed, learned, or set to its optimum for each batch
    PixelGaussian        p(x|z) = N(x; sigmoid(l), diag(sigma^2)), a sigma for every pixel from
                         the decoder, which then gives 2 x D outputs: the logits l and log sigma
    ContinuousBernoulli  p(x|z) = prod_j C(l_j) lambda_j^x_j (1 - lambda_j)^(1 - x_j),
                         lambda = sigmoid(l)

All three are densities of grey levels, which the Bernoulli is not: the Gaussians over the real
line (their draws can fall outside [0, 1]), the continuous Bernoulli over [0, 1]. Each class has the
Bernoulli's interface: forward/backward (the loss pair), log_density, mean, sample, its own
params and grads, state (arrays saved with the model that no gradient trains) and
outputs_per_pixel (how many decoder outputs each pixel takes).
"""
import math

import numpy as np

from vae import LOG_2PI, bernoulli_nll_backward, bernoulli_nll_forward, sigmoid


# ---- the Gaussian with one sigma -----------------------------------------------------------------

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


def optimal_log_sigma(logits, x):
    """log sigma* for a batch: the sigma that minimises the batch's mean of -log N(x; m, sigma^2 I)
    for the current means m = sigmoid(l) (Rybkin et al. 2021). Setting the derivative of that mean
    in log sigma, D - sum_b sum_j (x_bj - m_bj)^2 / (B sigma^2), to 0:
        sigma*^2 = (1 / (B D)) sum_b sum_j (x_bj - m_bj)^2,   the mean squared error.
    Returned as log sigma* = log(MSE) / 2, an array of one value in the logits' dtype."""
    m = sigmoid(logits)
    mse = np.mean((x - m) ** 2)
    return np.full(1, 0.5 * np.log(mse), logits.dtype)


class Gaussian:
    """Replaces the Bernoulli: p(x|z) = N(x; sigmoid(l), sigma^2 I), one sigma for every pixel.
    decoder_sigma is
        a number    sigma fixed: the "MSE" VAE
        'learned'   log sigma a parameter ('likelihood.log_sigma'), trained by Adam with the rest
                    (the calibrated decoder of Rybkin et al. 2021); None means the same
        'optimal'   sigma set to its optimum sigma* for each training batch, with no gradient
                    (Rybkin et al.'s optimal sigma-VAE); outside training (test loss, iw_nll,
                    samples) the sigma* of the last epoch's training error (end_epoch). So its
                    forward, called by training alone, also adds the batch's squared error to
                    the epoch's sums; evaluation goes through log_density, which does not."""

    name = "gaussian"
    outputs_per_pixel = 1       # the decoder gives one logit per pixel

    def __init__(self, sigma, dtype):
        self.params = {}
        self.grads = {}
        # arrays saved with the model that no gradient trains (a fixed sigma, or the optimal
        # sigma's and its epoch's sums)
        self.state = {}
        if sigma in (None, "learned"):
            self.decoder_sigma = "learned"
            self.params["log_sigma"] = np.zeros(1, dtype)
            self.grads["log_sigma"] = np.zeros(1, dtype)
        elif sigma == "optimal":
            self.decoder_sigma = "optimal"
            # the sigma used outside training, and the epoch's squared error it is set from
            self.state["log_sigma"] = np.zeros(1, dtype)
            self.state["epoch_squared_error"] = np.zeros(1)
            self.state["epoch_pixels"] = np.zeros(1)
        else:
            self.decoder_sigma = float(sigma)
            self.state["log_sigma"] = np.full(1, math.log(self.decoder_sigma), dtype)
        sigma_text = self.decoder_sigma
        if isinstance(sigma_text, float):
            sigma_text = f"{sigma_text:g}"
        self.spec = f"gaussian:{sigma_text}"        # how --likelihoods names it

    def log_sigma(self):
        """log sigma outside training: the learned parameter, the fixed value, or the optimal
        sigma's last end_epoch()."""
        if self.decoder_sigma == "learned":
            return self.params["log_sigma"]
        return self.state["log_sigma"]

    def forward(self, logits, x):
        """The training loss pair's forward: -log p(x|z) per example."""
        if self.decoder_sigma != "optimal":
            return gaussian_nll_forward(logits, x, self.log_sigma())
        log_sigma = optimal_log_sigma(logits, x)
        nll, cache = gaussian_nll_forward(logits, x, log_sigma)
        # the epoch's squared error, from which end_epoch() sets the sigma used outside training
        _, _, _, sse = cache
        self.state["epoch_squared_error"] += sse.sum()      # sum_b sum_j (x_bj - m_bj)^2
        self.state["epoch_pixels"] += x.size
        return nll, cache

    def backward(self, dnll, cache):
        # dlog_sigma is dropped for the optimal sigma, and that loses nothing (the envelope
        # theorem): the loss is L(theta, sigma*(theta)), so
        #     dL/dtheta = dL/dtheta at sigma* held fixed + dL/dsigma * dsigma*/dtheta,
        # and dL/dsigma = 0 at sigma*, the minimiser of the batch mean. The gradient with sigma*
        # held fixed is the whole gradient (for the batch mean: dnll equal for every example).
        dlogits, dlog_sigma = gaussian_nll_backward(dnll, cache)
        if self.decoder_sigma == "learned":
            self.grads["log_sigma"][...] = dlog_sigma
        return dlogits

    def end_epoch(self):
        """The optimal sigma outside training: sigma*^2 = the mean squared error over the epoch's
        training batches (every training image once, its z drawn from q(z|x) as in training)."""
        mse = self.state["epoch_squared_error"] / self.state["epoch_pixels"]
        self.state["log_sigma"][...] = 0.5 * np.log(mse)
        self.state["epoch_squared_error"][...] = 0
        self.state["epoch_pixels"][...] = 0

    def log_density(self, x, logits):
        nll, _ = gaussian_nll_forward(logits, x, self.log_sigma())
        return -nll

    def mean(self, logits):
        return sigmoid(logits)

    def sigma(self, logits):
        """sigma of every pixel (B, D): here the one sigma, broadcast."""
        return np.broadcast_to(np.exp(self.log_sigma()), logits.shape)

    def sample(self, logits, rng):
        """x = m + sigma * noise: grey levels, some outside [0, 1]."""
        sigma = np.exp(self.log_sigma())
        x = sigmoid(logits) + sigma * rng.standard_normal(logits.shape)
        return x.astype(logits.dtype)


# ---- the Gaussian with a sigma per pixel ---------------------------------------------------------

def pixel_gaussian_nll_forward(outputs, x):
    """-log N(x; m, diag(sigma^2)) per example, the paper's Gaussian MLP as the decoder (K&W
    Appendix C.2, with the mean through a sigmoid and log sigma in place of log sigma^2): the
    decoder's 2 x D outputs are the means' logits l (the first D) and the log sigmas s (the last
    D), pixel by pixel, m = sigmoid(l), sigma = exp(s):
        sum_j [(x_j - m_j)^2 / (2 sigma_j^2) + log sigma_j] + D/2 log 2 pi.
    Unbounded below: as m_j closes on x_j with sigma_j shrinking alongside, it falls to -infinity
    (Mattei & Frellsen 2018), which pixels that are 0 in most images invite (float32's sigmoid
    reaches 0 itself from l = -20 on). outputs (..., 2 x D) broadcasts against x."""
    d = x.shape[-1]
    logits = outputs[..., :d]
    log_sigma = outputs[..., d:]
    m = sigmoid(logits)
    diff = m - x
    inv_var = np.exp(-2 * log_sigma)            # 1 / sigma_j^2
    per_pixel = 0.5 * diff * diff * inv_var + log_sigma
    nll = per_pixel.sum(-1) + d * 0.5 * LOG_2PI
    return nll, (m, diff, inv_var)


def pixel_gaussian_nll_backward(dnll, cache):
    m, diff, inv_var = cache
    scaled = diff * inv_var                     # (m_j - x_j) / sigma_j^2
    # d/dl_j = (m_j - x_j) / sigma_j^2 * m_j (1 - m_j)
    dlogits = scaled * m * (1 - m) * dnll[:, None]
    # d/ds_j [(x_j - m_j)^2 exp(-2 s_j) / 2 + s_j] = 1 - (x_j - m_j)^2 / sigma_j^2
    dlog_sigma = (1 - diff * scaled) * dnll[:, None]
    return np.concatenate([dlogits, dlog_sigma], axis=-1)


class PixelGaussian:
    """Replaces the Bernoulli: p(x|z) = N(x; sigmoid(l), diag(sigma^2)), a sigma for every pixel of
    every image. The decoder gives 2 x D outputs per image (outputs_per_pixel = 2): D logits of the
    means, then D log sigmas. Train it on dequantized pixels (--dequantize): on raw pixels its
    density is unbounded (pixel_gaussian_nll_forward)."""

    name = "gaussian"
    decoder_sigma = "per-pixel"
    spec = "gaussian:per-pixel"
    outputs_per_pixel = 2

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.state = {}

    def forward(self, outputs, x):
        return pixel_gaussian_nll_forward(outputs, x)

    def backward(self, dnll, cache):
        return pixel_gaussian_nll_backward(dnll, cache)

    def log_density(self, x, outputs):
        nll, _ = pixel_gaussian_nll_forward(outputs, x)
        return -nll

    def mean(self, outputs):
        d = outputs.shape[-1] // 2
        return sigmoid(outputs[..., :d])

    def sigma(self, outputs):
        """sigma_j = exp(s_j) of every pixel (..., D)."""
        d = outputs.shape[-1] // 2
        return np.exp(outputs[..., d:])

    def sample(self, outputs, rng):
        """x_j = m_j + sigma_j * noise_j."""
        m = self.mean(outputs)
        x = m + self.sigma(outputs) * rng.standard_normal(m.shape)
        return x.astype(outputs.dtype)


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
    outputs_per_pixel = 1

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.state = {}

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
