"""Priors other than N(0, I), the two remedies for the holes a prior's draws can fall into.

Learned with the model: vae.VAE with p(z) = N(0, I) replaced by a prior with parameters of its own.
    MixturePriorVAE   p(z) = sum_k pi_k N(z; m_k, diag(s_k^2)),  pi = softmax(log_weights)     ('mog')
    VampPriorVAE      p(z) = (1/K) sum_k q(z|u_k), K pseudo-inputs u_k (Tomczak & Welling 2018) ('vamp')
Here K is the number of the prior's components. What changes against vae.VAE: the four prior methods (kl_forward,
kl_backward, sample_z, log_prior) and the parameters (__init__, params, grads); the training step, VAE.forward
and VAE.backward, is the standard one, to which the VampPrior adds the second gradient of the encoder's weights.
A mixture has no closed-form KL, so the KL is estimated at the same sampled z = mu + sigma * eps as the
reconstruction (K&W eq. 6): KL ~ log q(z|x) - log p(z). Its gradient reaches mu and log_var through z, so here
z's path through the reparameterization carries the KL's gradient too.

Fitted after training: a mixture of M Gaussians fitted by EM to the aggregated posterior's codes (fit_gmm), to
sample from instead of N(0, I) and to measure the holes with (analysis.py). And build(), a model of any prior.
"""
import math

import numpy as np


from vae import LOG_2PI, VAE, log_normal, reparameterize_backward, reparameterize_forward


def exp_floored(a, out=None):
    """exp(a) for a <= 0, with a raised first to log(tiny) + 2 (-706.4 in float64, -85.3 in float32), tiny
    the smallest normal number. Further below, exp is subnormal or 0 and NumPy takes its slow path: in float64 56
    against 0.8-1.1 ns an element with AVX-512, 45-53 against 9-11 ns without (docs/experiments.md, section 6, has
    the timeit commands); its fast path ends a little above log(tiny), hence the 2. Every term so raised is
    below e^2 tiny = 1.6e-307 (8.7e-38) of the largest term of a sum, 1 in logsumexp: no sum of fewer than 1e290
    (1e29) such terms reaches its last bit, so no sum changes."""
    t = np.maximum(a, math.log(np.finfo(a.dtype).tiny) + 2, out=out)       # out=a: in place
    return np.exp(t, out=t)


def logsumexp(a, axis, overwrite=False):
    """log sum_i exp(a_i) = m + log sum_i exp(a_i - m), m = max_i a_i: no overflow, no log(0) for finite a.
    overwrite=True: a is scratch, its values lost (no copy of a large a, such as the ELBO surgery's blocks)."""
    m, out = a.max(axis=axis, keepdims=True), (a if overwrite else None)     # out: where exp(a_i - m) is written
    e = exp_floored(np.subtract(a, m, out=out), out=out)                    # exp(a_i - m), each <= 1
    return (m + np.log(e.sum(axis=axis, keepdims=True))).squeeze(axis)


def mixture_log_density(z, means, log_vars, log_pi):
    """log p(z) = log sum_k pi_k N(z; m_k, diag(exp(log_vars_k))) per row of z (B, Z), by log-sum-exp, and the
    responsibilities r_bk = pi_k N(z_b; m_k, .) / p(z_b) (each row sums to 1). means, log_vars (K, Z); log_pi (K,)."""
    a = log_pi + log_normal(z[:, None, :], means, log_vars)            # log pi_k + log N(z_b; m_k, s_k^2), (B, K)
    log_p = logsumexp(a, axis=1)
    return log_p, np.exp(a - log_p[:, None])


def draw_components(log_pi, n, rng):
    """n component indices k ~ pi, from log-weights log_pi (normalised here, shifted by their max: no overflow)."""
    pi = np.exp(log_pi - log_pi.max())
    return rng.choice(len(pi), size=n, p=pi / pi.sum())


def sample_mixture(means, log_vars, log_pi, n, rng):
    """n draws from sum_k pi_k N(m_k, diag(exp(log_vars_k))): a component k ~ pi, then z = m_k + s_k * eps."""
    k = draw_components(log_pi, n, rng)
    return reparameterize_forward(means[k], log_vars[k], rng.standard_normal((n, means.shape[1])))[0]


# ---- the KL to a mixture, as a forward/backward pair (vae.py's style) --------------------------------------

def kl_mixture_forward(z, eps, log_var, means, log_vars, log_pi):
    """KL(q(z|x) || p(z)) for a mixture prior, per example: estimated at the sampled z = mu + sigma * eps,
    KL ~ log q(z|x) - log p(z) (unbiased over eps). means, log_vars (K, Z), log_pi (K,).
    log q(z|x) = log N(eps; 0, I) - sum_d log sigma_d: the density of eps, divided by the stretch of z = g(eps)
    (K&W Appendix C.2, the Gaussian encoder's log-density, written in eps)."""
    log_p, r = mixture_log_density(z, means, log_vars, log_pi)
    log_q = log_normal(eps, 0.0, np.zeros_like(log_var)) - 0.5 * log_var.sum(-1)
    return log_q - log_p, (z, means, log_vars, r)


def kl_mixture_backward(dkl, cache):
    """Gradients of log q(z|x) - log p(z), as kl_mixture_forward computes it from (z, eps, log_var): log q is the
    density of eps less sum log sigma, so z enters only log p. (Through z = mu + sigma * eps, z's route into
    log q(z|x) would cancel its routes through mu and sigma; writing log q in eps makes that explicit.)
    Returns dz (the prior's pull on z, which the caller sends on through z = mu + sigma * eps), dlog_var, and the
    mixture's dmeans, dlog_vars, dlog_pi. Below, w_bk = dkl_b * r_bk: the responsibilities, weighted."""
    z, means, log_vars, r = cache
    w = r * dkl[:, None]                                # w_bk = dkl_b r_bk, (B, K)
    diff = z[:, None, :] - means                        # z_b - m_k, (B, K, Z)
    scaled = diff * np.exp(-log_vars)                   # (z_b - m_k) / s_k^2
    dz = np.einsum("bk,bkz->bz", w, scaled)             # d/dz (-log p) = sum_k r_k (z - m_k) / s_k^2
    dlog_var = np.broadcast_to(-0.5 * dkl[:, None], z.shape)    # d/dlog_var (-sum_d log_var_d / 2) = -1/2
    dmeans = -np.einsum("bk,bkz->kz", w, scaled)        # d/dm_k (-log p) = -r_k (z - m_k) / s_k^2
    dlog_vars = -0.5 * np.einsum("bk,bkz->kz", w, scaled * diff - 1.0)   # -r_k ((z - m_k)^2 / s_k^2 - 1) / 2
    dlog_pi = -w.sum(0)                                 # d/dlog pi_k (-log p) = -r_k
    return dz, dlog_var, dmeans, dlog_vars, dlog_pi


# ---- the two learned priors ----------------------------------------------------------------------------------

class MixturePriorVAE(VAE):
    """vae.VAE with p(z) = sum_k pi_k N(z; m_k, diag(exp(log_vars_k))), pi = softmax(log_weights): K means,
    log-variances and unnormalised log-weights, parameters 'prior.means', 'prior.log_vars', 'prior.log_weights'."""
    prior_name = "mog"

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, components=10, **likelihood):
        rng = np.random.default_rng(seed)
        super().__init__(n_in, hidden, latent, rng, dtype, **likelihood)   # networks first: a seed gives vae.VAE's
        self.components = components
        self.prior = self.new_prior_params(rng, dtype)
        self.prior_grads = {name: np.zeros_like(p) for name, p in self.prior.items()}

    def new_prior_params(self, rng, dtype):
        k, latent = self.components, self.latent
        return {"means": rng.standard_normal((k, latent)).astype(dtype), "log_vars": np.zeros((k, latent), dtype),
                "log_weights": np.zeros(k, dtype)}

    def params(self):
        return {**super().params(), **{"prior." + name: p for name, p in self.prior.items()}}

    def grads(self):
        return {**super().grads(), **{"prior." + name: g for name, g in self.prior_grads.items()}}

    def mixture(self):
        """(means, log_vars, log_pi) of p(z): (K, Z), (K, Z), (K,)."""
        a = self.prior["log_weights"]
        return self.prior["means"], self.prior["log_vars"], a - logsumexp(a, axis=0)     # log pi = a - logsumexp(a)

    def kl_forward(self, mu, log_var, z, eps):
        """Replaces the closed form: log q(z|x) - log p(z) at the sampled z."""
        kl, self.kl_cache = kl_mixture_forward(z, eps, log_var, *self.mixture())
        return kl

    def kl_backward(self, dkl):
        """(dmu, dlog_var) of the KL term; the prior's own gradients go into prior_grads."""
        dz, dlog_var_q, dmeans, dlog_vars, dlog_pi = kl_mixture_backward(dkl, self.kl_cache)
        self.mixture_backward(dmeans, dlog_vars, dlog_pi)
        dmu, dlog_var = reparameterize_backward(dz, self.z_cache)      # the prior's pull on z, on to mu and log_var
        return dmu, dlog_var + dlog_var_q       # the KL's two paths to log_var: through z, and -1/2 from log q

    def mixture_backward(self, dmeans, dlog_vars, dlog_pi):
        self.prior_grads["means"][...] = dmeans
        self.prior_grads["log_vars"][...] = dlog_vars
        pi = np.exp(self.mixture()[2])          # log pi = a - logsumexp(a): d log pi_j / d a_k = delta_jk - pi_k,
        self.prior_grads["log_weights"][...] = dlog_pi - pi * dlog_pi.sum()  # dL/da_k = dlog_pi_k - pi_k sum_j ...

    def sample_z(self, n, rng):
        """n draws (float64) from the learned mixture."""
        return sample_mixture(*(a.astype(np.float64) for a in self.mixture()), n, rng)

    def log_prior(self, z):
        """log p(z) per row of z, in float64 (no gradient; for the analysis)."""
        return mixture_log_density(np.asarray(z, np.float64), *(a.astype(np.float64) for a in self.mixture()))[0]


class VampPriorVAE(MixturePriorVAE):
    """vae.VAE with p(z) = (1/K) sum_k q(z|u_k) (Tomczak & Welling 2018): the components are the encoder's own
    posteriors of K learned pseudo-inputs, pseudo-images u_k = clip(w_k, 0, 1) (PyTorch's Hardtanh(0, 1), as in the
    paper's code, so that they stay images); the parameters are the w_k, 'prior.w'. The pseudo-inputs take a pass
    of their own through the encoder's weights, so those weights get two gradients, which backward() adds up."""
    prior_name = "vamp"

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, components=100, **likelihood):
        super().__init__(n_in, hidden, latent, seed, dtype, components, **likelihood)
        self.pseudo_encoder = self.encoder.twin()      # the same weights, caches and gradients of its own

    def new_prior_params(self, rng, dtype):            # u = clip(w); train.py starts w at training images
        return {"w": rng.uniform(0, 1, (self.components, self.n_in)).astype(dtype)}

    def pseudo_inputs(self):
        return np.clip(self.prior["w"], 0, 1)

    def mixture(self):
        out_u = self.pseudo_encoder.forward(self.pseudo_inputs())      # [mu, log_var] of each q(z|u_k)
        return out_u[:, :self.latent], out_u[:, self.latent:], np.full(self.components, -math.log(self.components),
                                                                         out_u.dtype)

    def mixture_backward(self, dmeans, dlog_vars, dlog_pi):          # the weights are fixed at 1/K: no dlog_pi
        du = self.pseudo_encoder.backward(np.concatenate([dmeans, dlog_vars], axis=1))   # on through the encoder
        w = self.prior["w"]
        self.prior_grads["w"][...] = du * ((w > 0) & (w < 1))           # dL/dw = dL/du * clip'(w): 1 inside, else 0

    def backward(self, beta=1.0):
        super().backward(beta)
        # The encoder's weights served twice, for the batch and for the pseudo-inputs: dL/dW is the sum of both.
        for layer, twin in zip(self.encoder.layers, self.pseudo_encoder.layers):
            for name, g in layer.grads.items():
                g += twin.grads[name]


PRIORS = {"standard": (VAE, 0), "mog": (MixturePriorVAE, 10), "vamp": (VampPriorVAE, 100)}  # class, default K


def build(prior="standard", components=None, **arch):
    """The VAE with this prior ('standard', 'mog' or 'vamp'; components: its K, or the default), for the arguments
    of vae.VAE (n_in, hidden, latent, seed, dtype, likelihood, decoder_sigma)."""
    cls, default_k = PRIORS[prior]
    return cls(**arch) if cls is VAE else cls(**arch, components=components or default_k)


# ---- the first remedy: a Gaussian mixture fitted by EM to the aggregated posterior, after training ------------

MAX_KEPT = 2 ** 23      # fit_gmm keeps the outer products (triangles, or c^2 for 'diag') up to 2^23 float64s
                        # (67 MB) in memory; above, it recomputes them a chunk of rows at a time


def fit_gmm(z, components=10, covariance="full", iters=200, tol=1e-5, rng=None, chunk=4096):
    """A mixture of M = components Gaussians fitted to the rows of z (N, Z) by EM (Dempster et al. 1977).

    E-step: r_nj = pi_j N(z_n; m_j, S_j) / sum_i pi_i N(z_n; m_i, S_i), in log space with log-sum-exp.
    M-step: N_j = sum_n r_nj, pi_j = N_j / N, m_j = sum_n r_nj z_n / N_j,
            S_j = sum_n r_nj (z_n - m_j)(z_n - m_j)^T / N_j (or its diagonal).
    With the codes about their mean, c_n = z_n - zbar, and b_j = m_j - zbar, P_j = S_j^-1, both steps see the codes
    only through c_n and the outer products c_n c_n^T, computed once:
        log N(z_n; m_j, S_j) = -1/2 [<c_n c_n^T, P_j> - 2 c_n . P_j b_j + b_j . P_j b_j + log|S_j| + Z log 2 pi],
        sum_n r_nj (z_n - m_j)(z_n - m_j)^T = sum_n r_nj c_n c_n^T - N_j b_j b_j^T   (b_j: the new weighted mean),
    one matrix product each for every component at once. Both matrices are symmetric, so only their upper triangles
    are used, Z(Z + 1)/2 numbers: <c c^T, P> = sum_d c_d^2 P_dd + 2 sum_(d<e) c_d c_e P_de (N x 210 numbers for
    Z = 20, 34 MB for N = 20,000; above MAX_KEPT numbers, recomputed a chunk of rows at a time). Centring keeps codes
    far from 0 from cancelling digits (test). Eigenvalues of S_j are floored at 1e-6 times the mean variance of z,
    so every S_j stays valid. Stops when the mean log-likelihood gains less than tol. Returns {'log_pi', 'means',
    'covs', 'log_likelihood' (one value per iteration, never decreasing)}; covs (M, Z, Z), or (M, Z) for 'diag'."""
    rng = rng or np.random.default_rng(0)
    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    zbar, var = z.mean(axis=0), z.var(axis=0)
    c = z - zbar                                                            # the codes about their mean
    full, floor = covariance == "full", 1e-6 * max(var.mean(), 1e-6)
    rows = [slice(i, i + chunk) for i in range(0, n, chunk)]
    up, right = np.triu_indices(d) if full else (np.arange(d),) * 2        # the upper triangle (diag: the diagonal)
    twice = np.where(up == right, 1.0, 2.0)                                 # off the diagonal, each entry counts twice
    outer = lambda s: c[s][:, up] * c[s][:, right]                          # c c^T's upper triangle, or c^2
    kept = [outer(s) for s in rows] if n * len(up) <= MAX_KEPT else None
    cc = lambda i: kept[i] if kept else outer(rows[i])
    b = z[rng.choice(n, components, replace=False)] - zbar                           # b_j = m_j - zbar
    log_pi = np.full(components, -np.log(components))                       # S_j = V diag(lambda) V^T, from diag(var)
    eigval, eigvec = np.tile(var + floor, (components, 1)), np.tile(np.eye(d), (components, 1, 1))
    history = []
    for _ in range(iters):
        # E-step. P_j = V diag(1 / lambda) V^T from S_j's eigenvectors V and eigenvalues lambda (diag: 1 / S_j).
        p = (eigvec / eigval[:, None, :]) @ eigvec.transpose(0, 2, 1) if full else 1 / eigval
        pb = np.einsum("jde,je->jd", p, b) if full else p * b               # P_j b_j
        const = (pb * b).sum(1) + np.log(eigval).sum(1) + d * LOG_2PI
        # <c_n c_n^T, P_j> for all n and j, as (P c c^T)^T: 1.2-1.6x faster than cc @ P^T (docs, section 6)
        p_upper = p[:, up, right] * twice if full else p
        quad = np.concatenate([(p_upper @ cc(i).T).T for i in range(len(rows))])
        log_joint = log_pi - 0.5 * (quad - 2 * c @ pb.T + const)            # log pi_j N(z_n; m_j, S_j)
        log_p = logsumexp(log_joint, axis=1)                                 # log p(z_n)
        history.append(float(log_p.mean()))
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
        r = np.exp(log_joint - log_p[:, None])                              # responsibilities r_nj
        n_j = r.sum(axis=0) + 1e-12                                         # M-step. N_j
        b = (r.T @ c) / n_j[:, None]                                        # m_j - zbar
        second = sum(r[s].T @ cc(i) for i, s in enumerate(rows)) / n_j[:, None]     # sum_n r_nj c_n c_n^T / N_j
        if full:
            covs = np.empty((components, d, d))
            covs[:, up, right] = covs[:, right, up] = second                # the triangle, mirrored
            covs -= b[:, :, None] * b[:, None, :]
            eigval, eigvec = np.linalg.eigh(covs)
            eigval = np.maximum(eigval, floor)
        else:
            eigval = np.maximum(second - b * b, floor)
        log_pi = np.log(n_j / n_j.sum())
    covs = (eigvec * eigval[:, None, :]) @ eigvec.transpose(0, 2, 1) if full else eigval
    return {"log_pi": log_pi, "means": zbar + b, "covs": covs, "log_likelihood": history}


def gmm_component_log_density(gmm, z, chunk=4096):
    """log N(z_n; m_k, S_k) for every row n and component k: (N, k), a chunk of rows at a time."""
    z = np.asarray(z, dtype=np.float64)
    d, k = z.shape[1], len(gmm["means"])
    out = np.empty((len(z), k))
    if gmm["covs"].ndim == 2:                                               # diagonal: S_k = diag(s_k^2)
        for i in range(0, len(z), chunk):
            out[i:i + chunk] = log_normal(z[i:i + chunk, None, :], gmm["means"], np.log(gmm["covs"]))
        return out
    # Full: with S_k = L_k L_k^T (Cholesky), log N = -1/2 (|L_k^-1 (z - m_k)|^2 + log|S_k| + Z log 2 pi), where
    # log|S_k| / 2 = sum_i log (L_k)_ii. All k components in one product: y = z A - m A, A_k = L_k^-T.
    chol_inv = np.linalg.inv(np.linalg.cholesky(gmm["covs"]))                # (k, Z, Z): L_k^-1
    a = chol_inv.transpose(0, 2, 1)                                         # A_k = L_k^-T
    a_all, m_a = a.transpose(1, 0, 2).reshape(d, k * d), np.einsum("kd,kde->ke", gmm["means"], a)
    log_det_half = -np.log(np.diagonal(chol_inv, axis1=1, axis2=2)).sum(1)  # sum log L_ii = -sum log (L^-1)_ii
    for i in range(0, len(z), chunk):
        y = (z[i:i + chunk] @ a_all).reshape(-1, k, d) - m_a                # y = z A_k - m_k A_k, all k at once
        out[i:i + chunk] = -0.5 * (np.einsum("nkd,nkd->nk", y, y) + d * LOG_2PI) - log_det_half
    return out


def gmm_log_density(gmm, z):
    """log q_fit(z) = log sum_k pi_k N(z; m_k, S_k), per row of z."""
    return logsumexp(gmm["log_pi"] + gmm_component_log_density(gmm, z), axis=1, overwrite=True)


def gmm_sample(gmm, n, rng):
    """n draws from the fitted mixture: a component k ~ pi, then z = m_k + L_k eps (S_k = L_k L_k^T)."""
    if gmm["covs"].ndim == 2:
        return sample_mixture(gmm["means"], np.log(gmm["covs"]), gmm["log_pi"], n, rng)
    k = draw_components(gmm["log_pi"], n, rng)
    eps = rng.standard_normal((n, gmm["means"].shape[1]))
    return gmm["means"][k] + np.einsum("nij,nj->ni", np.linalg.cholesky(gmm["covs"])[k], eps)
