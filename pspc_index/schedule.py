"""Noise-level grid (Karras et al. 2022) and the PSPC schedules keyed to it.

Schedules are lists aligned with the Karras grid, high t first, and are looked up at the grid point
nearest to the query t (as the reference implementation does). A schedule is made for H x W images: its
crop sizes are at most min(H, W), and a size >= max(H, W) is the whole image (the empirical denoiser),
so full-size steps mean the same thing for square, portrait and landscape images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

T_MAX, T_MIN, RHO = 80.0, 0.002, 7.0


def karras_grid(n: int, t_max: float = T_MAX, t_min: float = T_MIN, rho: float = RHO) -> torch.Tensor:
    """t_i = (t_max^(1/rho) + i/(n-1) (t_min^(1/rho) - t_max^(1/rho)))^rho, i = 0..n-1 (float64)."""
    if n < 2:
        raise UserError(f"the Karras grid needs at least 2 steps, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    return (t_max ** (1 / rho) + i / (n - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho


def _expand(spec: list[tuple[float, int]]) -> list[float]:
    return [v for v, count in spec for _ in range(count)]


@dataclass(frozen=True)
class Schedule:
    """Patch sizes s(t) and flex thresholds lambda(t) on an n-step Karras grid, for images of `shape` (H, W)."""

    name: str
    shape: tuple[int, int]
    patch_sizes: tuple[int, ...]
    lambdas: tuple[float, ...]
    # ELS window k(t) (Kamb & Ganguli 2025), calibrated against a network (tools/calibrate_els.py); None: derived
    els_sizes: tuple[int, ...] | None = None

    @property
    def steps(self) -> int:
        return len(self.patch_sizes)

    @property
    def grid(self) -> torch.Tensor:
        return karras_grid(self.steps)

    def index(self, t: torch.Tensor | float) -> torch.Tensor:
        """Index of the nearest grid t for each t (argmin |t_grid - t|)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return (self.grid.reshape(1, -1) - t).abs().argmin(dim=1)

    def patch_size(self, t) -> torch.Tensor:
        return torch.tensor(self.patch_sizes)[self.index(t)]

    def els_size(self, t) -> torch.Tensor:
        """ELS window k(t) at the nearest grid t: `els_sizes`, else derived from the patch sizes with each
        full-size step as k = 2 max(H, W) - 1 (every pixel's window the whole image: the optimal denoiser)."""
        sizes = self.els_sizes or tuple(2 * self.full - 1 if s >= self.full else s for s in self.patch_sizes)
        return torch.tensor(sizes)[self.index(t)]

    def lam(self, t) -> torch.Tensor:
        return torch.tensor(self.lambdas, dtype=torch.float64)[self.index(t)]

    @property
    def full(self) -> int:
        """The size meaning the whole image: a square crop of side max(H, W) clipped to the image."""
        return max(self.shape)

    def sizes_below_full(self) -> list[int]:
        """The square sizes an index must cover (full size is the empirical denoiser)."""
        return sorted({s for s in self.patch_sizes if s < self.full})


# Niedoba et al. (2025), reference code constants, 18-step grid.
CIFAR10 = Schedule(
    "cifar10", (32, 32),
    tuple(int(v) for v in _expand([(32, 7), (23, 1), (15, 1), (11, 1), (7, 1), (5, 1), (3, 6)])),
    tuple(_expand([(1.0, 7), (0.7, 2), (0.5, 1), (0.4, 4), (0.3, 4)])),
)

# Fashion-MNIST 28x28, derived from the CIFAR-10 schedule: each s scaled by 28/32 and rounded to the
# nearest odd size (23 -> 20.1 -> 21, 15 -> 13.1 -> 13, 11 -> 9.6 -> 9, 7 -> 6.1 -> 7, 5 -> 4.4 -> 5,
# 3 -> 2.6 -> 3), full size kept at the same 7 high-t steps; lambda is a mass fraction, so it is kept.
FASHION_MNIST = Schedule(
    "fashion-mnist", (28, 28),
    tuple(int(v) for v in _expand([(28, 7), (21, 1), (13, 1), (9, 1), (7, 1), (5, 1), (3, 6)])),
    CIFAR10.lambdas,
    # ELS k(t) calibrated against the reference U-Net, the fine-tuned data/network/fmnist-unet-ft
    # (tools/calibrate_els.py: best median per-image r^2 over odd k and 55 = the whole image, 16 z per grid t,
    # a 100-image pool; docs/els_calibration_ft.json). The 23 at t = 28.4 is what it measured (median r^2
    # 0.966 against 0.954 for the whole image), kept as is. Against the shipped network
    # (docs/els_calibration.json) it was the same but 25 at t = 57.6, 55 at t = 28.4 and 19 at t = 3.26.
    els_sizes=(55, 55, 55, 23, 55, 55, 55, 55, 21, 13, 7, 5, 3, 3, 3, 3, 3, 3),
)

SCHEDULE_FORMAT = "pspc-index-schedule"
# Tuned schedules shipped with the package: one json each (written by tools/evaluate.py, `tuned_schedule.json`),
# selectable by the name inside it (`--schedule NAME`) next to the derived schedules above.
TUNED_DIR = Path(__file__).resolve().parent / "schedules"


def schedule_to_json(sched: Schedule, meta: dict | None = None) -> dict:
    """The json document of a schedule (read back by `read_schedule_json`); `meta`: where its values come from."""
    return {"format": SCHEDULE_FORMAT, "format_version": 1, "name": sched.name, "shape": list(sched.shape),
            "patch_sizes": list(sched.patch_sizes), "lambdas": list(sched.lambdas),
            "els_sizes": list(sched.els_sizes) if sched.els_sizes else None, "meta": meta or {}}


def read_schedule_json(path: str | os.PathLike) -> Schedule:
    """A schedule from its json document. UserError (naming the file) unless it is one: shape (H, W) positive,
    one patch size, lambda (and ELS k, if given) per step of an >= 2-step grid, sizes odd below max(H, W)
    and <= min(H, W), lambdas in (0, 1], ELS k odd and positive, and a name no derived schedule has."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        name, (h, w) = doc["name"], (int(v) for v in doc["shape"])
        sizes, lams = tuple(int(v) for v in doc["patch_sizes"]), tuple(float(v) for v in doc["lambdas"])
        els = tuple(int(v) for v in doc["els_sizes"]) if doc.get("els_sizes") else None
        fmt = doc["format"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a readable schedule json ({type(e).__name__}: {e})") from None
    checks = ((fmt == SCHEDULE_FORMAT, f"format {fmt!r} is not {SCHEDULE_FORMAT!r}"),
              (isinstance(name, str) and name not in (CIFAR10.name, FASHION_MNIST.name),
               f"name {name!r} is not a string or is a derived schedule's"),
              (min(h, w) >= 1, "shape must be positive"),
              (len(sizes) >= 2 and len(lams) == len(sizes) and (els is None or len(els) == len(sizes)),
               "needs one patch size, lambda (and ELS k) per step of an >= 2-step grid"),
              (all(s >= max(h, w) or (s % 2 == 1 and 1 <= s <= min(h, w)) for s in sizes),
               "patch sizes below the full size must be odd and fit the image"),
              (all(0 < v <= 1 for v in lams), "lambdas must lie in (0, 1]"),
              (els is None or all(k >= 1 and k % 2 == 1 for k in els), "ELS sizes must be odd and positive"))
    for ok, why in checks:
        if not ok:
            raise UserError(f"{path}: {why}")
    return Schedule(name, (h, w), sizes, lams, els)


def tuned_schedules(folder: str | os.PathLike = TUNED_DIR) -> dict[str, Schedule]:
    """Every `*.json` schedule in `folder` (none if it does not exist), by name; UserError on a bad file."""
    folder = Path(folder)
    found = [read_schedule_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return {s.name: s for s in found}


SCHEDULES = {s.name: s for s in (CIFAR10, FASHION_MNIST)}
SCHEDULES.update(tuned_schedules())
# The default schedule per image shape, by name (a shape not listed: the first schedule made for it). Shipping
# a tuned schedule as the Fashion-MNIST default is the one-line change of "fashion-mnist" to its name here.
DEFAULTS: dict[tuple[int, int], str] = {(28, 28): "fashion-mnist-tuned"}


def default_schedule(h: int, w: int) -> Schedule:
    """The bundled schedule for h x w images, else CIFAR-10's scaled the same way as Fashion-MNIST's:
    each crop size by min(H, W) / 32 (crops must fit the short side; CelebA's 178 x 218 gets the sizes of
    178 x 178), its full-size steps kept as the whole image."""
    if (h, w) in DEFAULTS:
        return SCHEDULES[DEFAULTS[(h, w)]]
    for s in SCHEDULES.values():
        if s.shape == (h, w):
            return s
    side = min(h, w)
    scaled = [max(h, w) if s == CIFAR10.full else min(side, max(1, int(round((s * side / 32 - 1) / 2)) * 2 + 1))
              for s in CIFAR10.patch_sizes]
    return Schedule(f"scaled-{h}" if h == w else f"scaled-{h}x{w}", (h, w), tuple(scaled), CIFAR10.lambdas)


def get_schedule(name: str | None, h: int, w: int) -> Schedule:
    """The named schedule (None: the default for h x w images); UserError if it was made for another shape."""
    if name is None:
        return default_schedule(h, w)
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    sched = SCHEDULES[name]
    if sched.shape != (h, w):
        raise UserError(f"schedule {name!r} is for {sched.shape[0]}x{sched.shape[1]} images, the store holds {h}x{w}")
    return sched
