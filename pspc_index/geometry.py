"""Crop sets as linear operators between pixels and crops.

A crop set {C_k} acts on per-pixel maps v [..., H, W] by `crop_sums` (v -> sum of v over each crop,
i.e. C_k v summed: [..., K]) and on per-crop values w [..., K] by its adjoint `uncrop`
(w -> sum over the crops covering each pixel: [..., H, W]). `coverage` = uncrop(1) is the
diagonal of sum_k C_k^T C_k in the PSPC composite (Eq. 11).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import UserError


def _box_sum(v: torch.Tensor, s: int) -> torch.Tensor:
    """Sums over every valid s x s window of v [..., H, W] -> [..., H-s+1, W-s+1].

    Separable sums of shifted slices: sums of non-negative terms keep float relative precision (a
    cumulative-sum difference would cancel catastrophically at small t), and measured 1.4-3.4x faster
    than avg_pool2d on CPU for s = 21..3.
    """
    cols = v.shape[-1] - s + 1
    r = v[..., :cols].clone()
    for i in range(1, s):
        r += v[..., i:i + cols]
    rows = v.shape[-2] - s + 1
    out = r[..., :rows, :].clone()
    for i in range(1, s):
        out += r[..., i:i + rows, :]
    return out


class SquareCrops:
    """All valid s x s crops at stride 1, no padding: (H-s+1)(W-s+1) crops, row-major by corner."""

    def __init__(self, h: int, w: int, s: int):
        if not 1 <= s <= min(h, w):
            raise UserError(f"patch size {s} is outside 1..{min(h, w)} for {h}x{w} images")
        self.h, self.w, self.s = h, w, s
        self.grid = (h - s + 1, w - s + 1)

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1]

    def crop_sums(self, v: torch.Tensor) -> torch.Tensor:
        return _box_sum(v, self.s).flatten(-2)

    def uncrop(self, w: torch.Tensor) -> torch.Tensor:
        # the adjoint of a valid box sum is a full box sum of the zero-padded input
        p = self.s - 1
        w = w.unflatten(-1, self.grid)
        return _box_sum(F.pad(w, (p, p, p, p)), self.s)

    @property
    def coverage(self) -> torch.Tensor:
        return self.uncrop(torch.ones(len(self), dtype=torch.float64))

    def masks(self) -> torch.Tensor:
        """Boolean [K, H, W] masks (for tests and for the generic mask path)."""
        m = torch.zeros(len(self), self.h, self.w, dtype=torch.bool)
        for k in range(len(self)):
            y, x = divmod(k, self.grid[1])
            m[k, y:y + self.s, x:x + self.s] = True
        return m


class MaskCrops:
    """Arbitrary spatial crops given as boolean masks [K, H, W] (all channels of a chosen pixel)."""

    def __init__(self, masks: torch.Tensor):
        masks = torch.as_tensor(masks, dtype=torch.bool)
        if masks.ndim != 3:
            raise UserError(f"masks must be [K, H, W], got {list(masks.shape)}")
        self.h, self.w = masks.shape[1:]
        self.mask_tensor = masks
        self.matrix = masks.flatten(1).to(torch.float32)  # [K, HW]
        uncovered = (self.matrix.sum(0) == 0).nonzero()
        if len(uncovered):
            y, x = divmod(int(uncovered[0]), self.w)
            raise UserError(f"pixel (y={y}, x={x}) is covered by no crop ({len(uncovered)} uncovered pixels)")

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def crop_sums(self, v: torch.Tensor) -> torch.Tensor:
        return v.flatten(-2) @ self.matrix.to(v).T

    def uncrop(self, w: torch.Tensor) -> torch.Tensor:
        return (w @ self.matrix.to(w)).unflatten(-1, (self.h, self.w))

    @property
    def coverage(self) -> torch.Tensor:
        return self.matrix.to(torch.float64).sum(0).reshape(self.h, self.w)

    def masks(self) -> torch.Tensor:
        return self.mask_tensor


def flex_masks(heatmap: torch.Tensor, lam: float) -> torch.Tensor:
    """PSPC-Flex crops (Eq. 12) from one t's heatmap [H, W, H, W]: per output pixel, the smallest pixel
    set holding a fraction lam of its map's mass -> boolean masks [H*W, H, W], row-major by pixel.

    As the reference code: normalise, sort ascending, keep pixels whose ascending cumulative share is
    >= 1 - lam (the boundary pixel is kept, so the kept mass is >= lam).
    """
    h, w = heatmap.shape[:2]
    g = heatmap.reshape(h * w, h * w).to(torch.float64)
    g = g / g.sum(1, keepdim=True).clamp_min(1e-300)
    order = g.argsort(dim=1)
    cum = g.gather(1, order).cumsum(1)
    keep_sorted = cum >= 1 - lam - 1e-12
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep.reshape(h * w, h, w)
