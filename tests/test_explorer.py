"""explorer.html, the page that decodes the 2-D latent plane live: one file that fetches nothing,
whose weights are the decoder's to the bit, and whose decoding in a real browser (headless Chromium,
benchmarks/explorer_browser.py) is NumPy's for every likelihood."""
import base64
import os
import pathlib
import sys

import numpy as np
import pytest

from lab import analysis
from lab import explorer
from lab import models
from lab.gmm import fit_gmm, gmm_log_density

from conftest import REPO, make_images, run_cli

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import explorer_browser  # noqa: E402  (a script of benchmarks/, imported for its browser driver)

CLASS_NAMES = [f"class {k}" for k in range(10)]


def found_for(model, n_test, seed=0):
    """What analysis.analyze finds that the page shows, for a model and n_test generated test
    images: (found, hole threshold, x_test (n_test, 784) uint8, y_test)."""
    rng = np.random.default_rng(seed)
    images, y_test = make_images(n_test, rng)
    x_test = images.reshape(n_test, 784)
    mu_test = rng.standard_normal((n_test, 2)) * [1.5, 0.8] + [0.5, 0.0]
    z_prior = model.sample_z(10000, rng)
    gmm = fit_gmm(mu_test, 3, rng=rng)
    _, threshold, _ = analysis.prior_hole_fraction(gmm, mu_test, z_prior)
    found = {"mu_test": mu_test, "z_prior": z_prior, "gmm": gmm}
    return found, threshold, x_test, y_test


def page_arrays(path):
    """The arrays a written page holds, {block id: raw bytes}, read back from its text."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    blocks = {}
    for part in page.split('<script type="text/plain" id="')[1:]:
        name, rest = part.split('">', 1)
        text = rest.split("</script>", 1)[0]
        blocks[name] = base64.b64decode("".join(text.split()), validate=True)
    return blocks


@pytest.fixture(scope="module")
def recipe_page(tmp_path_factory):
    """The page of the recipe's model with Z = 2 (400 hidden units), 1000 test images."""
    model = models.build(latent=2, hidden=400, seed=0)
    found, threshold, x_test, y_test = found_for(model, 1000)
    out = tmp_path_factory.mktemp("recipe")
    path = explorer.write_explorer(str(out), model, found, threshold, x_test, y_test,
                                   CLASS_NAMES)
    return {"path": path, "model": model, "found": found, "x_test": x_test, "y_test": y_test}


def test_the_page_is_one_file_that_fetches_nothing_and_under_3_mb_for_400_hidden_units(
        recipe_page):
    size = os.path.getsize(recipe_page["path"])
    assert size < 3_000_000, f"explorer.html is {size:,} bytes for 400 hidden units"
    with open(recipe_page["path"], encoding="utf-8") as f:
        page = f.read().lower()
    for needle in ("http://", "https://", "<script src", " src=", "<link", "url(", "@import",
                   "fetch(", "xmlhttprequest", "import("):
        assert needle not in page, f"explorer.html has {needle!r}"


def test_the_embedded_weights_and_test_images_are_the_models_to_the_bit(recipe_page):
    blocks = page_arrays(recipe_page["path"])
    for name, W in explorer.decoder_weights(recipe_page["model"]).items():
        embedded = np.frombuffer(blocks[name], "<f4").reshape(W.shape)
        assert W.dtype == np.float32 and np.array_equal(embedded, W), name
    n = explorer.SHOWN
    codes = np.frombuffer(blocks["codes"], "<f4").reshape(n, 2)
    assert np.array_equal(codes, recipe_page["found"]["mu_test"][:n].astype(np.float32))
    assert np.array_equal(np.frombuffer(blocks["labels"], "u1"), recipe_page["y_test"][:n])
    images = np.frombuffer(blocks["images"], "u1").reshape(n, 784)
    assert np.array_equal(images, recipe_page["x_test"][:n])


def test_a_sigma_per_pixels_page_decodes_the_means_only_as_its_model_does(tmp_path):
    # Checked without a browser (the browser test is skipped where Chromium is missing): the
    # decoder the page holds, run in NumPy, gives the model's first D outputs, the means' logits,
    # and nothing of its D log sigmas.
    model = models.build(latent=2, hidden=16, seed=4, likelihood="gaussian",
                         decoder_sigma="per-pixel")
    found, threshold, x_test, y_test = found_for(model, 300)
    path = explorer.write_explorer(str(tmp_path), model, found, threshold, x_test, y_test,
                                   CLASS_NAMES)
    blocks = page_arrays(path)
    W1 = np.frombuffer(blocks["W1"], "<f4").reshape(2, 16)
    b1 = np.frombuffer(blocks["b1"], "<f4")
    W2 = np.frombuffer(blocks["W2"], "<f4").reshape(16, -1)
    b2 = np.frombuffer(blocks["b2"], "<f4")
    assert W2.shape == (16, 784) and b2.shape == (784,)
    z = np.random.default_rng(5).standard_normal((7, 2)).astype(np.float32)
    h = np.maximum(z @ W1 + b1, 0)
    logits = h @ W2 + b2
    np.testing.assert_allclose(logits, model.decode(z)[:, :784], rtol=1e-5, atol=1e-6)


def test_the_hole_grid_is_drawn_as_a_canvas_draws_the_plane_top_row_first():
    # One component at (2, 2): its cell (upper right on the plane: row near the top, column near
    # the right) is no hole, the mirror cell at (-2, -2) is.
    gmm = {"log_pi": np.zeros(1), "means": np.array([[2.0, 2.0]]), "covs": np.eye(2)[None] * 0.25}
    threshold = float(gmm_log_density(gmm, np.array([[3.0, 2.0]]))[0])   # two sd from the centre
    limit = 4.0
    n = 8                                   # cells of width 1: (2, 2) is the centre of no cell
    holes = explorer.hole_grid(gmm, threshold, limit, n)
    # the four cells around (2, 2): rows 1 and 2 from the top (z1 = 2.5, 1.5), columns 5 and 6
    # from the left (z0 = 1.5, 2.5)
    assert holes[1:3, 5:7].sum() == 0, holes
    assert holes[5:7, 1:3].sum() == 4, holes        # and around (-2, -2), holes
    assert holes.sum() == n * n - 4, holes   # the four cells around (2, 2) are within 2 sd


def test_the_prior_contours_of_n01_are_its_1_2_3_sigma_circles(recipe_page):
    model = recipe_page["model"]
    z_prior = recipe_page["found"]["z_prior"]           # 10,000 draws: the levels to about 2%
    contours = explorer.prior_contours(model, z_prior, limit=4.0)
    assert [c["radius"] for c in contours] == [1, 2, 3]
    for contour in contours:
        points = np.concatenate([np.reshape(line, (-1, 2)) for line in contour["lines"]])
        radii = np.linalg.norm(points, axis=1)
        r = contour["radius"]
        assert abs(radii.mean() - r) < 0.03 * r and radii.std() < 0.01 * r, (r, radii.mean())


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_a_learned_priors_page_has_its_contours(tmp_path, prior):
    model = models.build(prior, 5, hidden=16, latent=2, seed=2)
    found, threshold, x_test, y_test = found_for(model, 200)
    explorer.write_explorer(str(tmp_path), model, found, threshold, x_test, y_test, CLASS_NAMES)
    contours = explorer.prior_contours(model, found["z_prior"], limit=4.0)
    for contour in contours:
        assert contour["lines"], (prior, contour["radius"])
        points = np.concatenate([np.reshape(line, (-1, 2)) for line in contour["lines"]])
        # on the line, log p(z) is the level: the quantile of the draws' log p that the mass says
        level = np.quantile(model.log_prior(found["z_prior"]), 1 - contour["mass"])
        assert np.abs(model.log_prior(points) - level).max() < 0.05, prior
    assert (tmp_path / "explorer.html").stat().st_size > 0


@pytest.mark.usefixtures("no_figures")
def test_a_2d_run_and_its_analysis_write_the_explorer_and_other_runs_do_not(tmp_path, data_dir,
                                                                            finished_run):
    out = tmp_path / "run"
    flags = ["--hidden", "32", "--latent", "2", "--batch-size", "50", "--iw-samples", "2",
             "--gmm-components", "3"]
    assert run_cli("--data-dir", data_dir, *flags, "--epochs", "0", "--out", str(out)) == 0
    assert (out / "explorer.html").stat().st_size > 0
    os.remove(out / "explorer.html")
    assert run_cli("--data-dir", data_dir, "--analyze", str(out / "model.npz"),
                   "--iw-samples", "2") == 0
    assert (out / "explorer.html").stat().st_size > 0
    assert not (finished_run / "explorer.html").exists()      # Z = 4: no plane to explore


# ---- in a real browser ---------------------------------------------------------------------------

def small_model(likelihood, sigma):
    """A small Z = 2 decoder whose logits run from about -15 to 15 over the plane, some near 0:
    both of the continuous Bernoulli's branches (|l| < 0.2, the Taylor series, and beyond)."""
    model = models.build(likelihood=likelihood, decoder_sigma=sigma, hidden=32, latent=2, seed=4)
    model.decoder.layers[2].params["W"] *= np.float32(8)
    return model


@pytest.fixture(scope="module")
def small_pages(tmp_path_factory):
    """{likelihood: (model, the path of its page, the plane's limit, x_test)} for every likelihood
    the project has, and the Gaussian with a sigma per pixel (whose decoder's outputs hold log
    sigmas after the means' logits: the page keeps the means')."""
    cases = {likelihood: (likelihood, 0.1) for likelihood in models.LIKELIHOODS}
    cases["gaussian-per-pixel"] = ("gaussian", "per-pixel")
    pages = {}
    for name, (likelihood, sigma) in cases.items():
        model = small_model(likelihood, sigma)
        found, threshold, x_test, y_test = found_for(model, 300, seed=1)
        out = tmp_path_factory.mktemp(name)
        path = explorer.write_explorer(str(out), model, found, threshold, x_test, y_test,
                                       CLASS_NAMES)
        limit = explorer.plane_limit(found["mu_test"], found["z_prior"])
        pages[name] = (model, path, limit, x_test)
    return pages


def numpy_means(model, points):
    z = np.asarray(points, np.float32)
    return model.likelihood.mean(model.decode(z)).astype(np.float64)


@pytest.mark.skipif(explorer_browser.browser_missing() is not None,
                    reason=f"no browser: {explorer_browser.browser_missing()}")
def test_in_chromium_the_page_decodes_as_numpy_follows_the_pointer_and_fetches_nothing(
        small_pages):
    half_grey = 0.5 / 255 + 1e-9            # a canvas holds a value in [0, 1] to 1/255
    with explorer_browser.chromium() as (context, requests):
        for likelihood, (model, path, limit, x_test) in small_pages.items():
            page, errors = explorer_browser.load(context, path)
            # the four corners of the plane, its centre and 15 points inside, in float32
            corners = [[-limit, -limit], [-limit, limit], [limit, -limit], [limit, limit]]
            inside = np.random.default_rng(5).uniform(-limit, limit, (15, 2))
            points = np.concatenate([corners, [[0, 0]], inside]).astype(np.float32)
            got = explorer_browser.decode(page, points)
            want = numpy_means(model, points)
            worst = float(np.abs(got - want).max())
            assert worst < 1e-5, f"{likelihood}: the page's decoding is {worst:.2e} off NumPy's"
            logits = model.decode(points)
            both_branches = (np.abs(logits) < 0.2).any() and (np.abs(logits) > 10).any()
            assert both_branches, f"logits {logits.min():.1f} to {logits.max():.1f}"
            if likelihood == "bernoulli":
                # the large image follows the pointer, and is the decoding where it is
                z_a = explorer_browser.move_pointer(page, (-limit / 2, limit / 2))
                image_a = explorer_browser.shown_image(page)
                z_b = explorer_browser.move_pointer(page, (limit / 2, -limit / 3))
                image_b = explorer_browser.shown_image(page)
                assert np.abs(image_a - image_b).max() > 0.2, "the image did not change"
                for z, image in ((z_a, image_a), (z_b, image_b)):
                    expected = np.clip(numpy_means(model, [z])[0], 0, 1)
                    assert np.abs(image - expected).max() <= half_grey, z
                # a click on a code shows its test image; two clicks in path mode, the path
                code = explorer_browser.codes(page)[0]
                explorer_browser.click(page, code)
                test_image = explorer_browser.shown_image(page, "test-image")
                assert np.abs(test_image - x_test[0] / 255).max() <= half_grey
                page.check("#path-mode")
                explorer_browser.click(page, code)
                explorer_browser.click(page, (0, 0))
                assert "the straight path" in page.inner_text("#path-caption")
            assert errors == [], errors
    pages = [pathlib.Path(path).resolve().as_uri() for _, path, _, _ in small_pages.values()]
    assert set(pages) <= set(requests), (pages, requests)     # the record saw the pages
    beyond = [url for url in requests if not url.startswith("file://")]
    assert beyond == [], beyond
