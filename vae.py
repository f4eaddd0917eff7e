"""The variational autoencoder (Kingma & Welling 2014), forward and backward written out by hand.

    encoder:  x (B, D) -> h -> [mu, log_var] (B, 2Z)      q(z|x) = N(mu, diag(sigma^2)), sigma = exp(log_var / 2)
    sample:   z = mu + sigma * eps,  eps ~ N(0, I)         the reparameterization: z is a function of mu, log_var
    decoder:  z (B, Z) -> h -> logits (B, D)               p(x|z) = Bernoulli(sigmoid(logits)), pixel by pixel
    loss:     -ELBO = -log p(x|z) + KL(q(z|x) || p(z)), averaged over the batch, in nats per example
    prior:    p(z) = N(0, I) (the standard VAE), or learned: a mixture of Gaussians ('mog'), or the VampPrior
              ('vamp', Tomczak & Welling 2018), p(z) = (1/K) sum_k q(z|u_k) with K learned pseudo-inputs u_k
"""
import contextlib
import os
import zipfile

import numpy as np

from autograd import MLP


class CheckpointError(Exception):
    """A model file that cannot be loaded: missing, corrupt, or of another architecture."""


def sigmoid(logits):
    # 1 / (1 + exp(-l)) = (1 + tanh(l / 2)) / 2: the same function, with no exp to overflow for any l.
    return 0.5 + 0.5 * np.tanh(0.5 * logits)


PRIORS = {"standard": 0, "mog": 10, "vamp": 100}   # the priors, with their default number of components K


class VAE:
    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, prior="standard",
                 components=None):
        rng = np.random.default_rng(seed)
        self.n_in, self.hidden, self.latent = n_in, hidden, latent
        # One output layer of 2Z units, split into mu and log_var: the same as two heads of Z units each
        # (the reference recipe's fc21 and fc22), with one matrix product instead of two.
        self.encoder = MLP([n_in, hidden, 2 * latent], rng, dtype)
        self.decoder = MLP([latent, hidden, n_in], rng, dtype)
        # A learned prior's own parameters, trained with the rest; the standard prior N(0, I) has none.
        self.prior, self.components = prior, (components or PRIORS[prior]) if prior != "standard" else 0
        k = self.components
        if prior == "mog":      # p(z) = sum_k pi_k N(z; m_k, diag(exp(log_vars_k))), pi = softmax(logits)
            self.prior_params = {"means": rng.standard_normal((k, latent)).astype(dtype),
                                 "log_vars": np.zeros((k, latent), dtype), "logits": np.zeros(k, dtype)}
        elif prior == "vamp":   # p(z) = (1/K) sum_k q(z|u_k): K pseudo-images (train.py starts them at real ones)
            self.prior_params = {"u": rng.uniform(0, 1, (k, n_in)).astype(dtype)}
        else:
            self.prior_params = {}
        self.prior_grads = {name: np.zeros_like(p) for name, p in self.prior_params.items()}

    def params(self):
        """{name: array} of every parameter, by reference (updating one updates the model)."""
        return {**self.encoder.named("params", "enc"), **self.decoder.named("params", "dec"),
                **{"prior." + k: v for k, v in self.prior_params.items()}}

    def grads(self):
        """{name: dL/dparam}, filled by backward(), by reference."""
        return {**self.encoder.named("grads", "enc"), **self.decoder.named("grads", "dec"),
                **{"prior." + k: v for k, v in self.prior_grads.items()}}

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
        B = len(x)
        if self.prior == "vamp":    # the pseudo-inputs u_k go through the same encoder, in the same pass
            h = self.encoder.forward(np.concatenate([x, self.prior_params["u"]]))
            mu, log_var, h_u = h[:B, :self.latent], h[:B, self.latent:], h[B:]
        else:
            (mu, log_var), h_u = self.encode(x), None
        sigma = np.exp(0.5 * log_var)                                   # sigma = exp(log_var / 2)
        z = mu + sigma * eps                                            # z = mu + sigma * eps
        logits = self.decode(z)
        # Reconstruction: -log p(x|z) = sum_j softplus(l_j) - x_j l_j (binary cross-entropy from logits),
        # softplus(l) = log(1 + exp(l)) = max(l, 0) + log1p(exp(-|l|)), stable for any l.
        e = np.exp(-np.abs(logits))
        recon = (np.maximum(logits, 0) + np.log1p(e) - x * logits).sum(axis=1)
        if self.prior == "standard":
            # KL(N(mu, sigma^2) || N(0, 1)) summed over dimensions (Kingma & Welling, Appendix B):
            # KL = -1/2 * sum(1 + log_var - mu^2 - exp(log_var))
            kl = -0.5 * (1.0 + log_var - mu * mu - sigma * sigma).sum(axis=1)
        else:
            # A learned prior has no closed-form KL: estimate it at the same z, KL ~ log q(z|x) - log p(z).
            log_p, self.prior_cache = mixture_log_density(z, *self.prior_mixture(h_u))
            kl = log_q_at_eps(eps, log_var) - log_p
        self.cache = (x, mu, log_var, sigma, eps, logits)
        recon, kl = float(recon.mean()), float(kl.mean())
        return recon + kl, recon, kl

    def backward(self):
        """Gradients of the last forward()'s loss into self.grads(), every path written out."""
        x, mu, log_var, sigma, eps, logits = self.cache
        B = x.shape[0]                                                  # the loss is a mean over the batch
        # Reconstruction -> logits: d/dl [softplus(l) - x l] = sigmoid(l) - x.
        dlogits = (sigmoid(logits) - x) / B                             # sigmoid(l) - x, per example / B
        # Logits -> z, through the decoder's layers: dL_rec/dz (B, Z).
        dz = self.decoder.backward(dlogits)
        if self.prior != "standard":
            return self.backward_learned_prior(dz)
        # z = mu + sigma * eps reaches mu directly (dz/dmu = 1); the KL adds d/dmu[mu^2 / 2] = mu.
        dmu = dz + mu / B                                               # dL/dmu = dL/dz + mu
        # z reaches log_var through sigma: dz/dsigma = eps, dsigma/dlog_var = sigma / 2.
        dlog_var = dz * eps * 0.5 * sigma                               # reconstruction path: dL/dz * eps * sigma/2
        # The KL adds d/dlog_var[-1/2 (1 + log_var - exp(log_var))] = (exp(log_var) - 1) / 2 = (sigma^2 - 1) / 2.
        dlog_var += 0.5 * (sigma * sigma - 1.0) / B                     # KL path
        # eps gets no gradient: it is the noise, drawn outside the model, a function of no parameter.
        # [mu, log_var] -> encoder weights. dL/dx is not needed: x is data.
        self.encoder.backward(np.concatenate([dmu, dlog_var], axis=1), need_dx=False)

    def backward_learned_prior(self, dz):
        """The backward pass when the KL term is log q(z|x) - log p(z) with a learned mixture prior.
        dz (B, Z) holds the reconstruction's dL/dz; every other path is added here."""
        x, mu, log_var, sigma, eps, logits = self.cache
        B = x.shape[0]
        r, scaled, diff = self.prior_cache   # r_bk = pi_k N(z_b; m_k, s_k^2) / p(z_b); scaled = (z_b - m_k) / s_k^2
        # -log p(z) = -log sum_k pi_k N(z; m_k, s_k^2), so d/dz = sum_k r_k (z - m_k) / s_k^2: the KL pushes z
        # towards the components that claim it. It joins the reconstruction's dL/dz before z splits.
        dz += np.einsum("bk,bkz->bz", r, scaled) / B                    # KL path through z
        dmu = dz                                                        # dz/dmu = 1; log q has no mu at fixed eps
        dlog_var = dz * eps * 0.5 * sigma                               # through sigma, as for the standard prior
        dlog_var -= 0.5 / B                                             # log q(z|x) = ... - log_var/2 at fixed eps
        # The prior's parameters, from -log p(z) (each summed over the batch, / B):
        # d/dm_k = -r_k (z - m_k) / s_k^2;  d/dlog s_k^2 = -r_k ((z - m_k)^2 / s_k^2 - 1) / 2
        dm = -np.einsum("bk,bkz->kz", r, scaled) / B
        dlv = -0.5 * np.einsum("bk,bkz->kz", r, scaled * diff - 1.0) / B
        dh = np.concatenate([dmu, dlog_var], axis=1)
        if self.prior == "mog":
            self.prior_grads["means"][...] = dm
            self.prior_grads["log_vars"][...] = dlv
            # log pi = logits - logsumexp(logits): d/dlogit_k of -log p(z) = -(r_k - pi_k)
            pi = np.exp(self.prior_mixture()[2])
            self.prior_grads["logits"][...] = -(r.sum(axis=0) - B * pi) / B
            self.encoder.backward(dh, need_dx=False)
        else:
            # VampPrior: m_k, log s_k^2 are the encoder's outputs for u_k, so dm, dlv join the batch's rows and go
            # back through the same encoder, into its weights and on to the pseudo-inputs themselves.
            dh = np.concatenate([dh, np.concatenate([dm, dlv], axis=1)])
            self.prior_grads["u"][...] = self.encoder.backward(dh, need_dx=slice(B, None))   # dL/du_k

    # ---- using a trained model -----------------------------------------------------------------------------

    def reconstruct(self, x):
        """Bernoulli means of p(x|z) at z = mu(x), the posterior's centre: (B, D) in [0, 1]."""
        mu, _ = self.encode(x)
        return sigmoid(self.decode(mu))

    def prior_mixture(self, h_u=None):
        """A learned prior as a diagonal Gaussian mixture: means (K, Z), log-variances (K, Z), log weights (K,).
        For the VampPrior these are the encoder's outputs for the pseudo-inputs (h_u, if already computed)."""
        if self.prior == "mog":
            logits = self.prior_params["logits"]
            return self.prior_params["means"], self.prior_params["log_vars"], logits - logsumexp(logits, axis=0)
        h_u = self.encoder.forward(self.prior_params["u"]) if h_u is None else h_u
        k = self.components
        return h_u[:, :self.latent], h_u[:, self.latent:], np.full(k, -np.log(k), dtype=h_u.dtype)

    def sample_z(self, n, rng):
        """n draws (float64) from the prior p(z): N(0, I), or a component k ~ pi, then z ~ N(m_k, s_k^2)."""
        if self.prior == "standard":
            return rng.standard_normal((n, self.latent))
        means, log_vars, log_pi = (a.astype(np.float64) for a in self.prior_mixture())
        k = rng.choice(len(log_pi), size=n, p=np.exp(log_pi) / np.exp(log_pi).sum())
        return means[k] + np.exp(0.5 * log_vars[k]) * rng.standard_normal((n, self.latent))

    def log_prior(self, z, mixture=None, chunk=1000):
        """log p(z) per row of z (float64, no gradient). mixture: prior_mixture() in float64, if the caller
        already has it (the VampPrior's costs an encoder pass)."""
        if self.prior == "standard":
            return log_standard_normal(z)
        mixture = mixture or [a.astype(np.float64) for a in self.prior_mixture()]
        return np.concatenate([mixture_log_density(np.asarray(z[i:i + chunk], np.float64), *mixture)[0]
                               for i in range(0, len(z), chunk)])

    def sample_prior(self, n, rng):
        """n images decoded from z ~ p(z), the prior: draws from the whole data distribution."""
        z = self.sample_z(n, rng).astype(self.dtype)
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
        return {"n_in": self.n_in, "hidden": self.hidden, "latent": self.latent, "prior": self.prior,
                "components": self.components}


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
    arrays = {"arch": np.array([model.n_in, model.hidden, model.latent]), "prior": np.array(model.prior),
              "components": np.array(model.components), **model.params(),
              **{"extra." + k: v for k, v in extra.items()}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load(path):
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
    prior, components = str(arrays.get("prior", "standard")), int(arrays.get("components", 0))
    if prior not in PRIORS:
        raise CheckpointError(f"{path}: unknown prior {prior!r}; not a model saved by this project")
    dtype = arrays["enc.0.W"].dtype if "enc.0.W" in arrays else np.float32
    model = VAE(n_in, hidden, latent, dtype=dtype, prior=prior, components=components)
    for name, p in model.params().items():
        if name not in arrays or arrays[name].shape != p.shape:
            raise CheckpointError(f"{path}: parameter {name} is missing or has the wrong shape; corrupt file")
        p[...] = arrays[name]
    extra = {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}
    return model, extra


# ---- after training: the prior, the aggregated posterior, and the likelihood -------------------------------

LOG_2PI = np.log(2 * np.pi)


def log_standard_normal(z):
    """log N(z; 0, I), summed over the last axis: the prior p(z)."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def log_q_at_eps(eps, log_var):
    """log q(z|x) at z = mu + sigma * eps: sum_d log N(z_d; mu_d, sigma_d^2), and (z_d - mu_d) / sigma_d = eps_d,
    so it is sum_d -eps_d^2/2 - log_var_d/2 - log(2 pi)/2 (summed over the last axis)."""
    return -0.5 * (eps * eps + log_var + LOG_2PI).sum(-1)


def log_bernoulli(x, logits):
    """log p(x|z) = sum_j x_j l_j - softplus(l_j), summed over the last axis (stable for any logit)."""
    return (x * logits - np.maximum(logits, 0) - np.log1p(np.exp(-np.abs(logits)))).sum(-1)


def logsumexp(a, axis):
    """log sum_i exp(a_i) = m + log sum_i exp(a_i - m), m = max_i a_i: no overflow, no log(0) for finite a."""
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def mixture_log_density(z, means, log_vars, log_pi):
    """log p(z) = log sum_k pi_k N(z; m_k, diag(s_k^2)) per row of z (B, Z), s_k^2 = exp(log_vars_k), and what its
    gradient needs: the responsibilities r_bk = pi_k N(z_b; m_k, s_k^2) / p(z_b) (rows sum to 1), the scaled
    differences (z_b - m_k) / s_k^2 and the differences z_b - m_k, each (B, K, Z) but r."""
    inv_var = np.exp(-log_vars)                                             # 1 / s_k^2, (K, Z)
    diff = z[:, None, :] - means[None, :, :]                                # z_b - m_k
    scaled = diff * inv_var
    log_comp = -0.5 * ((scaled * diff).sum(2) + log_vars.sum(1) + z.shape[1] * LOG_2PI)   # log N(z_b; m_k, s_k^2)
    a = log_pi + log_comp
    log_p = logsumexp(a, axis=1)
    return log_p, (np.exp(a - log_p[:, None]), scaled, diff)


def iw_nll(model, x, k, rng, eps=None, batch_size=25):
    """Importance-weighted estimate of -log p(x) per example (Burda et al. 2015), with K draws from q(z|x):

        -log p(x) ~ -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k = mu + sigma * eps_k

    For K = 1 it is the single-sample negative ELBO, its KL term estimated at the same z; by Jensen it is never above the negative ELBO averaged
    over the same draws, and it falls towards -log p(x) as K grows. eps (K, len(x), Z) may be given."""
    out = np.empty(len(x))
    mixture = None if model.prior == "standard" else [a.astype(np.float64) for a in model.prior_mixture()]
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        mu, log_var = (a.astype(np.float64) for a in model.encode(xb))
        e = rng.standard_normal((k, len(xb), model.latent)) if eps is None else eps[:, i:i + batch_size]
        z = mu + np.exp(0.5 * log_var) * e                                       # (K, B, Z)
        logits = model.decode(z.reshape(-1, model.latent).astype(model.dtype)).reshape(k, len(xb), -1)
        # log q(z|x) = sum_d log N(z_d; mu_d, sigma_d^2), and (z - mu) / sigma = eps.
        log_q = log_q_at_eps(e, log_var)                                         # log q(z|x), (K, B)
        # log w = log p(x|z) + log p(z) - log q(z|x), (K, B); the pixel sum in the model's dtype, the rest float64.
        log_p = model.log_prior(z.reshape(-1, model.latent), mixture).reshape(k, len(xb))       # log p(z)
        log_w = log_bernoulli(xb, logits).astype(np.float64) + log_p - log_q
        out[i:i + batch_size] = -(logsumexp(log_w, axis=0) - np.log(k))
    return out



def fit_gmm(z, k=10, covariance="full", iters=200, tol=1e-5, rng=None):
    """A mixture of k Gaussians fitted to the rows of z (N, D) by EM (Dempster et al. 1977).

    E-step: r_nk = pi_k N(z_n; m_k, S_k) / sum_j pi_j N(z_n; m_j, S_j), in log space with log-sum-exp.
    M-step: N_k = sum_n r_nk, pi_k = N_k / N, m_k = sum_n r_nk z_n / N_k,
            S_k = sum_n r_nk (z_n - m_k)(z_n - m_k)^T / N_k (+ 1e-6 I), or only its diagonal.
    Stops when the mean log-likelihood gains less than tol. Returns {'log_pi', 'means', 'covs', 'log_likelihood'
    (one value per iteration, never decreasing)}; covs are (k, D, D) or, for 'diag', (k, D)."""
    rng = rng or np.random.default_rng(0)
    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    var = z.var(axis=0)
    gmm = {"log_pi": np.full(k, -np.log(k)), "means": z[rng.choice(n, k, replace=False)],
           "covs": np.tile(np.diag(var), (k, 1, 1)) if covariance == "full" else np.tile(var, (k, 1))}
    history = []
    for _ in range(iters):
        log_joint = gmm["log_pi"] + gmm_component_log_density(gmm, z)       # (N, k): log pi_k N(z_n; m_k, S_k)
        log_p = logsumexp(log_joint, axis=1)                                 # log p(z_n)
        history.append(float(log_p.mean()))
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
        r = np.exp(log_joint - log_p[:, None])                              # responsibilities r_nk
        n_k = r.sum(axis=0) + 1e-12                                         # N_k
        means = (r.T @ z) / n_k[:, None]                                    # m_k
        if covariance == "full":                                            # S_k = E_r[z z^T] - m_k m_k^T
            second = np.stack([(r[:, j, None] * z).T @ z for j in range(k)]) / n_k[:, None, None]  # E_r[z z^T]
            covs = second - means[:, :, None] * means[:, None, :] + 1e-6 * np.eye(d)
        else:                                                               # diag S_k = E_r[z^2] - m_k^2
            covs = (r.T @ (z * z)) / n_k[:, None] - means ** 2 + 1e-6
        gmm = {"log_pi": np.log(n_k / n), "means": means, "covs": covs}
    gmm["log_likelihood"] = history
    return gmm


def gmm_component_log_density(gmm, z, chunk=4096):
    """log N(z_n; m_k, S_k) for every row n and component k: (N, k)."""
    z = np.asarray(z, dtype=np.float64)
    d = z.shape[1]
    if gmm["covs"].ndim == 2:                                               # diagonal: S_k = diag(s_k^2)
        s2 = gmm["covs"]
        # sum_d (z_d - m_d)^2 / s2_d, expanded into products: z^2 (1/s2)^T - 2 z (m/s2)^T + sum m^2/s2
        maha = (z * z) @ (1 / s2).T - 2 * z @ (gmm["means"] / s2).T + (gmm["means"] ** 2 / s2).sum(1)
        return -0.5 * (maha + np.log(s2).sum(1) + d * LOG_2PI)
    # Full: with S_k = L_k L_k^T (Cholesky), the Mahalanobis term is |L_k^-1 (z - m_k)|^2, and
    # log|S_k| / 2 = sum_i log (L_k)_ii. All k components in one product: y = z A - m A, A_k = L_k^-T.
    k = len(gmm["means"])
    chol_inv = np.linalg.inv(np.linalg.cholesky(gmm["covs"]))                # (k, D, D): L_k^-1
    a = chol_inv.transpose(0, 2, 1)                                         # A_k = L_k^-T
    a_all, m_a = a.transpose(1, 0, 2).reshape(d, k * d), np.einsum("kd,kde->ke", gmm["means"], a)
    log_det_half = -np.log(np.diagonal(chol_inv, axis1=1, axis2=2)).sum(1)  # sum log L_ii = -sum log (L^-1)_ii
    out = np.empty((len(z), k))
    for i in range(0, len(z), chunk):                                       # rows in chunks: (chunk, k, D) at most
        y = (z[i:i + chunk] @ a_all).reshape(-1, k, d) - m_a                # y = z A_k - m_k A_k, all k at once
        out[i:i + chunk] = -0.5 * (np.einsum("nkd,nkd->nk", y, y) + d * LOG_2PI) - log_det_half
    return out


def gmm_log_density(gmm, z):
    """log q(z) under the fitted mixture: log sum_k pi_k N(z; m_k, S_k), per row of z."""
    return logsumexp(gmm["log_pi"] + gmm_component_log_density(gmm, z), axis=1)


def gmm_sample(gmm, n, rng):
    """n draws from the mixture: a component k ~ pi, then z = m_k + L_k eps (S_k = L_k L_k^T)."""
    ks = rng.choice(len(gmm["means"]), size=n, p=np.exp(gmm["log_pi"]) / np.exp(gmm["log_pi"]).sum())
    eps = rng.standard_normal((n, gmm["means"].shape[1]))
    if gmm["covs"].ndim == 2:
        return gmm["means"][ks] + np.sqrt(gmm["covs"][ks]) * eps
    return gmm["means"][ks] + np.einsum("nij,nj->ni", np.linalg.cholesky(gmm["covs"])[ks], eps)


def sample_aggregate(model, gmm, n, rng):
    """n images decoded from z ~ the fitted aggregated posterior, the remedy for the prior's holes."""
    return sigmoid(model.decode(gmm_sample(gmm, n, rng).astype(model.dtype)))


def aggregate_posterior_moments(mu, log_var, threshold=0.01):
    """Per-dimension mean and variance of q(z) = (1/N) sum_n N(mu_n, sigma_n^2), and the active units.

    E[z] = mean_n mu_n;  Var[z] = mean_n (mu_n^2 + sigma_n^2) - E[z]^2  (the law of total variance)
    active: Cov_x(E_q[z|x]) = Var_n(mu_n) > threshold (Burda et al. 2015)."""
    mu, var = np.asarray(mu, np.float64), np.exp(np.asarray(log_var, np.float64))
    mean = mu.mean(axis=0)
    activity = mu.var(axis=0)
    return {"mean": mean.tolist(), "variance": ((mu * mu + var).mean(axis=0) - mean ** 2).tolist(),
            "activity": activity.tolist(), "active_units": int((activity > threshold).sum())}


def elbo_surgery(mu, log_var, rng, log_prior=None, chunk=128):
    """Split the average KL term as Hoffman & Johnson (2016): with q(z) = (1/N) sum_n q(z|x_n),

        mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z)),
        I(x; z) = E_n E_q(z|x_n)[log q(z|x_n) - log q(z)],  KL(q(z)||p(z)) = E_q(z)[log q(z) - log p(z)],

    p(z) = N(0, I) unless log_prior (a function of z) is given. Each is estimated with one z_n ~ q(z|x_n) per data point; log q(z) sums over all N components (log-sum-exp),
    the Gaussian exponents expanded into matrix products. Returns the three terms (nats) and the check
    sum I + KL_agg, which equals the Monte Carlo average KL for the same draws exactly."""
    mu, log_var = np.asarray(mu, np.float64), np.asarray(log_var, np.float64)
    n, d = mu.shape
    var = np.exp(log_var)
    eps = rng.standard_normal((n, d))
    z = mu + np.sqrt(var) * eps
    log_q_own = log_q_at_eps(eps, log_var)                                  # log q(z_n | x_n)
    # log N(z_i; mu_n, var_n) = -1/2 [z_i^2 . (1/var_n) - 2 z_i . (mu_n/var_n) + sum mu_n^2/var_n + sum log var_n + D log 2pi]
    inv_var_t, mu_over_var_t = (1 / var).T, (mu / var).T
    const = (mu * mu / var).sum(1) + log_var.sum(1) + d * LOG_2PI
    log_q_agg = np.empty(n)
    for i in range(0, n, chunk):
        zi = z[i:i + chunk]
        log_comp = (zi * zi) @ inv_var_t                                    # (chunk, N), built in place:
        log_comp -= 2 * zi @ mu_over_var_t
        log_comp += const
        log_comp *= -0.5                                                    # log N(z_i; mu_n, var_n)
        log_q_agg[i:i + chunk] = logsumexp(log_comp, axis=1) - np.log(n)     # log q(z_i)
    log_p = log_standard_normal(z) if log_prior is None else log_prior(z)
    mi, kl_agg = float((log_q_own - log_q_agg).mean()), float((log_q_agg - log_p).mean())
    if log_prior is None:                                                   # N(0, I): closed form per data point
        avg_kl = float((0.5 * (mu * mu + var - 1 - log_var).sum(1)).mean())
    else:                                                                   # a learned prior: the same draws
        avg_kl = float((log_q_own - log_p).mean())
    return {"average_kl": avg_kl, "mutual_information": mi, "kl_aggregate_prior": kl_agg,
            "mutual_information_plus_kl_aggregate_prior": mi + kl_agg}


def prior_hole_fraction(gmm, z_train, z_prior, quantile=0.01):
    """Share of prior draws whose density under the fitted aggregated posterior is below that of 99% of the
    training codes: they land where (almost) no training image encodes. Also returns the threshold and mask."""
    threshold = np.quantile(gmm_log_density(gmm, z_train), quantile)
    in_hole = gmm_log_density(gmm, z_prior) < threshold
    return float(in_hole.mean()), float(threshold), in_hole
