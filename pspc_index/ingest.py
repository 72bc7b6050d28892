"""Readers that turn the data sets researchers have on disk into uint8 images [N, C, H, W].

One reader per format; `read_source` picks it from the path (folder, suffix, then first bytes).
Every bad input raises UserError naming the path; what a reader skips or ignores is said in Source.notes.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import pickle
import re
import tarfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .outputs import STORE, claim
from .store import ImageStore, write_store

BUNDLED_FASHION_MNIST = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = {"L", "LA", "1"}
COLOUR_MODES = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"}
# Names (any path part, lower case) that operating systems and tools leave beside data; any part
# starting with "." (AppleDouble `._x.png` forks, .DS_Store, .ipynb_checkpoints, ...) is skipped too.
OS_METADATA_NAMES = {"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "@eadir", "$recycle.bin",
                     "system volume information"}
SRGB_CHROMATICITY = (0.3127, 0.3290, 0.64, 0.33, 0.30, 0.60, 0.15, 0.06)  # white x, y; red, green, blue
GZIP_MAGIC = b"\x1f\x8b"
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # ubyte data, 3 dims / 1 dim
CIFAR_BATCH = re.compile(r"(?:^|/)data_batch_([1-5])$")
NPZ_IMAGE_KEYS, NPZ_LABEL_KEYS = ("images", "x", "arr_0"), ("labels", "y")  # arr_0: np.savez(path, images)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


@dataclass
class Source:
    """Pixels and labels read from one source, a line saying where they came from, and what was left out."""

    images: np.ndarray         # uint8 [N, C, H, W], C in {1, 3}
    labels: np.ndarray | None  # int64 [N] or None
    description: str
    classes: list[str] | None = None  # class names: label i is classes[i]
    skipped: int = 0                  # OS/tool metadata files skipped
    notes: list[str] = field(default_factory=list)  # one line each: what was skipped or ignored, and why


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


def ingest(src: str, out: str, layout: str | None = None, overwrite: bool = False,
           note: Callable[[str], None] | None = None) -> ImageStore:
    """Read SRC and write it as the image store OUT. OUT must not exist, or (with `overwrite`) be a store;
    anything else there is refused with a UserError before SRC is read, and never touched.

    Class names, if the source has them, go in the store metadata "classes" (label i is classes[i]).
    note: called with each line of Source.notes (what was skipped or ignored) before the store is written.
    """
    claim(out, STORE, overwrite=overwrite)
    source = read_source(src, layout)
    for line in source.notes if note else ():
        note(line)
    extra = {"classes": source.classes} if source.classes else None
    return write_store(out, source.images, source.labels, source=source.description, extra=extra,
                       overwrite=overwrite)


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


@contextmanager
def decoding(where, what: str):
    """Turn whatever a decoding library raises inside the block into one UserError line naming `where`.

    Pillow, zipfile, tarfile, gzip, pickle and numpy raise many types for corrupt, truncated, oversized
    or unsupported input (OSError, EOFError, ValueError, zlib.error, struct.error, SyntaxError,
    NotImplementedError and RuntimeError from zipfile, MemoryError for absurd headers, ...): a list of
    them would let the one it missed out as a traceback. UserError raised inside passes through.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        detail = " ".join(str(e).split()) or "no detail"
        raise UserError(f"{where}: {what} ({type(e).__name__}: {detail})") from None


def _head(path: Path) -> bytes:
    """The first bytes of path, decompressed if gzip (a .gz may hold a tar or an IDX file)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(GZIP_MAGIC):
        with decoding(path, "corrupt gzip data"), gzip.open(path) as f:
            head = f.read(512)
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
    source.classes = FASHION_MNIST_CLASSES
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
    need = header + math.prod(dims)  # exact: np.prod would overflow int64 on a damaged header
    if len(data) != need:
        problem = "truncated" if len(data) < need else "trailing bytes"
        raise UserError(f"{path}: {problem}: dims {dims} need {need} bytes, the file has {len(data)}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of path, gunzipped if it starts with the gzip magic."""
    data = path.read_bytes()
    if data.startswith(GZIP_MAGIC):
        with decoding(path, "corrupt gzip data"):
            data = gzip.decompress(data)
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
    """CIFAR-10 python archive: the training batches data_batch_1..5, in order; class names from batches.meta."""
    batches, classes, skipped = {}, None, 0
    with decoding(path, "corrupt or unreadable tar archive"), tarfile.open(path, "r:*") as tar:
        for member in tar:  # one sequential pass: seeking back in a .tar.gz decompresses again
            if is_os_metadata(member.name):
                skipped += member.isfile()
                continue
            match = CIFAR_BATCH.search(member.name)
            if match and member.isfile():
                raw = tar.extractfile(member).read()
                batches[int(match[1])] = _cifar_batch(raw, f"{path}/{member.name}")
            elif member.name.endswith("batches.meta") and member.isfile():
                classes = _cifar_classes(tar.extractfile(member).read(), f"{path}/{member.name}")
    missing = [f"data_batch_{k}" for k in range(1, 6) if k not in batches]
    if missing:
        raise UserError(f"{path}: not a CIFAR-10 python archive (no {', '.join(missing)})")
    images, labels = zip(*(batches[k] for k in range(1, 6)))
    return Source(np.concatenate(images), np.concatenate(labels),
                  f"{path.name} (CIFAR-10 python archive, data_batch_1..5)", classes=classes,
                  skipped=skipped, notes=_skip_notes(path, skipped, []))


def _unpickle(raw: bytes, where: str):
    """A pickle that may hold only plain data and numpy arrays (NumpyOnlyUnpickler)."""
    with decoding(where, "unreadable pickle"):
        return NumpyOnlyUnpickler(io.BytesIO(raw), where).load()


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch {b"data": uint8 [n, 3072], b"labels": [n]} -> images [n, 3, 32, 32], labels."""
    batch = _unpickle(raw, where)
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


def _cifar_classes(raw: bytes, where: str) -> list[str] | None:
    """Class names from batches.meta ({b"label_names": [b"airplane", ...]}); None if it has none."""
    meta = _unpickle(raw, where)
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, (bytes, str)) for n in names)):
        return None
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


# --- Images: EDM zip, folder -------------------------------------------------------------------

def is_os_metadata(name: str) -> bool:
    """Whether a path (relative, '/'-separated) is operating-system or tool metadata, not data:
    AppleDouble `._x.png` forks, `__MACOSX/` trees, .DS_Store, Thumbs.db, desktop.ini, Synology
    @eaDir thumbnails, and anything hidden (a file or folder whose name starts with '.')."""
    parts = [p for p in name.split("/") if p not in ("", ".")]  # "./a.png" (tar) is not hidden
    return any(p.startswith(".") or p.lower() in OS_METADATA_NAMES for p in parts)


def _skip_notes(where: Path, skipped: int, ignored: list[str]) -> list[str]:
    """Notes for the metadata files skipped and the other non-image files ignored."""
    notes = [f"{where}: skipped {skipped} operating-system/tool metadata file(s) (resource forks, "
             f"__MACOSX/, .DS_Store, Thumbs.db, hidden files)"] if skipped else []
    if ignored:
        notes.append(f"{where}: ignored {len(ignored)} file(s) that are not PNG or JPEG images "
                     f"(e.g. {ignored[0]})")
    return notes


def read_image_files(where: Path, files: list[str], read_json, open_file, kind: str) -> Source:
    """The images among `files` (relative '/'-separated paths of a folder or an archive), sorted by path.

    Labels: from dataset.json (EDM: {"labels": [[name, label], ...]} or null) when there is one, else
    from class sub-folders (torchvision ImageFolder). OS/tool metadata is skipped and counted.
    read_json() -> the bytes of dataset.json; open_file(name) -> a binary file object.
    """
    skipped = sum(map(is_os_metadata, files))
    data = [f for f in files if not is_os_metadata(f)]
    names = sorted(f for f in data if f.lower().endswith(IMAGE_SUFFIXES))
    ignored = sorted(f for f in data if not f.lower().endswith(IMAGE_SUFFIXES) and f != "dataset.json")
    notes = _skip_notes(where, skipped, ignored)
    if "dataset.json" in data:
        labels, classes = _json_labels(where / "dataset.json", read_json(), names), None
    else:
        labels, classes = _folder_labels(where, names, notes)
    images = _stack_images(where, names, open_file)
    with_classes = f", {len(classes)} classes from sub-folders" if classes else ""
    return Source(images, labels, f"{where.name} ({kind}{with_classes})", classes, skipped, notes)


def read_edm_zip(path: Path) -> Source:
    """EDM dataset zip (or any zip of PNG/JPEG images): see read_image_files."""
    with decoding(path, "corrupt or unreadable zip archive"), zipfile.ZipFile(path) as zf:
        files = [info.filename for info in zf.infolist() if not info.is_dir()]
        return read_image_files(path, files, lambda: zf.read("dataset.json"), zf.open, "EDM dataset zip")


def read_folder(path: Path) -> Source:
    """A folder of PNG/JPEG images, recursive: see read_image_files."""
    files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    return read_image_files(path, files, (path / "dataset.json").read_bytes,
                            lambda name: (path / name).open("rb"), "image folder")


def _folder_labels(where: Path, names: list[str], notes: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """ImageFolder labels: each image's class is its top-level sub-folder, labels index the sorted
    folder names (as torchvision and EDM's dataset tool number them).

    One folder holding everything (a zipped folder: `train/cat/1.png`) is looked through. Images both
    beside and inside sub-folders give no labels, and a note saying so.
    """
    parts = [name.split("/") for name in names]
    depth = 0  # path parts shared by every image: wrapper folders
    while parts and all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    tops = [p[depth] if len(p) > depth + 1 else None for p in parts]
    if all(top is None for top in tops):
        return None, None
    if None in tops:
        notes.append(f"{where}: no class labels: images both beside and inside sub-folders (e.g. "
                     f"{names[tops.index(None)]}); put every image in a class sub-folder, or give dataset.json")
        return None, None
    classes = sorted(set(tops))
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[top] for top in tops], np.int64), classes


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
        with decoding(where / name, "unreadable image"), open_file(name) as f:
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
    """One image file -> uint8 [H, W] (grayscale) or [H, W, 3] (colour), with what the file says about
    its pixels applied or refused (README, "What ingest reads"):

    applied: EXIF orientation; a palette; CMYK / YCbCr -> RGB (Pillow); 1-bit -> 0 / 255; 16-bit
    grayscale -> the high byte (Pillow reads 16-bit colour that way); alpha that is 255 everywhere is dropped.
    refused (UserError): any transparent or translucent pixel; a colour space other than sRGB
    (ICC profile, PNG gAMA / cHRM); 32-bit and float modes; more pixels than PIL.Image.MAX_IMAGE_PIXELS.
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's advice ("convert palette transparency to RGBA") is followed here
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse, not warn
        with Image.open(f) as im:
            _check_srgb(im, where)
            _check_opaque(im, where)
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16"):
                return (np.asarray(im) >> 8).astype(np.uint8)
            if im.mode not in GRAY_MODES | COLOUR_MODES:
                raise UserError(f"{where}: unsupported image mode {im.mode} (expected 8- or 16-bit "
                                f"grayscale, or 8-bit colour)")
            return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))


def _check_opaque(im, where: Path) -> None:
    """Refuse an image with any pixel not fully opaque (alpha channel, palette alpha or a tRNS colour key):
    the colour under a transparent pixel is arbitrary, and compositing would have to guess a background."""
    if not im.has_transparency_data:
        return
    alpha = np.asarray(im.convert("RGBA"))[..., 3]  # Pillow resolves palette alpha and colour keys here
    clear = int((alpha < 255).sum())
    if clear:
        raise UserError(f"{where}: {clear} of {alpha.size} pixels are transparent or translucent (mode {im.mode}); "
                        f"flatten the images onto a background first")


def _check_srgb(im, where: Path) -> None:
    """Refuse an image whose metadata says its values are not sRGB (an ICC profile other than sRGB,
    or a PNG gAMA / cHRM other than sRGB's): read as sRGB they would be other colours."""
    info = im.info
    if "srgb" in info:  # PNG sRGB chunk: it overrides gAMA and cHRM
        return
    if info.get("icc_profile"):  # it overrides gAMA and cHRM too
        name = _profile_name(info["icc_profile"])
        if "srgb" not in name.lower():
            raise UserError(f"{where}: colour profile {name!r} is not sRGB; convert the images to sRGB "
                            f"(or remove the profile if the values are sRGB already)")
        return
    gamma, primaries = info.get("gamma"), info.get("chromaticity")
    if gamma is not None and abs(gamma - 1 / 2.2) > 0.005:
        raise UserError(f"{where}: PNG gamma {gamma} is not sRGB's 1/2.2; convert the images to sRGB")
    if primaries is not None and max(abs(a - b) for a, b in zip(primaries, SRGB_CHROMATICITY)) > 0.005:
        raise UserError(f"{where}: PNG chromaticities {tuple(primaries)} are not sRGB's; convert the images to sRGB")


def _profile_name(icc: bytes) -> str:
    """The description of an embedded ICC profile ("sRGB IEC61966-2.1", "Display P3", ...)."""
    from PIL import ImageCms

    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()


# --- NumPy arrays ------------------------------------------------------------------------------

def read_numpy(path: Path, layout: str | None) -> Source:
    """uint8 images in .npy, or .npz (see _npz_arrays); pickled (object) arrays are refused."""
    notes = []
    with decoding(path, "unreadable NumPy file"):
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            images, labels = loaded, None
        else:
            with loaded:
                images, labels = _npz_arrays(path, loaded, notes)
    images, layout = _to_nchw(path, images, layout)
    return Source(images, labels, f"{path.name} (NumPy array, {layout})", notes=notes)


def _npz_arrays(path: Path, npz, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The images and (optional) labels arrays of an .npz file; the other arrays are ignored, with a note.

    Images: the single array, or `images`, `x`, `arr_0` (guided-diffusion / ADM batches, np.savez with
    positional names). Labels: `labels`, `y`, or with `arr_0` an integer `arr_1` of length N.
    """
    keys = npz.files
    image_key = keys[0] if len(keys) == 1 else next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
    if image_key is None:
        raise UserError(f"{path}: holds arrays {keys}; name the images `images`, `x` or `arr_0`")
    images = npz[image_key]
    label_key = next((k for k in NPZ_LABEL_KEYS if k in keys), None)
    if label_key is None and image_key == "arr_0" and "arr_1" in keys:
        arr_1 = npz["arr_1"]
        label_key = "arr_1" if arr_1.dtype.kind in "iu" and arr_1.shape == images.shape[:1] else None
    ignored = [k for k in keys if k not in (image_key, label_key)]
    if ignored:
        notes.append(f"{path}: ignored arrays {', '.join(ignored)} (not images or labels, e.g. FID statistics)")
    return images, (npz[label_key] if label_key else None)


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
