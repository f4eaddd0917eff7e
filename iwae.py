"""The importance-weighted autoencoder (Burda, Grosse & Salakhutdinov, ICLR 2016): the VAE's model
with a tighter bound on log p(x) as its objective. It replaces the loss of vae.py (VAE.forward and
VAE.backward: -log p(x|z) + KL in closed form, one z per image); the encoder, the decoder and the
reparameterization are vae.py's. It fixes the likelihood to the Bernoulli and the prior to N(0, I),
and it takes k draws of eps per image, (k, B, Z), which the lab draws (lab/training.py: batch).

With k draws per image, z_i = mu + sigma * eps_i, eps_i ~ N(0, I), i = 1..k, each has a weight
    log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)        (Burda et al. eq. 5)
and the objectives are, per image,
    IWAE:             L_k = log (1/k) sum_i w_i                (eq. 8)
    VAE, k samples:   L_k^VAE = (1/k) sum_i log w_i           (the mean of k ELBOs)
Each is an estimate from the k draws; in expectation E L_1 <= E L_k <= log p(x) (Theorem 1), though
one draw of L_k may exceed log p(x). For k = 1 both are the ELBO, estimated at one z with the KL
sampled (K&W eq. 6) where vae.py has it in closed form: the same in expectation. The gradient of
L_k weights each sample's gradient of log w_i by its normalised weight
w~_i = w_i / sum_j w_j = softmax_i(log w_i), held fixed (eq. 14); the VAE's weights are all 1/k.

Unlike the closed-form KL, log q(z_i|x) is evaluated at the sampled z_i, so it has gradient paths of
its own: into z_i (and on through the reparameterization into mu and log_var) and straight into mu
and log_var. The two paths into mu cancel exactly (z - mu does not move when mu does, eps held
fixed); into log_var they sum to d log q / d log_var = -1/2 per unit (log q(z_i|x) = -1/2 sum
(log 2 pi + log_var + eps_i^2) with eps_i held fixed), so the -log q in log w_i raises the bound by
1/2 per unit of log_var, the entropy's gradient, and the loss -L_k gets -1/2 (times w~_i). The
backward below writes each path on its own line, so that the cancellation is there to see rather
than assumed. (Signs: the pieces below differentiate log w_i; the loss is -L_k.)
"""
import math

import numpy as np

from vae import (VAE, log_bernoulli, log_normal, reparameterize_backward, reparameterize_forward,
                 sigmoid)


# ---- the pieces, forward(...) -> (out, cache) and backward(d<out>, cache) -> gradients ----------

def log_weights_forward(logits, x, z, mu, log_var):
    """log w = log p(x|z) + log p(z) - log q(z|x) for each draw: (k, B). logits (k, B, D) of the
    decoder at z (k, B, Z); x (B, D); mu, log_var (B, Z) of q(z|x). Returns (log_w, cache), the
    cache holding the three terms too (the lab reports them)."""
    log_px = log_bernoulli(x, logits)                           # log p(x|z_i), (k, B)
    log_pz = log_normal(z, 0.0, np.zeros_like(z))               # log N(z_i; 0, I)
    log_qz = log_normal(z, mu, log_var)                         # log N(z_i; mu, diag(sigma^2))
    log_w = log_px + log_pz - log_qz
    return log_w, (logits, x, z, mu, log_var, log_px, log_pz, log_qz)


def log_weights_backward(dlog_w, cache):
    """The gradients of sum_i,b dlog_w_ib * log w_ib: (dlogits (k, B, D), dz (k, B, Z), dmu,
    dlog_var (B, Z)), the last two log q's direct paths only; z's path into mu and log_var is the
    caller's (reparameterize_backward)."""
    logits, x, z, mu, log_var, _, _, _ = cache
    d = dlog_w[:, :, None]
    var = np.exp(log_var)
    # log p(x|z) = sum_j x_j l_j - softplus(l_j): d/dl = x - sigmoid(l)
    dlogits = d * (x - sigmoid(logits))
    # log p(z) = -1/2 sum z^2 + const: d/dz = -z
    dz_prior = d * -z
    # -log q(z|x) = 1/2 sum ((z - mu)^2 / var + log_var) + const:
    dz_q = d * (z - mu) / var                               # d/dz = (z - mu) / var
    dmu_q = (d * -(z - mu) / var).sum(0)                    # d/dmu = -(z - mu) / var
    dlog_var_q = (d * 0.5 * (1 - (z - mu) ** 2 / var)).sum(0)   # d/dlog_var = (1 - (z-mu)^2/var)/2
    dz = dz_prior + dz_q
    return dlogits, dz, dmu_q, dlog_var_q


def logsumexp(a, axis):
    """log sum_i exp(a_i) = m + log sum_i exp(a_i - m), m = max_i a_i: no overflow."""
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def iwae_bound_forward(log_w):
    """L_k = log (1/k) sum_i w_i per image, by log-sum-exp over the k draws: (B,). The cache holds
    the normalised weights w~_i = w_i / sum_j w_j, each column summing to 1."""
    k = len(log_w)
    bound = logsumexp(log_w, axis=0) - math.log(k)
    w_tilde = np.exp(log_w - bound - math.log(k))           # w_i / sum_j w_j
    return bound, w_tilde


def iwae_bound_backward(dbound, w_tilde):
    """dL_k / dlog w_i = w~_i (the softmax's gradient), times each image's upstream gradient."""
    return w_tilde * dbound


def vae_bound_forward(log_w):
    """The VAE's bound with k draws, the mean of k ELBOs: (1/k) sum_i log w_i per image, (B,)."""
    k = len(log_w)
    return log_w.mean(0), k


def vae_bound_backward(dbound, k):
    """d/dlog w_i of the mean = 1/k for every draw: the IWAE's w~ made uniform."""
    return np.broadcast_to(dbound / k, (k, len(dbound)))


# ---- the model: vae.VAE with this objective ------------------------------------------------------

class IWAE(VAE):
    """The VAE trained on -L_k, the IWAE bound (objective='iwae') or the mean of k ELBOs
    (objective='vae': the lab's --objective elbo with --samples 2 or more; with one draw the lab
    trains vae.VAE itself, the KL in closed form), with k = samples draws per image. forward takes
    eps (k, B, Z) (or (B, Z) for k = 1). The Bernoulli likelihood and the N(0, I) prior only."""

    def __init__(self, n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, layers=1,
                 activation=None, objective="iwae", samples=1):
        if activation is None:
            super().__init__(n_in, hidden, latent, seed, dtype, layers=layers)
        else:
            super().__init__(n_in, hidden, latent, seed, dtype, layers=layers,
                             activation=activation)
        self.objective = objective
        self.samples = samples

    def forward(self, x, eps):
        """(loss, recon, kl) of the batch x (B, D) at the draws eps (k, B, Z): loss = -L_k, the
        batch mean; recon and kl the means over draws and images of -log p(x|z_i) and of log
        q(z_i|x) - log p(z_i) (their sum is the k = 1 ELBO's negative, >= loss for the IWAE)."""
        if eps.ndim == 2:
            eps = eps[None]
        k, batch, latent = eps.shape
        mu, log_var = self.encode(x)
        # z_i = mu + sigma * eps_i for every draw at once: (k, B, Z)
        z, self.z_cache = reparameterize_forward(mu, log_var, eps)
        logits = self.decode(z.reshape(k * batch, latent)).reshape(k, batch, -1)
        log_w, self.w_cache = log_weights_forward(logits, x, z, mu, log_var)
        if self.objective == "iwae":
            bound, self.bound_cache = iwae_bound_forward(log_w)
        else:
            bound, self.bound_cache = vae_bound_forward(log_w)
        _, _, _, _, _, log_px, log_pz, log_qz = self.w_cache
        recon = float(-log_px.mean())
        kl = float((log_qz - log_pz).mean())
        return float(-bound.mean()), recon, kl

    def backward(self, beta=1.0):
        """Gradients of -L_k, the batch mean, at the last forward() into self.grads(); self.paths
        as VAE.backward's, 'recon' the path through log p(x|z), 'kl' those of log p(z) and log
        q(z|x). beta: 1 only (a KL weight has no place in L_k)."""
        if beta != 1.0:
            raise ValueError(f"the IWAE bound has no KL weight; beta must be 1, not {beta}")
        eps, sigma = self.z_cache
        k, batch, latent = eps.shape
        # each image's share of the batch mean of -L_k
        dbound = np.full(batch, -1.0 / batch, sigma.dtype)
        # -L_k -> log w_i: -w~_i / B (IWAE) or -1 / (kB) (the VAE's mean of k ELBOs)
        if self.objective == "iwae":
            dlog_w = iwae_bound_backward(dbound, self.bound_cache)
        else:
            dlog_w = vae_bound_backward(dbound, self.bound_cache)
        # log w_i -> the decoder's logits, z_i (log p(z) and log q's z path), mu and log_var
        # (log q's direct paths)
        dlogits, dz_kl, dmu_q, dlog_var_q = log_weights_backward(dlog_w, self.w_cache)
        # logits -> decoder -> z_i, every draw as a row
        dz_recon = self.decoder.backward(dlogits.reshape(k * batch, -1)).reshape(k, batch, latent)
        # z_i -> (mu, log_var): dz, dz * eps * sigma / 2, summed over the k draws
        dmu_recon, dlog_var_recon = reparameterize_backward(dz_recon, self.z_cache)
        dmu_z, dlog_var_z = reparameterize_backward(dz_kl, self.z_cache)
        dmu_recon = dmu_recon.sum(0)
        dlog_var_recon = dlog_var_recon.sum(0)
        # log q's path through z and its direct path into mu cancel; into log_var they leave
        # -1/2 per unit, weighted (z's path here also carries log p(z)'s, which stays)
        dmu_kl = dmu_z.sum(0) + dmu_q
        dlog_var_kl = dlog_var_z.sum(0) + dlog_var_q
        self.paths = {"recon_mu": dmu_recon, "kl_mu": dmu_kl,
                      "recon_log_var": dlog_var_recon, "kl_log_var": dlog_var_kl}
        dmu = dmu_recon + dmu_kl
        dlog_var = dlog_var_recon + dlog_var_kl
        dout = np.concatenate([dmu, dlog_var], axis=1)
        self.encoder.backward(dout, need_dx=False)
