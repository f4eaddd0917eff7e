"""Measurements of a trained VAE, and metrics.json, their record: how well the model explains the test set,
and how its aggregated posterior sits against its prior.

    -ELBO = -log p(x|z) + KL(q(z|x) || p(z))                       negative_elbo: the test loss, at beta = 1
    -log p(x) ~ -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x)        iw_nll: importance weighting (Burda et al. 2015)
    q(z) = (1/N) sum_n q(z|x_n)        the aggregated posterior: the codes of all the images together
    mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z))       elbo_surgery (Hoffman & Johnson 2016)
    holes          prior draws whose density under the fitted q(z) (below) is under that of 99% of the test codes

Two aggregated posteriors are used. The ELBO surgery and the moments take q(z) over the 10,000 test images, exactly
(all N components). The holes and sampling from q(z) take a Gaussian mixture fitted by EM to codes z_n ~ q(z|x_n)
of 20,000 training images: it gives a smooth density at any point, where the exact q(z) at a code is dominated by
that code's own component. At the end: the table of --betas and --likelihoods, and speed(), --benchmark's report.
"""
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

import mnist
from autograd import matmul_floor
from priors import fit_gmm, gmm_log_density, gmm_sample, logsumexp
from vae import LOG_2PI, log_normal, reparameterize_forward

FITTED_CODES = 20000    # the mixture that stands in for q(z) is fitted to this many training codes


def encode_all(model, images, batch_size=1000):
    """mu, log_var (N, Z) of every uint8 image, a batch at a time (no float copy of the whole set)."""
    parts = [model.encode(mnist.to_float(images[i:i + batch_size], model.dtype))
             for i in range(0, len(images), batch_size)]
    return (np.concatenate([p[0] for p in parts]).astype(np.float64),
            np.concatenate([p[1] for p in parts]).astype(np.float64))


def draw_codes(mu, log_var, rng):
    """One z_n ~ q(z|x_n) per row: together, draws from the aggregated posterior q(z)."""
    return reparameterize_forward(mu, log_var, rng.standard_normal(mu.shape))[0]


def negative_elbo(model, images, seed, batch_size=250):
    """Test negative ELBO (loss, recon, kl) in nats per example, one z per image, with the same eps every
    time it is called (so epochs and runs compare)."""
    rng = np.random.default_rng([seed, 1])          # a stream of its own: evaluating never moves training's
    sums = np.zeros(3)
    for i in range(0, len(images), batch_size):
        xb = mnist.to_float(images[i:i + batch_size], model.dtype)
        eps = rng.standard_normal((len(xb), model.latent)).astype(model.dtype)
        sums += np.array(model.forward(xb, eps)) * len(xb)
    return sums / len(images)


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


def log_normal_pairs(z, mean, log_var, rows=64):
    """vae.log_normal of every row of z (N, Z) against every row of mean and log_var (M, Z): (N, M), yielded `rows`
    rows at a time. log N(z; m, v) is linear in (z^2, z, 1): -1/2 [z^2 . 1/v - 2 z . m/v + m^2 . 1/v + sum log v +
    Z log 2 pi], so a block is one product [z^2, z, 1] @ W, W made once (the surgery's 10,000 x 10,000: under a
    second, not 15-20 s). Rounding is ~1e-16 of the terms: where they pass 1e10 (variances near 0), the direct form."""
    inv_var = np.exp(-log_var)
    w = np.concatenate([-0.5 * inv_var.T, (mean * inv_var).T,                  # the weights of z^2, z and 1
                        -0.5 * ((mean * mean * inv_var).sum(-1) + log_var.sum(-1) + z.shape[-1] * LOG_2PI)[None]])
    expansion_safe = max(np.abs(w).max() * (z * z).max(initial=0.0), np.abs(w).max()) < 1e10
    for i in range(0, len(z), rows):
        zi = z[i:i + rows]
        yield (np.concatenate([zi * zi, zi, np.ones((len(zi), 1))], 1) @ w if expansion_safe
               else log_normal(zi[:, None], mean, log_var))


def elbo_surgery(mu, log_var, rng, log_prior):
    """Split the average KL term as Hoffman & Johnson (2016): with q(z) = (1/N) sum_n q(z|x_n),

        mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z)),
        I(x; z) = E_n E_q(z|x_n)[log q(z|x_n) - log q(z)],  KL(q(z)||p(z)) = E_q(z)[log q(z) - log p(z)].

    Each is estimated with one z_n ~ q(z|x_n) per data point; log q(z) sums over all N components (log-sum-exp;
    the N x N Gaussian densities as matrix products). log_prior: a function of z, log p(z). Returns the two terms
    in nats and their sum, to be compared with the average KL computed directly."""
    mu, log_var = np.asarray(mu, np.float64), np.asarray(log_var, np.float64)
    z = draw_codes(mu, log_var, rng)
    log_q_own = log_normal(z, mu, log_var)                                  # log q(z_n | x_n)
    pairs = log_normal_pairs(z, mu, log_var)                                # log q(z_n | x_m), rows at a time
    log_q_agg = np.concatenate([logsumexp(b, 1, overwrite=True) for b in pairs]) - np.log(len(z))   # log q(z_n)
    mi, kl_agg = float((log_q_own - log_q_agg).mean()), float((log_q_agg - log_prior(z)).mean())
    return {"mutual_information": mi, "kl_aggregate_prior": kl_agg,
            "mutual_information_plus_kl_aggregate_prior": mi + kl_agg}


def prior_hole_fraction(gmm, z_codes, z_draws, quantile=0.01):
    """Share of draws whose density under the fitted aggregated posterior is below that of 99% of the codes
    z_codes: they land where (almost) no image encodes. Also returns the threshold and the mask."""
    threshold = np.quantile(gmm_log_density(gmm, z_codes), quantile)
    in_hole = gmm_log_density(gmm, z_draws) < threshold
    return float(in_hole.mean()), float(threshold), in_hole


def iw_nll(model, images, n_samples, rng, eps=None, batch_size=25, progress=None):
    """Importance-weighted estimate of -log p(x) per uint8 image (one value each), from S = n_samples draws
    z_s ~ q(z|x) per image:

        -log p(x) ~ -log (1/S) sum_s w_s,   w_s = p(x|z_s) p(z_s) / q(z_s|x),   z_s = mu + sigma * eps_s

    An upper bound on -log p(x) in expectation (Jensen: E log mean_s w_s <= log E w_s = log p(x)) that falls towards
    it as S grows (Burda et al. 2015, who call S 'k'); for S = 1 it is the negative ELBO with the KL estimated at the
    one z. images: uint8 pixels, or intensities already in [0, 1] (float). eps (S, len(images), Z) may be given;
    progress, a function of the fraction done. A batch's codes are decoded 2,500 at a time, their log-density taken
    250 at a time, in whole samples of the batch (docs/experiments.md, section 6: faster products, a cached scratch)."""
    s, latent = n_samples, model.latent
    out = np.empty(len(images))
    for i in range(0, len(images), batch_size):
        xb = images[i:i + batch_size]
        xb = mnist.to_float(xb, model.dtype) if xb.dtype == np.uint8 else xb.astype(model.dtype)
        mu, log_var = (a.astype(np.float64) for a in model.encode(xb))
        e = rng.standard_normal((s, len(xb), latent)) if eps is None else eps[:, i:i + batch_size]
        z, _ = reparameterize_forward(mu, log_var, e)                            # (S, B, Z)
        per_slice = max(1, 250 // len(xb))                                      # samples (of all B images) at a time
        log_px = np.empty((s, len(xb)), model.dtype)                            # log p(x|z_s), (S, B)
        for a in range(0, s, 10 * per_slice):                                   # ten slices decoded in one product
            logits = model.decode(z[a:a + 10 * per_slice].reshape(-1, latent).astype(model.dtype))
            logits = logits.reshape(-1, len(xb), logits.shape[-1])              # (samples, B, D)
            for j in range(0, len(logits), per_slice):                          # no slice crosses a block's end
                log_px[a + j:a + j + per_slice] = model.likelihood.log_density(xb, logits[j:j + per_slice])
        # log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), (S, B); the pixel sum in the model's dtype, then float64
        log_w = log_px.astype(np.float64) + model.log_prior(z.reshape(-1, latent)).reshape(s, -1) - log_normal(
            z, mu, log_var)
        out[i:i + batch_size] = np.log(s) - logsumexp(log_w, 0, overwrite=True)  # -log (1/S) sum_s w_s
        if progress:
            progress(min(i + batch_size, len(images)) / len(images))
    return out


def likelihood_measures(model, x_test, iw_samples, rng, seconds, log, progress):
    """For a density over grey levels (the Gaussian, the continuous Bernoulli): a bound in bits per dimension on the
    8-bit test images by uniform dequantization (Theis et al. 2016). With x = (pixel + u) / 256, u ~ U(0, 1)^D,
        -log P(pixels) <= -E_u log p(x) + D log 256,
    since P(pixels) = 256^-D E_u p(x) >= 256^-D exp(E_u log p(x)); -log p(x) is bounded by iw_nll at one u per image.
    The Bernoulli on grey levels has no such number: it is not a density over [0, 1], so it assigns no probability
    to a pixel's bin. Also returns the learned or fixed sigma of a Gaussian decoder."""
    found, lk = {}, model.likelihood
    if lk.name == "gaussian":
        found["decoder_sigma"] = float(np.exp(lk.log_sigma()).ravel()[0])
    if lk.name != "bernoulli":
        with phase("bits_per_dim", seconds, log, "the same bound on dequantized test images, in bits per dimension"):
            x = (x_test + rng.random(x_test.shape)) / 256       # (pixel + u) / 256: pixel k's bin is [k, k+1) / 256
            nll = iw_nll(model, x, iw_samples, rng, progress=progress("bits per dimension")).mean()
            d = x_test.shape[1]
            found["bits_per_dim"] = float((nll + d * math.log(256)) / (d * math.log(2)))
        log(f"  {found['bits_per_dim']:.3f} bits per dimension on the 8-bit images")
    return found


@contextlib.contextmanager
def phase(name, seconds, log, message):
    """Say what is being measured, then record how long it took in seconds[name]."""
    log(message); t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0


def analyze(model, x_train, x_test, seed, iw_samples, gmm_components, gmm_covariance, log=print,
            progress=lambda what: None):
    """Every measurement above for a trained model: (metrics to record, arrays the figures draw). log(line) says
    what each measurement is before it starts; progress(what) may give a function of the fraction done."""
    rng, seconds = np.random.default_rng([seed, 3]), {}
    # q(z): one draw z_n ~ q(z|x_n) per training image; the mixture is fitted to 20,000 of them. Its hole threshold
    # and held-out log-likelihood come from test codes, which it was not fitted on.
    with phase("encode", seconds, log, f"encoding {len(x_train)} training and {len(x_test)} test images"):
        z_train = draw_codes(*encode_all(model, x_train), rng)
        mu, log_var = encode_all(model, x_test)
    fit_on = z_train[rng.choice(len(z_train), min(len(z_train), FITTED_CODES), replace=False)]
    with phase("em", seconds, log, f"fitting a {gmm_components}-component {gmm_covariance} Gaussian mixture to "
                                   f"{len(fit_on)} training codes by EM, and counting the prior's holes"):
        gmm = fit_gmm(fit_on, gmm_components, gmm_covariance, rng=rng)
        z_test = draw_codes(mu, log_var, rng)
        z_prior = model.sample_z(10000, rng)
        hole_fraction, threshold, in_hole = prior_hole_fraction(gmm, z_test, z_prior)
        agg_hole_fraction = prior_hole_fraction(gmm, z_test, gmm_sample(gmm, 10000, rng))[0]
        held_out = float(gmm_log_density(gmm, z_test).mean())
    log(f"  {len(gmm['log_likelihood'])} EM iterations, {held_out:.2f} nats per held-out test code; "
        f"{100 * hole_fraction:.1f}% of prior draws fall in its holes")

    # On the test set: moments of q(z), active units, ELBO surgery, the KL to the fitted q(z) instead of p(z).
    with phase("surgery", seconds, log, f"ELBO surgery on the {len(mu)} test codes: I(x;z) and KL(q(z)||p(z))"):
        moments = aggregate_posterior_moments(mu, log_var)
        surgery = elbo_surgery(mu, log_var, rng, model.log_prior)
        eps = rng.standard_normal(mu.shape)
        z, _ = reparameterize_forward(mu, log_var, eps)
        surgery["average_kl"] = float(model.kl_forward(mu, log_var, z, eps).mean())   # exact for N(0, I)
        surgery["kl_to_fitted_aggregate"] = float((log_normal(z, mu, log_var) - gmm_log_density(gmm, z)).mean())
    log(f"  I(x;z) {surgery['mutual_information']:.2f} + KL(q(z)||p(z)) {surgery['kl_aggregate_prior']:.2f} nats; "
        f"{moments['active_units']} active units")
    with phase("iw_nll", seconds, log, f"importance-weighted bound on -log p(x), S={iw_samples} per test image"):
        iw = float(iw_nll(model, x_test, iw_samples, rng, progress=progress("iw_nll")).mean())   # over every image
    log(f"  -log p(x) <= {iw:.2f} nats")
    metrics = {"iw_nll": iw, "iw_samples": iw_samples,
               **likelihood_measures(model, x_test, iw_samples, rng, seconds, log, progress),
               "analysis_seconds": seconds, "aggregate_posterior": {
        **moments, **surgery, "prior_hole_fraction": hole_fraction, "aggregate_sample_hole_fraction": agg_hole_fraction,
        "hole_log_density_threshold": threshold,
        "gmm": {"components": gmm_components, "covariance": gmm_covariance, "fitted_on": len(fit_on),
                "em_iterations": len(gmm["log_likelihood"]), "log_likelihood": gmm["log_likelihood"][-1],
                "held_out_log_likelihood": held_out}}}
    return metrics, {"gmm": gmm, "z_train": z_train, "z_prior": z_prior, "in_hole": in_hole, "moments": moments,
                     "mu_test": mu}


def measure_and_draw(model, metrics, cfg, x_train, x_test, y_test, out, args):
    """The after-training measurements (analysis.analyze) and their figures, merged into metrics.json."""
    import figures                  # here: figures.py draws what this file measures, and imports it
    if cfg["binarize"]:             # the aggregated posterior of the images the model was trained on: binary ones
        x_train = mnist.binarize(x_train, np.random.default_rng(mnist.TEST_BINARIZATION_SEED + 1))
    measured, found = analyze(model, x_train, x_test, cfg["seed"], args.iw_samples, args.gmm_components,
                                       args.gmm_covariance, lambda line: print(line, flush=True), figures.progress_line)
    print("drawing the latent space", flush=True)
    figures.save(out, figures.analysis_figures(model, x_test, y_test, found, args.posterior_image, cfg["seed"]))
    write_metrics(os.path.join(out, "metrics.json"), {**metrics, **measured})
    print(f"wrote {'' if args.analyze else 'model.npz, '}metrics.json and figures to {out}")
    return {"model": model, "metrics": {**metrics, **measured}, "x_test": x_test, "y_test": y_test}


COMPARISON_COLUMNS = [("run", "run", "{}"), ("recon", "recon", "{:.2f}"), ("KL", "kl", "{:.2f}"),
                      ("test -ELBO", "negative_elbo", "{:.2f}"), ("iw_nll", "iw_nll", "{:.2f}"),
                      ("bits/dim", "bits_per_dim", "{:.3f}"), ("active", "active_units", "{:d}"),
                      ("Var q(z) per dim", "variance_range", "{0[0]:.2f}-{0[1]:.2f}"),
                      ("KL(q(z)||p(z))", "kl_aggregate_prior", "{:.2f}"), ("I(x;z)", "mutual_information", "{:.2f}"),
                      ("holes", "prior_hole_fraction", "{:.1%}"), ("sigma", "decoder_sigma", "{:.4g}"),
                      ("pull on mu: recon / KL", "pulls_on_mu", "{0[0]:.3g} / {0[1]:.3g}")]


def comparison_row(name, metrics):
    """One row of a comparison of runs (--betas, --likelihoods), from a run's metrics.json: every number at beta = 1,
    in nats of the run's own likelihood; the pulls on mu are the last epoch's RMS of the two gradient paths."""
    a, paths = metrics["aggregate_posterior"], metrics["gradient_paths"]
    return {"run": name, "beta": metrics["config"]["beta"], "likelihood": metrics["config"].get("likelihood"),
            "bits_per_dim": metrics.get("bits_per_dim"), "decoder_sigma": metrics.get("decoder_sigma"),
            "pulls_on_mu": [paths["recon_mu"][-1], paths["kl_mu"][-1]] if paths["recon_mu"] else None,
            "recon": metrics["test_recon"], "kl": metrics["test_kl"],
            "negative_elbo": metrics["test_loss"], "iw_nll": metrics["iw_nll"], "active_units": a["active_units"],
            "variance_range": [min(a["variance"]), max(a["variance"])], "kl_aggregate_prior": a["kl_aggregate_prior"],
            "mutual_information": a["mutual_information"], "prior_hole_fraction": a["prior_hole_fraction"]}


def compare(runs, out, image_index, prefix):
    """After --betas or --likelihoods: {name: run(...)'s result} as a table (printed, and comparison.json in out)
    and the figures that compare the runs."""
    import figures
    rows = [comparison_row(name, r["metrics"]) for name, r in runs.items()]
    write_metrics(os.path.join(out, "comparison.json"), rows)
    print(comparison_table(rows))
    last, models = list(runs.values())[-1], {n: r["model"] for n, r in runs.items()}
    figures.save(out, figures.comparison_figures(models, last["x_test"], last["y_test"], image_index,
                                                 last["metrics"]["config"]["seed"], prefix))
    print(f"wrote comparison.json and the figures that compare the runs to {out}")


def comparison_table(rows):
    """The rows as a Markdown table, as docs/experiments.md shows it ('-' where a run has no such number)."""
    lines = ["| " + " | ".join(title for title, _, _ in COMPARISON_COLUMNS) + " |",
             "|" + "---|" * len(COMPARISON_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(key) is None else form.format(row[key])
                                       for _, key, form in COMPARISON_COLUMNS) + " |")
    return "\n".join(lines)


def speed(model, opt, make_batch, x_train, x_test, cfg, state, args):
    """--benchmark, after a few epochs of training: the median epoch; the median time of each phase of a step over
    up to 100 more steps (make_batch(step) -> x, eps); the floor that the step's matrix products alone set, timed
    in the same run; the peak memory of the process; and the phases of the analysis after training."""
    n_images = len(x_train)
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
    peak = peak_memory_mb()
    print("peak memory (max RSS of this process): " + (f"{peak:.0f} MB" if peak else "not reported on this platform"))
    seconds = analyze(model, x_train, x_test, cfg["seed"], args.iw_samples, args.gmm_components, args.gmm_covariance,
                      log=lambda line: None)[0]["analysis_seconds"]
    print("analysis after training: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))


def peak_memory_mb():
    """The most memory this process has held (max resident set size), in MB, where the platform reports it."""
    try:
        import resource
    except ImportError:                             # Windows: the peak working set, through the Win32 API
        return windows_peak_memory_mb() if os.name == "nt" else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10     # bytes on macOS, KiB on Linux


def windows_peak_memory_mb():
    import ctypes
    from ctypes import wintypes
    class Counters(ctypes.Structure):               # PROCESS_MEMORY_COUNTERS, as far as PeakWorkingSetSize
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD), ("PeakWorkingSetSize", ctypes.c_size_t),
                    ("rest", ctypes.c_size_t * 7)]
    counters = Counters(cb=ctypes.sizeof(Counters))
    process = ctypes.windll.kernel32.GetCurrentProcess()
    ok = ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb)
    return counters.PeakWorkingSetSize / 2 ** 20 if ok else None


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
