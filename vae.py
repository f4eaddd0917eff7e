"""The variational autoencoder (Kingma & Welling 2014), forward and backward written out by hand.

    encoder:  x (B, D) -> h -> [mu, log_var] (B, 2Z)      q(z|x) = N(mu, diag(sigma^2)), sigma = exp(log_var / 2)
    sample:   z = mu + sigma * eps,  eps ~ N(0, I)         the reparameterization: z is a function of mu, log_var
    decoder:  z (B, Z) -> h -> logits (B, D)               p(x|z) = Bernoulli(sigmoid(logits)), pixel by pixel
    loss:     -ELBO = -log p(x|z) + KL(q(z|x) || N(0, I)), averaged over the batch, in nats per example
"""
import contextlib
import os
import zipfile

import numpy as np

from autograd import MLP


class CheckpointError(Exception):
    """A model file that cannot be loaded: missing, corrupt, or of another architecture."""


def sigmoid(logits):
    # 1 / (1 + exp(-l)), written with e = exp(-|l|) <= 1 so that no exp overflows for any l.
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0, e) / (1.0 + e)


class VAE:
    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.n_in, self.hidden, self.latent = n_in, hidden, latent
        # One output layer of 2Z units, split into mu and log_var: the same as two heads of Z units each
        # (the reference recipe's fc21 and fc22), with one matrix product instead of two.
        self.encoder = MLP([n_in, hidden, 2 * latent], rng, dtype)
        self.decoder = MLP([latent, hidden, n_in], rng, dtype)

    def params(self):
        """{name: array} of every parameter, by reference (updating one updates the model)."""
        return {**self.encoder.named("params", "enc"), **self.decoder.named("params", "dec")}

    def grads(self):
        """{name: dL/dparam}, filled by backward(), by reference."""
        return {**self.encoder.named("grads", "enc"), **self.decoder.named("grads", "dec")}

    def encode(self, x):
        """x (B, D) in [0, 1] -> mu, log_var (B, Z) of q(z|x)."""
        h = self.encoder.forward(x)
        return h[:, :self.latent], h[:, self.latent:]

    def decode(self, z):
        """z (B, Z) -> Bernoulli logits (B, D)."""
        return self.decoder.forward(z)

    # ---- training: the negative ELBO and its gradient ------------------------------------------------------

    def forward(self, x, eps):
        """Negative ELBO of the batch x (B, D) for the noise eps (B, Z); returns (loss, recon, kl), each the
        batch mean in nats per example. Loss and gradients are a deterministic function of (params, x, eps)."""
        mu, log_var = self.encode(x)
        sigma = np.exp(0.5 * log_var)                                   # sigma = exp(log_var / 2)
        z = mu + sigma * eps                                            # z = mu + sigma * eps
        logits = self.decode(z)
        # Reconstruction: -log p(x|z) = sum_j softplus(l_j) - x_j l_j (binary cross-entropy from logits),
        # softplus(l) = log(1 + exp(l)) = max(l, 0) + log1p(exp(-|l|)), stable for any l.
        e = np.exp(-np.abs(logits))
        recon = (np.maximum(logits, 0) + np.log1p(e) - x * logits).sum(axis=1)
        # KL(N(mu, sigma^2) || N(0, 1)) summed over dimensions (Kingma & Welling, Appendix B):
        # KL = -1/2 * sum(1 + log_var - mu^2 - exp(log_var))
        kl = -0.5 * (1.0 + log_var - mu * mu - sigma * sigma).sum(axis=1)
        self.cache = (x, mu, log_var, sigma, eps, logits, e)
        recon, kl = float(recon.mean()), float(kl.mean())
        return recon + kl, recon, kl

    def backward(self):
        """Gradients of the last forward()'s loss into self.grads(), every path written out."""
        x, mu, log_var, sigma, eps, logits, e = self.cache
        B = x.shape[0]                                                  # the loss is a mean over the batch
        # Reconstruction -> logits: d/dl [softplus(l) - x l] = sigmoid(l) - x.
        dlogits = (np.where(logits >= 0, 1.0, e) / (1.0 + e) - x) / B  # sigmoid(l) - x, per example / B
        # Logits -> z, through the decoder's layers: dL_rec/dz (B, Z).
        dz = self.decoder.backward(dlogits)
        # z = mu + sigma * eps reaches mu directly (dz/dmu = 1); the KL adds d/dmu[mu^2 / 2] = mu.
        dmu = dz + mu / B                                               # dL/dmu = dL/dz + mu
        # z reaches log_var through sigma: dz/dsigma = eps, dsigma/dlog_var = sigma / 2.
        dlog_var = dz * eps * 0.5 * sigma                               # reconstruction path: dL/dz * eps * sigma/2
        # The KL adds d/dlog_var[-1/2 (1 + log_var - exp(log_var))] = (exp(log_var) - 1) / 2 = (sigma^2 - 1) / 2.
        dlog_var += 0.5 * (sigma * sigma - 1.0) / B                     # KL path
        # eps gets no gradient: it is the noise, drawn outside the model, a function of no parameter.
        # [mu, log_var] -> encoder weights. dL/dx is not needed: x is data.
        self.encoder.backward(np.concatenate([dmu, dlog_var], axis=1), need_dx=False)

    # ---- using a trained model -----------------------------------------------------------------------------

    def reconstruct(self, x):
        """Bernoulli means of p(x|z) at z = mu(x), the posterior's centre: (B, D) in [0, 1]."""
        mu, _ = self.encode(x)
        return sigmoid(self.decode(mu))

    def sample_prior(self, n, rng):
        """n images decoded from z ~ N(0, I), the prior: draws from the whole data distribution."""
        z = rng.standard_normal((n, self.latent)).astype(self.dtype)
        return sigmoid(self.decode(z))

    def sample_posterior(self, x, n, rng):
        """n images for each row of x, decoded from z ~ q(z|x) = N(mu(x), sigma(x)^2): variations of x.
        Returns (len(x), n, D)."""
        mu, log_var = self.encode(x)
        eps = rng.standard_normal((len(x), n, self.latent)).astype(self.dtype)
        z = mu[:, None, :] + np.exp(0.5 * log_var)[:, None, :] * eps   # z = mu + sigma * eps, n per input
        return sigmoid(self.decode(z.reshape(-1, self.latent))).reshape(len(x), n, -1)

    @property
    def dtype(self):
        return self.encoder.layers[0].params["W"].dtype

    @property
    def arch(self):
        return {"n_in": self.n_in, "hidden": self.hidden, "latent": self.latent}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes. A crash or
    Ctrl-C mid-write leaves the previous file (or none), never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(model, path, **extra):
    """One .npz: the architecture, every parameter, and any extra arrays (a training checkpoint's state)."""
    arrays = {"arch": np.array([model.n_in, model.hidden, model.latent]), **model.params(),
              **{"extra." + k: v for k, v in extra.items()}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load(path, expect_arch=None):
    """(model, extra) from a file written by save(). Raises CheckpointError with a one-line reason."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable model file ({err}); delete it or train again")
    if "arch" not in arrays or arrays["arch"].shape != (3,):
        raise CheckpointError(f"{path}: no architecture record; not a model saved by this project")
    n_in, hidden, latent = (int(v) for v in arrays["arch"])
    arch = {"n_in": n_in, "hidden": hidden, "latent": latent}
    if expect_arch is not None and arch != expect_arch:
        raise CheckpointError(f"{path}: architecture {arch} differs from the requested {expect_arch}; "
                              f"pass the same --hidden/--latent or start a new run")
    dtype = arrays["enc.0.W"].dtype if "enc.0.W" in arrays else np.float32
    model = VAE(n_in, hidden, latent, dtype=dtype)
    for name, p in model.params().items():
        if name not in arrays or arrays[name].shape != p.shape:
            raise CheckpointError(f"{path}: parameter {name} is missing or has the wrong shape; corrupt file")
        p[...] = arrays[name]
    extra = {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}
    return model, extra
