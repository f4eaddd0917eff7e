"""A run's training: the core's step (train.py's batch, kl_weight and train_step) in a loop that can
stop and go on. Around each step it keeps what the core's loop does not: the epoch's sums (the
losses and the four gradient paths that meet at the encoder), a progress bar, a Ctrl-C that stops
after the step in flight, and the state a checkpoint needs to continue mid-epoch to the same
numbers. For the recipe (no --binarize or --dequantize), each step is train.py's exactly:
tests/test_core.py holds the two equal.
"""
import math
import os
import signal
import time

import numpy as np

import mnist
import train
from autograd import Adam
from train import NonFiniteLoss

from lab import analysis
from lab import console
from lab import models
from lab import runs

# What an epoch records, one value per epoch each: the means over the epoch's examples of the loss
# and its parts, of the objective recon + beta * KL and of beta; the test loss at the epoch's end;
# a Gaussian decoder's sigma at the epoch's end (none for the other likelihoods); its seconds.
EPOCH_SUMS = ("train_loss", "train_recon", "train_kl", "train_objective", "kl_weight")
EPOCH_RECORDS = EPOCH_SUMS + ("test_loss_curve", "decoder_sigma_curve", "epoch_seconds")
# The four gradients that meet at the encoder's outputs (vae.VAE.backward's self.paths).
PATHS = ("recon_mu", "kl_mu", "recon_log_var", "kl_log_var")


# ---- the training loop ---------------------------------------------------------------------------

def new_run(cfg, x_train):
    """The model, its optimizer, and the state that, with the parameters, makes a run resumable."""
    model = models.build(cfg["prior"], cfg["prior_components"], cfg["likelihood"],
                         cfg["decoder_sigma"], n_in=x_train.shape[1], hidden=cfg["hidden"],
                         latent=cfg["latent"], seed=cfg["seed"], layers=cfg["layers"],
                         activation=cfg["activation"], objective=cfg["objective"],
                         samples=cfg["samples"])
    cfg["prior_components"] = models.components_of(model) or None
    if cfg["prior"] == "vamp":
        # The pseudo-inputs start as K random training images plus N(0, 0.01^2) noise, as in the
        # paper.
        rng = np.random.default_rng([cfg["seed"], 6])
        w = model.prior["w"]
        images = x_train[rng.choice(len(x_train), len(w), replace=False)]
        w[...] = mnist.to_float(images) + 0.01 * rng.standard_normal(w.shape)
    state = {"epoch": 0, "step": 0, "perm": None, "rng": np.random.default_rng(cfg["seed"]),
             "elapsed": 0.0, "sums": None, "path_sums": None}
    for name in EPOCH_RECORDS:
        state[name] = []
    state["gradient_paths"] = {name: [] for name in PATHS}
    state["gradient_paths_per_unit"] = {name: [] for name in PATHS}
    return model, Adam(model.params(), lr=cfg["lr"], eps=cfg["adam_eps"]), state


def learning_rate(cfg, epoch):
    """The learning rate of an epoch (counted from 0): --lr, or with --lr-schedule burda (Burda et
    al. 2016, section 5) --lr * 10^(-i/7) for the 3^i epochs of stage i = 0..7, after the
    1 + 3 + ... + 3^(i-1) epochs of the stages before it."""
    if cfg["lr_schedule"] == "constant":
        return cfg["lr"]
    stage = 0
    stage_end = 1                       # the epochs of stages 0..stage: (3^(stage+1) - 1) / 2
    while epoch >= stage_end and stage < 7:
        stage += 1
        stage_end += 3 ** stage
    return cfg["lr"] * 10 ** (-stage / 7)

def batch(x_train, perm, step, cfg, rng, latent):
    """The step-th batch of the epoch's order and its eps: train.py's batch, or with --binarize
    pixels drawn afresh as Bernoulli(intensity), with --dequantize spread afresh over their bins
    (the same draws in the same order: the pixels' noise first, then eps)."""
    rows = perm[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]]
    samples = cfg["samples"]
    if not cfg["binarize"] and not cfg["dequantize"] and samples == 1:
        return train.batch(x_train, rows, rng, latent)
    images = x_train[rows]
    if cfg["binarize"]:
        images = mnist.binarize(images, rng)
    if cfg["dequantize"]:
        x = mnist.dequantize(images, rng)
    else:
        x = mnist.to_float(images)
    # k draws per image for iwae.py's bounds: (k, B, Z); one: (B, Z)
    eps = rng.standard_normal((samples, len(x), latent), dtype=np.float32)
    if samples == 1:
        eps = eps[0]
    return x, eps


def start_epoch(state, rng, n_images, latent):
    """A new epoch: a new order of the images, and new sums."""
    state["perm"] = rng.permutation(n_images)
    state["step"] = 0
    state["sums"] = {name: 0.0 for name in EPOCH_SUMS}
    state["path_sums"] = {}
    for name in PATHS:
        state["path_sums"][name] = {"sum": np.zeros(latent), "sum_sq": np.zeros(latent)}


def add_to_sums(state, model, loss, recon, kl, beta, batch_size):
    """Add a step's numbers to the epoch's sums (each batch mean times the batch's size), and its
    per-example gradient paths (B times the batch mean's) and their squares."""
    sums = state["sums"]
    sums["train_loss"] += loss * batch_size
    sums["train_recon"] += recon * batch_size
    sums["train_kl"] += kl * batch_size
    sums["train_objective"] += (recon + beta * kl) * batch_size
    sums["kl_weight"] += beta * batch_size
    for name in PATHS:
        g = model.paths[name] * batch_size
        state["path_sums"][name]["sum"] += g.sum(0)
        state["path_sums"][name]["sum_sq"] += (g * g).sum(0)


def end_epoch(state, model, n_images, seconds):
    """Record the epoch's means over its examples: the losses, and each gradient path's RMS. The
    optimal-sigma Gaussian sets the sigma it uses outside training from the epoch's error."""
    if models.decoder_sigma_of(model) == "optimal":
        model.likelihood.end_epoch()
    for name, total in state["sums"].items():
        state[name].append(float(total / n_images))
    for name, sums in state["path_sums"].items():
        mean = sums["sum"] / n_images
        mean_square = sums["sum_sq"] / n_images
        rms = np.sqrt(mean_square)
        state["gradient_paths"][name].append(float(np.sqrt(mean_square.mean())))   # over every unit
        state["gradient_paths_per_unit"][name].append({"mean": mean.tolist(), "rms": rms.tolist()})
    state["epoch_seconds"].append(seconds)
    state["epoch"] += 1
    state["perm"] = None
    state["elapsed"] = 0.0


# a diverging run overflows: the finite-loss check says so
@np.errstate(over="ignore", invalid="ignore")
def train_epoch(model, opt, x_train, state, cfg, stop, progress):
    """One pass over the shuffled training set, from state['step'] on (a resumed epoch continues
    mid-way). Returns False if a stop was requested (Ctrl-C) before the epoch finished."""
    rng = state["rng"]
    n_steps = math.ceil(len(x_train) / cfg["batch_size"])
    if state["perm"] is None:
        start_epoch(state, rng, len(x_train), model.latent)
    opt.lr = learning_rate(cfg, state["epoch"])
    t0 = time.perf_counter()
    for step in range(state["step"], n_steps):
        x, eps = batch(x_train, state["perm"], step, cfg, rng, model.latent)
        global_step = state["epoch"] * n_steps + step
        beta = train.kl_weight(cfg["beta"], cfg["kl_warmup"], global_step, n_steps)
        try:
            # forward, backward, an Adam step: train.py's
            loss, recon, kl = train.train_step(model, opt, x, eps, beta)
        except NonFiniteLoss as err:
            raise NonFiniteLoss(f"{err} at epoch {state['epoch'] + 1}, step {step + 1} (global "
                                f"step {global_step + 1})")
        state["step"] = step + 1
        add_to_sums(state, model, loss, recon, kl, beta, len(x))
        progress(state, n_steps, seen=min(state["step"] * cfg["batch_size"], len(x_train)))
        if stop["requested"]:
            state["elapsed"] += time.perf_counter() - t0
            return False
    end_epoch(state, model, len(x_train), state["elapsed"] + time.perf_counter() - t0)
    return True


def remedy(model, cfg):
    """What to try after a non-finite loss: a new run (a run continues with its own options)."""
    new_run = "in a new run (another --out, or --overwrite)"
    if models.decoder_sigma_of(model) == "per-pixel" and cfg["binarize"]:
        return (f"A sigma per pixel has no bounded likelihood on binary pixels: train it {new_run} "
                f"without --binarize and with --dequantize")
    if models.decoder_sigma_of(model) == "per-pixel" and not cfg["dequantize"]:
        return (f"A sigma per pixel has no bounded likelihood on pixels that are not dequantized: "
                f"as the mean closes on a pixel, sigma -> 0 sends -log p(x|z) to -infinity. Train "
                f"it {new_run} with --dequantize (in --likelihoods: gaussian:per-pixel+dequantize)")
    return f"Try a smaller --lr {new_run}"


def save_checkpoint(checkpoint, model, opt, state, cfg, replacing):
    """The epoch's checkpoint. replacing: {"folder": out} while an old run (--overwrite) is still
    in the folder, whose files go now, as the new run has something to put in their place; {}
    after. A full disk (or any failure to write) keeps the last checkpoint written, whole."""
    if replacing:
        runs.remove_run_files(replacing.pop("folder"), keep=("checkpoint.npz",))
    try:
        runs.save_checkpoint(checkpoint, model, opt, state, cfg)
    except OSError as err:
        raise runs.WriteError(f"could not write {checkpoint} ({err.strerror})")


def train_run(model, opt, x_train, x_test, state, cfg, checkpoint, resumed_from=None,
              replacing=None):
    """Epochs until cfg['epochs'], the test loss and a checkpoint after each (none if checkpoint is
    None). Ctrl-C (or SIGTERM, as `kill` sends) finishes the step in flight, saves a checkpoint and
    returns False; a second one stops at once. resumed_from: the checkpoint the run started from,
    if any; replacing: see save_checkpoint."""
    stop = {"requested": False}
    replacing = {} if replacing is None else replacing

    def on_stop(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    previous_sigint = signal.signal(signal.SIGINT, on_stop)
    previous_sigterm = signal.signal(signal.SIGTERM, on_stop)
    progress = console.TrainingProgress()
    try:
        while state["epoch"] < cfg["epochs"]:
            if train_epoch(model, opt, x_train, state, cfg, stop, progress):
                with np.errstate(over="ignore", invalid="ignore"):
                    loss, recon, kl = analysis.negative_elbo(model, x_test, cfg["seed"])
                if not np.isfinite(loss):
                    raise NonFiniteLoss(f"the test loss became {loss} after epoch "
                                        f"{state['epoch']}")
                state["test_loss_curve"].append(loss)
                if model.likelihood.name == "gaussian":
                    state["decoder_sigma_curve"].append(analysis.decoder_sigma(model, x_test))
                warming_up = state["epoch"] <= cfg["kl_warmup"]
                line = console.epoch_line(state, loss, recon, kl, len(x_train), warming_up)
                print(line, flush=True)
            if checkpoint:                      # after each epoch, and where Ctrl-C stopped one
                save_checkpoint(checkpoint, model, opt, state, cfg, replacing)
            if stop["requested"]:
                return False
    except NonFiniteLoss as err:
        if replacing:
            kept = f"the old run in {replacing['folder']} is as it was"
        elif os.path.exists(checkpoint or ""):
            kept = f"the last good checkpoint is {checkpoint}"
        elif resumed_from:
            kept = f"the last good checkpoint is {resumed_from}, which it started from"
        else:
            kept = "no checkpoint was written"
        raise NonFiniteLoss(f"{err}; stopped, {kept}. {remedy(model, cfg)}")
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
    return True
