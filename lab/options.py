"""The command line of the lab (python -m lab): the recipe's defaults, the flags, and every check
that needs neither data nor files, so that a mistake ends in one `error:` line before any work.
"""
import argparse
import json
import math
import shlex

import mnist

from lab import models

# The recipe. Options default to None on the command line: --resume takes the checkpoint's unless
# given.
DEFAULTS = {"dataset": "mnist", "hidden": 400, "latent": 20, "prior": "standard",
            "prior_components": None, "likelihood": "bernoulli", "decoder_sigma": None,
            "batch_size": 128, "lr": 1e-3, "seed": 0, "beta": 1.0, "kl_warmup": 0,
            "binarize": False, "dequantize": False, "train_images": None, "layers": 1,
            "activation": "relu", "objective": "elbo", "samples": 1, "adam_eps": 1e-8,
            "lr_schedule": "constant"}
# The measurements after training. A run records them, so that finishing it later (--resume)
# measures as it would have; --analyze and --resume take them from the run unless given.
MEASURE_DEFAULTS = {"iw_samples": 100, "gmm_components": 10, "gmm_covariance": "full",
                    "posterior_image": 0}
# The options that make the model what it is: a checkpoint cannot change them.
ARCHITECTURE = ("hidden", "latent", "prior", "prior_components", "likelihood", "decoder_sigma",
                "layers", "activation", "objective", "samples")
# --lr-schedule: the learning rate of each epoch
LR_SCHEDULES = ("constant", "burda")
# --likelihoods' default runs.
LIKELIHOOD_RUNS = ["bernoulli", "gaussian:1", "gaussian:0.1", "gaussian:learned",
                   "gaussian:optimal", "gaussian:per-pixel+dequantize", "cb"]
# --decoder-sigma's settings besides a number
SIGMA_SETTINGS = ("learned", "optimal", "per-pixel")
# A fixed sigma's bounds: sigma^2 and 1 / (2 sigma^2) of any image's error stay inside float32's
# range (1.2e-38 to 3.4e38), with room for the sums over 784 pixels.
SIGMA_RANGE = (1e-15, 1e15)

NUMBERS = [  # the numeric flags: the least value allowed, and the default (None: DEFAULTS')
    {"flag": "--epochs", "type": int, "least": 0, "default": None,
     "help": "total epochs (default: 10; 3 with --benchmark)"},
    {"flag": "--batch-size", "type": int, "least": 1, "default": None, "help": "default: 128"},
    {"flag": "--lr", "type": float, "least": 1e-300, "default": None,
     "help": "Adam learning rate (default: 1e-3)"},
    {"flag": "--hidden", "type": int, "least": 1, "default": None,
     "help": "hidden units in encoder and decoder (default: 400)"},
    {"flag": "--latent", "type": int, "least": 1, "default": None,
     "help": "latent dimensions Z (default: 20)"},
    {"flag": "--prior-components", "type": int, "least": 1, "default": None,
     "help": "K of a learned prior (default: mog 10, vamp 100)"},
    {"flag": "--beta", "type": float, "least": 0, "default": None,
     "help": "the KL weight: train on recon + beta * KL (default: 1, the negative ELBO)"},
    {"flag": "--kl-warmup", "type": int, "least": 0, "default": None,
     "help": "epochs over which the KL weight rises linearly from 0 to beta (default: 0)"},
    {"flag": "--seed", "type": int, "least": 0, "default": None, "help": "default: 0"},
    {"flag": "--layers", "type": int, "least": 1, "default": None,
     "help": "hidden layers on each side (default: 1; Burda et al.: 2)"},
    {"flag": "--samples", "type": int, "least": 1, "default": None,
     "help": "k, draws of z per image in training (default: 1; more: iwae.py's bounds)"},
    {"flag": "--adam-eps", "type": float, "least": 1e-300, "default": None,
     "help": "Adam's epsilon (default: 1e-8; Burda et al.: 1e-4)"},
    {"flag": "--train-images", "type": int, "least": 1, "default": None,
     "help": "train on the first N training images only (default: all)"},
    {"flag": "--iw-samples", "type": int, "least": 1, "default": None,
     "help": "S importance samples per test image for iw_nll (default: 100; Burda et al.: 5000)"},
    {"flag": "--gmm-components", "type": int, "least": 1, "default": None,
     "help": "components of the mixture fitted to the aggregated posterior (default: 10)"},
    {"flag": "--posterior-image", "type": int, "least": 0, "default": None,
     "help": "index of the test image whose posterior is sampled (default: 0)"},
]
# An option, why it cannot go with the others listed, and those others.
NOT_TOGETHER = {
    "analyze": ("it measures a saved model and trains nothing",
                ["resume", "betas", "likelihoods", "benchmark", "epochs"] +
                [k for k in DEFAULTS if k not in ("dataset", "seed", "binarize")]),
    "resume": ("a run continues with its own options", ["betas", "likelihoods", "benchmark"]),
    "benchmark": ("it writes nothing", ["out", "overwrite"]),
    "betas": ("the experiment sets the KL weight of each run",
              ["beta", "benchmark", "likelihoods"]),
    "likelihoods": ("the experiment sets each run's likelihood",
                    ["likelihood", "decoder_sigma", "benchmark"]),
}


# What a run's record may hold (metrics.json's "config", a checkpoint's options), each field's kind
# and bounds: a hand-edited or damaged record is refused by name, never read as something else.
RECORD_FIELDS = {
    "dataset": ("one of", sorted(mnist.DATASETS)), "hidden": ("integer", 1),
    "latent": ("integer", 1), "prior": ("one of", sorted(models.PRIORS)),
    "prior_components": ("integer or null", 1), "likelihood": ("one of", models.LIKELIHOODS),
    "decoder_sigma": ("sigma", None), "batch_size": ("integer", 1), "lr": ("number", 1e-300),
    "seed": ("integer", 0), "beta": ("number", 0), "kl_warmup": ("integer", 0),
    "binarize": ("true or false", None), "dequantize": ("true or false", None),
    "train_images": ("integer or null", 1), "epochs": ("integer", 0),
    "layers": ("integer", 1), "activation": ("one of", sorted(models.ACTIVATIONS)),
    "objective": ("one of", list(models.OBJECTIVES)), "samples": ("integer", 1),
    "adam_eps": ("number", 1e-300), "lr_schedule": ("one of", list(LR_SCHEDULES)),
}
MEASURE_FIELDS = {
    "iw_samples": ("integer", 1), "gmm_components": ("integer", 1),
    "gmm_covariance": ("one of", ["diag", "full"]), "posterior_image": ("integer", 0),
}


def field_problem(value, kind, bound):
    """What is wrong with a record's value for a field of this kind, or None if nothing is."""
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    is_number = (is_integer or isinstance(value, float)) and math.isfinite(value)
    if kind == "one of" and value not in bound:
        return f"one of {', '.join(bound)}"
    if kind == "true or false" and not isinstance(value, bool):
        return "true or false"
    if kind == "integer or null" and value is None:
        return None
    if kind in ("integer", "integer or null") and not (is_integer and value >= bound):
        return f"an integer >= {bound}" + (" or null" if kind == "integer or null" else "")
    if kind == "number" and not (is_number and value >= bound):
        return "a number > 0" if bound > 0 else f"a number >= {bound}"
    if kind == "sigma" and value is not None and value not in SIGMA_SETTINGS:
        if not (is_number and SIGMA_RANGE[0] <= value <= SIGMA_RANGE[1]):
            low, high = SIGMA_RANGE
            return f"null, {', '.join(SIGMA_SETTINGS)}, or a number in [{low:g}, {high:g}]"
    return None


def check_record(record, where, prefix=""):
    """Refuse a run's record whose fields are not what the project writes: each present field of
    RECORD_FIELDS, and of its "measure", checked by kind and bounds. where: the file; prefix: the
    record's place in it ('config.'). Returns the record."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: {prefix.rstrip('.') or 'it'} is a {type(record).__name__}, "
                          f"not an object of options; correct it, or move the file away")
    measure = record.get("measure", {})
    if not isinstance(measure, dict):
        raise RecordError(f"{where}: {prefix}measure is a {type(measure).__name__}, not an "
                          f"object; correct it, or move the file away")
    checks = [(name, record, kind, bound) for name, (kind, bound) in RECORD_FIELDS.items()]
    checks += [("measure." + name, measure, kind, bound)
               for name, (kind, bound) in MEASURE_FIELDS.items()]
    for name, fields, kind, bound in checks:
        key = name.split(".")[-1]
        if key not in fields:
            continue
        expected = field_problem(fields[key], kind, bound)
        if expected:
            raise RecordError(f"{where}: {prefix}{name} is {json_text(fields[key])}, expected "
                              f"{expected}; correct it, or move the file away")
    return record


def json_text(value):
    """A value as JSON writes it: '2000' for the string, 2000 for the number."""
    return json.dumps(value)


def command_text(*words):
    """The lab's command with these words, shell-quoted, to be pasted as it is printed."""
    return shlex.join(["python", "-m", "lab", *words])


class RecordError(Exception):
    """A run's record (metrics.json, a checkpoint's options) with a field the project never
    writes: a hand edit, or damage."""


class UsageError(Exception):
    """Options that cannot work together, or that the data or a file cannot serve: found before any
    training."""


def decoder_sigma(text):
    """--decoder-sigma: 'learned', 'optimal', 'per-pixel', or a number > 0."""
    if text in SIGMA_SETTINGS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, learned, optimal or per-pixel, "
                                         f"got {text!r}")
    if not SIGMA_RANGE[0] <= value <= SIGMA_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"a fixed sigma must lie in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], where sigma^2 "
            f"and the loss's 1 / (2 sigma^2) stay finite in float32; got {text}")
    return value


def likelihood_run(spec):
    """--likelihoods: bernoulli, cb, or gaussian:SIGMA (SIGMA a number > 0, learned, optimal or
    per-pixel; gaussian alone is gaussian:learned, as --likelihood gaussian is), each with
    +dequantize to train that run on dequantized pixels. -> (name, sigma, dequantize)"""
    run, plus, extra = spec.partition("+")
    name, colon, sigma = run.partition(":")
    dequantize = extra == "dequantize"
    known = dequantize or not plus
    if known and name in ("bernoulli", "cb") and not sigma:
        return name, None, dequantize
    if known and name == "gaussian" and sigma:
        return name, decoder_sigma(sigma), dequantize
    if known and name == "gaussian" and not colon:
        return name, "learned", dequantize
    raise argparse.ArgumentTypeError(f"{spec!r} is not bernoulli, gaussian:SIGMA (SIGMA > 0, "
                                     f"learned, optimal or per-pixel) or cb, with or without "
                                     f"+dequantize")


def given(value):
    """Whether an option was given: not left at None or False."""
    return value is not None and value is not False


def build_parser(description):
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def one_line_error(message):
        p.exit(2, f"error: {message} (python -m lab --help lists the options)\n")

    p.error = one_line_error
    p.add_argument("--dataset", choices=sorted(mnist.DATASETS), help="default: mnist")
    p.add_argument("--data-dir", help="where the archives are looked for and downloaded to "
                                      "(default: data/<dataset>)")
    p.add_argument("--mirror", help="download from this URL instead of the default mirrors")
    p.add_argument("--prior", choices=sorted(models.PRIORS),
                   help="p(z): N(0, I) (standard), a mixture, VampPrior")
    p.add_argument("--likelihood", choices=models.LIKELIHOODS, help="p(x|z); default: bernoulli")
    p.add_argument("--activation", choices=sorted(models.ACTIVATIONS),
                   help="between the layers (default: relu; Burda et al.: tanh)")
    p.add_argument("--objective", choices=models.OBJECTIVES,
                   help="elbo (default; with --samples K, the mean of K ELBOs) or iwae, the "
                        "importance-weighted bound of K draws (iwae.py)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="constant (default), or burda: 3^i epochs at lr * 10^(-i/7), i = 0..7 "
                        "(3,280 epochs in all)")
    p.add_argument("--decoder-sigma", type=decoder_sigma,
                   help="the Gaussian's sigma: a number > 0 (fixed), learned (default), optimal "
                        "(set for each batch), or per-pixel (from the decoder)")
    p.add_argument("--binarize", action="store_true", default=None,
                   help="train on pixels drawn as Bernoulli(intensity) each time an image is "
                        "used; the test set is binarized once")
    p.add_argument("--dequantize", action="store_true", default=None,
                   help="train on (pixel + u) / 256, u ~ U(0, 1) drawn afresh each time an image "
                        "is used; the test set is dequantized once")
    for option in NUMBERS:
        p.add_argument(option["flag"], type=option["type"], default=option["default"],
                       help=option["help"])
    p.add_argument("--gmm-covariance", choices=("full", "diag"),
                   help="default: full")
    p.add_argument("--out",
                   help="output folder (default: runs/<dataset>-h<hidden>-z<latent>-s<seed>[-...])")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue the run saved in this checkpoint.npz")
    p.add_argument("--analyze", metavar="MODEL",
                   help="measure and draw a saved model.npz again (beside it, or --out)")
    p.add_argument("--betas", type=float, nargs="+", metavar="BETA",
                   help="the KL-weight experiment: a run per beta")
    p.add_argument("--likelihoods", nargs="*", type=likelihood_run, metavar="SPEC",
                   help="the likelihood experiment, like --betas: a run per SPEC (default: "
                        f"{' '.join(LIKELIHOOD_RUNS)}), then a comparison")
    p.add_argument("--benchmark", action="store_true",
                   help="time training and the analysis; writes nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run files in the output folder")
    return p


def check_numbers(p, args):
    """Every numeric option at least its least value, and finite."""
    checks = []
    for option in NUMBERS:
        name = option["flag"][2:].replace("-", "_")
        checks.append((option["flag"], option["least"], getattr(args, name)))
    for beta in args.betas or []:
        checks.append(("--betas", 0, beta))
    for flag, least, value in checks:
        if value is not None and not (value >= least and math.isfinite(value)):
            bound = "> 0" if least > 0 else ">= 0"
            p.error(f"argument {flag}: must be {bound} and finite, got {value}")


def run_keys(args):
    """What names each run of an experiment, its folder and its label: a beta as %g (-0 is 0), a
    likelihood spec with --dequantize merged into it."""
    if args.betas:
        return [f"{beta + 0.0:g}" for beta in args.betas]
    keys = []
    for name, sigma, dequantize in args.likelihoods or []:
        sigma_text = sigma
        if isinstance(sigma, float):
            sigma_text = f"{sigma:g}"
        keys.append((name, sigma_text, dequantize or bool(args.dequantize)))
    return keys


def check_objective(p, args):
    """iwae.py's bounds, and the deeper networks, are written for the N(0, I) prior and the
    Bernoulli likelihood, and L_k has no KL weight."""
    several_draws = args.objective == "iwae" or (args.samples or 1) > 1
    deeper = (args.layers or 1) > 1 or args.activation not in (None, "relu")
    learned_prior = args.prior not in (None, "standard")
    other_likelihood = args.likelihood not in (None, "bernoulli") or args.likelihoods is not None
    if (several_draws or deeper) and learned_prior:
        p.error("--prior mog and vamp take neither --objective iwae, --samples, --layers nor "
                "--activation: iwae.py and the deeper networks are written for N(0, I)")
    if several_draws and other_likelihood:
        p.error("--objective iwae and --samples are written for the Bernoulli likelihood: drop "
                "--likelihood(s)")
    if several_draws and (args.beta not in (None, 1.0) or args.kl_warmup or args.betas):
        p.error("--objective iwae and --samples train on a bound with no KL weight: drop --beta, "
                "--betas and --kl-warmup")


def check_combinations(p, args):
    """Options that need another, or that cannot go together; no path given as empty."""
    for name in ("data_dir", "mirror", "out", "resume", "analyze"):
        if getattr(args, name) == "":
            p.error(f"argument --{name.replace('_', '-')}: is empty; name a file or folder, or "
                    f"leave the option out")
    if args.benchmark and args.epochs == 0:
        p.error("--benchmark --epochs 0 trains nothing to time: pass --epochs 1 or more")
    if args.decoder_sigma is not None and args.likelihood != "gaussian":
        p.error("--decoder-sigma needs --likelihood gaussian")
    if args.binarize and args.dequantize:
        p.error("--binarize and --dequantize do not go together: pixels are either drawn as 0 or "
                "1, or spread over their bins")
    if args.prior_components is not None and args.prior not in ("mog", "vamp"):
        p.error("--prior-components needs --prior mog or vamp")
    check_objective(p, args)
    keys = run_keys(args)
    if len(set(keys)) < len(keys):
        experiment = "betas" if args.betas else "likelihoods"
        p.error(f"--{experiment} repeats a value (two values name the same run, as 0.1 and "
                f"0.1000001 do, or 0 and -0, or a +dequantize spec under --dequantize): each run "
                f"needs a folder of its own")
    for a, (why, others) in NOT_TOGETHER.items():
        if not given(getattr(args, a)):
            continue
        for b in others:
            if given(getattr(args, b)):
                flag_a = "--" + a.replace("_", "-")
                flag_b = "--" + b.replace("_", "-")
                p.error(f"{flag_a} and {flag_b} do not go together: {why}")


def parse_args(argv, description=None):
    p = build_parser(description)
    args = p.parse_args(argv)
    check_numbers(p, args)
    check_combinations(p, args)
    return args
