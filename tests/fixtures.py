"""Small generated data sets in the on-disk formats that `pspc_index.ingest` reads.

Each maker writes its files and returns the uint8 images [N, C, H, W] (and labels) it encoded, so a
reader's output can be compared pixel for pixel.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


class Py2Pickler(pickle._Pickler):
    """Pickles the way Python 2 with numpy 1.x wrote the real CIFAR-10 batches (protocol 2).

    str and bytes become BINSTRING (Python 2 `str`, read back as bytes with encoding="bytes") and
    numpy globals are named under `numpy.core`, as numpy 1.x named them.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw if len(raw) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dumps(obj, protocol) -> bytes:
    """Pickle obj: protocol "py2" as Python 2 / numpy 1.x did, or an int protocol of this Python."""
    if protocol != "py2":
        return pickle.dumps(obj, protocol=protocol)
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    """A .tar.gz holding the given files, in the given order."""
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def cifar_batch(images: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """One batch dict as in cifar-10-python.tar.gz: each data row is the R, G, B planes, row-major."""
    rows = np.stack([np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()]) for img in images])
    return {b"batch_label": f"training batch {k} of 5".encode(), b"labels": [int(v) for v in labels],
            b"data": rows, b"filenames": [f"img_{k}_{i}.png".encode() for i in range(len(images))]}


def make_cifar_tar(path: Path, rng, protocol="py2", sizes=(2, 3, 1, 2, 2)):
    """A CIFAR-10 python archive with five small training batches, stored out of order beside
    test_batch and batches.meta (which the reader must skip)."""
    images = rng.integers(0, 256, (sum(sizes), 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, sum(sizes))
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    members = {f"data_batch_{k}": dumps(cifar_batch(images[part], labels[part], k), protocol)
               for k, part in enumerate(parts, 1)}
    members["test_batch"] = dumps(cifar_batch(images[:1], labels[:1], 0), protocol)
    members["batches.meta"] = dumps({b"label_names": [b"airplane", b"automobile"]}, protocol)
    order = ["data_batch_4", "test_batch", "data_batch_1", "batches.meta", "data_batch_3", "data_batch_5",
             "data_batch_2"]
    write_tar_gz(path, {f"cifar-10-batches-py/{name}": members[name] for name in order})
    return images, labels


def png_bytes(image: np.ndarray, mode: str | None = None, format: str = "PNG", **save) -> bytes:
    """One image [C, H, W] as PNG bytes (grayscale for C = 1), optionally converted to `mode`; `save`:
    Pillow's save options (exif=, icc_profile=, transparency=, pnginfo=, quality=)."""
    im = Image.fromarray(image[0] if len(image) == 1 else image.transpose(1, 2, 0))
    f = io.BytesIO()
    (im.convert(mode) if mode else im).save(f, format=format, **save)
    return f.getvalue()


def make_edm_zip(path: Path, rng, n=5, shape=(3, 5, 7), labels=True):
    """An EDM dataset_tool style zip: subfolders of PNGs (stored out of order) and dataset.json."""
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    label_values = rng.integers(0, 10, n)
    names = [f"{i // 3:05d}/img{i:08d}.png" for i in range(n)]
    table = [[name, int(v)] for name, v in zip(names, label_values)] if labels else None
    with zipfile.ZipFile(path, "w") as zf:
        for name, image in reversed(list(zip(names, images))):
            zf.writestr(name, png_bytes(image))
        zf.writestr("dataset.json", json.dumps({"labels": table}))
    return images, (label_values if labels else None)


def make_folder(path: Path, rng, n=5, shape=(1, 5, 7), rgba_at=None):
    """A folder of PNGs in two class sub-folders a/ and b/ plus a stray text file; images in sorted-path
    order, labels 0 (a) and 1 (b) as torchvision's ImageFolder numbers them.

    rgba_at: index of an image saved as RGBA (fully opaque), which must read back as its RGB.
    """
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    names = sorted(f"{'ab'[i % 2]}/img{i}.png" for i in range(n))
    for i, (name, image) in enumerate(zip(names, images)):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(png_bytes(image, "RGBA" if i == rgba_at else None))
    (path / "notes.txt").write_text("not an image")
    return images, np.array([name.startswith("b/") for name in names], np.int64)


def write_files(dest: Path, files: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> None:
    """{relative '/' path: bytes} as a folder, or as a zip (in the given order) if dest ends in .zip."""
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w", method) as zf:
            for name, raw in files.items():
                zf.writestr(name, raw)
        return
    for name, raw in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(raw)


def class_folder_files(rng, counts: dict[str, int], shape=(3, 4, 6), wrapper=""):
    """torchvision ImageFolder layout: [wrapper/]class/img<i>.png for counts {class: n}.

    Returns (files, images, labels, classes): files in reverse path order (a reader must sort), images in
    sorted-path order, labels indexing the sorted class names.
    """
    classes = sorted(counts)
    names = sorted(f"{wrapper}{c}/img{i}.png" for c, k in counts.items() for i in range(k))
    images = rng.integers(0, 256, (len(names), *shape), dtype=np.uint8)
    labels = np.array([classes.index(name[len(wrapper):].split("/")[0]) for name in names], np.int64)
    files = {name: png_bytes(image) for name, image in zip(names, images)}
    return dict(reversed(files.items())), images, labels, classes


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)  # a `._name` resource fork


def os_metadata_files(image_names: list[str]) -> dict[str, bytes]:
    """What macOS, Windows, NAS boxes and tools leave beside the given images: resource forks beside
    them and under __MACOSX/, .DS_Store, Thumbs.db, desktop.ini, Synology @eaDir thumbnails, a hidden
    folder of (valid, but other-sized) PNGs, a hidden file."""
    odd_png = png_bytes(np.zeros((3, 2, 2), np.uint8))
    files = {}
    for name in image_names:
        folder, _, base = name.rpartition("/")
        prefix = f"{folder}/" if folder else ""
        files[f"{prefix}._{base}"] = APPLE_DOUBLE
        files[f"__MACOSX/{prefix}._{base}"] = APPLE_DOUBLE
    files.update({".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(32), "Thumbs.db": b"\xd0\xcf\x11\xe0" + bytes(60),
                  "desktop.ini": b"[.ShellClassInfo]\r\n", "@eaDir/x.png/SYNOPHOTO_THUMB_S.jpg": b"\xff\xd8\xff",
                  ".thumbnails/x.png": odd_png, ".hidden.png": odd_png})
    return files


def raw_png(array: np.ndarray, depth: int = 16) -> bytes:
    """A PNG written by hand (Pillow writes no 16-bit colour): array [H, W] gray or [H, W, 3] RGB."""
    h, w = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\0" + array[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def make_adm_npz(path: Path, rng, n=4, shape=(3, 6, 6), labels=True, stats=True, nchw=False):
    """A guided-diffusion / ADM sample or reference batch: np.savez with positional names, arr_0 uint8
    images (NHWC as ADM writes them, or NCHW), arr_1 int labels; reference batches add float mu, sigma."""
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    label_values = rng.integers(0, 1000, n)
    arrays = [images if nchw else images.transpose(0, 2, 3, 1)] + ([label_values] if labels else [])
    extra = {"mu": rng.normal(size=8), "sigma": np.eye(8)} if stats else {}
    np.savez(path, *arrays, **extra)
    return images, (label_values if labels else None)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An IDX file (MNIST format): magic 0x0000080<ndim>, big-endian int32 dims, the bytes."""
    raw = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
