"""Regenerate every number and figure the README shows, from one command and one version of the
code.

    python benchmarks/reproduce.py --data-dir data/mnist   # MNIST (python train.py downloads it)
    python benchmarks/reproduce.py --data-dir DIR --dataset fashion   # Fashion-MNIST
    python benchmarks/reproduce.py --data-dir DIR --only recipe       # one part
    python benchmarks/reproduce.py --data-dir DIR --torch-python /work/torchenv/bin/python

Each part trains and measures (the first with the minimal train.py, the others with the lab,
python -m lab) into runs/reproduce/<code>/<part>/ (ignored by git), copies the figures the pages
embed into docs/figures/<part>/, and records its numbers, its Markdown tables, the code commit, the
code's fingerprint and its wall time in docs/results.json. The fingerprint hashes what the code
computes (its syntax trees without comments and docstrings): a part whose record has the current
fingerprint, and whose figures exist, is skipped, so that the command run again after an
interruption goes on where it stopped, and a change of comments alone reruns nothing. Then the
tables of the README and of docs/latent-space.md, docs/likelihoods.md and docs/iwae.md, between
<!-- table:NAME --> and <!-- /table --> markers, and the README's line that names the commit they
are of, are written from the records, and docs/results.md with every part's tables and figures.
The parts that need PyTorch (torch, speed, iwae) run with --torch-python, an interpreter that
imports torch (never a dependency of the project), and the part that needs a browser (explorer) with
playwright and Chromium; each is skipped, with a line, without them. About 90 minutes on 2 cores
for all parts, 45 of them the paper's table (docs/results.json has each part's time).
"""
import argparse
import ast
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)     # the project's modules (runs, figures), imported where parts use them
SEEDS = (0, 1, 2)


class PartError(Exception):
    """A part's command failed; the message has its last lines."""


# ---- running commands ----------------------------------------------------------------------------

def run_command(command, log):
    """Run a command (a list) from the repository's root; its stdout. Raises PartError."""
    log("  $ " + " ".join(command))
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    except OSError as err:              # an interpreter that is not there (--torch-python)
        raise PartError(f"{command[0]}: {err.strerror}")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-5:])
        raise PartError(f"{' '.join(command)} exited with {done.returncode}:\n{tail}")
    return done.stdout


TRAIN_FLAGS = []       # --train-flags: added to every python -m lab command (the tests' small runs)
DATASET = ["mnist"]    # --dataset: the dataset every command trains on
DATASET_NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}
# The options train.py takes, each with a value: the part 'minimal' passes only these of the flags.
TRAIN_PY_OPTIONS = ("--epochs", "--batch-size", "--lr", "--hidden", "--latent", "--beta",
                    "--kl-warmup", "--seed")


def train_py_flags(flags):
    """Of the --train-flags, the options (with their values) that train.py takes."""
    kept = []
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in TRAIN_PY_OPTIONS:
            kept += [flag, value]
    return kept


def train(data_dir, out, log, *flags):
    """python -m lab on the dataset (--dataset) into out: a finished run there is reused, an
    interrupted one resumed."""
    metrics_path = os.path.join(out, "metrics.json")
    checkpoint = os.path.join(out, "checkpoint.npz")
    if complete(metrics_path):
        return read_json(metrics_path)
    if os.path.exists(checkpoint):
        command = [sys.executable, "-m", "lab", "--data-dir", data_dir, "--resume", checkpoint]
    else:
        command = [sys.executable, "-m", "lab", "--dataset", DATASET[0], "--data-dir", data_dir,
                   "--out", out, *flags, *TRAIN_FLAGS]
    run_command(command, log)
    return read_json(metrics_path)


def complete(metrics_path):
    if not os.path.exists(metrics_path):
        return False
    metrics = read_json(metrics_path)
    return "aggregate_posterior" in metrics


def read_json(path):
    with open(path) as f:
        return json.load(f)


def median_and_range(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary_text(values, digits=2):
    stats = median_and_range(values)
    return (f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}, "
            f"{stats['max']:.{digits}f}]")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


# ---- the parts -----------------------------------------------------------------------------------

def run_row(metrics):
    """The numbers of one run that the tables show."""
    a = metrics["aggregate_posterior"]
    return {"test_loss": metrics["test_loss"], "recon": metrics["test_recon"],
            "kl": metrics["test_kl"], "iw_nll": metrics["iw_nll"],
            "active_units": a["active_units"], "latent": len(a["activity"]),
            "holes": a["prior_hole_fraction"], "mutual_information": a["mutual_information"],
            "kl_aggregate_prior": a["kl_aggregate_prior"]}


MINIMAL_EPOCH = re.compile(r"epoch +(\d+) +train loss +([\d.]+) +test loss +([\d.]+)")


def part_minimal(args, work, log):
    """The minimal run, python train.py: its epoch lines and its three pictures."""
    out = os.path.join(work, "run")
    printed = os.path.join(work, "train.log")
    if not os.path.exists(printed):
        # train.py writes into a new folder: a run cut short is started again
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "train.py", "--dataset", DATASET[0], "--data-dir",
                   args.data_dir, "--out", out, *train_py_flags(TRAIN_FLAGS)]
        stdout = run_command(command, log)
        os.makedirs(work, exist_ok=True)
        with open(printed, "w") as f:
            f.write(stdout)
    with open(printed) as f:
        epochs = MINIMAL_EPOCH.findall(f.read())
    numbers = {int(e): {"train_loss": float(tr), "test_loss": float(te)} for e, tr, te in epochs}
    table = markdown_table(["epoch"] + [e for e, _, _ in epochs],
                           [["train loss"] + [tr for _, tr, _ in epochs],
                            ["test loss"] + [te for _, _, te in epochs]])
    figures = {name: os.path.join(out, name) for name in
               ("reconstructions.png", "samples_prior.png", "samples_posterior.png")}
    return {"numbers": numbers, "tables": {"minimal": table}, "figures": figures}


def part_recipe(args, work, log):
    """The recipe, seeds 0, 1, 2: the results table, and seed 0's figures."""
    rows = {}
    for seed in SEEDS:
        metrics = train(args.data_dir, os.path.join(work, f"seed-{seed}"), log, "--seed", str(seed))
        rows[seed] = run_row(metrics)
    table = markdown_table(
        ["seed", "test negative ELBO", "recon", "KL", "`iw_nll` (S = 100)", "active units",
         "I(x; z)", "KL(q(z) \\|\\| p(z))", "prior draws in holes"],
        [[seed, f"{r['test_loss']:.2f}", f"{r['recon']:.2f}", f"{r['kl']:.2f}",
          f"{r['iw_nll']:.2f}",
          f"{r['active_units']} of {r['latent']}", f"{r['mutual_information']:.2f}",
          f"{r['kl_aggregate_prior']:.2f}", f"{r['holes']:.1%}"] for seed, r in rows.items()])
    figures = {name: os.path.join(work, "seed-0", name) for name in
               ("reconstructions.png", "samples_prior.png", "loss_curves.png", "gradient_paths.png",
                "samples_three_ways.png", "prior_vs_aggregate.png")}
    return {"numbers": {str(seed): row for seed, row in rows.items()}, "tables": {"recipe": table},
            "figures": figures}


def part_torch(args, work, log):
    """The same recipe in plain PyTorch (benchmarks/torch_vae.py), seeds 0, 1, 2."""
    numbers = {}
    for seed in SEEDS:
        command = [args.torch_python, "benchmarks/torch_vae.py", args.data_dir, "--seed", str(seed),
                   "--iw-samples", "100"]
        out = run_command(command, log)
        result = json.loads(out.strip().splitlines()[-1])
        numbers[str(seed)] = {"test_loss": result["test_loss"], "iw_nll": result["iw_nll"]}
    test_losses = [n["test_loss"] for n in numbers.values()]
    iw = [n["iw_nll"] for n in numbers.values()]
    table = markdown_table(["implementation", "test negative ELBO", "`iw_nll` (S = 100)"],
                           [["PyTorch (benchmarks/torch_vae.py)", summary_text(test_losses),
                             summary_text(iw)]])
    return {"numbers": numbers, "tables": {"torch": table}, "figures": {}}


def part_latent2(args, work, log):
    """Z = 2: the latent plane and the decoded grid."""
    metrics = train(args.data_dir, os.path.join(work, "z2"), log, "--latent", "2")
    figures = {name: os.path.join(work, "z2", name) for name in
               ("latent_space.png", "latent_manifold.png")}
    return {"numbers": run_row(metrics), "tables": {}, "figures": figures}


def part_explorer(args, work, log):
    """A screenshot of explorer.html, the Z = 2 run's page, taken in headless Chromium."""
    import explorer_browser             # benchmarks/: it needs playwright and a Chromium
    z2 = os.path.join(os.path.dirname(work), "latent2", "z2")
    train(args.data_dir, z2, log, "--latent", "2")
    os.makedirs(work, exist_ok=True)
    png = os.path.join(work, "explorer.png")
    try:
        explorer_browser.save_screenshot(os.path.join(z2, "explorer.html"), png)
    except RuntimeError as err:
        raise PartError(str(err))
    size = os.path.getsize(os.path.join(z2, "explorer.html"))
    return {"numbers": {"page_bytes": size}, "tables": {}, "figures": {"explorer.png": png}}


def part_holes(args, work, log):
    """The hole fraction under four density models for q(z), seed 0's recipe model."""
    model_dir = os.path.join(os.path.dirname(work), "recipe", "seed-0")
    train(args.data_dir, model_dir, log, "--seed", "0")
    models = [("full", 1), ("full", 10), ("full", 50), ("diag", 10)]
    rows = []
    numbers = {}
    for covariance, components in models:
        out = os.path.join(work, f"{covariance}-{components}")
        command = [sys.executable, "-m", "lab", "--dataset", DATASET[0], "--data-dir",
                   args.data_dir, "--analyze", os.path.join(model_dir, "model.npz"), "--out", out,
                   "--gmm-covariance", covariance, "--gmm-components", str(components),
                   *TRAIN_FLAGS]
        if not complete(os.path.join(out, "metrics.json")):
            run_command(command, log)
        a = read_json(os.path.join(out, "metrics.json"))["aggregate_posterior"]
        held_out = a["gmm"]["held_out_log_likelihood"]
        numbers[f"{covariance}-{components}"] = {"held_out": held_out,
                                                  "holes": a["prior_hole_fraction"],
                                                  "kl_aggregate_prior": a["kl_aggregate_prior"]}
        rows.append([f"{covariance}, M = {components}", f"{held_out:.2f}",
                     f"{a['prior_hole_fraction']:.1%}", f"{a['kl_aggregate_prior']:.2f}"])
    table = markdown_table(["density model for q(z)", "held-out log-likelihood per test code",
                            "prior draws in holes", "KL(q(z) \\|\\| p(z))"], rows)
    return {"numbers": numbers, "tables": {"holes": table}, "figures": {}}


def part_priors(args, work, log):
    """Learned priors against N(0, I), seeds 0, 1, 2: medians and ranges."""
    recipe_rows = []
    for seed in SEEDS:
        out = os.path.join(os.path.dirname(work), "recipe", f"seed-{seed}")
        recipe_rows.append(run_row(train(args.data_dir, out, log, "--seed", str(seed))))
    rows = {"N(0, I)": recipe_rows}
    for prior in ("mog", "vamp"):
        rows[prior] = []
        for seed in SEEDS:
            out = os.path.join(work, f"{prior}-seed-{seed}")
            metrics = train(args.data_dir, out, log, "--prior", prior, "--seed", str(seed))
            rows[prior].append(run_row(metrics))
    table = markdown_table(
        ["prior", "test negative ELBO", "`iw_nll`", "KL(q(z) \\|\\| p(z))", "I(x; z)"],
        [[name, summary_text([r["test_loss"] for r in runs]),
          summary_text([r["iw_nll"] for r in runs]),
          summary_text([r["kl_aggregate_prior"] for r in runs]),
          summary_text([r["mutual_information"] for r in runs])] for name, runs in rows.items()])
    vamp = os.path.join(work, "vamp-seed-0")
    figures = {"samples_three_ways.png": os.path.join(vamp, "samples_three_ways.png"),
               "prior_vs_aggregate.png": os.path.join(vamp, "prior_vs_aggregate.png")}
    return {"numbers": rows, "tables": {"priors": table}, "figures": figures}


def experiment(args, out, log, *flags):
    """An experiment (--betas or --likelihoods) into out; its comparison rows."""
    command = [sys.executable, "-m", "lab", "--dataset", DATASET[0], "--data-dir", args.data_dir,
               "--out", out, *flags, *TRAIN_FLAGS]
    if not os.path.exists(os.path.join(out, "comparison.json")):
        run_command(command, log)
    return read_json(os.path.join(out, "comparison.json"))


def part_kl_weight(args, work, log):
    """The KL-weight experiment, Z = 20 (the table, prior and posterior samples) and Z = 2 (codes).
    """
    betas = ["0", "0.1", "0.3", "1", "3"]
    rows = experiment(args, os.path.join(work, "z20"), log, "--betas", *betas)
    experiment(args, os.path.join(work, "z2"), log, "--betas", *betas, "--latent", "2")
    header = ["beta", "recon", "KL", "test -ELBO", "active units", "KL(q(z) \\|\\| p(z))", "holes",
              "Frechet: prior / fitted q(z)", "classes TV: prior"]
    table = markdown_table(header, [
        [r["beta"], f"{r['recon']:.2f}", f"{r['kl']:.2f}", f"{r['negative_elbo']:.2f}",
         r["active_units"], f"{r['kl_aggregate_prior']:.2f}", f"{r['prior_hole_fraction']:.1%}",
         f"{r['frechet'][0]:.1f} / {r['frechet'][1]:.1f}", f"{r['class_tv_prior']:.3f}"]
        for r in rows])
    figures = {"kl_weight_samples.png": os.path.join(work, "z20", "kl_weight_samples.png"),
               "kl_weight_latent.png": os.path.join(work, "z2", "kl_weight_latent.png")}
    return {"numbers": rows, "tables": {"kl_weight": table}, "figures": figures}


def part_warmup(args, work, log):
    """KL warm-up over 5 epochs against none (seed 0)."""
    metrics = train(args.data_dir, os.path.join(work, "warmup5"), log, "--kl-warmup", "5")
    recipe_out = os.path.join(os.path.dirname(work), "recipe", "seed-0")
    recipe = run_row(train(args.data_dir, recipe_out, log, "--seed", "0"))
    row = run_row(metrics)
    table = markdown_table(["KL warm-up", "test negative ELBO", "active units"],
                           [["none", f"{recipe['test_loss']:.2f}", recipe["active_units"]],
                            ["5 epochs", f"{row['test_loss']:.2f}", row["active_units"]]])
    return {"numbers": {"none": recipe, "warmup5": row}, "tables": {"warmup": table}, "figures": {}}


def part_binarize(args, work, log):
    """Binary pixels drawn afresh each time (dynamic binarization): a true likelihood."""
    metrics = train(args.data_dir, os.path.join(work, "binary"), log, "--binarize",
                    "--iw-samples", "1000")
    row = run_row(metrics)
    header = [f"binarized {DATASET_NAMES[DATASET[0]]}", "test negative ELBO", "`iw_nll` (S = 1000)"]
    table = markdown_table(header, [["seed 0", f"{row['test_loss']:.2f}", f"{row['iw_nll']:.2f}"]])
    return {"numbers": row, "tables": {"binarize": table}, "figures": {}}


def sigma_text(sigma):
    """A Gaussian decoder's sigma (metrics' decoder_sigma) in a table cell; '-' for none."""
    if sigma is None:
        return "-"
    if "sigma" in sigma:
        return f"{sigma['sigma']:.3g}"
    return (f"per pixel, median {sigma['median']:.2g} ({sigma['smallest']:.1g} to "
            f"{sigma['largest']:.2g})")


def part_likelihoods(args, work, log):
    """The likelihood experiment: BCE, MSE, a learned and the optimal sigma, a sigma per pixel on
    dequantized pixels, the continuous Bernoulli."""
    out = os.path.join(work, "all")
    rows = experiment(args, out, log, "--likelihoods")
    table = markdown_table(
        ["likelihood", "active units", "I(x; z)", "KL(q(z) \\|\\| p(z))", "prior draws in holes",
         "bits/dim", "sigma"],
        [[r["run"], r["active_units"], f"{r['mutual_information']:.2f}",
          f"{r['kl_aggregate_prior']:.2f}", f"{r['prior_hole_fraction']:.1%}",
          "-" if r["bits_per_dim"] is None else f"{r['bits_per_dim']:.2f}",
          sigma_text(r["decoder_sigma"])] for r in rows])
    figures = {"likelihood_samples.png": os.path.join(out, "likelihood_samples.png")}
    return {"numbers": rows, "tables": {"likelihoods": table}, "figures": figures}


def train_until_it_fails(data_dir, out, log, *flags):
    """A run expected to stop at a non-finite loss: (its error line, the training state of its last
    good checkpoint, or None). A run that finishes instead raises PartError."""
    command = [sys.executable, "-m", "lab", "--dataset", DATASET[0], "--data-dir", data_dir,
               "--out", out, "--overwrite", *flags, *TRAIN_FLAGS]
    log("  $ " + " ".join(command) + "   (expected to fail)")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    stopped = "the loss became" in error or "the test loss became" in error
    if done.returncode != 1 or not stopped:
        raise PartError(f"{' '.join(command)} was to stop at a non-finite loss; it exited with "
                        f"{done.returncode}: {error}")
    checkpoint = os.path.join(out, "checkpoint.npz")
    if not os.path.exists(checkpoint):
        return error, None
    from lab import runs
    _, _, state, _ = runs.load_checkpoint(checkpoint)
    return error, state


def where_it_failed(error):
    """Where a run stopped, from the lab's non-finite-loss error line: in training (epoch E, step
    S), or in the test loss at an epoch's end."""
    found = re.search(r"epoch (\d+), step (\d+)", error)
    if found:
        return f"NaN at epoch {found.group(1)}, step {found.group(2)}"
    found = re.search(r"the test loss became \S+ after epoch (\d+)", error)
    return f"NaN in the test loss after epoch {found.group(1)}"


def runaway_curve(record, stopped):
    """The curves figures.runaway draws, from a run's metrics or a checkpoint's state."""
    return {"train_loss": record["train_loss"],
            "test_loss": record.get("test_loss_curve", []),
            "smallest_sigma": [s["smallest"] for s in record["decoder_sigma_curve"]],
            "stopped": stopped}


def runaway_runs(args, work, log):
    """A sigma per pixel on raw pixels (60,000 and 2,000 images: both end in a NaN) and on
    dequantized ones (2,000 images): their error lines, and the curves figures.runaway draws."""
    per_pixel = ["--likelihood", "gaussian", "--decoder-sigma", "per-pixel"]
    full_error, _ = train_until_it_fails(args.data_dir, os.path.join(work, "raw-full"), log,
                                         *per_pixel)
    small = ["--train-images", "2000", "--epochs", "30"]
    raw_error, raw_state = train_until_it_fails(args.data_dir, os.path.join(work, "raw-2000"), log,
                                                *per_pixel, *small)
    dequantized = train(args.data_dir, os.path.join(work, "dequantized-2000"), log, *per_pixel,
                        *small, "--dequantize")
    curves = {"raw pixels": runaway_curve(raw_state, where_it_failed(raw_error)),
              "dequantized": runaway_curve(dequantized, None)}
    return {"full_error": full_error, "raw_error": raw_error, "raw_state": raw_state,
            "dequantized": dequantized, "curves": curves}


def lag_runs(args, work, log):
    """The learned and the optimal sigma on 60,000 images (the likelihood part's runs) and on 5,000:
    ({size: {name: decoder_sigma_curve}}, {name: metrics of the 60,000-image runs})."""
    full_runs = os.path.join(os.path.dirname(work), "likelihoods", "all")
    experiment(args, full_runs, log, "--likelihoods")
    full = {}
    for name in ("learned", "optimal", "per-pixel-dequantized"):
        full[name] = read_json(os.path.join(full_runs, f"gaussian-sigma-{name}", "metrics.json"))
    subset = os.path.join(work, "lag-5000")
    experiment(args, subset, log, "--likelihoods", "gaussian:learned", "gaussian:optimal",
               "--train-images", "5000")
    lag = {"60,000 training images": {}, "5,000 training images": {}}
    for name in ("learned", "optimal"):
        lag["60,000 training images"][name] = full[name]["decoder_sigma_curve"]
        small_run = read_json(os.path.join(subset, f"gaussian-sigma-{name}", "metrics.json"))
        lag["5,000 training images"][name] = small_run["decoder_sigma_curve"]
    return lag, full


def shapes_and_background_sigma(folder, data_dir, n_images=1000):
    """The median sigma of a per-pixel decoder over the pixels of the first n_images dequantized
    test images (its run's test set), decoded at their posterior means: inside the shapes (x >
    0.2: the strokes of a digit, a garment) and in the background (pixel 0)."""
    import numpy as np
    import mnist
    from lab import runs
    model, _ = runs.load_model(os.path.join(folder, "model.npz"))
    _, _, pixels, _ = mnist.load(DATASET[0], data_dir)
    pixels = pixels[:n_images]
    x = mnist.dequantize(pixels, np.random.default_rng(mnist.TEST_DEQUANTIZATION_SEED))
    mu, _ = model.encode(x)
    sigma = model.likelihood.sigma(model.decode(mu))
    return {"shapes": float(np.median(sigma[x > 0.2])),
            "background": float(np.median(sigma[pixels == 0]))}


def failure_table(runaway, per_pixel_full, spread):
    """How far each per-pixel run got, its last training loss, smallest sigma, bits/dim, and (for
    the full run) its median sigma inside the shapes and in the background."""
    raw_sigma = runaway["curves"]["raw pixels"]["smallest_sigma"][-1]
    dequantized = runaway["dequantized"]
    rows = [
        ["raw pixels, 60,000 images", where_it_failed(runaway["full_error"]), "-", "-", "-", "-"],
        ["raw pixels, 2,000 images", where_it_failed(runaway["raw_error"]),
         f"{runaway['raw_state']['train_loss'][-1]:.0f}", f"{raw_sigma:.1g}", "-", "-"],
        ["dequantized, 2,000 images", "30 epochs", f"{dequantized['train_loss'][-1]:.0f}",
         f"{dequantized['decoder_sigma']['smallest']:.1g}", f"{dequantized['bits_per_dim']:.2f}",
         "-"],
        ["dequantized, 60,000 images", "10 epochs", f"{per_pixel_full['train_loss'][-1]:.0f}",
         f"{per_pixel_full['decoder_sigma']['smallest']:.1g}",
         f"{per_pixel_full['bits_per_dim']:.2f}",
         f"{spread['shapes']:.2g} / {spread['background']:.2g}"],
    ]
    header = ["a sigma per pixel, trained on", "ran", "last train loss", "smallest sigma",
              "bits/dim", "median sigma: x > 0.2 / background"]
    return markdown_table(header, rows), rows


def lag_table(lag):
    """Sigma at the end of epochs 1, 2, 5 and 10, learned and optimal, for each training set."""
    rows = []
    for size, curves in lag.items():
        for name, curve in curves.items():
            sigmas = [s["sigma"] for s in curve]
            picked = [f"{sigmas[epoch - 1]:.3f}" for epoch in (1, 2, 5, 10)]
            rows.append([f"{name}, {size}", *picked])
    return markdown_table(["sigma", "epoch 1", "epoch 2", "epoch 5", "epoch 10"], rows)


def part_gaussian(args, work, log):
    """The Gaussian decoder: a sigma per pixel on raw pixels runs away (the full training set and
    2,000 images), and on dequantized pixels does not; the learned sigma's lag behind the optimal
    one on 60,000 and on 5,000 images."""
    from lab import figures
    runaway = runaway_runs(args, work, log)
    lag, full = lag_runs(args, work, log)
    drawn = os.path.join(work, "figures")
    os.makedirs(drawn, exist_ok=True)
    figures.save(drawn, {"runaway.png": figures.runaway(runaway["curves"]),
                         "sigma_lag.png": figures.sigma_curves(lag)})
    per_pixel_run = os.path.join(os.path.dirname(work), "likelihoods", "all",
                                 "gaussian-sigma-per-pixel-dequantized")
    spread = shapes_and_background_sigma(per_pixel_run, args.data_dir)
    failure, failure_rows = failure_table(runaway, full["per-pixel-dequantized"], spread)
    numbers = {"failure": failure_rows, "lag": lag, "raw_full_error": runaway["full_error"],
               "raw_2000_error": runaway["raw_error"], "median_sigma": spread}
    figures_made = {"runaway.png": os.path.join(drawn, "runaway.png"),
                    "sigma_lag.png": os.path.join(drawn, "sigma_lag.png"),
                    "decoder_sigma.png": os.path.join(per_pixel_run, "decoder_sigma.png")}
    tables = {"gaussian_failure": failure, "sigma_lag": lag_table(lag)}
    return {"numbers": numbers, "tables": tables, "figures": figures_made}


def walk_row(name, metrics):
    walks = metrics["interpolation"]
    cells = [name]
    for between in ("codes", "prior"):
        for kind in ("linear", "spherical"):
            cells.append(f"{walks[between][kind]['hole_fraction']:.1%}")
    prior = walks["prior"]
    linear = prior["linear"]["midpoint_norm"]
    spherical = prior["spherical"]["midpoint_norm"]
    cells.append(f"{linear:.2f} / {spherical:.2f} (sqrt(Z) = {walks['sqrt_latent']:.2f})")
    return cells


def part_walks(args, work, log):
    """Interpolations and traversals: the share of path points in holes, straight against spherical,
    for the recipe, the VampPrior and the KL weights 0 and 3 (seed 0)."""
    base = os.path.dirname(work)
    recipe = train(args.data_dir, os.path.join(base, "recipe", "seed-0"), log, "--seed", "0")
    vamp = train(args.data_dir, os.path.join(base, "priors", "vamp-seed-0"), log, "--prior", "vamp",
                 "--seed", "0")
    betas = ["0", "0.1", "0.3", "1", "3"]
    experiment(args, os.path.join(base, "kl_weight", "z20"), log, "--betas", *betas)
    found = {"N(0, I), beta 1": recipe, "VampPrior": vamp}
    for beta in ("0", "3"):
        path = os.path.join(base, "kl_weight", "z20", f"beta-{beta}", "metrics.json")
        found[f"N(0, I), beta {beta}"] = read_json(path)
    header = ["run", "codes: linear", "codes: spherical", "prior draws: linear",
              "prior draws: spherical", "midpoint norm of prior pairs: linear / spherical"]
    table = markdown_table(header, [walk_row(name, metrics) for name, metrics in found.items()])
    numbers = {name: metrics["interpolation"] for name, metrics in found.items()}
    seed_0 = os.path.join(base, "recipe", "seed-0")
    figures = {name: os.path.join(seed_0, name) for name in ("interpolations.png",
                                                             "traversals.png")}
    return {"numbers": numbers, "tables": {"walks": table}, "figures": figures}


# The rows of the samplers' table: (its name, the run, the sampler of means, the sampler of draws)
SAMPLER_ROWS = [
    ("held-out real images (the floor)", "recipe", "real, held out", None),
    ("N(0, I), the prior", "recipe", "prior, mean", "prior, draw"),
    ("the mixture fitted to q(z) after training", "recipe", "fitted q(z), mean",
     "fitted q(z), draw"),
    ("N(0, I): the draws in holes of q(z)", "recipe", "prior in holes, mean", None),
    ("N(0, I): the draws not in holes", "recipe", "prior not in holes, mean", None),
    ("a learned prior: mixture of Gaussians", "mog", "prior, mean", "prior, draw"),
    ("a learned prior: VampPrior", "vamp", "prior, mean", "prior, draw"),
    ("VampPrior: the draws in holes of q(z)", "vamp", "prior in holes, mean", None),
    ("VampPrior: the draws not in holes", "vamp", "prior not in holes, mean", None),
    ("pixels each Bernoulli(its mean) (a ceiling)", "recipe", "pixels Bernoulli(mean)", None),
]


def run_seconds(metrics):
    """A run's training, measurements and sample measures, in seconds (its figures aside)."""
    analysis_seconds = sum(metrics["analysis_seconds"].values())
    return sum(metrics["epoch_seconds"]) + analysis_seconds + metrics["samples"]["seconds"]


def part_samples(args, work, log):
    """Does sampling from the prior work? The samples of every sampler measured on the images with a
    classifier (the recipe and the learned priors, seed 0): the Frechet distance of its features to
    the test images', the classes covered, the unsure share; held-out real images are the floor."""
    base = os.path.dirname(work)
    found = {"recipe": train(args.data_dir, os.path.join(base, "recipe", "seed-0"), log,
                             "--seed", "0")}
    for prior in ("mog", "vamp"):
        found[prior] = train(args.data_dir, os.path.join(base, "priors", f"{prior}-seed-0"), log,
                             "--prior", prior, "--seed", "0")
    rows = []
    numbers = {"rows": {}}
    for name, run, means, draws in SAMPLER_ROWS:
        samplers = found[run]["samples"]["samplers"]
        m = samplers[means]
        drawn = f"{samplers[draws]['frechet']:.2f}" if draws else "-"
        rows.append([name, f"{m['frechet']:.2f}", drawn, f"{m['class_tv']:.3f}",
                     f"{m['class_kl']:.3f}", f"{m['unsure']:.1%}", f"{m['n']:,}"])
        numbers["rows"][name] = {"means": m, "draws": samplers[draws] if draws else None}
    header = ["sampler", "Frechet: means of p(x\\|z)", "Frechet: draws x ~ p(x\\|z)",
              "classes: TV from uniform", "classes: KL from uniform", "unsure (max p < 0.5)",
              "samples"]
    table = markdown_table(header, rows)
    recipe = found["recipe"]
    classifier_record = recipe["samples"]["classifier"]
    cost = {"classifier_seconds": classifier_record["seconds"],
            "measure_seconds": recipe["samples"]["seconds"], "run_seconds": run_seconds(recipe)}
    numbers.update({"classifier": classifier_record, "cost": cost})
    cost_table = markdown_table(
        ["classifier's test accuracy", "its training (once per dataset)",
         "the measures, per run", "share of the recipe's run"],
        [[f"{classifier_record['test_accuracy']:.2%}", f"{cost['classifier_seconds']:.1f} s",
          f"{cost['measure_seconds']:.1f} s",
          f"{cost['measure_seconds'] / cost['run_seconds']:.1%}"]])
    seed_0 = os.path.join(base, "recipe", "seed-0")
    return {"numbers": numbers, "tables": {"samplers": table, "samplers_cost": cost_table},
            "figures": {"samples_measured.png": os.path.join(seed_0, "samples_measured.png")}}


def part_speed(args, work, log):
    """The full default run's epochs (10) against plain PyTorch and against PyTorch with subnormals
    flushed to zero, alternated round by round (benchmarks/alternate.py). The rounds' raw numbers
    are kept in the part's folder: run again, the part rebuilds its table from them."""
    data = args.data_dir
    commands = {
        "numpy": f"{sys.executable} -m lab --dataset {DATASET[0]} --data-dir {data} --benchmark "
                 f"--epochs 10",
        "torch": f"{args.torch_python} benchmarks/torch_vae.py {data} --epochs 10",
        "torch-flush": f"{args.torch_python} benchmarks/torch_vae.py {data} --epochs 10 "
                       f"--flush-denormal",
    }
    raw = os.path.join(work, "alternate.json")
    reused = os.path.exists(raw)
    if not reused:
        command = [sys.executable, "benchmarks/alternate.py", "--rounds", str(args.rounds),
                   "--json", raw]
        for name, text in commands.items():
            command += ["--name", name, text]
        os.makedirs(work, exist_ok=True)
        run_command(command, log)
    result = read_json(raw)
    described = {"numpy": "this code: `python -m lab --benchmark --epochs 10`",
                 "torch": "PyTorch: `torch_vae.py --epochs 10`",
                 "torch-flush": "PyTorch, subnormals flushed: `--flush-denormal`"}
    rows = []
    for entry in result["commands"]:
        ratio = result["ratios"].get(f"numpy / {entry['name']}")
        ratio_text = "-"
        if ratio:
            ratio_text = f"{ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}]"
        seconds = f"{entry['median']:.2f} [{entry['min']:.2f}, {entry['max']:.2f}]"
        rows.append([described[entry["name"]], seconds, ratio_text])
    table = markdown_table(["command", "median epoch, s [range]",
                            "this code's epoch / that command's (per round)"], rows)
    return {"numbers": result, "tables": {"speed": table}, "figures": {}, "reused": reused}


# Burda, Grosse & Salakhutdinov, Importance Weighted Autoencoders (ICLR 2016), Table 1, MNIST, one
# stochastic layer: the test -log p(x) (bounded with 5,000 draws) after the full schedule of 3,280
# epochs.
PAPER_TABLE_1 = {"VAE k = 1": 86.76, "VAE k = 5": 86.47, "IWAE k = 5": 85.54, "IWAE k = 50": 84.78}
IWAE_RUNS = {"VAE k = 1": ("elbo", 1), "VAE k = 5": ("elbo", 5), "IWAE k = 5": ("iwae", 5),
             "IWAE k = 50": ("iwae", 50)}
# The paper's setting, as the lab's options (docs/iwae.md)
BURDA_FLAGS = ["--binarize", "--hidden", "200", "--latent", "50", "--layers", "2",
               "--activation", "tanh", "--batch-size", "20", "--adam-eps", "1e-4",
               "--lr-schedule", "burda"]
IWAE_EPOCHS = 4           # stages i = 0 and 1 of the schedule's 3^i epochs (1 + 3)
IWAE_NLL_SAMPLES = 5000   # the paper's S
STEP_SAMPLES = (1, 5, 50)
STEP_IMAGES = 2000        # the training images of a timed run: 100 steps of 20 an epoch
STEP_ROUNDS = 3
MEDIAN_EPOCH = re.compile(r"median epoch ([\d.]+) s")


def iwae_runs(args, work, log):
    """The four runs of the paper's table in the lab, and VAE k = 1 in PyTorch, at IWAE_EPOCHS."""
    runs = {}
    for name, (objective, k) in IWAE_RUNS.items():
        out = os.path.join(work, f"{objective}-k{k}")
        metrics = train(args.data_dir, out, log, *BURDA_FLAGS, "--epochs", str(IWAE_EPOCHS),
                        "--objective", objective, "--samples", str(k),
                        "--iw-samples", str(IWAE_NLL_SAMPLES))
        runs[name] = {"nll": metrics["iw_nll"], "test_elbo": metrics["test_loss"],
                      "active_units": metrics["aggregate_posterior"]["active_units"],
                      "curve": metrics["test_loss_curve"]}
    saved = os.path.join(work, "torch-vae-k1.json")
    if not os.path.exists(saved):
        command = [args.torch_python, "benchmarks/torch_iwae.py", args.data_dir,
                   "--objective", "elbo", "--samples", "1", "--epochs", str(IWAE_EPOCHS),
                   "--iw-samples", str(IWAE_NLL_SAMPLES)]
        result = json.loads(run_command(command, log).strip().splitlines()[-1])
        with open(saved, "w") as f:
            json.dump(result, f)
    torch_run = read_json(saved)
    runs["PyTorch VAE k = 1"] = {"nll": torch_run["test_nll"], "test_elbo": None,
                                 "active_units": torch_run["active_units"],
                                 "curve": torch_run["curve"]}
    return runs


def iwae_step_times(args, work, log):
    """The median time of a training step for k = 1, 5, 50 (the IWAE bound), this code and PyTorch
    alternated round by round: {k: {"numpy": [ms per round], "torch": [ms per round]}}. NumPy's
    step is its median epoch over STEP_IMAGES images (--benchmark, 2 epochs) / 100 steps, all of
    the loop's work; PyTorch's the median of 100 timed steps (torch_iwae.py --time-steps)."""
    saved = os.path.join(work, "steps.json")
    if os.path.exists(saved):
        return read_json(saved)
    steps_per_epoch = STEP_IMAGES // 20
    times = {str(k): {"numpy": [], "torch": []} for k in STEP_SAMPLES}
    for _ in range(STEP_ROUNDS):
        for k in STEP_SAMPLES:
            numpy_command = [sys.executable, "-m", "lab", "--dataset", DATASET[0], "--data-dir",
                             args.data_dir, *BURDA_FLAGS, "--objective", "iwae", "--samples",
                             str(k), "--benchmark", "--epochs", "2", "--train-images",
                             str(STEP_IMAGES), "--iw-samples", "2", "--gmm-components", "2"]
            epoch_s = float(MEDIAN_EPOCH.search(run_command(numpy_command, log)).group(1))
            times[str(k)]["numpy"].append(1e3 * epoch_s / steps_per_epoch)
            torch_command = [args.torch_python, "benchmarks/torch_iwae.py", args.data_dir,
                             "--objective", "iwae", "--samples", str(k), "--time-steps", "100"]
            result = json.loads(run_command(torch_command, log).strip().splitlines()[-1])
            times[str(k)]["torch"].append(result["step_ms_median"])
    with open(saved, "w") as f:
        json.dump(times, f)
    return times


def part_iwae(args, work, log):
    """Burda et al.'s Table 1 (one stochastic layer) beside this code's runs of its setting, cut at
    4 of the 3,280 epochs, with PyTorch's VAE k = 1 at the same epochs; the test bound against
    epochs; and a training step's time against k, NumPy against PyTorch."""
    from lab import figures
    os.makedirs(work, exist_ok=True)
    runs = iwae_runs(args, work, log)
    rows = []
    for name, run in runs.items():
        elbo = "-" if run["test_elbo"] is None else f"{run['test_elbo']:.2f}"
        paper = PAPER_TABLE_1.get(name.replace("PyTorch ", ""))
        rows.append([name, f"{run['nll']:.2f}", elbo, run["active_units"], f"{paper:.2f}"])
    header = ["one stochastic layer, binarized MNIST",
              f"test -log p(x) <=, S = {IWAE_NLL_SAMPLES:,}, after {IWAE_EPOCHS} epochs",
              "test -ELBO",
              "active units (of 50)", "the paper's -log p(x), after 3,280 epochs"]
    table = markdown_table(header, rows)
    times = iwae_step_times(args, work, log)
    speed_rows = []
    for k, measured in times.items():
        ratios = [a / b for a, b in zip(measured["numpy"], measured["torch"])]
        speed_rows.append([k, summary_text(measured["numpy"]), summary_text(measured["torch"]),
                           summary_text(ratios)])
    speed_table = markdown_table(["k", "this code, ms per step", "PyTorch, ms per step",
                                  "this code / PyTorch (per round)"], speed_rows)
    drawn = os.path.join(work, "figures")
    os.makedirs(drawn, exist_ok=True)
    figures.save(drawn, {"iwae_bounds.png": figures.bound_curves(runs, PAPER_TABLE_1)})
    return {"numbers": {"runs": runs, "step_ms": times, "epochs": IWAE_EPOCHS},
            "tables": {"iwae": table, "iwae_speed": speed_table},
            "figures": {"iwae_bounds.png": os.path.join(drawn, "iwae_bounds.png")}}


# Each part: its function, whether it needs torch, the figures it writes into docs/figures/<part>/
# and the tables it writes into the README and the pages of DOC_PAGES (a test holds them to these
# lists).
PARTS = {
    "minimal": {"run": part_minimal, "torch": False, "tables": ["minimal"],
                "figures": ["reconstructions.png", "samples_prior.png", "samples_posterior.png"]},
    "recipe": {"run": part_recipe, "torch": False, "tables": ["recipe"],
               "figures": ["reconstructions.png", "samples_prior.png", "loss_curves.png",
                           "gradient_paths.png", "samples_three_ways.png",
                           "prior_vs_aggregate.png"]},
    "torch": {"run": part_torch, "torch": True, "tables": ["torch"], "figures": []},
    "latent2": {"run": part_latent2, "torch": False, "tables": [],
                "figures": ["latent_space.png", "latent_manifold.png"]},
    "explorer": {"run": part_explorer, "torch": False, "browser": True, "tables": [],
                 "figures": ["explorer.png"]},
    "holes": {"run": part_holes, "torch": False, "tables": ["holes"], "figures": []},
    "priors": {"run": part_priors, "torch": False, "tables": ["priors"],
               "figures": ["samples_three_ways.png", "prior_vs_aggregate.png"]},
    "kl_weight": {"run": part_kl_weight, "torch": False, "tables": ["kl_weight"],
                  "figures": ["kl_weight_samples.png", "kl_weight_latent.png"]},
    "warmup": {"run": part_warmup, "torch": False, "tables": ["warmup"], "figures": []},
    "binarize": {"run": part_binarize, "torch": False, "tables": ["binarize"], "figures": []},
    "likelihoods": {"run": part_likelihoods, "torch": False, "tables": ["likelihoods"],
                    "figures": ["likelihood_samples.png"]},
    "gaussian": {"run": part_gaussian, "torch": False,
                 "tables": ["gaussian_failure", "sigma_lag"],
                 "figures": ["runaway.png", "sigma_lag.png", "decoder_sigma.png"]},
    "walks": {"run": part_walks, "torch": False, "tables": ["walks"],
              "figures": ["interpolations.png", "traversals.png"]},
    "samples": {"run": part_samples, "torch": False, "tables": ["samplers", "samplers_cost"],
                "figures": ["samples_measured.png"]},
    "speed": {"run": part_speed, "torch": True, "tables": ["speed"], "figures": []},
    "iwae": {"run": part_iwae, "torch": True, "mnist_only": True,
             "tables": ["iwae", "iwae_speed"], "figures": ["iwae_bounds.png"]},
}


# The pages of docs/ that show tables between markers, as the README does.
DOC_PAGES = ("latent-space.md", "likelihoods.md", "iwae.md")


def part_summary(name):
    """A part's docstring as one line."""
    return " ".join(PARTS[name]["run"].__doc__.split())


def explorer_browser_missing():
    """Why the explorer part cannot run here (no playwright or no Chromium), or None."""
    import explorer_browser
    return explorer_browser.browser_missing()


# ---- the record and the README -------------------------------------------------------------------

def code_commit():
    """The last commit that changed the code the numbers come from (the modules, the PyTorch
    baseline, requirements.txt: not the tests, the docs or this script), and whether it has
    uncommitted changes."""
    paths = ["--", *CODE_PATHS]
    commit = subprocess.run(["git", "log", "-1", "--format=%h", *paths], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", *paths], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        commit += "-dirty"
    return commit


CODE_PATHS = ["*.py", "requirements.txt", ":!tests", ":!test_vae.py", ":!conftest.py",
              ":!benchmarks/reproduce.py", ":!benchmarks/explorer_browser.py"]


def without_docstrings(tree):
    """The syntax tree with every module, class and function docstring removed."""
    for node in ast.walk(tree):
        documented = isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        if documented and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(root=ROOT):
    """A hash of what the code computes: each code file's syntax tree without its comments and
    docstrings (requirements.txt as it is). A change of comments or docstrings leaves it as it is;
    a change of code does not. Parts whose record has this fingerprint are current."""
    listed = subprocess.run(["git", "ls-files", "--", *CODE_PATHS], cwd=root, capture_output=True,
                            text=True).stdout.split()
    digest = hashlib.sha256()
    for name in sorted(listed):
        with open(os.path.join(root, name)) as f:
            text = f.read()
        if name.endswith(".py"):
            text = ast.dump(without_docstrings(ast.parse(text)))
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def machine():
    """The CPU, cores, Python, NumPy and its BLAS."""
    import numpy as np
    blas = "unknown"
    try:
        config = np.show_config(mode="dicts")
        blas_info = config["Build Dependencies"]["blas"]
        blas = f"{blas_info.get('name')} {blas_info.get('version')}"
    except (TypeError, KeyError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas}


def load_results(docs):
    path = os.path.join(docs, "results.json")
    if os.path.exists(path):
        return read_json(path)
    return {"parts": {}}


def save_results(results, docs):
    path = os.path.join(docs, "results.json")
    os.makedirs(docs, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def is_current(part, record, fingerprint, docs, train_flags="", data_dir=None, dataset="mnist"):
    """A part is current when its record was made by code that computes what this code does (the
    same fingerprint), with the same --train-flags (none: the default command's), on the same
    dataset (a record from before it was recorded: Fashion-MNIST) from the same data folder (a
    record from before it was recorded: any), and its figures are there."""
    if record is None or record.get("code") != fingerprint:
        return False
    if record.get("dataset", "fashion") != dataset:
        return False
    if record.get("train_flags", "") != train_flags:
        return False
    recorded_data = record.get("data_dir")
    if data_dir and recorded_data and recorded_data != os.path.abspath(data_dir):
        return False
    figures = [os.path.join(docs, "figures", part, name) for name in record.get("figures", [])]
    return all(os.path.exists(path) for path in figures)


TABLE = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


COMMIT = re.compile(r"(<!-- commit -->\n)(.*?)(<!-- /commit -->)", re.S)


def write_readme_tables(results, path):
    """Write each recorded table between its markers in the README, and the commits they are of."""
    tables = {}
    for record in results["parts"].values():
        tables.update(record.get("tables", {}))
    commits = sorted({record["commit"] for record in results["parts"].values()})
    fingerprints = {record.get("code") for record in results["parts"].values()}
    with open(path) as f:
        text = f.read()
    commit_line = (f"The tables and figures on this page are of code commit {', '.join(commits)} "
                   f"(docs/results.json).\n")
    if len(commits) > 1 and len(fingerprints) == 1:
        commit_line = (f"The tables and figures on this page are of code commits "
                       f"{', '.join(commits)}, which differ in comments only and compute the same "
                       f"(docs/results.json).\n")

    def fill_commit(match):
        return match.group(1) + commit_line + match.group(3)

    text = COMMIT.sub(fill_commit, text)

    def fill(match):
        name = match.group(2)
        if name not in tables:
            return match.group(0)
        return match.group(1) + tables[name] + "\n" + match.group(4)

    with open(path, "w") as f:
        f.write(TABLE.sub(fill, text))


def write_results_page(results, docs):
    """docs/results.md: every part's tables and figures, with its commit and time."""
    machine_info = results.get("machine", {})
    lines = ["# Every number, regenerated",
             "",
             "Written by `python benchmarks/reproduce.py --data-dir DIR` from",
             "docs/results.json; each part with the code commit it ran and its wall time. Machine: "
             f"{machine_info.get('cpu', '?')}, {machine_info.get('cores', '?')} cores, "
             f"NumPy {machine_info.get('numpy', '?')} ({machine_info.get('blas', '?')}).",
             ""]
    for name in PARTS:
        record = results["parts"].get(name)
        if record is None:
            continue
        lines.append(f"## {name}: {part_summary(name)}")
        lines.append("")
        lines.append(f"Commit {record['commit']}, {record['seconds']:.0f} s: "
                     f"`python benchmarks/reproduce.py --data-dir DIR --only {name}`.")
        lines.append("")
        for table in record["tables"].values():
            lines.append(table)
            lines.append("")
        for figure in record["figures"]:
            lines.append(f"![{figure}](figures/{name}/{figure})")
            lines.append("")
    os.makedirs(docs, exist_ok=True)          # a first run whose every part was skipped
    with open(os.path.join(docs, "results.md"), "w") as f:
        f.write("\n".join(lines))


def run_part(name, args, results, version, log):
    """Run one part and record it with version: the code commit and the code's fingerprint."""
    function = PARTS[name]["run"]
    # the runs of this code, on this data, with these --train-flags: never another's to reuse
    inputs = f"{os.path.abspath(args.data_dir)}\0{args.train_flags}\0{args.dataset}".encode()
    run_key = hashlib.sha256(inputs).hexdigest()[:8]
    work = os.path.join(args.work, f"{version['code']}-{run_key}", name)
    t0 = time.perf_counter()
    found = function(args, work, log)
    seconds = time.perf_counter() - t0
    previous = results["parts"].get(name)
    measured_at = version["commit"]
    if found.get("reused") and previous:
        seconds = previous["seconds"]       # the time and commit of when its outputs were made
        measured_at = previous["commit"]
    declared = {"figures": set(PARTS[name]["figures"]), "tables": set(PARTS[name]["tables"])}
    written = {"figures": set(found["figures"]), "tables": set(found["tables"])}
    if written != declared:
        raise PartError(f"wrote {written}, but PARTS declares {declared}")
    copied = []
    for dest, src in found["figures"].items():
        target = os.path.join(args.docs, "figures", name, dest)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(src, target)
        copied.append(dest)
    results["parts"][name] = {"commit": measured_at, "code": version["code"],
                              "train_flags": args.train_flags,
                              "data_dir": os.path.abspath(args.data_dir),
                              "dataset": args.dataset,
                              "seconds": round(seconds, 1),
                              "numbers": found["numbers"], "tables": found["tables"],
                              "figures": copied,
                              "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    results["machine"] = machine()
    save_results(results, args.docs)


def output_paths(args, log):
    """Where the records, figures and README go: --docs and --readme, else the repository's docs/
    and README.md; with --train-flags (a quick, small run) a scratch folder, never the repository's
    docs/ and README.md, which hold the default command's numbers (naming them is refused)."""
    repository_docs = os.path.join(ROOT, "docs")
    repository_readme = os.path.join(ROOT, "README.md")
    if not args.train_flags:
        args.docs = args.docs or repository_docs
        args.readme = args.readme or repository_readme
        return
    for flag, path, own in (("--docs", args.docs, repository_docs),
                            ("--readme", args.readme, repository_readme)):
        if path and os.path.abspath(path) == own:
            raise PartError(f"{flag} {path} with --train-flags: a quick run never writes the "
                            f"repository's docs/ or README.md; leave {flag} out")
    scratch = os.path.join(ROOT, "runs", "reproduce-quick")
    args.docs = args.docs or os.path.join(scratch, "docs")
    if not args.readme:
        args.readme = os.path.join(scratch, "README.md")
        os.makedirs(scratch, exist_ok=True)
        shutil.copyfile(repository_readme, args.readme)
    log(f"--train-flags: a quick run, whose numbers are not the README's: writing {args.docs} and "
        f"{args.readme}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the dataset's four archives")
    p.add_argument("--dataset", choices=["mnist", "fashion"], default="mnist",
                   help="the dataset in --data-dir (default: mnist)")
    p.add_argument("--only", choices=sorted(PARTS), action="append",
                   help="run this part (repeatable)")
    p.add_argument("--torch-python",
                   help="a Python that imports torch, for the parts torch, speed and iwae")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the speed part (default: 5)")
    p.add_argument("--force", action="store_true",
                   help="run the parts even if their record is current")
    p.add_argument("--docs", help="where results.json, results.md and figures/ go (default: "
                                   "docs/; with --train-flags, runs/reproduce-quick/docs/)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "reproduce"),
                   help="where the runs go (default: runs/reproduce/)")
    p.add_argument("--readme", help="the README whose tables are written (default: README.md; "
                                     "with --train-flags, a copy in runs/reproduce-quick/)")
    p.add_argument("--train-flags", default="",
                   help="more options for every python -m lab command (for a quick, small run)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        output_paths(args, log=print)
    except PartError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    TRAIN_FLAGS[:] = shlex.split(args.train_flags)
    DATASET[0] = args.dataset
    args.work = os.path.abspath(args.work)
    args.docs = os.path.abspath(args.docs)
    commit = code_commit()
    fingerprint = code_fingerprint()
    results = load_results(args.docs)
    names = args.only or list(PARTS)
    log = print
    for i, name in enumerate(names, 1):
        needs_torch = PARTS[name]["torch"]
        record = results["parts"].get(name)
        if needs_torch and not args.torch_python:
            log(f"[{i}/{len(names)}] {name}: skipped, it needs --torch-python")
            continue
        if PARTS[name].get("mnist_only") and args.dataset != "mnist":
            log(f"[{i}/{len(names)}] {name}: skipped, its paper's table is on MNIST")
            continue
        missing = PARTS[name].get("browser") and explorer_browser_missing()
        if missing:
            log(f"[{i}/{len(names)}] {name}: skipped, {missing}")
            continue
        current = is_current(name, record, fingerprint, args.docs, args.train_flags,
                             args.data_dir, args.dataset)
        if current and not args.force:
            log(f"[{i}/{len(names)}] {name}: current (code {fingerprint}), skipped")
            continue
        log(f"[{i}/{len(names)}] {name}: {part_summary(name)}")
        try:
            run_part(name, args, results, {"commit": commit, "code": fingerprint}, log)
        except PartError as err:
            print(f"error: part {name}: {err}", file=sys.stderr)
            return 1
        log(f"  done in {results['parts'][name]['seconds']:.0f} s")
    write_readme_tables(results, args.readme)
    for page in DOC_PAGES:
        path = os.path.join(args.docs, page)
        if os.path.exists(path):
            write_readme_tables(results, path)
    write_results_page(results, args.docs)
    log(f"wrote {os.path.join(args.docs, 'results.json')} and the README's tables (code commit "
        f"{commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
