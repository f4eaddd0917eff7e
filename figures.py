"""What a run shows a person: its first line, a progress bar and a line per epoch while it trains, and the figures.
Each drawing function returns {file name: matplotlib Figure}, and save() writes them. Images are drawn dark on
white."""
import math
import os
import sys
import textwrap
from statistics import NormalDist

import numpy as np

import analysis
import mnist
import priors
from vae import log_normal, sigmoid


def new_figure(**kwargs):
    """A matplotlib Figure, with no window and no pyplot state. matplotlib is imported with the first figure, so
    that training alone (--benchmark) does not carry its 30 MB."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def save(out, figs):
    """Write {file name: Figure} into the folder out as PNGs, each whole or not at all."""
    for name, fig in figs.items():
        # Trimmed to the drawing (bbox_inches="tight"), unless the figure set its own margins (fig.margins_set).
        tight = None if getattr(fig, "margins_set", False) else "tight"
        with mnist.atomic_path(os.path.join(out, name)) as tmp:
            fig.savefig(tmp, format="png", dpi=80, bbox_inches=tight,
                        pil_kwargs={"compress_level": 1})                # PNG compression level 1: 2x faster


def progress_bar(state, n_steps, seen):
    """While a run trains: an in-epoch progress line, only when stderr is a terminal (logs stay one line per epoch)."""
    if sys.stderr.isatty() and (state["step"] % 10 == 0 or state["step"] == n_steps):
        done = state["step"] / n_steps
        sys.stderr.write(f"\r  epoch {state['epoch'] + 1} [{'#' * int(30 * done):<30}] {100 * done:3.0f}%  "
                         f"train loss {state['sums'][0] / seen:7.2f}")
        sys.stderr.write("\r" + " " * 72 + "\r" if state["step"] == n_steps else "")
        sys.stderr.flush()


def progress_line(what):
    """For a long measurement: a function of the fraction done that redraws '  what: 40%' on a terminal."""
    def show(fraction):
        if sys.stderr.isatty():
            sys.stderr.write(f"\r  {what}: {100 * fraction:3.0f}%" + ("\r" + " " * 40 + "\r" if fraction >= 1 else ""))
            sys.stderr.flush()
    return show


def run_header(cfg, model, state, n_train, n_test, out):
    """The line a run starts with: the data, the model, the recipe, and what it will train."""
    start = state["epoch"] + 1
    plan = f"training epochs {start}-{cfg['epochs']}" if start <= cfg["epochs"] else "no training (--epochs 0)"
    if state["perm"] is not None and start <= cfg["epochs"]:
        plan += f" (epoch {start} from step {state['step'] + 1})"
    return (f"{cfg['dataset']}{' (binarized)' if cfg['binarize'] else ''}: {n_train} train, {n_test} test images; VAE "
            f"{model.n_in}-{cfg['hidden']}-{cfg['latent']}-{cfg['hidden']}-{model.n_in}, {prior_label(model)} prior, "
            f"{likelihood_label(model)} likelihood, "
            f"beta {cfg['beta']:g} (warm-up: {cfg['kl_warmup']} epochs), Adam lr {cfg['lr']}, batch "
            f"{cfg['batch_size']}; {plan}; writing to {out}")


def interrupted_line(state, checkpoint, data_dir):
    """The line Ctrl-C ends a run with: where it stopped, and the command that continues it."""
    where = f"at epoch {state['epoch'] + 1}, step {state['step']}" if state["perm"] is not None else \
        f"after epoch {state['epoch']}"
    return f"\ninterrupted {where}; continue with: python train.py --resume {checkpoint}" + (
        f" --data-dir {data_dir}" if data_dir else "")


def epoch_line(state, loss, recon, kl, n_train):
    """The line each epoch ends with: its mean training loss, the test loss, the KL weight, the speed."""
    seconds = state["epoch_seconds"][-1]
    return (f"epoch {state['epoch']:3d}  train {state['train_loss'][-1]:8.2f}  test {loss:8.2f} (recon {recon:7.2f} + "
            f"kl {kl:6.2f})  beta {state['kl_weight'][-1]:.3g}  {n_train / seconds:7.0f} ex/s  {seconds:5.2f} s")


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


def likelihood_label(model):
    sigma = model.likelihood.decoder_sigma
    return {"bernoulli": "Bernoulli", "cb": "continuous Bernoulli"}.get(model.likelihood.name) or (
        f"Gaussian (sigma {sigma:g})" if isinstance(sigma, float) else "Gaussian (learned sigma)")


def prior_label(model):
    return "N(0, I)" if model.prior_name == "standard" else f"learned {model.prior_name} (K={model.components})"


def run_figures(model, x_test, state, seed):
    """After training: reconstructions, prior samples, the loss curves and where the gradients went."""
    x = mnist.to_float(x_test[:16], model.dtype)
    recon = new_figure(figsize=(8, 1.3))
    image_grid(recon.subplots(), np.concatenate([x, model.reconstruct(x)]), rows=2,
               title="test images (top) and their reconstructions at z = mu(x) (bottom)")
    samples = new_figure(figsize=(5, 5))
    image_grid(samples.subplots(), model.sample_prior(64, np.random.default_rng([seed, 2])), rows=8,
               title=f"decoded prior samples, z ~ {prior_label(model)}")
    curves = new_figure(figsize=(5, 3.2))
    ax = curves.subplots()
    epochs = np.arange(1, len(state["train_loss"]) + 1)
    ax.plot(epochs, state["train_loss"], "o-", label="train (mean over the epoch)")
    ax.plot(epochs, state["test_loss_curve"], "s-", label="test (end of epoch)")
    if state["train_objective"] != state["train_loss"]:
        ax.plot(epochs, state["train_objective"], "^:", label="train objective, recon + beta * KL")
    ax.set_xlabel("epoch"); ax.set_ylabel("negative ELBO (nats / example)"); ax.legend(); ax.grid(alpha=0.3)
    figs = {"reconstructions.png": recon, "samples_prior.png": samples, "loss_curves.png": curves}
    if state["train_loss"]:                         # none with --epochs 0
        figs["gradient_paths.png"] = gradient_paths(state["gradient_paths"], state["gradient_paths_per_unit"])
    return figs


PATH_STYLES = {"recon_mu": ("reconstruction -> mu", "tab:blue", "-"), "kl_mu": ("KL -> mu", "tab:red", "-"),
               "recon_log_var": ("reconstruction -> log_var", "tab:blue", "--"),
               "kl_log_var": ("KL -> log_var", "tab:red", "--")}


def gradient_paths(paths, per_unit):
    """The four gradients that meet at the encoder's outputs, per example (metrics.json: gradient_paths and
    gradient_paths_per_unit): their RMS over training; their RMS per unit in the last epoch (units ordered by the
    reconstruction's pull on mu); and the mean of the two log_var paths per unit, which pull against each other."""
    fig = new_figure(figsize=(15, 3.8))
    over_time, rms, mean = fig.subplots(1, 3)
    last = {name: {k: np.array(v) for k, v in values[-1].items()} for name, values in per_unit.items()}
    order = np.argsort(-last["recon_mu"]["rms"])
    units = np.arange(len(order))
    for name, (label, color, style) in PATH_STYLES.items():
        over_time.plot(np.arange(1, len(paths[name]) + 1), paths[name], color=color, ls=style, marker="o", ms=3,
                       label=label)
        rms.plot(units, last[name]["rms"][order], color=color, ls=style, marker="o", ms=3, label=label)
        if name.endswith("log_var"):
            mean.bar(units + (0.2 if name.startswith("kl") else -0.2), last[name]["mean"][order], width=0.4,
                     color=color, label=f"{label}, mean")
    over_time.set(xlabel="epoch", title="all units", yscale="log", ylabel="RMS of dL/d(output) per example")
    rms.set(xlabel="latent unit", title="each unit, last epoch", yscale="log")
    mean.set(xlabel="latent unit", title="mean per unit, last epoch (> 0 pushes sigma down)")
    mean.axhline(0, color="k", lw=0.8)
    from matplotlib.ticker import FuncFormatter, LogLocator
    for ax in (over_time, rms):                     # log axes labelled at 1, 2, 5 x 10^k, in plain numbers
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in (over_time, rms, mean):
        ax.minorticks_off(); ax.grid(alpha=0.3)
    for ax in (rms, mean):
        ax.set_xticks(units, [str(i) for i in order], fontsize=7)
    over_time.legend(fontsize=8); mean.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.subplots_adjust(wspace=0.25)
    return fig


def analysis_figures(model, x_test, y_test, found, image_index, seed):
    """The latent space after analysis.analyze (its second result is `found`): three ways to sample, the
    marginals of q(z) against the prior, and for Z = 2 the plane itself."""
    rng = np.random.default_rng([seed, 5])
    x = mnist.to_float(x_test[image_index:image_index + 1], model.dtype)
    three = new_figure(figsize=(13, 4.8))
    axes = three.subplots(1, 3)
    image_grid(axes[0], model.sample_prior(64, rng), rows=8, title=f"prior: z ~ {prior_label(model)}")
    image_grid(axes[1], np.concatenate([x, model.sample_posterior(x, 63, rng)[0]]), rows=8,
               title=f"posterior of test image {image_index} (top left):\nz ~ N(mu(x), sigma(x)^2)")
    from matplotlib.patches import Rectangle
    axes[1].add_patch(Rectangle((0.5, 0.5), 28, 28, fill=False, edgecolor="tab:red", linewidth=2))
    z_agg = priors.gmm_sample(found["gmm"], 64, rng).astype(model.dtype)
    image_grid(axes[2], model.likelihood.mean(model.decode(z_agg)), rows=8,
               title="aggregated posterior: z ~ mixture\nfitted to the training codes")
    figs = {"samples_three_ways.png": three, "prior_vs_aggregate.png": marginals(model, found),
            "samples_mean_and_draw.png": mean_and_draw(model, rng)}
    if model.latent == 2:
        figs.update(latent_plane(model, found["mu_test"], y_test, found["z_prior"], found["in_hole"]))
    return figs


def mean_and_draw(model, rng, n=12):
    """Prior draws z ~ p(z) decoded two ways: the mean E[x|z] of p(x|z) (what the other figures show: the decoder's
    picture of x), and one sample x ~ p(x|z) (what the model generates, noise included). For the continuous
    Bernoulli, lambda = sigmoid(l) too: not its mean."""
    logits = model.decode(model.sample_z(n, rng).astype(model.dtype))
    rows = {"mean E[x|z]": model.likelihood.mean(logits), "a sample x ~ p(x|z)": model.likelihood.sample(logits, rng)}
    if model.likelihood.name == "cb":
        rows["lambda = sigmoid(l), not the mean"] = sigmoid(logits)
    fig = new_figure(figsize=(9, 1.1 * len(rows) + 0.5))
    for ax, (title, images) in zip(fig.subplots(len(rows), 1, squeeze=False)[:, 0], rows.items()):
        image_grid(ax, np.clip(images, 0, 1), rows=1, title=title)
    fig.suptitle(f"{n} prior draws, decoded by the {likelihood_label(model)} likelihood", fontsize=10)
    return fig


def mixture_marginal(grid, pi, means, variances):
    """sum_k pi_k N(t; m_k, v_k) at each t of grid: one dimension's marginal of a Gaussian mixture."""
    return np.exp(log_normal(grid[:, None, None], means[:, None], np.log(variances)[:, None])) @ pi


def prior_as_mixture(model):
    """(means, log_vars, log_pi) of p(z) in float64: a learned prior's mixture, or N(0, I) as one component."""
    if model.prior_name == "standard":
        return np.zeros((1, model.latent)), np.zeros((1, model.latent)), np.zeros(1)
    return tuple(a.astype(np.float64) for a in model.mixture())


def marginals(model, found):
    """Per dimension: the aggregated posterior (histogram of codes, and the fitted mixture) against the prior."""
    gmm, moments, z_train, zs = found["gmm"], found["moments"], found["z_train"], model.latent
    cols = min(zs, 5)
    rows, width = math.ceil(zs / cols), 2.6 * cols
    # The title wrapped at 13 characters an inch (its 9-point font sets about 14). Margins fixed in inches, for the
    # title's lines, the tick labels, between rows and between columns: tight_layout and bbox_inches="tight" measure
    # every tick of the axes first (the figure took 1.05-1.29 s with them, 0.81-0.97 s without; docs, section 6).
    title = textwrap.wrap("per dimension: aggregated posterior (histogram of training codes; line: fitted mixture; "
                          f"var: test set) vs prior {prior_label(model)} (dashed)", int(13 * width))
    top, bottom, side, between_rows, between_cols = 0.5 + 0.15 * len(title), 0.3, 0.1, 0.5, 0.2
    height = 1.9 * rows + 0.15 * (len(title) - 1)                       # a wrapped title's lines add height
    fig = new_figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    # hspace and wspace are the gaps as fractions of an axes' height and width
    fig.subplots_adjust(left=side / width, right=1 - side / width, top=1 - top / height, bottom=bottom / height,
                        hspace=between_rows * rows / (height - top - bottom - between_rows * (rows - 1)),
                        wspace=between_cols * cols / (width - 2 * side - between_cols * (cols - 1)))
    fig.margins_set = True                                              # save(): no bbox_inches="tight"
    gmm_vars = np.diagonal(gmm["covs"], axis1=1, axis2=2) if gmm["covs"].ndim == 3 else gmm["covs"]
    prior_means, prior_log_vars, prior_log_pi = prior_as_mixture(model)
    for d, ax in enumerate(axes.flat):
        if d >= zs:
            ax.set_axis_off(); continue
        half = 4 * max(1.0, np.sqrt(moments["variance"][d]))          # +-4 sd of q(z), at least +-4
        grid = np.linspace(moments["mean"][d] - half, moments["mean"][d] + half, 200)
        counts, edges = np.histogram(z_train[:, d], bins=60, range=(grid[0], grid[-1]), density=True)
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.4)
        ax.plot(grid, mixture_marginal(grid, np.exp(gmm["log_pi"]), gmm["means"][:, d], gmm_vars[:, d]),
                color="tab:blue", lw=1.2)
        ax.plot(grid, mixture_marginal(grid, np.exp(prior_log_pi), prior_means[:, d], np.exp(prior_log_vars[:, d])),
                "k--", lw=1)
        active = moments["activity"][d] > 0.01
        ax.set_title(f"z{d}: var {moments['variance'][d]:.2f}" + ("" if active else " (inactive)"), fontsize=8)
        ax.set_yticks([]); ax.tick_params(labelsize=7)
    fig.suptitle("\n".join(title), fontsize=9)
    return fig


def draw_codes_against_prior(ax, model, mu, labels, title):
    """Posterior means in the plane, coloured by label, with the N(0, I) prior's 1, 2, 3 sigma circles."""
    points = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=2, alpha=0.6)
    if model.prior_name == "standard":
        from matplotlib.patches import Circle
        for r in (1, 2, 3):
            ax.add_patch(Circle((0, 0), r, fill=False, ls="--", color="k", lw=0.8))
        lim = max(4.0, 1.1 * float(np.quantile(np.abs(mu), 0.995)))     # wider when the codes spread further
        ax.set_xlim(-lim, lim); ax.set_ylim(-lim, lim)
    ax.set_aspect("equal"); ax.set_title(title, fontsize=10)
    return points


def latent_plane(model, mu, labels, z_prior, in_hole):
    """Z = 2: the test codes against the prior with the prior draws that fall in holes, and a decoded grid."""
    space = new_figure(figsize=(6.5, 6))
    ax = space.subplots()
    title = "test posterior means by label; prior " + ("1, 2, 3 sigma circles" if model.prior_name == "standard"
                                                       else prior_label(model))
    space.colorbar(draw_codes_against_prior(ax, model, mu, labels, title), ax=ax, ticks=range(10), label="label")
    shown = slice(0, 1000)
    ax.scatter(*z_prior[shown][in_hole[shown]].T, marker="x", color="red", s=14,
               label=f"prior draws in holes ({100 * in_hole.mean():.1f}% of all)")
    ax.legend(loc="upper right", fontsize=8)
    # A grid over the plane at quantiles of the prior on each axis (equal prior mass per cell): of N(0, 1), or of
    # a learned prior's own draws.
    n = 20
    levels = np.linspace(0.5 / n, 1 - 0.5 / n, n)
    if model.prior_name == "standard":
        gx = gy = np.array([NormalDist().inv_cdf(p) for p in levels])
    else:
        gx, gy = np.quantile(z_prior[:, 0], levels), np.quantile(z_prior[:, 1], levels)
    z = np.stack(np.meshgrid(gx, gy[::-1]), -1).reshape(-1, 2).astype(model.dtype)
    manifold = new_figure(figsize=(7, 7))
    image_grid(manifold.subplots(), model.likelihood.mean(model.decode(z)), rows=n,
               title=f"decoded grid of prior quantiles ({50 / n:.1f}% .. {100 - 50 / n:.1f}% per axis):\n"
                     "z0 grows to the right, z1 upwards, as in latent_space.png")
    return {"latent_space.png": space, "latent_manifold.png": manifold}


def comparison_figures(models, x_test, y_test, image_index, seed, prefix):
    """A comparison of runs (--betas, --likelihoods), {name: model}: for each run a row of prior samples and of
    posterior samples of the same test image; for Z = 2, each run's test codes against the prior."""
    x = mnist.to_float(x_test[image_index:image_index + 1], next(iter(models.values())).dtype)
    fig = new_figure(figsize=(14, 2.3 * len(models) + 0.4))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, (name, model) in zip(axes, models.items()):
        rng = np.random.default_rng([seed, 5])
        image_grid(row[0], model.sample_prior(20, rng), rows=2)
        image_grid(row[1], np.concatenate([x, model.sample_posterior(x, 19, rng)[0]]), rows=2)
        row[0].set_title(f"{name}: prior samples", fontsize=9, loc="left")
        row[1].set_title(f"{name}: posterior samples of test image {image_index} (first: the image)",
                         fontsize=9, loc="left")
    figs = {f"{prefix}_samples.png": fig}
    if all(model.latent == 2 for model in models.values()):
        plane = new_figure(figsize=(3.3 * len(models), 3.6))
        for ax, (name, model) in zip(plane.subplots(1, len(models), squeeze=False)[0], models.items()):
            draw_codes_against_prior(ax, model, analysis.encode_all(model, x_test)[0], y_test, name)
        figs[f"{prefix}_latent.png"] = plane
    return figs
