"""Measurements of a trained VAE: how well it explains the test set, and how its aggregated
posterior sits against its prior. Each function returns numbers (report.py records and draws them).

    negative_elbo   -ELBO = -log p(x|z) + KL(q(z|x) || p(z)): the test loss, at beta = 1
    iw_nll          -log p(x) ~ -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x), importance weighting
                    (Burda et al. 2016)
    q(z) = (1/N) sum_n q(z|x_n), the aggregated posterior: the codes of all the images together
    elbo_surgery    mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z))
                    (Hoffman & Johnson 2016)
    holes    prior draws whose density under the fitted q(z) is under that of 99% of the test codes

Two aggregated posteriors are used. The ELBO surgery and the moments take q(z) over the 10,000 test
images, exactly (all N components). The holes and sampling from q(z) take a Gaussian mixture fitted
by EM to codes z_n ~ q(z|x_n) of 20,000 training images (gmm.py): it gives a smooth density at any
point, where the exact q(z) at a code is dominated by that code's own component.
"""
import contextlib
import math
import time

import numpy as np

import mnist
from priors import logsumexp
from vae import LOG_2PI, log_normal, reparameterize_forward

from lab.codes import draw_codes, encode_all, interpolate
from lab.gmm import fit_gmm, gmm_log_density, gmm_sample

FITTED_CODES = 20000    # the mixture that stands in for q(z) is fitted to this many training codes


def codes_needed(components, covariance, latent):
    """The fewest codes a mixture of M components can be fitted to and mean something: a full
    covariance in Z dimensions is singular unless its component has more than Z codes, so M (Z + 1);
    a diagonal one needs two codes a component, so 2M. Below that the holes are not measured."""
    if covariance == "full":
        return components * (latent + 1)
    return 2 * components


def negative_elbo(model, images, seed, batch_size=250):
    """Test negative ELBO (loss, recon, kl) in nats per example, one z per image, with the same eps
    every time it is called (so epochs and runs compare). The terms of model.forward, from the
    likelihood's log_density: for the optimal-sigma Gaussian, the sigma it uses outside training."""
    # a stream of its own: evaluating never moves training's
    rng = np.random.default_rng([seed, 1])
    sums = np.zeros(3)
    for i in range(0, len(images), batch_size):
        x = mnist.to_float(images[i:i + batch_size], model.dtype)
        eps = rng.standard_normal((len(x), model.latent)).astype(model.dtype)
        mu, log_var = model.encode(x)
        z, _ = reparameterize_forward(mu, log_var, eps)                 # z = mu + sigma * eps
        recon = -model.likelihood.log_density(x, model.decode(z))      # -log p(x|z)
        kl = model.kl_forward(mu, log_var, z, eps)                      # KL(q(z|x) || p(z))
        recon = float(recon.mean())
        kl = float(kl.mean())
        sums += np.array([recon + kl, recon, kl]) * len(x)
    loss, recon, kl = sums / len(images)
    return loss, recon, kl


def decoder_sigma(model, images, n_images=1000):
    """A Gaussian decoder's sigma: {"sigma": the one sigma it uses outside training}, or for a sigma
    per pixel {"smallest", "median", "largest"} over every pixel of the first n_images images,
    decoded at their posterior means."""
    likelihood = model.likelihood
    if likelihood.decoder_sigma != "per-pixel":
        return {"sigma": float(np.exp(likelihood.log_sigma())[0])}
    mu, _ = encode_all(model, images[:n_images])
    sigma = likelihood.sigma(model.decode(mu.astype(model.dtype)))
    return {"smallest": float(sigma.min()), "median": float(np.median(sigma)),
            "largest": float(sigma.max())}


# ---- the aggregated posterior --------------------------------------------------------------------

def aggregate_posterior_moments(mu, log_var, threshold=0.01):
    """Per-dimension mean and variance of q(z) = (1/N) sum_n N(mu_n, sigma_n^2), and the active
    units.

    E[z] = mean_n mu_n;  Var[z] = mean_n (mu_n^2 + sigma_n^2) - E[z]^2   (the law of total variance)
    active: Cov_x(E_q[z|x]) = Var_n(mu_n) > threshold (Burda et al. 2016)."""
    mu = np.asarray(mu, np.float64)
    var = np.exp(np.asarray(log_var, np.float64))
    mean = mu.mean(axis=0)
    variance = (mu * mu + var).mean(axis=0) - mean ** 2
    activity = mu.var(axis=0)
    return {"mean": mean.tolist(), "variance": variance.tolist(), "activity": activity.tolist(),
            "active_units": int((activity > threshold).sum())}


def log_normal_pairs(z, mean, log_var, rows=64):
    """log N(z_n; mean_m, diag(exp(log_var_m))) for every row n of z (N, Z) and every row m of mean
    and log_var (M, Z): the (N, M) matrix of vae.log_normal(z[:, None], mean, log_var), yielded
    `rows` rows at a time.

    Computed in a faster form that equals it (a test holds the two equal): log N(z; m, v) is linear
    in (z^2, z, 1),
        -1/2 [z^2 . 1/v - 2 z . m/v + m^2 . 1/v + sum log v + Z log 2 pi],
    so a block of rows is one matrix product [z^2, z, 1] @ W with W made once. Its rounding is
    ~1e-16 of the terms: where they pass 1e10 (variances near 0) the direct form is used instead."""
    inv_var = np.exp(-log_var)
    constant = (mean * mean * inv_var).sum(-1) + log_var.sum(-1) + z.shape[-1] * LOG_2PI
    weight_z2 = -0.5 * inv_var.T                    # the weights of z^2,
    weight_z = (mean * inv_var).T                   # of z,
    weight_1 = -0.5 * constant[None]                # and of 1
    w = np.concatenate([weight_z2, weight_z, weight_1])
    largest_term = np.abs(w).max() * max((z * z).max(initial=0.0), 1.0)
    expansion_safe = largest_term < 1e10
    for i in range(0, len(z), rows):
        zi = z[i:i + rows]
        if expansion_safe:
            features = np.concatenate([zi * zi, zi, np.ones((len(zi), 1))], 1)
            yield features @ w
        else:
            yield log_normal(zi[:, None], mean, log_var)


def elbo_surgery(mu, log_var, rng, log_prior):
    """Split the average KL term as Hoffman & Johnson (2016): with q(z) = (1/N) sum_n q(z|x_n),

        mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z)),
        I(x; z) = E_n E_q(z|x_n)[log q(z|x_n) - log q(z)],
        KL(q(z) || p(z)) = E_q(z)[log q(z) - log p(z)].

    Each is estimated with one z_n ~ q(z|x_n) per data point; log q(z) sums over all N components
    (log-sum-exp). log_prior: a function of z, log p(z). Returns the two terms in nats and their
    sum, to be compared with the average KL computed directly."""
    mu = np.asarray(mu, np.float64)
    log_var = np.asarray(log_var, np.float64)
    z = draw_codes(mu, log_var, rng)
    log_q_own = log_normal(z, mu, log_var)                      # log q(z_n | x_n)
    # log q(z_n) = log (1/N) sum_m q(z_n | x_m), a block of rows n at a time
    blocks = [logsumexp(block, 1, overwrite=True) for block in log_normal_pairs(z, mu, log_var)]
    log_q_agg = np.concatenate(blocks) - np.log(len(z))
    mi = float((log_q_own - log_q_agg).mean())
    kl_agg = float((log_q_agg - log_prior(z)).mean())
    return {"mutual_information": mi, "kl_aggregate_prior": kl_agg,
            "mutual_information_plus_kl_aggregate_prior": mi + kl_agg}


def prior_hole_fraction(gmm, z_codes, z_draws, quantile=0.01):
    """Share of draws whose density under the fitted aggregated posterior is below that of 99% of
    the codes z_codes: they land where (almost) no image encodes. Also returns the threshold and the
    mask."""
    threshold = np.quantile(gmm_log_density(gmm, z_codes), quantile)
    in_hole = gmm_log_density(gmm, z_draws) < threshold
    return float(in_hole.mean()), float(threshold), in_hole


def path_measures(gmm, threshold, z0, z1, steps=20):
    """Along the paths from each row of z0 to the same row of z1 (n, Z), linear and spherical
    (codes.interpolate), at `steps` points strictly between the ends (t = 1/(steps + 1), ...,
    steps/(steps + 1)): the share of points in holes (log q_fit(z) below the threshold of the prior
    draws' holes), the mean log-density log q_fit(z) of the points, and the mean norm at the
    midpoint t = 1/2."""
    found = {}
    for kind in ("linear", "spherical"):
        path = interpolate(z0, z1, steps + 2, kind)[1:-1]          # (steps, n, Z), the ends dropped
        points = path.reshape(-1, path.shape[-1])
        log_density = gmm_log_density(gmm, points)
        midpoint = interpolate(z0, z1, 3, kind)[1]
        found[kind] = {"hole_fraction": float((log_density < threshold).mean()),
                       "mean_log_density": float(log_density.mean()),
                       "midpoint_norm": float(np.linalg.norm(midpoint, axis=-1).mean())}
    return found


def interpolation_measures(model, gmm, threshold, mu_test, seed, n_pairs=200, steps=20):
    """path_measures for n_pairs random pairs of test codes (posterior means of two different test
    images) and n_pairs pairs of independent prior draws, with sqrt(Z), the norm of a typical prior
    draw, to compare the midpoints' norms with. A random stream of its own: the other measurements
    keep their numbers."""
    rng = np.random.default_rng([seed, 7])
    first = rng.choice(len(mu_test), n_pairs)
    # never the same image
    second = (first + rng.integers(1, len(mu_test), n_pairs)) % len(mu_test)
    z_prior = model.sample_z(2 * n_pairs, rng)
    return {"pairs": n_pairs, "steps": steps, "sqrt_latent": float(np.sqrt(mu_test.shape[1])),
            "codes": path_measures(gmm, threshold, mu_test[first], mu_test[second], steps),
            "prior": path_measures(gmm, threshold, z_prior[:n_pairs], z_prior[n_pairs:], steps)}


# ---- the likelihood of the test images -----------------------------------------------------------

def iw_nll(model, images, n_samples, rng, eps=None, batch_size=25, progress=None):
    """Importance-weighted estimate of -log p(x) per image (one value each), from S = n_samples
    draws z_s ~ q(z|x) per image:

        -log p(x) ~ -log (1/S) sum_s w_s,   w_s = p(x|z_s) p(z_s) / q(z_s|x),
        z_s = mu + sigma * eps_s

    An upper bound on -log p(x) in expectation (Jensen: E log mean_s w_s <= log E w_s = log p(x))
    that falls towards it as S grows (Burda et al. 2016, who call S 'k'); for S = 1 it is the
    negative ELBO with the KL estimated at the one z. images: uint8 pixels, or intensities already
    in [0, 1] (float). eps (S, len(images), Z) may be given; progress: a function of the fraction
    done.

    The work is blocked for speed, which changes no value (a test holds it to the formula computed
    directly): images 25 at a time; their S codes decoded ten slices per product; the log-density
    taken one slice (about 250 codes) at a time."""
    s = n_samples
    latent = model.latent
    out = np.empty(len(images))
    for i in range(0, len(images), batch_size):
        x = mnist.to_float(images[i:i + batch_size], model.dtype)
        mu, log_var = (a.astype(np.float64) for a in model.encode(x))
        e = rng.standard_normal((s, len(x), latent)) if eps is None else eps[:, i:i + batch_size]
        z, _ = reparameterize_forward(mu, log_var, e)                  # (S, B, Z)
        log_px = np.empty((s, len(x)), model.dtype)                     # log p(x|z_s), (S, B)
        samples_per_slice = max(1, 250 // len(x))
        samples_per_product = 10 * samples_per_slice
        for a in range(0, s, samples_per_product):
            codes = z[a:a + samples_per_product].reshape(-1, latent).astype(model.dtype)
            outputs = model.decode(codes)
            # (samples, B, D) logits (2 x D outputs for a sigma per pixel)
            logits = outputs.reshape(-1, len(x), outputs.shape[-1])
            for j in range(0, len(logits), samples_per_slice):
                logits_slice = logits[j:j + samples_per_slice]
                rows = slice(a + j, a + j + len(logits_slice))
                log_px[rows] = model.likelihood.log_density(x, logits_slice)
        # log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), (S, B), in float64
        log_prior = model.log_prior(z.reshape(-1, latent)).reshape(s, -1)
        log_w = log_px.astype(np.float64) + log_prior - log_normal(z, mu, log_var)
        out[i:i + batch_size] = np.log(s) - logsumexp(log_w, 0, overwrite=True)   # -log mean_s w_s
        if progress:
            progress(min(i + batch_size, len(images)) / len(images))
    return out


def bits_per_dim(model, x_test, iw_samples, rng, progress=None):
    """For a density over grey levels (the Gaussians, the continuous Bernoulli): a bound in bits per
    dimension on the 8-bit test images by uniform dequantization (Theis et al. 2016). With x =
    (pixel + u) / 256, u ~ U(0, 1)^D,
        -log P(pixels) <= -E_u log p(x) + D log 256,
    since P(pixels) = 256^-D E_u p(x) >= 256^-D exp(E_u log p(x)); -log p(x) is bounded by iw_nll at
    one u per image. The Bernoulli on grey levels has no such number: it is not a density over [0,
    1], so it gives no probability to a pixel's bin. (A run trained with --dequantize has its test
    set dequantized already: analyze takes its iw_nll, bits_from_nats.)"""
    # pixel k's bin is [k, k + 1) / 256, 256 bins of equal width over [0, 1] (training scales
    # pixels by 255, so that 0 and 255 map to 0 and 1; the bound needs the bins)
    x = mnist.dequantize(x_test, rng)
    nll = iw_nll(model, x, iw_samples, rng, progress=progress).mean()
    return bits_from_nats(nll, x_test.shape[1])


def bits_from_nats(nll, d):
    """-log p(x) <= nll nats on dequantized images x in [0, 1]^D, as the bound on the 8-bit pixels
    in bits per dimension: (nll + D log 256) / (D log 2)."""
    return float((nll + d * math.log(256)) / (d * math.log(2)))


# ---- all of it, after training -------------------------------------------------------------------

@contextlib.contextmanager
def phase(name, seconds, log, message):
    """Say what is being measured, then record how long it took in seconds[name]."""
    log(message)
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0


def training_codes(model, x_train, rng):
    """One z_n ~ q(z|x_n) per training image (their mu and log_var are let go on return)."""
    mu, log_var = encode_all(model, x_train)
    return draw_codes(mu, log_var, rng)


def fit_aggregate_posterior(model, x_train, x_test, rng, gmm_components, gmm_covariance, seconds,
                            log):
    """The mixture fitted to training codes, and the holes it shows in the prior. Its hole threshold
    and held-out log-likelihood come from test codes, which it was not fitted on."""
    message = f"encoding {len(x_train)} training and {len(x_test)} test images"
    with phase("encode", seconds, log, message):
        z_train = training_codes(model, x_train, rng)
        mu, log_var = encode_all(model, x_test)
    n_fit = min(len(z_train), FITTED_CODES)
    fit_on = z_train[rng.choice(len(z_train), n_fit, replace=False)]
    message = (f"fitting a {gmm_components}-component {gmm_covariance} Gaussian mixture to {n_fit} "
               f"training codes by EM, and counting the prior's holes")
    with phase("em", seconds, log, message):
        gmm = fit_gmm(fit_on, gmm_components, gmm_covariance, rng=rng)
        z_test = draw_codes(mu, log_var, rng)
        z_prior = model.sample_z(10000, rng)
        hole_fraction, threshold, in_hole = prior_hole_fraction(gmm, z_test, z_prior)
        z_fitted = gmm_sample(gmm, 10000, rng)
        fitted_hole_fraction, _, _ = prior_hole_fraction(gmm, z_test, z_fitted)
        held_out = float(gmm_log_density(gmm, z_test).mean())
    iterations = len(gmm["log_likelihood"])
    log(f"  {iterations} EM iterations, {held_out:.2f} nats per held-out test code; "
        f"{100 * hole_fraction:.1f}% of prior draws fall in its holes")
    fit = {"components": gmm_components, "covariance": gmm_covariance, "fitted_on": n_fit,
           "em_iterations": iterations, "log_likelihood": gmm["log_likelihood"][-1],
           "held_out_log_likelihood": held_out}
    holes = {"prior_hole_fraction": hole_fraction,
             "aggregate_sample_hole_fraction": fitted_hole_fraction,
             "hole_log_density_threshold": threshold, "gmm": fit}
    found = {"gmm": gmm, "z_train": z_train, "z_prior": z_prior, "in_hole": in_hole, "mu_test": mu,
             "log_var_test": log_var}
    return holes, found


def analyze(model, x_train, x_test, seed, iw_samples, gmm_components, gmm_covariance, log=print,
            progress=lambda what: None, dequantized=False):
    """Every measurement above for a trained model: (metrics to record, arrays the figures draw).
    log(line) says what each measurement is before it starts; progress(what) may give a function of
    the fraction done. dequantized: the images are dequantized already (--dequantize)."""
    rng = np.random.default_rng([seed, 3])
    seconds = {}
    holes, found = fit_aggregate_posterior(model, x_train, x_test, rng, gmm_components,
                                           gmm_covariance, seconds, log)
    gmm = found["gmm"]
    mu = found["mu_test"]
    log_var = found["log_var_test"]

    # On the test set: moments of q(z), active units, ELBO surgery, the KL to the fitted q(z).
    message = f"ELBO surgery on the {len(mu)} test codes: I(x;z) and KL(q(z)||p(z))"
    with phase("surgery", seconds, log, message):
        moments = aggregate_posterior_moments(mu, log_var)
        surgery = elbo_surgery(mu, log_var, rng, model.log_prior)
        eps = rng.standard_normal(mu.shape)
        z, _ = reparameterize_forward(mu, log_var, eps)
        surgery["average_kl"] = float(model.kl_forward(mu, log_var, z, eps).mean())
        kl_to_fitted = log_normal(z, mu, log_var) - gmm_log_density(gmm, z)
        surgery["kl_to_fitted_aggregate"] = float(kl_to_fitted.mean())
    log(f"  I(x;z) {surgery['mutual_information']:.2f} + KL(q(z)||p(z)) "
        f"{surgery['kl_aggregate_prior']:.2f} nats; {moments['active_units']} active units")
    found["moments"] = moments

    decodes = iw_samples * len(x_test)
    message = (f"importance-weighted bound on -log p(x), S={iw_samples} per test image "
               f"({decodes:,} decodes)")
    with phase("iw_nll", seconds, log, message):
        per_image = iw_nll(model, x_test, iw_samples, rng, progress=progress("iw_nll"))
        iw = float(per_image.mean())
    log(f"  -log p(x) <= {iw:.2f} nats")
    metrics = {"iw_nll": iw, "iw_samples": iw_samples}
    likelihood = model.likelihood
    if likelihood.name == "gaussian":
        metrics["decoder_sigma"] = decoder_sigma(model, x_test, len(x_test))
    if likelihood.name != "bernoulli" and dequantized:
        metrics["bits_per_dim"] = bits_from_nats(iw, x_test.shape[1])
        log(f"  {metrics['bits_per_dim']:.3f} bits per dimension on the 8-bit images (the test "
            f"images are dequantized: the same bound)")
    elif likelihood.name != "bernoulli":
        message = "the same bound on dequantized test images, in bits per dimension"
        with phase("bits_per_dim", seconds, log, message):
            metrics["bits_per_dim"] = bits_per_dim(model, x_test, iw_samples, rng,
                                                   progress("bits per dimension"))
        log(f"  {metrics['bits_per_dim']:.3f} bits per dimension on the 8-bit images")
    message = "paths between test codes and between prior draws, linear and spherical"
    with phase("interpolation", seconds, log, message):
        threshold = holes["hole_log_density_threshold"]
        walks = interpolation_measures(model, gmm, threshold, mu, seed)
    log(interpolation_line(walks))
    metrics["interpolation"] = walks
    metrics["analysis_seconds"] = seconds
    metrics["aggregate_posterior"] = {**moments, **surgery, **holes}
    return metrics, found


def interpolation_line(walks):
    """What interpolation_measures found, in one line."""
    codes = walks["codes"]
    prior = walks["prior"]
    return (f"  points in holes, linear / spherical paths: between test codes "
            f"{codes['linear']['hole_fraction']:.1%} / {codes['spherical']['hole_fraction']:.1%}, "
            f"between prior draws {prior['linear']['hole_fraction']:.1%} / "
            f"{prior['spherical']['hole_fraction']:.1%}; midpoint norm of prior pairs "
            f"{prior['linear']['midpoint_norm']:.2f} / {prior['spherical']['midpoint_norm']:.2f} "
            f"(sqrt(Z) = {walks['sqrt_latent']:.2f})")
