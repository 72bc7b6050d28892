"""Readers that turn the data sets researchers have on disk into uint8 images [N, C, H, W].

One reader per format; `read_source` picks it from the path (folder, suffix, then first bytes).
Every bad input raises UserError naming the path.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .outputs import STORE, claim
from .store import ImageStore, write_store

BUNDLED_FASHION_MNIST = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = {"L", "LA", "1"}
COLOUR_MODES = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"}
GZIP_MAGIC = b"\x1f\x8b"
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # ubyte data, 3 dims / 1 dim
CIFAR_BATCH = re.compile(r"(?:^|/)data_batch_([1-5])$")


@dataclass
class Source:
    """Pixels and labels read from one source, and a line saying where they came from."""

    images: np.ndarray         # uint8 [N, C, H, W], C in {1, 3}
    labels: np.ndarray | None  # int64 [N] or None
    description: str


def read_source(src: str, layout: str | None = None) -> Source:
    """Read SRC (a path, or the word `fashion-mnist`) as uint8 [N, C, H, W] images and labels.

    `layout` ("nchw" / "nhwc") applies to .npy / .npz arrays only; None detects it.
    """
    if layout is not None and layout not in ("nchw", "nhwc"):
        raise UserError(f"--layout must be nchw or nhwc, got {layout!r}")
    bundled = str(src) == "fashion-mnist"
    where = BUNDLED_FASHION_MNIST if bundled else Path(src)
    if not where.exists():
        raise UserError(f"{where}: no such file or folder")
    try:
        kind = "fashion-mnist" if bundled else detect_format(where)
        if layout is not None and kind != "numpy":
            raise UserError(f"{where}: --layout applies to .npy / .npz arrays only")
        source = read_numpy(where, layout) if kind == "numpy" else READERS[kind](where)
    except OSError as e:  # permissions, I/O errors: the readers catch the format-specific ones
        raise UserError(f"{where}: cannot read ({e})") from None
    return _checked(source, where)


def ingest(src: str, out: str, layout: str | None = None, overwrite: bool = False) -> ImageStore:
    """Read SRC and write it as the image store OUT. OUT must not exist, or (with `overwrite`) be a store;
    anything else there is refused with a UserError before SRC is read, and never touched."""
    claim(out, STORE, overwrite=overwrite)
    source = read_source(src, layout)
    return write_store(out, source.images, source.labels, source=source.description, overwrite=overwrite)


def detect_format(path: Path) -> str:
    """Which reader handles path: by path type, then name, then the first bytes."""
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith((".npy", ".npz")):
        return "numpy"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "cifar"
    if name.endswith(".zip"):
        return "zip"
    if "idx" in name:  # MNIST naming: train-images-idx3-ubyte[.gz]
        return "idx"
    head = _head(path)
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if head.startswith(b"PK"):
        return "zip"
    if head[257:262] == b"ustar":
        return "cifar"
    if head[:3] == b"\0\0\x08":
        return "idx"
    raise UserError(f"{path}: unknown format (expected an image folder, EDM zip, CIFAR-10 python "
                    f"tar.gz, IDX file, .npy or .npz)")


def _head(path: Path) -> bytes:
    """The first bytes of path, decompressed if gzip (a .gz may hold a tar or an IDX file)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(path) as f:
                head = f.read(512)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt gzip data ({e})") from None
    return head


def _checked(source: Source, where: Path) -> Source:
    """Checks every reader's result gets: some images, integer labels one per image."""
    n = len(source.images)
    if n == 0:
        raise UserError(f"{where}: no images")
    if source.labels is not None:
        labels = np.asarray(source.labels)
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise UserError(f"{where}: labels must be integers, one per image; got {labels.dtype} "
                            f"{list(labels.shape)} for {n} images")
        source.labels = labels.astype(np.int64)
    return source


def _int_labels(where, values) -> np.ndarray:
    """Labels given as a list of Python ints (JSON, pickle) -> int64."""
    if not isinstance(values, list) or not all(isinstance(v, (int, np.integer)) for v in values):
        raise UserError(f"{where}: labels must be a list of integers")
    return np.array(values, np.int64)


# --- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------

def read_fashion_mnist(folder: Path = BUNDLED_FASHION_MNIST) -> Source:
    """The Fashion-MNIST training set bundled with the package (60,000 images with labels)."""
    source = read_idx(folder / "train-images-idx3-ubyte.gz")
    source.description = f"fashion-mnist (bundled Fashion-MNIST training set, {len(source.images)} images)"
    return source


def read_idx(path: Path) -> Source:
    """IDX images [N, H, W], with labels from the matching `labels-idx1` file beside it if present."""
    images = _idx_array(path, IDX_IMAGES)
    labels_path = _idx_labels_path(path)
    labels = None if labels_path is None else _idx_array(labels_path, IDX_LABELS)
    if labels is not None and len(labels) != len(images):
        raise UserError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {path.name}")
    with_labels = f", labels from {labels_path.name}" if labels_path else ""
    return Source(images[:, None], labels, f"{path.name} (IDX images{with_labels})")


def _idx_labels_path(path: Path) -> Path | None:
    """`...-images-idx3-ubyte[.gz]` -> the existing `...-labels-idx1-ubyte[.gz]`, else None."""
    name = re.sub(r"images([-.]idx)3", r"labels\g<1>1", path.name)
    if name == path.name:
        return None
    stem = name.removesuffix(".gz")
    return next((p for p in (path.with_name(name), path.with_name(stem), path.with_name(stem + ".gz"))
                 if p.is_file()), None)


def _idx_array(path: Path, magic: int) -> np.ndarray:
    """One IDX file (gzipped or not) as uint8, after checking magic, dims and byte count."""
    data = _read_maybe_gzip(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big")
    if len(data) < header or found != magic:
        what = "images" if magic == IDX_IMAGES else "labels"
        raise UserError(f"{path}: not an IDX {what} file (magic 0x{found:08x}, expected 0x{magic:08x})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    need = header + int(np.prod(dims))
    if len(data) != need:
        problem = "truncated" if len(data) < need else "trailing bytes"
        raise UserError(f"{path}: {problem}: dims {dims} need {need} bytes, the file has {len(data)}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of path, gunzipped if it starts with the gzip magic."""
    data = path.read_bytes()
    if data.startswith(GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt gzip data ({e})") from None
    return data


# --- CIFAR-10 python archive -------------------------------------------------------------------

_reconstruct = np.zeros(1).__reduce__()[0]     # numpy.core (1.x) / numpy._core (2.x): one function
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # used by pickle protocol 5
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x / Python 2 (the real files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays; any other global (os.system, ...) is refused unimported."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as CIFAR's own loader does
        self.where = where

    def find_class(self, module, name):
        try:
            return NUMPY_GLOBALS[module, name]
        except KeyError:
            raise UserError(f"{self.where}: refusing to unpickle {module}.{name} "
                            f"(only numpy arrays are allowed)") from None


def read_cifar_tar(path: Path) -> Source:
    """CIFAR-10 python archive: the training batches data_batch_1..5, in order."""
    batches = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass: seeking back in a .tar.gz decompresses again
                match = CIFAR_BATCH.search(member.name)
                if match and member.isfile():
                    raw = tar.extractfile(member).read()
                    batches[int(match[1])] = _cifar_batch(raw, f"{path}/{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or unreadable tar archive ({e})") from None
    missing = [f"data_batch_{k}" for k in range(1, 6) if k not in batches]
    if missing:
        raise UserError(f"{path}: not a CIFAR-10 python archive (no {', '.join(missing)})")
    images, labels = zip(*(batches[k] for k in range(1, 6)))
    return Source(np.concatenate(images), np.concatenate(labels),
                  f"{path.name} (CIFAR-10 python archive, data_batch_1..5)")


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch {b"data": uint8 [n, 3072], b"labels": [n]} -> images [n, 3, 32, 32], labels."""
    try:
        batch = NumpyOnlyUnpickler(io.BytesIO(raw), where).load()
    except UserError:
        raise
    except Exception as e:  # a damaged pickle raises many exception types
        raise UserError(f"{where}: unreadable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{where}: expected a dict, got {type(batch).__name__}")
    data, labels = (batch.get(key, batch.get(key.decode())) for key in (b"data", b"labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{where}: expected data uint8 [n, 3072], got {got}")
    labels = _int_labels(where, labels)
    if len(labels) != len(data):
        raise UserError(f"{where}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels  # each row: R, G, B planes, each row-major 32x32


# --- Images: EDM zip, folder -------------------------------------------------------------------

def read_edm_zip(path: Path) -> Source:
    """EDM dataset zip: PNG/JPEG images (sorted by path) with optional dataset.json labels."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
            labels = (_json_labels(path / "dataset.json", zf.read("dataset.json"), names)
                      if "dataset.json" in zf.namelist() else None)
            images = _stack_images(path, names, zf.open)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or unreadable zip archive ({e})") from None
    return Source(images, labels, f"{path.name} (EDM dataset zip)")


def read_folder(path: Path) -> Source:
    """A folder of PNG/JPEG images (recursive, sorted by relative path), optional dataset.json labels."""
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    json_path = path / "dataset.json"
    labels = _json_labels(json_path, json_path.read_bytes(), names) if json_path.is_file() else None
    images = _stack_images(path, names, lambda name: (path / name).open("rb"))
    return Source(images, labels, f"{path.name} (image folder)")


def _json_labels(where: Path, text: bytes, names: list[str]) -> np.ndarray | None:
    """Labels from EDM's dataset.json ({"labels": [[name, label], ...]} or null), in names' order."""
    try:
        table = json.loads(text)["labels"]
        table = None if table is None else dict(table)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: not an EDM dataset.json ({type(e).__name__}: {e})") from None
    if table is None:
        return None
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f"{where}: no label for {missing[0]}")
    return _int_labels(where, [table[n] for n in names])


def _stack_images(where: Path, names: list[str], open_file) -> np.ndarray:
    """Decode the named images (one size, all grayscale or all colour) into uint8 [N, C, H, W]."""
    if not names:
        raise UserError(f"{where}: no PNG or JPEG images found")
    first = None
    for i, name in enumerate(names):
        with open_file(name) as f:
            img = _decode(f, where / name)
        if first is None:
            first, out = img, np.empty((len(names), *img.shape), np.uint8)
        elif img.ndim != first.ndim:
            kinds = {2: "grayscale", 3: "colour"}
            raise UserError(f"{where}: mixes grayscale and colour images ({names[0]} is {kinds[first.ndim]}, "
                            f"{name} is {kinds[img.ndim]})")
        elif img.shape != first.shape:
            raise UserError(f"{where / name}: size {img.shape[1]}x{img.shape[0]} differs from "
                            f"{names[0]} ({first.shape[1]}x{first.shape[0]}); all images must have one size")
        out[i] = img
    return np.ascontiguousarray(out[:, None] if first.ndim == 2 else out.transpose(0, 3, 1, 2))


def _decode(f, where: Path) -> np.ndarray:
    """One image file -> uint8 [H, W] (grayscale) or [H, W, 3] (colour)."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            if im.mode not in GRAY_MODES | COLOUR_MODES:
                raise UserError(f"{where}: unsupported image mode {im.mode} "
                                f"(expected 8-bit grayscale or colour)")
            return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for damaged files
        raise UserError(f"{where}: unreadable image ({e})") from None


# --- NumPy arrays ------------------------------------------------------------------------------

def read_numpy(path: Path, layout: str | None) -> Source:
    """uint8 images in .npy, or .npz (the single array, or `images`/`x`; labels `labels`/`y`)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            images, labels = loaded, None
        else:
            with loaded:
                images, labels = _npz_arrays(path, loaded)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable NumPy file ({e})") from None
    images, layout = _to_nchw(path, images, layout)
    return Source(images, labels, f"{path.name} (NumPy array, {layout})")


def _npz_arrays(path: Path, npz) -> tuple[np.ndarray, np.ndarray | None]:
    """The images and (optional) labels arrays of an .npz file."""
    keys = npz.files
    image_key = keys[0] if len(keys) == 1 else next((k for k in ("images", "x") if k in keys), None)
    if image_key is None:
        raise UserError(f"{path}: holds arrays {keys}; name the images `images` or `x`")
    label_key = next((k for k in ("labels", "y") if k in keys and k != image_key), None)
    return npz[image_key], (npz[label_key] if label_key else None)


def _to_nchw(path: Path, images: np.ndarray, layout: str | None) -> tuple[np.ndarray, str]:
    """uint8 [N, H, W], NCHW or NHWC -> NCHW; layout None is detected where unambiguous."""
    if images.dtype != np.uint8:
        raise UserError(f"{path}: images must be uint8, got {images.dtype} (scale to 0..255 and cast)")
    if images.ndim == 3:
        return images[:, None], "grayscale [N, H, W]"
    if images.ndim != 4:
        raise UserError(f"{path}: expected images [N, C, H, W], [N, H, W, C] or [N, H, W], "
                        f"got shape {list(images.shape)}")
    if layout is None:
        c_first, c_last = images.shape[1] in (1, 3), images.shape[3] in (1, 3)
        if c_first == c_last:
            why = "axis 1 and axis 3 could both" if c_first else "neither axis 1 nor axis 3 can"
            raise UserError(f"{path}: shape {list(images.shape)}: {why} be channels (1 or 3); "
                            f"pass --layout nchw or --layout nhwc")
        layout = "nchw" if c_first else "nhwc"
    if layout == "nhwc":
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise UserError(f"{path}: {images.shape[1]} channels with layout {layout}; expected 1 or 3")
    return np.ascontiguousarray(images), layout


READERS = {"fashion-mnist": read_fashion_mnist, "folder": read_folder, "zip": read_edm_zip,
           "cifar": read_cifar_tar, "idx": read_idx}
