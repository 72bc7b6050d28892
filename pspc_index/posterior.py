"""Exact posterior means over the training set, streamed in chunks so memory is bounded for any N.

Three exact computations, all over the same-location training patches of the paper:
  empirical_mean   D*(z, t)        = sum_i softmax_i(-||z - x_i||^2 / 2t^2) x_i            (Eq. 6-7)
  composite_mean   PSPC (Eq. 11)   = (sum_k C_k^T C_k)^-1 sum_k C_k^T E[x_Ck | z_Ck]       (Eq. 9-11)
and `OnlineSoftmax`, the one streaming-softmax implementation every path (exact and retrieval) uses.
"""
from __future__ import annotations

from typing import Callable

import torch

from .store import TrainingSet

# elements of the largest per-chunk intermediate ([B, n, H, W] floats); ~64 MB in float32
CHUNK_ELEMENTS = 2 ** 24


class OnlineSoftmax:
    """Softmax over a stream of logit chunks along `dim`: running max m, normaliser Z, accumulator A.

    After all chunks, Z = sum_i exp(l_i - m), A = sum_i exp(l_i - m) v_i, so the posterior mean is
    A / Z and the log normaliser is m + log Z. Chunks may arrive in any order.
    """

    def __init__(self, dim: int = -1):
        self.dim = dim
        self.m = self.z = self.acc = None

    def update(self, logits: torch.Tensor, combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
               weights: torch.Tensor | None = None) -> torch.Tensor:
        """Add a chunk. `combine(w)` maps its unnormalised weights w = exp(l - m) to the accumulator's
        shape; `weights` (broadcast to the logits) multiplies each term (importance weights). Returns w,
        relative to the running max after this chunk (after the last chunk: w / Z are the softmax weights)."""
        # 1. new running max, and the factor that rescales what was accumulated under the old one
        m_new = logits.amax(self.dim)
        if self.m is not None:
            m_new = torch.maximum(self.m, m_new)
        scale = None if self.m is None else torch.exp(self.m - m_new)
        # 2. this chunk's terms relative to the new max
        w = torch.exp(logits - m_new.unsqueeze(self.dim))
        if weights is not None:
            w = w * weights
        # 3. fold into normaliser and accumulator
        z = w.sum(self.dim)
        self.z = z if scale is None else self.z * scale + z
        if combine is not None:
            a = combine(w)
            self.acc = a if scale is None else self.acc * scale.reshape(*scale.shape, *[1] * (a.ndim - scale.ndim)) + a
        self.m = m_new
        return w

    def logsumexp(self) -> torch.Tensor:
        return self.m + torch.log(self.z)

    def mean(self) -> torch.Tensor:
        return self.acc / self.z.reshape(*self.z.shape, *[1] * (self.acc.ndim - self.z.ndim))


def _t_column(t, batch: int, dtype) -> torch.Tensor:
    """t as [B] (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=dtype)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)


def chunk_size(batch: int, per_image: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch * per_image))


def crop_sq_dists(z: torch.Tensor, x: torch.Tensor, crops) -> torch.Tensor:
    """||z_C - x_C||^2 of every crop C, by direct differences (never the norm expansion) and crop sums:
    z [B, C, H, W], x [B or 1, n, C, H, W] -> [B, n, K]."""
    return crops.crop_sums(((x - z[:, None]) ** 2).sum(2))


def empirical_mean(z: torch.Tensor, t, data: TrainingSet, chunk: int | None = None) -> torch.Tensor:
    """Optimal denoiser D*(z, t), one streaming pass. Distances use the norm expansion in float64,
    whose cancellation error (~1e-13 here) is far below 2 t^2 even at t = 0.002."""
    b = z.shape[0]
    zf = z.reshape(b, -1).to(torch.float64)
    inv2t2 = 1 / (2 * _t_column(t, b, torch.float64).to(z.device) ** 2)
    zz = (zf * zf).sum(1, keepdim=True)
    sm = OnlineSoftmax(dim=1)
    for _, x in data.chunks(chunk or chunk_size(1, zf.shape[1]), torch.float64):
        # 1. squared distances of every query to every image of the chunk
        xf = x.reshape(len(x), -1)
        d = (zz + (xf * xf).sum(1) - 2 * zf @ xf.T).clamp_min(0)
        # 2. fold the chunk's posterior terms into the running softmax
        sm.update(-d * inv2t2[:, None], lambda w: w @ xf)
    return sm.mean().reshape(z.shape).to(z.dtype)


def composite_mean(z: torch.Tensor, t, data: TrainingSet, crops, dtype=torch.float32,
                   chunk: int | None = None,
                   on_weights: Callable[[int, torch.Tensor], None] | None = None,
                   coverage: torch.Tensor | None = None) -> torch.Tensor:
    """PSPC composite (Eq. 11) over a crop set, exactly, in two streaming passes over the data.

    Pass 1 finds each crop's log normaliser; pass 2 turns the crop posteriors into per-pixel weights
    a_i[p] = (1/#crops covering p) sum_{k covers p} w_ik and sums a_i[p] x_i[p]. Distances use direct
    differences (never the float32 norm expansion). `on_weights(start, a)` sees a [B, n, H, W] for the
    images start..start+n (attribution). `coverage` replaces the crop set's own (a part of a larger crop
    set, e.g. one process's rows of crop locations, is divided by the whole set's coverage).
    """
    b, _, h, w = z.shape
    zc = z.to(dtype)
    inv2t2 = (1 / (2 * _t_column(t, b, torch.float64) ** 2)).to(dtype).to(z.device).reshape(b, 1, 1)
    chunk = chunk or chunk_size(b, h * w * max(z.shape[1], len(crops) // (h * w) + 1))

    def crop_logits(x):
        return -crop_sq_dists(zc, x[None], crops) * inv2t2

    # pass 1: log normaliser of every crop's posterior, [B, K]
    sm = OnlineSoftmax(dim=1)
    for _, x in data.chunks(chunk, dtype):
        sm.update(crop_logits(x))
    # pass 2: normalised crop weights -> per-pixel weights -> weighted sum of training pixels.
    # Weights are exp(l - max) / Z, not exp(l - logsumexp): l and max are both huge at small t, but their
    # difference is exact for near-ties, while a float32 logsumexp carries ~1e-3 rounding into every weight.
    inv_cov = (1 / (crops.coverage if coverage is None else coverage)).to(dtype).to(z.device)
    out = torch.zeros(b, z.shape[1], h * w, dtype=torch.float64, device=z.device)
    for start, x in data.chunks(chunk, dtype):
        wk = torch.exp(crop_logits(x) - sm.m[:, None]) / sm.z[:, None]
        a = crops.uncrop(wk) * inv_cov
        if on_weights is not None:
            on_weights(start, a)
        # per channel multiply-and-reduce: measured 20-300x faster than einsum/bmm here, whose
        # [HW] batches of tiny (B x n) @ (n x C) products are dominated by overhead
        a = a.flatten(2)
        out += torch.stack([(a * x[:, c].flatten(1)).sum(1) for c in range(x.shape[1])], 1).to(torch.float64)
    return out.reshape(z.shape).to(z.dtype)
