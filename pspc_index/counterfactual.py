"""Counterfactual training sets: the store without chosen images, or only one class (DESIGN.md section 3).

PSPC needs no training, so "what would it make without these images?" has an exact answer: the same
denoiser over the training set with them left out. `Exclusion` names the stored images to leave out (an
image's flip goes with it); `training_set` applies it as a view of the store (`TrainingSet.without`:
log weight -inf, no copy), which every exact denoiser and the retrieval path honour.

    from pspc_index.counterfactual import training_set
    data = training_set(store, exclude=[3, 17], exclude_labels=["Sandal"], xflip=True)
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .store import ImageStore, TrainingSet


@dataclass(frozen=True)
class Exclusion:
    """Stored images left out of a training set.

    ids: int64 [K], sorted, unique store indices (from the exclude list, the excluded labels and the
    label filter together); label / exclude_labels: the label filter and excluded labels as given, for
    the record. An empty `ids` means the whole store.
    """

    ids: np.ndarray
    label: int | None = None
    exclude_labels: tuple[int, ...] = ()

    def apply(self, data: TrainingSet) -> TrainingSet:
        """`data` without these images and their flips (a view), or `data` itself if none."""
        return data.without(self.ids) if len(self.ids) else data

    def record(self) -> dict | None:
        """What a resumable run records (None without exclusion): the count and sha256 of the sorted
        excluded ids (int64 little-endian bytes) and the label filters, so a different exclusion is refused."""
        if not len(self.ids):
            return None
        digest = hashlib.sha256(self.ids.astype("<i8").tobytes()).hexdigest()
        return {"count": int(len(self.ids)), "sha256": digest, "label": self.label,
                "exclude_labels": list(self.exclude_labels)}


def read_ids(path: str | os.PathLike) -> np.ndarray:
    """Store indices from a file: a .npy of integers (any shape), or text with one integer a line (blank
    lines skipped) -> int64 [K]. UserError for a missing file, a non-integer array or line."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: exclude file not found")
    if path.endswith(".npy"):
        try:
            ids = np.load(path, allow_pickle=False)
        except Exception as e:
            raise UserError(f"{path}: not a readable .npy array ({type(e).__name__})") from None
        if ids.dtype.kind not in "iu":
            raise UserError(f"{path}: exclude indices must be integers, got {ids.dtype}")
    else:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable text file ({type(e).__name__})") from None
        ids = []
        for no, line in enumerate(lines, 1):
            if line.strip():
                try:
                    ids.append(int(line.strip()))
                except ValueError:
                    raise UserError(f"{path}:{no}: not an integer store index: {line.strip()[:40]!r}") from None
        ids = np.asarray(ids, np.int64)
    if ids.size == 0:  # an empty list is more likely a failed script than a wish to exclude nothing
        raise UserError(f"{path}: holds no store index (to exclude nothing, leave out --exclude)")
    return ids.astype(np.int64).reshape(-1)


def resolve_label(store: ImageStore, label: int | str, option: str = "label") -> int:
    """A label given as an integer (or its text) or as a class name of the store -> the integer label.
    UserError if the store has no labels or no image carries that label."""
    if store.labels is None:
        raise UserError(f"--{option}: {store.path} has no labels")
    names = store.meta.get("classes") or []
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        value = int(text)
    elif text in names:
        value = names.index(text)
    else:
        raise UserError(f"--{option} {text!r}: not an integer label or a class name of {store.path}")
    if not (store.labels == value).any():
        raise UserError(f"--{option} {text!r}: no image of {store.path} has label {value}")
    return value


def exclusion(store: ImageStore, exclude=None, exclude_labels=(), label=None) -> Exclusion:
    """The stored images to leave out of `store`'s training set.

    exclude: store indices (array-like of ints) or a file of them (`read_ids`); exclude_labels: labels
    (ints or class names) whose images are left out; label: keep only images of this label
    (class-conditional). UserError (one line) for an index outside 0..N-1, an unknown label, labels on a
    store without them, or nothing left.
    """
    n = store.shape[0]
    # 1. the listed indices, checked against the store
    ids = read_ids(exclude) if isinstance(exclude, (str, os.PathLike)) else \
        np.asarray([] if exclude is None else exclude).reshape(-1)
    if len(ids) and ids.dtype.kind not in "iu":
        raise UserError(f"--exclude: store indices must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= n)]
    if len(bad):
        raise UserError(f"--exclude: index {int(bad[0])} is outside the store's 0..{n - 1}")
    gone = np.zeros(n, bool)
    gone[ids] = True
    # 2. every image of an excluded label, and every image not of the kept label
    given = [exclude_labels] if isinstance(exclude_labels, (str, int)) else list(exclude_labels or ())
    labels = tuple(resolve_label(store, v, "exclude-label") for v in given)
    if labels:
        gone |= np.isin(store.labels, labels)
    keep = None if label is None else resolve_label(store, label)
    if keep is not None:
        gone |= store.labels != keep
    if gone.all():
        raise UserError(f"the exclusion leaves none of the {n} images of {store.path}")
    return Exclusion(np.flatnonzero(gone).astype(np.int64), keep, labels)


def training_set(store: ImageStore, exclude=None, exclude_labels=(), label=None, xflip: bool = True,
                 device: str | torch.device = "cpu") -> TrainingSet:
    """`store`'s training set without the images `exclusion(store, exclude, exclude_labels, label)`
    names (and their flips): a view sharing the store's pixels, equal in every denoiser to a store
    ingested without them."""
    return exclusion(store, exclude, exclude_labels, label).apply(store.training_set(xflip, device))


def included_ids(data: TrainingSet) -> torch.Tensor:
    """Virtual ids (int64 [n_included], ascending) of the images taking part: those of a store without
    the excluded images, in that store's order (kept originals, then their flips)."""
    ids = torch.arange(len(data))
    return ids if data.excluded is None else ids[~data.excluded.repeat(2 if data.xflip else 1)]
