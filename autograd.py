"""Backprop by hand: layers whose backward sits next to their forward, Adam, and a gradient checker.

Every layer follows one contract (the CS231n one, with the cache kept on the layer):
    y = layer.forward(x)       keeps exactly what backward needs
    dx = layer.backward(dy)    returns dL/dx and stores dL/dparam in layer.grads
Shapes: x is (B, n_in), y is (B, n_out); B is the batch size. ReLU's forward overwrites its input,
the fresh output of the Linear before it.
"""
import numpy as np


class Linear:
    """y = x @ W + b, with W (n_in, n_out) and b (n_out,)."""

    def __init__(self, n_in, n_out, rng, dtype=np.float32):
        # The recipe's (PyTorch nn.Linear) initialization: W, b ~ U(-1/sqrt(n_in), +1/sqrt(n_in)).
        bound = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-bound, bound, (n_in, n_out)).astype(dtype)
        b = rng.uniform(-bound, bound, n_out).astype(dtype)
        self.params = {"W": W, "b": b}
        self.grads = {"W": np.zeros_like(W), "b": np.zeros_like(b)}

    def forward(self, x):
        self.x = x                                  # backward needs x for dW
        y = x @ self.params["W"]
        y += self.params["b"]                       # y = x W + b, the bias added in place
        return y

    def backward(self, dy, need_dx=True):
        """need_dx=False skips dL/dx where nobody uses it (the encoder's input is data)."""
        self.grads["W"][...] = self.x.T @ dy        # dL/dW = x^T dy          (n_in, n_out)
        self.grads["b"][...] = dy.sum(axis=0)       # dL/db = sum over the batch of dy   (n_out,)
        if need_dx:
            return dy @ self.params["W"].T          # dL/dx = dy W^T          (B, n_in)
        return None


class ReLU:
    """y = max(x, 0); no parameters."""

    def __init__(self):
        self.params = {}
        self.grads = {}

    def forward(self, x):
        # In place: x is the fresh output of a Linear, which nothing else keeps. (Decoding many
        # codes at once, as iw_nll does, then needs one array of activations less.)
        self.y = np.maximum(x, 0, out=x)
        return self.y                               # backward needs y unchanged

    def backward(self, dy):
        return dy * (self.y > 0)                    # dL/dx = dy * 1[x > 0] = dy * 1[y > 0]


class Tanh:
    """y = tanh(x); no parameters. (The recipe uses ReLU; Burda et al.'s networks use tanh.)"""

    def __init__(self):
        self.params = {}
        self.grads = {}

    def forward(self, x):
        self.y = np.tanh(x, out=x)                  # in place, as ReLU's
        return self.y                               # backward needs y unchanged

    def backward(self, dy):
        return dy * (1 - self.y * self.y)           # dL/dx = dy * tanh'(x) = dy * (1 - y^2)


class MLP:
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, sizes, rng, dtype=np.float32, activation=ReLU):
        # sizes = [n_in, h1, ..., n_out]: Linear, ReLU, Linear, ..., Linear (no activation at the
        # end: the output is mu and log_var, or logits). activation: the class between them.
        self.layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            self.layers.append(Linear(n_in, n_out, rng, dtype))
            self.layers.append(activation())
        self.layers.pop()

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, need_dx=True):
        for layer in reversed(self.layers[1:]):
            dy = layer.backward(dy)
        first = self.layers[0]
        return first.backward(dy, need_dx)

    def named(self, what, prefix):
        """{'prefix.i.W': array, ...} of params (what='params') or grads (what='grads'), by
        reference. i counts the ReLUs too, so the Linear layers are 0, 2, 4, ..."""
        named = {}
        for i, layer in enumerate(self.layers):
            for k, v in getattr(layer, what).items():
                named[f"{prefix}.{i}.{k}"] = v
        return named


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1), updating the parameter arrays in place:

        m_t = beta1 m_(t-1) + (1 - beta1) g_t          the first moment, a running mean of g
        v_t = beta2 v_(t-1) + (1 - beta2) g_t^2        the second moment, a running mean of g^2
        theta_t = theta_(t-1) - alpha_t m_t / (sqrt(v_t) + eps_hat)

    with alpha_t = lr sqrt(1 - beta2^t) / (1 - beta1^t) and eps_hat = eps sqrt(1 - beta2^t): the
    paper's own reordering (end of its section 2) of theta_t = theta_(t-1) - lr m_hat / (sqrt(v_hat)
    + eps), m_hat = m_t / (1 - beta1^t), v_hat = v_t / (1 - beta2^t), the bias-corrected moments.
    The two are equal: multiply the numerator and the denominator of the second by
    sqrt(1 - beta2^t).
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = params                        # {name: array}, updated in place
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1 = self.beta1
        b2 = self.beta2
        # Python floats, so that float32 arrays stay float32 (a NumPy float64 scalar would promote
        # them).
        correction = (1.0 - b2 ** self.t) ** 0.5
        alpha_t = self.lr * correction / (1.0 - b1 ** self.t)
        eps_hat = self.eps * correction
        for k, theta in self.params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * g                     # m_t = beta1 m_(t-1) + (1 - beta1) g_t
            v *= b2
            v += (1.0 - b2) * (g * g)               # v_t = beta2 v_(t-1) + (1 - beta2) g_t^2
            theta -= alpha_t * m / (np.sqrt(v) + eps_hat)
        if self.t % 100 == 0:
            self.flush_subnormal_moments()

    def flush_subnormal_moments(self):
        """Where a gradient stays 0 (a pixel that is 0 in every image of a batch, a dead ReLU unit),
        m decays by beta1 each step and within ~800 steps falls below float32's smallest normal
        number (1.2e-38), where the CPU computes far slower (docs/experiments.md measures it). So
        every 100 steps moments below 1e-30 are set to 0. That moves no update by more than a few
        float32 roundings: an m below 1e-30 moved theta by less than alpha_t 1e-30 / eps_hat; and a
        v below 1e-30 has a square root under 1e-15, against eps_hat = 1e-8 sqrt(1 - beta2^t), at
        least 3.1e-9 from t = 100 on, so dropping it changes the update's denominator by a relative
        3.2e-7 at most (1e-7 as t grows). And 100 steps of decay cannot take a moment from above
        1e-30 to below 1.2e-38 (0.9^100 = 2.7e-5)."""
        for moments in (self.m, self.v):
            for a in moments.values():
                a[np.abs(a) < 1e-30] = 0


def grad_check(loss_fn, params, analytic, h=1e-5, n_checks=None, rng=None):
    """Max relative error between analytic gradients and central differences, per parameter name.

    loss_fn() -> float must read the float64 arrays in `params` ({name: array}), which are perturbed
    in place and restored. analytic: {name: dL/dparam}. For each entry (or n_checks random entries
    per array):
        numeric = (L(p + h) - L(p - h)) / (2h)
        rel_err = |analytic - numeric| / max(|analytic| + |numeric|, 1e-12)
    h = 1e-5 balances the two errors of the estimate in float64: truncation ~ h^2 and rounding ~
    1e-16 |L| / h (the best h is near 1e-16^(1/3) ~ 5e-6).
    """
    rng = rng or np.random.default_rng(0)
    errors = {}
    for name, p in params.items():
        assert p.dtype == np.float64, f"grad_check needs float64 arrays, {name} is {p.dtype}"
        flat = p.reshape(-1)
        g = analytic[name].reshape(-1)
        if n_checks is None or n_checks >= flat.size:
            idx = np.arange(flat.size)
        else:
            idx = rng.choice(flat.size, n_checks, replace=False)
        worst = 0.0
        for i in idx:
            old = flat[i]
            flat[i] = old + h
            plus = loss_fn()
            flat[i] = old - h
            minus = loss_fn()
            flat[i] = old
            numeric = (plus - minus) / (2 * h)
            rel_err = abs(g[i] - numeric) / max(abs(g[i]) + abs(numeric), 1e-12)
            worst = max(worst, rel_err)
        errors[name] = worst
    return errors
