"""The lines a run prints: its first line, progress while it trains and measures, a line per epoch,
and the line an interruption ends with. On a terminal, progress redraws one line; in a log (no
terminal) it is a line every LOG_EVERY seconds, so that a log shows where a long run is.
"""
import sys
import time

from lab.models import likelihood_label, prior_label

LOG_EVERY = 10.0        # seconds between progress lines in a log


class Progress:
    """Reports the fraction done of one piece of work named `what`: show(fraction)."""

    def __init__(self, what, stream=None, every=LOG_EVERY):
        self.what = what
        self.stream = stream or sys.stderr
        self.every = every
        self.start = time.perf_counter()
        self.last_line = self.start

    def show(self, fraction, detail=""):
        now = time.perf_counter()
        if self.stream.isatty():
            text = f"\r  {self.what}: {100 * fraction:3.0f}% {detail}"
            self.stream.write(text)
            if fraction >= 1:
                self.stream.write("\r" + " " * len(text) + "\r")
        elif now - self.last_line >= self.every and 0 < fraction < 1:
            elapsed = now - self.start
            left = elapsed / fraction * (1 - fraction)          # at the rate so far
            line = (f"  {self.what}: {100 * fraction:.0f}% after {elapsed:.0f} s, "
                    f"about {left:.0f} s left {detail}")
            self.stream.write(line.rstrip() + "\n")
            self.last_line = now
        self.stream.flush()


def progress_line(what):
    """For a long measurement: a function of the fraction done (analysis.analyze's progress)."""
    return Progress(what).show


class TrainingProgress:
    """While a run trains: an in-epoch bar on a terminal, a line every LOG_EVERY seconds in a log.
    """

    def __init__(self):
        self.progress = None

    def __call__(self, state, n_steps, seen):
        if state["step"] == 1 or self.progress is None:
            self.progress = Progress(f"epoch {state['epoch'] + 1}")
        if state["step"] % 10 != 0 and state["step"] != n_steps:
            return
        done = state["step"] / n_steps
        train_loss = state["sums"]["train_loss"] / seen
        bar = "#" * int(30 * done)
        self.progress.show(done, f"[{bar:<30}] train loss {train_loss:7.2f}")


def run_header(cfg, model, state, n_train, n_test, out):
    """The line a run starts with: the data, the model, the recipe, and what it will train."""
    start = state["epoch"] + 1
    if start <= cfg["epochs"]:
        plan = f"training epochs {start}-{cfg['epochs']}"
        if state["perm"] is not None:
            plan += f" (epoch {start} from step {state['step'] + 1})"
    else:
        plan = "no training (--epochs 0)"
    data = cfg["dataset"]
    if cfg["binarize"]:
        data += " (binarized)"
    if cfg["dequantize"]:
        data += " (dequantized)"
    hidden = "-".join([str(cfg["hidden"])] * cfg["layers"])
    sizes = f"{model.n_in}-{hidden}-{cfg['latent']}-{hidden}-{model.n_in}"
    if cfg["activation"] != "relu":
        sizes += f" ({cfg['activation']})"
    if cfg["objective"] == "iwae" or cfg["samples"] > 1:
        sizes += f", {cfg['objective']} with k = {cfg['samples']} draws"
    return (f"{data}: {n_train} train, {n_test} test images; VAE {sizes}, "
            f"{prior_label(model)} prior, {likelihood_label(model)} likelihood, "
            f"beta {cfg['beta']:g} (warm-up: {cfg['kl_warmup']} epochs), Adam lr {cfg['lr']}, "
            f"batch {cfg['batch_size']}; {plan}; writing to {out}")


def interrupted_line(state, command):
    """The line Ctrl-C ends a run with: where it stopped, and the command that continues it."""
    if state["perm"] is not None:
        where = f"at epoch {state['epoch'] + 1}, step {state['step']}"
    else:
        where = f"after epoch {state['epoch']}"
    return f"\ninterrupted {where}; continue with: {command}"


def epoch_line(state, loss, recon, kl, n_train, warming_up=False):
    """The line each epoch ends with: its mean training loss, the test loss, the KL weight (during a
    warm-up, its mean over the epoch, said so), the speed."""
    seconds = state["epoch_seconds"][-1]
    train = state["train_loss"][-1]
    beta = f"beta {state['kl_weight'][-1]:.3g}"
    if warming_up:
        beta = f"mean beta {state['kl_weight'][-1]:.3g} (warm-up)"
    line = (f"epoch {state['epoch']:3d}  train {train:8.2f}  test {loss:8.2f} "
            f"(recon {recon:7.2f} + kl {kl:6.2f})  {beta}  "
            f"{n_train / seconds:7.0f} ex/s  {seconds:5.2f} s")
    sigmas = state["decoder_sigma_curve"]
    if len(sigmas) == state["epoch"]:       # a Gaussian decoder's, at this epoch's end
        line += "  " + sigma_text(sigmas[-1])
    return line


def sigma_text(sigma):
    """A Gaussian decoder's sigma (analysis.decoder_sigma) in a few words."""
    if "sigma" in sigma:
        return f"sigma {sigma['sigma']:.4g}"
    return (f"sigma per pixel {sigma['smallest']:.2g} to {sigma['largest']:.2g} "
            f"(median {sigma['median']:.2g})")
