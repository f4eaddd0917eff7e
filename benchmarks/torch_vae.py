"""The plain PyTorch VAE that the README's speed and loss comparisons are measured against.

The recipe is pytorch/examples' vae/main.py, the same one train.py trains in NumPy:
    784-400-Z-400-784 MLPs with ReLU (Z = 20), two linear heads for mu and log_var,
    z = mu + sigma * eps with eps ~ N(0, I), a Bernoulli likelihood on the logits
    (binary_cross_entropy_with_logits summed over pixels), the closed-form KL (Appendix B),
    the loss summed over the batch, Adam lr 1e-3, batch 128, 10 epochs.
The images are read from the IDX archives into memory once, as float32 tensors x = pixel / 255 in
[0, 1], and batches are sliced from them (no DataLoader), on --threads 2 CPU threads: the loop
measures the model, not data loading. An epoch's seconds count the training steps only, as
train.py's do; the test loss is the negative ELBO on the 10,000 test images with one z each, in
nats per image.

torch is never a dependency of this project; install it in a separate venv:
    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy

usage:
    /tmp/torchenv/bin/python benchmarks/torch_vae.py DATA_DIR [--epochs 10] [--latent 20]
        [--hidden 400] [--batch-size 128] [--seed 0] [--threads 2] [--iw-samples S]
        [--flush-denormal]
DATA_DIR holds the four MNIST-format .gz archives (MNIST or Fashion-MNIST). Prints one line per
epoch, then one JSON line: {"epoch_seconds": [...], "epoch_s_median": ..., "test_loss": ...,
"iw_nll": ... or null, "flush_denormal": true or false}.
--flush-denormal calls torch.set_flush_denormal(True) before training: subnormal floats become zero.
Adam's first moments hold subnormals from the second epoch on (about 160,000 of 650,000 entries).
A CPU slow on subnormals then slows every later epoch; the flush avoids that, the losses unchanged.
"""
import argparse
import gzip
import json
import math
import statistics
import struct
import sys
import time

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError:                     # an optional script: main() says how to get torch
    torch = None


def read_images(path):
    """uint8 images from an IDX archive -> float32 tensor (N, rows * cols) of x = pixel / 255 in
    [0, 1]."""
    with gzip.open(path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">4i", f.read(16))
        if magic != 2051:               # 0x00000803: unsigned bytes, 3 dimensions
            raise ValueError(f"{path}: IDX magic {magic}, expected 2051 (an images file)")
        pixels = np.frombuffer(f.read(), dtype=np.uint8)
    if pixels.size != n * rows * cols:
        raise ValueError(f"{path}: header says {n} x {rows} x {cols} pixels, "
                         f"the file holds {pixels.size}")
    return torch.from_numpy(np.divide(pixels.reshape(n, rows * cols), 255, dtype=np.float32))


def make_vae(hidden, latent):
    """The encoder x -> h -> (mu, log_var) and the decoder z -> h -> logits, in pytorch/examples'
    layer order."""
    return torch.nn.ModuleDict({
        "encoder": torch.nn.Linear(784, hidden),
        "mu": torch.nn.Linear(hidden, latent),
        "log_var": torch.nn.Linear(hidden, latent),
        "decoder": torch.nn.Linear(latent, hidden),
        "logits": torch.nn.Linear(hidden, 784),
    })


def encode(vae, x):
    h = F.relu(vae["encoder"](x))
    return vae["mu"](h), vae["log_var"](h)


def decode(vae, z):
    h = F.relu(vae["decoder"](z))
    return vae["logits"](h)                             # logits l: p(x_j = 1 | z) = sigmoid(l_j)


def reparameterize(mu, log_var):
    eps = torch.randn_like(mu)
    return mu + torch.exp(0.5 * log_var) * eps          # z = mu + sigma * eps


def negative_elbo(vae, x):
    """-ELBO summed over the batch, one z per image (Kingma & Welling 2014, eq. 10 with Appendix
    B's KL)."""
    mu, log_var = encode(vae, x)
    z = reparameterize(mu, log_var)
    logits = decode(vae, z)
    # -log p(x|z) = sum softplus(l) - x l
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    # KL = -1/2 sum(1 + log_var - mu^2 - exp(log_var))
    kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
    return recon + kl


def log_normal(z, mu, log_var):
    """log N(z; mu, diag(exp(log_var))), summed over the last axis."""
    squared_distance = (z - mu) ** 2 / torch.exp(log_var)
    return -0.5 * torch.sum(math.log(2 * math.pi) + log_var + squared_distance, dim=-1)


def iw_nll(vae, x, S, rows=20000):
    """-log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x), z_s ~ q(z|x) (Burda et al. 2016), averaged
    over the images. A chunk of images decodes about `rows` codes at once, so memory stays bounded
    for any S."""
    total = 0.0
    chunk = max(1, rows // S)                   # images per chunk
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            x_chunk = x[i:i + chunk]
            mu, log_var = encode(vae, x_chunk)
            eps = torch.randn(S, *mu.shape)
            z = mu + torch.exp(0.5 * log_var) * eps                             # (S, images, Z)
            logits = decode(vae, z)
            x_s = x_chunk.expand_as(logits)                                     # x for every z_s
            bce = F.binary_cross_entropy_with_logits(logits, x_s, reduction="none")
            log_px_z = -bce.sum(-1)
            zeros = torch.zeros_like(z)
            log_pz = log_normal(z, zeros, zeros)
            log_qz_x = log_normal(z, mu, log_var)
            log_w = log_px_z + log_pz - log_qz_x                # log p(x|z) p(z) / q(z|x)
            log_mean_w = torch.logsumexp(log_w, dim=0) - math.log(S)    # log-mean-exp over s
            total -= log_mean_w.sum().item()
    return total / len(x)


def main():
    p = argparse.ArgumentParser(description="The pytorch/examples VAE recipe, timed per epoch.")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--latent", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iw-samples", type=int, default=0, metavar="S",
                   help="importance samples for iw_nll (0: skip)")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) before training: subnormals become zero")
    args = p.parse_args()
    if torch is None:
        print("error: torch_vae.py needs torch and numpy; install them in a separate venv: "
              "python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy",
              file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        supported = torch.set_flush_denormal(True)      # False on a CPU without DAZ and FTZ modes
        if not supported:
            print("warning: this CPU cannot flush denormals; running without", file=sys.stderr)
            args.flush_denormal = False
    try:
        x_train = read_images(f"{args.data_dir}/train-images-idx3-ubyte.gz")
        x_test = read_images(f"{args.data_dir}/t10k-images-idx3-ubyte.gz")
    except (OSError, ValueError, struct.error) as err:
        print(f"error: {err}; DATA_DIR must hold the MNIST-format archives "
              f"train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz", file=sys.stderr)
        sys.exit(1)
    vae = make_vae(args.hidden, args.latent)
    epoch_seconds, test_loss = train(vae, x_train, x_test, args)
    epoch_s_median = statistics.median(epoch_seconds) if epoch_seconds else None
    test_iw_nll = iw_nll(vae, x_test, args.iw_samples) if args.iw_samples > 0 else None
    result = {"epoch_seconds": [round(s, 4) for s in epoch_seconds],
              "epoch_s_median": epoch_s_median,
              "test_loss": test_loss,
              "iw_nll": test_iw_nll,
              "flush_denormal": args.flush_denormal}
    print(json.dumps(result))


def train(vae, x_train, x_test, args):
    """The epochs, each timed (its training steps only) and followed by the test loss: (epoch
    seconds, the last test loss)."""
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    epoch_seconds = []
    test_loss = None
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train))
        train_loss = 0.0
        for i in range(0, len(x_train), args.batch_size):
            loss = negative_elbo(vae, x_train[perm[i:i + args.batch_size]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_loss += loss.item()
        epoch_seconds.append(time.perf_counter() - t0)
        test_loss = 0.0
        with torch.no_grad():
            for i in range(0, len(x_test), 1000):
                test_loss += negative_elbo(vae, x_test[i:i + 1000]).item()
        test_loss /= len(x_test)
        print(f"epoch {epoch:3d}  train {train_loss / len(x_train):8.2f}  test {test_loss:8.2f}  "
              f"{epoch_seconds[-1]:5.2f} s", flush=True)
    return epoch_seconds, test_loss


if __name__ == "__main__":
    main()
