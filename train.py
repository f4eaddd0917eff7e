"""Train the VAE on MNIST (or Fashion-MNIST) and write the model, metrics and figures.

    python train.py                       # the reference recipe: 784-400-20-400-784, Adam 1e-3, batch 128, 10 epochs
    python train.py --resume runs/mnist-h400-z20-s0/checkpoint.npz --epochs 20
    python train.py --analyze runs/mnist-h400-z20-s0/model.npz     # measure and draw the latent space again
    python train.py --betas 0 0.1 0.3 1 3                           # the KL-weight experiment: a run per beta
    python train.py --likelihoods                                   # the likelihood experiment: a run per p(x|z)
    python train.py --benchmark                                     # time training against the matmul floor
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time

import numpy as np

import analysis
import figures
import mnist
import priors
from autograd import Adam

# The recipe. Options default to None on the command line: --resume takes the checkpoint's unless they are given.
DEFAULTS = {"dataset": "mnist", "hidden": 400, "latent": 20, "prior": "standard", "prior_components": None,
            "likelihood": "bernoulli", "decoder_sigma": None, "batch_size": 128, "lr": 1e-3, "seed": 0, "beta": 1.0,
            "kl_warmup": 0, "binarize": False}
ARCHITECTURE = ("hidden", "latent", "prior", "prior_components", "likelihood", "decoder_sigma")   # the model's
LIKELIHOODS = ["bernoulli", "gaussian:1", "gaussian:0.1", "gaussian:learned", "cb"]   # --likelihoods' default
OPTIONS = [  # flag, type, least value allowed, default (None: DEFAULTS'), help
    ("--epochs", int, 0, None, "total epochs (default: 10; 3 with --benchmark)"),
    ("--batch-size", int, 1, None, "default: 128"),
    ("--lr", float, 1e-300, None, "Adam learning rate (default: 1e-3)"),
    ("--hidden", int, 1, None, "hidden units in encoder and decoder (default: 400)"),
    ("--latent", int, 1, None, "latent dimensions Z (default: 20)"),
    ("--prior-components", int, 1, None, "K of a learned prior (default: mog 10, vamp 100)"),
    ("--beta", float, 0, None, "the KL weight: train on recon + beta * KL (default: 1, the negative ELBO)"),
    ("--kl-warmup", int, 0, None, "epochs over which the KL weight rises linearly from 0 to beta (default: 0)"),
    ("--seed", int, 0, None, "default: 0"),
    ("--iw-samples", int, 1, 100, "S importance samples per test image for iw_nll (default: 100; Burda et al.: 5000)"),
    ("--gmm-components", int, 1, 10, "components of the mixture fitted to the aggregated posterior (default: 10)"),
    ("--posterior-image", int, 0, 0, "index of the test image whose posterior is sampled (default: 0)")]
NOT_TOGETHER = {  # an option, why, and the options it cannot go with
    "analyze": ("it measures a saved model and trains nothing", ("resume", "betas", "likelihoods", "benchmark",
                "epochs", *(k for k in DEFAULTS if k not in ("dataset", "seed", "binarize")))),
    "resume": ("a run continues with its own options", ("betas", "likelihoods", "benchmark", "overwrite")),
    "betas": ("the experiment sets the KL weight of each run", ("beta", "benchmark", "likelihoods")),
    "likelihoods": ("the experiment sets each run's likelihood", ("likelihood", "decoder_sigma", "benchmark"))}
STATE_LISTS = ("train_loss", "train_recon", "train_kl", "train_objective", "kl_weight", "test_loss_curve",
               "epoch_seconds", "gradient_paths", "gradient_paths_per_unit")    # one value per epoch each
PATHS = ("recon_mu", "kl_mu", "recon_log_var", "kl_log_var")   # the gradients that meet at the encoder's outputs


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite."""


class UsageError(Exception):
    """Options that cannot work together, or that the data or a file cannot serve: found before any training."""


def decoder_sigma(text):
    """--decoder-sigma: 'learned', or a number > 0."""
    try:
        value = text if text == "learned" else float(text)
    except ValueError:
        value = math.nan
    if value != "learned" and not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0 or 'learned', got {text!r}")
    return value


def likelihood(spec):
    """--likelihoods: bernoulli, cb, or gaussian:SIGMA (SIGMA a number > 0, or 'learned'). -> (name, sigma)"""
    name, _, sigma = spec.partition(":")
    if name in ("bernoulli", "cb", "gaussian") and bool(sigma) == (name == "gaussian"):
        return name, decoder_sigma(sigma) if sigma else None
    raise argparse.ArgumentTypeError(f"{spec!r} is not bernoulli, gaussian:SIGMA (SIGMA > 0 or learned) or cb")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"error: {message} (python train.py --help lists the options)\n")  # one line
    p.add_argument("--dataset", choices=sorted(mnist.DATASETS), help="default: mnist")
    p.add_argument("--data-dir", help="where the archives are looked for and downloaded to (default: data/<dataset>)")
    p.add_argument("--mirror", help="download from this URL instead of the default mirrors")
    p.add_argument("--prior", choices=sorted(priors.PRIORS), help="p(z): N(0, I) (standard), a mixture, VampPrior")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian", "cb"), help="p(x|z); default: bernoulli")
    p.add_argument("--decoder-sigma", type=decoder_sigma, help="the Gaussian's sigma: > 0, or learned (default)")
    p.add_argument("--binarize", action="store_true", default=None, help="train on pixels drawn as Bernoulli("
                   "intensity) each time an image is used; the test set is binarized once")
    for flag, kind, _, default, text in OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--gmm-covariance", choices=("full", "diag"), default="full", help="default: full")
    p.add_argument("--out", help="output folder (default: runs/<dataset>-h<hidden>-z<latent>-s<seed>[-...])")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.npz")
    p.add_argument("--analyze", metavar="MODEL", help="measure and draw a saved model.npz again (beside it, or --out)")
    p.add_argument("--betas", type=float, nargs="+", metavar="BETA", help="the KL-weight experiment: a run per beta")
    p.add_argument("--likelihoods", nargs="*", type=likelihood, metavar="SPEC", help="the likelihood experiment, "
                   f"like --betas: a run per SPEC (default: {' '.join(LIKELIHOODS)}), then a comparison")
    p.add_argument("--benchmark", action="store_true", help="time training and the analysis; writes nothing")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in the output folder")
    args = p.parse_args(argv)
    values = [(f, least, getattr(args, f[2:].replace("-", "_"))) for f, _, least, _, _ in OPTIONS]
    for flag, least, value in values + [("--betas", 0, beta) for beta in args.betas or []]:
        if value is not None and not (value >= least and math.isfinite(value)):
            p.error(f"argument {flag}: must be {'> 0' if least > 0 else '>= 0'} and finite, got {value}")
    for flag, given, needs in (("--decoder-sigma", args.decoder_sigma, args.likelihood == "gaussian"),
                               ("--prior-components", args.prior_components, args.prior in ("mog", "vamp"))):
        if given is not None and not needs:
            p.error(f"{flag} needs {'--likelihood gaussian' if flag[2] == 'd' else '--prior mog or vamp'}")
    if len(set(runs := [str(value) for value in args.betas or args.likelihoods or []])) < len(runs):
        p.error(f"--{'betas' if args.betas else 'likelihoods'} repeats a value: each run needs a folder of its own")
    for a, (why, others) in NOT_TOGETHER.items():
        for b in (b for b in others if getattr(args, a) not in (None, False) and getattr(args, b) not in (None, False)):
            p.error(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} do not go together: {why}")
    return args


# ---- the training loop -------------------------------------------------------------------------------------

def new_run(cfg, x_train):
    """The model, its optimizer, and the state that, with the parameters, makes a run resumable."""
    model = priors.build(cfg["prior"], cfg["prior_components"], n_in=x_train.shape[1],
                         **{k: cfg[k] for k in ("hidden", "latent", "seed", "likelihood", "decoder_sigma")})
    cfg["prior_components"] = model.components
    if cfg["prior"] == "vamp":  # pseudo-inputs start as K random training images + N(0, 0.01^2), as in the paper
        rng, u = np.random.default_rng([cfg["seed"], 6]), model.prior["w"]
        images = x_train[rng.choice(len(x_train), len(u), replace=False)]
        u[...] = mnist.to_float(images) + 0.01 * rng.standard_normal(u.shape)
    state = {"epoch": 0, "step": 0, "perm": None, "rng": np.random.default_rng(cfg["seed"]), "elapsed": 0.0,
             **{k: [] for k in STATE_LISTS[:-2]}, **{k: {p: [] for p in PATHS} for k in STATE_LISTS[-2:]}}
    return model, Adam(model.params(), lr=cfg["lr"]), state


def kl_weight(cfg, global_step, n_steps):
    """beta; during a warm-up of W epochs, beta * t / (W * steps per epoch) at global step t (counted from 0):
    0 at the first step, beta from the first step of epoch W + 1 on (Bowman et al. 2016; Sonderby et al. 2016)."""
    return cfg["beta"] * min(1.0, global_step / (cfg["kl_warmup"] * n_steps)) if cfg["kl_warmup"] else cfg["beta"]


def batch(x_train, perm, step, cfg, rng, latent):
    """The step-th batch of the epoch's order as float32 in [0, 1] (with --binarize, pixels drawn afresh as
    Bernoulli(intensity)), and its eps ~ N(0, I)."""
    images = x_train[perm[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]]]
    x = mnist.to_float(mnist.binarize(images, rng) if cfg["binarize"] else images)
    return x, rng.standard_normal((len(x), latent), dtype=np.float32)


@np.errstate(over="ignore", invalid="ignore")  # a diverging run overflows: the finite-loss check says so once
def train_epoch(model, opt, x_train, state, cfg, stop, progress):
    """One pass over the shuffled training set, from state['step'] on (a resumed epoch continues mid-way).
    Returns False if a stop was requested (Ctrl-C) before the epoch finished."""
    rng, n_steps, grads = state["rng"], math.ceil(len(x_train) / cfg["batch_size"]), model.grads()
    if state["perm"] is None:                       # a new epoch: a new order, new sums
        state.update(perm=rng.permutation(len(x_train)), step=0, sums=np.zeros(5),
                     path_sums=np.zeros((len(PATHS), 2, model.latent)))
    t0 = time.perf_counter()
    for step in range(state["step"], n_steps):
        x, eps = batch(x_train, state["perm"], step, cfg, rng, model.latent)
        loss, recon, kl = model.forward(x, eps)
        if not np.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss} at epoch {state['epoch'] + 1}, step {step + 1} "
                                f"(global step {state['epoch'] * n_steps + step + 1})")
        beta = kl_weight(cfg, state["epoch"] * n_steps + step, n_steps)
        model.backward(beta)
        opt.step(grads)
        state["step"] = step + 1
        state["sums"] += np.array([loss, recon, kl, recon + beta * kl, beta]) * len(x)
        for i, name in enumerate(PATHS):            # per-example gradients (B times the batch mean's), and squares
            g = model.paths[name] * len(x)
            state["path_sums"][i] += g.sum(0), (g * g).sum(0)
        progress(state, n_steps, seen=min(state["step"] * cfg["batch_size"], len(x_train)))
        if stop["requested"]:
            state["elapsed"] += time.perf_counter() - t0
            return False
    for key, value in zip(STATE_LISTS, state["sums"] / len(x_train)):
        state[key].append(float(value))
    for name, (mean, mean_square) in zip(PATHS, state["path_sums"] / len(x_train)):   # over the epoch's examples
        state["gradient_paths"][name].append(float(np.sqrt(mean_square.mean())))       # RMS over every unit
        state["gradient_paths_per_unit"][name].append({"mean": mean.tolist(), "rms": np.sqrt(mean_square).tolist()})
    state["epoch_seconds"].append(state["elapsed"] + time.perf_counter() - t0)
    state.update(epoch=state["epoch"] + 1, perm=None, elapsed=0.0)
    return True


def train(model, opt, x_train, x_test, state, cfg, checkpoint):
    """Epochs until cfg['epochs'], the test loss and a checkpoint after each (none if checkpoint is None). Ctrl-C
    finishes the step in flight, saves a checkpoint and returns False; a second Ctrl-C stops at once."""
    stop = {"requested": False}
    def on_sigint(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while state["epoch"] < cfg["epochs"]:
            if train_epoch(model, opt, x_train, state, cfg, stop, figures.progress_bar):
                loss, recon, kl = analysis.negative_elbo(model, x_test, cfg["seed"])
                state["test_loss_curve"].append(loss)
                print(figures.epoch_line(state, loss, recon, kl, len(x_train)), flush=True)
            if checkpoint:                          # after each epoch, and where Ctrl-C stopped one
                mnist.save_checkpoint(checkpoint, model, opt, state, cfg)
            if stop["requested"]:
                return False
    except NonFiniteLoss as err:
        kept = f"the last good checkpoint is {checkpoint}" if os.path.exists(checkpoint or "") else \
            "no checkpoint was written"
        raise NonFiniteLoss(f"{err}; stopped, {kept}. Try a smaller --lr")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return True


# ---- the command ---------------------------------------------------------------------------------------------

def prepare_config(args):
    """A new run's training options: the recipe's, unless given on the command line."""
    cfg = {**DEFAULTS, **{k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}}
    cfg["decoder_sigma"] = cfg["decoder_sigma"] or ("learned" if cfg["likelihood"] == "gaussian" else None)
    return {**cfg, "epochs": args.epochs if args.epochs is not None else 3 if args.benchmark else 10}


def prepare(args):
    """(cfg, model, opt, state, out, fresh) from the options and files alone: every check that needs no data, before
    any download or training. model is None for a new run; fresh: the output folder is not the run's own."""
    model = opt = state = None
    path = args.analyze or args.resume
    if args.analyze:                                # the run's options come from the metrics.json beside the model
        model, _ = mnist.load_model(path)
        beside = analysis.read_metrics(os.path.join(os.path.dirname(path) or ".", "metrics.json")).get("config", {})
        cfg = {**DEFAULTS, **beside, **{k: getattr(args, k) for k in ("dataset", "seed", "binarize")
                                        if getattr(args, k) is not None}}
    elif args.resume:                               # the epoch target it was started with, unless --epochs is given
        model, opt, state, saved = mnist.load_checkpoint(path)
        cfg = {**DEFAULTS, **saved}                 # a checkpoint from before an option was added has its default
        for k in (k for k in DEFAULTS if getattr(args, k) not in (None, cfg[k])):
            what = "of another architecture" if k in ARCHITECTURE else "from another run"
            raise UsageError(f"{path}: checkpoint is {what}: it has --{k.replace('_', '-')} {cfg[k]}, you asked for "
                             f"{getattr(args, k)}; drop the flag or start a new run")
        cfg["epochs"] = cfg.get("epochs", 10) if args.epochs is None else args.epochs
        if cfg["epochs"] < state["epoch"]:
            raise UsageError(f"{path} is at epoch {state['epoch']}: --epochs {args.epochs} would train nothing; pass "
                             f"--epochs {state['epoch'] + 1} or more to train further")
    else:
        cfg = prepare_config(args)
    if not args.analyze and cfg["kl_warmup"] > cfg["epochs"]:
        raise UsageError(f"--kl-warmup {cfg['kl_warmup']} is longer than the {cfg['epochs']} epochs: the KL weight "
                         f"would never reach beta; shorten the warm-up or train longer")
    out = args.out or (os.path.dirname(path) or "." if path else mnist.default_out(cfg, DEFAULTS))
    fresh = not path or os.path.abspath(out) != os.path.abspath(os.path.dirname(path) or ".")
    if not args.benchmark:
        mnist.check_out(out, fresh, args.overwrite)
    return cfg, model, opt, state, out, fresh


def load_data(args, cfg, model):
    """The data set, and the checks that need it (still before training)."""
    x_train, _, x_test, y_test = mnist.load(cfg["dataset"], args.data_dir, args.mirror)
    codes = min(len(x_train), analysis.FITTED_CODES)
    for flag, value, limit, why in (
            ("--posterior-image", args.posterior_image, len(x_test) - 1, f"the test set has {len(x_test)} images"),
            ("--batch-size", cfg["batch_size"], len(x_train), f"the training set has {len(x_train)} images"),
            ("--gmm-components", args.gmm_components, codes, f"the mixture is fitted to {codes} codes"),
            ("--prior-components", (cfg["prior"] == "vamp") * (cfg["prior_components"] or 0), len(x_train), "a "
             f"VampPrior starts from that many of the {len(x_train)} training images")):
        if value > limit:
            raise UsageError(f"{flag} {value} is out of range: {why}")
    if model is not None and x_train.shape[1] != model.n_in:
        raise UsageError(f"{args.analyze or args.resume}: the model takes {model.n_in} inputs, not {x_train.shape[1]}")
    if cfg["binarize"]:                             # the test set once; the training set anew in every batch
        x_test = mnist.binarize(x_test, np.random.default_rng(mnist.TEST_BINARIZATION_SEED))
    return x_train, x_test, y_test


def run(args):
    """Train a new run (or --resume one), or take a saved model (--analyze); then measure it and draw it.
    Returns (exit code, {"model", "metrics", "x_test", "y_test"} of a finished run)."""
    cfg, model, opt, state, out, fresh = prepare(args)
    if args.resume and state["epoch"] >= cfg["epochs"]:
        print(f"{args.resume}: already at epoch {state['epoch']} of {cfg['epochs']}: nothing to train (--epochs "
              f"{state['epoch'] + 1} or more trains on)")
        return 0, None
    x_train, x_test, y_test = load_data(args, cfg, model)
    if model is None:
        model, opt, state = new_run(cfg, x_train)
    if args.benchmark:                              # train a few epochs (writing nothing), then time a step's phases
        train(model, opt, x_train, x_test, state, cfg, checkpoint=None)
        perm = state["rng"].permutation(len(x_train))
        analysis.speed(model, opt, lambda step: batch(x_train, perm, step, cfg, state["rng"], model.latent), x_train,
                       x_test, cfg, state, args)
        return 0, None
    with mnist.claim(out, fresh, args.overwrite):
        if args.analyze:
            return 0, analysis.measure_and_draw(model, analysis.read_metrics(os.path.join(out, "metrics.json")), cfg,
                                                x_train, x_test, y_test, out, args)
        print(figures.run_header(cfg, model, state, len(x_train), len(x_test), out))
        if not train(model, opt, x_train, x_test, state, cfg, os.path.join(out, "checkpoint.npz")):
            print(figures.interrupted_line(state, os.path.join(out, "checkpoint.npz"), args.data_dir))
            return 130, None
        loss, recon, kl = analysis.negative_elbo(model, x_test, cfg["seed"])   # always beta = 1: the true -ELBO
        print(f"test negative ELBO {loss:.2f} nats (recon {recon:.2f} + kl {kl:.2f})")
        mnist.save_model(model, os.path.join(out, "model.npz"))
        figures.save(out, figures.run_figures(model, x_test, state, cfg["seed"]))
        metrics = {"config": cfg, **{k: state[k] for k in STATE_LISTS}, "test_loss": loss, "test_recon": recon,
                   "test_kl": kl, "examples_per_second": len(x_train) / np.mean(state["epoch_seconds"] or np.nan)}
        return 0, analysis.measure_and_draw(model, metrics, cfg, x_train, x_test, y_test, out, args)


def experiment(args):
    """--betas or --likelihoods: the same recipe and seed trained once per KL weight or likelihood, each run in its
    own folder <out>/beta-<BETA> or <out>/<SPEC>; then the table (printed, and comparison.json) and the figures."""
    out = args.out or mnist.default_out(prepare_config(args), DEFAULTS) + ("-betas" if args.betas else "-likelihoods")
    if args.betas:
        variants = {f"beta = {b:g}": {"beta": b, "out": os.path.join(out, f"beta-{b:g}")} for b in args.betas}
    else:
        specs = [(name, sigma, f"{sigma:g}" if isinstance(sigma, float) else sigma)
                 for name, sigma in args.likelihoods or [likelihood(spec) for spec in LIKELIHOODS]]
        variants = {name + (f", sigma {s}" if s else ""): {"likelihood": name, "decoder_sigma": sigma,
                    "out": os.path.join(out, name + (f"-sigma-{s}" if s else ""))} for name, sigma, s in specs}
    every = {name: argparse.Namespace(**{**vars(args), **v}) for name, v in variants.items()}
    for sub in every.values():                      # every run's folder is checked before the first one trains
        prepare(sub)
    with mnist.claim(out, True, args.overwrite):
        runs = {}
        for name, sub in every.items():
            code, runs[name] = run(sub)
            if code:
                return code
        analysis.compare(runs, out, args.posterior_image, "kl_weight" if args.betas else "likelihood")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return experiment(args) if args.betas or args.likelihoods is not None else run(args)[0]
    except (mnist.DataError, mnist.FolderError, mnist.ModelFileError, NonFiniteLoss, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # outside the training loop (download, analysis): every file is whole or absent
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
