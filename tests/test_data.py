"""The data: pixels scaled once, IDX files written and parsed, every kind of bad archive refused in
one line, and the download checksummed, against an HTTP server on the loopback interface."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import re
import threading
import zlib

import numpy as np
import pytest

import mnist

from conftest import make_images, quiet, run_cli, write_dataset


def test_pixels_are_scaled_once_with_one_rounding():
    pixels = np.arange(256, dtype=np.uint8)
    x = mnist.to_float(pixels)
    assert x.dtype == np.float32
    assert x[0] == 0 and x[255] == 1
    correctly_rounded = (pixels / 255.0).astype(np.float32)                  # x / 255, rounded once
    np.testing.assert_array_equal(x, correctly_rounded)


def test_idx_write_parse_round_trip(tmp_path):
    images, labels = make_images(7, np.random.default_rng(0))
    mnist.write_idx(tmp_path / "i.gz", images)
    mnist.write_idx(tmp_path / "l.gz", labels)
    np.testing.assert_array_equal(mnist.parse_idx(tmp_path / "i.gz", 2051), images)
    x, y = mnist.load_split(tmp_path / "i.gz", tmp_path / "l.gz")
    assert x.dtype == np.uint8 and x.shape == (7, 784)
    np.testing.assert_array_equal(y, labels)


# ---- bad archives --------------------------------------------------------------------------------

def truncate(p):
    p.write_bytes(p.read_bytes()[:100])


def corrupt_deflate_stream(p):
    """Flip a byte early in the compressed data: zlib itself fails ('invalid ...'), not gzip's
    checks."""
    data = bytearray(p.read_bytes())
    data[20] ^= 0xFF
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(data))
    p.write_bytes(bytes(data))


def replace_with_text(p):                               # neither gzip nor IDX
    p.write_bytes(b"not an archive at all")


def write_labels_instead(p):
    mnist.write_idx(p, np.zeros(5, np.uint8))


def write_27x27_images(p):
    mnist.write_idx(p, np.zeros((600, 27, 27), np.uint8))


def write_599_images(p):                                # the labels are for 600
    mnist.write_idx(p, np.zeros((599, 28, 28), np.uint8))


def drop_the_last_10_bytes(p):
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data[:-10]))


def add_3_bytes(p):
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data + b"\0" * 3))


def claim_a_huge_shape(p):                              # magic 2051, then N = 2^32 - 1, 28, 28
    p.write_bytes(gzip.compress(bytes.fromhex("00000803 ffffffff 0000001c 0000001c")))


def delete(p):
    p.unlink()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    write_dataset(folder)
    return folder


@pytest.mark.parametrize("corrupt, message", [
    (truncate, "not a valid gzip archive"),
    (corrupt_deflate_stream, "not a valid gzip archive"),                              # zlib.error
    (replace_with_text, "IDX magic"),
    (write_labels_instead, "IDX magic is 2049"),
    (write_27x27_images, "expected 28x28"),
    (write_599_images, "labels for 599 images"),
    (drop_the_last_10_bytes, "holds fewer bytes"),
    (add_3_bytes, "holds more bytes"),
    (claim_a_huge_shape, "claims shape"),
    (delete, "could not download"),
])
def test_bad_archives_give_one_line_errors(tmp_path, capsys, archives, corrupt, message):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in mnist.FILES.values():
        (folder / name).write_bytes((archives / name).read_bytes())
    corrupt(folder / "train-images-idx3-ubyte.gz")
    code = run_cli("--data-dir", str(folder), "--mirror", "http://127.0.0.1:9/",
                   "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err) and "train-images-idx3-ubyte.gz" in err, err
    assert not (tmp_path / "run").exists()              # nothing written for a run never started


def test_labels_outside_0_to_9_are_rejected(tmp_path):
    write_dataset(tmp_path, n_train=20, n_test=10)
    mnist.write_idx(tmp_path / mnist.FILES["test_labels"], np.full(10, 10, np.uint8))
    with pytest.raises(mnist.DataError, match="label 10 is outside 0-9"):
        mnist.load(data_dir=str(tmp_path))


# ---- the download --------------------------------------------------------------------------------

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


def sha256_checksum(path):
    """The checksum of a file as mnist.DATASETS writes one: (algorithm, hex digest)."""
    return ("sha256", hashlib.sha256(path.read_bytes()).hexdigest())


def test_download_accepts_good_checksum_and_rejects_bad_one_without_caching_it(tmp_path):
    served = tmp_path / "served"
    arrays = write_dataset(served, n_train=50, n_test=20)
    sums = {name: sha256_checksum(served / name) for name in mnist.FILES.values()}
    with http_server(served) as url:
        x_train, _, _, y_test = mnist.load("mnist", str(tmp_path / "cache"), url, sums, log=quiet)
        np.testing.assert_array_equal(x_train, arrays["train_images"].reshape(-1, 784))
        np.testing.assert_array_equal(y_test, arrays["test_labels"])
        assert sorted(os.listdir(tmp_path / "cache")) == sorted(mnist.FILES.values())

        third = mnist.FILES["test_images"]              # the third archive, not what was published
        bad = {**sums, third: ("sha256", "0" * 64)}
        with pytest.raises(mnist.DataError, match="expected 0000"):
            mnist.load("mnist", str(tmp_path / "cache2"), url, bad, log=quiet)
        first_two = [mnist.FILES["train_images"], mnist.FILES["train_labels"]]
        assert sorted(os.listdir(tmp_path / "cache2")) == sorted(first_two)  # no bad file, no .part


def test_no_network_and_no_data_names_the_urls_tried(tmp_path):
    with pytest.raises(mnist.DataError) as err:
        mnist.load("mnist", str(tmp_path / "cache"), "http://127.0.0.1:9/", log=quiet)
    assert "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in str(err.value)
    assert "--mirror" in str(err.value)
    assert not (tmp_path / "cache").exists()               # no empty cache folder left behind
