"""Train the VAE on MNIST (or Fashion-MNIST) and write the model, metrics and figures.

    python train.py                       # the reference recipe: 784-400-20-400-784, Adam 1e-3, batch 128, 10 epochs
    python train.py --dataset fashion --data-dir /usr/share/datasets/fashion-mnist
    python train.py --resume runs/mnist-h400-z20-s0/checkpoint.npz --epochs 20
    python train.py --analyze runs/mnist-h400-z20-s0/model.npz     # measure and draw the latent space again
    python train.py --benchmark                                     # time training against the matmul floor
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import zipfile

import numpy as np

import analysis
import figures
import mnist
import vae
from autograd import Adam, matmul_floor

DEFAULTS = {"dataset": "mnist", "hidden": 400, "latent": 20, "prior": "standard", "prior_components": None,
            "batch_size": 128, "lr": 1e-3, "seed": 0}
ARCHITECTURE = ("hidden", "latent", "prior", "prior_components")   # of the training options, those of the model


class CheckpointError(Exception):
    """A model file that cannot be loaded: missing, corrupt, or of another architecture."""


class NonFiniteLoss(Exception):
    pass


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative_int(text):
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return int(text)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Training options default to None so that --resume can tell "not given" (take the checkpoint's) from
    # "given" (must agree with the checkpoint's); DEFAULTS holds the recipe.
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


# ---- the training loop -------------------------------------------------------------------------------------

def new_run(cfg, x_train):
    """The model, its optimizer, and everything that, with the parameters, makes a run resumable."""
    model = vae.VAE(x_train.shape[1], cfg["hidden"], cfg["latent"], seed=cfg["seed"], prior=cfg["prior"],
                    components=cfg["prior_components"])
    cfg["prior_components"] = model.components
    if cfg["prior"] == "vamp":  # pseudo-inputs start as K random training images + N(0, 0.01^2), as in the paper
        rng = np.random.default_rng([cfg["seed"], 6])
        u = model.prior.params["u"]
        u[...] = mnist.to_float(x_train[rng.choice(len(x_train), len(u), replace=False)]) + 0.01 * rng.standard_normal(u.shape)
    state = {"epoch": 0, "step": 0, "perm": None, "rng": np.random.default_rng(cfg["seed"]), "sums": np.zeros(3),
             "train_loss": [], "train_recon": [], "train_kl": [], "test_loss_curve": [], "epoch_seconds": [],
             "elapsed": 0.0}
    return model, Adam(model.params(), lr=cfg["lr"]), state


def batch(x_train, perm, step, batch_size, rng, latent):
    """The step-th batch of the epoch's order as float32 in [0, 1], and its eps ~ N(0, I)."""
    idx = perm[step * batch_size:(step + 1) * batch_size]
    return mnist.to_float(x_train[idx]), rng.standard_normal((len(idx), latent), dtype=np.float32)


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
    for key, value in zip(("train_loss", "train_recon", "train_kl"), state["sums"] / len(x_train)):
        state[key].append(float(value))
    state["epoch_seconds"].append(state["elapsed"])
    state["epoch"], state["perm"], state["elapsed"] = state["epoch"] + 1, None, 0.0
    return True


def progress_bar(state, n_steps, seen):
    """An in-epoch progress line, only when stderr is a terminal (logs stay one line per epoch)."""
    if sys.stderr.isatty() and (state["step"] % 10 == 0 or state["step"] == n_steps):
        done = state["step"] / n_steps
        sys.stderr.write(f"\r  epoch {state['epoch'] + 1} [{'#' * int(30 * done):<30}] {100 * done:3.0f}%  "
                         f"train loss {state['sums'][0] / seen:7.2f}")
        sys.stderr.write("\r" + " " * 72 + "\r" if state["step"] == n_steps else "")
        sys.stderr.flush()


# ---- files: each written whole, or not at all ----------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes. A crash or
    Ctrl-C mid-write leaves the previous file (or none), never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model, path, **extra):
    """One .npz: the architecture, every parameter, and any extra arrays (a training checkpoint's state)."""
    arrays = {"arch": np.array([model.n_in, model.hidden, model.latent]), "prior": np.array(model.prior_name),
              "components": np.array(model.components), **model.params(),
              **{"extra." + k: v for k, v in extra.items()}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_model(path):
    """(model, extra) from a file written by save_model(). Raises CheckpointError with a one-line reason."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable model file ({err}); delete it or train again")
    if "arch" not in arrays or arrays["arch"].shape != (3,):
        raise CheckpointError(f"{path}: no architecture record; not a model saved by this project")
    prior, components = str(arrays.get("prior", "standard")), int(arrays.get("components", 0))
    if prior not in vae.PRIORS:
        raise CheckpointError(f"{path}: unknown prior {prior!r}; not a model saved by this project")
    dtype = arrays["enc.0.W"].dtype if "enc.0.W" in arrays else np.float32
    model = vae.VAE(*(int(v) for v in arrays["arch"]), dtype=dtype, prior=prior, components=components)
    for name, p in model.params().items():
        if name not in arrays or arrays[name].shape != p.shape:
            raise CheckpointError(f"{path}: parameter {name} is missing or has the wrong shape; corrupt file")
        p[...] = arrays[name]
    return model, {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}


STATE_LISTS = ("epoch", "step", "elapsed", "train_loss", "train_recon", "train_kl", "test_loss_curve", "epoch_seconds")


def save_checkpoint(path, model, opt, state, cfg):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    extra = {"cfg": np.array(json.dumps(cfg)), "adam_t": np.array(opt.t),
             "rng": np.array(json.dumps(state["rng"].bit_generator.state)),
             "scalars": np.array(json.dumps({k: state[k] for k in STATE_LISTS})),
             "sums": state["sums"], "perm": state["perm"] if state["perm"] is not None else np.zeros(0, int),
             **{f"adam_m.{k}": v for k, v in opt.m.items()}, **{f"adam_v.{k}": v for k, v in opt.v.items()}}
    save_model(model, path, **extra)


def load_checkpoint(path, args):
    """(model, opt, state, cfg) from a checkpoint; options given on the command line must agree with it."""
    model, extra = load_model(path)
    try:
        cfg, scalars = json.loads(str(extra["cfg"])), json.loads(str(extra["scalars"]))
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(extra["rng"]))
        opt = Adam(model.params(), lr=cfg["lr"])
        opt.t = int(extra["adam_t"])
        for k in opt.m:
            opt.m[k][...], opt.v[k][...] = extra[f"adam_m.{k}"], extra[f"adam_v.{k}"]
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a training checkpoint or corrupt ({err}); use model.npz files for "
                              f"inference only, or start a new run")
    cfg = {**DEFAULTS, **cfg}
    for k in DEFAULTS:
        given = getattr(args, k)
        if given is not None and given != cfg[k]:
            what = "of another architecture" if k in ARCHITECTURE else "from another run"
            raise CheckpointError(f"{path}: checkpoint is {what}: it has --{k.replace('_', '-')} {cfg[k]}, "
                                  f"you asked for {given}; drop the flag or start a new run")
    state = {**scalars, "rng": rng, "sums": extra["sums"], "perm": extra["perm"] if extra["perm"].size else None}
    return model, opt, state, cfg


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_figures(out, figs):
    for name, fig in figs.items():
        with atomic_path(os.path.join(out, name)) as tmp:
            fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")


# ---- benchmark ---------------------------------------------------------------------------------------------

def benchmark(model, opt, x_train, state, cfg, epochs):
    """Train `epochs` epochs as a run does and print where the time goes. Nothing is written to disk."""
    import resource
    n_steps = math.ceil(len(x_train) / cfg["batch_size"])
    print(f"benchmark: {epochs} epochs, {len(x_train)} images, batch {cfg['batch_size']}, {model.dtype}, "
          f"{os.cpu_count()} cores, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    for _ in range(epochs):
        train_epoch(model, opt, x_train, state, cfg["batch_size"], {"requested": False}, lambda *a, **k: None)
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
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            phases[name].append(dt)
    floor_s, flops = matmul_floor([model.encoder, model.decoder], cfg["batch_size"], model.dtype)
    print(f"median epoch {epoch_s:.3f} s = {len(x_train) / epoch_s:,.0f} examples/s")
    print(f"per step (median of {len(phases['adam'])}): " + ", ".join(f"{k} {1e3 * np.median(v):.3f} ms"
                                                                    for k, v in phases.items()))
    print(f"matrix products alone (same shapes, this run): {1e3 * floor_s:.3f} ms/step = {floor_s * n_steps:.3f} "
          f"s/epoch, {flops * n_steps / 1e9:.0f} GFLOP/epoch at {flops / floor_s / 1e9:.0f} GFLOP/s")
    print(f"epoch / floor = {epoch_s / (floor_s * n_steps):.2f}; outside the matrix products: "
          f"{epoch_s - floor_s * n_steps:.3f} s/epoch (elementwise work, optimizer, batching)")
    print(f"peak memory (max RSS of this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


# ---- main --------------------------------------------------------------------------------------------------

def run(args):
    """Train (a new run, or --resume), or only measure a saved model (--analyze); then measure and draw."""
    metrics = {}
    if args.analyze:
        model, _ = load_model(args.analyze)
        out = args.out or os.path.dirname(args.analyze) or "."
        metrics = read_metrics(os.path.join(out, "metrics.json"))
        cfg = {**DEFAULTS, **metrics.get("config", {}), **{k: getattr(args, k) for k in ("dataset", "seed")
                                                            if getattr(args, k) is not None}}
    elif args.resume:
        model, opt, state, cfg = load_checkpoint(args.resume, args)
        out = args.out or os.path.dirname(args.resume) or "."
    else:
        cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
        out = args.out or os.path.join("runs", f"{cfg['dataset']}-h{cfg['hidden']}-z{cfg['latent']}-s{cfg['seed']}"
                                       + ("" if cfg["prior"] == "standard" else f"-{cfg['prior']}"))
    x_train, _, x_test, y_test = mnist.load(cfg["dataset"], args.data_dir, args.mirror)
    if args.posterior_image >= len(x_test):                         # checked before training, not after it
        raise mnist.DataError(f"--posterior-image {args.posterior_image} is out of range: the test set has "
                              f"{len(x_test)} images")
    if args.analyze and x_train.shape[1] != model.n_in:
        raise CheckpointError(f"{args.analyze}: the model takes {model.n_in} inputs, {cfg['dataset']} has "
                              f"{x_train.shape[1]}")
    if not (args.analyze or args.resume):
        model, opt, state = new_run(cfg, x_train)
    if args.benchmark:
        return benchmark(model, opt, x_train, state, cfg, 3 if args.epochs is None else args.epochs)
    if not args.analyze:
        cfg["epochs"] = args.epochs = 10 if args.epochs is None else args.epochs
        if not train(model, opt, x_train, x_test, state, cfg, out, args):
            return 130
        metrics = finish(model, x_train, x_test, state, cfg, out)
    found_metrics, found = analysis.analyze(model, x_train, x_test, cfg["seed"], args.iw_samples, args.gmm_components,
                                            args.gmm_covariance, log=lambda msg: print(msg, flush=True))
    os.makedirs(out, exist_ok=True)
    save_figures(out, figures.analysis_figures(model, x_test, y_test, found, args.posterior_image, cfg["seed"]))
    write_json(os.path.join(out, "metrics.json"), {**metrics, **found_metrics})
    print(f"wrote {'' if args.analyze else 'model.npz, '}metrics.json and figures to {out}")
    return 0


def train(model, opt, x_train, x_test, state, cfg, out, args):
    """Epochs until cfg['epochs'], a checkpoint after each. Ctrl-C finishes the step in flight, saves a checkpoint
    and returns False; a second Ctrl-C stops at once."""
    checkpoint = os.path.join(out, "checkpoint.npz")
    print(f"{cfg['dataset']}: {len(x_train)} train, {len(x_test)} test images; VAE {model.n_in}-{cfg['hidden']}-"
          f"{cfg['latent']}-{cfg['hidden']}-{model.n_in}, {figures.prior_label(model)} prior, Adam lr {cfg['lr']}, "
          f"batch {cfg['batch_size']}; writing to {out}"
          + (f" (resuming at epoch {state['epoch'] + 1}, step {state['step']})" if args.resume else ""))
    stop = {"requested": False}
    def on_sigint(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while state["epoch"] < cfg["epochs"]:
            if not train_epoch(model, opt, x_train, state, cfg["batch_size"], stop, progress_bar):
                save_checkpoint(checkpoint, model, opt, state, cfg)
                print(f"\ninterrupted: saved {checkpoint} at epoch {state['epoch'] + 1}, step {state['step']}; "
                      f"continue with: python train.py --resume {checkpoint}"
                      + (f" --data-dir {args.data_dir}" if args.data_dir else "")
                      + (f" --epochs {args.epochs}" if args.epochs != 10 else ""))
                return False
            test = analysis.negative_elbo(model, x_test, cfg["seed"])
            state["test_loss_curve"].append(float(test[0]))
            save_checkpoint(checkpoint, model, opt, state, cfg)
            print(f"epoch {state['epoch']:3d}  train {state['train_loss'][-1]:8.2f}  test {test[0]:8.2f} "
                  f"(recon {test[1]:7.2f} + kl {test[2]:6.2f})  {len(x_train) / state['epoch_seconds'][-1]:7.0f} "
                  f"ex/s  {state['epoch_seconds'][-1]:5.2f} s", flush=True)
    except NonFiniteLoss as err:
        kept = f"the last good checkpoint is {checkpoint}" if os.path.exists(checkpoint) else "no checkpoint was written"
        raise NonFiniteLoss(f"{err}; stopped, {kept}. Try a smaller --lr")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return True


def finish(model, x_train, x_test, state, cfg, out):
    """After the last epoch: the model, its first figures, and the training metrics."""
    loss, recon, kl = analysis.negative_elbo(model, x_test, cfg["seed"])
    print(f"test negative ELBO {loss:.2f} nats (recon {recon:.2f} + kl {kl:.2f})")
    os.makedirs(out, exist_ok=True)
    save_model(model, os.path.join(out, "model.npz"))
    save_figures(out, figures.run_figures(model, x_test, state["train_loss"], state["test_loss_curve"], cfg["seed"]))
    return {"config": cfg, **{k: state[k] for k in STATE_LISTS[3:]}, "test_loss": loss, "test_recon": recon,
            "test_kl": kl, "examples_per_second": len(x_train) * len(state["epoch_seconds"])
            / max(sum(state["epoch_seconds"]), 1e-9)}


def read_metrics(path):
    """The metrics.json at path ({} if none), so that --analyze merges into it."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); move it away or pass --out")


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (mnist.DataError, CheckpointError, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # outside the training loop (download, analysis): every file is whole or absent
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
