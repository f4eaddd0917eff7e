"""Burda et al.'s one-stochastic-layer model in plain PyTorch: the baseline beside the lab's runs of
iwae.py, trained the same way, and timed step by step.

The setting (Burda, Grosse & Salakhutdinov 2016, section 5), as the lab's options name it:
    784-200-200-50 MLPs with tanh on each side (--layers 2 --activation tanh --hidden 200
    --latent 50), a Bernoulli likelihood on the logits, z_i = mu + sigma * eps_i, k draws per image
    (--samples k), the IWAE bound log (1/k) sum_i w_i or the mean of k ELBOs (--objective iwae or
    elbo), dynamically binarized MNIST (each pixel drawn as Bernoulli(intensity) each time an image
    is used; the test set once), Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20, and the
    schedule of 3^i epochs at lr 1e-3 * 10^(-i/7), cut at --epochs. The test NLL is the IWAE bound
    of --iw-samples draws per test image (the paper: 5,000).
The images are held in memory as tensors and sliced (no DataLoader), on --threads 2 CPU threads.
torch is never a dependency of this project; see benchmarks/torch_vae.py for the venv.

usage:
    /tmp/torchenv/bin/python benchmarks/torch_iwae.py DATA_DIR [--objective iwae|elbo]
        [--samples K] [--epochs E] [--iw-samples S] [--seed 0] [--threads 2] [--time-steps N]
--time-steps N: no training to the end; time N steps after 20 of warm-up and print one JSON line
{"step_ms_median": ..., "step_ms": [...]}. Otherwise one line per epoch (its mean train bound, the
test bound of one draw, seconds), then a JSON line {"epochs": E, "test_nll": ..., "curve": [...],
"active_units": ...}.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_vae  # noqa: E402  (its IDX reader)

try:
    import torch
    import torch.nn.functional as F
except ImportError:                     # an optional script: main() says how to get torch
    torch = None


def make_model(hidden=200, latent=50):
    """Two tanh layers a side: the encoder's output is [mu, log_var], the decoder's the logits."""
    encoder = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.Tanh(),
                                  torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                  torch.nn.Linear(hidden, 2 * latent))
    decoder = torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.Tanh(),
                                  torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                  torch.nn.Linear(hidden, 784))
    return encoder, decoder


def bound(encoder, decoder, x, k, objective):
    """Per image: log (1/k) sum_i w_i (iwae) or (1/k) sum_i log w_i (elbo), w_i = p(x|z_i) p(z_i) /
    q(z_i|x), z_i = mu + sigma * eps_i."""
    out = encoder(x)
    latent = out.shape[1] // 2
    mu = out[:, :latent]
    log_var = out[:, latent:]
    eps = torch.randn(k, *mu.shape)
    z = mu + torch.exp(0.5 * log_var) * eps
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                 reduction="none").sum(-1)
    log_pz = -0.5 * (z ** 2).sum(-1) - 0.5 * latent * math.log(2 * math.pi)
    log_qz = -0.5 * (eps ** 2 + log_var).sum(-1) - 0.5 * latent * math.log(2 * math.pi)
    log_w = log_px + log_pz - log_qz
    if objective == "iwae":
        return torch.logsumexp(log_w, 0) - math.log(k)
    return log_w.mean(0)


def learning_rate(epoch, base=1e-3):
    """Stage i (3^i epochs) at base * 10^(-i/7), i = 0..7."""
    stage = 0
    stage_end = 1
    while epoch >= stage_end and stage < 7:
        stage += 1
        stage_end += 3 ** stage
    return base * 10 ** (-stage / 7)


def test_nll(encoder, decoder, x_test, samples, chunk=100):
    """-log p(x) ~ -log (1/S) sum_s w_s per test image, the mean, S draws in chunks."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x_test), 10):
            x = x_test[i:i + 10]
            parts = [bound(encoder, decoder, x, min(chunk, samples - j), "iwae") +
                     math.log(min(chunk, samples - j)) for j in range(0, samples, chunk)]
            log_sum = torch.logsumexp(torch.stack(parts), 0)
            total += float(-(log_sum - math.log(samples)).sum())
    return total / len(x_test)


def active_units(encoder, x_test, threshold=0.01):
    """Units whose posterior mean varies over the test images: Var_x E[z|x] > 0.01."""
    with torch.no_grad():
        mu = encoder(x_test)[:, :encoder[-1].out_features // 2]
    return int((mu.var(0) > threshold).sum())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data_dir")
    p.add_argument("--objective", choices=("iwae", "elbo"), default="iwae")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--iw-samples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-steps", type=int, default=0)
    args = p.parse_args()
    if torch is None:
        print("torch is not installed: see the docstring", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train = torch_vae.read_images(os.path.join(args.data_dir, "train-images-idx3-ubyte.gz"))
    x_test = torch_vae.read_images(os.path.join(args.data_dir, "t10k-images-idx3-ubyte.gz"))
    x_test = torch.bernoulli(x_test)                # the test set binarized once
    encoder, decoder = make_model()
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-4)
    if args.time_steps:
        times = []
        for step in range(20 + args.time_steps):
            x = torch.bernoulli(x_train[step * 20:(step + 1) * 20])
            t0 = time.perf_counter()
            loss = -bound(encoder, decoder, x, args.samples, args.objective).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        step_ms = [1000 * t for t in times[20:]]
        print(json.dumps({"step_ms_median": statistics.median(step_ms), "step_ms": step_ms}))
        return 0
    curve = []
    for epoch in range(args.epochs):
        for group in opt.param_groups:
            group["lr"] = learning_rate(epoch)
        order = torch.randperm(len(x_train))
        t0 = time.perf_counter()
        total = 0.0
        for i in range(0, len(x_train), 20):
            x = torch.bernoulli(x_train[order[i:i + 20]])     # dynamic binarization
            loss = -bound(encoder, decoder, x, args.samples, args.objective).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            test = float(-bound(encoder, decoder, x_test, 1, "elbo").mean())
        curve.append(test)
        print(f"epoch {epoch + 1}: train {total / len(x_train):.2f}  test (one draw) {test:.2f}  "
              f"{seconds:.1f} s", flush=True)
    nll = test_nll(encoder, decoder, x_test, args.iw_samples)
    print(json.dumps({"epochs": args.epochs, "test_nll": nll, "curve": curve,
                      "active_units": active_units(encoder, x_test)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
