"""The Gaussian decoder's sigma beyond its gradients: the optimal sigma and the sigma it keeps for
outside training, the decoder with a sigma per pixel and the density that runs away on raw pixels,
dequantization, and runs that train them."""
import argparse
import json
import math

import numpy as np
import pytest

import likelihoods
import mnist
import vae

from lab import analysis
from lab import command
from lab import options
from lab import runs
from lab import training

from conftest import SMALL, drawing_only, direct_log_normal, run_cli, small_vae_batch


# ---- the optimal sigma ---------------------------------------------------------------------------

def test_the_optimal_sigma_is_the_root_mean_squared_error_and_minimises_the_batch_loss():
    rng = np.random.default_rng(40)
    logits = rng.standard_normal((7, 12))
    x = rng.uniform(0, 1, (7, 12))
    log_sigma = likelihoods.optimal_log_sigma(logits, x)
    rmse = math.sqrt(np.mean((x - vae.sigmoid(logits)) ** 2))
    assert math.exp(log_sigma[0]) == pytest.approx(rmse, rel=1e-12)

    def batch_mean(log_s):
        nll, _ = likelihoods.gaussian_nll_forward(logits, x, np.array([log_s]))
        return nll.mean()
    best = batch_mean(log_sigma[0])
    for step in (-1e-3, 1e-3, -0.1, 0.1):
        assert batch_mean(log_sigma[0] + step) > best


def test_outside_training_the_optimal_sigma_is_the_last_epochs_training_error():
    # sigma*^2 outside training = the epoch's squared error over all its pixels: not the last
    # batch's, nor a mean of the batches' sigmas (batches of unequal size tell them apart).
    model, x, eps = small_vae_batch(likelihood="gaussian", decoder_sigma="optimal", batch=9)
    squared_error = 0.0
    for rows in (slice(0, 2), slice(2, 9), slice(0, 5)):
        model.forward(x[rows], eps[rows])
        mu, log_var = model.encode(x[rows])
        z, _ = vae.reparameterize_forward(mu, log_var, eps[rows])
        squared_error += ((x[rows] - vae.sigmoid(model.decode(z))) ** 2).sum()
    model.likelihood.end_epoch()
    pixels = (2 + 7 + 5) * x.shape[1]
    sigma = math.exp(model.likelihood.log_sigma()[0])
    assert sigma == pytest.approx(math.sqrt(squared_error / pixels), rel=1e-12)
    assert model.likelihood.state["epoch_pixels"][0] == 0          # the next epoch starts afresh
    # the test loss uses it, whatever the test batch's own error
    mu, log_var = model.encode(x)
    z, _ = vae.reparameterize_forward(mu, log_var, eps)
    m = vae.sigmoid(model.decode(z))
    recon = -direct_log_normal(x, m, sigma ** 2)
    assert -model.likelihood.log_density(x, model.decode(z)) == pytest.approx(recon, rel=1e-12)


def test_a_model_file_keeps_the_optimal_sigma_it_uses_outside_training(tmp_path):
    model, _, _ = small_vae_batch(likelihood="gaussian", decoder_sigma="optimal")
    model.likelihood.state["log_sigma"][...] = -2.25
    runs.save_model(model, str(tmp_path / "model.npz"))
    loaded, _ = runs.load_model(str(tmp_path / "model.npz"))
    assert loaded.likelihood.decoder_sigma == "optimal"
    assert loaded.likelihood.log_sigma()[0] == -2.25


# ---- a sigma per pixel ---------------------------------------------------------------------------

def test_a_per_pixel_decoder_gives_the_means_logits_then_the_log_sigmas():
    model, x, _ = small_vae_batch(likelihood="gaussian", decoder_sigma="per-pixel")
    mu, _ = model.encode(x)
    outputs = model.decode(mu)
    assert outputs.shape == (len(x), 2 * x.shape[1])
    m = vae.sigmoid(outputs[:, :12])
    sigma = np.exp(outputs[:, 12:])
    np.testing.assert_allclose(model.likelihood.mean(outputs), m, rtol=1e-14)
    np.testing.assert_allclose(model.likelihood.sigma(outputs), sigma, rtol=1e-14)
    want = direct_log_normal(x, m, sigma ** 2)
    np.testing.assert_allclose(model.likelihood.log_density(x, outputs), want, rtol=1e-12)
    # a draw has that mean and that sigma, pixel by pixel
    rng = np.random.default_rng(41)
    draws = np.stack([model.likelihood.sample(outputs, rng) for _ in range(4000)])
    standard_error = sigma / math.sqrt(4000)
    assert np.all(np.abs(draws.mean(0) - m) < 5 * standard_error)
    np.testing.assert_allclose(draws.std(0), sigma, rtol=0.1)


def test_on_raw_pixels_the_per_pixel_density_grows_without_bound_and_dequantized_it_does_not():
    # Where the mean hits a pixel exactly (0, as float32's sigmoid gives for logits below -17),
    # -log p falls by one nat per pixel for each nat log sigma falls: no minimum (Mattei &
    # Frellsen 2018). Dequantized, the pixel is never exactly the mean, and the loss has a
    # minimum in log sigma.
    x = np.zeros((1, 5), np.float32)
    dequantized = mnist.dequantize(np.zeros((1, 5), np.uint8), np.random.default_rng(42))
    logits = np.full((1, 5), -20, np.float32)

    def nll(images, log_sigma):
        outputs = np.concatenate([logits, np.full((1, 5), log_sigma, np.float32)], 1)
        value, _ = likelihoods.pixel_gaussian_nll_forward(outputs, images)
        return float(value[0])
    assert vae.sigmoid(logits)[0, 0] == 0
    raw = [nll(x, s) for s in (-5.0, -10.0, -20.0, -40.0)]
    assert np.diff(raw) == pytest.approx([-25, -50, -100], rel=1e-5)
    deq = {s: nll(dequantized, s) for s in np.arange(-12.0, 0.0, 0.5)}
    lowest = min(deq, key=deq.get)
    assert -12 < lowest < -0.5                              # a minimum inside, not at the edge


# ---- dequantization ------------------------------------------------------------------------------

def test_dequantized_pixels_fill_their_bins_of_width_one_256th():
    # pixel k -> (k + u) / 256, u ~ U(0, 1): inside [k/256, (k+1)/256] (the edge itself only by
    # float32's rounding, about once in 10^5), the bin's middle on average; a / 255 would move pixel
    # 255 past 1 and half of pixel 128's draws out of its bin.
    pixels = np.tile(np.arange(256, dtype=np.uint8), (2000, 1))
    x = mnist.dequantize(pixels, np.random.default_rng(43))
    assert x.dtype == np.float32
    in_bin = (x >= pixels / 256) & (x <= (pixels + 1.0) / 256)
    assert in_bin.all()
    inside = np.floor(x.astype(np.float64) * 256) == pixels
    assert inside.mean() > 1 - 1e-4
    assert x.min() >= 0 and x.max() <= 1
    middle = (np.arange(256) + 0.5) / 256
    standard_error = 1 / 256 / math.sqrt(12 * 2000)
    assert np.all(np.abs(x.mean(0) - middle) < 5 * standard_error)


def test_the_test_set_is_dequantized_once_and_training_batches_afresh(data_dir):
    args = argparse.Namespace(data_dir=data_dir, mirror=None, posterior_image=0, gmm_components=3,
                              gmm_covariance="full", analyze=None, resume=None)
    cfg = {**command.DEFAULTS, "dequantize": True, "batch_size": 50}
    _, x_test, _ = command.load_data(args, cfg, None)
    _, again, _ = command.load_data(args, cfg, None)
    assert x_test.dtype == np.float32
    np.testing.assert_array_equal(x_test, again)            # the same draw, run after run
    x_train, _, _ = command.load_data(args, {**cfg, "dequantize": False}, None)
    rng = np.random.default_rng(44)
    perm = np.arange(len(x_train))
    first, _ = training.batch(x_train, perm, 0, cfg, rng, 4)
    second, _ = training.batch(x_train, perm, 0, cfg, rng, 4)
    assert not np.array_equal(first, second)                 # the same images, drawn anew
    assert np.all((first >= x_train[:50] / 256) & (first <= (x_train[:50] + 1.0) / 256))


# ---- runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gaussian_runs(tmp_path_factory, data_dir):
    """The optimal sigma and the sigma per pixel on dequantized pixels, 2 epochs each, as the
    likelihood experiment runs them."""
    out = tmp_path_factory.mktemp("runs") / "gaussians"
    with drawing_only("decoder_sigma.png", "likelihood_sigma.png"):
        assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--likelihoods",
                       "gaussian:optimal", "gaussian:per-pixel+dequantize", "--out", str(out)) == 0
    return out


def test_an_optimal_sigma_run_records_its_sigma_each_epoch_and_keeps_the_last(gaussian_runs):
    folder = gaussian_runs / "gaussian-sigma-optimal"
    m = json.loads((folder / "metrics.json").read_text())
    curve = [s["sigma"] for s in m["decoder_sigma_curve"]]
    assert len(curve) == 2 and curve[1] < curve[0] < 1
    assert m["decoder_sigma"]["sigma"] == curve[-1]
    model, _ = runs.load_model(str(folder / "model.npz"))
    assert math.exp(model.likelihood.log_sigma()[0]) == pytest.approx(curve[-1], rel=1e-6)
    assert m["config"]["dequantize"] is False


def test_a_dequantized_run_reports_the_bound_in_bits_from_its_own_test_likelihood(gaussian_runs):
    folder = gaussian_runs / "gaussian-sigma-per-pixel-dequantized"
    m = json.loads((folder / "metrics.json").read_text())
    assert m["config"]["dequantize"] is True and m["config"]["decoder_sigma"] == "per-pixel"
    assert m["bits_per_dim"] == pytest.approx(analysis.bits_from_nats(m["iw_nll"], 784), rel=1e-12)
    sigma = m["decoder_sigma"]
    assert 0 < sigma["smallest"] <= sigma["median"] <= sigma["largest"]
    assert len(m["decoder_sigma_curve"]) == 2
    assert (folder / "decoder_sigma.png").stat().st_size > 0
    assert (gaussian_runs / "likelihood_sigma.png").stat().st_size > 0
    rows = json.loads((gaussian_runs / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["gaussian, sigma optimal",
                                        "gaussian, sigma per-pixel, dequantized"]


def test_a_per_pixel_run_that_runs_away_is_told_to_start_again_dequantized():
    # a run continues with its own options, so the remedy is always a new run
    per_pixel, _, _ = small_vae_batch(likelihood="gaussian", decoder_sigma="per-pixel")
    learned, _, _ = small_vae_batch(likelihood="gaussian", decoder_sigma="learned")
    raw = {**command.DEFAULTS, "dequantize": False}
    dequantized = {**command.DEFAULTS, "dequantize": True}
    binary = {**command.DEFAULTS, "binarize": True}
    assert "with --dequantize" in training.remedy(per_pixel, raw)
    assert "gaussian:per-pixel+dequantize" in training.remedy(per_pixel, raw)
    assert "without --binarize" in training.remedy(per_pixel, binary)
    assert "--lr" in training.remedy(per_pixel, dequantized)
    assert "--lr" in training.remedy(learned, raw)
    for cfg in (raw, dequantized, binary):
        assert "new run" in training.remedy(per_pixel, cfg)


def test_likelihoods_with_dequantize_name_every_run_dequantized(tmp_path):
    args = options.parse_args(["--likelihoods", "cb", "gaussian:optimal", "--dequantize"])
    every = command.experiment_runs(args, str(tmp_path))
    assert list(every) == ["cb, dequantized", "gaussian, sigma optimal, dequantized"]
    assert all(sub.dequantize for sub in every.values())
    assert all(sub.out.endswith("-dequantized") for sub in every.values())
