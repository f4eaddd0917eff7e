"""The step floor and the iw_nll floor: the least time NumPy on this machine takes for the work a
training step and the importance-weighted bound cannot do without.

The step floor is three parts of a step of the recipe:
    its matrix products (speed.matmul_floor, the product floor: the same shapes, nothing else
        between them),
    Adam's update of the 652,824 parameters (autograd.Adam.step alone, on gradients held fixed:
        the textbook update train.py makes, not a fused form with fewer passes over them),
    the two transcendentals of the Bernoulli loss over a batch of logits: exp, then log (softplus
        needs both).
The iw_nll floor is its decoder's two products (and the ReLU between them, 1% of it) over the
S x N codes (2,500 at a time, as analysis.iw_nll decodes them) and exp and log over their
S x N x 784 logits (250 codes at a time). Each part is timed alone, on arrays of the recipe's
shapes (median of --reps): no batching, bias, gradient arithmetic, allocation or Python between the
parts is counted, so at the same moment no NumPy implementation of the same algorithm takes less
for the products and the transcendentals (Adam is timed as train.py writes it). But it is timed in
a process of its own, and moves with the machine as everything else does: compared with another
command's time, it is one more noisy measurement (in one of five alternated rounds in
docs/experiments.md it came out above train.py's epoch).

usage:
    python benchmarks/floor.py [--batch-size 128] [--n-train 60000] [--iw-samples 100]
        [--n-test 10000] [--reps 50]
Prints each part, then one JSON line whose "epoch_s_median" (the key benchmarks/alternate.py reads)
is the step floor times the steps of an epoch, so that alternate.py can time it in turn with
`python -m lab $FASHION --benchmark` and benchmarks/torch_vae.py (alternate.py divides the first
command's time by each other's: name train.py first, and the ratio to the floor says how far
train.py is above it). NumPy only; it imports the repository's autograd.py, lab/speed.py and vae.py.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

# the repository's modules, from the folder above
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from autograd import Adam  # noqa: E402
from lab.speed import matmul_floor  # noqa: E402
from vae import VAE  # noqa: E402


def median_seconds(f, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def transcendentals(rows, n_out, reps, rng):
    """Seconds for exp(-|l|) and log(1 + e) over a (rows, n_out) float32 array, the softplus's
    two, each written into an array made beforehand (no allocation timed)."""
    logits = 4 * rng.standard_normal((rows, n_out), dtype=np.float32)
    minus_abs = -np.abs(logits)
    one_plus_e = 1 + np.exp(minus_abs)
    out = np.empty_like(minus_abs)
    exp_seconds = median_seconds(lambda: np.exp(minus_abs, out=out), reps)
    log_seconds = median_seconds(lambda: np.log(one_plus_e, out=out), reps)
    return exp_seconds + log_seconds


def main():
    p = argparse.ArgumentParser(
        description="Time the least work of a training step and of iw_nll, alone.")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=60000, help="training images (steps per epoch)")
    p.add_argument("--iw-samples", type=int, default=100, metavar="S")
    p.add_argument("--n-test", type=int, default=10000, help="test images of the bound")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    model = VAE()                                   # the recipe: 784-400-20-400-784, float32
    B = args.batch_size
    D = model.n_in

    # The step: products, Adam, exp and log.
    products, flops = matmul_floor([model.encoder, model.decoder], B, model.dtype, args.reps)
    params = model.params()
    grads = model.grads()
    for g in grads.values():
        g[...] = 1e-3 * rng.standard_normal(g.shape)
    opt = Adam(params)
    adam = median_seconds(lambda: opt.step(grads), max(args.reps, 200))
    exp_log = transcendentals(B, D, args.reps, rng)
    step = products + adam + exp_log
    n_steps = math.ceil(args.n_train / B)
    n_params = sum(a.size for a in params.values())
    print(f"step floor: products {1e3 * products:.3f} ms ({flops / products / 1e9:.0f} GFLOP/s) "
          f"+ Adam {1e3 * adam:.3f} ms ({n_params:,} parameters) + exp and log "
          f"{1e3 * exp_log:.3f} ms = {1e3 * step:.3f} ms; x {n_steps} steps = "
          f"{step * n_steps:.3f} s an epoch")

    # The bound: the decoder's two products over every code, 2,500 at a time; exp and log over
    # every logit.
    codes = args.iw_samples * args.n_test
    block = 2500                                    # codes decoded per product
    piece = 250                                     # codes per exp and log
    z = rng.standard_normal((block, model.latent), dtype=np.float32)
    W3 = model.decoder.layers[0].params["W"]        # (Z, hidden)
    W4 = model.decoder.layers[2].params["W"]        # (hidden, D)
    h = np.empty((block, W3.shape[1]), np.float32)  # made beforehand: no allocation timed
    logits = np.empty((block, D), np.float32)

    def decode_block():
        np.matmul(z, W3, out=h)
        np.maximum(h, 0, out=h)                     # ReLU
        np.matmul(h, W4, out=logits)

    decode = median_seconds(decode_block, args.reps) * codes / block
    pixels = transcendentals(piece, D, args.reps, rng) * codes / piece
    decode_flops = 2 * codes * (h.shape[1] * (model.latent + D))
    print(f"iw_nll floor (S = {args.iw_samples}, {args.n_test} images): decoder products "
          f"{decode:.2f} s ({decode_flops / decode / 1e9:.0f} GFLOP/s) + exp and log over "
          f"{codes * D / 1e6:,.0f} million logits {pixels:.2f} s = {decode + pixels:.2f} s")
    step_ms = {"products": 1e3 * products, "adam": 1e3 * adam, "exp_log": 1e3 * exp_log}
    result = {"epoch_s_median": step * n_steps, "step_ms": step_ms,
              "iw_nll_floor_s": decode + pixels}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
