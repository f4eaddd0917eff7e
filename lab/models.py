"""A model from its options: the standard VAE, or a learned prior, with any likelihood.

    build("standard")                     vae.VAE: p(z) = N(0, I), p(x|z) Bernoulli
    build("mog", 10)                      priors.MixturePriorVAE with K = 10
    build("vamp", likelihood="cb")        priors.VampPriorVAE with the continuous Bernoulli
    build(likelihood="gaussian", decoder_sigma=0.1)
    build(likelihood="gaussian", decoder_sigma="per-pixel")     # the decoder gives 2 x D outputs
"""
import numpy as np

from autograd import ReLU, Tanh
from iwae import IWAE
from likelihoods import ContinuousBernoulli, Gaussian, PixelGaussian
from priors import MixturePriorVAE, VampPriorVAE
from vae import VAE, Bernoulli

PRIORS = {"standard": VAE, "mog": MixturePriorVAE, "vamp": VampPriorVAE}
DEFAULT_COMPONENTS = {"mog": 10, "vamp": 100}      # K of a learned prior, unless given
LIKELIHOODS = ("bernoulli", "gaussian", "cb")
ACTIVATIONS = {"relu": ReLU, "tanh": Tanh}
# The training objective: the ELBO (vae.py: one draw and the closed-form KL, or iwae.py's mean of
# k ELBOs for more draws), or the importance-weighted bound (iwae.py).
OBJECTIVES = ("elbo", "iwae")


def make_likelihood(name="bernoulli", decoder_sigma=None, dtype=np.float32):
    """The p(x|z) object: 'bernoulli', 'cb', or 'gaussian' with decoder_sigma a number, 'learned',
    'optimal' or 'per-pixel'."""
    if name == "bernoulli":
        return Bernoulli()
    if name == "cb":
        return ContinuousBernoulli()
    if name == "gaussian" and decoder_sigma == "per-pixel":
        return PixelGaussian()
    if name == "gaussian":
        return Gaussian(decoder_sigma, dtype)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {LIKELIHOODS}")


def build(prior="standard", components=None, likelihood="bernoulli", decoder_sigma=None,
          n_in=784, hidden=400, latent=20, seed=0, dtype=np.float32, layers=1, activation="relu",
          objective="elbo", samples=1):
    """The VAE with this prior ('standard', 'mog' or 'vamp'; components: its K, or the default) and
    this likelihood; layers hidden layers of this activation on each side; trained on this
    objective with this many draws per image (iwae.IWAE unless the ELBO with one draw)."""
    if objective == "iwae" or samples > 1:
        bound = "iwae" if objective == "iwae" else "vae"
        return IWAE(n_in, hidden, latent, seed, dtype, layers, ACTIVATIONS[activation], bound,
                    samples)
    p_x_given_z = make_likelihood(likelihood, decoder_sigma, dtype)
    if prior == "standard":
        return VAE(n_in, hidden, latent, seed, dtype, p_x_given_z, layers, ACTIVATIONS[activation])
    k = components or DEFAULT_COMPONENTS[prior]
    return PRIORS[prior](n_in, hidden, latent, seed, dtype, k, p_x_given_z)


def components_of(model):
    """K of a learned prior; 0 for N(0, I), which has no components."""
    if model.prior_name == "standard":
        return 0
    return model.components


def activation_of(model):
    """'relu' or 'tanh', the name of the model's activation."""
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    return names[model.activation]


def objective_of(model):
    """(objective, samples) as the options name them: ('elbo', 1) for vae.VAE."""
    if isinstance(model, IWAE):
        objective = "iwae" if model.objective == "iwae" else "elbo"
        return objective, model.samples
    return "elbo", 1


def describe(model):
    """The architecture, as a run records it: sizes, prior and likelihood, layers and activation,
    and the objective with its draws."""
    objective, samples = objective_of(model)
    return {"n_in": model.n_in, "hidden": model.hidden, "latent": model.latent,
            "prior": model.prior_name, "components": components_of(model),
            "likelihood": model.likelihood.name, "decoder_sigma": decoder_sigma_of(model),
            "layers": model.layers, "activation": activation_of(model), "objective": objective,
            "samples": samples}


def decoder_sigma_of(model):
    """A Gaussian decoder's sigma setting (a number, 'learned', 'optimal' or 'per-pixel'); None for
    the other likelihoods."""
    if model.likelihood.name == "gaussian":
        return model.likelihood.decoder_sigma
    return None


def prior_label(model):
    """How figures and lines name the prior: N(0, I), or the learned prior and its K."""
    if model.prior_name == "standard":
        return "N(0, I)"
    return f"learned {model.prior_name} (K={model.components})"


def likelihood_label(model):
    """How figures and lines name p(x|z)."""
    if model.likelihood.name == "bernoulli":
        return "Bernoulli"
    if model.likelihood.name == "cb":
        return "continuous Bernoulli"
    sigma = model.likelihood.decoder_sigma
    if isinstance(sigma, str):
        return f"Gaussian ({sigma} sigma)"
    return f"Gaussian (sigma {sigma:g})"
