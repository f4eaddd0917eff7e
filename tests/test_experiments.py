"""The experiments: one run per KL weight, or per likelihood, and the table that compares them."""
import json
import os

import numpy as np
import pytest

from lab import report
from lab import runs

from conftest import SMALL, drawing_only, run_cli


@pytest.fixture(scope="module")
def kl_weight_experiment(tmp_path_factory, data_dir):
    """The KL-weight experiment with beta 0 and 2, Z = 2: two runs and their comparison."""
    out = tmp_path_factory.mktemp("runs") / "betas"
    drawn = ("kl_weight_samples.png", "kl_weight_latent.png", "samples_three_ways.png",
             "prior_vs_aggregate.png", "latent_space.png", "latent_manifold.png")
    with drawing_only(*drawn):
        assert run_cli("--data-dir", data_dir, "--hidden", "32", "--latent", "2",
                       "--batch-size", "50", "--epochs", "2", "--iw-samples", "5",
                       "--gmm-components", "3",
                       "--betas", "0", "2", "--out", str(out)) == 0
    return out


def test_the_kl_weight_experiment_trains_one_run_per_beta_and_compares_them(kl_weight_experiment):
    out = kl_weight_experiment
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["beta"] for r in rows] == [0, 2]
    folders = {0: "beta-0", 2: "beta-2"}
    for row in rows:
        m = json.loads((out / folders[row["beta"]] / "metrics.json").read_text())
        assert m["config"]["beta"] == row["beta"] and row["negative_elbo"] == m["test_loss"]
        assert row["prior_hole_fraction"] == m["aggregate_posterior"]["prior_hole_fraction"]
        samplers = m["samples"]["samplers"]
        assert row["frechet"] == [samplers["prior, mean"]["frechet"],
                                  samplers["fitted q(z), mean"]["frechet"]]
        assert row["class_tv_prior"] == samplers["prior, mean"]["class_tv"]
        assert row["unsure_prior"] == samplers["prior, mean"]["unsure"]
    by_beta = {row["beta"]: row for row in rows}
    # Without the KL term the posteriors drift from the prior.
    assert by_beta[0]["kl"] > by_beta[2]["kl"]
    for f in ("kl_weight_samples.png", "kl_weight_latent.png"):
        assert (out / f).stat().st_size > 0, f


def test_a_latent_2d_run_draws_the_plane_and_analyze_merges_new_measurements(kl_weight_experiment,
                                                                             data_dir):
    out = kl_weight_experiment / "beta-2"
    for f in ("samples_three_ways.png", "prior_vs_aggregate.png", "latent_space.png",
              "latent_manifold.png"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    os.remove(out / "samples_three_ways.png")
    with drawing_only("samples_three_ways.png"):
        assert run_cli("--data-dir", data_dir, "--analyze", str(out / "model.npz"),
                       "--iw-samples", "3", "--gmm-components", "2", "--gmm-covariance", "diag",
                       "--posterior-image", "3") == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["train_loss"] == m["train_loss"] and m2["iw_samples"] == 3   # merged, not replaced
    assert m2["aggregate_posterior"]["gmm"]["covariance"] == "diag"
    assert (out / "samples_three_ways.png").exists()


def test_the_comparison_table_shows_every_column_of_every_row():
    row = {"run": "beta = 0.3", "recon": 230.0, "kl": 9.5, "negative_elbo": 239.5, "iw_nll": 237.25,
           "bits_per_dim": None, "active_units": 12, "variance_range": [0.25, 1.5],
           "kl_aggregate_prior": 2.0, "mutual_information": 7.5, "prior_hole_fraction": 0.125,
           "decoder_sigma": {"sigma": 0.0812}, "pulls_on_mu": [5.7, 0.77],
           "path_holes": [0.25, 0.0625], "frechet": [12.34, 5.5], "class_tv_prior": 0.0625,
           "unsure_prior": 0.25}
    lines = report.comparison_table([row]).splitlines()
    assert lines[0].startswith("| run | recon | KL | test -ELBO | iw_nll | bits/dim |")
    assert len(lines) == 3
    assert lines[2] == ("| beta = 0.3 | 230.00 | 9.50 | 239.50 | 237.25 | - | 12 | 0.25-1.50 | "
                        "2.00 | 7.50 | 12.5% | 25.0% / 6.2% | 0.0812 | 5.7 / 0.77 | 12.3 / 5.5 | "
                        "0.062 | 25.0% |")


@pytest.fixture(scope="module")
def likelihood_experiment(tmp_path_factory, data_dir):
    """The likelihood experiment with a learned-sigma Gaussian and the continuous Bernoulli, one
    epoch each."""
    out = tmp_path_factory.mktemp("runs") / "likelihoods"
    with drawing_only("samples_mean_and_draw.png", "likelihood_samples.png"):
        assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "1",
                       "--likelihoods", "gaussian:learned", "cb", "--out", str(out)) == 0
    return out


def test_the_likelihood_experiment_trains_one_run_per_likelihood_and_compares_them(
        likelihood_experiment):
    out = likelihood_experiment
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["gaussian, sigma learned", "cb"]
    assert [r["likelihood"] for r in rows] == ["gaussian", "cb"]
    folders = {"gaussian, sigma learned": "gaussian-sigma-learned", "cb": "cb"}
    for row in rows:
        folder = out / folders[row["run"]]
        m = json.loads((folder / "metrics.json").read_text())
        assert row["negative_elbo"] == m["test_loss"] and 0 < row["bits_per_dim"] < 1e3, row
        assert (folder / "samples_mean_and_draw.png").stat().st_size > 0
    gaussian, _ = runs.load_model(str(out / "gaussian-sigma-learned" / "model.npz"))
    sigma = float(np.exp(gaussian.params()["likelihood.log_sigma"][0]))
    by_run = {row["run"]: row for row in rows}
    learned = by_run["gaussian, sigma learned"]
    assert learned["decoder_sigma"]["sigma"] == pytest.approx(sigma)
    assert sigma < 1                                    # learned: down from its start at 1
    assert by_run["cb"]["decoder_sigma"] is None
    assert all(len(r["pulls_on_mu"]) == 2 for r in rows)
    assert (out / "likelihood_samples.png").stat().st_size > 0
