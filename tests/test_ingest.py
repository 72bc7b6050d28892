"""Ingest: every source format round-trips pixel-exactly into the store; bad inputs raise UserError."""
import gzip
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms

from fixtures import (cifar_batch, class_folder_files, dumps, make_adm_npz, make_cifar_tar, make_edm_zip,
                      make_folder, os_metadata_files, png_bytes, raw_png, write_files, write_idx, write_tar_gz)
from pspc_index.cli import cli
from pspc_index.errors import UserError
from pspc_index.ingest import IDX_IMAGES, ingest, read_source
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
    return tmp / "imgs", *make_folder(tmp / "imgs", rng, shape=(1, 5, 7)), None


def folder_rgb_with_rgba(tmp, rng):
    return tmp / "imgs", *make_folder(tmp / "imgs", rng, shape=(3, 7, 5), rgba_at=2), None


def folder_flat(tmp, rng):
    images = rng.integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    write_files(tmp / "f", {f"{i}.png": png_bytes(image) for i, image in enumerate(images)})
    return tmp / "f", images, None, None


def adm_sample_batch(tmp, rng):
    images, labels = make_adm_npz(tmp / "samples_4x6x6x3.npz", rng, stats=False)
    return tmp / "samples_4x6x6x3.npz", images, labels, None


def adm_reference_batch_nchw(tmp, rng):
    images, _ = make_adm_npz(tmp / "ref.npz", rng, shape=(1, 5, 7), labels=False, nchw=True)
    return tmp / "ref.npz", images, None, None


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
               folder_flat, npy_nchw, npy_nhwc_explicit, npy_nhw, npz_with_labels, adm_sample_batch,
               adm_reference_batch_nchw, idx_gz, idx_raw_without_labels]


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
    assert source.classes[0] == "T-shirt/top" and len(source.classes) == 10


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
    return tmp / "d.npz", None, "`x` or `arr_0`"


def npz_float_labels(tmp):
    np.savez(tmp / "d.npz", images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(2, np.float64))
    return tmp / "d.npz", None, "labels must be integers"


def layout_for_a_folder(tmp):
    make_folder(tmp / "f", np.random.default_rng(0))
    return tmp / "f", "nchw", "--layout"


def unknown_format(tmp):
    (tmp / "notes.txt").write_text("hello")
    return tmp / "notes.txt", None, "unknown format"


# Decoding failures of every reader (corrupt, truncated, oversized, unsupported): one line naming the file.

def flip_byte(path, at):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def one_image_folder(tmp, raw, name="a.png"):
    write_files(tmp / "f", {"ok.png": png_bytes(np.zeros((3, 4, 6), np.uint8)), name: raw})
    return tmp / "f"


def garbage_png(tmp):
    return one_image_folder(tmp, b"not a png at all"), None, "a.png: unreadable image"


def truncated_png(tmp):
    raw = png_bytes(np.random.default_rng(0).integers(0, 256, (3, 4, 6), dtype=np.uint8))
    return one_image_folder(tmp, raw[:len(raw) // 2]), None, "a.png: unreadable image"


def png_with_bad_idat(tmp):
    raw = bytearray(png_bytes(np.random.default_rng(0).integers(0, 256, (3, 4, 6), dtype=np.uint8)))
    raw[raw.index(b"IDAT") + 6] ^= 0xFF
    return one_image_folder(tmp, bytes(raw)), None, "a.png: unreadable image"


def truncated_jpeg(tmp):
    raw = png_bytes(np.random.default_rng(0).integers(0, 256, (3, 4, 6), dtype=np.uint8), format="JPEG")
    return one_image_folder(tmp, raw[:len(raw) // 2], "a.jpg"), None, "a.jpg: unreadable image"


def float_tiff_named_png(tmp):
    f = io.BytesIO()
    Image.fromarray(np.zeros((4, 6), np.float32)).save(f, format="TIFF")
    return one_image_folder(tmp, f.getvalue()), None, "a.png: unsupported image mode F"


def dataset_json_not_utf8(tmp):
    write_files(tmp / "f", {"a.png": png_bytes(np.zeros((1, 4, 4), np.uint8)), "dataset.json": b"\xff\xfe{"})
    return tmp / "f", None, "dataset.json: not an EDM dataset.json"


def zip_member_bad_crc(tmp):
    write_files(tmp / "ds.zip", {"a.png": png_bytes(np.zeros((3, 4, 6), np.uint8))}, zipfile.ZIP_STORED)
    flip_byte(tmp / "ds.zip", 30 + len("a.png") + 40)  # local header, name, then a.png's bytes as written
    return tmp / "ds.zip", None, "ds.zip/a.png: unreadable image (BadZipFile"


def patched_zip(tmp, local_at, central_at, value):
    """A one-PNG zip with a 16-bit field of its local and central headers set to value."""
    write_files(tmp / "ds.zip", {"a.png": png_bytes(np.zeros((3, 4, 6), np.uint8))})
    raw = bytearray((tmp / "ds.zip").read_bytes())
    for magic, at in ((b"PK\x03\x04", local_at), (b"PK\x01\x02", central_at)):
        struct.pack_into("<H", raw, raw.index(magic) + at, value)
    (tmp / "ds.zip").write_bytes(bytes(raw))
    return tmp / "ds.zip"


def encrypted_zip(tmp):  # general-purpose flag bit 0: encrypted
    return patched_zip(tmp, 6, 8, 1), None, "encrypted"


def zip_unsupported_compression(tmp):  # method 9: Deflate64, which zipfile cannot decompress
    return patched_zip(tmp, 8, 10, 9), None, "not supported"


def truncated_zip(tmp):
    make_edm_zip(tmp / "ds.zip", np.random.default_rng(0))
    (tmp / "ds.zip").write_bytes((tmp / "ds.zip").read_bytes()[:-30])
    return tmp / "ds.zip", None, "corrupt or unreadable zip archive"


def corrupt_gzip_data(tmp):
    write_idx(tmp / "train-images-idx3-ubyte.gz", np.arange(300, dtype=np.uint8).reshape(3, 10, 10), gz=True)
    flip_byte(tmp / "train-images-idx3-ubyte.gz", 30)
    return tmp / "train-images-idx3-ubyte.gz", None, "corrupt gzip data"


def idx_absurd_dims(tmp):
    raw = struct.pack(">IIII", IDX_IMAGES, 2**31, 2**31, 2**31) + bytes(10)
    (tmp / "train-images-idx3-ubyte").write_bytes(raw)
    return tmp / "train-images-idx3-ubyte", None, "truncated"


def tar_with_bad_header(tmp):
    make_cifar_tar(tmp / "c.tar.gz", np.random.default_rng(0))
    (tmp / "c.tar").write_bytes(gzip.decompress((tmp / "c.tar.gz").read_bytes()))
    flip_byte(tmp / "c.tar", 0)  # the first member's name: its header checksum no longer matches
    return tmp / "c.tar", None, "corrupt or unreadable tar archive"


def tar_gz_that_is_text(tmp):
    (tmp / "c.tar.gz").write_text("hello")
    return tmp / "c.tar.gz", None, "corrupt or unreadable tar archive"


def cifar_truncated_pickle(tmp):
    good = dumps(cifar_batch(np.zeros((1, 3, 32, 32), np.uint8), [0], 1), "py2")
    write_tar_gz(tmp / "c.tar.gz", {f"b/data_batch_{k}": good[:len(good) // 2] if k == 2 else good
                                    for k in range(1, 6)})
    return tmp / "c.tar.gz", None, "data_batch_2: unreadable pickle"


def truncated_npy(tmp):
    np.save(tmp / "x.npy", np.zeros((4, 3, 8, 8), np.uint8))
    (tmp / "x.npy").write_bytes((tmp / "x.npy").read_bytes()[:-100])
    return tmp / "x.npy", None, "unreadable NumPy file"


def npy_bad_header(tmp):
    np.save(tmp / "x.npy", np.zeros((4, 3, 8, 8), np.uint8))
    raw = (tmp / "x.npy").read_bytes()
    (tmp / "x.npy").write_bytes(raw.replace(b"'shape': (", b"'shape': [", 1))
    return tmp / "x.npy", None, "unreadable NumPy file"


def npy_absurd_shape(tmp):  # 2**51 bytes: more than any address space, so never allocated
    with open(tmp / "x.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (2**25, 1, 2**13, 2**13)})
        f.write(bytes(64))
    return tmp / "x.npy", None, "unreadable NumPy file"


def npy_that_is_text(tmp):
    (tmp / "x.npy").write_text("1,2,3")
    return tmp / "x.npy", None, "unreadable NumPy file"


def npz_pickled_images(tmp):
    np.savez(tmp / "d.npz", images=np.array([{"a": 1}], dtype=object))
    return tmp / "d.npz", None, "unreadable NumPy file"


def npz_corrupt_member(tmp):
    np.savez_compressed(tmp / "d.npz", images=np.arange(4 * 64, dtype=np.uint8).reshape(4, 1, 8, 8))
    flip_byte(tmp / "d.npz", 80)
    return tmp / "d.npz", None, "unreadable NumPy file"


def truncated_npz(tmp):
    np.savez(tmp / "d.npz", images=np.zeros((4, 1, 8, 8), np.uint8))
    (tmp / "d.npz").write_bytes((tmp / "d.npz").read_bytes()[:100])
    return tmp / "d.npz", None, "unreadable NumPy file"


BAD_INPUTS = [missing, corrupt_zip, truncated_idx, truncated_idx_gz, idx_labels_as_images, corrupt_tar_gz,
              tar_without_batches, empty_folder, mixed_sizes, mixed_gray_and_colour, float_npy, pickled_npy,
              ambiguous_layout, npz_without_images_key, npz_float_labels, layout_for_a_folder, unknown_format,
              garbage_png, truncated_png, png_with_bad_idat, truncated_jpeg, float_tiff_named_png,
              dataset_json_not_utf8, zip_member_bad_crc, encrypted_zip, zip_unsupported_compression, truncated_zip,
              corrupt_gzip_data, idx_absurd_dims, tar_with_bad_header, tar_gz_that_is_text, cifar_truncated_pickle,
              truncated_npy, npy_bad_header, npy_absurd_shape, npy_that_is_text, npz_pickled_images,
              npz_corrupt_member, truncated_npz]


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


def cli_ingest(src, out, *args):
    """`pspc-index ingest SRC OUT` in-process: (exit code, stdout, stderr)."""
    res = CliRunner().invoke(cli, ["ingest", str(src), str(out), *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def assert_one_line_error(code, stderr, *phrases):
    """Exit 2 with one line on stderr holding every phrase, and no traceback."""
    assert code == 2 and len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("pspc-index: error: ") and all(p in stderr for p in phrases), stderr


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.__name__)
def test_bad_input_cli(case, tmp_path):
    src, layout, phrase = case(tmp_path)
    code, _, stderr = cli_ingest(src, tmp_path / "out.zarr", *(["--layout", layout] if layout else []))
    assert_one_line_error(code, stderr, str(src), phrase)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("limit", [20, 10], ids=["over-limit-warning", "over-twice-limit-error"])
def test_oversized_image_is_one_line(limit, tmp_path, monkeypatch):
    """More pixels than PIL.Image.MAX_IMAGE_PIXELS is refused (Pillow only warns below twice the limit)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    write_files(tmp_path / "f", {"big.png": png_bytes(np.zeros((1, 5, 7), np.uint8))})  # 35 pixels
    code, _, stderr = cli_ingest(tmp_path / "f", tmp_path / "out.zarr")
    assert_one_line_error(code, stderr, "big.png", "DecompressionBomb")


def test_decoding_error_through_the_real_entry_point(tmp_path):
    """The installed entry point too: exit 2, one line, no traceback."""
    write_files(tmp_path / "f", {"a.png": b"\x89PNG\r\n\x1a\n broken"})
    res = subprocess.run([sys.executable, "-m", "pspc_index.cli", "ingest", str(tmp_path / "f"),
                          str(tmp_path / "out.zarr")], capture_output=True, text=True, timeout=120)
    assert_one_line_error(res.returncode, res.stderr, "a.png: unreadable image")


# --- Operating-system and tool metadata: skipped and counted; real errors still stop the ingest -----

@pytest.mark.parametrize("container", ["folder", "zip"])
def test_os_metadata_is_skipped_and_counted(container, tmp_path):
    files, images, labels, classes = class_folder_files(np.random.default_rng(0), {"dog": 2, "cat": 3})
    junk = os_metadata_files(list(files))
    dest = tmp_path / ("ds.zip" if container == "zip" else "ds")
    write_files(dest, {**junk, **files})  # metadata first: the order inside a zip must not matter
    source = read_source(str(dest))
    np.testing.assert_array_equal(source.images, images)
    np.testing.assert_array_equal(source.labels, labels)
    assert source.classes == classes and source.skipped == len(junk)
    assert [n for n in source.notes if f"skipped {len(junk)} operating-system" in n]

    code, _, stderr = cli_ingest(dest, tmp_path / "out.zarr")
    assert code == 0 and stderr.count(f"skipped {len(junk)} ") == 1, stderr


def test_macos_edm_zip_keeps_its_dataset_json_labels(tmp_path):
    """The field report: an EDM zip compressed on macOS was refused with 'no label for __MACOSX/...'."""
    images, labels = make_edm_zip(tmp_path / "ds.zip", np.random.default_rng(0))
    with zipfile.ZipFile(tmp_path / "ds.zip", "a") as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
        for name, raw in os_metadata_files(names).items():
            zf.writestr(name, raw)
    source = read_source(str(tmp_path / "ds.zip"))
    np.testing.assert_array_equal(source.images, images)
    np.testing.assert_array_equal(source.labels, labels)
    assert source.skipped == len(os_metadata_files(names))


def test_cifar_tar_skips_hidden_and_resource_fork_members(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = make_cifar_tar(tmp_path / "c.tar.gz", rng)
    with tarfile.open(tmp_path / "c.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    junk = {"cifar-10-batches-py/._data_batch_1": b"\x00\x05\x16\x07", ".old/data_batch_1": b"garbage",
            "__MACOSX/cifar-10-batches-py/._data_batch_2": b"\x00\x05\x16\x07"}
    write_tar_gz(tmp_path / "c.tar.gz", {f"./{name}": raw for name, raw in {**junk, **members}.items()})
    source = read_source(str(tmp_path / "c.tar.gz"))
    np.testing.assert_array_equal(source.images, images)
    assert source.skipped == 3 and source.classes == ["airplane", "automobile"]


def test_real_decoding_errors_still_stop_the_ingest(tmp_path):
    files, _, _, _ = class_folder_files(np.random.default_rng(0), {"a": 2, "b": 2})
    write_files(tmp_path / "f", {**os_metadata_files(list(files)), **files, "b/img1.png": b"damaged"})
    code, _, stderr = cli_ingest(tmp_path / "f", tmp_path / "out.zarr")
    assert_one_line_error(code, stderr, "b/img1.png: unreadable image")


# --- Class sub-folders (torchvision ImageFolder, EDM without dataset.json) and ADM batches -------------

@pytest.mark.parametrize("wrapper", ["", "train/"], ids=["top", "inside-one-folder"])
@pytest.mark.parametrize("container", ["folder", "zip"])
def test_class_subfolders_become_labels(container, wrapper, tmp_path):
    counts = {"zebra": 1, "ant": 2, "Dog": 2, "cat": 1}  # sorted as both tools sort: Dog, ant, cat, zebra
    files, images, labels, classes = class_folder_files(np.random.default_rng(1), counts, wrapper=wrapper)
    dest = tmp_path / ("ds.zip" if container == "zip" else "ds")
    write_files(dest, files)
    source = read_source(str(dest))
    assert classes == ["Dog", "ant", "cat", "zebra"] and source.classes == classes
    np.testing.assert_array_equal(source.images, images)
    np.testing.assert_array_equal(source.labels, labels)
    store = ingest(str(dest), str(tmp_path / "s.zarr"))
    assert ImageStore.open(store.path).meta["classes"] == classes


def test_images_beside_class_folders_give_no_labels_and_a_note(tmp_path):
    files, _, _, _ = class_folder_files(np.random.default_rng(0), {"a": 1, "b": 1})
    write_files(tmp_path / "f", {**files, "loose.png": png_bytes(np.zeros((3, 4, 6), np.uint8))})
    source = read_source(str(tmp_path / "f"))
    assert source.labels is None and source.classes is None
    assert [n for n in source.notes if "no class labels" in n and "loose.png" in n]


def test_info_and_attribute_show_class_names(tmp_path):
    files, _, labels, classes = class_folder_files(np.random.default_rng(0), {"cat": 3, "dog": 3},
                                                   shape=(1, 6, 6))
    write_files(tmp_path / "f", files)
    assert cli_ingest(tmp_path / "f", tmp_path / "s.zarr")[0] == 0
    res = CliRunner().invoke(cli, ["info", str(tmp_path / "s.zarr"), "--json"])
    assert json.loads(res.stdout)["class_names"] == ["cat", "dog"]
    query = ImageStore.open(tmp_path / "s.zarr").images[4:5]
    np.save(tmp_path / "q.npy", query)
    args = ["attribute", "--store", str(tmp_path / "s.zarr"), "--image", str(tmp_path / "q.npy"), "--t", "0.05",
            "--top", "2", "--patch-size", "3"]
    top = json.loads(CliRunner().invoke(cli, args + ["--json"]).stdout)["queries"][0][0]
    assert top["index"] == 4 and top["label"] == labels[4] == 1 and top["class"] == "dog"
    assert "[label 1 dog]" in CliRunner().invoke(cli, args).stdout


def test_adm_reference_batch_notes_the_ignored_statistics(tmp_path):
    images, labels = make_adm_npz(tmp_path / "ref.npz", np.random.default_rng(0))
    source = read_source(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(source.images, images)
    np.testing.assert_array_equal(source.labels, labels)
    assert len(source.notes) == 1 and "ignored arrays mu, sigma" in source.notes[0]


@pytest.mark.parametrize("arr_1", [np.zeros(4, np.float32), np.zeros(3, np.int64), np.zeros((4, 2), np.int64)],
                         ids=["float", "wrong-length", "2-d"])
def test_adm_arr_1_that_is_not_labels_is_ignored(arr_1, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images, arr_1)
    source = read_source(str(tmp_path / "s.npz"))
    assert source.labels is None and "ignored arrays arr_1" in source.notes[0]


# --- What an image file says about its pixels: applied, or refused with one line ----------------------

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (3, 3, 5), dtype=np.uint8)   # [C, H, W], non-square: orientation swaps H and W
GRAY = RNG.integers(0, 256, (1, 3, 5), dtype=np.uint8)
ORIENTED = {1: lambda a: a, 2: lambda a: a[:, :, ::-1], 3: lambda a: a[:, ::-1, ::-1], 4: lambda a: a[:, ::-1],
            5: lambda a: a.transpose(0, 2, 1), 6: lambda a: np.rot90(a, -1, (1, 2)),
            7: lambda a: np.rot90(a, -1, (1, 2))[:, ::-1], 8: lambda a: np.rot90(a, 1, (1, 2))}


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def png_chunks(**chunks: bytes):
    """PngInfo adding raw chunks, e.g. gAMA=..., cHRM=..., sRGB=..."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for kind, data in chunks.items():
        info.add(kind.encode(), data)
    return info


def with_alpha(image: np.ndarray, alpha: np.ndarray, mode: str) -> bytes:
    """[C, H, W] plus alpha [H, W] as an RGBA or LA PNG."""
    f = io.BytesIO()
    Image.fromarray(np.dstack([*image, alpha]), mode).save(f, format="PNG")
    return f.getvalue()


def reread(raw: bytes, mode: str) -> np.ndarray:
    """What Pillow gives for raw converted to mode, as [C, H, W]."""
    a = np.asarray(Image.open(io.BytesIO(raw)).convert(mode))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def palette_png(transparent_index=None) -> bytes:
    f = io.BytesIO()
    im = Image.fromarray(RGB.transpose(1, 2, 0)).quantize(8)
    im.save(f, format="PNG", **({} if transparent_index is None else {"transparency": transparent_index}))
    return f.getvalue()


def applied_cases():
    """(id, file bytes, name, expected uint8 [C, H, W])."""
    opaque = np.full(RGB.shape[1:], 255, np.uint8)
    cmyk = png_bytes(RGB, "CMYK", format="JPEG", quality=95)
    unused = int(np.setdiff1d(np.arange(256), GRAY)[0])
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cases = [(f"exif-orientation-{k}", png_bytes(RGB, exif=exif(k)), "a.png", op(RGB).copy())
             for k, op in ORIENTED.items()]
    cases += [
        ("rgba-opaque", with_alpha(RGB, opaque, "RGBA"), "a.png", RGB),
        ("la-opaque", with_alpha(GRAY, opaque, "LA"), "a.png", GRAY),
        ("gray-colour-key-unused", png_bytes(GRAY, transparency=unused), "a.png", GRAY),
        ("palette", palette_png(), "a.png", reread(palette_png(), "RGB")),
        ("palette-transparency-unused", palette_png(200), "a.png", reread(palette_png(), "RGB")),
        ("1-bit", png_bytes(GRAY, "1"), "a.png", reread(png_bytes(GRAY, "1"), "L")),
        ("gray-16-bit", raw_png(GRAY[0].astype(np.uint16) * 257 + 3), "a.png", GRAY),
        ("rgb-16-bit", raw_png(RGB.transpose(1, 2, 0).astype(np.uint16) * 257 + 3), "a.png", RGB),
        ("cmyk-jpeg", cmyk, "a.jpg", reread(cmyk, "RGB")),
        ("srgb-icc-profile", png_bytes(RGB, icc_profile=srgb), "a.png", RGB),
        ("srgb-gamma", png_bytes(RGB, pnginfo=png_chunks(gAMA=struct.pack(">I", 45455))), "a.png", RGB),
        ("srgb-chunk-overrides-gamma",
         png_bytes(RGB, pnginfo=png_chunks(sRGB=b"\0", gAMA=struct.pack(">I", 100000))), "a.png", RGB),
    ]
    return cases


@pytest.mark.parametrize("case", applied_cases(), ids=lambda case: case[0])
def test_image_metadata_applied(case, tmp_path):
    _, raw, name, expected = case
    write_files(tmp_path / "f", {name: raw})
    np.testing.assert_array_equal(read_source(str(tmp_path / "f")).images[0], expected)


def test_exif_orientation_of_a_jpeg_is_applied(tmp_path):
    write_files(tmp_path / "f", {"a.jpg": png_bytes(RGB, format="JPEG", exif=exif(6))})
    assert read_source(str(tmp_path / "f")).images.shape == (1, 3, 5, 3)  # H and W swapped


def refused_cases():
    """(id, file bytes, phrase the one-line refusal holds)."""
    alpha = np.full(RGB.shape[1:], 255, np.uint8)
    clear, translucent = alpha.copy(), alpha.copy()
    clear[0, 0], translucent[1, 2] = 0, 128
    used = int(GRAY[0, 0, 0])
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    wide = struct.pack(">8I", 31270, 32900, 73470, 26530, 0, 100000, 14400, 9700)  # white, then ACES primaries
    return [
        ("rgba-one-transparent-pixel", with_alpha(RGB, clear, "RGBA"), "1 of 15 pixels are transparent"),
        ("la-translucent", with_alpha(GRAY, translucent, "LA"), "1 of 15 pixels are transparent"),
        ("palette-transparent-index", palette_png(int(np.asarray(Image.open(io.BytesIO(palette_png())))[0, 0])),
         "pixels are transparent"),
        ("gray-colour-key", png_bytes(GRAY, transparency=used), "pixels are transparent"),
        ("rgb-colour-key", png_bytes(RGB, transparency=tuple(int(v) for v in RGB[:, 0, 0])), "pixels are transparent"),
        ("non-srgb-icc-profile", png_bytes(RGB, icc_profile=lab), "is not sRGB"),
        ("linear-gamma", png_bytes(RGB, pnginfo=png_chunks(gAMA=struct.pack(">I", 100000))), "gamma 1.0"),
        ("wide-gamut-chromaticities", png_bytes(RGB, pnginfo=png_chunks(cHRM=wide)), "chromaticities"),
    ]


@pytest.mark.parametrize("case", refused_cases(), ids=lambda case: case[0])
def test_image_metadata_refused(case, tmp_path):
    _, raw, phrase = case
    write_files(tmp_path / "f", {"ok.png": png_bytes(RGB), "x/a.png": raw})  # the refusal comes first
    code, _, stderr = cli_ingest(tmp_path / "f", tmp_path / "out.zarr")
    assert_one_line_error(code, stderr, "x/a.png: ", phrase)
