"""swapjax.data: TFDS through mock_data (no network), IDX files written here, the real Fashion-MNIST.

The real-data test skips when Debian's dataset-fashion-mnist is not installed, unless
SWAPJAX_REQUIRE_REAL_DATA=1 (set by .ci/run as root, where it installs the package): then it fails.
"""
from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from swapjax import data

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of hanging on TFDS's retries."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def spy_data_source(monkeypatch):
    """Record the keyword arguments of every tfds.data_source call."""
    calls = []
    original = tfds.data_source

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    return calls


@pytest.fixture
def no_prepare(monkeypatch):
    """Fail if TFDS tries to download or prepare anything."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("download_and_prepare called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


# ----------------------------------------------------------------------------- TFDS (mocked)

EXPECTED = {  # name: (image shape, num_classes)
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "imagenet2012": ((24, 24, 3), 1000),  # loaded with image_size=24
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tfds_shapes_dtypes_range(name, spy_data_source):
    shape, num_classes = EXPECTED[name]
    size = 24 if name == "imagenet2012" else None
    with tfds.testing.mock_data(num_examples=7):
        ds = data.load(name, "train", source="tfds", image_size=size)
    assert ds.source == "tfds" and ds.name == name and ds.split == "train"
    assert ds.x.shape == (7, *shape) and ds.x.dtype == np.float32
    assert ds.y.shape == (7,) and ds.y.dtype == np.int32
    assert ds.num_classes == num_classes and ds.num_examples == 7
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.5  # /255, not raw bytes
    assert 0 <= ds.y.min() and ds.y.max() < num_classes
    assert spy_data_source == [dict(split="train", data_dir=None, download=False,
                                    builder_kwargs={"file_format": "array_record"})]


def test_tfds_values_are_pixels_over_255():
    with tfds.testing.mock_data(num_examples=3):
        raw = tfds.data_source("cifar10", split="test", download=False)
        expected = np.stack([raw[i]["image"] for i in range(3)]).astype(np.float32) / 255
        labels = [int(raw[i]["label"]) for i in range(3)]
        ds = data.load("cifar10", "test", source="tfds")
        flat = data.load("cifar10", "test", source="tfds", flatten=True)
    np.testing.assert_array_equal(ds.x, expected)
    assert ds.y.tolist() == labels
    assert flat.x.shape == (3, 32 * 32 * 3)
    np.testing.assert_array_equal(flat.x, ds.x.reshape(3, -1))


def test_tfds_examples_and_download_flag(spy_data_source, tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        full = data.load("mnist", "train", source="tfds", data_dir=tmp_path)
        first = data.load("mnist", "train", source="tfds", data_dir=tmp_path, examples=4)
        part = data.load("mnist", "train", source="tfds", data_dir=tmp_path, examples=slice(2, 9, 3),
                         download=True)
        none = data.load("mnist", "train", source="tfds", data_dir=tmp_path, examples=0, flatten=True)
    np.testing.assert_array_equal(first.x, full.x[:4])
    np.testing.assert_array_equal(part.y, full.y[2:9:3])
    assert none.x.shape == (0, 784) and none.y.shape == (0,)
    assert [c["download"] for c in spy_data_source] == [False, False, True, False]
    assert all(c["data_dir"] == str(tmp_path) for c in spy_data_source)


def test_auto_uses_tfds_for_datasets_without_idx(spy_data_source):
    with tfds.testing.mock_data(num_examples=2):
        ds = data.load("cifar10", "train")  # source="auto"
    assert ds.source == "tfds" and spy_data_source[0]["download"] is False


def test_varying_image_sizes_need_image_size():
    with tfds.testing.mock_data(num_examples=6):  # mock imagenet2012 images have random sizes
        with pytest.raises(ValueError, match="image_size"):
            data.load("imagenet2012", "validation", source="tfds")


# ------------------------------------------------------------------------- missing datasets


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_tfds_dataset_error(name, tmp_path, no_prepare):
    with pytest.raises(FileNotFoundError) as err:
        data.load(name, "test", source="tfds", data_dir=tmp_path)
    msg = str(err.value)
    assert repr(name) in msg and str(tmp_path) in msg
    assert "download=True" in msg and "array_record" in msg and "tensorflow" in msg
    assert not (tmp_path / "downloads").exists()


def test_missing_imagenet_names_the_manual_files(tmp_path, no_prepare):
    with pytest.raises(FileNotFoundError, match=r"(?s)'imagenet2012'.*ILSVRC2012_img_val\.tar.*manual"):
        data.load("imagenet2012", "validation", data_dir=tmp_path, image_size=32)


def test_missing_fashion_mnist_auto_names_both_fixes(tmp_path, no_prepare):
    with pytest.raises(FileNotFoundError) as err:
        data.load("fashion_mnist", "train", data_dir=tmp_path)  # auto: no IDX files, no TFDS data
    msg = str(err.value)
    assert "'fashion_mnist'" in msg and str(tmp_path) in msg
    assert "download=True" in msg  # TFDS fix
    assert "apt-get install -y dataset-fashion-mnist" in msg and "train-images-idx3-ubyte" in msg


def test_missing_idx_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)t10k-images-idx3-ubyte.*" + str(tmp_path)):
        data.load("fashion_mnist", "test", source="idx", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        data.load("mnist", "train", source="idx")  # MNIST has no default IDX directory


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("svhn")
    with pytest.raises(ValueError, match="source"):
        data.load("mnist", source="web")
    with pytest.raises(ValueError, match="idx"):
        data.load("cifar10", source="idx")
    with pytest.raises(ValueError, match="download"):
        data.load("fashion_mnist", source="idx", download=True)


# --------------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx_dir(directory: Path, n_train=12, n_test=5, hw=(5, 4), compress=True, seed=0):
    """Four IDX files (labels 0..9) like Fashion-MNIST's, smaller images; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array, rank in (("images", images, 3), ("labels", labels, 1)):
            raw = idx_bytes(array)
            path = directory / f"{split}-{kind}-idx{rank}-ubyte"
            if compress:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
            else:
                path.write_bytes(raw)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_source(tmp_path, compress):
    arrays = write_idx_dir(tmp_path, compress=compress)
    ds = data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path)
    images, labels = arrays["train"]
    assert ds.source == "idx" and ds.num_classes == 10
    assert ds.x.shape == (12, 5, 4, 1) and ds.x.dtype == np.float32  # NHWC, like TFDS
    assert ds.y.dtype == np.int32
    np.testing.assert_array_equal(ds.x[..., 0], images.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y, labels)
    test = data.load("mnist", "test", source="idx", data_dir=tmp_path, flatten=True)
    assert test.x.shape == (5, 20)
    np.testing.assert_array_equal(test.x, arrays["t10k"][0].reshape(5, -1) / np.float32(255))


def test_idx_split_spec_and_examples(tmp_path):
    arrays = write_idx_dir(tmp_path)
    (tr_x, tr_y), (te_x, te_y) = arrays["train"], arrays["t10k"]
    ds = data.load("fashion_mnist", "train[:3]+test[-2:]", source="idx", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.y, np.concatenate([tr_y[:3], te_y[-2:]]))
    np.testing.assert_array_equal(ds.x[..., 0], np.concatenate([tr_x[:3], te_x[-2:]]) / np.float32(255))
    half = data.load("fashion_mnist", "train[50%:]", source="idx", data_dir=tmp_path)
    np.testing.assert_array_equal(half.y, tr_y[6:])
    sub = data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path, examples=slice(1, 10, 4))
    np.testing.assert_array_equal(sub.y, tr_y[1:10:4])
    assert data.load("fashion_mnist", "test", source="idx", data_dir=tmp_path, examples=3).num_examples == 3
    with pytest.raises(ValueError, match="validation"):
        data.load("fashion_mnist", "validation", source="idx", data_dir=tmp_path)


def test_idx_resize(tmp_path):
    write_idx_dir(tmp_path, hw=(28, 28))
    ds = data.load("mnist", "train", source="idx", data_dir=tmp_path, image_size=16)
    assert ds.x.shape == (12, 16, 16, 1) and 0 <= ds.x.min() and ds.x.max() <= 1


def test_auto_prefers_idx_files(tmp_path, spy_data_source):
    arrays = write_idx_dir(tmp_path)
    ds = data.load("fashion_mnist", "test", data_dir=tmp_path)
    assert ds.source == "idx" and spy_data_source == []  # TFDS never asked
    np.testing.assert_array_equal(ds.y, arrays["t10k"][1])


def test_read_idx_other_dtypes(tmp_path):
    for array in ((np.arange(24).reshape(2, 3, 4) - 7).astype(">i4"), np.linspace(-1, 1, 6).astype(">f4")):
        path = tmp_path / "a.idx"
        path.write_bytes(idx_bytes(array))
        out = data.read_idx(path)
        assert out.shape == array.shape and out.dtype.isnative
        np.testing.assert_array_equal(out, array)


def _corrupt(tmp_path, what):
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if what == "magic":
        raw = b"\x08\x03\x00\x00" + raw[4:]
    elif what == "dtype":
        raw = raw[:2] + b"\x42" + raw[3:]
    elif what == "truncated":
        raw = raw[:-7]
    elif what == "header":
        raw = raw[:9]
    elif what == "empty":
        raw = b""
    if what == "gzip":
        path.write_bytes(path.read_bytes()[:40])  # a cut-off gzip stream
    else:
        path.write_bytes(gzip.compress(raw))
    return path


@pytest.mark.parametrize("what", ["magic", "dtype", "truncated", "header", "empty", "gzip"])
def test_corrupt_idx_file(tmp_path, what):
    path = _corrupt(tmp_path, what)
    with pytest.raises(ValueError, match=str(path)):
        data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path)
    with pytest.raises(ValueError, match="IDX file"):
        data.read_idx(path)


def test_inconsistent_idx_files(tmp_path):
    write_idx_dir(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(11, np.uint8))))  # 12 images, 11 labels
    with pytest.raises(ValueError, match="12 images.*11 labels"):
        data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path)
    labels.write_bytes(gzip.compress(idx_bytes(np.full(12, 10, np.uint8))))  # label 10 of 10 classes
    with pytest.raises(ValueError, match="labels outside"):
        data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path)
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros((12, 1), np.uint8))))
    with pytest.raises(ValueError, match="rank-1"):
        data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path)


# ------------------------------------------------------------------------- real Fashion-MNIST


def _real_files_present() -> bool:
    return all((FASHION_DIR / f"{stem}.gz").is_file() for pair in data.IDX_FILES.values() for stem in pair)


@pytest.fixture(scope="module")
def fashion():
    if not _real_files_present():
        if os.environ.get("SWAPJAX_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"SWAPJAX_REQUIRE_REAL_DATA=1 but the Fashion-MNIST IDX files are missing "
                        f"from {FASHION_DIR} (did `apt-get install -y dataset-fashion-mnist` fail?)")
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FASHION_DIR} missing); "
                    f"`apt-get install -y dataset-fashion-mnist` as root to run this test")
    return data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test", flatten=True)


def test_real_fashion_mnist(fashion):
    train, test = fashion
    assert data.DEFAULT_IDX_DIRS["fashion_mnist"] == FASHION_DIR
    assert train.source == "idx" and test.source == "idx"  # auto: the Debian files, no TFDS
    assert train.x.shape == (60_000, 28, 28, 1) and train.x.dtype == np.float32
    assert test.x.shape == (10_000, 784) and test.y.shape == (10_000,)
    assert train.y.dtype == np.int32 and sorted(set(train.y.tolist())) == list(range(10))
    # Balanced classes: 6,000 per class in train, 1,000 in test.
    assert np.bincount(train.y, minlength=10).tolist() == [6_000] * 10
    assert np.bincount(test.y, minlength=10).tolist() == [1_000] * 10
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    # Published normalisation constants of the training set: mean 0.2860, std 0.3530.
    assert abs(float(train.x.mean(dtype=np.float64)) - 0.2860) < 5e-4
    assert abs(float(train.x.std(dtype=np.float64)) - 0.3530) < 5e-4
    # Every image has some ink and the background is black (not inverted, not transposed garbage).
    assert (train.x.reshape(60_000, -1).max(axis=1) > 0.5).all()
    assert float(train.x[:, 0, 0].mean()) < 0.01


# ---------------------------------------------------------------------------------- batches


def test_batches_shuffle_deterministic_and_complete():
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    y = np.arange(23, dtype=np.int32)
    key = jax.random.key(3)
    first = list(data.batches(x, y, 5, key))
    again = list(data.batches(x, y, 5, key))
    assert [len(b[1]) for b in first] == [5, 5, 5, 5, 3]
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa[:, 0], ya * 2)  # rows stay paired with their labels
    order = np.concatenate([b[1] for b in first])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    other = np.concatenate([b[1] for b in data.batches(x, y, 5, jax.random.key(4))])
    assert other.tolist() != order.tolist()
    dropped = list(data.batches(x, y, 5, key, drop_remainder=True))
    assert [len(b[1]) for b in dropped] == [5, 5, 5, 5]
    plain = np.concatenate([b[1] for b in data.batches(x, y, 10)])
    assert plain.tolist() == list(range(23))
    with pytest.raises(ValueError, match="length"):
        next(data.batches(x, y[:-1], 5))


def test_empty_selection_keeps_the_layout(tmp_path):
    write_idx_dir(tmp_path)
    ds = data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path, examples=0)
    assert ds.x.shape == (0, 5, 4, 1) and ds.y.shape == (0,)
    flat = data.load("fashion_mnist", "train", source="idx", data_dir=tmp_path, examples=0, flatten=True)
    assert flat.x.shape == (0, 20)
