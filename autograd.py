"""Backprop by hand: layers whose backward sits next to their forward, Adam, and a gradient checker.

Every layer follows one contract (the CS231n one, with the cache kept on the layer):
    y = layer.forward(x)       keeps exactly what backward needs
    dx = layer.backward(dy)    returns dL/dx and stores dL/dparam in layer.grads (Linear can skip dL/dx, or
                               give some rows of it only: need_dx)
ReLU works in place: its forward overwrites its input (a Linear's fresh output), its backward overwrites dy.
Shapes: x is (B, n_in), y is (B, n_out); B is the batch size.
"""
import copy
import math
import time

import numpy as np


class Linear:
    """y = x @ W + b, with W (n_in, n_out) and b (n_out,)."""

    def __init__(self, n_in, n_out, rng, dtype=np.float32):
        # The reference recipe's (PyTorch nn.Linear) initialization: W, b ~ U(-1/sqrt(n_in), +1/sqrt(n_in)).
        bound = 1.0 / np.sqrt(n_in)
        self.params = {"W": rng.uniform(-bound, bound, (n_in, n_out)).astype(dtype),
                       "b": rng.uniform(-bound, bound, n_out).astype(dtype)}
        self.grads = {"W": np.zeros_like(self.params["W"]), "b": np.zeros_like(self.params["b"])}

    def forward(self, x):
        self.x = x                                  # backward needs x for dW
        y = x @ self.params["W"]
        y += self.params["b"]                       # y = x W + b, the bias added in place
        return y

    def backward(self, dy, need_dx=True):
        """need_dx: True, False (an image's dL/dx is never used), or a slice of the rows whose dL/dx is needed."""
        ones = np.ones(len(dy), dy.dtype)             # a product: 2.4x faster than np.sum(dy, axis=0) (docs, sec. 6)
        np.matmul(self.x.T, dy, out=self.grads["W"])  # dL/dW = x^T dy      (n_in, n_out)
        np.matmul(ones, dy, out=self.grads["b"])      # dL/db = 1^T dy = sum_batch dy   (n_out,)
        if need_dx is True:
            return dy @ self.params["W"].T            # dL/dx = dy W^T       (B, n_in)
        if need_dx:
            return dy[need_dx] @ self.params["W"].T   # only those rows of dL/dx


class ReLU:
    """y = max(x, 0); no parameters."""
    params = grads = {}

    def forward(self, x):
        self.y = np.maximum(x, 0, out=x)            # in place: x is the fresh output of a Linear
        return self.y                               # backward needs y unchanged: nothing may write to it in between

    def backward(self, dy):
        # dL/dx = dy * 1[x > 0] = dy * 1[y > 0], in place: dy is ours. The mask is taken here, not in forward, so
        # that a pass with no backward (iw_nll decodes 10^6 codes, 2,500 x 400 units a block) does not pay for it.
        return np.multiply(dy, self.y > 0, out=dy)


class MLP:
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, sizes, rng, dtype=np.float32):
        # sizes = [n_in, h1, ..., n_out]: Linear, ReLU, Linear, ReLU, ..., Linear (no activation at the end).
        self.layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            self.layers += [Linear(n_in, n_out, rng, dtype), ReLU()]
        self.layers.pop()                           # the output is linear: mu/log_var or logits

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, need_dx=True):
        for layer in reversed(self.layers[1:]):
            dy = layer.backward(dy)
        return self.layers[0].backward(dy, need_dx)

    def twin(self):
        """A second MLP over the same parameter arrays, with caches and gradients of its own: for a second input
        whose pass must not overwrite the first one's caches. The parameters' gradient is then the sum of the two
        MLPs' grads (the VampPrior's pseudo-inputs, priors.py)."""
        twin = copy.copy(self)
        twin.layers = [copy.copy(layer) for layer in self.layers]       # the same params dicts, new caches
        for layer in twin.layers:
            layer.grads = {k: np.zeros_like(p) for k, p in layer.params.items()}
        return twin

    def named(self, what, prefix):
        """{'prefix.i.W': array, ...} of params (what='params') or grads (what='grads'), by reference. i counts the
        ReLUs too, so the Linear layers are 0, 2, 4, ..."""
        return {f"{prefix}.{i}.{k}": v for i, layer in enumerate(self.layers)
                for k, v in getattr(layer, what).items()}


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1), updating the parameter arrays in place. self.m and self.v hold the
    moments scaled, m / (1 - beta1) and v / (1 - beta2) (below).

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

    Stored scaled, m' = m / (1 - beta1) and v' = v / (1 - beta2), the same recursions need one pass less each:
    m' <- beta1 m' + g and v' <- beta2 v' + g^2. Every constant then folds into two scalars per step:
    theta <- theta - a_t m' / (sqrt(v') + eps_t), with c_t = sqrt((1 - beta2^t) / (1 - beta2)),
    a_t = lr (1 - beta1) / (1 - beta1^t) * c_t and eps_t = eps * c_t. Exactly the update above, in 10 passes
    over the parameters instead of 12.

    Subnormal numbers: where a gradient stays 0 (a pixel that is 0 in every image of a batch, a dead ReLU unit), m'
    decays by beta1 each step and within ~800 steps falls below 1.2e-38, float32's smallest normal number, where the
    CPU computes about 10 times slower: Adam's step took 9.6 ms instead of 1.7 ms after two epochs (measured). So
    every 100 steps moments below 1e-30 are set to 0. That moves no update by more than float32 rounding (for m',
    a_t m' / (sqrt(v') + eps_t) < 1e-30 * a_t / eps_t; for v', sqrt(v') < 1e-15 is under 1e-7 of eps_t >= 1e-8), and
    100 steps of decay cannot take a moment from above 1e-30 to below 1.2e-38 (0.9^100 = 2.7e-5).
    """

    CHUNK = 65536                                   # elements updated together (below)

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = params                        # {name: array}, updated in place, through flat views:
        if not all(p.flags.c_contiguous for p in params.values()):      # (a view of a strided array would be a copy)
            raise ValueError("Adam updates C-contiguous parameter arrays only")
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}     # m' = m / (1 - beta1)
        self.v = {k: np.zeros_like(p) for k, p in params.items()}     # v' = v / (1 - beta2)
        self.tmp = {k: np.empty_like(p) for k, p in params.items()}   # scratch: no allocation per step
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        # Python floats, so that the float32 arrays stay float32 (a NumPy float64 scalar would promote them).
        c_t = math.sqrt((1.0 - b2 ** self.t) / (1.0 - b2))
        a_t, eps_t = self.lr * (1.0 - b1) / (1.0 - b1 ** self.t) * c_t, self.eps * c_t
        for k, param in self.params.items():
            arrays = [a.reshape(-1) for a in (param, grads[k], self.m[k], self.v[k], self.tmp[k])]   # flat views
            # CHUNK elements at a time: the five arrays' chunks (1.3 MB) stay in the CPU's L2 cache (2 MB here) through
            # the ten passes; the five whole arrays of a layer (6 MB) do not (docs/experiments.md, section 6).
            for i in range(0, param.size, self.CHUNK):
                p, g, m, v, tmp = (a[i:i + self.CHUNK] for a in arrays)
                m *= b1; m += g                                           # m' = beta1 m' + g
                np.square(g, out=tmp); v *= b2; v += tmp                  # v' = beta2 v' + g^2
                np.sqrt(v, out=tmp); tmp += eps_t                         # sqrt(v') + eps_t
                np.divide(m, tmp, out=tmp); tmp *= a_t; p -= tmp          # theta -= a_t m' / (sqrt(v') + eps_t)
                if self.t % 100 == 0:                                     # no subnormal moments (docstring)
                    m[np.abs(m, out=tmp) < 1e-30] = 0
                    v[np.abs(v, out=tmp) < 1e-30] = 0


def grad_check(loss_fn, params, analytic, h=1e-5, n_checks=None, rng=None):
    """Max relative error between analytic gradients and central differences, per parameter name.

    loss_fn() -> float must read the float64 arrays in `params` ({name: array}), which are perturbed in place
    and restored. analytic: {name: dL/dparam}. For each entry (or n_checks random entries per array):
        numeric = (L(p + h) - L(p - h)) / (2h)
        rel_err = |analytic - numeric| / max(|analytic| + |numeric|, 1e-12)
    h = 1e-5 balances the two errors of the estimate in float64: truncation ~ h^2 and rounding ~ 1e-16 * |L| / h
    (the best h is near 1e-16^(1/3) ~ 5e-6).
    """
    rng = rng or np.random.default_rng(0)
    errors = {}
    for name, p in params.items():
        assert p.dtype == np.float64, f"grad_check needs float64 arrays, {name} is {p.dtype}"
        flat, g = p.reshape(-1), analytic[name].reshape(-1)
        idx = np.arange(flat.size) if n_checks is None or n_checks >= flat.size else \
            rng.choice(flat.size, n_checks, replace=False)
        worst = 0.0
        for i in idx:
            old = flat[i]
            flat[i] = old + h; plus = loss_fn()
            flat[i] = old - h; minus = loss_fn()
            flat[i] = old
            numeric = (plus - minus) / (2 * h)
            worst = max(worst, abs(g[i] - numeric) / max(abs(g[i]) + abs(numeric), 1e-12))
        errors[name] = worst
    return errors


def matmul_floor(mlps, batch_size, dtype, reps=50):
    """Seconds per training step spent in the matrix products of these MLPs alone (the same shapes, timed here),
    and their FLOP count. For each Linear, W (n_in, n_out): forward x W, backward x^T dy and dy W^T (except for
    the very first layer, whose input is data). The least time a step's products can take (the product floor;
    benchmarks/floor.py adds Adam and the loss's exp and log to it: the step floor)."""
    rng = np.random.default_rng(0)
    linears = [layer for mlp in mlps for layer in mlp.layers if isinstance(layer, Linear)]
    work = [(rng.random((batch_size, layer.params["W"].shape[0]), dtype=dtype), layer.params["W"].copy(), i > 0)
            for i, layer in enumerate(linears)]
    flops = sum(2 * batch_size * w.size * (3 if needs_dx else 2) for _, w, needs_dx in work)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x, w, needs_dx in work:
            y = x @ w                               # forward
            x.T @ y                                 # dL/dW (y stands in for dy: same shape)
            if needs_dx:
                y @ w.T                             # dL/dx
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), flops
