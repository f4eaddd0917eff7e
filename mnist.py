"""Everything on disk. The data: MNIST and Fashion-MNIST, downloaded (checksummed, cached), parsed from IDX
(validated), kept as uint8, and turned into what the model sees: intensities x / 255 in [0, 1], or binary pixels
drawn from them. And a run's files: each written whole or not at all (atomic_path), each output folder checked
before any work and used by one run at a time (check_out, claim), the model and training checkpoints.

IDX format (LeCun et al.): big-endian int32 magic, then one int32 per dimension, then the raw uint8 data.
    images: magic 2051 = 0x00000803 (uint8, 3 dims), then N, 28, 28, then N*28*28 bytes
    labels: magic 2049 = 0x00000801 (uint8, 1 dim),  then N,         then N bytes, each 0-9
"""
import contextlib
import gzip
import hashlib
import json
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np

import priors
from autograd import Adam

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# Mirrors in the order tried, and the checksums of the published archives: (algorithm, hex digest) per file.
DATASETS = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "checksums": dict(zip(FILES, [
            ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")])),
    },
    "fashion": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "checksums": dict(zip(FILES, [
            ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
            ("md5", "bef4ecab320f06d8554ea6380940ec79"),
            ("md5", "bb300cfdad3c16e7a12a480ee83cd310")])),
    },
}


class DataError(Exception):
    """Data that cannot be had or cannot be trusted; the message says which file and what to do."""


def download(name, mirrors, dest, checksum, timeout=30):
    """Fetch `name` from the first mirror that serves it with the right checksum, into `dest`: the cache never
    holds a partial or unverified archive."""
    algo, expected = checksum
    tried = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        h = hashlib.new(algo)
        try:
            with atomic_path(dest) as part:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                    while chunk := response.read(1 << 16):
                        h.update(chunk)
                        f.write(chunk)
                if h.hexdigest() != expected:       # raised inside the block: the archive is never kept
                    raise ValueError(f"{algo} {h.hexdigest()}, expected {expected}")
            return
        except (urllib.error.URLError, OSError, ValueError) as err:
            tried.append(f"{url} ({getattr(err, 'reason', err)})")
    raise DataError(f"could not download {name}; tried: " + "; ".join(tried) +
                    f". Put the archives in {os.path.dirname(dest) or '.'} yourself (or point --data-dir at a folder "
                    f"that has them), or pass --mirror URL")


def parse_idx(path, magic):
    """The array in an IDX archive (gzip or raw), checked against its header. Raises DataError.

    The data is read straight into its final uint8 array: memory holds one copy of the images, no more."""
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == b"\x1f\x8b"       # the gzip magic number
        with (gzip.open if is_gzip else open)(path, "rb") as f:
            header = f.read(4)
            found = struct.unpack(">i", header)[0] if len(header) == 4 else None
            if found != magic:
                raise DataError(f"{path}: IDX magic is {found}, expected {magic}; wrong or corrupt file, delete it")
            ndim = header[3]                        # the magic's last byte is the number of dimensions
            dims = f.read(4 * ndim)
            shape = struct.unpack(f">{ndim}i", dims) if len(dims) == 4 * ndim else None
            if shape and (min(shape) < 0 or np.prod(shape, dtype=np.int64) > 1 << 32):
                raise DataError(f"{path}: IDX header claims shape {shape}; corrupt file, delete it")
            data = np.empty(int(np.prod(shape)) if shape else 0, dtype=np.uint8)
            got, view = 0, memoryview(data)
            while got < data.size and (n := f.readinto(view[got:got + (1 << 20)])):   # 1 MiB at a time: gzip's
                got += n                                                          # readinto copies via a buffer
            trailing = len(f.read(1))
    except FileNotFoundError:
        raise DataError(f"{path}: missing")
    except (OSError, EOFError, zlib.error) as err:        # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a valid gzip archive ({err}); delete it to download it again")
    if shape is None or got != data.size or trailing:
        raise DataError(f"{path}: header says {shape}, but the file holds {'more' if trailing else 'fewer'} bytes; "
                        f"truncated or corrupt, delete it")
    return data.reshape(shape)


def to_float(images, dtype=np.float32):
    """uint8 pixels 0..255 -> intensities x / 255 in [0, 1]: one pass, one rounding; every pixel is scaled here."""
    return np.divide(images, 255, dtype=dtype)


TEST_BINARIZATION_SEED = 2015       # --binarize: the test set is binarized once, the same for every run


def binarize(images, rng):
    """Each pixel drawn as Bernoulli(x / 255): 255 with that probability, else 0 (uint8 in, uint8 out). Drawn
    afresh every time an image is used, this is dynamic binarization (Burda et al. 2015)."""
    return (rng.random(images.shape, dtype=np.float32) * 255 < images).astype(np.uint8) * np.uint8(255)


def write_idx(path, array):
    """Write a uint8 array as a gzipped IDX file (the inverse of parse_idx; used by the tests)."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">i", 0x800 + array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + array.tobytes()))


def load_split(images_path, labels_path):
    """(images (N, 784) uint8, labels (N,) uint8) from one pair of archives, validated by structure."""
    images = parse_idx(images_path, 2051)
    labels = parse_idx(labels_path, 2049)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0-9")
    return images.reshape(len(images), 28 * 28), labels


def load(dataset="mnist", data_dir=None, mirror=None, checksums=None, log=print):
    """(x_train, y_train, x_test, y_test) of the dataset, images (N, 784) uint8, labels (N,) uint8.

    Archives already in data_dir are used as they are, validated by structure (re-compressed copies, such as
    Debian's, have other archive checksums); missing ones are downloaded from `mirror` (or the defaults) and
    kept only if their checksum matches."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    data_dir = data_dir or os.path.join("data", dataset)
    mirrors = [mirror] if mirror else DATASETS[dataset]["mirrors"]
    checksums = checksums or DATASETS[dataset]["checksums"]
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    missing = [n for n in FILES if not os.path.exists(os.path.join(data_dir, n))]
    created = missing and not os.path.isdir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    try:
        for name in missing:
            log(f"downloading {name} into {data_dir}")
            download(name, mirrors, os.path.join(data_dir, name), checksums[name])
    except BaseException:
        if created and not os.listdir(data_dir):
            os.rmdir(data_dir)                      # leave no empty cache folder behind a failed first download
        raise
    paths = [os.path.join(data_dir, n) for n in FILES]
    return (*load_split(paths[0], paths[1]), *load_split(paths[2], paths[3]))


# ---- files: each written whole or not at all, each output folder used by one run at a time -----------------

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes. A crash, an error
    or Ctrl-C mid-write leaves the previous file (or none), never half of one. Every file the project writes
    goes through here: the downloaded archives, and a run's model, checkpoint, metrics and figures."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


RUN_FILES = ("model.npz", "checkpoint.npz", "metrics.json", "comparison.json")     # what a run writes, and figures


class FolderError(Exception):
    """An output folder that cannot be used: a file, not writable, in use, or holding another run."""


def check_out(out, fresh, overwrite):
    """An output folder (--out) must be a folder we can write in; a new run's must hold no other run's files."""
    parent = out
    while not os.path.isdir(parent):                # the nearest folder that exists
        if os.path.exists(parent):
            raise FolderError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
        parent = os.path.dirname(parent) or "."
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as err:
        raise FolderError(f"--out {out}: cannot write in {parent} ({err.strerror}); choose another --out")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if fresh and held and not overwrite:
        raise FolderError(f"{out} holds another run ({', '.join(held)}): continue it with --resume "
                         f"{os.path.join(out, 'checkpoint.npz')}, choose another --out, or replace it with --overwrite")


@contextlib.contextmanager
def claim(out, fresh, overwrite):
    """Create the folder and hold its lock while a run writes into it: a second run into the same folder is refused.
    The lock is the operating system's, on the file .lock, removed at the end; a crashed run's lock ends with it."""
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:     # locked a .lock that its owner had just removed
                raise OSError
    except OSError:
        os.close(fd)
        raise FolderError(f"{out} is in use by another run; wait for it to end, or choose another --out")
    try:
        check_out(out, fresh, overwrite)            # again, now that no other run can write there
        if fresh and overwrite:                     # the old run's files go before the new run writes any
            for f in os.listdir(out):
                if f in RUN_FILES or f.endswith(".png"):
                    os.remove(os.path.join(out, f))
        yield
    finally:
        if os.name != "nt":
            os.remove(path)                         # before the lock ends: no one can lock a file on its way out
        os.close(fd)
        if os.name == "nt":
            os.remove(path)
        if created and not os.listdir(out):
            os.rmdir(out)                           # a run that wrote nothing leaves no empty folder behind


def default_out(cfg, recipe):
    """A run's default folder: runs/<dataset>-h<hidden>-z<latent>-s<seed>, and every training option in cfg that
    differs from the recipe's (train.DEFAULTS): runs that differ never share a default folder."""
    differs = [f"{name}{cfg[key]:g}" if isinstance(cfg[key], float) else f"{name}{cfg[key]}" for key, name in (
        ("beta", "beta"), ("kl_warmup", "warmup"), ("lr", "lr"), ("batch_size", "b"), ("epochs", "e"))
        if cfg[key] != {**recipe, "epochs": 10}[key]]
    prior = [] if cfg["prior"] == "standard" else [cfg["prior"] + (f"{cfg['prior_components']}" if
                                                                    cfg["prior_components"] else "")]
    likelihood = [] if cfg["likelihood"] == "bernoulli" else [cfg["likelihood"] + (
        f"-sigma-{cfg['decoder_sigma']:g}" if isinstance(cfg["decoder_sigma"], float) else "-sigma-learned"
        if cfg["decoder_sigma"] else "")]
    return os.path.join("runs", "-".join([f"{cfg['dataset']}-h{cfg['hidden']}-z{cfg['latent']}-s{cfg['seed']}", *prior,
                                          *likelihood, *(["binary"] if cfg["binarize"] else []), *differs]))


# ---- a run's files: the model, a training checkpoint ----------------------------------------------------------

class ModelFileError(Exception):
    """A model file that cannot be loaded: missing, corrupt, or of another architecture."""


def save_model(model, path, **extra):
    """One .npz: the architecture, every parameter, and any extra arrays (a training checkpoint's state)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arch=np.array([model.n_in, model.hidden, model.latent]), prior=np.array(model.prior_name),
                 components=np.array(model.components), likelihood=np.array(model.likelihood.name),
                 decoder_sigma=np.array(str(model.likelihood.decoder_sigma)), **model.params(),
                 **{"extra." + k: v for k, v in extra.items()})


def load_model(path):
    """(model, extra) from a file written by save_model(). Raises ModelFileError with a one-line reason."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):                # np.load would take any other file for a pickle, and say so
        raise ModelFileError(f"{path}: not a readable model file of this project (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        n_in, hidden, latent = (int(v) for v in arrays["arch"])
        likelihood = str(arrays.get("likelihood", "bernoulli"))         # files from before the likelihoods: Bernoulli
        sigma = str(arrays.get("decoder_sigma", "None"))
        model = priors.build(str(arrays["prior"]), int(arrays["components"]), n_in=n_in, hidden=hidden, latent=latent,
                             dtype=arrays["enc.0.W"].dtype, likelihood=likelihood,
                             decoder_sigma=None if sigma == "None" else sigma if sigma == "learned" else float(sigma))
        for name, p in model.params().items():
            if arrays[name].shape != p.shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {p.shape}")
            p[...] = arrays[name]
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise ModelFileError(f"{path}: not a readable model file of this project ({type(err).__name__}: {err}); "
                             f"delete it or train again")
    return model, {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}


def save_checkpoint(path, model, opt, state, cfg):
    """The model, Adam's moments and step, and the state: training continues from it to the same numbers."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    exact = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in state.items() if k not in ("rng", "perm")}
    save_model(model, path, cfg=np.array(json.dumps(cfg)), state=np.array(json.dumps(exact)), adam_t=np.array(opt.t),
               rng=np.array(json.dumps(state["rng"].bit_generator.state)),
               perm=np.zeros(0, int) if state["perm"] is None else state["perm"],
               **{f"adam_m.{k}": v for k, v in opt.m.items()}, **{f"adam_v.{k}": v for k, v in opt.v.items()})


def load_checkpoint(path):
    """(model, opt, state, cfg) from a checkpoint written by save_checkpoint()."""
    model, extra = load_model(path)
    try:
        cfg, state = json.loads(str(extra["cfg"])), json.loads(str(extra["state"]))
        state.update(rng=np.random.default_rng(), perm=extra["perm"] if extra["perm"].size else None,
                     **{k: np.array(state[k]) for k in ("sums", "path_sums") if k in state})
        state["rng"].bit_generator.state = json.loads(str(extra["rng"]))
        opt = Adam(model.params(), lr=cfg["lr"])
        opt.t = int(extra["adam_t"])
        for k in opt.m:
            opt.m[k][...], opt.v[k][...] = extra[f"adam_m.{k}"], extra[f"adam_v.{k}"]
    except (KeyError, ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: not a training checkpoint or corrupt ({err}); use model.npz files for "
                              f"inference only, or start a new run")
    return model, opt, state, cfg
