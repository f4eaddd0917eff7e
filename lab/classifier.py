"""The ruler the samples are measured with: a small classifier of the dataset's images, in the
project's own NumPy (autograd.py's layers and Adam), trained once and kept beside the data.

    logits = MLP(x), 784-512-10 with ReLU
    p(y|x) = softmax(logits)
    loss   = -log p(y|x) = logsumexp(logits) - logits[y]      (the softmax cross-entropy)

Its hidden layer (512 ReLU units) is the feature space of the Frechet distance (lab/quality.py), as
Inception's pool layer is FID's (Heusel et al. 2017); its p(y|x) gives the classes the samples
cover. It trains on the training images but the last sixth (50,000 of MNIST's 60,000), which it
never sees: they are the held-out real images whose measures are the floor of every sampler's. It
reaches 98.0% on MNIST's test images.
"""
import hashlib
import json
import os
import time

import numpy as np

import mnist
from autograd import Adam, MLP

HIDDEN = 512
EPOCHS = 10
BATCH_SIZE = 128
CLASSES = 10


# ---- the loss, as a forward/backward pair --------------------------------------------------------

def log_softmax(logits):
    """log p(c|x) = l_c - logsumexp(l) for every class c, the largest logit subtracted first so
    that exp never overflows. logits (N, C)."""
    shifted = logits - logits.max(axis=1, keepdims=True)          # l - max l: the same softmax
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy_forward(logits, labels):
    """-log p(y|x) per image, p(y|x) = softmax(logits). logits (N, C), labels (N,) integers."""
    log_p = log_softmax(logits)                                   # log p(c|x) for every class c
    rows = np.arange(len(labels))
    loss = -log_p[rows, labels]                                   # -log p(y|x)
    cache = (log_p, labels)
    return loss, cache


def softmax_cross_entropy_backward(dloss, cache):
    """dL/dlogits = dloss * (p(c|x) - 1[c = y]): the softmax's probabilities, minus one at the
    label."""
    log_p, labels = cache
    dlogits = np.exp(log_p)                                       # p(c|x)
    dlogits[np.arange(len(labels)), labels] -= 1                  # - 1[c = y]
    return dlogits * dloss[:, None]


# ---- the classifier ------------------------------------------------------------------------------

class Classifier:
    """784-512-10 with ReLU; features(x) is the hidden layer, probabilities(x) is p(y|x)."""

    def __init__(self, seed=0, n_in=784, dtype=np.float32):
        self.net = MLP([n_in, HIDDEN, CLASSES], np.random.default_rng(seed), dtype)
        self.dtype = dtype

    def params(self):
        return self.net.named("params", "net")

    def grads(self):
        return self.net.named("grads", "net")

    def logits(self, x):
        return self.net.forward(x)

    def features(self, images, batch_size=1000):
        """The hidden layer's ReLU outputs (N, 512), float64: the space of the Frechet distance."""
        linear, relu = self.net.layers[0], self.net.layers[1]
        out = []
        for i in range(0, len(images), batch_size):
            x = as_pixels(images[i:i + batch_size], self.dtype)
            out.append(relu.forward(linear.forward(x)).astype(np.float64))
        return np.concatenate(out)

    def probabilities(self, images, batch_size=1000):
        """p(y|x) for each image (N, 10), float64."""
        out = []
        for i in range(0, len(images), batch_size):
            logits = self.logits(as_pixels(images[i:i + batch_size], self.dtype))
            out.append(np.exp(log_softmax(logits.astype(np.float64))))
        return np.concatenate(out)

    def accuracy(self, images, labels):
        return float((self.probabilities(images).argmax(axis=1) == labels).mean())


def as_pixels(images, dtype):
    """uint8 images as intensities in [0, 1]; float images (samples, already in [0, 1]) as they
    are."""
    if images.dtype == np.uint8:
        return mnist.to_float(images, dtype)
    return images.astype(dtype, copy=False)


def train_classifier(x, y, seed=0, epochs=EPOCHS, log=print):
    """Adam (lr 1e-3) on the mean softmax cross-entropy, batches of 128, `epochs` passes."""
    model = Classifier(seed)
    opt = Adam(model.params())
    grads = model.grads()
    rng = np.random.default_rng([seed, 1])
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH_SIZE):
            rows = order[start:start + BATCH_SIZE]
            logits = model.logits(mnist.to_float(x[rows]))
            loss, cache = softmax_cross_entropy_forward(logits, y[rows])
            dloss = np.full(len(rows), 1.0 / len(rows), logits.dtype)   # the batch mean
            model.net.backward(softmax_cross_entropy_backward(dloss, cache), need_dx=False)
            opt.step(grads)
    return model


# ---- trained once per dataset --------------------------------------------------------------------

def held_out_split(n_train):
    """The training images the classifier trains on, and the last sixth it holds out."""
    n_held_out = n_train // 6
    return slice(0, n_train - n_held_out), slice(n_train - n_held_out, n_train)


def identity(x_train, y_train):
    """The training set's identity: a hash of its pixels and labels."""
    digest = hashlib.sha256(x_train.tobytes())
    digest.update(y_train.tobytes())
    return digest.hexdigest()[:16]


def cache_path(data_dir, x_train, y_train):
    """Where the classifier of this training set, this size and this training is kept."""
    name = f"classifier-{HIDDEN}x{EPOCHS}-{identity(x_train, y_train)}.npz"
    return os.path.join(data_dir, name)


def save_classifier(model, record, path):
    arrays = {name: value for name, value in model.params().items()}
    arrays["record"] = np.array(json.dumps(record))
    with mnist.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_classifier(path):
    """(the classifier, its record) from path, or None if it is not there or not readable."""
    try:
        with np.load(path) as saved:
            model = Classifier()
            for name, value in model.params().items():
                value[...] = saved[name]
            record = json.loads(str(saved["record"]))
    except (OSError, KeyError, ValueError):
        return None
    return model, record


def for_dataset(x_train, y_train, x_test, y_test, data_dir, log=print):
    """The dataset's classifier, its record (test accuracy, seconds to train) and the held-out
    images: loaded from data_dir if trained before on the same training set, else trained now and
    saved there (if data_dir can be written)."""
    train_rows, held_out_rows = held_out_split(len(x_train))
    path = cache_path(data_dir, x_train, y_train) if data_dir else None
    loaded = load_classifier(path) if path else None
    if loaded:
        model, record = loaded
        log(f"  the classifier of {os.path.basename(path)}: test accuracy "
            f"{record['test_accuracy']:.2%}")
        return model, record, x_train[held_out_rows]
    log(f"training the classifier that measures the samples ({HIDDEN} hidden units, {EPOCHS} "
        f"epochs on {train_rows.stop:,} training images; once per dataset)")
    t0 = time.perf_counter()
    model = train_classifier(x_train[train_rows], y_train[train_rows], log=log)
    record = {"test_accuracy": model.accuracy(x_test, y_test), "hidden": HIDDEN,
              "epochs": EPOCHS, "trained_on": train_rows.stop,
              "held_out": held_out_rows.stop - held_out_rows.start,
              "seconds": round(time.perf_counter() - t0, 2)}
    log(f"  test accuracy {record['test_accuracy']:.2%}, trained in {record['seconds']:.1f} s")
    if path:
        try:
            save_classifier(model, record, path)
            log(f"  kept as {path}, for every run on this training set")
        except OSError as err:
            log(f"  not kept ({path}: {err.strerror}): it is trained again next time")
    return model, record, x_train[held_out_rows]
