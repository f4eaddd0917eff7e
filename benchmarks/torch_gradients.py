"""Every hand-written gradient of the VAE against PyTorch's autograd, in one command.

For every prior (N(0, I), a mixture, the VampPrior) x every likelihood (Bernoulli, Gaussian with a
fixed, a learned, the optimal and a per-pixel sigma, continuous Bernoulli) x a KL weight of 1 and
0.3, a small float64
model computes the objective mean_b(recon_b + beta * kl_b) and its gradient by hand (vae.py,
priors.py, likelihoods.py; built by models.build). The same objective is then written again in
PyTorch from the model's parameter arrays, with torch's own densities where it has them
(binary_cross_entropy_with_logits, Normal, ContinuousBernoulli), and differentiated by autograd.
The optimal sigma is written in torch as the function of the parameters it is, sigma* = the
batch's root mean squared error, and autograd differentiates through it: the hand-written backward,
which holds sigma* fixed (the envelope theorem), must give the same gradient. Then iwae.py's
objectives (the IWAE bound and the mean of k ELBOs, k = 1 and 5, two tanh or ReLU layers a side),
with torch's logsumexp, Normal and binary cross-entropy.
Prints the largest relative error |a - b| / (|a| + |b|) per case and parameter group; exits 1 if
any is above 1e-10.

torch is not a dependency of this project: without it, this script says so and exits 0 (nothing
checked).
    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy matplotlib
    /tmp/torchenv/bin/python benchmarks/torch_gradients.py
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lab import models  # noqa: E402  (the project's modules, from the folder above)

try:
    import torch
    import torch.nn.functional as F
    from torch.distributions import ContinuousBernoulli, Normal
except ImportError:
    torch = None

PRIORS = ("standard", "mog", "vamp")
LIKELIHOODS = (                                     # p(x|z), with the Gaussian's decoder sigma
    {"likelihood": "bernoulli", "sigma": None},
    {"likelihood": "gaussian", "sigma": 0.3},
    {"likelihood": "gaussian", "sigma": "learned"},
    {"likelihood": "gaussian", "sigma": "optimal"},
    {"likelihood": "gaussian", "sigma": "per-pixel"},
    {"likelihood": "cb", "sigma": None},
)
BETAS = (1.0, 0.3)
CASES = [{"prior": prior, **likelihood, "beta": beta}
         for prior in PRIORS for likelihood in LIKELIHOODS for beta in BETAS]


def torch_objective(p, model, x, eps, beta):
    """mean_b(-log p(x_b|z_b) + beta * KL_b), written in torch from the parameters p
    ({name: tensor})."""
    def mlp(h, prefix):
        h = F.relu(h @ p[f"{prefix}.0.W"] + p[f"{prefix}.0.b"])
        return h @ p[f"{prefix}.2.W"] + p[f"{prefix}.2.b"]
    zdim = model.latent
    out = mlp(x, "enc")
    mu = out[:, :zdim]
    log_var = out[:, zdim:]
    sigma = torch.exp(0.5 * log_var)
    z = mu + sigma * eps
    logits = mlp(z, "dec")
    name = model.likelihood.name
    sigma_setting = models.decoder_sigma_of(model)
    if name == "bernoulli":
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    elif name == "cb":
        recon = -ContinuousBernoulli(logits=logits).log_prob(x).sum(1)
    elif sigma_setting == "per-pixel":              # the decoder's 2D outputs: logits, log sigmas
        d = x.shape[1]
        mean = torch.sigmoid(logits[:, :d])
        recon = -Normal(mean, torch.exp(logits[:, d:])).log_prob(x).sum(1)
    else:
        mean = torch.sigmoid(logits)
        if sigma_setting == "learned":
            log_sigma = p["likelihood.log_sigma"]
        elif sigma_setting == "optimal":            # sigma* as a function of the parameters
            log_sigma = 0.5 * torch.log(((x - mean) ** 2).mean())
        else:
            log_sigma = torch.tensor(math.log(sigma_setting), dtype=torch.float64)
        recon = -Normal(mean, torch.exp(log_sigma)).log_prob(x).sum(1)
    q = Normal(mu, sigma)
    if model.prior_name == "standard":
        p_z = Normal(torch.zeros_like(mu), torch.ones_like(sigma))
        kl = torch.distributions.kl_divergence(q, p_z).sum(1)
    else:
        if model.prior_name == "mog":
            means = p["prior.means"]
            log_vars = p["prior.log_vars"]
            log_pi = torch.log_softmax(p["prior.log_weights"], 0)
        else:                   # VampPrior: the encoder's posteriors of u = clip(w, 0, 1)
            out_u = mlp(torch.clamp(p["prior.w"], 0, 1), "enc")
            means = out_u[:, :zdim]
            log_vars = out_u[:, zdim:]
            k = len(means)
            log_pi = torch.full((k,), -math.log(k), dtype=torch.float64)
        component_sigma = torch.exp(0.5 * log_vars)
        components = Normal(means, component_sigma).log_prob(z[:, None, :]).sum(-1)   # (B, K)
        kl = q.log_prob(z).sum(1) - torch.logsumexp(log_pi + components, 1)
    return recon.mean() + beta * kl.mean()


# iwae.py's objectives: the IWAE bound and the mean of k ELBOs, with k draws per image, on two tanh
# (and two ReLU) layers a side
IWAE_CASES = [{"objective": objective, "samples": k, "activation": activation}
              for objective in ("iwae", "elbo") for k in (1, 5)
              for activation in ("tanh", "relu") if not (objective == "elbo" and k == 1)]


def torch_iwae_objective(p, model, x, eps, objective):
    """-L_k (IWAE: log (1/k) sum_i w_i) or -(1/k) sum_i log w_i, the batch mean, written in torch
    from the parameters p, with torch's own Normal and binary cross-entropy."""
    act = torch.tanh if model.activation.__name__ == "Tanh" else F.relu
    def mlp(h, prefix):
        last = 2 * model.layers
        for i in range(0, last, 2):
            h = act(h @ p[f"{prefix}.{i}.W"] + p[f"{prefix}.{i}.b"])
        return h @ p[f"{prefix}.{last}.W"] + p[f"{prefix}.{last}.b"]
    zdim = model.latent
    out = mlp(x, "enc")
    mu = out[:, :zdim]
    sigma = torch.exp(0.5 * out[:, zdim:])
    z = mu + sigma * eps                                    # (k, B, Z)
    logits = mlp(z, "dec")                                  # (k, B, D)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                 reduction="none").sum(-1)
    log_pz = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
    log_qz = Normal(mu, sigma).log_prob(z).sum(-1)
    log_w = log_px + log_pz - log_qz                        # (k, B)
    k = len(log_w)
    if objective == "iwae":
        bound = torch.logsumexp(log_w, 0) - math.log(k)
    else:
        bound = log_w.mean(0)
    return -bound.mean()


def check_iwae():
    """iwae.py's hand-written gradients against autograd: the largest relative error."""
    worst = 0.0
    for case in IWAE_CASES:
        rng = np.random.default_rng(0)
        model = models.build(n_in=12, hidden=7, latent=3, seed=1, dtype=np.float64, layers=2,
                             activation=case["activation"], objective=case["objective"],
                             samples=case["samples"])
        x = rng.uniform(0, 1, (5, 12))
        eps = rng.standard_normal((case["samples"], 5, 3))
        model.forward(x, eps)
        model.backward()
        p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params().items()}
        objective = torch_iwae_objective(p, model, torch.tensor(x), torch.tensor(eps),
                                         case["objective"])
        objective.backward()
        errors = {k: relative_error(g, p[k].grad.numpy()) for k, g in model.grads().items()}
        worst = max(worst, *errors.values())
        print(f"{case['objective']:5s} k = {case['samples']}  {case['activation']:4s}: largest "
              f"relative error {max(errors.values()):.1e}")
    return worst


def relative_error(a, b):
    """max |a - b| / (|a| + |b|), elementwise, with 0 / 0 counted as 0."""
    scale = np.maximum(np.abs(a) + np.abs(b), 1e-300)
    return float((np.abs(a - b) / scale).max())


def main():
    if torch is None:
        print("torch is not installed: nothing checked (pip install torch in a separate venv; "
              "see the docstring)")
        return 0
    worst = 0.0
    for case in CASES:
        prior = case["prior"]
        likelihood = case["likelihood"]
        sigma = case["sigma"]
        beta = case["beta"]
        rng = np.random.default_rng(0)
        model = models.build(prior, components=4, likelihood=likelihood, decoder_sigma=sigma,
                             n_in=12, hidden=7, latent=3, seed=1, dtype=np.float64)
        if prior == "vamp":                         # inside (0, 1), away from the clip's kinks
            model.prior["w"][...] = rng.uniform(0.05, 0.95, model.prior["w"].shape)
        if sigma == "learned":
            model.likelihood.params["log_sigma"][...] = -0.7
        x = rng.uniform(0, 1, (5, 12))
        eps = rng.standard_normal((5, 3))
        model.forward(x, eps)
        model.backward(beta)
        p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params().items()}
        objective = torch_objective(p, model, torch.tensor(x), torch.tensor(eps), beta)
        objective.backward()
        errors = {k: relative_error(g, p[k].grad.numpy()) for k, g in model.grads().items()}
        worst = max(worst, *errors.values())
        groups = {}                                 # the largest error per group: enc, dec, ...
        for k, e in errors.items():
            group = k.split(".")[0]
            groups[group] = max(groups.get(group, 0.0), e)
        group_errors = "  ".join(f"{g} {e:.1e}" for g, e in groups.items())
        print(f"{prior:8s} {likelihood:9s} sigma {str(sigma):9s} beta {beta:3g}: " + group_errors)
    worst = max(worst, check_iwae())
    print(f"largest relative error over {len(CASES) + len(IWAE_CASES)} cases: {worst:.1e}")
    return 0 if worst < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
