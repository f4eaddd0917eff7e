"""The data: MNIST and Fashion-MNIST, downloaded (checksummed, cached), parsed from IDX (validated),
kept as uint8, and turned into what the model sees: intensities x / 255 in [0, 1], or binary pixels
drawn from them.

IDX format (LeCun et al.): big-endian int32 magic, then one int32 per dimension, then the raw uint8
data.
    images: magic 2051 = 0x00000803 (uint8, 3 dims), then N, 28, 28, then N*28*28 bytes
    labels: magic 2049 = 0x00000801 (uint8, 1 dim),  then N,         then N bytes, each 0-9
"""
import contextlib
import gzip
import hashlib
import os
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Mirrors in the order tried, and the checksums of the published archives: (algorithm, hex digest).
DATASETS = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "checksums": {
            "train-images-idx3-ubyte.gz":
                ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train-labels-idx1-ubyte.gz":
                ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "t10k-images-idx3-ubyte.gz":
                ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "t10k-labels-idx1-ubyte.gz":
                ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
    },
    "fashion": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "checksums": {
            "train-images-idx3-ubyte.gz": ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels-idx1-ubyte.gz": ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
            "t10k-images-idx3-ubyte.gz": ("md5", "bef4ecab320f06d8554ea6380940ec79"),
            "t10k-labels-idx1-ubyte.gz": ("md5", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
    },
}


TITLES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}

# The md5 of each archive's uncompressed IDX bytes, which recompression does not change: they
# identify a local archive whatever its compression (Fashion-MNIST's are the same in the published
# archives and in Debian's re-compressed ones).
CONTENTS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion": {
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


@contextlib.contextmanager
def atomic_path(path):
    """Files written whole or not at all: yield a temporary path beside `path`, and rename it onto
    `path` only if the block finishes. A crash, an error or Ctrl-C mid-write leaves the previous
    file (or none), never half of one. Every file the project writes goes through here: the
    downloaded archives, and a run's model, checkpoint, metrics and figures."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class DataError(Exception):
    """Data that cannot be had or cannot be trusted; the message says which file and what to do."""


def download(name, mirrors, dest, checksum, timeout=30):
    """Fetch `name` from the first mirror that serves it with the right checksum, into `dest`: the
    cache never holds a partial or unverified archive."""
    algo, expected = checksum
    tried = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        h = hashlib.new(algo)
        try:
            with atomic_path(dest) as part:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    with open(part, "wb") as f:
                        chunk = response.read(1 << 16)
                        while chunk:
                            h.update(chunk)
                            f.write(chunk)
                            chunk = response.read(1 << 16)
                if h.hexdigest() != expected:   # raised inside the block: the archive is never kept
                    raise ValueError(f"{algo} {h.hexdigest()}, expected {expected}")
            return
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            tried.append(f"{url} ({reason})")
    folder = os.path.dirname(dest) or "."
    raise DataError(f"could not download {name}; tried: " + "; ".join(tried) +
                    f". Put the archives in {folder} yourself (or point --data-dir at a folder "
                    f"that has them); python -m lab also takes --mirror URL")


def read_into(f, data):
    """Fill the uint8 array data from the file f, 1 MiB at a time; returns the number of bytes read.
    """
    got = 0
    view = memoryview(data)
    while got < data.size:
        n = f.readinto(view[got:got + (1 << 20)])
        if not n:
            break
        got += n
    return got


def parse_idx(path, magic):
    """The array in an IDX archive (gzip or raw), checked against its header. Raises DataError.
    The data is read straight into its final uint8 array: memory holds one copy of the images."""
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == b"\x1f\x8b"      # the gzip magic number
        opener = gzip.open if is_gzip else open
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4:
                raise DataError(f"{path}: empty or shorter than an IDX header; wrong or corrupt "
                                f"file, delete it")
            found = struct.unpack(">i", header)[0]
            if found != magic:
                raise DataError(f"{path}: IDX magic is {found}, expected {magic}; wrong or "
                                f"corrupt file, delete it")
            # the magic's last byte is the number of dimensions
            ndim = header[3]
            dims = f.read(4 * ndim)
            shape = None
            if len(dims) == 4 * ndim:
                shape = struct.unpack(f">{ndim}i", dims)
            if shape and (min(shape) < 0 or np.prod(shape, dtype=np.int64) > 1 << 32):
                raise DataError(f"{path}: IDX header claims shape {shape}; corrupt file, delete it")
            size = int(np.prod(shape)) if shape else 0
            data = np.empty(size, dtype=np.uint8)
            got = read_into(f, data)
            trailing = len(f.read(1))
    except FileNotFoundError:
        raise DataError(f"{path}: missing")
    except PermissionError:
        raise DataError(f"{path}: permission denied; make it readable (chmod a+r), or point "
                        f"--data-dir at a copy you can read")
    except (OSError, EOFError, zlib.error) as err:      # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a valid gzip archive ({err}); delete it to download it again")
    if shape is None or got != data.size or trailing:
        holds = "more" if trailing else "fewer"
        raise DataError(f"{path}: header says {shape}, but the file holds {holds} bytes; "
                        f"truncated or corrupt, delete it")
    return data.reshape(shape)


def to_float(images, dtype=np.float32):
    """uint8 pixels 0..255 -> intensities x / 255 in [0, 1]: one pass, one rounding. Every pixel the
    model sees is scaled here. Images that are intensities already (dequantized: floats) are only
    cast to dtype."""
    if images.dtype != np.uint8:
        return images.astype(dtype)
    return np.divide(images, 255, dtype=dtype)


# --binarize: the test set is binarized once, the same for every run
TEST_BINARIZATION_SEED = 2015


def binarize(images, rng):
    """Each pixel drawn as Bernoulli(x / 255): 255 with that probability, else 0 (uint8 in, uint8
    out). Drawn afresh every time an image is used, this is dynamic binarization (Burda et al.
    2016)."""
    u = rng.random(images.shape, dtype=np.float32)
    on = u * 255 < images                           # P(on) = pixel / 255
    return on.astype(np.uint8) * np.uint8(255)


# --dequantize: the test set is dequantized once, the same for every run
TEST_DEQUANTIZATION_SEED = 2016


def dequantize(images, rng, dtype=np.float32):
    """x = (pixel + u) / 256, u ~ U(0, 1) for each pixel (uint8 in, float intensities out): pixel k
    becomes a point drawn uniformly from its bin [k / 256, (k + 1) / 256), one of 256 bins of equal
    width over [0, 1]. A density over x then gives each pixel value a probability (its integral
    over the bin), and cannot grow without bound at a value that repeats (Theis et al. 2016).
    Drawn afresh every time an image is used, like binarize. (u in float64: pixel + u in float32
    would round up to the next bin about once in 10^5.)"""
    u = rng.random(images.shape)
    return np.divide(images + u, 256, dtype=dtype)


def write_idx(path, array):
    """Write a uint8 array as a gzipped IDX file (the inverse of parse_idx; used by the tests)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = struct.pack(">i", 0x800 + array.ndim)
    dims = struct.pack(f">{array.ndim}i", *array.shape)
    with open(path, "wb") as f:
        f.write(gzip.compress(magic + dims + array.tobytes()))


def load_split(images_path, labels_path):
    """(images (N, 784) uint8, labels (N,) uint8) from one pair of archives, validated by structure.
    """
    images = parse_idx(images_path, 2051)
    labels = parse_idx(labels_path, 2049)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {labels.shape} labels for {len(images)} images in "
                        f"{images_path}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0-9")
    return images.reshape(len(images), 28 * 28), labels


def content_md5(array, magic):
    """The md5 of the IDX file's uncompressed bytes, rebuilt from the parsed array: its header
    (magic and dimensions) and its data. Recompression (as Debian's Fashion-MNIST package did)
    leaves it as it is, where the .gz checksum changes."""
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    digest = hashlib.md5(header)
    digest.update(np.ascontiguousarray(array).data)       # the data as it is, without a copy
    return digest.hexdigest()


def identify(name, digest):
    """The data sets whose published archive `name` holds the bytes with this md5."""
    return [dataset for dataset, contents in CONTENTS.items() if contents[name] == digest]


def new_folders(path):
    """The folders that os.makedirs(path) would create, deepest first."""
    created = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    return created


def fetch_missing(data_dir, dataset, mirror, checksums, log):
    """Download the archives that are in data_dir neither gzipped nor uncompressed. A failed first
    download leaves no empty folder behind."""
    missing = []
    for name in FILES.values():
        gz_path = os.path.join(data_dir, name)
        raw_path = gz_path[:-len(".gz")]
        if not os.path.exists(gz_path) and not os.path.exists(raw_path):
            missing.append(name)
    if not missing:
        return
    mirrors = [mirror] if mirror else DATASETS[dataset]["mirrors"]
    checksums = checksums or DATASETS[dataset]["checksums"]
    created = new_folders(data_dir)
    if created:
        # a mistyped --data-dir would otherwise become a download folder without a word
        log(f"{data_dir} does not exist: creating it for the download")
    os.makedirs(data_dir, exist_ok=True)
    try:
        for name in missing:
            log(f"downloading {name} into {data_dir}")
            download(name, mirrors, os.path.join(data_dir, name), checksums[name])
    except DataError as err:
        if created:
            raise DataError(f"{err} ({data_dir} did not exist: if you meant a folder that holds "
                            f"the archives, check its spelling)")
        raise
    finally:
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def archive_path(data_dir, name, log):
    """The archive's path: name.gz, or the uncompressed file beside it when only that is there."""
    gz_path = os.path.join(data_dir, name)
    raw_path = gz_path[:-len(".gz")]
    if not os.path.exists(gz_path) and os.path.exists(raw_path):
        log(f"using the uncompressed {raw_path} (no {name})")
        return raw_path
    return gz_path


def check_identity(dataset, found, log):
    """found: {archive name: (path, content md5)}. An archive of another known data set is refused
    with the option that asks for it; archives that match nothing known are used with a warning."""
    unknown = []
    for name, (path, digest) in found.items():
        matches = identify(name, digest)
        if dataset in matches:
            continue
        if matches:
            other = matches[0]
            raise DataError(f"{path} is {TITLES[other]}'s {name}, not {TITLES[dataset]}'s: pass "
                            f"--dataset {other} to train on it, or point --data-dir at "
                            f"{TITLES[dataset]}'s archives")
        unknown.append(os.path.basename(path))
    if unknown:
        names = ", ".join(unknown)
        log(f"warning: {names} match no published {TITLES[dataset]} file (by the md5 of their "
            f"contents): well-formed IDX, used as they are, but what they hold is unchecked")


def load(dataset="mnist", data_dir=None, mirror=None, checksums=None, log=print):
    """(x_train, y_train, x_test, y_test) of the dataset, images (N, 784) uint8, labels (N,) uint8.

    Archives already in data_dir are used as they are (or, where only the uncompressed file is
    there, that file), validated by structure and identified by the md5 of their contents; missing
    ones are downloaded from `mirror` (or the defaults) and kept only if their checksum matches the
    published archive's."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    data_dir = data_dir or os.path.join("data", dataset)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    # a folder we cannot list looks empty: the archives in it would be downloaded again
    if os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK):
        raise DataError(f"--data-dir {data_dir}: permission denied (it cannot be listed); make it "
                        f"readable (chmod a+rx), or point --data-dir at a copy you can read")
    fetch_missing(data_dir, dataset, mirror, checksums, log)
    paths = {key: archive_path(data_dir, name, log) for key, name in FILES.items()}
    x_train, y_train = load_split(paths["train_images"], paths["train_labels"])
    x_test, y_test = load_split(paths["test_images"], paths["test_labels"])
    arrays = {"train_images": (x_train.reshape(-1, 28, 28), 2051), "train_labels": (y_train, 2049),
              "test_images": (x_test.reshape(-1, 28, 28), 2051), "test_labels": (y_test, 2049)}
    found = {}
    for key, (array, magic) in arrays.items():
        found[FILES[key]] = (paths[key], content_md5(array, magic))
    check_identity(dataset, found, log)
    return x_train, y_train, x_test, y_test


# The ten classes' names, for legends and colour bars.
CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                "Bag", "Ankle boot"],
}
