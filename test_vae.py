"""The suite: every gradient against finite differences, the estimators against closed forms, the data and
the training CLI against generated files. Offline (loopback only), under 30 s on 2 cores."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import mnist
import train
import vae
from autograd import MLP, Adam, Linear, ReLU, grad_check

HERE = os.path.dirname(os.path.abspath(__file__))


def assert_grads_close(errors, tol):
    bad = {k: e for k, e in errors.items() if not e < tol}
    assert not bad, f"relative error above {tol}: " + ", ".join(f"{k}={e:.2e}" for k, e in bad.items())


# ---- gradients ---------------------------------------------------------------------------------------------

def test_linear_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    layer = Linear(5, 3, rng, dtype=np.float64)
    x, r = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    loss = lambda: float((layer.forward(x) * r).sum())   # L = sum(y * r), so dL/dy = r
    layer.forward(x)
    dx = layer.backward(r.copy())
    assert_grads_close(grad_check(loss, {**layer.params, "x": x}, {**layer.grads, "x": dx}), 1e-8)


def test_relu_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    x[np.abs(x) < 1e-3] = 0.5                           # keep away from the kink at 0
    r = rng.standard_normal((4, 6))
    relu = ReLU()
    loss = lambda: float((relu.forward(x.copy()) * r).sum())
    relu.forward(x.copy())
    dx = relu.backward(r.copy())
    assert_grads_close(grad_check(loss, {"x": x}, {"x": dx}), 1e-8)


def test_mlp_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    mlp = MLP([5, 7, 6, 3], rng, dtype=np.float64)
    x, r = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    loss = lambda: float((mlp.forward(x) * r).sum())
    mlp.forward(x)
    dx = mlp.backward(r.copy())
    assert_grads_close(grad_check(loss, {**mlp.named("params", "mlp"), "x": x},
                                  {**mlp.named("grads", "mlp"), "x": dx}), 1e-6)


def small_vae_batch(seed=3, n_in=12, hidden=7, latent=3, batch=5, prior="standard"):
    rng = np.random.default_rng(seed)
    model = vae.VAE(n_in, hidden, latent, seed=seed, dtype=np.float64, prior=prior, components=4)
    x = rng.uniform(0, 1, (batch, n_in))                # intensities in [0, 1], as the images are
    eps = rng.standard_normal((batch, latent))
    return model, x, eps


@pytest.mark.parametrize("prior, prior_params", [("standard", set()),
                                                  ("mog", {"prior.means", "prior.log_vars", "prior.logits"}),
                                                  ("vamp", {"prior.u"})])
def test_negative_elbo_backward_matches_finite_differences_for_every_parameter(prior, prior_params):
    model, x, eps = small_vae_batch(prior=prior)
    model.forward(x, eps)
    model.backward()
    analytic = {k: g.copy() for k, g in model.grads().items()}
    errors = grad_check(lambda: model.forward(x, eps)[0], model.params(), analytic)
    assert set(errors) == {"enc.0.W", "enc.0.b", "enc.2.W", "enc.2.b", "dec.0.W", "dec.0.b", "dec.2.W",
                           "dec.2.b"} | prior_params
    assert_grads_close(errors, 1e-6)


def test_loss_is_a_deterministic_function_of_params_x_and_eps():
    model, x, eps = small_vae_batch()
    assert model.forward(x, eps) == model.forward(x, eps)
    assert model.forward(x, eps)[0] != model.forward(x, eps + 0.1)[0]


def test_loss_parts_match_a_direct_computation():
    model, x, eps = small_vae_batch()
    loss, recon, kl = model.forward(x, eps)
    mu, log_var = model.encode(x)
    p = 1 / (1 + np.exp(-model.decode(mu + np.exp(0.5 * log_var) * eps)))
    direct_recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1).mean()
    direct_kl = 0.5 * (mu ** 2 + np.exp(log_var) - 1 - log_var).sum(1).mean()
    assert recon == pytest.approx(direct_recon, rel=1e-12) and kl == pytest.approx(direct_kl, rel=1e-12)
    assert loss == pytest.approx(recon + kl, rel=1e-15)


def test_reconstruction_loss_is_stable_for_huge_logits():
    model, x, eps = small_vae_batch()
    model.decoder.layers[-1].params["b"][:] = 1e4       # sigmoid saturates; naive log(sigmoid) gives -inf
    loss, recon, _ = model.forward(x, eps)
    assert np.isfinite(loss) and recon > 1e4


def test_kl_closed_form_matches_monte_carlo():
    rng = np.random.default_rng(4)
    mu, log_var = np.array([0.5, -1.0, 2.0]), np.array([0.3, -0.7, -2.0])
    sigma = np.exp(0.5 * log_var)
    model = vae.VAE(1, 1, 3, dtype=np.float64)          # use the model's own KL: a single example, no recon
    model.encode = lambda x: (mu[None], log_var[None])
    model.decode = lambda z: np.zeros((1, 1))
    _, _, kl = model.forward(np.zeros((1, 1)), np.zeros((1, 3)))
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], z ~ q, 10^6 draws.
    z = mu + sigma * rng.standard_normal((1_000_000, 3))
    log_q = (-0.5 * ((z - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(1)
    log_p = (-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)).sum(1)
    diff = log_q - log_p
    mc, se = diff.mean(), diff.std() / np.sqrt(len(diff))
    assert abs(kl - mc) < 4 * se, f"closed form {kl:.5f}, Monte Carlo {mc:.5f} +- {se:.5f}"


class FixedEncoder:
    """Stands in for the encoder: every row gets the same (mu, log_var); backward records what arrives."""
    def __init__(self, mu, log_var):
        self.h = np.concatenate([mu, log_var])

    def forward(self, x):
        return np.tile(self.h, (len(x), 1))

    def backward(self, dy, need_dx=True):
        self.dy = dy


class SquareDecoder:
    """Stands in for the decoder so that the reconstruction's gradient is that of f(z) = sum(z^2):
    backward hands back df/dz = 2z (per example, /B for the batch mean) instead of the decoder's."""
    def forward(self, z):
        self.z = z
        return np.zeros((len(z), 1))

    def backward(self, dlogits):
        return 2 * self.z / len(self.z)


def test_reparameterized_gradient_of_expectation_matches_analytic_value():
    # E_q[sum z^2] = sum(mu^2 + sigma^2), so d/dmu = 2 mu, d/dlog_var = sigma^2. The KL adds mu and
    # (sigma^2 - 1) / 2. vae.backward's own lines, averaged over many eps, must give these.
    rng = np.random.default_rng(5)
    mu, log_var = np.array([0.7, -1.2]), np.array([0.4, -0.9])
    sigma2 = np.exp(log_var)
    model = vae.VAE(1, 1, 2, dtype=np.float64)
    model.encoder, model.decoder = FixedEncoder(mu, log_var), SquareDecoder()
    n = 400_000
    model.forward(np.zeros((n, 1)), rng.standard_normal((n, 2)))
    model.backward()
    dmu, dlog_var = model.encoder.dy[:, :2].sum(0), model.encoder.dy[:, 2:].sum(0)  # sum of per-example / n
    np.testing.assert_allclose(dmu, 2 * mu + mu, atol=0.02)
    np.testing.assert_allclose(dlog_var, sigma2 + 0.5 * (sigma2 - 1), atol=0.02)


def test_a_training_step_stays_in_float32():
    rng = np.random.default_rng(12)
    model = vae.VAE(784, 16, 4, seed=0)                 # float32, as train.py builds it
    opt = Adam(model.params())
    x = rng.integers(0, 256, (8, 784)).astype(np.uint8) * np.float32(1 / 255)
    model.forward(x, rng.standard_normal((8, 4), dtype=np.float32))
    model.backward()
    opt.step(model.grads())
    arrays = {**{f"cache{i}": a for i, a in enumerate(model.cache)}, **model.params(), **model.grads(),
              **{f"m.{k}": a for k, a in opt.m.items()}, **{f"v.{k}": a for k, a in opt.v.items()}}
    assert {k: a.dtype for k, a in arrays.items() if a.dtype != np.float32} == {}


def test_adam_matches_a_step_computed_by_hand():
    p = np.array([1.0, -2.0, 3.0])
    g1, g2 = np.array([0.1, -0.5, 2.0]), np.array([0.3, 0.2, -1.0])
    opt = Adam({"p": p}, lr=0.01)
    opt.step({"p": g1}); opt.step({"p": g2})
    # Kingma & Ba, Algorithm 1, written out for t = 1, 2.
    b1, b2, eps, want = 0.9, 0.999, 1e-8, np.array([1.0, -2.0, 3.0])
    m = v = 0
    for t, g in ((1, g1), (2, g2)):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        want = want - 0.01 * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p, want, rtol=1e-12)


# ---- data --------------------------------------------------------------------------------------------------

def make_images(n, rng):
    """n 28x28 uint8 images from 10 blob templates plus noise, and their labels: learnable, like digits."""
    yy, xx = np.mgrid[0:28, 0:28]
    templates = np.stack([np.exp(-((yy - 7 - 14 * (k // 5)) ** 2 + (xx - 4 - 5 * (k % 5)) ** 2) / 18)
                          for k in range(10)])
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.clip(templates[labels] * 255 + rng.normal(0, 20, (n, 28, 28)), 0, 255).astype(np.uint8)
    return images, labels


def write_dataset(folder, n_train=600, n_test=200, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = [*make_images(n_train, rng), *make_images(n_test, rng)]
    for name, array in zip(mnist.FILES, arrays):
        mnist.write_idx(os.path.join(folder, name), array)
    return arrays


def test_idx_write_parse_round_trip(tmp_path):
    images, labels = make_images(7, np.random.default_rng(0))
    mnist.write_idx(tmp_path / "i.gz", images)
    mnist.write_idx(tmp_path / "l.gz", labels)
    np.testing.assert_array_equal(mnist.parse_idx(tmp_path / "i.gz", 2051), images)
    x, y = mnist.load_split(tmp_path / "i.gz", tmp_path / "l.gz")
    assert x.dtype == np.uint8 and x.shape == (7, 784)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a valid gzip archive"),       # truncated
    (lambda p: p.write_bytes(b"not an archive at all"), "IDX magic"),                  # not gzip, not IDX
    (lambda p: mnist.write_idx(p, np.zeros(5, np.uint8)), "IDX magic is 2049"),        # labels, not images
    (lambda p: mnist.write_idx(p, np.zeros((600, 27, 27), np.uint8)), "expected 28x28"),
    (lambda p: mnist.write_idx(p, np.zeros((599, 28, 28), np.uint8)), "labels for 599 images"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10])), "truncated"),
    (lambda p: p.write_bytes(gzip.compress(bytes.fromhex("00000803 ffffffff 0000001c 0000001c"))), "claims shape"),
    (lambda p: p.unlink(), "no local data|could not download"),
])
def test_bad_archives_give_one_line_errors(tmp_path, capsys, corrupt, message):
    write_dataset(tmp_path / "d")
    corrupt(tmp_path / "d" / "train-images-idx3-ubyte.gz")
    code = train.main(["--data-dir", str(tmp_path / "d"), "--mirror", "http://127.0.0.1:9/", "--out",
                       str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()                  # nothing written for a run that never started


def test_labels_outside_0_to_9_are_rejected(tmp_path):
    write_dataset(tmp_path)
    mnist.write_idx(tmp_path / mnist.FILES[3], np.full(200, 10, np.uint8))
    with pytest.raises(mnist.DataError, match="label 10 is outside 0-9"):
        mnist.load(data_dir=str(tmp_path))


@contextlib.contextmanager
def http_server(folder):
    """An HTTP server on 127.0.0.1 (a free port) serving `folder`, shut down on exit."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_accepts_good_checksum_and_rejects_bad_one_without_caching_it(tmp_path):
    arrays = write_dataset(tmp_path / "served")
    sums = {n: ("sha256", hashlib.sha256((tmp_path / "served" / n).read_bytes()).hexdigest()) for n in mnist.FILES}
    with http_server(tmp_path / "served") as url:
        x_train, y_train, x_test, y_test = mnist.load("mnist", str(tmp_path / "cache"), url, sums, log=lambda m: 0)
        np.testing.assert_array_equal(x_train, arrays[0].reshape(-1, 784))
        np.testing.assert_array_equal(y_test, arrays[3])
        assert sorted(os.listdir(tmp_path / "cache")) == sorted(mnist.FILES)

        bad = {**sums, mnist.FILES[2]: ("sha256", "0" * 64)}   # the third archive is not what was published
        with pytest.raises(mnist.DataError, match="expected 0000"):
            mnist.load("mnist", str(tmp_path / "cache2"), url, bad, log=lambda m: 0)
        assert sorted(os.listdir(tmp_path / "cache2")) == sorted(mnist.FILES[:2])  # no bad file, no .part


def test_no_network_and_no_data_names_the_urls_tried(tmp_path):
    with pytest.raises(mnist.DataError) as err:
        mnist.load("mnist", str(tmp_path / "cache"), "http://127.0.0.1:9/", log=lambda m: 0)
    assert "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in str(err.value) and "--mirror" in str(err.value)
    assert not (tmp_path / "cache").exists()               # no empty cache folder left behind


# ---- training, checkpoints, the CLI ------------------------------------------------------------------------

SMALL = ["--hidden", "32", "--latent", "4", "--batch-size", "50", "--iw-samples", "10"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_dataset(folder)
    return str(folder)


def run_cli(*args):
    return train.main(list(args))


def test_training_on_generated_data_lowers_the_loss_and_writes_every_output(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "4", "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["train_loss"]) == len(m["epoch_seconds"]) == 4
    assert m["train_loss"][-1] < 0.8 * m["train_loss"][0], m["train_loss"]
    assert m["test_loss"] == pytest.approx(m["test_recon"] + m["test_kl"])
    assert m["config"]["hidden"] == 32 and m["config"]["epochs"] == 4
    for f in ("model.npz", "checkpoint.npz", "reconstructions.png", "samples_prior.png", "loss_curves.png"):
        assert (out / f).stat().st_size > 0, f
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_same_seed_gives_the_same_numbers(tmp_path, data_dir):
    runs = []
    for name in ("a", "b"):
        assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "1", "--out", str(tmp_path / name)) == 0
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["test_loss"] == runs[1]["test_loss"]


def test_model_save_load_round_trip(tmp_path):
    model, x, eps = small_vae_batch()
    vae.save(model, str(tmp_path / "m.npz"))
    loaded, extra = vae.load(str(tmp_path / "m.npz"))
    assert loaded.arch == model.arch and extra == {}
    assert loaded.forward(x, eps) == model.forward(x, eps)


def test_ctrl_c_saves_a_checkpoint_and_resume_gives_the_uninterrupted_numbers(tmp_path, data_dir, monkeypatch):
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(tmp_path / "straight")) == 0

    def interrupt_at_step_7_of_epoch_2(state, n_steps, seen):
        if state["epoch"] == 1 and state["step"] == 7:
            signal.raise_signal(signal.SIGINT)              # a real Ctrl-C, through train.py's handler
    monkeypatch.setattr(train, "progress_bar", interrupt_at_step_7_of_epoch_2)
    out = tmp_path / "cut"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "2", "--out", str(out)) == 130
    assert (out / "checkpoint.npz").exists() and not (out / "model.npz").exists()
    monkeypatch.undo()
    assert run_cli("--data-dir", data_dir, "--epochs", "2", "--resume", str(out / "checkpoint.npz")) == 0

    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]
    pa, pb = vae.load(str(tmp_path / "straight" / "model.npz"))[0], vae.load(str(out / "model.npz"))[0]
    for k in pa.params():
        np.testing.assert_array_equal(pa.params()[k], pb.params()[k])


def test_resume_rejects_a_corrupt_file_and_another_architecture(tmp_path, data_dir, capsys):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    assert run_cli("--data-dir", data_dir, "--resume", str(tmp_path / "junk.npz")) == 1
    assert "not a readable model file" in capsys.readouterr().err

    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "1", "--out", str(tmp_path / "r")) == 0
    capsys.readouterr()
    assert run_cli("--data-dir", data_dir, "--latent", "8", "--resume", str(tmp_path / "r" / "checkpoint.npz")) == 1
    err = capsys.readouterr().err
    assert "another architecture" in err and "--latent 4" in err and err.count("\n") == 1

    vae.save(vae.VAE(784, 8, 2), str(tmp_path / "model_only.npz"))   # a model, but not a training checkpoint
    assert run_cli("--data-dir", data_dir, "--resume", str(tmp_path / "model_only.npz")) == 1
    assert "not a training checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--latent", "0"), ("--hidden", "-3"), ("--batch-size", "0"),
                                         ("--lr", "0"), ("--lr", "-1e-3"), ("--epochs", "-1")])
def test_non_positive_options_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err and "Traceback" not in err


def test_a_loss_that_turns_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_cli("--data-dir", data_dir, *SMALL, "--epochs", "1", "--out", str(out)) == 0
    good = (out / "checkpoint.npz").read_bytes()
    (out / "model.npz").unlink(); (out / "metrics.json").unlink()
    real_forward, calls = vae.VAE.forward, []
    def forward_that_fails_at_call_5(self, x, eps):
        calls.append(1)
        loss = real_forward(self, x, eps)
        return (float("nan"), *loss[1:]) if len(calls) == 5 else loss
    monkeypatch.setattr(vae.VAE, "forward", forward_that_fails_at_call_5)
    assert run_cli("--data-dir", data_dir, "--epochs", "2", "--resume", str(out / "checkpoint.npz")) == 1
    err = capsys.readouterr().err
    assert "became nan at epoch 2, step 5" in err and "last good checkpoint" in err and err.count("\n") == 1
    assert (out / "checkpoint.npz").read_bytes() == good
    assert not (out / "model.npz").exists() and not (out / "metrics.json").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, data_dir, capsys):
    assert run_cli("--data-dir", data_dir, *SMALL, "--lr", "1e6", "--epochs", "1", "--out", str(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "error: the loss became" in err and "no checkpoint was written" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_benchmark_prints_where_the_time_goes_and_writes_nothing(tmp_path, data_dir, capsys):
    assert run_cli("--data-dir", data_dir, *SMALL, "--benchmark", "--epochs", "2", "--out", str(tmp_path / "b")) == 0
    out = capsys.readouterr().out
    for line in ("epoch 2:", "median epoch", "per step (median of 12)", "matrix products alone", "epoch / floor",
                 "peak memory"):
        assert line in out, out
    assert not (tmp_path / "b").exists()


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--data-dir", str(tmp_path / "none"),
                             "--mirror", "http://127.0.0.1:9/"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in result.stderr


# ---- prior, posterior, aggregated posterior ----------------------------------------------------------------

@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_well_separated_clusters_and_its_likelihood_never_decreases(covariance):
    rng = np.random.default_rng(6)
    means, weights = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, -3.0]]), np.array([0.5, 0.3, 0.2])
    labels = rng.choice(3, 6000, p=weights)
    z = means[labels] + rng.standard_normal((6000, 2)) * np.array([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])[labels]
    gmm = vae.fit_gmm(z, 3, covariance, rng=np.random.default_rng(0))
    order = [int(np.argmin(((gmm["means"] - m) ** 2).sum(1))) for m in means]
    assert sorted(order) == [0, 1, 2], gmm["means"]
    np.testing.assert_allclose(gmm["means"][order], means, atol=0.1)
    np.testing.assert_allclose(np.exp(gmm["log_pi"][order]), weights, atol=0.02)
    ll = np.array(gmm["log_likelihood"])
    assert np.all(np.diff(ll) >= -1e-10), np.diff(ll).min()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_mixture_density_matches_a_direct_computation(covariance):
    rng = np.random.default_rng(7)
    gmm = vae.fit_gmm(rng.standard_normal((500, 3)) * [1, 2, 0.5], 4, covariance, iters=5)
    z = rng.standard_normal((20, 3))
    direct = np.zeros(20)
    for log_pi, m, cov in zip(gmm["log_pi"], gmm["means"], gmm["covs"]):
        cov = cov if cov.ndim == 2 else np.diag(cov)
        diff = z - m
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        direct += np.exp(log_pi) * np.exp(-0.5 * maha) / np.sqrt(np.linalg.det(2 * np.pi * cov))
    np.testing.assert_allclose(vae.gmm_log_density(gmm, z), np.log(direct), rtol=1e-10)


def test_mixture_samples_have_the_mixture_moments():
    gmm = {"log_pi": np.log([0.25, 0.75]), "means": np.array([[2.0, 0.0], [-1.0, 1.0]]),
           "covs": np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.2, 0.0], [0.0, 0.4]]])}
    z = vae.gmm_sample(gmm, 200_000, np.random.default_rng(8))
    mean = 0.25 * gmm["means"][0] + 0.75 * gmm["means"][1]
    second = sum(w * (c + np.outer(m, m)) for w, m, c in zip([0.25, 0.75], gmm["means"], gmm["covs"]))
    np.testing.assert_allclose(z.mean(0), mean, atol=0.01)
    np.testing.assert_allclose(np.cov(z.T), second - np.outer(mean, mean), atol=0.02)


def test_aggregate_posterior_moments_match_a_hand_computation():
    mu = np.array([[1.0, 0.0], [3.0, 0.0]])
    log_var = np.log(np.array([[1.0, 4.0], [3.0, 4.0]]))
    got = vae.aggregate_posterior_moments(mu, log_var)
    # dim 0: E[z] = 2, E[z^2] = mean(1 + 1, 9 + 3) = 7, Var = 7 - 4 = 3, Var(mu) = 1 (active)
    # dim 1: E[z] = 0, Var = 4, Var(mu) = 0 (inactive)
    np.testing.assert_allclose(got["mean"], [2.0, 0.0])
    np.testing.assert_allclose(got["variance"], [3.0, 4.0])
    assert got["active_units"] == 1 and got["activity"] == [1.0, 0.0]


def test_elbo_surgery_adds_up_and_is_zero_information_for_identical_posteriors():
    rng = np.random.default_rng(9)
    mu, log_var = rng.standard_normal((2000, 3)) * 1.5, rng.uniform(-3, 0, (2000, 3))
    s = vae.elbo_surgery(mu, log_var, np.random.default_rng(1))
    assert 0 < s["mutual_information"] <= np.log(2000) and s["kl_aggregate_prior"] > 0
    assert s["mutual_information_plus_kl_aggregate_prior"] == pytest.approx(s["average_kl"], abs=0.15)
    same = vae.elbo_surgery(np.tile([0.5, -1.0, 0.0], (300, 1)), np.tile([-1.0, 0.0, 0.5], (300, 1)),
                            np.random.default_rng(2))
    assert abs(same["mutual_information"]) < 1e-9       # every q(z|x) the same: z says nothing about x


def test_prior_hole_fraction_is_one_percent_when_codes_fill_the_prior_and_all_when_they_miss_it():
    rng = np.random.default_rng(10)
    z_prior = rng.standard_normal((20000, 2))
    covering = rng.standard_normal((20000, 2))
    gmm = vae.fit_gmm(covering, 3, "full", rng=rng)
    assert vae.prior_hole_fraction(gmm, covering, z_prior)[0] == pytest.approx(0.01, abs=0.004)
    far = rng.standard_normal((20000, 2)) * 0.3 + 5
    gmm = vae.fit_gmm(far, 3, "full", rng=rng)
    assert vae.prior_hole_fraction(gmm, far, z_prior)[0] > 0.99


def negative_elbo_single_sample(model, x, eps):
    """-ELBO per example with the KL also estimated at the one z: -log p(x|z) + log q(z|x) - log p(z).
    (model.forward uses the closed-form KL instead; both have the same expectation over eps.)"""
    _, recon, _ = model.forward(x, eps)
    mu, log_var = model.encode(x)
    z = mu + np.exp(0.5 * log_var) * eps
    log_q = (-0.5 * eps ** 2 - 0.5 * log_var - 0.5 * np.log(2 * np.pi)).sum(1)
    log_p = (-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)).sum(1)
    return recon + (log_q - log_p).mean()


def test_iw_nll_with_one_sample_is_the_negative_elbo_for_the_same_eps():
    model, x, eps = small_vae_batch()
    iw = vae.iw_nll(model, x, 1, rng=None, eps=eps[None])
    assert iw.mean() == pytest.approx(negative_elbo_single_sample(model, x, eps), rel=1e-12)


def test_iw_nll_never_exceeds_the_negative_elbo_and_falls_as_k_grows():
    model, x, _ = small_vae_batch(batch=40)
    eps = np.random.default_rng(11).standard_normal((1000, len(x), model.latent))
    elbo_k = np.array([negative_elbo_single_sample(model, x, eps[k]) for k in range(1000)])
    previous = np.inf
    for k in (1, 10, 100, 1000):
        iw = vae.iw_nll(model, x, k, rng=None, eps=eps[:k]).mean()
        assert iw <= elbo_k[:k].mean() + 1e-9, (k, iw, elbo_k[:k].mean())   # Jensen, for the same draws
        assert iw <= previous + 1e-9, (k, iw, previous)
        previous = iw
    assert iw < model.forward(x, eps[0])[0]             # and below the closed-form-KL estimate the training reports


def test_latent_2d_run_draws_the_latent_space_and_records_the_aggregate_measurements(tmp_path, data_dir):
    out = tmp_path / "z2"
    assert run_cli("--data-dir", data_dir, "--hidden", "32", "--latent", "2", "--batch-size", "50", "--epochs",
                   "2", "--iw-samples", "20", "--gmm-components", "3", "--out", str(out)) == 0
    for f in ("samples_three_ways.png", "prior_vs_aggregate.png", "latent_space.png", "latent_manifold.png"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    a = m["aggregate_posterior"]
    assert len(a["mean"]) == len(a["variance"]) == 2 and 0 <= a["active_units"] <= 2
    assert 0 <= a["prior_hole_fraction"] <= 1
    assert a["mutual_information_plus_kl_aggregate_prior"] == pytest.approx(a["average_kl"], abs=0.2)
    assert a["average_kl"] == pytest.approx(m["test_kl"], rel=1e-5)
    assert m["iw_nll"] < m["test_loss"] and m["iw_samples"] == 20

    before = (out / "latent_space.png").stat().st_mtime_ns
    os.remove(out / "samples_three_ways.png")
    assert run_cli("--data-dir", data_dir, "--analyze", str(out / "model.npz"), "--iw-samples", "5",
                   "--gmm-components", "2", "--gmm-covariance", "diag", "--posterior-image", "3") == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["train_loss"] == m["train_loss"] and m2["iw_samples"] == 5           # merged, not replaced
    assert m2["aggregate_posterior"]["gmm"]["covariance"] == "diag"
    assert (out / "samples_three_ways.png").exists() and (out / "latent_space.png").stat().st_mtime_ns >= before


def test_an_out_of_range_posterior_image_is_refused_before_training(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(train, "train_epoch", lambda *a: pytest.fail("trained before checking the options"))
    assert run_cli("--data-dir", data_dir, "--posterior-image", "200", "--out", str(tmp_path / "r")) == 1
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_analyze_refuses_an_out_of_range_posterior_image(tmp_path, data_dir, capsys):
    vae.save(vae.VAE(784, 8, 2), str(tmp_path / "model.npz"))
    assert run_cli("--data-dir", data_dir, "--analyze", str(tmp_path / "model.npz"), "--posterior-image",
                   "100000") == 1
    assert "out of range" in capsys.readouterr().err


# ---- learned priors ----------------------------------------------------------------------------------------

def direct_log_normal(z, mean, var):
    return (-0.5 * (z - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)).sum(-1)


def test_mog_prior_kl_is_log_q_minus_log_p_at_the_same_z():
    model, x, eps = small_vae_batch(prior="mog")
    p = model.prior_params
    p["logits"][:] = [0.5, -1.0, 0.0, 2.0]
    p["log_vars"][:] = np.random.default_rng(0).uniform(-1, 1, p["log_vars"].shape)
    _, _, kl = model.forward(x, eps)
    mu, log_var = model.encode(x)
    z = mu + np.exp(0.5 * log_var) * eps
    pi = np.exp(p["logits"]) / np.exp(p["logits"]).sum()
    density = sum(pi[k] * np.exp(direct_log_normal(z, p["means"][k], np.exp(p["log_vars"][k]))) for k in range(4))
    direct = (direct_log_normal(z, mu, np.exp(log_var)) - np.log(density)).mean()
    assert kl == pytest.approx(direct, rel=1e-10)


def test_vamp_prior_is_the_mean_of_the_pseudo_inputs_posteriors():
    model, _, _ = small_vae_batch(prior="vamp")
    z = np.random.default_rng(1).standard_normal((7, 3))
    mu_u, log_var_u = model.encode(model.prior_params["u"])
    direct = np.log(np.mean([np.exp(direct_log_normal(z, m, np.exp(lv))) for m, lv in zip(mu_u, log_var_u)], 0))
    np.testing.assert_allclose(model.log_prior(z), direct, rtol=1e-10)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_learned_prior_samples_have_the_mixture_mean_and_iw_nll_k1_is_its_elbo(prior):
    model, x, eps = small_vae_batch(prior=prior)
    means, log_vars, log_pi = model.prior_mixture()
    z = model.sample_z(200_000, np.random.default_rng(2))
    np.testing.assert_allclose(z.mean(0), np.exp(log_pi) @ means, atol=0.02)
    # The training loss already estimates the KL at the one z: iw_nll with K = 1 is exactly it.
    assert vae.iw_nll(model, x, 1, rng=None, eps=eps[None]).mean() == pytest.approx(model.forward(x, eps)[0],
                                                                                       rel=1e-12)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_learned_prior_model_save_load_round_trip(tmp_path, prior):
    model, x, eps = small_vae_batch(prior=prior)
    vae.save(model, str(tmp_path / "m.npz"))
    loaded, _ = vae.load(str(tmp_path / "m.npz"))
    assert loaded.arch == model.arch and loaded.arch["prior"] == prior and loaded.components == 4
    assert loaded.forward(x, eps) == model.forward(x, eps)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_learned_prior_trains_and_is_measured_against_itself(tmp_path, data_dir, prior, capsys):
    out = tmp_path / prior
    latent = ["--latent", "2"] if prior == "vamp" else []    # the 2-D figures, drawn for a learned prior too
    assert run_cli("--data-dir", data_dir, *SMALL, *latent, "--prior", prior, "--prior-components", "5",
                   "--epochs", "2", "--gmm-components", "3", "--out", str(out)) == 0
    assert (out / "latent_space.png").exists() == (prior == "vamp")
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["prior"] == prior and m["config"]["prior_components"] == 5
    assert m["train_loss"][-1] < m["train_loss"][0]
    a = m["aggregate_posterior"]
    # With a learned prior the average KL is estimated on the same draws, so the surgery adds up exactly.
    assert a["mutual_information_plus_kl_aggregate_prior"] == pytest.approx(a["average_kl"], rel=1e-9)
    assert 0 <= a["prior_hole_fraction"] <= 1 and np.isfinite(m["iw_nll"])
    capsys.readouterr()
    assert run_cli("--data-dir", data_dir, "--prior", "standard", "--resume", str(out / "checkpoint.npz")) == 1
    assert "another architecture" in capsys.readouterr().err
