"""The lab's command: train a run (resumable, measured and drawn), --analyze a saved model again,
run an experiment (--betas, --likelihoods), or --benchmark. Every check that needs no data comes
before any download or training; every run trains with train.py's step (lab/training.py).

    python -m lab                             # the recipe: 784-400-20-400-784, 10 epochs
    python -m lab --resume runs/mnist-h400-z20-s0/checkpoint.npz
    python -m lab --analyze runs/mnist-h400-z20-s0/model.npz     # measure and draw again
    python -m lab --betas 0 0.1 0.3 1 3       # the KL-weight experiment: a run per beta
    python -m lab --likelihoods               # the likelihood experiment: a run per p(x|z)
    python -m lab --benchmark                 # time training against the matmul floor
"""
import argparse
import os
import sys

import numpy as np

import mnist
from train import NonFiniteLoss

from lab import analysis
from lab import console
from lab import figures
from lab import models
from lab import report
from lab import resources
from lab import runs
from lab import speed
from lab.options import (ARCHITECTURE, DEFAULTS, LIKELIHOOD_RUNS, MEASURE_DEFAULTS, RecordError,
                         UsageError, check_record, command_text, likelihood_run, parse_args)
from lab.training import EPOCH_RECORDS, batch, new_run, save_checkpoint, train_run

# ---- the command ---------------------------------------------------------------------------------

def prepare_config(args):
    """A new run's training options: the recipe's, unless given on the command line."""
    cfg = dict(DEFAULTS)
    for k in DEFAULTS:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if cfg["likelihood"] == "gaussian" and not cfg["decoder_sigma"]:
        cfg["decoder_sigma"] = "learned"
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    elif args.benchmark:
        cfg["epochs"] = 3
    else:
        cfg["epochs"] = 10
    return cfg


def resume_config(args, path, state, saved):
    """A resumed run's options: the checkpoint's; a flag that differs from them is refused."""
    # a checkpoint from before an option was added has its default
    cfg = {**DEFAULTS, **saved}
    for k in DEFAULTS:
        asked = getattr(args, k)
        if asked is None or asked == cfg[k]:
            continue
        what = "of another architecture" if k in ARCHITECTURE else "from another run"
        flag = "--" + k.replace("_", "-")
        raise UsageError(f"{path}: checkpoint is {what}: it has {flag} {cfg[k]}, you asked for "
                         f"{asked}; drop the flag or start a new run")
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    else:
        cfg["epochs"] = cfg.get("epochs", 10)
    if cfg["epochs"] < state["epoch"]:
        raise UsageError(f"{path} is at epoch {state['epoch']}: --epochs {args.epochs} would train "
                         f"nothing; pass --epochs {state['epoch'] + 1} or more to train further")
    return cfg


def folder_of(path):
    """The folder a file is in ('.' for a bare name)."""
    return os.path.dirname(path) or "."


def same_folder(a, b):
    return os.path.abspath(a) == os.path.abspath(b)


def model_to_analyze(path):
    """--analyze takes a model.npz, or the folder of a finished run."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.npz")
        if not os.path.isfile(path):
            raise UsageError(f"--analyze {folder_of(path)}: that folder holds no model.npz; pass "
                             f"the model.npz of a finished run")
    if os.path.basename(path) == "checkpoint.npz":
        beside = os.path.join(folder_of(path), "model.npz")
        if os.path.isfile(beside):
            raise UsageError(f"--analyze {path}: that is a training checkpoint, not a model; the "
                             f"run's model is {beside}")
        raise UsageError(f"--analyze {path}: that is a training checkpoint, not a model; "
                         f"{command_text('--resume', path)} finishes its run (training and "
                         f"measurements)")
    return path


def checkpoint_to_resume(path):
    """--resume takes a checkpoint.npz, or the folder of a run."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
        if not os.path.isfile(path):
            raise UsageError(f"--resume {folder_of(path)}: that folder holds no checkpoint.npz")
    if os.path.basename(path) == "model.npz":
        beside = os.path.join(folder_of(path), "checkpoint.npz")
        if os.path.isfile(beside):
            raise UsageError(f"--resume {path}: that is a model, not a training checkpoint; the "
                             f"run's checkpoint is {beside}")
    return path


def check_target(args, path, state, own_target):
    """--epochs below the target a run was started with would end it early in a folder named
    for the longer run: refused."""
    if args.epochs is not None and state["epoch"] < own_target and args.epochs < own_target:
        raise UsageError(f"{path}: the run was started for {own_target} epochs; --epochs "
                         f"{args.epochs} would end it early, in a folder named for "
                         f"{own_target}: resume it without --epochs, or start a new run")


def output_folder(args, cfg, path, state, extends):
    """(out, fresh): where the run writes, and whether that folder must not hold another run.
    A resumed run writes beside its checkpoint, unless it extends a finished run: then into a new
    folder named for its epochs, or into the old one only with --out naming it and --overwrite."""
    if args.resume and not extends and args.overwrite:
        raise UsageError("--resume and --overwrite do not go together: a run continues with its "
                         "own files (--overwrite only replaces a finished run extended to more "
                         "epochs in its own folder)")
    if extends:
        out = args.out or runs.default_out(cfg, DEFAULTS)
        old = folder_of(path)
        if same_folder(out, old) and not args.overwrite:
            new_folder = runs.default_out(cfg, DEFAULTS)
            raise UsageError(f"{old} holds a finished {state['epoch']}-epoch run: training it to "
                             f"{cfg['epochs']} epochs would replace it; drop --out to extend it "
                             f"into {new_folder}, or add --overwrite to replace it")
        return out, True
    if args.out:
        out = args.out
    elif path:
        out = folder_of(path)
    else:
        out = runs.default_out(cfg, DEFAULTS)
    fresh = not path or not same_folder(out, folder_of(path))
    return out, fresh


def settle_measurements(args, cfg):
    """The measurement options: as given, else as the run recorded them, else the defaults; set on
    args (which the measurements read) and recorded in cfg["measure"]."""
    recorded = cfg.get("measure", {})
    args.measure_given = [k for k in MEASURE_DEFAULTS if getattr(args, k) is not None]
    for k, default in MEASURE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, recorded.get(k, default))
    cfg["measure"] = {k: getattr(args, k) for k in MEASURE_DEFAULTS}


def check_not_in_data(out, args, cfg):
    """A run's files never go among the data set's archives."""
    data_dir = args.data_dir or os.path.join("data", cfg["dataset"])
    out_path = os.path.abspath(out)
    data_path = os.path.abspath(data_dir)
    if out_path == data_path or out_path.startswith(data_path + os.sep):
        raise UsageError(f"--out {out} is inside the data folder {data_dir}: a run's files do not "
                         f"go among the archives; choose another --out")


def check_resources(args, cfg, model):
    """Refuse, before any work, a run whose arrays would not fit in this machine's memory."""
    if model is not None:
        components = models.components_of(model)
    elif cfg["prior"] == "standard":
        components = 0
    else:
        components = cfg["prior_components"] or models.DEFAULT_COMPONENTS[cfg["prior"]]
    parts = resources.estimate(cfg, 784, components, args.iw_samples, args.gmm_components)
    reason = resources.check_memory(parts, resources.available_bytes())
    if reason:
        raise UsageError(reason)


def architecture_of(model, recorded, where):
    """The options that a model file fixes (its sizes, prior and likelihood), as a run records them.
    A record that says otherwise contradicts the model it sits beside: refused."""
    described = models.describe(model)
    arch = {"hidden": described["hidden"], "latent": described["latent"],
            "prior": described["prior"], "prior_components": described["components"] or None,
            "likelihood": described["likelihood"], "decoder_sigma": described["decoder_sigma"]}
    for k, value in arch.items():
        if k in recorded and recorded[k] != value:
            raise UsageError(f"{where} says {k} {recorded[k]}, but the model beside it has "
                             f"{value}: the record is of another run; move it away")
    return arch


def analyze_config(args):
    """--analyze: (the model's path, the model, the run's options), which come from the
    metrics.json beside the model; --dataset, --seed and --binarize may change them, but another
    dataset never into the run's own folder, whose measurements it would replace."""
    path = model_to_analyze(args.analyze)
    args.analyze = path
    model, _ = runs.load_model(path)
    metrics_path = os.path.join(folder_of(path), "metrics.json")
    recorded = runs.read_metrics(metrics_path)
    beside = check_record(recorded.get("config", {}), metrics_path, "config.")
    checkpoint = os.path.join(folder_of(path), "checkpoint.npz")
    if not beside and os.path.isfile(checkpoint):
        raise UsageError(f"--analyze {path}: the run's measurements never finished (no "
                         f"metrics.json beside it); {command_text('--resume', checkpoint)} "
                         f"finishes them with the run's own options")
    cfg = {**DEFAULTS, **beside, **architecture_of(model, beside, metrics_path)}
    trained_on = beside.get("dataset")
    into_its_folder = not args.out or same_folder(args.out, folder_of(path))
    if trained_on and args.dataset and args.dataset != trained_on and into_its_folder:
        raise UsageError(f"--analyze {path}: the run was trained on "
                         f"{mnist.TITLES[trained_on]}; measuring it on "
                         f"{mnist.TITLES[args.dataset]} would replace its own measurements: "
                         f"add --out NEW_FOLDER")
    for k in ("dataset", "seed", "binarize"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    return path, model, cfg


def prepare(args):
    """(cfg, model, opt, state, out, fresh) from the options and files alone: every check that needs
    no data, before any download or training. model is None for a new run; fresh: the output folder
    must not hold another run."""
    model = None
    opt = None
    state = None
    extends = False
    path = args.analyze or args.resume
    if args.analyze:
        path, model, cfg = analyze_config(args)
    # the epoch target it was started with, unless --epochs is given
    elif args.resume:
        path = checkpoint_to_resume(path)
        args.resume = path
        model, opt, state, saved = runs.load_checkpoint(path)
        for name in EPOCH_RECORDS:      # a checkpoint from before a record was added has none
            state.setdefault(name, [])
        cfg = resume_config(args, path, state, saved)
        own_target = saved.get("epochs", 10)
        check_target(args, path, state, own_target)
        finished = state["epoch"] >= own_target and runs.is_complete(folder_of(path))
        extends = finished and cfg["epochs"] > state["epoch"]
    else:
        cfg = prepare_config(args)
    if not args.analyze and cfg["kl_warmup"] > cfg["epochs"]:
        raise UsageError(f"--kl-warmup {cfg['kl_warmup']} is longer than the {cfg['epochs']} "
                         f"epochs: the KL weight would never reach beta; shorten the warm-up or "
                         f"train longer")
    settle_measurements(args, cfg)
    check_resources(args, cfg, model)
    out, fresh = output_folder(args, cfg, path, state, extends)
    if extends and same_folder(out, folder_of(path)):
        print(f"{path}: its run finished at epoch {state['epoch']}; training it on to epoch "
              f"{cfg['epochs']} in its own folder, replacing it (--overwrite)")
    elif extends:
        print(f"{path}: its run finished at epoch {state['epoch']}; training it on to epoch "
              f"{cfg['epochs']} in {out} ({folder_of(path)} stays as it is)")
    if not args.benchmark:
        check_not_in_data(out, args, cfg)
        runs.check_out(out, fresh, args.overwrite)
    return cfg, model, opt, state, out, fresh


def check_against_data(args, cfg, model, x_train, x_test):
    """The options that the data set bounds, checked before training."""
    n_train = cfg["train_images"] or len(x_train)
    trained_on = f"the training set has {len(x_train)} images"
    if cfg["train_images"]:
        trained_on = f"--train-images keeps {n_train} of them"
    codes = min(n_train, analysis.FITTED_CODES)
    vamp_components = 0
    if cfg["prior"] == "vamp":
        vamp_components = cfg["prior_components"] or models.DEFAULT_COMPONENTS["vamp"]
    limits = [
        ("--posterior-image", args.posterior_image, len(x_test) - 1,
         f"the test set has {len(x_test)} images"),
        ("--train-images", n_train, len(x_train), f"the training set has {len(x_train)} images"),
        ("--batch-size", cfg["batch_size"], n_train, trained_on),
        ("--gmm-components", args.gmm_components, codes, f"the mixture is fitted to {codes} codes"),
        ("--prior-components", vamp_components, n_train,
         f"a VampPrior starts from that many of the {n_train} training images"),
    ]
    for flag, value, limit, why in limits:
        if value > limit:
            raise UsageError(f"{flag} {value} is out of range: {why}; pass {flag} {limit} or "
                             f"less")
    latent = cfg["latent"]
    needed = analysis.codes_needed(args.gmm_components, args.gmm_covariance, latent)
    if codes < needed:
        raise UsageError(f"the holes of q(z) are measured by a mixture of {args.gmm_components} "
                         f"{args.gmm_covariance}-covariance Gaussians in {latent} dimensions, "
                         f"fitted to {codes} training codes: it needs at least {needed}; train on "
                         f"more images (--train-images) or pass fewer --gmm-components")
    if model is not None and x_train.shape[1] != model.n_in:
        raise UsageError(f"{args.analyze or args.resume}: the model takes {model.n_in} inputs, not "
                         f"{x_train.shape[1]}")


def load_data(args, cfg, model):
    """The data set, and the checks that need it (still before training)."""
    x_train, _, x_test, y_test = mnist.load(cfg["dataset"], args.data_dir, args.mirror)
    check_against_data(args, cfg, model, x_train, x_test)
    if cfg["train_images"]:
        x_train = x_train[:cfg["train_images"]]
    # the test set once; the training set anew in every batch
    if cfg["binarize"]:
        x_test = mnist.binarize(x_test, np.random.default_rng(mnist.TEST_BINARIZATION_SEED))
    if cfg["dequantize"]:
        x_test = mnist.dequantize(x_test, np.random.default_rng(mnist.TEST_DEQUANTIZATION_SEED))
    return x_train, x_test, y_test


def benchmark(model, opt, state, cfg, x_train, x_test, args):
    """--benchmark: train a few epochs (writing nothing), then time a step's phases and the
    analysis."""
    if not train_run(model, opt, x_train, x_test, state, cfg, checkpoint=None):
        print("\ninterrupted: no timings (--benchmark writes nothing)")
        return 130
    perm = state["rng"].permutation(len(x_train))

    def make_batch(step):
        return batch(x_train, perm, step, cfg, state["rng"], model.latent)

    speed.speed(model, opt, make_batch, x_train, x_test, cfg, state, args)
    return 0


def continue_command(args, checkpoint):
    """The command that finishes an interrupted run: the experiment's own command for a run of an
    experiment, else --resume of its checkpoint."""
    if getattr(args, "experiment_command", None):
        return args.experiment_command
    words = ["--resume", checkpoint]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    return command_text(*words)


def data_flags(args, cfg):
    """The options that point a printed command at this run's data: --dataset if not MNIST, and
    --data-dir if given."""
    flags = []
    if cfg["dataset"] != DEFAULTS["dataset"]:
        flags += ["--dataset", cfg["dataset"]]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    return flags


def finish(model, state, cfg, x_train, x_test, y_test, out, args):
    """After training: the test loss, model.npz, the run's figures, then the measurements and their
    figures; metrics.json, written last, marks the run complete."""
    loss, recon, kl = analysis.negative_elbo(model, x_test, cfg["seed"])   # beta = 1: the -ELBO
    print(f"test negative ELBO {loss:.2f} nats (recon {recon:.2f} + kl {kl:.2f})")
    runs.save_model(model, os.path.join(out, "model.npz"))
    figures.save(out, figures.run_figures(model, x_test, state, cfg["seed"]))
    metrics = {"config": cfg}
    for name in EPOCH_RECORDS:
        metrics[name] = state[name]
    metrics["gradient_paths"] = state["gradient_paths"]
    metrics["gradient_paths_per_unit"] = state["gradient_paths_per_unit"]
    metrics["test_loss"] = loss
    metrics["test_recon"] = recon
    metrics["test_kl"] = kl
    # none for a run that trained no epoch (--epochs 0)
    metrics["examples_per_second"] = None
    if state["epoch_seconds"]:
        metrics["examples_per_second"] = len(x_train) / np.mean(state["epoch_seconds"])
    return report.measure_and_draw(model, metrics, cfg, x_train, x_test, y_test, out, args)


def finished_result(out, args):
    """A complete run's result, read from its folder (for an experiment's comparison)."""
    model, _ = runs.load_model(os.path.join(out, "model.npz"))
    metrics_path = os.path.join(out, "metrics.json")
    metrics = runs.read_metrics(metrics_path)
    cfg = {**DEFAULTS, **check_record(metrics.get("config", {}), metrics_path, "config.")}
    metrics["config"] = cfg
    _, x_test, y_test = load_data(args, cfg, model)
    return {"model": model, "metrics": metrics, "x_test": x_test, "y_test": y_test}


def kept_and_next(args, checkpoint):
    """After a file could not be written: what is safe, and the command that goes on once there is
    room again."""
    if not os.path.exists(checkpoint):
        return "no checkpoint was kept: free some space (or choose another --out) and train again"
    return (f"the last good checkpoint, {checkpoint}, is whole: free some space, then go on with: "
            f"{continue_command(args, checkpoint)}")


def analyze(model, cfg, x_train, x_test, y_test, out, args):
    """--analyze: measure and draw a saved model again, into out (beside it, or --out), starting
    from the record of its run (the metrics.json beside the model)."""
    metrics_path = os.path.join(folder_of(args.analyze), "metrics.json")
    recorded = runs.read_metrics(metrics_path)
    before = recorded.get("config", {}).get("measure")
    if before and before != cfg["measure"]:
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in cfg["measure"].items()
                   if before.get(k) != v]
        print(f"--analyze: measuring with {', '.join(changed)}; the measurements that "
              f"{os.path.join(out, 'metrics.json')} holds are replaced")
    recorded["config"] = cfg
    return report.measure_and_draw(model, recorded, cfg, x_train, x_test, y_test, out, args)


def run(args):
    """Train a new run (or --resume one), or take a saved model (--analyze); then measure it and
    draw it. Returns (exit code, {"model", "metrics", "x_test", "y_test"} of a finished run)."""
    cfg, model, opt, state, out, fresh = prepare(args)
    checkpoint = os.path.join(out, "checkpoint.npz")
    trained = args.resume and state["epoch"] >= cfg["epochs"]
    if trained and runs.is_complete(out):
        print(f"{args.resume}: the run is finished, at epoch {state['epoch']} of {cfg['epochs']} "
              f"with its measurements in {out}: nothing to do; --epochs {state['epoch'] + 1} or "
              f"more trains it on, into a new folder")
        if args.measure_given:
            flags = []
            for k in args.measure_given:
                flags += ["--" + k.replace("_", "-"), str(getattr(args, k))]
            data = data_flags(args, cfg)
            again = command_text("--analyze", os.path.join(out, "model.npz"), *data, *flags)
            print(f"--resume does not measure a finished run again; to measure it with "
                  f"{' '.join(flags)}: {again}")
        return 0, None
    x_train, x_test, y_test = load_data(args, cfg, model)
    if model is None:
        model, opt, state = new_run(cfg, x_train)
    if args.benchmark:
        return benchmark(model, opt, state, cfg, x_train, x_test, args), None
    # --overwrite: the old run's files go when the new run writes its first checkpoint
    replacing = {}
    if fresh and args.overwrite:
        replacing["folder"] = out
    with runs.claim(out, fresh, args.overwrite):
        if args.analyze:
            return 0, analyze(model, cfg, x_train, x_test, y_test, out, args)
        if trained:
            print(f"{args.resume}: training is done (epoch {state['epoch']} of {cfg['epochs']}); "
                  f"finishing its measurements in {out}")
        else:
            print(console.run_header(cfg, model, state, len(x_train), len(x_test), out))
            try:
                finished = train_run(model, opt, x_train, x_test, state, cfg, checkpoint,
                                     args.resume, replacing)
            except runs.WriteError as err:
                raise runs.WriteError(f"{err}; {kept_and_next(args, checkpoint)}")
            if not finished:
                print(console.interrupted_line(state, continue_command(args, checkpoint)))
                return 130, None
        try:
            # --epochs 0 trains nothing, and has written no checkpoint yet
            if replacing or not os.path.exists(checkpoint):
                save_checkpoint(checkpoint, model, opt, state, cfg, replacing)
            return 0, finish(model, state, cfg, x_train, x_test, y_test, out, args)
        except KeyboardInterrupt:
            print(f"\ninterrupted after training, before the measurements were complete; finish "
                  f"them with: {continue_command(args, checkpoint)}", file=sys.stderr)
            return 130, None
        except OSError as err:
            written = err.filename or f"a file in {out}"
            raise runs.WriteError(f"could not write {written} ({err.strerror}); "
                                  f"{kept_and_next(args, checkpoint)}")
        except runs.WriteError as err:
            raise runs.WriteError(f"{err}; {kept_and_next(args, checkpoint)}")


def experiment_runs(args, out):
    """{name: options} of each run of --betas or --likelihoods, each in a folder of its own in
    out (options.run_keys has refused values that would share one)."""
    variants = {}
    if args.betas:
        for beta in args.betas:
            beta = beta + 0.0           # -0.0 is 0: the same run
            folder = os.path.join(out, f"beta-{beta:g}")
            variants[f"beta = {beta:g}"] = {"beta": beta, "out": folder}
    else:
        specs = args.likelihoods or [likelihood_run(spec) for spec in LIKELIHOOD_RUNS]
        for name, sigma, dequantize in specs:
            dequantize = dequantize or bool(args.dequantize)
            label = name
            folder = name
            if sigma:
                sigma_text = f"{sigma:g}" if isinstance(sigma, float) else sigma
                label += f", sigma {sigma_text}"
                folder += f"-sigma-{sigma_text}"
            if dequantize:
                label += ", dequantized"
                folder += "-dequantized"
            variants[label] = {"likelihood": name, "decoder_sigma": sigma,
                               "dequantize": dequantize, "out": os.path.join(out, folder)}
    return {name: argparse.Namespace(**{**vars(args), **v}) for name, v in variants.items()}


def reuse_or_resume(sub):
    """An experiment's run whose folder already holds its run (the same command, run before) is
    reused if finished, else continued from its checkpoint (interrupted, or trained but not yet
    measured). --overwrite trains every run anew."""
    checkpoint = os.path.join(sub.out, "checkpoint.npz")
    if sub.overwrite or not os.path.exists(checkpoint):
        return "new"
    sub.resume = checkpoint
    sub.out = None
    if runs.is_complete(folder_of(checkpoint)):
        return "finished"
    return "continued"


def continue_same_run(args):
    """A new run's command run again where its run was interrupted continues that run, as an
    experiment's does: a folder whose checkpoint holds these very options (and no --overwrite) is
    resumed, with a line. Any other run there is left for check_out to refuse."""
    new_run_only = args.resume or args.analyze or args.benchmark or args.overwrite
    if new_run_only:
        return
    cfg = prepare_config(args)
    out = args.out or runs.default_out(cfg, DEFAULTS)
    go_on_with(args, os.path.join(out, "checkpoint.npz"), cfg, "this run, interrupted or finished")


def go_on_with(args, checkpoint, cfg, what):
    """Resume checkpoint instead (args changed, with a line) if it holds a run of cfg's options."""
    if not os.path.isfile(checkpoint):
        return
    saved = checkpoint_options(checkpoint)
    if saved is None or not same_options(saved, cfg):
        return
    print(f"{folder_of(checkpoint)} holds {what}: going on with it, as "
          f"{command_text('--resume', checkpoint)} does")
    args.resume = checkpoint
    args.out = None


def same_options(saved, cfg):
    """Whether a checkpoint's options are cfg's: every training option and the epoch target."""
    saved = {**DEFAULTS, **saved}
    return all(saved.get(k) == cfg[k] for k in [*DEFAULTS, "epochs"])


def checkpoint_options(path):
    """The options a checkpoint holds, or None if it cannot be read."""
    try:
        _, _, _, saved = runs.load_checkpoint(path)
    except (runs.ModelFileError, RecordError):
        return None
    return saved


def continue_extension(args):
    """--resume CHECKPOINT --epochs N of a finished run, run again after the extension was
    interrupted: the extension's own checkpoint, in its new folder, is continued, with a line."""
    if not args.resume or args.epochs is None or args.overwrite:
        return
    path = checkpoint_to_resume(args.resume)
    saved = checkpoint_options(path)
    if saved is None:
        return
    cfg = {**DEFAULTS, **saved, "epochs": args.epochs}
    out = args.out or runs.default_out(cfg, DEFAULTS)
    if not same_folder(out, folder_of(path)):
        go_on_with(args, os.path.join(out, "checkpoint.npz"), cfg,
                   f"this extension of {path}, interrupted")


def check_comparison(out, names, overwrite):
    """The comparison is written anew from an experiment's runs (names): it may add runs to one an
    earlier experiment wrote in out, in any order, but never drop one of them (unless
    --overwrite)."""
    earlier = runs.compared_runs(os.path.join(out, "comparison.json"))
    dropped = [str(name) for name in earlier if name not in names]
    if dropped and not overwrite:
        raise UsageError(f"{out} holds another experiment's comparison.json, of runs this one "
                         f"does not train ({runs.few(dropped)}): choose another --out, or "
                         f"replace it with --overwrite")


def experiment(args):
    """--betas or --likelihoods: the same recipe and seed trained once per KL weight or likelihood,
    each run in its own folder <out>/beta-<BETA> or <out>/<SPEC>; then the table (printed, and
    comparison.json) and the figures. Run again with the same options, it reuses the finished runs,
    continues an interrupted one, and writes the comparison."""
    if args.out:
        out = args.out
    else:
        suffix = "-betas" if args.betas else "-likelihoods"
        out = runs.default_out(prepare_config(args), DEFAULTS) + suffix
    settle_measurements(args, {})
    every = experiment_runs(args, out)
    check_comparison(out, list(every), args.overwrite)
    # what belongs in the experiment's folder: its comparison and its runs' folders
    own = ["comparison.json"] + [os.path.basename(sub.out) for sub in every.values()]
    plans = {}
    # the command that continues the experiment: its own, less --overwrite (which would start over)
    continuing = command_text(*[word for word in args.words if word != "--overwrite"])
    for name, sub in every.items():
        sub.experiment_command = continuing
        plans[name] = reuse_or_resume(sub)
        prepare(sub)                    # every run's folder is checked before the first one trains
    with runs.claim(out, True, args.overwrite, own=own):
        results = {}
        for name, sub in every.items():
            if plans[name] == "finished":
                print(f"{folder_of(sub.resume)}: finished before, reused")
                results[name] = finished_result(folder_of(sub.resume), sub)
                continue
            if plans[name] == "continued":
                print(f"{sub.resume}: continuing this run of the experiment")
            code, results[name] = run(sub)
            if code:
                return code
        prefix = "kl_weight" if args.betas else "likelihood"
        report.compare(results, out, args.posterior_image, prefix)
    return 0


def main(argv=None):
    args = parse_args(argv, __doc__)
    given = sys.argv[1:] if argv is None else argv
    args.words = list(given)
    args.command = command_text(*given)
    errors = (mnist.DataError, runs.FolderError, runs.ModelFileError, runs.MetricsError,
              runs.WriteError, NonFiniteLoss, RecordError, UsageError)
    try:
        if args.betas or args.likelihoods is not None:
            return experiment(args)
        resume_given = args.resume is not None
        continue_same_run(args)
        if resume_given:                # a --resume the command gave, not one found above
            continue_extension(args)
        code, _ = run(args)
        return code
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # outside the training loop (download, analysis): every file whole or absent
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
