"""Operations on codes z: encoding every image, drawing from the aggregated posterior, and walking
the latent space (interpolations between two codes, traversals of one unit).

    encode_all     mu, log_var of q(z|x) for every image
    draw_codes     one z_n ~ q(z|x_n) per image: together, draws from q(z) = (1/N) sum_n q(z|x_n)
    interpolate    the path between two codes, straight (linear) or along the sphere (spherical)
    traverse       one unit varied over a range, every other unit held at a code's values

Why the spherical path: in Z dimensions a draw from N(0, I) has a norm near sqrt(Z), but the
midpoint of the straight line between two independent draws has a norm near sqrt(Z / 2), a region
the prior itself almost never visits (White 2016, "Sampling generative networks").
"""
import numpy as np

import mnist
from vae import reparameterize_forward


def encode_all(model, images, batch_size=1000):
    """mu, log_var (N, Z) in float64 of every uint8 image, a batch at a time (no float copy of the
    set)."""
    mus = []
    log_vars = []
    for i in range(0, len(images), batch_size):
        x = mnist.to_float(images[i:i + batch_size], model.dtype)
        mu, log_var = model.encode(x)
        mus.append(mu)
        log_vars.append(log_var)
    return np.concatenate(mus).astype(np.float64), np.concatenate(log_vars).astype(np.float64)


def draw_codes(mu, log_var, rng):
    """One z_n ~ q(z|x_n) per row: together, draws from the aggregated posterior q(z)."""
    eps = rng.standard_normal(mu.shape)
    z, _ = reparameterize_forward(mu, log_var, eps)
    return z


def interpolate(z0, z1, steps, kind="linear"):
    """`steps` points from z0 to z1 (both included), at t = 0, 1/(steps - 1), ..., 1; z0 and z1 are
    (Z,) or (n, Z) for n paths at once, giving (steps, Z) or (steps, n, Z).

    linear:     z(t) = (1 - t) z0 + t z1
    spherical:  z(t) = r(t) u(t), with the norm r(t) = (1 - t) |z0| + t |z1| interpolated linearly
                and the direction u(t) moving along the great circle from u0 = z0 / |z0| to
                u1 = z1 / |z1| at a constant rate:
                    u(t) = [sin((1 - t) W) u0 + sin(t W) u1] / sin W,   cos W = u0 . u1
    Why not White's formula (sin((1 - t) W) z0 + sin(t W) z1) / sin W on the codes themselves: for
    codes of unequal norms its norm is not between theirs, while here the path never leaves the
    shell between the two norms, where the prior's draws lie. Opposite directions have no single
    great circle between them: there the path is the straight one."""
    z0 = np.asarray(z0, np.float64)
    z1 = np.asarray(z1, np.float64)
    t = np.linspace(0.0, 1.0, steps).reshape((steps,) + (1,) * z0.ndim)
    if kind == "linear":
        return (1 - t) * z0 + t * z1
    if kind != "spherical":
        raise ValueError(f"kind is 'linear' or 'spherical', not {kind!r}")
    r0 = np.linalg.norm(z0, axis=-1, keepdims=True)
    r1 = np.linalg.norm(z1, axis=-1, keepdims=True)
    u0 = z0 / r0
    u1 = z1 / r1
    cos_w = np.clip((u0 * u1).sum(-1, keepdims=True), -1.0, 1.0)
    w = np.arccos(cos_w)                                    # the angle between the directions
    sin_w = np.sin(w)
    # Where the directions are (nearly) the same, the circle is the chord; where they are opposite,
    # no great circle is singled out (and in Z = 1 there is none): there the path is the straight
    # one.
    degenerate = sin_w < 1e-6
    opposite = degenerate & (cos_w < 0)
    safe_sin_w = np.where(degenerate, 1.0, sin_w)
    along_circle = (np.sin((1 - t) * w) * u0 + np.sin(t * w) * u1) / safe_sin_w
    along_chord = (1 - t) * u0 + t * u1
    u = np.where(degenerate, along_chord, along_circle)
    length = np.linalg.norm(u, axis=-1, keepdims=True)
    u = u / np.where(length > 0, length, 1.0)
    r = (1 - t) * r0 + t * r1
    straight = (1 - t) * z0 + t * z1
    return np.where(opposite, straight, r * u)


def traverse(z, unit, values):
    """len(values) copies of the code z (Z,), each with z[unit] set to one of the values: the other
    units stay exactly as they are. (len(values), Z)."""
    z = np.asarray(z, np.float64)
    walk = np.tile(z, (len(values), 1))
    walk[:, unit] = values
    return walk
