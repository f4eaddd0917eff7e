"""The figures a run draws, from what it is given. Each drawing function returns {file name:
matplotlib Figure}, and save() writes them. Images are drawn dark on white.
"""
import math
import os
import textwrap
from statistics import NormalDist

import numpy as np

import mnist
from mnist import atomic_path
from vae import log_normal, sigmoid

from lab.codes import interpolate, traverse
from lab.gmm import gmm_sample
from lab.models import decoder_sigma_of, likelihood_label, prior_label


def new_figure(**kwargs):
    """A matplotlib Figure, with no window and no pyplot state. matplotlib is imported with the
    first figure, so that training alone (--benchmark) does not load it."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def save(out, figs):
    """Write {file name: Figure} into the folder out as PNGs, each whole or not at all. A figure is
    trimmed to its drawing (bbox_inches='tight') unless it set its own margins (fig.margins_set)."""
    for name, fig in figs.items():
        sets_margins = getattr(fig, "margins_set", False)
        tight = None if sets_margins else "tight"
        with atomic_path(os.path.join(out, name)) as tmp:
            fig.savefig(tmp, format="png", dpi=80, bbox_inches=tight,
                        pil_kwargs={"compress_level": 1})


def tile(images, rows, gap=1.0):
    """(n, 784) images tiled into `rows` rows of 28 x 28, one pixel of `gap` between them."""
    cols = math.ceil(len(images) / rows)
    grid = np.full((rows * 29 + 1, cols * 29 + 1), gap)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + 29 * r:29 * (r + 1), 1 + 29 * c:29 * (c + 1)] = img.reshape(28, 28)
    return grid


def image_grid(ax, images, rows, title=None):
    """Tile (n, 784) images in [0, 1] into `rows` rows on one axis."""
    ax.imshow(tile(images, rows), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)


# ---- after training: the run itself --------------------------------------------------------------

def run_figures(model, x_test, state, seed):
    """Reconstructions, prior samples, the loss curves and where the gradients went."""
    x = mnist.to_float(x_test[:16], model.dtype)
    recon = new_figure(figsize=(8, 1.3))
    image_grid(recon.subplots(), np.concatenate([x, model.reconstruct(x)]), rows=2,
               title="test images (top) and their reconstructions at z = mu(x) (bottom)")
    samples = new_figure(figsize=(5, 5))
    image_grid(samples.subplots(), model.sample_prior(64, np.random.default_rng([seed, 2])), rows=8,
               title=f"decoded prior samples, z ~ {prior_label(model)}")
    figs = {"reconstructions.png": recon, "samples_prior.png": samples,
            "loss_curves.png": loss_curves(state)}
    if decoder_sigma_of(model) == "per-pixel":
        figs["decoder_sigma.png"] = pixel_sigma(model, x_test, np.random.default_rng([seed, 7]))
    if state["train_loss"]:                         # none with --epochs 0
        figs["gradient_paths.png"] = gradient_paths(state["gradient_paths"],
                                                    state["gradient_paths_per_unit"])
    return figs


def loss_curves(state):
    """The training loss (mean over each epoch) and the test loss (end of each epoch)."""
    from matplotlib.ticker import MaxNLocator
    fig = new_figure(figsize=(5, 3.2))
    ax = fig.subplots()
    epochs = np.arange(1, len(state["train_loss"]) + 1)
    ax.plot(epochs, state["train_loss"], "o-", label="train (mean over the epoch)")
    ax.plot(epochs, state["test_loss_curve"], "s-", label="test (end of epoch)")
    if state["train_objective"] != state["train_loss"]:
        ax.plot(epochs, state["train_objective"], "^:", label="train objective, recon + beta * KL")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # whole epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO (nats / example)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def pixel_sigma(model, x_test, rng, n=8):
    """Where a decoder with a sigma per pixel is uncertain: for n test images, each decoded at
    z = mu(x), the mean m, sigma of every pixel (log scale), and a sample
    x ~ N(m, diag(sigma^2))."""
    from matplotlib.colors import LogNorm
    x = mnist.to_float(x_test[:n], model.dtype)
    mu, _ = model.encode(x)
    outputs = model.decode(mu)
    sigma = model.likelihood.sigma(outputs)
    fig = new_figure(figsize=(9, 5.6))
    axes = fig.subplots(4, 1)
    image_grid(axes[0], x, rows=1, title="test images x")
    image_grid(axes[1], model.likelihood.mean(outputs), rows=1, title="means m at z = mu(x)")
    # sigma: log colours from its smallest to its largest value, the gaps white
    low = max(float(sigma.min()), 1e-30)
    grid = tile(sigma, rows=1, gap=np.nan)
    picture = axes[2].imshow(grid, cmap="magma", norm=LogNorm(low, float(sigma.max())),
                             interpolation="nearest")
    axes[2].set_axis_off()
    axes[2].set_title("sigma of each pixel (dark: sure, bright: unsure)", fontsize=10)
    fig.colorbar(picture, ax=axes[2], orientation="vertical", fraction=0.05, pad=0.01)
    sample = model.likelihood.sample(outputs, rng)
    image_grid(axes[3], np.clip(sample, 0, 1), rows=1, title="a sample x ~ N(m, diag(sigma^2))")
    fig.suptitle(f"{likelihood_label(model)}: where the decoder is uncertain", fontsize=10)
    return fig


def sigma_curves(panels):
    """{panel title: {run name: its decoder_sigma_curve}}: a Gaussian decoder's sigma at the end of
    each epoch (log scale), a panel each; for a sigma per pixel its median, and its smallest value
    dotted."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator
    fig = new_figure(figsize=(4.6 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, curves) in zip(axes, panels.items()):
        for name, curve in curves.items():
            epochs = np.arange(1, len(curve) + 1)
            if curve and "sigma" in curve[0]:
                ax.plot(epochs, [s["sigma"] for s in curve], "o-", ms=3, label=name)
                continue
            line, = ax.plot(epochs, [s["median"] for s in curve], "o-", ms=3,
                            label=f"{name}: median")
            ax.plot(epochs, [s["smallest"] for s in curve], ":", color=line.get_color(),
                    label=f"{name}: smallest")
        ax.set_yscale("log")
        # labelled at 1, 2, 5 x 10^k, in plain numbers; epochs in whole numbers
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.minorticks_off()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    # one legend, right of the last panel: the panels draw the same runs in the same colours
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[0].set_ylabel("decoder sigma")
    return fig


def runaway(curves):
    """{run name: {"train_loss", "test_loss", "smallest_sigma": one value per epoch, "stopped": why
    the run stopped early, or None}}: the loss and a per-pixel sigma's smallest value, epoch by
    epoch, of runs that may end in a NaN (marked x, after their last epoch)."""
    fig = new_figure(figsize=(10, 3.6))
    loss_ax, sigma_ax = fig.subplots(1, 2)
    for name, curve in curves.items():
        epochs = np.arange(1, len(curve["train_loss"]) + 1)
        line, = loss_ax.plot(epochs, curve["train_loss"], "o-", ms=3, label=f"{name}: train")
        colour = line.get_color()
        loss_ax.plot(epochs, curve["test_loss"], "s:", ms=3, color=colour, label=f"{name}: test")
        sigma_ax.plot(epochs, curve["smallest_sigma"], "o-", ms=3, color=colour, label=name)
        if curve["stopped"]:
            nan_epoch = len(epochs) + 1
            sigma_ax.plot([nan_epoch], [curve["smallest_sigma"][-1]], "x", ms=10, mew=2,
                          color=colour, label=f"{name}: {curve['stopped']}")
    loss_ax.set_yscale("symlog", linthresh=100)
    loss_ax.set_ylabel("negative ELBO (nats / example)")
    loss_ax.set_title("the loss", fontsize=10)
    sigma_ax.set_yscale("log")
    sigma_ax.set_ylabel("smallest sigma of any pixel")
    sigma_ax.set_title("the smallest sigma of 1,000 test images' pixels", fontsize=10)
    for ax in (loss_ax, sigma_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def sample_figures(drawn, samples):
    """The samples of every sampler, measured (quality.sample_quality): samples_measured.png."""
    return {"samples_measured.png": samples_measured(drawn, samples)}


def samples_measured(drawn, samples, per_row=12):
    """A row of images from each sampler (quality.sample_quality), labelled with its Frechet
    distance to the test images, its classes' total variation from uniform and its share of unsure
    images; then the prior's means the classifier is least sure of, and those it is surest of."""
    rows = []
    for name, m in samples["samplers"].items():
        label = (f"{name}: Frechet {m['frechet']:.1f}, classes TV {m['class_tv']:.2f}, unsure "
                 f"{m['unsure']:.0%}")
        rows.append((label, drawn["images"][name]))
    ordered = drawn["prior_by_confidence"]
    rows.append(("prior means the classifier is least sure of", ordered[:per_row]))
    rows.append(("prior means it is surest of", ordered[-per_row:]))
    fig = new_figure(figsize=(per_row * 0.75, 1.05 * len(rows)))
    for ax, (label, images) in zip(fig.subplots(len(rows), 1), rows):
        pixels = np.asarray(images[:per_row], dtype=np.float64)
        if np.issubdtype(np.asarray(images).dtype, np.integer):
            pixels = pixels / 255                       # real images, uint8
        image_grid(ax, pixels, rows=1)
        ax.set_title(label, loc="left", fontsize=8)
    fig.suptitle(f"samples against the {samples['reference']}: lower is better in every number",
                 fontsize=9)
    return fig


def bound_curves(runs, paper, paper_epochs=3280):
    """A paper's table against epochs. runs: {name: {"curve": the test bound each epoch, "nll": the
    -log p(x) bound at the last epoch}}; paper: {name: its -log p(x) after paper_epochs}. Each run's
    curve on a log axis of epochs, its last bound a dot, and the paper's number a star in the same
    colour (a name's "PyTorch " prefix aside), so each run is seen heading toward its star."""
    fig = new_figure(figsize=(8, 4.6))
    ax = fig.subplots()
    colours = {}
    for name, run in runs.items():
        paper_name = name.replace("PyTorch ", "")
        epochs = np.arange(1, len(run["curve"]) + 1)
        style = ":" if name != paper_name else "-"
        line, = ax.plot(epochs, run["curve"], style, marker=".", color=colours.get(paper_name),
                        label=name)
        colours.setdefault(paper_name, line.get_color())
        ax.plot(epochs[-1], run["nll"], "o", color=line.get_color())
    for name, nll in paper.items():
        ax.plot(paper_epochs, nll, "*", ms=12, color=colours.get(name, "black"),
                label=f"{name}, the paper")
    ax.set_xscale("log")
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("nats per test image")
    ax.set_title("lines: the test -ELBO each epoch (PyTorch's: the bound of one draw); dots: the "
                 "bound of\n5,000 draws on -log p(x) at the last epoch; stars: the paper's after "
                 "the full schedule", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="center")
    return fig


PATH_STYLES = {  # label, colour, line style
    "recon_mu": ("reconstruction -> mu", "tab:blue", "-"),
    "kl_mu": ("KL -> mu", "tab:red", "-"),
    "recon_log_var": ("reconstruction -> log_var", "tab:blue", "--"),
    "kl_log_var": ("KL -> log_var", "tab:red", "--"),
}


def gradient_paths(paths, per_unit):
    """The four gradients that meet at the encoder's outputs, per example (metrics.json:
    gradient_paths and gradient_paths_per_unit): their RMS over training; their RMS per unit in the
    last epoch (units ordered by the reconstruction's pull on mu); and the mean of the two log_var
    paths per unit, which pull against each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator
    fig = new_figure(figsize=(15, 3.8))
    over_time, rms, mean = fig.subplots(1, 3)
    last = {}
    for name, values in per_unit.items():
        last[name] = {k: np.array(v) for k, v in values[-1].items()}
    order = np.argsort(-last["recon_mu"]["rms"])
    units = np.arange(len(order))
    for name, (label, color, style) in PATH_STYLES.items():
        epochs = np.arange(1, len(paths[name]) + 1)
        over_time.plot(epochs, paths[name], color=color, ls=style, marker="o", ms=3, label=label)
        rms.plot(units, last[name]["rms"][order], color=color, ls=style, marker="o", ms=3,
                 label=label)
        if name.endswith("log_var"):
            offset = 0.2 if name.startswith("kl") else -0.2
            mean.bar(units + offset, last[name]["mean"][order], width=0.4, color=color,
                     label=f"{label}, mean")
    over_time.set(xlabel="epoch", title="all units", yscale="log",
                  ylabel="RMS of dL/d(output) per example")
    rms.set(xlabel="latent unit", title="each unit, last epoch", yscale="log")
    mean.set(xlabel="latent unit", title="mean per unit, last epoch (> 0 pushes sigma down)")
    mean.axhline(0, color="k", lw=0.8)
    # log axes labelled at 1, 2, 5 x 10^k, in plain numbers
    for ax in (over_time, rms):
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in (over_time, rms, mean):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    for ax in (rms, mean):
        ax.set_xticks(units, [str(i) for i in order], fontsize=7)
    over_time.legend(fontsize=8)
    mean.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.subplots_adjust(wspace=0.25)
    return fig


# ---- after the analysis: the latent space --------------------------------------------------------

def analysis_figures(model, x_test, y_test, found, image_index, seed, class_names=None):
    """The latent space after analysis.analyze (its second result is `found`): three ways to sample,
    the marginals of q(z) against the prior, and for Z = 2 the plane itself."""
    from matplotlib.patches import Rectangle
    rng = np.random.default_rng([seed, 5])
    x = mnist.to_float(x_test[image_index:image_index + 1], model.dtype)
    three = new_figure(figsize=(13, 4.8))
    axes = three.subplots(1, 3)
    image_grid(axes[0], model.sample_prior(64, rng), rows=8,
               title=f"prior: z ~ {prior_label(model)}")
    posterior = model.sample_posterior(x, 63, rng)[0]
    image_grid(axes[1], np.concatenate([x, posterior]), rows=8,
               title=f"posterior of test image {image_index} (top left):\nz ~ N(mu(x), sigma(x)^2)")
    axes[1].add_patch(Rectangle((0.5, 0.5), 28, 28, fill=False, edgecolor="tab:red", linewidth=2))
    z_agg = gmm_sample(found["gmm"], 64, rng).astype(model.dtype)
    image_grid(axes[2], model.likelihood.mean(model.decode(z_agg)), rows=8,
               title="aggregated posterior: z ~ mixture\nfitted to the training codes")
    figs = {"samples_three_ways.png": three, "prior_vs_aggregate.png": marginals(model, found),
            "samples_mean_and_draw.png": mean_and_draw(model, rng),
            "interpolations.png": interpolations(model, x_test, found["mu_test"], y_test, seed),
            "traversals.png": traversals(model, found["mu_test"], found["moments"]["activity"],
                                         image_index)}
    if model.latent == 2:
        plane = latent_plane(model, found["mu_test"], y_test, found["z_prior"], found["in_hole"],
                             class_names)
        figs.update(plane)
    return figs


def mean_and_draw(model, rng, n=12):
    """Prior draws z ~ p(z) decoded two ways: the mean E[x|z] of p(x|z) (what the other figures
    show: the decoder's picture of x), and one sample x ~ p(x|z) (what the model generates, noise
    included). For the continuous Bernoulli, lambda = sigmoid(l) too: not its mean."""
    logits = model.decode(model.sample_z(n, rng).astype(model.dtype))
    rows = {"mean E[x|z]": model.likelihood.mean(logits),
            "a sample x ~ p(x|z)": model.likelihood.sample(logits, rng)}
    if model.likelihood.name == "cb":
        rows["lambda = sigmoid(l), not the mean"] = sigmoid(logits)
    fig = new_figure(figsize=(9, 1.1 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (title, images) in zip(axes, rows.items()):
        image_grid(ax, np.clip(images, 0, 1), rows=1, title=title)
    fig.suptitle(f"{n} prior draws, decoded by the {likelihood_label(model)} likelihood",
                 fontsize=10)
    return fig


def mixture_marginal(grid, pi, means, variances):
    """sum_k pi_k N(t; m_k, v_k) at each t of grid: one dimension's marginal of a Gaussian mixture.
    """
    log_densities = log_normal(grid[:, None, None], means[:, None], np.log(variances)[:, None])
    return np.exp(log_densities) @ pi


def prior_as_mixture(model):
    """(means, log_vars, log_pi) of p(z) in float64: a learned prior's mixture, or N(0, I) as one
    component."""
    if model.prior_name == "standard":
        return np.zeros((1, model.latent)), np.zeros((1, model.latent)), np.zeros(1)
    means, log_vars, log_pi = model.mixture()
    return means.astype(np.float64), log_vars.astype(np.float64), log_pi.astype(np.float64)


def marginals(model, found):
    """Per dimension: the aggregated posterior (histogram of codes, and the fitted mixture) against
    the prior."""
    gmm = found["gmm"]
    moments = found["moments"]
    z_train = found["z_train"]
    n_dims = model.latent
    cols = min(n_dims, 5)
    rows = math.ceil(n_dims / cols)
    width = 2.6 * cols
    # The title is wrapped at 13 characters an inch (its 9-point font sets about 14). The margins
    # are fixed in inches, for the title's lines, the tick labels, between rows and between columns:
    # tight layout would measure every tick of the axes first, which is slow.
    title = textwrap.wrap("per dimension: aggregated posterior (histogram of training codes; line: "
                          f"fitted mixture; var: test set) vs prior {prior_label(model)} (dashed)",
                          int(13 * width))
    top = 0.5 + 0.15 * len(title)
    bottom = 0.3
    side = 0.1
    between_rows = 0.5
    between_cols = 0.2
    height = 1.9 * rows + 0.15 * (len(title) - 1)     # a wrapped title's lines add height
    fig = new_figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    # hspace and wspace are the gaps as fractions of an axes' height and width
    axes_height = (height - top - bottom - between_rows * (rows - 1)) / rows
    axes_width = (width - 2 * side - between_cols * (cols - 1)) / cols
    fig.subplots_adjust(left=side / width, right=1 - side / width, top=1 - top / height,
                        bottom=bottom / height, hspace=between_rows / axes_height,
                        wspace=between_cols / axes_width)
    fig.margins_set = True                          # save(): no bbox_inches="tight"
    if gmm["covs"].ndim == 3:
        gmm_vars = np.diagonal(gmm["covs"], axis1=1, axis2=2)
    else:
        gmm_vars = gmm["covs"]
    prior_means, prior_log_vars, prior_log_pi = prior_as_mixture(model)
    for d, ax in enumerate(axes.flat):
        if d >= n_dims:
            ax.set_axis_off()
            continue
        half = 4 * max(1.0, np.sqrt(moments["variance"][d]))      # +-4 sd of q(z), at least +-4
        grid = np.linspace(moments["mean"][d] - half, moments["mean"][d] + half, 200)
        counts, edges = np.histogram(z_train[:, d], bins=60, range=(grid[0], grid[-1]),
                                     density=True)
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.4)
        fitted = mixture_marginal(grid, np.exp(gmm["log_pi"]), gmm["means"][:, d], gmm_vars[:, d])
        ax.plot(grid, fitted, color="tab:blue", lw=1.2)
        prior = mixture_marginal(grid, np.exp(prior_log_pi), prior_means[:, d],
                                 np.exp(prior_log_vars[:, d]))
        ax.plot(grid, prior, "k--", lw=1)
        active = moments["activity"][d] > 0.01
        inactive_note = "" if active else " (inactive)"
        ax.set_title(f"z{d}: var {moments['variance'][d]:.2f}{inactive_note}", fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    fig.suptitle("\n".join(title), fontsize=9)
    return fig


def draw_codes_against_prior(ax, model, mu, labels, title):
    """Posterior means in the plane, coloured by label, with the N(0, I) prior's 1, 2, 3 sigma
    circles."""
    from matplotlib.patches import Circle
    points = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=2,
                        alpha=0.6)
    if model.prior_name == "standard":
        for r in (1, 2, 3):
            ax.add_patch(Circle((0, 0), r, fill=False, ls="--", color="k", lw=0.8))
        lim = max(4.0, 1.1 * float(np.quantile(np.abs(mu), 0.995)))    # wider when the codes spread
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_xlabel("z0")
    ax.set_ylabel("z1")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    return points


def latent_plane(model, mu, labels, z_prior, in_hole, class_names=None):
    """Z = 2: the test codes against the prior with the prior draws that fall in holes, and a
    decoded grid. class_names: the ten labels' names, for the colour bar."""
    class_names = class_names or [str(i) for i in range(10)]
    space = new_figure(figsize=(6.5, 6))
    ax = space.subplots()
    if model.prior_name == "standard":
        prior_text = "1, 2, 3 sigma circles"
    else:
        prior_text = prior_label(model)
    title = f"test posterior means by class; prior {prior_text}"
    points = draw_codes_against_prior(ax, model, mu, labels, title)
    colorbar = space.colorbar(points, ax=ax, ticks=range(10), label="class")
    colorbar.ax.set_yticklabels(class_names, fontsize=8)
    shown = slice(0, 1000)
    holes = z_prior[shown][in_hole[shown]]
    ax.scatter(holes[:, 0], holes[:, 1], marker="x", color="red", s=14,
               label=f"prior draws in holes ({100 * in_hole.mean():.1f}% of all)")
    draw_paths(ax, mu, labels)
    ax.legend(loc="upper right", fontsize=8)
    # A grid over the plane at quantiles of the prior on each axis (equal prior mass per cell): of
    # N(0, 1), or of a learned prior's own draws.
    n = 20
    levels = np.linspace(0.5 / n, 1 - 0.5 / n, n)
    if model.prior_name == "standard":
        gx = np.array([NormalDist().inv_cdf(p) for p in levels])
        gy = gx
    else:
        gx = np.quantile(z_prior[:, 0], levels)
        gy = np.quantile(z_prior[:, 1], levels)
    z = np.stack(np.meshgrid(gx, gy[::-1]), -1).reshape(-1, 2).astype(model.dtype)
    manifold = new_figure(figsize=(7, 7))
    image_grid(manifold.subplots(), model.likelihood.mean(model.decode(z)), rows=n,
               title=f"decoded grid of prior quantiles ({50 / n:.1f}% .. {100 - 50 / n:.1f}% "
                     "per axis):\nz0 grows to the right, z1 upwards, as in latent_space.png")
    return {"latent_space.png": space, "latent_manifold.png": manifold}


# ---- walks through the latent space ---------------------------------------------------------

def interpolation_pairs(labels, n_pairs=8):
    """n_pairs pairs of test images of different classes: the first image of class k and the first
    of class k + 3 (mod 10), for k = 0, 1, ...; (i, j) index pairs."""
    pairs = []
    for k in range(n_pairs):
        first = int(np.flatnonzero(labels == k % 10)[0])
        second = int(np.flatnonzero(labels == (k + 3) % 10)[0])
        pairs.append((first, second))
    return pairs


def label_rows(ax, labels, colours=None):
    """Write a label left of each row of an image_grid (rows of 29 pixels)."""
    for row, label in enumerate(labels):
        colour = "black" if colours is None else colours[row]
        ax.text(-4, 29 * row + 15, label, ha="right", va="center", fontsize=7, color=colour)


def interpolations(model, x_test, mu_test, labels, seed, steps=10):
    """For 8 pairs of test images of different classes: both images, and the images decoded at
    `steps` points between their posterior means, the straight path above the spherical one; then
    the same between two prior draws (their decodings at the ends)."""
    pairs = interpolation_pairs(labels)
    rng = np.random.default_rng([seed, 8])
    prior_pair = model.sample_z(2, rng)
    ends = []
    for first, second in pairs:
        x = mnist.to_float(x_test[[first, second]], model.dtype)
        label = f"test {first} -> {second}"
        ends.append({"z": mu_test[[first, second]], "images": x, "label": label})
    prior_images = model.likelihood.mean(model.decode(prior_pair.astype(model.dtype)))
    ends.append({"z": prior_pair, "images": prior_images, "label": "prior draws"})
    rows = []
    row_labels = []
    for end in ends:
        for kind in ("linear", "spherical"):
            path = interpolate(end["z"][0], end["z"][1], steps + 2, kind)[1:-1]
            decoded = model.likelihood.mean(model.decode(path.astype(model.dtype)))
            rows.append(np.concatenate([end["images"][:1], decoded, end["images"][1:]]))
            row_labels.append(f"{end['label']}, {kind}")
    fig = new_figure(figsize=(7, 0.5 * len(rows) + 0.6))
    ax = fig.subplots()
    image_grid(ax, np.concatenate(rows), rows=len(rows))
    label_rows(ax, row_labels)
    ax.set_title("interpolations: the two ends, and 10 decoded points between their codes\n"
                 "(straight, then spherical)", fontsize=9)
    return fig


def traversals(model, mu_test, activity, image_index, steps=11):
    """Each latent unit, ordered by its activity Var_x E[z|x], varied from -3 to 3 with the other
    units at test image image_index's posterior mean. An inactive unit (activity <= 0.01) changes
    nothing: its row is labelled in grey."""
    activity = np.asarray(activity)
    order = np.argsort(-activity)
    values = np.linspace(-3, 3, steps)
    rows = []
    row_labels = []
    colours = []
    for unit in order:
        walk = traverse(mu_test[image_index], unit, values).astype(model.dtype)
        rows.append(model.likelihood.mean(model.decode(walk)))
        active = activity[unit] > 0.01
        state = "" if active else " (inactive)"
        row_labels.append(f"z{unit}: {activity[unit]:.2f}{state}")
        colours.append("black" if active else "0.6")
    fig = new_figure(figsize=(6, 0.45 * len(rows) + 0.7))
    ax = fig.subplots()
    image_grid(ax, np.concatenate(rows), rows=len(rows))
    label_rows(ax, row_labels, colours)
    ax.set_title(f"traversals from test image {image_index}'s code: one unit from -3 to 3, the "
                 f"others fixed;\nunits by activity Var_x E[z|x]", fontsize=9)
    return fig


def draw_paths(ax, mu_test, labels):
    """On the latent plane: the straight and spherical paths between the interpolated pairs."""
    for first, second in interpolation_pairs(labels):
        ends = mu_test[[first, second]]
        for kind, style in (("linear", "-"), ("spherical", ":")):
            path = interpolate(ends[0], ends[1], 30, kind)
            ax.plot(path[:, 0], path[:, 1], style, color="k", lw=0.8)
    ax.plot([], [], "-", color="k", lw=0.8, label="interpolations: straight")
    ax.plot([], [], ":", color="k", lw=0.8, label="interpolations: spherical")


# ---- a comparison of runs (--betas, --likelihoods) -----------------------------------------------

def comparison_figures(models, codes, x_test, y_test, image_index, seed, prefix):
    """{name: model}: for each run a row of prior samples and of posterior samples of the same test
    image; for Z = 2 (codes: {name: the test posterior means}), each run's test codes against the
    prior."""
    first = next(iter(models.values()))
    x = mnist.to_float(x_test[image_index:image_index + 1], first.dtype)
    fig = new_figure(figsize=(14, 2.3 * len(models) + 0.4))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, (name, model) in zip(axes, models.items()):
        rng = np.random.default_rng([seed, 5])
        image_grid(row[0], model.sample_prior(20, rng), rows=2)
        posterior = model.sample_posterior(x, 19, rng)[0]
        image_grid(row[1], np.concatenate([x, posterior]), rows=2)
        row[0].set_title(f"{name}: prior samples", fontsize=9, loc="left")
        row[1].set_title(f"{name}: posterior samples of test image {image_index} "
                         "(first: the image)", fontsize=9, loc="left")
    figs = {f"{prefix}_samples.png": fig}
    if codes:
        plane = new_figure(figsize=(3.3 * len(models), 3.6))
        axes = plane.subplots(1, len(models), squeeze=False)[0]
        for ax, (name, model) in zip(axes, models.items()):
            draw_codes_against_prior(ax, model, codes[name], y_test, name)
        figs[f"{prefix}_latent.png"] = plane
    return figs
