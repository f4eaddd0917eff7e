"""What a run will need, estimated from its options alone, before any work starts: the memory of its
largest arrays, and the size of the measurement after training. A run that would not fit in the
machine's memory is refused with the estimate and what to change.

The estimates count the arrays that grow with the options (4 bytes a float32, 8 a float64); they are
rough (within a factor of about two), enough to tell 2 GB from 200 GB.
"""
import os

FLOAT32 = 4
FLOAT64 = 8
PRIOR_DRAWS = 10000     # analysis.py draws 10,000 prior codes and evaluates log p(z) at test codes
TEST_IMAGES = 10000
PARAMETERS = "parameters, gradients and Adam's moments"


def parameter_count(n_in, hidden, latent, n_out):
    """The encoder's and the decoder's weights and biases (the decoder's n_out outputs: n_in, or
    2 n_in for a sigma per pixel)."""
    encoder = n_in * hidden + hidden + hidden * 2 * latent + 2 * latent
    decoder = latent * hidden + hidden + hidden * n_out + n_out
    return encoder + decoder


def prior_parameter_count(cfg, n_in, components):
    if cfg["prior"] == "mog":
        return components * (2 * cfg["latent"] + 1)
    if cfg["prior"] == "vamp":
        return components * n_in
    return 0


def estimate(cfg, n_in, components, iw_samples, gmm_components, n_fit=20000):
    """{part: bytes} of the largest arrays of each phase of a run, from its options.
    components: K of a learned prior (0 for N(0, I))."""
    hidden = cfg["hidden"]
    latent = cfg["latent"]
    batch = cfg["batch_size"]
    n_out = n_in
    if cfg["decoder_sigma"] == "per-pixel":
        n_out = 2 * n_in
    widest = max(n_out, hidden, 2 * latent)
    params = (parameter_count(n_in, hidden, latent, n_out)
              + prior_parameter_count(cfg, n_in, components))
    parts = {}
    # the parameters, their gradients, Adam's two moments, and Adam's temporaries
    parts[PARAMETERS] = 6 * params * FLOAT32
    # a training step's activations and their gradients, about eight arrays of B x the widest layer
    parts["a training step's activations"] = 8 * batch * widest * FLOAT32
    if components:
        # the KL to a mixture: (B, K, Z) arrays in the forward and the backward pass
        parts["the KL to the learned prior"] = 5 * batch * components * latent * FLOAT32
        # log p(z) of the prior draws and test codes after training: (draws, K, Z) in float64
        parts["log p(z) after training"] = 3 * PRIOR_DRAWS * components * latent * FLOAT64
    # iw_nll: the codes of 25 images (S, 25, Z) in float64, and 2,500 decoded at a time
    parts["iw_nll"] = (3 * iw_samples * 25 * latent * FLOAT64
                       + 6 * 2500 * max(hidden, n_out) * FLOAT32)
    # the mixture fitted to the codes: M full covariances and their eigenvectors, the outer
    # products of the codes (at most 2^23 numbers kept), and a chunk of 4,096 codes against every
    # component, (4096, M, Z)
    triangle = latent * (latent + 1) // 2
    kept = min(n_fit * triangle, 2 ** 23)
    parts["the mixture fitted to q(z)"] = FLOAT64 * (5 * gmm_components * latent * latent + kept
                                                     + 2 * 4096 * gmm_components * latent
                                                     + 4 * n_fit * gmm_components)
    return parts


def available_bytes():
    """The memory the machine has free now (Linux: MemAvailable), else its physical memory, else
    None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(n_bytes):
    return f"{n_bytes / 1e9:.1f} GB"


# What to make smaller, for each part.
SMALLER = {
    PARAMETERS: "--hidden or --latent",
    "a training step's activations": "--batch-size or --hidden",
    "the KL to the learned prior": "--prior-components or --batch-size",
    "log p(z) after training": "--prior-components or --latent",
    "iw_nll": "--iw-samples",
    "the mixture fitted to q(z)": "--latent or --gmm-components",
}


def check_memory(parts, available):
    """None if the largest phase fits in `available` bytes, else the one-line reason it does not.
    The parameters stay in memory throughout; the other parts come one after another, so the
    parameters plus the largest other part is what must fit."""
    if available is None:
        return None
    others = {part: size for part, size in parts.items() if part != PARAMETERS}
    largest_other = max(others, key=others.get)
    needed = parts[PARAMETERS] + others[largest_other]
    if needed <= available:
        return None
    # What to blame: the parameters if they alone do not fit, else the largest other part.
    if parts[PARAMETERS] > available:
        blame = PARAMETERS
    else:
        blame = largest_other
    return (f"this run would need about {gigabytes(needed)} of memory, more than the "
            f"{gigabytes(available)} free here ({blame}: {gigabytes(parts[blame])}); "
            f"make {SMALLER[blame]} smaller")
