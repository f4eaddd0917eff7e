"""Train the VAE on MNIST, the recipe of pytorch/examples' vae/main.py with every step by hand.

    python train.py                     # 784-400-20-400-784, ReLU, Bernoulli, Adam 1e-3, batch 128
    python train.py --latent 2 --epochs 5
    python train.py --dataset fashion --data-dir /usr/share/datasets/fashion-mnist

Each epoch is one pass over the training set in a new random order: for each batch of images, the
noise eps ~ N(0, I), the forward pass (the negative ELBO), the backward pass (its gradient) and an
Adam step. The test loss follows each epoch. At the end the model is saved, with three pictures of
what it learned:
    reconstructions.png   test images and their reconstructions, decoded at z = mu(x)
    samples_prior.png     z ~ p(z) = N(0, I), decoded: new images from all over the data (a draw
                          where no image's posterior lies decodes to a blend: README.md)
    samples_posterior.png z ~ q(z|x) of one test image, decoded: variations of that image
This file imports vae.py, autograd.py and mnist.py, and nothing else of the project. The lab
(python -m lab) trains with this file's step and adds resumable runs, measurements, more figures,
the latent-space explorer and the experiments.
"""
import argparse
import math
import os
import shlex
import sys
import time

import numpy as np
from matplotlib.figure import Figure

import mnist
from autograd import Adam
from vae import VAE

# What a run writes into its folder; it writes into no folder that holds anything else.
OUTPUTS = ("model.npz", "reconstructions.png", "samples_prior.png", "samples_posterior.png")


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: training diverged."""


# ---- the training loop ---------------------------------------------------------------------------

def kl_weight(beta, warmup, global_step, n_steps):
    """The KL weight at a step: beta, or during a warm-up of `warmup` epochs beta * t / (warmup *
    steps per epoch) at global step t (counted from 0): 0 at the first step, beta from the first
    step after the warm-up on (Bowman et al. 2016; Sonderby et al. 2016)."""
    if not warmup:
        return beta
    return beta * min(1.0, global_step / (warmup * n_steps))


def batch(x_train, rows, rng, latent):
    """The images at `rows` as the model sees them, intensities x / 255 in [0, 1] (B, D), and their
    noise eps ~ N(0, I) (B, Z), one row per image: all the randomness of a step."""
    x = mnist.to_float(x_train[rows])
    eps = rng.standard_normal((len(x), latent), dtype=np.float32)
    return x, eps


def train_step(model, opt, x, eps, beta):
    """One step on the batch x: forward, backward, Adam. Returns the batch's (loss, recon, kl), the
    negative ELBO and its two terms, measured before the step."""
    # z = mu + sigma * eps; loss = -log p(x|z) + KL(q(z|x) || p(z)), each the batch mean
    loss, recon, kl = model.forward(x, eps)
    if not np.isfinite(loss):
        raise NonFiniteLoss(f"the loss became {loss}")
    # the gradient of recon + beta * KL, by hand, into model.grads()
    model.backward(beta)
    # theta <- theta - lr * m_hat / (sqrt(v_hat) + eps), on every parameter
    opt.step(model.grads())
    return loss, recon, kl


def train_epoch(model, opt, x_train, args, rng, epoch):
    """One pass over the training set in a random order: one step per batch. Returns the epoch's
    mean loss per image."""
    order = rng.permutation(len(x_train))
    n_steps = math.ceil(len(x_train) / args.batch_size)
    total = 0.0
    for step in range(n_steps):
        rows = order[step * args.batch_size:(step + 1) * args.batch_size]
        x, eps = batch(x_train, rows, rng, model.latent)
        beta = kl_weight(args.beta, args.kl_warmup, epoch * n_steps + step, n_steps)
        loss, recon, kl = train_step(model, opt, x, eps, beta)
        total += loss * len(x)
    return total / len(x_train)


def test_loss(model, x_test, seed, batch_size=250):
    """The negative ELBO of the test set in nats per image, one z per image, with the same eps every
    time (a stream of its own, so that epochs compare and training's stream never moves)."""
    rng = np.random.default_rng([seed, 1])
    total = 0.0
    for i in range(0, len(x_test), batch_size):
        x = mnist.to_float(x_test[i:i + batch_size])
        eps = rng.standard_normal((len(x), model.latent)).astype(np.float32)
        loss, recon, kl = model.forward(x, eps)
        total += loss * len(x)
    return total / len(x_test)


# ---- what the run leaves: the model and three pictures -------------------------------------------

def save_model(model, path):
    """model.npz: the sizes [D, hidden, Z] and every parameter by name (enc.0.W, ..., dec.2.b).
    Written whole or not at all; the lab reads it (python -m lab --analyze)."""
    sizes = np.array([model.n_in, model.hidden, model.latent])
    with mnist.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, arch=sizes, **model.params())


def save_grid(path, images, rows, title):
    """images (N, 784) in [0, 1] as `rows` rows of 28 x 28 tiles, ink dark on white, with a title;
    written whole or not at all."""
    columns = len(images) // rows
    tiles = images[:rows * columns].reshape(rows, columns, 28, 28)
    grid = tiles.transpose(0, 2, 1, 3).reshape(rows * 28, columns * 28)
    figure = Figure(figsize=(columns * 0.8, rows * 0.8 + 0.4))
    ax = figure.add_subplot()
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    with mnist.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def save_pictures(model, x_test, out, seed):
    """The three pictures: what the model keeps of an image, what it generates, and what one image's
    posterior holds."""
    rng = np.random.default_rng([seed, 2])      # a stream of its own, as test_loss's
    x = mnist.to_float(x_test[:8])
    # top row the test images, bottom row their reconstructions E[x|z] at z = mu(x)
    pairs = np.concatenate([x, model.reconstruct(x)])
    save_grid(os.path.join(out, "reconstructions.png"), pairs, 2,
              "test images (top) and their reconstructions at z = mu(x)")
    # z ~ N(0, I): where every image's posterior has been pulled during training
    samples = model.sample_prior(64, rng)
    save_grid(os.path.join(out, "samples_prior.png"), samples, 8, "z ~ p(z) = N(0, I), decoded")
    # z ~ q(z|x) = N(mu(x), sigma(x)^2) of one image: the image first, then 15 draws
    variations = model.sample_posterior(x[:1], 15, rng)[0]
    tiles = np.concatenate([x[:1], variations])
    save_grid(os.path.join(out, "samples_posterior.png"), tiles, 2,
              "a test image (first), then z ~ q(z|x) of it, decoded")


# ---- the command ---------------------------------------------------------------------------------

def positive(kind):
    """An argparse type: a number of `kind` above 0."""
    def parse(text):
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def not_negative(kind):
    """An argparse type: a number of `kind` at least 0."""
    def parse(text):
        value = kind(text)
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive(int), default=10, help="default: 10")
    p.add_argument("--batch-size", type=positive(int), default=128, help="default: 128")
    p.add_argument("--lr", type=positive(float), default=1e-3, help="Adam's step (default: 1e-3)")
    p.add_argument("--hidden", type=positive(int), default=400, help="hidden units (default: 400)")
    p.add_argument("--latent", type=positive(int), default=20, help="Z (default: 20)")
    p.add_argument("--beta", type=not_negative(float), default=1.0,
                   help="the KL weight: train on recon + beta * KL (default: 1, the -ELBO)")
    p.add_argument("--kl-warmup", type=not_negative(int), default=0,
                   help="epochs over which the KL weight rises from 0 to beta (default: 0)")
    p.add_argument("--seed", type=not_negative(int), default=0, help="default: 0")
    p.add_argument("--dataset", choices=sorted(mnist.DATASETS), default="mnist")
    p.add_argument("--data-dir", help="where the archives are (default: data/<dataset>, "
                                      "downloaded there if missing)")
    p.add_argument("--out", help="output folder (default: runs/train-<dataset>)")
    args = p.parse_args(argv)
    if args.kl_warmup > args.epochs:
        p.error(f"--kl-warmup {args.kl_warmup} is longer than the {args.epochs} epochs: the KL "
                f"weight would never reach beta")
    args.out = args.out or os.path.join("runs", "train-" + args.dataset)
    return args


def written_here(path):
    """Whether a file of OUTPUTS is one this script writes: model.npz an .npz (a zip) archive, a
    picture a PNG (its 8-byte signature), not a file of the user's that has the same name."""
    with open(path, "rb") as f:
        start = f.read(8)
    if path.endswith(".npz"):
        return start[:4] == b"PK\x03\x04"
    return start == b"\x89PNG\r\n\x1a\n"


def check_out(out):
    """A run writes into a new folder, or one that holds only a run of this script: never over
    anything else. The folder is made here, before any training, so that one that cannot be made
    stops the run at once."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out):
        names = os.listdir(out)
        others = [f for f in names if f not in OUTPUTS]
        others += [f for f in names if f in OUTPUTS and not written_here(os.path.join(out, f))]
        if others:
            listed = ", ".join(sorted(others)[:3])
            if len(others) > 3:
                listed += f" and {len(others) - 3} more"
            raise FileExistsError(f"--out {out} holds files this script did not write ({listed}): "
                                  f"choose a new folder")
    os.makedirs(out, exist_ok=True)


def remove_if_empty(out, new_folder, code):
    """A run that stopped before writing leaves no empty folder that it made; returns code."""
    if new_folder and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    return code


def lab_command(args):
    """The command that measures and draws this run in the lab."""
    command = ["python", "-m", "lab", "--analyze", os.path.join(args.out, "model.npz")]
    if args.dataset != "mnist":
        command += ["--dataset", args.dataset]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return shlex.join(command)


def main(argv=None):
    args = parse_args(argv)
    new_folder = not os.path.exists(args.out)
    try:
        check_out(args.out)
        x_train, _, x_test, _ = mnist.load(args.dataset, args.data_dir)
        # the recipe: 784-400-20-400-784, ReLU, Bernoulli p(x|z), N(0, I) p(z), Adam
        model = VAE(n_in=x_train.shape[1], hidden=args.hidden, latent=args.latent, seed=args.seed)
        opt = Adam(model.params(), lr=args.lr)
        rng = np.random.default_rng(args.seed)      # the order of the images, and every eps
        print(f"{args.dataset}: {len(x_train)} training, {len(x_test)} test images; VAE "
              f"{model.n_in}-{args.hidden}-{args.latent}-{args.hidden}-{model.n_in}")
        for epoch in range(args.epochs):
            start = time.perf_counter()
            train = train_epoch(model, opt, x_train, args, rng, epoch)
            seconds = time.perf_counter() - start
            test = test_loss(model, x_test, args.seed)
            print(f"epoch {epoch + 1:3d}  train loss {train:7.2f}  test loss {test:7.2f}  "
                  f"({seconds:.1f} s)", flush=True)
        save_model(model, os.path.join(args.out, "model.npz"))
        save_pictures(model, x_test, args.out, args.seed)
    except NonFiniteLoss as err:
        print(f"error: {err}: training diverged; try a smaller --lr", file=sys.stderr)
        return remove_if_empty(args.out, new_folder, code=1)
    except (mnist.DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return remove_if_empty(args.out, new_folder, code=1)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written (a run writes its files at its end)", file=sys.stderr)
        return remove_if_empty(args.out, new_folder, code=130)
    print(f"wrote {', '.join(OUTPUTS)} into {args.out}")
    print(f"measure and draw it in the lab: {lab_command(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
