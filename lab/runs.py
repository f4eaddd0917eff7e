"""A run's files: its folder (named for its options, checked before any work, locked while in use),
the model, the training checkpoint, and metrics.json. Each file is written whole or not at all
(mnist.atomic_path).
"""
import contextlib
import json
import os
import re
import tempfile
import zipfile

import numpy as np

from autograd import Adam
from mnist import atomic_path

from lab import models
from lab.options import check_record, command_text

# The files that make a folder a run's (or an experiment's) of this project.
RUN_MARKERS = ("model.npz", "checkpoint.npz", "metrics.json", "comparison.json")
# Every file a run, an experiment or train.py writes into its folder, by name: --overwrite removes
# these and nothing else (tests/test_user_files.py holds a run's folder to this list).
FIGURE_FILES = ("reconstructions.png", "samples_prior.png", "samples_posterior.png",
                "loss_curves.png", "decoder_sigma.png", "gradient_paths.png",
                "prior_vs_aggregate.png", "samples_three_ways.png", "samples_mean_and_draw.png",
                "interpolations.png", "traversals.png", "latent_space.png", "latent_manifold.png",
                "kl_weight_samples.png", "kl_weight_latent.png", "kl_weight_sigma.png",
                "likelihood_samples.png", "likelihood_latent.png", "likelihood_sigma.png",
                "samples_measured.png")
RUN_FILES = RUN_MARKERS + FIGURE_FILES + ("explorer.html",)
# A file being written: atomic_path's temporary name, <file>.tmp-<the writer's process id>.
TEMPORARY = re.compile(r"\.tmp-(\d+)$")


class FolderError(Exception):
    """An output folder that cannot be used: a file, not writable, in use, or holding another run.
    """


class WriteError(Exception):
    """A file that could not be written (a full disk, a folder made read-only): the message says
    which; the caller adds what was kept and the command that goes on."""


class ModelFileError(Exception):
    """A model file that cannot be loaded: missing, corrupt, or of another architecture."""


# ---- the folder ----------------------------------------------------------------------------------

def few(names, n=3):
    """Up to n names, for a message: 'a, b, c and 4 more'."""
    names = sorted(names)
    listed = ", ".join(names[:n])
    if len(names) > n:
        listed += f" and {len(names) - n} more"
    return listed


def foreign_files(out, own=()):
    """The entries of an existing folder that make it no run's of this project: all of them unless
    it holds a run's files (RUN_MARKERS) or only what belongs there (own: an experiment's run
    folders); none for an empty folder."""
    entries = [f for f in os.listdir(out) if f != ".lock" and not TEMPORARY.search(f)]
    if any(f in RUN_MARKERS for f in entries):
        return []
    return [f for f in entries if f not in own]


def check_out(out, fresh, overwrite, own=()):
    """An output folder (--out) must be a folder we can write in: a new one, an empty one, or one
    that holds a run of this project, never a folder of other files; a new run's must hold no
    other run unless --overwrite. own: what else belongs there (an experiment's comparison.json
    and run folders)."""
    parent = out
    while not os.path.isdir(parent):                # the nearest folder that exists
        if os.path.exists(parent):
            raise FolderError(f"--out {out}: {parent} is a file, not a folder; choose another "
                              f"--out")
        parent = os.path.dirname(parent) or "."
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as err:
        raise FolderError(f"--out {out}: cannot write in {parent} ({err.strerror}); choose "
                          f"another --out")
    if os.path.isdir(out):
        foreign = foreign_files(out, own)
        if foreign:
            raise FolderError(f"--out {out} holds files that are not a run of this project "
                              f"({few(foreign)}): a run writes only into a new folder, an empty "
                              f"one, or a run's; choose another --out")
    held = [f for f in RUN_MARKERS if f not in own and os.path.exists(os.path.join(out, f))]
    if fresh and "comparison.json" in held:
        raise FolderError(f"{out} holds an experiment (comparison.json): a single run never "
                          f"replaces one, with or without --overwrite; choose another --out")
    if fresh and held and not overwrite:
        checkpoint = os.path.join(out, "checkpoint.npz")
        ways = "choose another --out, or replace it with --overwrite"
        if os.path.isfile(checkpoint):
            ways = f"continue it with {command_text('--resume', checkpoint)}, " + ways
        raise FolderError(f"{out} holds another run ({', '.join(held)}): {ways}")


def lock(fd, path):
    """Take the operating system's lock on the open file fd without waiting; OSError if it is held.
    """
    if os.name == "nt":
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # we locked a .lock its owner had just removed
    if os.fstat(fd).st_ino != os.stat(path).st_ino:
        raise OSError("lock file replaced")


def process_is_gone(pid):
    """Whether no process has this id (on Windows, where that cannot be asked cheaply: never)."""
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:             # it exists, and is another user's
        return False
    return False


def remove_stale_temporaries(out, log=print):
    """Remove the half-written files (<file>.tmp-<pid>) of processes that no longer exist: a run
    killed mid-write (kill -9) leaves one that nothing else would ever remove."""
    for name in sorted(os.listdir(out)):
        match = TEMPORARY.search(name)
        if match and process_is_gone(int(match.group(1))):
            os.remove(os.path.join(out, name))
            log(f"{out}: removed {name}, half-written by a process that no longer exists")


def remove_run_files(out, keep=(), log=print):
    """--overwrite: remove the old run's files from out, by name (RUN_FILES), and nothing else."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if name not in keep and os.path.exists(path):
            os.remove(path)
            removed.append(name)
    if removed:
        log(f"--overwrite: removed the old run's {few(removed)} from {out}")


@contextlib.contextmanager
def claim(out, fresh, overwrite, own=(), log=print):
    """Create the folder and hold its lock while a run writes into it: a second run into the same
    folder is refused. The lock is on the file .lock, removed at the end; a crashed run's lock ends
    with it, and its .lock and half-written files are removed, with a line, by the next run. The
    old run's files, with --overwrite, are for the caller to remove (remove_run_files) once the
    new run has something to put in their place."""
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".lock")
    stale = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        lock(fd, path)
    except OSError:
        os.close(fd)
        raise FolderError(f"{out} is in use by another run; wait for it to end, or choose "
                          f"another --out")
    try:
        if stale:
            # its owner removes .lock before it lets go: one we could lock is a dead run's
            log(f"{out}: removed the .lock of a run that no longer exists")
        remove_stale_temporaries(out, log)
        check_out(out, fresh, overwrite, own)       # again, now that no other run can write there
        yield
    finally:
        if os.name != "nt":
            os.remove(path)     # before the lock ends: no one can lock a file on its way out
        os.close(fd)
        if os.name == "nt":
            os.remove(path)
        if created and not os.listdir(out):
            os.rmdir(out)       # a run that wrote nothing leaves no empty folder behind


def number_text(value):
    """A float as %g (1e-3 -> 0.001), anything else as str."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_out(cfg, recipe):
    """A run's default folder: runs/<dataset>-h<hidden>-z<latent>-s<seed>, then every option in cfg
    that differs from the recipe's (options.DEFAULTS, 10 epochs): runs that differ never share a
    folder."""
    parts = [f"{cfg['dataset']}-h{cfg['hidden']}-z{cfg['latent']}-s{cfg['seed']}"]
    if cfg["prior"] != "standard":
        parts.append(cfg["prior"] + str(cfg["prior_components"] or ""))
    if cfg["likelihood"] != "bernoulli":
        likelihood = cfg["likelihood"]
        if cfg["decoder_sigma"]:
            likelihood += "-sigma-" + number_text(cfg["decoder_sigma"])
        parts.append(likelihood)
    if cfg["binarize"]:
        parts.append("binary")
    if cfg["dequantize"]:
        parts.append("dequantized")
    if cfg["train_images"]:
        parts.append(f"n{cfg['train_images']}")
    if cfg["layers"] != 1 or cfg["activation"] != "relu":
        parts.append(f"{cfg['activation']}{cfg['layers']}")
    if cfg["objective"] != "elbo" or cfg["samples"] != 1:
        parts.append(f"{cfg['objective']}-k{cfg['samples']}")
    if cfg["lr_schedule"] != "constant":
        parts.append(cfg["lr_schedule"])
    recipe = {**recipe, "epochs": 10}
    short_names = {"beta": "beta", "kl_warmup": "warmup", "lr": "lr", "batch_size": "b",
                   "epochs": "e", "adam_eps": "adameps"}
    for key, short in short_names.items():
        if cfg[key] != recipe[key]:
            parts.append(short + number_text(cfg[key]))
    return os.path.join("runs", "-".join(parts))


def is_complete(out):
    """Whether the run in out is finished: its model saved and its measurements in metrics.json,
    which is written last."""
    try:
        metrics = read_metrics(os.path.join(out, "metrics.json"))
    except MetricsError:                # damaged: measured again by the run that finishes it
        return False
    if "test_loss" not in metrics or "aggregate_posterior" not in metrics:
        return False
    # a missing or damaged model.npz is no finished run's: --resume rebuilds it from the checkpoint
    try:
        load_model(os.path.join(out, "model.npz"))
    except ModelFileError:
        return False
    return True


# ---- the model and the checkpoint ----------------------------------------------------------------

def save_model(model, path, **extra):
    """One .npz: the architecture, every parameter, the likelihood's state (arrays no gradient
    trains: the optimal sigma's), and any extra arrays (a checkpoint's state)."""
    arch = models.describe(model)
    header = {
        "arch": np.array([model.n_in, model.hidden, model.latent]),
        "prior": np.array(arch["prior"]),
        "components": np.array(arch["components"]),
        "likelihood": np.array(arch["likelihood"]),
        "decoder_sigma": np.array(str(arch["decoder_sigma"])),
        "layers": np.array(arch["layers"]),
        "activation": np.array(arch["activation"]),
        "objective": np.array(arch["objective"]),
        "samples": np.array(arch["samples"]),
    }
    state = {"state.likelihood." + k: v for k, v in model.likelihood.state.items()}
    extras = {"extra." + k: v for k, v in extra.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **header, **model.params(), **state, **extras)


def parse_decoder_sigma(text):
    """The decoder_sigma a model file records: 'None', 'learned', 'optimal', 'per-pixel', or a
    number."""
    if text == "None":
        return None
    if text in ("learned", "optimal", "per-pixel"):
        return text
    return float(text)


def recovery(path):
    """What to do about a damaged file: a run's model.npz is rebuilt from the checkpoint beside it
    (its training is kept there); anything else is trained again."""
    checkpoint = os.path.join(os.path.dirname(path), "checkpoint.npz")
    name = os.path.basename(path)
    if name not in ("model.npz", "checkpoint.npz"):
        return "pass a run's model.npz (or, to --resume, its checkpoint.npz)"
    if name == "model.npz" and zipfile.is_zipfile(checkpoint):
        return (f"{command_text('--resume', checkpoint)} rebuilds it, and the run's measurements, "
                f"from the checkpoint beside it")
    return "delete it or train again"


def load_model(path):
    """(model, extra) from a file written by save_model(). Raises ModelFileError with a one-line
    reason."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ModelFileError(f"{path}: not a file; {recovery(path)}")
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    # np.load would take any other file for a pickle, and say so
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a readable model file of this project (not an .npz "
                             f"archive); {recovery(path)}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        n_in, hidden, latent = (int(v) for v in arrays["arch"])
        # Files from before the likelihoods were added hold neither key: they are Bernoulli models.
        likelihood = str(arrays.get("likelihood", "bernoulli"))
        sigma = parse_decoder_sigma(str(arrays.get("decoder_sigma", "None")))
        # train.py's model.npz holds the sizes and the parameters only: the standard VAE's
        prior = str(arrays.get("prior", "standard"))
        components = int(arrays.get("components", 0))
        # files from before these options hold none: one ReLU layer a side, the ELBO
        layers = int(arrays.get("layers", 1))
        activation = str(arrays.get("activation", "relu"))
        objective = str(arrays.get("objective", "elbo"))
        samples = int(arrays.get("samples", 1))
        model = models.build(prior, components, likelihood, sigma, n_in=n_in, hidden=hidden,
                             latent=latent, dtype=arrays["enc.0.W"].dtype, layers=layers,
                             activation=activation, objective=objective, samples=samples)
        for name, p in model.params().items():
            if arrays[name].shape != p.shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {p.shape}")
            p[...] = arrays[name]
        # a file from before a fixed sigma was saved has none: it is the one decoder_sigma gives
        for name, a in model.likelihood.state.items():
            a[...] = arrays.get("state.likelihood." + name, a)
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise ModelFileError(f"{path}: not a readable model file of this project "
                             f"({type(err).__name__}: {err}); {recovery(path)}")
    extra = {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}
    return model, extra


def save_checkpoint(path, model, opt, state, cfg):
    """The model, Adam's moments and step, and the training state: training continues from it to the
    same numbers. The state's numbers go in as JSON (exact for floats), its arrays as arrays."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plain = {k: v for k, v in state.items() if k not in ("rng", "perm", "path_sums")}
    arrays = {"adam_t": np.array(opt.t)}
    arrays["cfg"] = np.array(json.dumps(cfg))
    arrays["state"] = np.array(json.dumps(plain))
    arrays["rng"] = np.array(json.dumps(state["rng"].bit_generator.state))
    arrays["perm"] = np.zeros(0, int) if state["perm"] is None else state["perm"]
    for name, sums in (state["path_sums"] or {}).items():
        arrays[f"path_sum.{name}"] = sums["sum"]
        arrays[f"path_sum_sq.{name}"] = sums["sum_sq"]
    for k in opt.m:
        arrays[f"adam_m.{k}"] = opt.m[k]
        arrays[f"adam_v.{k}"] = opt.v[k]
    save_model(model, path, **arrays)


def load_checkpoint(path):
    """(model, opt, state, cfg) from a checkpoint written by save_checkpoint()."""
    model, extra = load_model(path)
    try:
        cfg = check_record(json.loads(str(extra["cfg"])), f"{path} (its options)")
        state = json.loads(str(extra["state"]))
        for name in ("epoch", "step"):
            count = state[name]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"its {name} is {count!r}, not a count")
        state["rng"] = np.random.default_rng()
        state["rng"].bit_generator.state = json.loads(str(extra["rng"]))
        state["perm"] = extra["perm"] if extra["perm"].size else None
        state["path_sums"] = None
        if state["perm"] is not None:       # mid-epoch: the epoch's sums so far
            names = [k[len("path_sum."):] for k in extra if k.startswith("path_sum.")]
            state["path_sums"] = {name: {"sum": extra[f"path_sum.{name}"],
                                         "sum_sq": extra[f"path_sum_sq.{name}"]} for name in names}
        opt = Adam(model.params(), lr=cfg["lr"], eps=cfg.get("adam_eps", 1e-8))
        opt.t = int(extra["adam_t"])
        for k in opt.m:
            opt.m[k][...] = extra[f"adam_m.{k}"]
            opt.v[k][...] = extra[f"adam_v.{k}"]
    except (KeyError, ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: not a training checkpoint or corrupt ({err}); use model.npz "
                             f"files for inference only, or start a new run")
    return model, opt, state, cfg


# ---- metrics.json --------------------------------------------------------------------------------

class MetricsError(Exception):
    """A metrics.json that cannot be read."""


def finite_or_null(value, where, not_numbers):
    """value with every float that is not finite (NaN, +-Infinity, which strict JSON has no word
    for) replaced by None, and named in not_numbers {where: 'nan' or 'inf'}."""
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{where}.{k}".lstrip("."), not_numbers)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{where}[{i}]", not_numbers) for i, v in enumerate(value)]
    if isinstance(value, float) and not np.isfinite(value):
        not_numbers[where] = str(value)
        return None
    return value


def write_metrics(path, metrics):
    """metrics.json (or comparison.json), the record of a run's measurements, written whole or not
    at all, as strict JSON: a value that is not a number is written as null, and named with what it
    was under "not_numbers"."""
    not_numbers = {}
    strict = finite_or_null(metrics, "", not_numbers)
    if not_numbers and isinstance(strict, dict):        # a comparison's rows keep only the null
        strict["not_numbers"] = not_numbers
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(strict, f, indent=2, allow_nan=False)


def compared_runs(path):
    """The names of the runs an experiment's comparison.json compares ([] if there is none)."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise MetricsError(f"{path}: unreadable ({err}); move it away or pass --out")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise MetricsError(f"{path} is not an experiment's comparison; move it away or pass --out")
    return [row.get("run") for row in rows]


def read_metrics(path):
    """The metrics.json at path ({} if there is none)."""
    try:
        with open(path) as f:
            metrics = json.load(f)
    except FileNotFoundError:
        return {}
    except PermissionError:
        raise MetricsError(f"{path}: permission denied; make it readable (chmod) or pass --out")
    except (OSError, ValueError) as err:
        raise MetricsError(f"{path}: unreadable ({err}); move it away or pass --out")
    if not isinstance(metrics, dict):
        kind = type(metrics).__name__
        raise MetricsError(f"{path} holds a JSON {kind}, not a run's record; move it away or "
                           f"pass --out")
    return metrics
