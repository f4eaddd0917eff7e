"""The ruler of the samples: the classifier's softmax cross-entropy against finite differences, the
Frechet distance and the class coverage against cases with a known answer, and the classifier
trained once per dataset."""
import json
import math
import pathlib

import numpy as np
import pytest

from autograd import grad_check
from lab import classifier
from lab import quality
from test_vae import assert_grads_close

from conftest import make_flat_images, make_images


# ---- the classifier's loss -----------------------------------------------------------------------

def test_softmax_cross_entropy_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 10))      # moderate: no p(c|x) so small that rounding rules
    labels = rng.integers(0, 10, 6)
    dloss = rng.uniform(0.5, 1.5, 6)
    _, cache = classifier.softmax_cross_entropy_forward(logits, labels)
    dlogits = classifier.softmax_cross_entropy_backward(dloss, cache)

    def loss():
        value, _ = classifier.softmax_cross_entropy_forward(logits, labels)
        return float((dloss * value).sum())

    assert_grads_close(grad_check(loss, {"logits": logits}, {"logits": dlogits}), 1e-7)


def test_softmax_cross_entropy_is_minus_the_log_of_the_softmax_and_never_overflows():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    loss, _ = classifier.softmax_cross_entropy_forward(logits, np.array([0, 0]))
    softmax = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert loss[0] == pytest.approx(-math.log(softmax[0]), rel=1e-12)
    assert loss[1] == pytest.approx(0.0, abs=1e-12)          # p = 1 where exp(1000) overflows


# ---- the Frechet distance ------------------------------------------------------------------------

def test_frechet_distance_in_one_dimension_is_the_means_and_the_deviations_distance():
    # N(m1, s1^2) against N(m2, s2^2): d^2 = (m1 - m2)^2 + (s1 - s2)^2
    d2 = quality.frechet_from_moments(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]),
                                      np.array([[0.25]]))
    assert d2 == pytest.approx(3.0 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_distance_of_diagonal_covariances_sums_the_dimensions():
    a = np.array([1.0, 9.0, 0.04])
    b = np.array([4.0, 1.0, 0.01])
    d2 = quality.frechet_from_moments(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert d2 == pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)


def test_frechet_distance_of_covariances_that_do_not_commute_matches_the_2x2_closed_form():
    # For 2 x 2 positive definite A and B, the eigenvalues l1, l2 of AB are positive and
    # Tr((AB)^(1/2)) = sqrt(l1) + sqrt(l2) = sqrt(Tr(AB) + 2 sqrt(det A det B)).
    a = np.array([[2.0, 0.9], [0.9, 1.0]])
    b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(a @ b, b @ a)
    trace_of_root = math.sqrt(np.trace(a @ b) + 2 * math.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    want = np.trace(a) + np.trace(b) - 2 * trace_of_root
    assert quality.frechet_from_moments(np.zeros(2), a, np.zeros(2), b) == pytest.approx(want,
                                                                                        rel=1e-12)


def test_frechet_distance_is_zero_for_one_gaussian_and_unchanged_by_a_rotation():
    rng = np.random.default_rng(9)
    root = rng.standard_normal((5, 5))
    a = root @ root.T
    root = rng.standard_normal((5, 5))
    b = root @ root.T
    m_a, m_b = rng.standard_normal(5), rng.standard_normal(5)
    assert quality.frechet_from_moments(m_a, a, m_a, a) == pytest.approx(0, abs=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))                 # an orthogonal matrix
    rotated = quality.frechet_from_moments(q @ m_a, q @ a @ q.T, q @ m_b, q @ b @ q.T)
    assert rotated == pytest.approx(quality.frechet_from_moments(m_a, a, m_b, b), rel=1e-9)
    root = quality.psd_sqrt(a)
    np.testing.assert_allclose(root @ root, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(root, root.T)                          # the symmetric root
    given = quality.frechet_from_moments(m_a, a, m_b, b, root_a=root)   # as the runs pass it
    assert given == pytest.approx(quality.frechet_from_moments(m_a, a, m_b, b), rel=1e-12)


def test_frechet_distance_of_two_samples_estimates_their_gaussians():
    rng = np.random.default_rng(10)
    a = rng.normal(0.0, 1.0, (20000, 2))
    b = rng.normal([1.0, 0.0], [2.0, 1.0], (20000, 2))
    # (1 - 0)^2 + (2 - 1)^2 + (1 - 1)^2 = 2
    assert quality.frechet_distance(a, b) == pytest.approx(2.0, abs=0.05)


# ---- the classes a set covers --------------------------------------------------------------------

def test_class_coverage_is_zero_for_every_class_alike_and_largest_for_one_class():
    uniform = np.repeat(np.eye(10), 3, axis=0)                        # 3 sure images per class
    even = quality.class_coverage(uniform)
    assert even["class_tv"] == pytest.approx(0) and even["class_kl"] == pytest.approx(0)
    assert even["unsure"] == 0
    one_class = np.tile(np.eye(10)[4], (30, 1))
    single = quality.class_coverage(one_class)
    assert single["class_tv"] == pytest.approx(0.9)                   # 1 - 1/10
    assert single["class_kl"] == pytest.approx(math.log(10))
    torn = np.full((4, 10), 0.02)
    torn[:, 0] = [0.82, 0.49, 0.5, 0.42]                  # max p(c|x) < 0.5 twice (0.5 is sure)
    torn[:, 1] = 1 - torn[:, 0] - 8 * 0.02
    assert quality.class_coverage(torn)["unsure"] == pytest.approx(0.5)


# ---- the classifier, trained once per dataset ----------------------------------------------------

def test_the_classifier_learns_the_generated_classes_and_is_kept_beside_the_data(tmp_path,
                                                                                 monkeypatch):
    rng = np.random.default_rng(0)
    x_train, y_train = make_images(600, rng)
    x_test, y_test = make_images(200, rng)
    x_train, x_test = x_train.reshape(600, 784), x_test.reshape(200, 784)
    lines = []
    model, record, held_out = classifier.for_dataset(x_train, y_train, x_test, y_test,
                                                     str(tmp_path), lines.append)
    assert record["test_accuracy"] > 0.9 and record["trained_on"] == 500
    np.testing.assert_array_equal(held_out, x_train[500:])            # the last sixth, unseen
    assert model.accuracy(x_test, y_test) == record["test_accuracy"]
    assert any("test accuracy" in line for line in lines)
    assert any(f"kept as {classifier.cache_path(str(tmp_path), x_train, y_train)}" in line
               for line in lines)                              # where it went, said

    def fail(*args, **kwargs):
        pytest.fail("trained again")

    monkeypatch.setattr(classifier, "train_classifier", fail)
    again, record_again, _ = classifier.for_dataset(x_train, y_train, x_test, y_test,
                                                    str(tmp_path), lines.append)
    assert record_again == record
    assert again.accuracy(x_test, y_test) == record["test_accuracy"]
    other_labels = (y_train + 1) % 10                                   # another dataset's identity
    assert classifier.cache_path(str(tmp_path), x_train, other_labels) != classifier.cache_path(
        str(tmp_path), x_train, y_train)


def test_real_images_measure_better_than_the_pixel_ceiling():
    rng = np.random.default_rng(1)
    x_train, y_train = make_images(900, rng)
    x_test, y_test = make_images(300, rng)
    model = classifier.train_classifier(x_train.reshape(900, 784), y_train, epochs=4)
    flat_test = x_test.reshape(300, 784)
    mean, covariance = quality.gaussian_of(model.features(flat_test))
    reference = (mean, covariance, quality.psd_sqrt(covariance))
    real = quality.measure(model, make_flat_images(300, rng), reference)
    pixel_mean = x_train.reshape(900, 784).mean(axis=0) / 255
    ceiling = (rng.random((300, 784)) < pixel_mean).astype(np.float32)
    noise = quality.measure(model, ceiling, reference)
    assert real["frechet"] < noise["frechet"] / 10
    assert real["class_tv"] < 0.15 and real["unsure"] < noise["unsure"]


# ---- in a run ------------------------------------------------------------------------------------

def test_a_run_measures_every_sampler_against_the_test_images_and_draws_them(finished_run,
                                                                            data_dir):
    m = json.loads((finished_run / "metrics.json").read_text())
    samples = m["samples"]
    samplers = samples["samplers"]
    assert list(samplers) == ["real, held out", "prior, mean", "prior, draw", "fitted q(z), mean",
                              "fitted q(z), draw", "prior in holes, mean",
                              "prior not in holes, mean", "pixels Bernoulli(mean)"]
    assert samples["reference"] == "200 test images"
    assert samplers["real, held out"]["n"] == 100                     # the last sixth of 600
    for name in ("prior, mean", "prior, draw", "fitted q(z), mean", "pixels Bernoulli(mean)"):
        assert samplers[name]["n"] == 200, name
    in_holes, elsewhere = samplers["prior in holes, mean"], samplers["prior not in holes, mean"]
    holes = m["aggregate_posterior"]["prior_hole_fraction"]
    assert in_holes["n"] == elsewhere["n"] == round(10000 * min(holes, 1 - holes)), holes
    # every number has its scale: the held-out real images are the floor, noise the ceiling
    real, noise = samplers["real, held out"], samplers["pixels Bernoulli(mean)"]
    assert real["frechet"] < noise["frechet"] and real["class_tv"] < noise["class_tv"]
    for measured in samplers.values():
        assert sum(measured["shares"]) == pytest.approx(1)
    assert samples["classifier"]["test_accuracy"] > 0.9
    assert (finished_run / "samples_measured.png").stat().st_size > 0
    assert list(pathlib.Path(data_dir).glob("classifier-*.npz"))        # kept beside the data
