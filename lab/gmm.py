"""A Gaussian mixture fitted by EM to the aggregated posterior's codes, after training.

The first remedy for the holes: q(z) = (1/N) sum_n q(z|x_n) is where the images encode; a mixture of
M Gaussians fitted to codes z_n ~ q(z|x_n) gives a smooth density there, to sample from instead of
the prior, and to measure the prior's holes with (analysis.py).

    fit_gmm            EM (Dempster et al. 1977), full or diagonal covariances
    gmm_log_density    log q_fit(z) = log sum_k pi_k N(z; m_k, S_k)
    gmm_sample         z ~ q_fit
"""
import numpy as np

from priors import draw_components, logsumexp, sample_mixture
from vae import LOG_2PI, log_normal

# fit_gmm keeps the outer products (upper triangles, or c^2 for 'diag') in memory up to 2^23
# float64s (67 MB); above, it recomputes them a chunk of rows at a time.
MAX_KEPT = 2 ** 23


def fit_gmm(z, components=10, covariance="full", iters=200, tol=1e-5, rng=None, chunk=4096):
    """A mixture of M = components Gaussians fitted to the rows of z (N, Z) by EM.

        E-step: r_nj = pi_j N(z_n; m_j, S_j) / sum_i pi_i N(z_n; m_i, S_i)   (in log space)
        M-step: N_j = sum_n r_nj,  pi_j = N_j / N,  m_j = sum_n r_nj z_n / N_j,
                S_j = sum_n r_nj (z_n - m_j)(z_n - m_j)^T / N_j   (or its diagonal)

    The steps are computed in a faster form that equals them (a test holds it to a direct EM): see
    e_step and m_step. Eigenvalues of S_j are floored at 1e-6 times the mean variance of z, so every
    S_j stays valid. Stops when the mean log-likelihood gains less than tol. Returns {'log_pi',
    'means', 'covs', 'log_likelihood' (one value per iteration, never decreasing)}; covs (M, Z, Z),
    or (M, Z) for 'diag'."""
    rng = rng or np.random.default_rng(0)
    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    full = covariance == "full"
    zbar = z.mean(axis=0)
    var = z.var(axis=0)
    c = z - zbar                                    # the codes about their mean
    floor = 1e-6 * max(var.mean(), 1e-6)
    products = outer_products(c, full, chunk)
    # The start: means at M random codes, equal weights, S_j = diag(var) as V diag(lambda) V^T.
    mixture = {"b": z[rng.choice(n, components, replace=False)] - zbar,        # b_j = m_j - zbar
               "log_pi": np.full(components, -np.log(components)),
               "eigval": np.tile(var + floor, (components, 1)),
               "eigvec": np.tile(np.eye(d), (components, 1, 1))}
    history = []
    for _ in range(iters):
        log_joint = e_step(c, products, mixture, full)          # log pi_j N(z_n; m_j, S_j)
        log_p = logsumexp(log_joint, axis=1)                    # log p(z_n)
        history.append(float(log_p.mean()))
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
        r = np.exp(log_joint - log_p[:, None])                  # responsibilities r_nj
        mixture = m_step(c, products, r, full, floor)
    eigval = mixture["eigval"]
    eigvec = mixture["eigvec"]
    if full:
        covs = (eigvec * eigval[:, None, :]) @ eigvec.transpose(0, 2, 1)
    else:
        covs = eigval
    return {"log_pi": mixture["log_pi"], "means": zbar + mixture["b"], "covs": covs,
            "log_likelihood": history}


def outer_products(c, full, chunk):
    """The codes c_n (about their mean) enter EM only through c_n and the outer products c_n c_n^T.
    Both that matrix and the precision it meets are symmetric, so only its upper triangle is used,
    Z(Z + 1)/2 numbers (for 'diag', its diagonal c_n^2): the entries (up[i], right[i]). They are
    kept in memory, a chunk of rows an array, up to MAX_KEPT numbers, and recomputed above."""
    n, d = c.shape
    if full:
        up, right = np.triu_indices(d)
    else:
        up = np.arange(d)
        right = up
    rows = [slice(i, i + chunk) for i in range(0, n, chunk)]
    products = {"up": up, "right": right, "rows": rows, "kept": None,
                "twice": np.where(up == right, 1.0, 2.0)}    # off the diagonal, each entry twice
    if n * len(up) <= MAX_KEPT:
        products["kept"] = [outer_chunk(c, products, i) for i in range(len(rows))]
    return products


def outer_chunk(c, products, i):
    """The used entries of c_n c_n^T for the i-th chunk of rows: kept, or computed now."""
    if products["kept"] is not None:
        return products["kept"][i]
    s = products["rows"][i]
    return c[s][:, products["up"]] * c[s][:, products["right"]]


def e_step(c, products, mixture, full):
    """log pi_j N(z_n; m_j, S_j) for every code n and component j, (N, M). With b_j = m_j - zbar and
    P_j = S_j^-1,
        log N(z_n; m_j, S_j) = -1/2 [<c_n c_n^T, P_j> - 2 c_n . P_j b_j + b_j . P_j b_j
                                     + log|S_j| + Z log 2 pi],
    where <c c^T, P> = sum_d c_d^2 P_dd + 2 sum_(d<e) c_d c_e P_de: one product for all j."""
    b = mixture["b"]
    eigval = mixture["eigval"]
    eigvec = mixture["eigvec"]
    d = c.shape[1]
    if full:
        # P_j = V diag(1 / lambda) V^T from S_j's eigenvectors and eigenvalues
        p = (eigvec / eigval[:, None, :]) @ eigvec.transpose(0, 2, 1)
        pb = np.einsum("jde,je->jd", p, b)                      # P_j b_j
        p_upper = p[:, products["up"], products["right"]] * products["twice"]
    else:
        p = 1 / eigval
        pb = p * b
        p_upper = p
    const = (pb * b).sum(1) + np.log(eigval).sum(1) + d * LOG_2PI
    # <c_n c_n^T, P_j> for all n and j, a chunk of rows at a time
    n_chunks = len(products["rows"])
    quad = np.concatenate([(p_upper @ outer_chunk(c, products, i).T).T for i in range(n_chunks)])
    return mixture["log_pi"] - 0.5 * (quad - 2 * c @ pb.T + const)


def m_step(c, products, r, full, floor):
    """The mixture that the responsibilities r (N, M) give, from
        sum_n r_nj (z_n - m_j)(z_n - m_j)^T = sum_n r_nj c_n c_n^T - N_j b_j b_j^T,
    b_j the new weighted mean of the c_n: one product for all j. Eigenvalues floored at floor."""
    n_j = r.sum(axis=0) + 1e-12                                 # N_j
    b = (r.T @ c) / n_j[:, None]                                # m_j - zbar
    rows = products["rows"]
    weighted = sum(r[s].T @ outer_chunk(c, products, i) for i, s in enumerate(rows))
    second = weighted / n_j[:, None]                            # sum_n r_nj c_n c_n^T / N_j
    components, d = b.shape
    if full:
        covs = np.empty((components, d, d))
        covs[:, products["up"], products["right"]] = second     # the triangle,
        covs[:, products["right"], products["up"]] = second     # mirrored
        covs -= b[:, :, None] * b[:, None, :]
        eigval, eigvec = np.linalg.eigh(covs)
        eigval = np.maximum(eigval, floor)
    else:
        eigval = np.maximum(second - b * b, floor)
        eigvec = None
    log_pi = np.log(n_j / n_j.sum())
    return {"b": b, "log_pi": log_pi, "eigval": eigval, "eigvec": eigvec}


def gmm_component_log_density(gmm, z, chunk=4096):
    """log N(z_n; m_k, S_k) for every row n and component k: (N, M), a chunk of rows at a time."""
    z = np.asarray(z, dtype=np.float64)
    d = z.shape[1]
    k = len(gmm["means"])
    out = np.empty((len(z), k))
    if gmm["covs"].ndim == 2:                       # diagonal: S_k = diag(s_k^2)
        log_vars = np.log(gmm["covs"])
        for i in range(0, len(z), chunk):
            out[i:i + chunk] = log_normal(z[i:i + chunk, None, :], gmm["means"], log_vars)
        return out
    # Full: with S_k = L_k L_k^T (Cholesky), log N = -1/2 (|L_k^-1 (z - m_k)|^2 + log|S_k| + Z log 2
    # pi), where log|S_k| / 2 = sum_i log (L_k)_ii. All k components in one product: y = z A_k - m_k
    # A_k, A_k = L_k^-T.
    chol_inv = np.linalg.inv(np.linalg.cholesky(gmm["covs"]))      # (k, Z, Z): L_k^-1
    a = chol_inv.transpose(0, 2, 1)                                 # A_k = L_k^-T
    a_all = a.transpose(1, 0, 2).reshape(d, k * d)
    m_a = np.einsum("kd,kde->ke", gmm["means"], a)
    # sum_i log L_ii = -sum_i log (L^-1)_ii
    log_det_half = -np.log(np.diagonal(chol_inv, axis1=1, axis2=2)).sum(1)
    for i in range(0, len(z), chunk):
        y = (z[i:i + chunk] @ a_all).reshape(-1, k, d) - m_a
        squared = np.einsum("nkd,nkd->nk", y, y)
        out[i:i + chunk] = -0.5 * (squared + d * LOG_2PI) - log_det_half
    return out


def gmm_log_density(gmm, z):
    """log q_fit(z) = log sum_k pi_k N(z; m_k, S_k), per row of z."""
    log_joint = gmm["log_pi"] + gmm_component_log_density(gmm, z)
    return logsumexp(log_joint, axis=1, overwrite=True)


def gmm_sample(gmm, n, rng):
    """n draws from the fitted mixture: a component k ~ pi, then z = m_k + L_k eps (S_k = L_k
    L_k^T)."""
    if gmm["covs"].ndim == 2:
        return sample_mixture(gmm["means"], np.log(gmm["covs"]), gmm["log_pi"], n, rng)
    k = draw_components(gmm["log_pi"], n, rng)
    eps = rng.standard_normal((n, gmm["means"].shape[1]))
    chol = np.linalg.cholesky(gmm["covs"])
    return gmm["means"][k] + np.einsum("nij,nj->ni", chol[k], eps)
