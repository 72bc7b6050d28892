"""Where pspc-index writes: no command deletes, overwrites or moves anything it did not create.

Every output path is claimed before any work (`claim`): a path that exists is refused with one line
unless it is a pspc-index artefact of the kind about to be written, which is resumed (bundles,
sample runs) or replaced only with `overwrite`; an existing plain file is replaced only with
`overwrite`. Missing parent folders of any output (file or directory artefact) are created when it is
written, as `mkdir -p` would; a parent path that exists as a file is refused by `claim`. Writers then build under a temporary sibling name and rename when complete (`atomic_dir`
/ `commit_dir`, `save_npy`, `save_png`), so no reader ever sees half an output.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .errors import UserError

# the `format` tag each directory artefact records (zarr group attributes, or a bundle's manifest/journal)
STORE = "pspc-index-store"
BUNDLE = "pspc-index-bundle"
SAMPLES = "pspc-index-samples"
HEATMAPS = "pspc-index-heatmaps"
DEMO = "pspc-index-demo"
DEMO_MARKER = ".pspc-demo.json"
FILE = "file"


def artefact_format(path: str | os.PathLike) -> str | None:
    """The pspc-index format tag of the directory at `path` (a store, heatmaps or sample-run zarr group,
    or an index bundle, finished or not), or None if it is anything else."""
    path = Path(path)
    if not path.is_dir():
        return None
    for name in ("zarr.json", "manifest.json", ".progress.json", ".progress-0.json", DEMO_MARKER):
        try:
            doc = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        fmt = (doc.get("attributes", doc) if isinstance(doc, dict) else {}).get("format")
        if isinstance(fmt, str) and fmt.startswith("pspc-index-"):
            return fmt
    return None


def claim(path: str | os.PathLike, kind: str, overwrite: bool = False, resume: bool = False) -> Path:
    """Check, before any work, that an output of `kind` may be written at `path`; returns it resolved.

    kind: one of STORE, BUNDLE, SAMPLES, HEATMAPS (directories) or FILE. Allowed: a path that does not
    exist or an empty directory; an artefact of the same kind when `resume` (it is continued) or `overwrite` (it is replaced);
    an existing file of kind FILE with `overwrite`. Raises UserError (one line) for everything else, in
    particular any directory that pspc-index did not write, which is never touched.
    """
    p = Path(path).resolve()
    if not p.exists() and not p.is_symlink():
        # missing parent folders are created on writing; an existing non-folder on the way is refused,
        # named as the user gave it
        given = [*Path(path).parents][:-1]  # the folders as the user wrote them (not the final ".")
        for i, ancestor in enumerate(p.parents):
            if ancestor.exists():
                shown = given[i] if i < len(given) and given[i].resolve() == ancestor else ancestor
                if not ancestor.is_dir():
                    raise UserError(f"{path}: {shown} is not a directory")
                if not os.access(ancestor, os.W_OK | os.X_OK):
                    raise UserError(f"{path}: cannot write in {shown} (permission denied)")
                break
        return p
    if kind == FILE:
        if p.is_dir():
            raise UserError(f"{path}: is a directory; give a file name")
        if not overwrite:
            raise UserError(f"{path}: exists; pass --overwrite to replace it, or choose another path")
        return p
    if p.is_dir() and not any(p.iterdir()):
        return p  # an empty folder holds nothing to lose (a user's mkdir, or a build killed at its start)
    found = artefact_format(p)
    what = kind.removeprefix("pspc-index-")
    if found != kind:
        named = f"a pspc-index {found.removeprefix('pspc-index-')}" if found else "not a pspc-index artefact"
        raise UserError(f"{path}: exists and is {named}; refusing to touch it (choose another path for the {what})")
    if not (resume or overwrite):
        raise UserError(f"{path}: a pspc-index {what} already exists; pass --overwrite to replace it")
    return p


def start_demo_dir(path: str | os.PathLike) -> Path:
    """The demo's output folder: created and marked as the demo's, or a folder an earlier demo marked
    (its files are the demo's own, so they are replaced); any other existing path is refused."""
    p = claim(path, DEMO, resume=True)
    p.mkdir(parents=True, exist_ok=True)
    (p / DEMO_MARKER).write_text(json.dumps({"format": DEMO}) + "\n")
    return p


def atomic_dir(final: Path) -> Path:
    """A sibling temporary directory to build into; `commit_dir` renames it into place."""
    final = Path(final).resolve()
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path, kind: str) -> None:
    """Replace `final` by the finished `tmp` (readers see the old or the new, never a half). An existing
    `final` is removed only if it is a pspc-index artefact of `kind` (checked again here, not trusted
    from the caller); anything else stays and the finished `tmp` is discarded."""
    final = Path(final).resolve()
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        tmp.rename(final)  # POSIX rename replaces an empty directory
        return
    if artefact_format(final) != kind:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{final}: appeared while writing and is not a pspc-index {kind.removeprefix('pspc-index-')}; "
                        "left untouched")
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_file(path: str | os.PathLike, suffix: str, write) -> None:
    """write(tmp) then rename to `path`; the temporary file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as the directory artefacts (claim: module docstring)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a .npy atomically (temporary name, then rename)."""
    _atomic_file(path, ".npy", lambda tmp: np.save(tmp, array))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write a .npz atomically."""
    _atomic_file(path, ".npz", lambda tmp: np.savez(tmp, **arrays))


def kept(path: str | os.PathLike, compute):
    """compute() once: its result is saved at `path` (torch.save, atomically) and read back by a rerun, so
    a long measurement made of such stages continues where a killed run stopped."""
    import torch

    if Path(path).exists():
        return torch.load(path, weights_only=False)
    value = compute()
    _atomic_file(path, ".pt", lambda tmp: torch.save(value, tmp))
    return value


def save_png(path: str | os.PathLike, image, dpi: int = 100) -> None:
    """Write a PIL image or a matplotlib figure (at `dpi`) as PNG atomically."""
    if hasattr(image, "savefig"):
        _atomic_file(path, ".png", lambda tmp: image.savefig(tmp, dpi=dpi, format="png"))
    else:
        _atomic_file(path, ".png", lambda tmp: image.save(tmp, format="PNG"))


def image_grid(x, ncol: int | None = None):
    """A PIL image of images x [N, C, H, W] in [-1, 1] on a grid with 2-pixel gutters, scaled up to be
    about 256 pixels a row of four."""
    from PIL import Image

    from .store import to_uint8

    u8 = to_uint8(x)
    n, c, h, w = u8.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.zeros((c, nrow * (h + 2) + 2, ncol * (w + 2) + 2), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = u8[i]
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    scale = max(1, 256 // (w + 2) // max(1, ncol // 4))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def write_grid(path: str | os.PathLike, x, ncol: int | None = None) -> None:
    """PNG grid of images x [N, C, H, W] in [-1, 1], written atomically."""
    save_png(path, image_grid(x, ncol))
