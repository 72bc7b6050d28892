"""Ingest: every source format round-trips pixel-exactly into the store; bad inputs raise UserError."""
import io
import os
import pickle
import pickletools
import tarfile

import numpy as np
import pytest

from fixtures import (cifar_batch, dumps, make_cifar_tar, make_edm_zip, make_folder, png_bytes,
                      write_idx, write_tar_gz)
from pspc_index.errors import UserError
from pspc_index.ingest import ingest, read_source
from pspc_index.store import ImageStore, content_hash


# --- Round trips: each case writes a source and returns (src, images, labels, layout) -------------

def cifar_py2(tmp, rng):
    images, labels = make_cifar_tar(tmp / "cifar-10-python.tar.gz", rng, "py2")
    return tmp / "cifar-10-python.tar.gz", images, labels, None


def cifar_protocol5(tmp, rng):
    images, labels = make_cifar_tar(tmp / "cifar.tgz", rng, 5)
    return tmp / "cifar.tgz", images, labels, None


def edm_zip(tmp, rng):
    images, labels = make_edm_zip(tmp / "ds.zip", rng)
    return tmp / "ds.zip", images, labels, None


def edm_zip_null_labels(tmp, rng):
    images, labels = make_edm_zip(tmp / "ds.zip", rng, shape=(1, 5, 7), labels=False)
    return tmp / "ds.zip", images, labels, None


def folder_gray(tmp, rng):
    return tmp / "imgs", make_folder(tmp / "imgs", rng, shape=(1, 5, 7)), None, None


def folder_rgb_with_rgba(tmp, rng):
    return tmp / "imgs", make_folder(tmp / "imgs", rng, shape=(3, 7, 5), rgba_at=2), None, None


def npy_nchw(tmp, rng):
    images = rng.integers(0, 256, (4, 3, 5, 7), dtype=np.uint8)
    np.save(tmp / "x.npy", images)
    return tmp / "x.npy", images, None, None


def npy_nhwc_explicit(tmp, rng):
    images = rng.integers(0, 256, (4, 3, 5, 3), dtype=np.uint8)  # [N, 3, 5, 3]: ambiguous unless told
    np.save(tmp / "x.npy", images.transpose(0, 2, 3, 1))
    return tmp / "x.npy", images, None, "nhwc"


def npy_nhw(tmp, rng):
    images = rng.integers(0, 256, (4, 1, 5, 7), dtype=np.uint8)
    np.save(tmp / "x.npy", images[:, 0])
    return tmp / "x.npy", images, None, None


def npz_with_labels(tmp, rng):
    images = rng.integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    labels = rng.integers(0, 10, 4).astype(np.int32)
    np.savez(tmp / "d.npz", x=images.transpose(0, 2, 3, 1), y=labels)  # NHWC detected (6 is no channel count)
    return tmp / "d.npz", images, labels, None


def idx_gz(tmp, rng):
    images, labels = rng.integers(0, 256, (6, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 6)
    write_idx(tmp / "train-images-idx3-ubyte.gz", images[:, 0], gz=True)
    write_idx(tmp / "train-labels-idx1-ubyte.gz", labels, gz=True)
    return tmp / "train-images-idx3-ubyte.gz", images, labels, None


def idx_raw_without_labels(tmp, rng):
    images = rng.integers(0, 256, (3, 1, 5, 7), dtype=np.uint8)
    write_idx(tmp / "t10k-images-idx3-ubyte", images[:, 0], gz=False)
    return tmp / "t10k-images-idx3-ubyte", images, None, None


ROUND_TRIPS = [cifar_py2, cifar_protocol5, edm_zip, edm_zip_null_labels, folder_gray, folder_rgb_with_rgba,
               npy_nchw, npy_nhwc_explicit, npy_nhw, npz_with_labels, idx_gz, idx_raw_without_labels]


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=lambda case: case.__name__)
def test_round_trip(case, tmp_path):
    src, images, labels, layout = case(tmp_path, np.random.default_rng(0))
    source = read_source(str(src), layout)
    assert source.images.dtype == np.uint8 and source.images.flags.c_contiguous
    np.testing.assert_array_equal(source.images, images)
    if labels is None:
        assert source.labels is None
    else:
        assert source.labels.dtype == np.int64
        np.testing.assert_array_equal(source.labels, labels)

    store = ingest(str(src), str(tmp_path / "out.zarr"), layout)
    reopened = ImageStore.open(tmp_path / "out.zarr")
    np.testing.assert_array_equal(reopened.images, images)
    assert (reopened.labels is None) == (labels is None)
    if labels is not None:
        np.testing.assert_array_equal(reopened.labels, labels)
    assert reopened.meta["sha256"] == store.sha256 == content_hash(images)
    assert reopened.meta["source"] == source.description


def test_pixel_order(tmp_path):
    """One marked pixel [n, c, y, x] lands at the same index from each format's native layout."""
    n, c, y, x = 1, 2, 3, 4  # second image, blue, row 3, column 4
    images = np.zeros((2, 3, 32, 32), np.uint8)
    images[n, c, y, x] = 200
    write_tar_gz(tmp_path / "c.tar.gz", {f"b/data_batch_{k}": dumps(cifar_batch(images, [0, 1], k), "py2")
                                        for k in range(1, 6)})
    hwc = np.zeros((2, 32, 32, 3), np.uint8)
    hwc[n, y, x, c] = 200
    np.save(tmp_path / "a.npy", hwc)
    (tmp_path / "f").mkdir()
    for i in range(2):
        (tmp_path / "f" / f"{i}.png").write_bytes(png_bytes(images[i]))
    for src in ("c.tar.gz", "a.npy", "f"):
        got = read_source(str(tmp_path / src)).images
        assert got[n, c, y, x] == 200 and int(got.sum()) == 200 * (5 if src == "c.tar.gz" else 1), src


def test_bundled_fashion_mnist():
    source = read_source("fashion-mnist")
    assert source.images.shape == (60000, 1, 28, 28) and source.images.dtype == np.uint8
    assert source.labels.shape == (60000,) and set(np.unique(source.labels)) == set(range(10))
    assert source.images.max() == 255  # real pixels, not a header misread as zeros


# --- Bad inputs: each case returns (src, layout, a phrase the message must hold) ---------------------

def missing(tmp):
    return tmp / "nope.zip", None, "no such file"


def corrupt_zip(tmp):
    (tmp / "bad.zip").write_bytes(b"PK\x03\x04" + bytes(100))
    return tmp / "bad.zip", None, "zip"


def truncated_idx(tmp):
    write_idx(tmp / "train-images-idx3-ubyte", np.zeros((3, 5, 7), np.uint8), gz=False)
    (tmp / "train-images-idx3-ubyte").write_bytes((tmp / "train-images-idx3-ubyte").read_bytes()[:-10])
    return tmp / "train-images-idx3-ubyte", None, "truncated"


def truncated_idx_gz(tmp):
    write_idx(tmp / "train-images-idx3-ubyte.gz", np.ones((3, 5, 7), np.uint8), gz=True)
    (tmp / "train-images-idx3-ubyte.gz").write_bytes((tmp / "train-images-idx3-ubyte.gz").read_bytes()[:20])
    return tmp / "train-images-idx3-ubyte.gz", None, "gzip"


def idx_labels_as_images(tmp):
    write_idx(tmp / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    return tmp / "train-labels-idx1-ubyte", None, "not an IDX images file"


def corrupt_tar_gz(tmp):
    make_cifar_tar(tmp / "c.tar.gz", np.random.default_rng(0))
    raw = (tmp / "c.tar.gz").read_bytes()
    (tmp / "c.tar.gz").write_bytes(raw[:len(raw) // 2])
    return tmp / "c.tar.gz", None, "tar"


def tar_without_batches(tmp):
    write_tar_gz(tmp / "c.tar.gz", {"readme.txt": b"hello"})
    return tmp / "c.tar.gz", None, "data_batch_1"


def empty_folder(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", None, "no PNG or JPEG"


def mixed_sizes(tmp):
    (tmp / "f").mkdir()
    for name, (h, w) in {"a.png": (5, 7), "b.png": (5, 7), "c.png": (6, 7), "d.png": (4, 4)}.items():
        (tmp / "f" / name).write_bytes(png_bytes(np.zeros((1, h, w), np.uint8)))
    return tmp / "f", None, "c.png: size 7x6 differs from a.png (7x5)"


def mixed_gray_and_colour(tmp):
    (tmp / "f").mkdir()
    (tmp / "f" / "a.png").write_bytes(png_bytes(np.zeros((1, 5, 7), np.uint8)))
    (tmp / "f" / "b.png").write_bytes(png_bytes(np.zeros((3, 5, 7), np.uint8)))
    return tmp / "f", None, "a.png is grayscale, b.png is colour"


def float_npy(tmp):
    np.save(tmp / "x.npy", np.zeros((2, 3, 4, 4), np.float32))
    return tmp / "x.npy", None, "float32"


def pickled_npy(tmp):
    np.save(tmp / "x.npy", np.array([{"a": 1}], dtype=object))  # needs a pickle to load: refused
    return tmp / "x.npy", None, "unreadable NumPy file"


def ambiguous_layout(tmp):
    np.save(tmp / "x.npy", np.zeros((2, 3, 4, 3), np.uint8))
    return tmp / "x.npy", None, "--layout"


def npz_without_images_key(tmp):
    np.savez(tmp / "d.npz", a=np.zeros((2, 1, 4, 4), np.uint8), b=np.zeros(2, np.uint8))
    return tmp / "d.npz", None, "`images` or `x`"


def npz_float_labels(tmp):
    np.savez(tmp / "d.npz", images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(2, np.float64))
    return tmp / "d.npz", None, "labels must be integers"


def layout_for_a_folder(tmp):
    make_folder(tmp / "f", np.random.default_rng(0))
    return tmp / "f", "nchw", "--layout"


def unknown_format(tmp):
    (tmp / "notes.txt").write_text("hello")
    return tmp / "notes.txt", None, "unknown format"


BAD_INPUTS = [missing, corrupt_zip, truncated_idx, truncated_idx_gz, idx_labels_as_images, corrupt_tar_gz,
              tar_without_batches, empty_folder, mixed_sizes, mixed_gray_and_colour, float_npy, pickled_npy,
              ambiguous_layout, npz_without_images_key, npz_float_labels, layout_for_a_folder, unknown_format]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.__name__)
def test_bad_input(case, tmp_path):
    src, layout, phrase = case(tmp_path)
    with pytest.raises(UserError) as info:
        read_source(str(src), layout)
    message = str(info.value)
    assert str(src) in message and phrase in message and "\n" not in message, message
    with pytest.raises(UserError):
        ingest(str(src), str(tmp_path / "out.zarr"), layout)
    assert not (tmp_path / "out.zarr").exists()


class _Call:
    """Pickles as the call fn(*args): what a malicious batch file holds."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_pickle_with_foreign_global_is_refused_not_run(protocol, tmp_path):
    marker = tmp_path / "pwned"
    batch = {"data": _Call(os.system, f"touch {marker}"), "labels": [0]}
    raw = pickle.dumps(batch, protocol=protocol)
    ops = [op.name for op, _, _ in pickletools.genops(raw)]
    assert "REDUCE" in ops and ("GLOBAL" in ops or "STACK_GLOBAL" in ops)  # a live call, if unpickled naively
    good = dumps(cifar_batch(np.zeros((1, 3, 32, 32), np.uint8), [0], 1), "py2")
    write_tar_gz(tmp_path / "c.tar.gz", {f"b/data_batch_{k}": raw if k == 3 else good for k in range(1, 6)})
    with pytest.raises(UserError, match=r"data_batch_3: refusing to unpickle \w+\.system") as info:
        read_source(str(tmp_path / "c.tar.gz"))
    assert str(tmp_path / "c.tar.gz") in str(info.value)
    assert not marker.exists()


def test_cifar_fixture_is_python2_style(tmp_path):
    """The py2 fixture holds what the real files hold: numpy.core globals, no _codecs or unicode."""
    make_cifar_tar(tmp_path / "c.tar.gz", np.random.default_rng(0))
    with tarfile.open(tmp_path / "c.tar.gz") as tar:
        raw = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops(raw)}
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert not any(name in ("BINUNICODE", "SHORT_BINUNICODE") or "_codecs" in str(arg) for name, arg in ops)
    assert isinstance(pickle.load(io.BytesIO(raw), encoding="bytes")[b"data"], np.ndarray)
