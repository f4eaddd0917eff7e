"""The step floor and the iw_nll floor: the least time NumPy on this machine takes for the work a training step
and the importance-weighted bound cannot do without.

The step floor is three parts of a step of the recipe:
    its matrix products (autograd.matmul_floor, the product floor: the same shapes, nothing else between them),
    Adam's update of the 652,824 parameters (autograd.Adam.step alone, on gradients held fixed: ten passes over
        them, the fewest NumPy allows for Adam, as its docstring says),
    the two transcendentals of the Bernoulli loss over a batch of logits: exp, then log (softplus needs both).
The iw_nll floor is its decoder's two products (and the ReLU between them, 1% of it) over the S x N codes (2,500 at
a time, as analysis.iw_nll decodes them) and exp and log over their S x N x 784 logits (250 codes at a time). Each
part is timed alone, on arrays of the recipe's shapes (median of --reps): no batching, bias, gradient arithmetic,
allocation or Python between the parts is counted, so at the same moment no NumPy implementation of the same
algorithm takes less. But it is timed in a process of its own, and moves with the machine as everything else does:
compared with another command's time, it is one more noisy measurement (in one of five alternated rounds in
docs/experiments.md it came out above train.py's epoch).

usage:
    python benchmarks/floor.py [--batch-size 128] [--n-train 60000] [--iw-samples 100] [--n-test 10000] [--reps 50]
Prints each part, then one JSON line whose "epoch_s_median" (the key benchmarks/alternate.py reads) is the step
floor times the steps of an epoch, so that alternate.py can time it in turn with `python train.py $FASHION
--benchmark` and benchmarks/torch_vae.py (alternate.py divides the first command's time by each other's: name
train.py first, and the ratio to the floor says how far train.py is above it). NumPy only; it imports the
repository's autograd.py and vae.py.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # the repository's modules
from autograd import Adam  # noqa: E402
from speed import matmul_floor  # noqa: E402
from vae import VAE  # noqa: E402


def median_seconds(f, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return float(np.median(times))


def transcendentals(rows, n_out, reps, rng):
    """Seconds for exp(-|l|) and log(1 + e) over a (rows, n_out) float32 array, the softplus's two, each written
    into an array made beforehand (no allocation timed)."""
    minus_abs = -np.abs(4 * rng.standard_normal((rows, n_out), dtype=np.float32))
    one_plus_e, out = 1 + np.exp(minus_abs), np.empty_like(minus_abs)
    return (median_seconds(lambda: np.exp(minus_abs, out=out), reps)
            + median_seconds(lambda: np.log(one_plus_e, out=out), reps))


def main():
    p = argparse.ArgumentParser(description="Time the least work of a training step and of iw_nll, alone.")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=60000, help="training images (steps per epoch)")
    p.add_argument("--iw-samples", type=int, default=100, metavar="S")
    p.add_argument("--n-test", type=int, default=10000, help="test images of the bound")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    model = VAE()                                   # the recipe: 784-400-20-400-784, float32
    B, D = args.batch_size, model.n_in

    # The step: products, Adam, exp and log.
    products, flops = matmul_floor([model.encoder, model.decoder], B, model.dtype, args.reps)
    params, grads = model.params(), model.grads()
    for g in grads.values():
        g[...] = 1e-3 * rng.standard_normal(g.shape)
    opt = Adam(params)
    adam = median_seconds(lambda: opt.step(grads), max(args.reps, 200))
    exp_log = transcendentals(B, D, args.reps, rng)
    step = products + adam + exp_log
    n_steps = math.ceil(args.n_train / B)
    print(f"step floor: products {1e3 * products:.3f} ms ({flops / products / 1e9:.0f} GFLOP/s) + Adam "
          f"{1e3 * adam:.3f} ms ({sum(p.size for p in params.values()):,} parameters) + exp and log "
          f"{1e3 * exp_log:.3f} ms = {1e3 * step:.3f} ms; x {n_steps} steps = {step * n_steps:.3f} s an epoch")

    # The bound: the decoder's two products over every code, 2,500 at a time; exp and log over every logit.
    codes, block, piece = args.iw_samples * args.n_test, 2500, 250
    z = rng.standard_normal((block, model.latent), dtype=np.float32)
    W3, W4 = (layer.params["W"] for layer in model.decoder.layers[::2])
    h, logits = np.empty((block, W3.shape[1]), np.float32), np.empty((block, D), np.float32)     # no allocation timed
    decode = median_seconds(lambda: np.matmul(np.maximum(np.matmul(z, W3, out=h), 0, out=h), W4, out=logits),
                            args.reps) * codes / block
    pixels = transcendentals(piece, D, args.reps, rng) * codes / piece
    print(f"iw_nll floor (S = {args.iw_samples}, {args.n_test} images): decoder products {decode:.2f} s "
          f"({2 * codes * (h.shape[1] * (model.latent + D)) / decode / 1e9:.0f} GFLOP/s) + exp and log over "
          f"{codes * D / 1e6:,.0f} million logits {pixels:.2f} s = {decode + pixels:.2f} s")
    print(json.dumps({"epoch_s_median": step * n_steps, "step_ms": {"products": 1e3 * products, "adam": 1e3 * adam,
                      "exp_log": 1e3 * exp_log}, "iw_nll_floor_s": decode + pixels}))


if __name__ == "__main__":
    main()
