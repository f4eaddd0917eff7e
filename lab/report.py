"""After training: measure a run and draw it (measure_and_draw), and compare the runs of an
experiment (compare: --betas, --likelihoods). The measurements are analysis.py's, the figures
figures.py's, the files runs.py's; this file puts them in order and says what it does.
"""
import os

import numpy as np

import mnist
from autograd import ReLU

from lab import analysis
from lab import classifier
from lab import codes
from lab import console
from lab import explorer
from lab import figures
from lab import quality
from lab import runs


def measure_and_draw(model, metrics, cfg, x_train, x_test, y_test, out, args):
    """The after-training measurements and their figures, merged into metrics.json."""
    # the aggregated posterior of the images the model was trained on: binary ones, or dequantized
    if cfg["binarize"]:
        x_train = mnist.binarize(x_train, np.random.default_rng(mnist.TEST_BINARIZATION_SEED + 1))
    dequantized = cfg.get("dequantize", False)
    if dequantized:
        x_train = mnist.dequantize(x_train,
                                   np.random.default_rng(mnist.TEST_DEQUANTIZATION_SEED + 1))
    measured, found = analysis.analyze(model, x_train, x_test, cfg["seed"], args.iw_samples,
                                       args.gmm_components, args.gmm_covariance,
                                       log=lambda line: print(line, flush=True),
                                       progress=console.progress_line, dequantized=dequantized)
    measured["samples"], drawn = measure_samples(model, found, cfg, args)
    print("drawing the latent space", flush=True)
    class_names = mnist.CLASS_NAMES[cfg["dataset"]]
    figs = figures.analysis_figures(model, x_test, y_test, found, args.posterior_image, cfg["seed"],
                                    class_names)
    figs.update(figures.sample_figures(drawn, measured["samples"]))
    figures.save(out, figs)
    # explorer.html: the plane, decoded live in a browser by the recipe's one ReLU layer
    one_relu_layer = model.layers == 1 and model.activation is ReLU
    if model.latent == 2 and not one_relu_layer:
        print("no explorer.html: the page decodes with one ReLU layer, as the recipe's decoder")
    if model.latent == 2 and one_relu_layer:
        threshold = measured["aggregate_posterior"]["hole_log_density_threshold"]
        explorer.write_explorer(out, model, found, threshold, x_test, y_test, class_names)
    metrics = {**metrics, **measured}
    runs.write_metrics(os.path.join(out, "metrics.json"), metrics)
    written = "metrics.json and figures" if args.analyze else "model.npz, metrics.json and figures"
    print(f"wrote {written} to {out}")
    return {"model": model, "metrics": metrics, "x_test": x_test, "y_test": y_test}


def measure_samples(model, found, cfg, args):
    """The samples of every sampler measured on the images (quality.py), with the dataset's
    classifier: trained on its first use and kept in the data folder."""
    def say(line):
        print(line, flush=True)

    def quiet(line):
        """mnist.load's lines were printed when the run loaded its data."""

    x_train, y_train, x_test, y_test = mnist.load(cfg["dataset"], args.data_dir, args.mirror,
                                                  log=quiet)
    data_dir = args.data_dir or os.path.join("data", cfg["dataset"])
    say(f"the samples of every sampler against the {len(x_test)} test images: the Frechet distance "
        f"on a classifier's features, the classes they cover")
    ruler, record, held_out = classifier.for_dataset(x_train, y_train, x_test, y_test, data_dir,
                                                     say)
    return quality.sample_quality(model, found, ruler, record, x_test, held_out, x_train,
                                  cfg["seed"], say)


# ---- a comparison of runs ------------------------------------------------------------------------

COMPARISON_COLUMNS = [  # title, key in a row, format (or "sigma_cell": that function's text)
    ("run", "run", "{}"),
    ("recon", "recon", "{:.2f}"),
    ("KL", "kl", "{:.2f}"),
    ("test -ELBO", "negative_elbo", "{:.2f}"),
    ("iw_nll", "iw_nll", "{:.2f}"),
    ("bits/dim", "bits_per_dim", "{:.3f}"),
    ("active", "active_units", "{:d}"),
    ("Var q(z) per dim", "variance_range", "{0[0]:.2f}-{0[1]:.2f}"),
    ("KL(q(z)||p(z))", "kl_aggregate_prior", "{:.2f}"),
    ("I(x;z)", "mutual_information", "{:.2f}"),
    ("holes", "prior_hole_fraction", "{:.1%}"),
    ("paths in holes: linear / spherical", "path_holes", "{0[0]:.1%} / {0[1]:.1%}"),
    ("sigma", "decoder_sigma", "sigma_cell"),
    ("pull on mu: recon / KL", "pulls_on_mu", "{0[0]:.3g} / {0[1]:.3g}"),
    ("Frechet: prior / fitted q(z)", "frechet", "{0[0]:.1f} / {0[1]:.1f}"),
    ("classes TV: prior", "class_tv_prior", "{:.3f}"),
    ("unsure: prior", "unsure_prior", "{:.1%}"),
]


def comparison_row(name, metrics):
    """One row of a comparison of runs, from a run's metrics.json: every number at beta = 1, in nats
    of the run's own likelihood; the pulls on mu are the last epoch's RMS of the two gradient paths.
    """
    a = metrics["aggregate_posterior"]
    paths = metrics["gradient_paths"]
    pulls = None
    if paths["recon_mu"]:
        pulls = [paths["recon_mu"][-1], paths["kl_mu"][-1]]
    path_holes = None
    if "interpolation" in metrics:       # between test codes
        walks = metrics["interpolation"]["codes"]
        path_holes = [walks["linear"]["hole_fraction"], walks["spherical"]["hole_fraction"]]
    samplers = metrics.get("samples", {}).get("samplers")    # none in a run from before them
    prior = fitted = {}
    if samplers:
        prior, fitted = samplers["prior, mean"], samplers["fitted q(z), mean"]
    frechet = [prior["frechet"], fitted["frechet"]] if samplers else None
    config = metrics["config"]
    return {"run": name,
            "beta": config["beta"],
            "likelihood": config.get("likelihood"),
            "bits_per_dim": metrics.get("bits_per_dim"),
            "decoder_sigma": metrics.get("decoder_sigma"),
            "pulls_on_mu": pulls,
            "recon": metrics["test_recon"],
            "kl": metrics["test_kl"],
            "negative_elbo": metrics["test_loss"],
            "iw_nll": metrics["iw_nll"],
            "active_units": a["active_units"],
            "variance_range": [min(a["variance"]), max(a["variance"])],
            "kl_aggregate_prior": a["kl_aggregate_prior"],
            "mutual_information": a["mutual_information"],
            "prior_hole_fraction": a["prior_hole_fraction"],
            "path_holes": path_holes,
            "frechet": frechet,
            "class_tv_prior": prior.get("class_tv"),
            "unsure_prior": prior.get("unsure")}


def sigma_cell(sigma):
    """A Gaussian decoder's sigma (analysis.decoder_sigma) in a table cell: the one sigma, or a
    sigma per pixel's range and median. (A run from before the per-pixel sigma recorded a number.)
    """
    if isinstance(sigma, float):
        return f"{sigma:.4g}"
    if "sigma" in sigma:
        return f"{sigma['sigma']:.4g}"
    return f"{sigma['smallest']:.2g} to {sigma['largest']:.2g} (median {sigma['median']:.2g})"


def comparison_table(rows):
    """The rows as a Markdown table ('-' where a run has no such number)."""
    titles = [title for title, _, _ in COMPARISON_COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    for row in rows:
        cells = []
        for _, key, form in COMPARISON_COLUMNS:
            if row.get(key) is None:
                cells.append("-")
            elif form == "sigma_cell":
                cells.append(sigma_cell(row[key]))
            else:
                cells.append(form.format(row[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(results, out, image_index, prefix):
    """After --betas or --likelihoods: {name: a finished run's result} as a table (printed, and
    comparison.json in out) and the figures that compare the runs."""
    rows = [comparison_row(name, result["metrics"]) for name, result in results.items()]
    runs.write_metrics(os.path.join(out, "comparison.json"), rows)
    print(comparison_table(rows))
    last = list(results.values())[-1]
    models = {name: result["model"] for name, result in results.items()}
    latent_codes = {}
    if all(model.latent == 2 for model in models.values()):
        for name, model in models.items():
            mu, _ = codes.encode_all(model, last["x_test"])
            latent_codes[name] = mu
    seed = last["metrics"]["config"]["seed"]
    figs = figures.comparison_figures(models, latent_codes, last["x_test"], last["y_test"],
                                      image_index, seed, prefix)
    # the Gaussian decoders' sigma, epoch by epoch: how fast a learned sigma follows the optimal one
    sigma_curves = {}
    for name, result in results.items():
        curve = result["metrics"].get("decoder_sigma_curve")
        if curve:
            sigma_curves[name] = curve
    if sigma_curves:
        panel = "a Gaussian decoder's sigma at the end of each epoch"
        figs[f"{prefix}_sigma.png"] = figures.sigma_curves({panel: sigma_curves})
    figures.save(out, figs)
    print(f"wrote comparison.json and the figures that compare the runs to {out}")
