"""How good the samples are, measured on the images with the dataset's classifier
(lab/classifier.py): for every way of sampling, the Frechet distance of their features to the test
images' and the classes they cover.

    Frechet distance (Heusel et al. 2017, FID's formula on this classifier's features): with m and C
    the mean and covariance of each set's features,
        d^2 = |m_a - m_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))
    the distance between the two Gaussians fitted to the features (0: the same mean and spread).
    Class coverage: the share q_c of samples the classifier puts in class c, against uniform
    u = 1/C,
        total variation  TV = 1/2 sum_c |q_c - u|       (0: every class as often; at most 1 - u)
        KL(q || u)       = sum_c q_c log(q_c / u)             (0: uniform; log C: a single class)
    and the share of samples the classifier is unsure of, max_c p(c|x) < 0.5.

Every number has its scale: held-out real images (never seen by the classifier) are the floor, and
pixels drawn each from its own Bernoulli with the training images' mean (every pixel right on
average, no shapes at all) a ceiling.
"""
import time

import numpy as np

import mnist

from lab.gmm import gmm_sample

UNSURE = 0.5          # a sample is unsure when the classifier's largest p(c|x) is below this


# ---- the measures --------------------------------------------------------------------------------

def psd_sqrt(matrix):
    """The symmetric square root S^(1/2) of a symmetric positive semi-definite matrix, by its
    eigendecomposition S = V diag(l) V^T: V diag(sqrt(l)) V^T, rounding's small negative l set to
    0."""
    eigenvalues, vectors = np.linalg.eigh(matrix)
    roots = np.sqrt(np.clip(eigenvalues, 0, None))
    return (vectors * roots) @ vectors.T


def frechet_from_moments(m_a, c_a, m_b, c_b, root_a=None):
    """d^2 = |m_a - m_b|^2 + Tr(C_a) + Tr(C_b) - 2 Tr((C_a C_b)^(1/2)).

    C_a C_b is not symmetric, and a general matrix square root of it (scipy's sqrtm) can return
    complex parts from rounding. Its trace is taken in the symmetric form instead: C_a C_b is
    similar to M = C_a^(1/2) C_b C_a^(1/2) (conjugate by C_a^(1/2)), which is symmetric positive
    semi-definite, so Tr((C_a C_b)^(1/2)) = Tr(M^(1/2)) = sum_i sqrt(eigenvalue_i of M), each
    eigenvalue from eigh, real, and clipped at 0. root_a: C_a^(1/2), if known (the reference's,
    computed once for every sampler)."""
    difference = m_a - m_b
    if root_a is None:
        root_a = psd_sqrt(c_a)
    middle = root_a @ c_b @ root_a
    middle = (middle + middle.T) / 2                    # symmetric to the last bit for eigh
    trace_of_root = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum()
    d2 = difference @ difference + np.trace(c_a) + np.trace(c_b) - 2 * trace_of_root
    return float(max(d2, 0.0))


def gaussian_of(features):
    """The mean and covariance of a set of features (N, F)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(features_a, features_b):
    """The Frechet distance between two sets of features (N_a, F) and (N_b, F)."""
    return frechet_from_moments(*gaussian_of(features_a), *gaussian_of(features_b))


def class_coverage(probabilities):
    """The classes a set of images covers, from the classifier's p(c|x) (N, C): the total variation
    and the KL from uniform of the predicted classes' shares, and the share of unsure images."""
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    shares = np.bincount(predicted, minlength=n_classes) / len(predicted)          # q_c
    uniform = 1.0 / n_classes
    present = shares > 0                                                            # 0 log 0 = 0
    kl = float((shares[present] * np.log(shares[present] / uniform)).sum())
    tv = float(0.5 * np.abs(shares - uniform).sum())
    unsure = float((probabilities.max(axis=1) < UNSURE).mean())
    return {"class_tv": tv, "class_kl": kl, "unsure": unsure, "shares": shares.tolist()}


def measure(classifier, images, reference):
    """The Frechet distance of these images to the reference (its features' mean, covariance and
    the covariance's square root), and their classes."""
    reference_mean, reference_covariance, reference_root = reference
    mean, covariance = gaussian_of(classifier.features(images))
    frechet = frechet_from_moments(reference_mean, reference_covariance, mean, covariance,
                                   root_a=reference_root)
    measured = {"frechet": frechet}
    measured.update(class_coverage(classifier.probabilities(images)))
    measured["n"] = len(images)
    return measured


# ---- every way of sampling -----------------------------------------------------------------------

def decoded(model, z, rng):
    """The mean of p(x|z) at each z, and one draw x ~ p(x|z), as images in [0, 1]."""
    outputs = model.decode(z.astype(model.dtype))
    mean = model.likelihood.mean(outputs)
    draw = model.likelihood.sample(outputs, rng)
    return np.clip(mean, 0, 1), np.clip(draw, 0, 1)


def samplers(model, found, x_held_out, x_train, n, rng):
    """{name: images} for every way of sampling, n images each: held-out real images (the floor);
    the prior (N(0, I), or the learned one), means of p(x|z) and draws; the mixture fitted to q(z),
    both; the means of the prior's draws in holes of q(z) and not in them, as many of each as the
    fewer of the 10,000 draws the holes were counted on (the Frechet distance grows as N shrinks:
    compare these two with each other); and pixels each Bernoulli with the training set's mean
    (the ceiling)."""
    prior_mean, prior_draw = decoded(model, found["z_prior"][:n], rng)
    fitted_mean, fitted_draw = decoded(model, gmm_sample(found["gmm"], n, rng), rng)
    pixel_mean = mnist.to_float(x_train, np.float64).mean(axis=0)
    ceiling = (rng.random((n, len(pixel_mean))) < pixel_mean).astype(np.float32)
    images = {"real, held out": x_held_out[:n],
              "prior, mean": prior_mean, "prior, draw": prior_draw,
              "fitted q(z), mean": fitted_mean, "fitted q(z), draw": fitted_draw}
    # all the prior draws the holes were counted on (10,000), split
    in_hole = found["in_hole"]
    each = min(int(in_hole.sum()), int((~in_hole).sum()))
    if each >= 2:
        z_in, z_out = found["z_prior"][in_hole][:each], found["z_prior"][~in_hole][:each]
        images["prior in holes, mean"] = decoded(model, z_in, rng)[0]
        images["prior not in holes, mean"] = decoded(model, z_out, rng)[0]
    images["pixels Bernoulli(mean)"] = ceiling
    return images


def sample_quality(model, found, classifier, record, x_test, x_held_out, x_train, seed,
                   log=print):
    """metrics.json's "samples": every sampler's measures against the test images, as many samples
    as test images; and the arrays the figures draw."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 11])
    n = len(x_test)
    reference_mean, reference_covariance = gaussian_of(classifier.features(x_test))
    reference = (reference_mean, reference_covariance, psd_sqrt(reference_covariance))
    drawn = samplers(model, found, x_held_out, x_train, n, rng)
    measured = {}
    for name, images in drawn.items():
        measured[name] = measure(classifier, images, reference)
    # the prior's means, from the one the classifier is least sure of to the one it is surest of
    confidence = classifier.probabilities(drawn["prior, mean"]).max(axis=1)
    by_confidence = drawn["prior, mean"][np.argsort(confidence, kind="stable")]
    seconds = time.perf_counter() - t0
    result = {"classifier": record, "reference": f"{n} test images", "samplers": measured,
              "seconds": round(seconds, 2)}
    log(quality_lines(result))
    return result, {"images": drawn, "prior_by_confidence": by_confidence}


def quality_lines(result):
    """What sample_quality found, a line per sampler."""
    lines = [f"  the samples against the {result['reference']}, on the classifier's features "
             f"(test accuracy {result['classifier']['test_accuracy']:.2%}), "
             f"{result['seconds']:.1f} s:"]
    for name, m in result["samplers"].items():
        lines.append(f"    {name:<26} Frechet {m['frechet']:8.2f}   classes TV {m['class_tv']:.3f}"
                     f"   unsure {m['unsure']:6.1%}   ({m['n']} images)")
    return "\n".join(lines)
