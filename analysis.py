"""Measurements of a trained VAE, and metrics.json, their record: how well the model explains the test set,
and how its aggregated posterior sits against its prior.

    -ELBO = -log p(x|z) + KL(q(z|x) || p(z))                       negative_elbo: the test loss, at beta = 1
    -log p(x) ~ -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)        iw_nll: importance weighting (Burda et al. 2015)
    q(z) = (1/N) sum_n q(z|x_n)        the aggregated posterior: the codes of all the images together
    mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z))       elbo_surgery (Hoffman & Johnson 2016)
    holes                              prior draws that land where q(z) has (almost) no mass, and decode to blends

Two aggregated posteriors are used. The ELBO surgery and the moments take q(z) over the 10,000 test images, exactly
(all N components). The holes and sampling from q(z) take a Gaussian mixture fitted by EM to codes z_n ~ q(z|x_n)
of 20,000 training images: it gives a smooth density at any point, where the exact q(z) at a code is dominated by
that code's own component. At the end: the KL-weight experiment's table, and speed(), the report of --benchmark.
"""
import json
import math
import os
import time

import numpy as np

import mnist
from autograd import matmul_floor
from priors import logsumexp, sample_mixture
from vae import LOG_2PI, log_bernoulli, log_normal, reparameterize_forward


def encode_all(model, images, batch_size=1000):
    """mu, log_var (N, Z) of every uint8 image, a batch at a time (no float copy of the whole set)."""
    parts = [model.encode(mnist.to_float(images[i:i + batch_size], model.dtype))
             for i in range(0, len(images), batch_size)]
    return (np.concatenate([p[0] for p in parts]).astype(np.float64),
            np.concatenate([p[1] for p in parts]).astype(np.float64))


def draw_codes(mu, log_var, rng):
    """One z_n ~ q(z|x_n) per row: together, draws from the aggregated posterior q(z)."""
    return reparameterize_forward(mu, log_var, rng.standard_normal(mu.shape))[0]


def negative_elbo(model, images, seed, batch_size=500):
    """Test negative ELBO (loss, recon, kl) in nats per example, one z per image, with the same eps every
    time it is called (so epochs and runs compare)."""
    rng = np.random.default_rng([seed, 1])          # a stream of its own: evaluating never moves training's
    sums = np.zeros(3)
    for i in range(0, len(images), batch_size):
        xb = mnist.to_float(images[i:i + batch_size], model.dtype)
        eps = rng.standard_normal((len(xb), model.latent)).astype(model.dtype)
        sums += np.array(model.forward(xb, eps)) * len(xb)
    return sums / len(images)


# ---- a Gaussian mixture fitted by EM -----------------------------------------------------------------------

def fit_gmm(z, k=10, covariance="full", iters=200, tol=1e-5, rng=None):
    """A mixture of k Gaussians fitted to the rows of z (N, D) by EM (Dempster et al. 1977).

    E-step: r_nk = pi_k N(z_n; m_k, S_k) / sum_j pi_j N(z_n; m_j, S_j), in log space with log-sum-exp.
    M-step: N_k = sum_n r_nk, pi_k = N_k / N, m_k = sum_n r_nk z_n / N_k,
            S_k = sum_n r_nk (z_n - m_k)(z_n - m_k)^T / N_k (or its diagonal), computed centred: the shortcut
            E[z z^T] - m m^T cancels digits and can lose positive definiteness. Eigenvalues are floored at 1e-6
            times the mean variance of z, so every S_k stays a valid covariance.
    Stops when the mean log-likelihood gains less than tol. Returns {'log_pi', 'means', 'covs', 'log_likelihood'
    (one value per iteration, never decreasing)}; covs are (k, D, D) or, for 'diag', (k, D)."""
    rng = rng or np.random.default_rng(0)
    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    var = z.var(axis=0)
    floor = 1e-6 * max(var.mean(), 1e-6)
    gmm = {"log_pi": np.full(k, -np.log(k)), "means": z[rng.choice(n, k, replace=False)],
           "covs": np.tile(np.diag(var + floor), (k, 1, 1)) if covariance == "full" else np.tile(var + floor, (k, 1))}
    history = []
    for _ in range(iters):
        log_joint = gmm["log_pi"] + gmm_component_log_density(gmm, z)       # (N, k): log pi_k N(z_n; m_k, S_k)
        log_p = logsumexp(log_joint, axis=1)                                 # log p(z_n)
        history.append(float(log_p.mean()))
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
        r = np.exp(log_joint - log_p[:, None])                              # responsibilities r_nk
        n_k = r.sum(axis=0) + 1e-12                                         # N_k
        means = (r.T @ z) / n_k[:, None]                                    # m_k
        centred = [z - m for m in means]                                    # z_n - m_k, for each k
        if covariance == "full":
            covs = np.stack([(r[:, j, None] * c).T @ c / n_k[j] for j, c in enumerate(centred)])
            eigval, eigvec = np.linalg.eigh((covs + covs.transpose(0, 2, 1)) / 2)
            covs = (eigvec * np.maximum(eigval, floor)[:, None, :]) @ eigvec.transpose(0, 2, 1)
        else:
            covs = np.maximum(np.stack([r[:, j] @ (c * c) / n_k[j] for j, c in enumerate(centred)]), floor)
        gmm = {"log_pi": np.log(n_k / n_k.sum()), "means": means, "covs": covs}
    gmm["log_likelihood"] = history
    return gmm


def gmm_component_log_density(gmm, z, chunk=4096):
    """log N(z_n; m_k, S_k) for every row n and component k: (N, k), a chunk of rows at a time."""
    z = np.asarray(z, dtype=np.float64)
    d, k = z.shape[1], len(gmm["means"])
    out = np.empty((len(z), k))
    if gmm["covs"].ndim == 2:                                               # diagonal: S_k = diag(s_k^2)
        for i in range(0, len(z), chunk):
            out[i:i + chunk] = log_normal(z[i:i + chunk, None, :], gmm["means"], np.log(gmm["covs"]))
        return out
    # Full: with S_k = L_k L_k^T (Cholesky), log N = -1/2 (|L_k^-1 (z - m_k)|^2 + log|S_k| + D log 2 pi), where
    # log|S_k| / 2 = sum_i log (L_k)_ii. All k components in one product: y = z A - m A, A_k = L_k^-T.
    chol_inv = np.linalg.inv(np.linalg.cholesky(gmm["covs"]))                # (k, D, D): L_k^-1
    a = chol_inv.transpose(0, 2, 1)                                         # A_k = L_k^-T
    a_all, m_a = a.transpose(1, 0, 2).reshape(d, k * d), np.einsum("kd,kde->ke", gmm["means"], a)
    log_det_half = -np.log(np.diagonal(chol_inv, axis1=1, axis2=2)).sum(1)  # sum log L_ii = -sum log (L^-1)_ii
    for i in range(0, len(z), chunk):
        y = (z[i:i + chunk] @ a_all).reshape(-1, k, d) - m_a                # y = z A_k - m_k A_k, all k at once
        out[i:i + chunk] = -0.5 * (np.einsum("nkd,nkd->nk", y, y) + d * LOG_2PI) - log_det_half
    return out


def gmm_log_density(gmm, z):
    """log q_fit(z) = log sum_k pi_k N(z; m_k, S_k), per row of z."""
    return logsumexp(gmm["log_pi"] + gmm_component_log_density(gmm, z), axis=1)


def gmm_sample(gmm, n, rng):
    """n draws from the fitted mixture: a component k ~ pi, then z = m_k + L_k eps (S_k = L_k L_k^T)."""
    if gmm["covs"].ndim == 2:
        return sample_mixture(gmm["means"], np.log(gmm["covs"]), gmm["log_pi"], n, rng)
    k = rng.choice(len(gmm["means"]), size=n, p=np.exp(gmm["log_pi"]) / np.exp(gmm["log_pi"]).sum())
    eps = rng.standard_normal((n, gmm["means"].shape[1]))
    return gmm["means"][k] + np.einsum("nij,nj->ni", np.linalg.cholesky(gmm["covs"])[k], eps)


# ---- the measurements --------------------------------------------------------------------------------------

def aggregate_posterior_moments(mu, log_var, threshold=0.01):
    """Per-dimension mean and variance of q(z) = (1/N) sum_n N(mu_n, sigma_n^2), and the active units.

    E[z] = mean_n mu_n;  Var[z] = mean_n (mu_n^2 + sigma_n^2) - E[z]^2  (the law of total variance)
    active: Cov_x(E_q[z|x]) = Var_n(mu_n) > threshold (Burda et al. 2015)."""
    mu, var = np.asarray(mu, np.float64), np.exp(np.asarray(log_var, np.float64))
    mean = mu.mean(axis=0)
    activity = mu.var(axis=0)
    return {"mean": mean.tolist(), "variance": ((mu * mu + var).mean(axis=0) - mean ** 2).tolist(),
            "activity": activity.tolist(), "active_units": int((activity > threshold).sum())}


def log_normal_pairs(z, mean, log_var):
    """vae.log_normal of every row of z (N, Z) against every row of mean and log_var (M, Z): (N, M), with the
    square expanded into matrix products, (z - m)^2 / v = z^2 / v - 2 z m / v + m^2 / v. For N = M = 10,000 (the
    ELBO surgery) about a second instead of 15-20 s here. Its rounding error is ~1e-16 times the terms, so where
    they pass 1e10 (variances near 0, as with no KL term) it falls back to the direct form, 16 rows at a time."""
    inv_var = np.exp(-log_var)
    zz, mm = (z * z) @ inv_var.T, (mean * mean * inv_var).sum(-1)
    if max(zz.max(), mm.max()) < 1e10:
        sq = zz - 2 * z @ (mean * inv_var).T + mm
    else:
        sq = np.concatenate([((z[i:i + 16, None, :] - mean) ** 2 * inv_var).sum(-1) for i in range(0, len(z), 16)])
    return -0.5 * (sq + log_var.sum(-1) + z.shape[-1] * LOG_2PI)


def elbo_surgery(mu, log_var, rng, log_prior, chunk=128):
    """Split the average KL term as Hoffman & Johnson (2016): with q(z) = (1/N) sum_n q(z|x_n),

        mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z)),
        I(x; z) = E_n E_q(z|x_n)[log q(z|x_n) - log q(z)],  KL(q(z)||p(z)) = E_q(z)[log q(z) - log p(z)].

    Each is estimated with one z_n ~ q(z|x_n) per data point; log q(z) sums over all N components
    (log-sum-exp; the N x N Gaussian densities as matrix products). log_prior: a function of z, log p(z).
    Returns the two terms in nats and their sum, to be compared with the average KL computed directly."""
    mu, log_var = np.asarray(mu, np.float64), np.asarray(log_var, np.float64)
    z = draw_codes(mu, log_var, rng)
    log_q_own = log_normal(z, mu, log_var)                                  # log q(z_n | x_n)
    log_q_agg = np.concatenate([logsumexp(log_normal_pairs(z[i:i + chunk], mu, log_var), axis=1)
                                for i in range(0, len(z), chunk)]) - np.log(len(z))   # log q(z_n)
    mi, kl_agg = float((log_q_own - log_q_agg).mean()), float((log_q_agg - log_prior(z)).mean())
    return {"mutual_information": mi, "kl_aggregate_prior": kl_agg,
            "mutual_information_plus_kl_aggregate_prior": mi + kl_agg}


def prior_hole_fraction(gmm, z_codes, z_draws, quantile=0.01):
    """Share of draws whose density under the fitted aggregated posterior is below that of 99% of the codes
    z_codes: they land where (almost) no image encodes. Also returns the threshold and the mask."""
    threshold = np.quantile(gmm_log_density(gmm, z_codes), quantile)
    in_hole = gmm_log_density(gmm, z_draws) < threshold
    return float(in_hole.mean()), float(threshold), in_hole


def iw_nll(model, images, n_samples, rng, eps=None, batch_size=25):
    """Importance-weighted estimate of -log p(x) per uint8 image (one value each), from S = n_samples draws
    z_s ~ q(z|x) per image:

        -log p(x) ~ -log (1/S) sum_s w_s,   w_s = p(x|z_s) p(z_s) / q(z_s|x),   z_s = mu + sigma * eps_s

    An upper bound on -log p(x) that falls towards it as S grows (Burda et al. 2015, who call S 'k'); for S = 1
    it is the negative ELBO with the KL estimated at the one z. eps (S, len(images), Z) may be given."""
    s = n_samples
    out = np.empty(len(images))
    for i in range(0, len(images), batch_size):
        xb = mnist.to_float(images[i:i + batch_size], model.dtype)
        mu, log_var = (a.astype(np.float64) for a in model.encode(xb))
        e = rng.standard_normal((s, len(xb), model.latent)) if eps is None else eps[:, i:i + batch_size]
        z, _ = reparameterize_forward(mu, log_var, e)                            # (S, B, Z)
        logits = model.decode(z.reshape(-1, model.latent).astype(model.dtype)).reshape(s, len(xb), -1)
        # log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), (S, B); the pixel sum in the model's dtype, then float64
        log_w = (log_bernoulli(xb, logits).astype(np.float64)
                 + model.log_prior(z.reshape(-1, model.latent)).reshape(s, -1)
                 - log_normal(z, mu, log_var))
        out[i:i + batch_size] = np.log(s) - logsumexp(log_w, axis=0)            # -log (1/S) sum_s w_s
    return out


def analyze(model, x_train, x_test, seed, iw_samples, gmm_components, gmm_covariance, log=print):
    """Every measurement above for a trained model: (metrics to record, arrays the figures draw)."""
    rng = np.random.default_rng([seed, 3])
    # q(z): one draw z_n ~ q(z|x_n) per training image; the mixture is fitted to 20,000 of them. Its hole threshold
    # and held-out log-likelihood come from test codes, which it was not fitted on.
    z_train = draw_codes(*encode_all(model, x_train), rng)
    fit_on = z_train[rng.choice(len(z_train), min(len(z_train), 20000), replace=False)]
    gmm = fit_gmm(fit_on, gmm_components, gmm_covariance, rng=rng)
    mu, log_var = encode_all(model, x_test)
    z_test = draw_codes(mu, log_var, rng)
    z_prior = model.sample_z(10000, rng)
    hole_fraction, threshold, in_hole = prior_hole_fraction(gmm, z_test, z_prior)
    agg_hole_fraction = prior_hole_fraction(gmm, z_test, gmm_sample(gmm, 10000, rng))[0]
    held_out = float(gmm_log_density(gmm, z_test).mean())
    log(f"aggregated posterior: a {gmm_components}-component {gmm_covariance} Gaussian mixture fitted to "
        f"{len(fit_on)} training codes ({len(gmm['log_likelihood'])} EM iterations), {held_out:.2f} nats per "
        f"held-out test code; {100 * hole_fraction:.1f}% of prior draws fall in its holes")

    # On the test set: moments of q(z), active units, ELBO surgery, the KL to the fitted q(z) instead of p(z).
    moments = aggregate_posterior_moments(mu, log_var)
    surgery = elbo_surgery(mu, log_var, rng, model.log_prior)
    eps = rng.standard_normal(mu.shape)
    z, _ = reparameterize_forward(mu, log_var, eps)
    surgery["average_kl"] = float(model.kl_forward(mu, log_var, z, eps).mean())   # exact for N(0, I)
    surgery["kl_to_fitted_aggregate"] = float((log_normal(z, mu, log_var) - gmm_log_density(gmm, z)).mean())
    iw = float(iw_nll(model, x_test, iw_samples, rng).mean())          # the mean over every test image
    log(f"importance-weighted -log p(x), K={iw_samples}: {iw:.2f} nats; I(x;z) {surgery['mutual_information']:.2f} + "
        f"KL(q(z)||p(z)) {surgery['kl_aggregate_prior']:.2f}; {moments['active_units']} active units")
    metrics = {"iw_nll": iw, "iw_samples": iw_samples, "aggregate_posterior": {
        **moments, **surgery, "prior_hole_fraction": hole_fraction, "aggregate_sample_hole_fraction": agg_hole_fraction,
        "hole_log_density_threshold": threshold,
        "gmm": {"components": gmm_components, "covariance": gmm_covariance, "fitted_on": len(fit_on),
                "em_iterations": len(gmm["log_likelihood"]), "log_likelihood": gmm["log_likelihood"][-1],
                "held_out_log_likelihood": held_out}}}
    return metrics, {"gmm": gmm, "z_train": z_train, "z_prior": z_prior, "in_hole": in_hole, "moments": moments,
                     "mu_test": mu}


KL_WEIGHT_COLUMNS = [("beta", "beta", "{:g}"), ("recon", "recon", "{:.2f}"), ("KL", "kl", "{:.2f}"),
                     ("test -ELBO", "negative_elbo", "{:.2f}"), ("iw_nll", "iw_nll", "{:.2f}"),
                     ("active", "active_units", "{:d}"),
                     ("Var q(z) per dim", "variance_range", "{0[0]:.2f}-{0[1]:.2f}"),
                     ("KL(q(z)||p(z))", "kl_aggregate_prior", "{:.2f}"), ("I(x;z)", "mutual_information", "{:.2f}"),
                     ("holes", "prior_hole_fraction", "{:.1%}")]


def kl_weight_row(beta, metrics):
    """One row of the KL-weight comparison, from a run's metrics.json. Every likelihood is at beta = 1."""
    a = metrics["aggregate_posterior"]
    return {"beta": beta, "recon": metrics["test_recon"], "kl": metrics["test_kl"],
            "negative_elbo": metrics["test_loss"], "iw_nll": metrics["iw_nll"], "active_units": a["active_units"],
            "variance_range": [min(a["variance"]), max(a["variance"])], "kl_aggregate_prior": a["kl_aggregate_prior"],
            "mutual_information": a["mutual_information"], "prior_hole_fraction": a["prior_hole_fraction"]}


def kl_weight_table(rows):
    """The rows as a Markdown table, as docs/experiments.md shows it."""
    lines = ["| " + " | ".join(title for title, _, _ in KL_WEIGHT_COLUMNS) + " |",
             "|" + "---|" * len(KL_WEIGHT_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(form.format(row[key]) for _, key, form in KL_WEIGHT_COLUMNS) + " |")
    return "\n".join(lines)


def speed(model, opt, make_batch, n_images, cfg, state):
    """--benchmark, after a few epochs of training: the median epoch; the median time of each phase of a step over
    up to 100 more steps (make_batch(step) -> x, eps); the floor that the step's matrix products alone set, timed
    in the same run; and the peak memory of the process."""
    import resource
    phases = {"batching": [], "forward": [], "backward": [], "adam": []}
    n_steps, grads = math.ceil(n_images / cfg["batch_size"]), model.grads()
    for step in range(min(100, n_steps)):
        t0 = time.perf_counter(); x, eps = make_batch(step)
        t1 = time.perf_counter(); model.forward(x, eps)
        t2 = time.perf_counter(); model.backward(cfg["beta"])
        t3 = time.perf_counter(); opt.step(grads)
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            phases[name].append(dt)
    floor_s, flops = matmul_floor([model.encoder, model.decoder], cfg["batch_size"], model.dtype)
    epoch_s, floor_epoch = float(np.median(state["epoch_seconds"])), floor_s * n_steps
    print(f"benchmark: {n_images} images, batch {cfg['batch_size']}, {model.dtype}, {os.cpu_count()} cores, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"median epoch {epoch_s:.3f} s = {n_images / epoch_s:,.0f} examples/s")
    print(f"per step (median of {len(phases['adam'])}): " + ", ".join(f"{k} {1e3 * np.median(v):.3f} ms"
                                                                    for k, v in phases.items()))
    print(f"matrix products alone (same shapes, this run): {1e3 * floor_s:.3f} ms/step = {floor_epoch:.3f} s/epoch, "
          f"{flops * n_steps / 1e9:.0f} GFLOP/epoch at {flops / floor_s / 1e9:.0f} GFLOP/s")
    print(f"epoch / floor = {epoch_s / floor_epoch:.2f}; outside the matrix products: {epoch_s - floor_epoch:.3f} "
          f"s/epoch (elementwise work, optimizer, batching)")
    print(f"peak memory (max RSS of this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def write_metrics(path, metrics):
    """metrics.json, the record of a run's measurements, written whole or not at all."""
    with mnist.atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)


def read_metrics(path):
    """The metrics.json at path ({} if there is none)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise mnist.DataError(f"{path}: unreadable ({err}); move it away or pass --out")
