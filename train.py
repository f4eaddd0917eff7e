"""Train the VAE on MNIST (or Fashion-MNIST) and write the model, metrics and figures.

    python train.py                       # the reference recipe: 784-400-20-400-784, Adam 1e-3, batch 128, 10 epochs
    python train.py --dataset fashion --data-dir /usr/share/datasets/fashion-mnist
    python train.py --resume runs/mnist-h400-z20-s0/checkpoint.npz --epochs 20
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np

import mnist
import vae
from autograd import Adam

TRAINING_OPTIONS = ("dataset", "hidden", "latent", "prior", "prior_components", "batch_size", "lr", "seed")
ARCHITECTURE = ("hidden", "latent", "prior", "prior_components")   # of the training options, those of the model


class NonFiniteLoss(Exception):
    pass


def prior_name(model):
    return "N(0, I)" if model.prior == "standard" else f"learned {model.prior} (K={model.components})"


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Training options default to None so that --resume can tell "not given" (take the checkpoint's) from
    # "given" (must agree with the checkpoint's); DEFAULTS below holds the recipe.
    p.add_argument("--dataset", choices=sorted(mnist.DATASETS), help="default: mnist")
    p.add_argument("--data-dir", help="where the archives are looked for and downloaded to (default: data/<dataset>)")
    p.add_argument("--mirror", help="download from this URL instead of the default mirrors")
    p.add_argument("--epochs", type=non_negative_int, help="total epochs (default: 10; 3 with --benchmark)")
    p.add_argument("--batch-size", type=positive(int), help="default: 128")
    p.add_argument("--lr", type=positive(float), help="Adam learning rate (default: 1e-3)")
    p.add_argument("--hidden", type=positive(int), help="hidden units in encoder and decoder (default: 400)")
    p.add_argument("--latent", type=positive(int), help="latent dimensions Z (default: 20)")
    p.add_argument("--prior", choices=sorted(vae.PRIORS), help="p(z): standard N(0, I) (default), a learned "
                   "mixture of Gaussians (mog), or the VampPrior (vamp)")
    p.add_argument("--prior-components", type=positive(int), help="K of a learned prior (default: "
                   + ", ".join(f"{k} {n}" for k, n in vae.PRIORS.items() if n) + ")")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--out", help="output folder (default: runs/<dataset>-h<hidden>-z<latent>-s<seed>[-<prior>])")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.npz")
    p.add_argument("--analyze", metavar="MODEL", help="no training: measure and draw the latent space of this "
                   "model.npz (figures and metrics.json go beside it, or to --out)")
    p.add_argument("--benchmark", action="store_true", help="time a few epochs of training against the "
                   "matrix-product floor measured in the same run; writes nothing")
    p.add_argument("--iw-samples", type=positive(int), default=100,
                   help="K importance samples per test image for iw_nll (default: 100; Burda et al. use 5000)")
    p.add_argument("--gmm-components", type=positive(int), default=10,
                   help="components of the mixture fitted to the aggregated posterior (default: 10)")
    p.add_argument("--gmm-covariance", choices=("full", "diag"), default="full", help="default: full")
    p.add_argument("--posterior-image", type=non_negative_int, default=0,
                   help="index of the test image whose posterior is sampled (default: 0)")
    return p.parse_args(argv)


DEFAULTS = {"dataset": "mnist", "hidden": 400, "latent": 20, "prior": "standard", "prior_components": None,
            "batch_size": 128, "lr": 1e-3, "seed": 0}


# ---- the training loop -------------------------------------------------------------------------------------

def new_state(cfg):
    """Everything that, with the parameters, makes a run resumable to the same numbers."""
    return {"epoch": 0, "step": 0, "perm": None, "rng": np.random.default_rng(cfg["seed"]),
            "sums": np.zeros(3), "train_loss": [], "train_recon": [], "train_kl": [], "test_loss_curve": [],
            "epoch_seconds": [], "elapsed": 0.0}


def batch(x_train, perm, step, batch_size, rng, latent):
    """The step-th batch of the epoch's order as float32 in [0, 1] (one pass over uint8), and its eps ~ N(0, I)."""
    idx = perm[step * batch_size:(step + 1) * batch_size]
    return x_train[idx] * np.float32(1 / 255), rng.standard_normal((len(idx), latent), dtype=np.float32)


@np.errstate(over="ignore", invalid="ignore")  # a diverging run overflows: the finite-loss check says so once
def train_epoch(model, opt, x_train, state, batch_size, stop, progress):
    """One pass over the shuffled training set, from state['step'] on (a resumed epoch continues mid-way).
    Returns False if a stop was requested (Ctrl-C) before the epoch finished."""
    rng = state["rng"]
    if state["perm"] is None:                       # a new epoch: a new order
        state["perm"], state["step"], state["sums"] = rng.permutation(len(x_train)), 0, np.zeros(3)
    perm, n_steps = state["perm"], math.ceil(len(x_train) / batch_size)
    grads = model.grads()
    t0 = time.perf_counter()
    for step in range(state["step"], n_steps):
        x, eps = batch(x_train, perm, step, batch_size, rng, model.latent)
        loss, recon, kl = model.forward(x, eps)
        if not np.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss} at epoch {state['epoch'] + 1}, step {step + 1} "
                                f"(global step {state['epoch'] * n_steps + step + 1})")
        model.backward()
        opt.step(grads)
        state["step"] = step + 1
        state["sums"] += (loss * len(x), recon * len(x), kl * len(x))
        progress(state, n_steps, seen=min(state["step"] * batch_size, len(x_train)))
        if stop["requested"]:
            state["elapsed"] += time.perf_counter() - t0
            return False
    state["elapsed"] += time.perf_counter() - t0
    loss, recon, kl = state["sums"] / len(x_train)
    state["train_loss"].append(loss); state["train_recon"].append(recon); state["train_kl"].append(kl)
    state["epoch_seconds"].append(state["elapsed"])
    state["epoch"], state["perm"], state["elapsed"] = state["epoch"] + 1, None, 0.0
    return True


def evaluate(model, x, seed, batch_size=500):
    """Test negative ELBO (loss, recon, kl) in nats per example, one z per image, with the same eps every
    time it is called (so epochs and runs compare)."""
    rng = np.random.default_rng([seed, 1])          # a stream of its own: evaluating never moves training's
    sums = np.zeros(3)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].astype(model.dtype) / 255
        eps = rng.standard_normal((len(xb), model.latent)).astype(model.dtype)
        sums += np.array(model.forward(xb, eps)) * len(xb)
    return sums / len(x)


def progress_bar(state, n_steps, seen):
    """An in-epoch progress line, only when stderr is a terminal (logs stay one line per epoch)."""
    if sys.stderr.isatty() and (state["step"] % 10 == 0 or state["step"] == n_steps):
        done = state["step"] / n_steps
        sys.stderr.write(f"\r  epoch {state['epoch'] + 1} [{'#' * int(30 * done):<30}] {100 * done:3.0f}%  "
                         f"train loss {state['sums'][0] / seen:7.2f}")
        sys.stderr.write("\r" + " " * 72 + "\r" if state["step"] == n_steps else "")
        sys.stderr.flush()


# ---- checkpoints -------------------------------------------------------------------------------------------

def save_checkpoint(path, model, opt, state, cfg):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    extra = {"cfg": np.array(json.dumps(cfg)), "adam_t": np.array(opt.t),
             "rng": np.array(json.dumps(state["rng"].bit_generator.state)),
             "scalars": np.array(json.dumps({k: state[k] for k in ("epoch", "step", "elapsed", "train_loss",
                                                                      "train_recon", "train_kl", "test_loss_curve",
                                                                      "epoch_seconds")})),
             "sums": state["sums"], "perm": state["perm"] if state["perm"] is not None else np.zeros(0, int)}
    extra.update({f"adam_m.{k}": v for k, v in opt.m.items()})
    extra.update({f"adam_v.{k}": v for k, v in opt.v.items()})
    vae.save(model, path, **extra)


def load_checkpoint(path, args):
    """(model, opt, state, cfg) from a checkpoint; options given on the command line must agree with it."""
    model, extra = vae.load(path)
    try:
        cfg = json.loads(str(extra["cfg"]))
        scalars = json.loads(str(extra["scalars"]))
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(extra["rng"]))
        opt = Adam(model.params(), lr=cfg["lr"])
        opt.t = int(extra["adam_t"])
        for k in opt.m:
            opt.m[k][...] = extra[f"adam_m.{k}"]
            opt.v[k][...] = extra[f"adam_v.{k}"]
    except (KeyError, ValueError, TypeError) as err:
        raise vae.CheckpointError(f"{path}: not a training checkpoint or corrupt ({err}); use model.npz "
                                  f"files for inference only, or start a new run")
    cfg = {**DEFAULTS, **cfg}
    for k in TRAINING_OPTIONS:
        given = getattr(args, k)
        if given is not None and given != cfg[k]:
            what = "of another architecture" if k in ARCHITECTURE else "from another run"
            raise vae.CheckpointError(f"{path}: checkpoint is {what}: it has --{k.replace('_', '-')} {cfg[k]}, "
                                      f"you asked for {given}; drop the flag or start a new run")
    state = {**scalars, "rng": rng, "sums": extra["sums"], "perm": extra["perm"] if extra["perm"].size else None}
    return model, opt, state, cfg


# ---- figures -----------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")                           # files only, no window: works on a machine with no screen
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    with vae.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    pyplot().close(fig)


def image_grid(ax, images, rows, title=None):
    """Tile (n, 784) images in [0, 1] into `rows` rows on one axis."""
    cols = math.ceil(len(images) / rows)
    grid = np.ones((rows * 29 + 1, cols * 29 + 1))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + 29 * r:29 * (r + 1), 1 + 29 * c:29 * (c + 1)] = img.reshape(28, 28)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)


def write_figures(out, model, x_test, state, seed):
    plt = pyplot()
    x = x_test[:16].astype(model.dtype) / 255
    fig, ax = plt.subplots(figsize=(8, 1.3))
    image_grid(ax, np.concatenate([x, model.reconstruct(x)]), rows=2,
               title="test images (top) and their reconstructions at z = mu(x) (bottom)")
    save_figure(fig, os.path.join(out, "reconstructions.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    image_grid(ax, model.sample_prior(64, np.random.default_rng([seed, 2])), rows=8,
               title=f"decoded prior samples, z ~ {prior_name(model)}")
    save_figure(fig, os.path.join(out, "samples_prior.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = np.arange(1, len(state["train_loss"]) + 1)
    ax.plot(epochs, state["train_loss"], "o-", label="train (mean over the epoch)")
    ax.plot(epochs, state["test_loss_curve"], "s-", label="test (end of epoch)")
    ax.set_xlabel("epoch"); ax.set_ylabel("negative ELBO (nats / example)"); ax.legend(); ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(out, "loss_curves.png"))


# ---- after training: prior, posterior and aggregated posterior -------------------------------------------

def encode_all(model, x_uint8, batch_size=1000):
    """mu, log_var (N, Z) of every image, a batch at a time (no float copy of the whole set)."""
    parts = [model.encode(x_uint8[i:i + batch_size].astype(model.dtype) / 255) for i in range(0, len(x_uint8), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def analyze(model, x_train, x_test, y_test, cfg, out, iw_samples, gmm_components, gmm_covariance, image_index):
    """The aggregated posterior against the prior, measured and drawn; returns the metrics to record."""
    rng = np.random.default_rng([cfg["seed"], 3])
    log = lambda msg: print(msg, flush=True)
    # q(z) = (1/N) sum_n q(z|x_n): one draw z_n ~ q(z|x_n) per training image is one draw from q(z).
    mu_train, log_var_train = encode_all(model, x_train)
    z_train = mu_train + np.exp(0.5 * log_var_train) * rng.standard_normal(mu_train.shape, dtype=model.dtype)
    fit_on = z_train[rng.choice(len(z_train), min(len(z_train), 20000), replace=False)]
    t0 = time.perf_counter()
    gmm = vae.fit_gmm(fit_on, gmm_components, gmm_covariance, rng=rng)
    log(f"aggregated posterior: {gmm_components}-component {gmm_covariance} Gaussian mixture fitted to "
        f"{len(fit_on)} training codes, {len(gmm['log_likelihood'])} EM iterations, {time.perf_counter() - t0:.1f} s")
    z_prior = model.sample_z(10000, rng)
    hole_fraction, threshold, in_hole = vae.prior_hole_fraction(gmm, z_train, z_prior)
    agg_hole_fraction = vae.prior_hole_fraction(gmm, z_train, vae.gmm_sample(gmm, 10000, rng))[0]

    # On the test set: moments of q(z), active units, ELBO surgery, and the KL to the fitted q(z) instead of N(0, I).
    mu, log_var = encode_all(model, x_test)
    moments = vae.aggregate_posterior_moments(mu, log_var)
    surgery = vae.elbo_surgery(mu, log_var, rng, None if model.prior == "standard" else model.log_prior)
    eps = rng.standard_normal(mu.shape)
    z = mu + np.exp(0.5 * log_var) * eps
    kl_fitted = float((vae.log_q_at_eps(eps, log_var) - vae.gmm_log_density(gmm, z)).mean())  # E[log q - log q_fit]
    t0 = time.perf_counter()
    iw = float(np.mean([vae.iw_nll(model, x_test[i:i + 1000].astype(model.dtype) / 255, iw_samples, rng)
                        for i in range(0, len(x_test), 1000)]))
    log(f"importance-weighted -log p(x), K={iw_samples}: {iw:.2f} nats ({time.perf_counter() - t0:.1f} s); "
        f"average KL {surgery['average_kl']:.2f} = I(x;z) {surgery['mutual_information']:.2f} + "
        f"KL(q(z)||p(z)) {surgery['kl_aggregate_prior']:.2f}; {moments['active_units']} active units; "
        f"{100 * hole_fraction:.1f}% of prior draws fall in holes")

    write_analysis_figures(out, model, x_test, y_test, gmm, z_train, z_prior, in_hole, moments, image_index,
                           cfg["seed"])
    return {"iw_nll": iw, "iw_samples": iw_samples, "aggregate_posterior": {
        **moments, **surgery, "kl_to_fitted_aggregate": kl_fitted, "prior_hole_fraction": hole_fraction,
        "aggregate_sample_hole_fraction": agg_hole_fraction, "hole_log_density_threshold": threshold,
        "gmm": {"components": gmm_components, "covariance": gmm_covariance, "fitted_on": len(fit_on),
                "em_iterations": len(gmm["log_likelihood"]), "log_likelihood": gmm["log_likelihood"][-1]}}}


def write_analysis_figures(out, model, x_test, y_test, gmm, z_train, z_prior, in_hole, moments, image_index, seed):
    plt = pyplot()
    rng = np.random.default_rng([seed, 5])
    x = x_test[image_index:image_index + 1].astype(model.dtype) / 255
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    image_grid(axes[0], model.sample_prior(64, rng), rows=8, title=f"prior: z ~ {prior_name(model)}")
    image_grid(axes[1], np.concatenate([x, model.sample_posterior(x, 63, rng)[0]]), rows=8,
               title=f"posterior of test image {image_index} (top left):\nz ~ N(mu(x), sigma(x)^2)")
    axes[1].add_patch(plt.Rectangle((0.5, 0.5), 28, 28, fill=False, edgecolor="tab:red", linewidth=2))
    image_grid(axes[2], vae.sample_aggregate(model, gmm, 64, rng), rows=8,
               title="aggregated posterior: z ~ mixture\nfitted to the training codes")
    save_figure(fig, os.path.join(out, "samples_three_ways.png"))

    # Marginals per dimension: the aggregated posterior (histogram of codes, and the fitted mixture) vs N(0, 1).
    zs = model.latent
    cols = min(zs, 5)
    fig, axes = plt.subplots(math.ceil(zs / cols), cols, figsize=(2.6 * cols, 1.9 * math.ceil(zs / cols)),
                             squeeze=False)
    gmm_vars = np.diagonal(gmm["covs"], axis1=1, axis2=2) if gmm["covs"].ndim == 3 else gmm["covs"]
    if model.prior == "standard":
        prior_pi, prior_means, prior_vars = np.ones(1), np.zeros((1, zs)), np.ones((1, zs))
    else:
        means, log_vars, log_pi = (a.astype(np.float64) for a in model.prior_mixture())
        prior_pi, prior_means, prior_vars = np.exp(log_pi), means, np.exp(log_vars)
    for d, ax in enumerate(axes.flat):
        if d >= zs:
            ax.set_axis_off(); continue
        half = 4 * max(1.0, np.sqrt(moments["variance"][d]))          # +-4 sd of q(z) or of N(0, 1), the wider
        grid = np.linspace(moments["mean"][d] - half, moments["mean"][d] + half, 200)
        ax.hist(z_train[:, d], bins=60, range=(grid[0], grid[-1]), density=True, color="tab:blue", alpha=0.4)
        ax.plot(grid, mixture_marginal(grid, np.exp(gmm["log_pi"]), gmm["means"][:, d], gmm_vars[:, d]),
                color="tab:blue", lw=1.2)
        ax.plot(grid, mixture_marginal(grid, prior_pi, prior_means[:, d], prior_vars[:, d]), "k--", lw=1)
        active = moments["activity"][d] > 0.01
        ax.set_title(f"z{d}: var {moments['variance'][d]:.2f}" + ("" if active else " (inactive)"), fontsize=8)
        ax.set_yticks([]); ax.tick_params(labelsize=7)
    fig.suptitle("per dimension: aggregated posterior (histogram of codes; line: fitted mixture) vs prior "
                 f"{prior_name(model)} (dashed)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "prior_vs_aggregate.png"))

    if zs == 2:
        write_latent_2d_figures(out, model, x_test, y_test, z_prior, in_hole)


def mixture_marginal(grid, pi, means, variances):
    """sum_k pi_k N(t; m_k, v_k) at each t of grid: one dimension's marginal of a Gaussian mixture."""
    return (pi[:, None] * np.exp(-0.5 * (grid - means[:, None]) ** 2 / variances[:, None])
            / np.sqrt(2 * np.pi * variances[:, None])).sum(0)


def write_latent_2d_figures(out, model, x_test, y_test, z_prior, in_hole):
    plt = pyplot()
    from statistics import NormalDist
    mu, _ = encode_all(model, x_test)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=y_test, cmap="tab10", s=2, alpha=0.6)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="label")
    shown = slice(0, 1000)
    ax.scatter(*z_prior[shown][in_hole[shown]].T, marker="x", color="red", s=14,
               label=f"prior draws in holes ({100 * in_hole.mean():.1f}% of all)")
    if model.prior == "standard":
        for r in (1, 2, 3):
            ax.add_patch(plt.Circle((0, 0), r, fill=False, ls="--", color="k", lw=0.8))
        ax.set_xlim(-4, 4); ax.set_ylim(-4, 4)
        title = "test posterior means by label; prior 1, 2, 3 sigma circles"
    else:
        title = f"test posterior means by label; prior {prior_name(model)}"
    ax.set_aspect("equal"); ax.legend(loc="upper right", fontsize=8); ax.set_title(title, fontsize=10)
    save_figure(fig, os.path.join(out, "latent_space.png"))

    # Decode a grid over the latent plane: quantiles of N(0, 1) on each axis (equal prior mass per cell), or,
    # for a learned prior, the same quantiles of the prior's own draws.
    n = 20
    levels = np.linspace(0.5 / n, 1 - 0.5 / n, n)
    if model.prior == "standard":
        gx = gy = np.array([NormalDist().inv_cdf(p) for p in levels])
    else:
        gx, gy = np.quantile(z_prior[:, 0], levels), np.quantile(z_prior[:, 1], levels)
    z = np.stack(np.meshgrid(gx, gy[::-1]), -1).reshape(-1, 2).astype(model.dtype)
    fig, ax = plt.subplots(figsize=(7, 7))
    image_grid(ax, vae.sigmoid(model.decode(z)), rows=n,
               title=f"decoded grid of prior quantiles ({50 / n:.1f}% .. {100 - 50 / n:.1f}% per axis)")
    save_figure(fig, os.path.join(out, "latent_manifold.png"))


def write_json(path, obj):
    with vae.atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


# ---- benchmark ---------------------------------------------------------------------------------------------

def matmul_floor(model, batch_size, reps=50):
    """Seconds per training step spent in the step's matrix products alone: the same shapes, timed here.
    For each Linear, W (n_in, n_out): forward x W, backward x^T dy and dy W^T (not for the image layer)."""
    rng = np.random.default_rng(0)
    layers = [layer for mlp in (model.encoder, model.decoder) for layer in mlp.layers if "W" in layer.params]
    work = [(rng.random((batch_size, l.params["W"].shape[0]), dtype=model.dtype), l.params["W"].copy(),
             l is not model.encoder.layers[0]) for l in layers]
    flops = sum(2 * batch_size * w.size * (3 if needs_dx else 2) for _, w, needs_dx in work)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x, w, needs_dx in work:
            y = x @ w                               # forward
            x.T @ y                                 # dL/dW (y stands in for dy: same shape)
            if needs_dx:
                y @ w.T                             # dL/dx
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), flops


def benchmark(model, opt, x_train, cfg, epochs):
    """Train `epochs` epochs as train.py does and print where the time goes. Nothing is written to disk."""
    import resource
    n_steps = math.ceil(len(x_train) / cfg["batch_size"])
    state, stop = new_state(cfg), {"requested": False}
    print(f"benchmark: {epochs} epochs, {len(x_train)} images, batch {cfg['batch_size']}, {model.dtype}, "
          f"{os.cpu_count()} cores, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    for _ in range(epochs):
        train_epoch(model, opt, x_train, state, cfg["batch_size"], stop, lambda *a, **k: None)
        print(f"  epoch {state['epoch']}: {state['epoch_seconds'][-1]:.3f} s, train loss {state['train_loss'][-1]:.2f}",
              flush=True)
    epoch_s = float(np.median(state["epoch_seconds"]))
    # Where a step's time goes: the same work as train_epoch, one phase at a time, median over <= 100 steps.
    phases = {"batching": [], "forward": [], "backward": [], "adam": []}
    grads, rng, perm = model.grads(), state["rng"], state["rng"].permutation(len(x_train))
    for step in range(min(100, n_steps)):
        t0 = time.perf_counter(); x, eps = batch(x_train, perm, step, cfg["batch_size"], rng, model.latent)
        t1 = time.perf_counter(); model.forward(x, eps)
        t2 = time.perf_counter(); model.backward()
        t3 = time.perf_counter(); opt.step(grads)
        t4 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name].append(dt)
    step_ms = {k: 1e3 * float(np.median(v)) for k, v in phases.items()}
    floor_s, flops = matmul_floor(model, cfg["batch_size"])
    floor_epoch = floor_s * n_steps
    print(f"median epoch {epoch_s:.3f} s = {len(x_train) / epoch_s:,.0f} examples/s")
    print(f"per step (median of {len(phases['adam'])}): " + ", ".join(f"{k} {v:.3f} ms" for k, v in step_ms.items()))
    print(f"matrix products alone (same shapes, this run): {1e3 * floor_s:.3f} ms/step = {floor_epoch:.3f} s/epoch, "
          f"{flops * n_steps / 1e9:.0f} GFLOP/epoch at {flops / floor_s / 1e9:.0f} GFLOP/s")
    print(f"epoch / floor = {epoch_s / floor_epoch:.2f}; outside the matrix products: "
          f"{epoch_s - floor_epoch:.3f} s/epoch (elementwise work, optimizer, batching)")
    print(f"peak memory (max RSS of this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


# ---- main --------------------------------------------------------------------------------------------------

def run(args):
    if args.analyze:
        return run_analysis(args)
    if args.resume:
        model, opt, state, cfg = load_checkpoint(args.resume, args)
        out = args.out or os.path.dirname(args.resume) or "."
    else:
        cfg = {k: getattr(args, k) if getattr(args, k) is not None else DEFAULTS[k] for k in TRAINING_OPTIONS}
        out = args.out or os.path.join("runs", f"{cfg['dataset']}-h{cfg['hidden']}-z{cfg['latent']}-s{cfg['seed']}"
                                       + ("" if cfg["prior"] == "standard" else f"-{cfg['prior']}"))
    x_train, _, x_test, y_test = mnist.load(cfg["dataset"], args.data_dir, args.mirror)
    image_index = check_image_index(args.posterior_image, x_test)   # before training, not after it
    if not args.resume:
        model = vae.VAE(x_train.shape[1], cfg["hidden"], cfg["latent"], seed=cfg["seed"], prior=cfg["prior"],
                        components=cfg["prior_components"])
        cfg["prior_components"] = model.components
        if cfg["prior"] == "vamp":  # pseudo-inputs start as K random training images (Tomczak & Welling's option)
            pick = np.random.default_rng([cfg["seed"], 6]).choice(len(x_train), model.components, replace=False)
            model.prior_params["u"][...] = x_train[pick] / 255
        opt = Adam(model.params(), lr=cfg["lr"])
        state = new_state(cfg)
    if args.benchmark:
        return benchmark(model, opt, x_train, cfg, 3 if args.epochs is None else args.epochs)
    args.epochs = 10 if args.epochs is None else args.epochs
    cfg = {**cfg, "epochs": args.epochs}
    checkpoint = os.path.join(out, "checkpoint.npz")
    print(f"{cfg['dataset']}: {len(x_train)} train, {len(x_test)} test images; VAE {model.n_in}-{cfg['hidden']}-"
          f"{cfg['latent']}-{cfg['hidden']}-{model.n_in}, {prior_name(model)} prior, Adam lr {cfg['lr']}, batch {cfg['batch_size']}; "
          f"writing to {out}" + (f" (resuming at epoch {state['epoch'] + 1}, step {state['step']})"
                                 if args.resume else ""))

    # Ctrl-C: finish the step in flight, save a checkpoint, exit. A second Ctrl-C stops at once.
    stop = {"requested": False}
    def on_sigint(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while state["epoch"] < args.epochs:
            if not train_epoch(model, opt, x_train, state, cfg["batch_size"], stop, progress_bar):
                save_checkpoint(checkpoint, model, opt, state, cfg)
                print(f"\ninterrupted: saved {checkpoint} at epoch {state['epoch'] + 1}, step {state['step']}; "
                      f"continue with: python train.py --resume {checkpoint}" +
                      (f" --data-dir {args.data_dir}" if args.data_dir else "") +
                      (f" --epochs {args.epochs}" if args.epochs != 10 else ""))
                return 130
            test = evaluate(model, x_test, cfg["seed"])
            state["test_loss_curve"].append(float(test[0]))
            save_checkpoint(checkpoint, model, opt, state, cfg)
            print(f"epoch {state['epoch']:3d}  train {state['train_loss'][-1]:8.2f}  test {test[0]:8.2f} "
                  f"(recon {test[1]:7.2f} + kl {test[2]:6.2f})  {len(x_train) / state['epoch_seconds'][-1]:7.0f} "
                  f"ex/s  {state['epoch_seconds'][-1]:5.2f} s", flush=True)
    except NonFiniteLoss as err:
        kept = f"the last good checkpoint is {checkpoint}" if os.path.exists(checkpoint) else \
            "no checkpoint was written"
        raise NonFiniteLoss(f"{err}; stopped, {kept}. Try a smaller --lr")
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    test = evaluate(model, x_test, cfg["seed"])
    os.makedirs(out, exist_ok=True)
    vae.save(model, os.path.join(out, "model.npz"))
    write_figures(out, model, x_test, state, cfg["seed"])
    metrics = {"config": cfg, "train_loss": state["train_loss"], "train_recon": state["train_recon"],
               "train_kl": state["train_kl"], "test_loss_curve": state["test_loss_curve"],
               "epoch_seconds": state["epoch_seconds"], "test_loss": float(test[0]), "test_recon": float(test[1]),
               "test_kl": float(test[2]),
               "examples_per_second": len(x_train) * len(state["epoch_seconds"]) / max(sum(state["epoch_seconds"]), 1e-9)}
    print(f"test negative ELBO {test[0]:.2f} nats (recon {test[1]:.2f} + kl {test[2]:.2f})")
    metrics.update(analyze(model, x_train, x_test, y_test, cfg, out, args.iw_samples, args.gmm_components,
                           args.gmm_covariance, image_index))
    write_json(os.path.join(out, "metrics.json"), metrics)
    print(f"wrote model.npz, metrics.json and figures to {out}")
    return 0


def check_image_index(index, x_test):
    if index >= len(x_test):
        raise mnist.DataError(f"--posterior-image {index} is out of range: the test set has {len(x_test)} images")
    return index


def run_analysis(args):
    """--analyze MODEL: the after-training measurements and figures of a saved model, merged into the
    metrics.json beside it (or in --out)."""
    model, _ = vae.load(args.analyze)
    out = args.out or os.path.dirname(args.analyze) or "."
    metrics_path = os.path.join(out, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        try:
            with open(metrics_path) as f:
                metrics = json.load(f)
        except (OSError, ValueError) as err:
            raise vae.CheckpointError(f"{metrics_path}: unreadable ({err}); move it away or pass --out")
    cfg = {**DEFAULTS, **metrics.get("config", {}),
           **{k: getattr(args, k) for k in ("dataset", "seed") if getattr(args, k) is not None}}
    x_train, _, x_test, y_test = mnist.load(cfg["dataset"], args.data_dir, args.mirror)
    if x_train.shape[1] != model.n_in:
        raise vae.CheckpointError(f"{args.analyze}: the model takes {model.n_in} inputs, {cfg['dataset']} has "
                                  f"{x_train.shape[1]}")
    index = check_image_index(args.posterior_image, x_test)
    os.makedirs(out, exist_ok=True)
    metrics.update(analyze(model, x_train, x_test, y_test, cfg, out, args.iw_samples, args.gmm_components,
                           args.gmm_covariance, index))
    write_json(metrics_path, metrics)
    print(f"wrote metrics.json and figures to {out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (mnist.DataError, vae.CheckpointError, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # outside the training loop (download, analysis): every file is whole or absent
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
