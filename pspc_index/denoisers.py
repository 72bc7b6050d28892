"""Denoisers x-hat = D(z, t). Every one is `forward(z, t)` with z [B, C, H, W] and t a scalar or [B].

Exact: Empirical (optimal, Eq. 6-7), Gaussian, CFDM (smoothed optimal), PSPCSquare and PSPCFlex (Eq. 11),
ELS (Kamb & Ganguli's equivariant local score machine, els.py); Network wraps any torch module called as net(z, t). Retrieval variants live in retrieval.py.
"""
from __future__ import annotations

import math

import torch

from .els import els_mean
from .errors import UserError
from .geometry import MaskCrops, SquareCrops, flex_masks
from .posterior import empirical_mean, mask_composite, square_composite
from .schedule import Schedule, default_schedule
from .store import TrainingSet


def as_t(t, batch: int) -> torch.Tensor:
    """Validated noise levels as float64 [B]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    t = t.expand(batch) if t.ndim == 0 else t.reshape(-1)
    if t.numel() != batch:
        raise UserError(f"{t.numel()} noise levels for a batch of {batch}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise UserError(f"noise level t must be finite and > 0, got {t.min().item():g}")
    return t


class Denoiser:
    """Base: validates z against the training image shape and t, then calls `denoise`."""

    name = "denoiser"

    def __init__(self, data: TrainingSet):
        self.data = data

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        if z.ndim != 4 or tuple(z.shape[1:]) != self.shape:
            raise UserError(f"z has shape {list(z.shape)}, expected [B, {', '.join(map(str, self.shape))}]")
        if not torch.isfinite(z).all():
            raise UserError("z contains NaN or Inf")
        return self.denoise(z.to(self.device, torch.float32), as_t(t, z.shape[0]))

    __call__ = forward

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Empirical(Denoiser):
    """The optimal (empirical) denoiser: the posterior mean over the whole training set."""

    name = "empirical"

    def denoise(self, z, t):
        return empirical_mean(z, t, self.data)


class Gaussian(Denoiser):
    """D_G = mu + U diag(S / (S + t^2)) U^T (z - mu), from the training set's mean and covariance
    (population covariance, flips included when on); `rank` keeps the top components."""

    name = "gaussian"

    def __init__(self, data: TrainingSet, rank: int | None = None):
        super().__init__(data)
        d = data.shape[0] * data.shape[1] * data.shape[2]
        total, outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        keep = None if data.log_weights(virtual=True) is None else torch.isfinite(data.log_weights(virtual=True))
        for start, x in data.chunks(4096, torch.float64):
            x = x.flatten(1).cpu()
            if keep is not None:  # excluded images (and their flips) take no part
                x = x[keep[start:start + len(x)].cpu()]
            total += x.sum(0)
            outer += x.T @ x
        self.mu = total / data.n_included
        cov = outer / data.n_included - torch.outer(self.mu, self.mu)
        s, u = torch.linalg.eigh(cov)
        s, u = s.flip(0).clamp_min(0), u.flip(1)
        if rank is not None:
            s, u = s[:rank], u[:, :rank]
        self.s, self.u = s, u

    def denoise(self, z, t):
        zf = z.flatten(1).cpu().to(torch.float64) - self.mu
        shrink = self.s[None] / (self.s[None] + t[:, None] ** 2)
        out = self.mu + ((zf @ self.u) * shrink) @ self.u.T
        return out.reshape(z.shape).to(z)


class CFDM(Denoiser):
    """Smoothed closed-form denoiser (Scarvelis et al.): D(z, t) = E_eps[D*(z + sigma_s eps, t)], Monte
    Carlo over M draws. The M perturbations are drawn once from `seed` and shared by every query, so a
    sample's output does not depend on its batch. sigma_s is in data units ([-1, 1] pixels), fixed
    over t: the smoothing acts where the posterior is sharp (small t) and vanishes where t >> sigma_s."""

    name = "cfdm"

    def __init__(self, data: TrainingSet, sigma_s: float = 0.1, m: int = 16, seed: int = 0):
        super().__init__(data)
        g = torch.Generator().manual_seed(seed)
        self.eps = sigma_s * torch.randn(m, *data.shape, generator=g)

    def denoise(self, z, t):
        eps = self.eps.to(z.device)
        zz = (z[:, None] + eps[None]).flatten(0, 1)
        out = empirical_mean(zz, t.repeat_interleave(len(eps)), self.data)
        return out.unflatten(0, (len(z), len(eps))).mean(1)


def dense_weights_hook(on_weights, b: int, h: int, w: int):
    """The exact engine's on_weights(ids [n], a [B, n, H, W]) in the attribution form
    on_weights(rows, ids [B, n], a, window) (every query, the same virtual ids, the whole image)."""
    def hook(ids, a):
        on_weights(slice(0, b), ids.to(a.device).expand(b, -1), a, (0, h, 0, w))
    return hook


class PSPCSquare(Denoiser):
    """PSPC-Square: all valid s x s crops, s = `patch_size` or the schedule's s(t) at the nearest grid t.
    s = H is exactly the optimal denoiser (one crop, the whole image). `dtype`: the exact kernel's
    precision (None: certified logits, see posterior.py; torch.float64 for oracle checks).
    `query_exclusions` bool [B, N] (stored images): every call takes batches of B queries, and query b
    sees the set without the images query_exclusions[b] (flips with them), as over data.without(those)
    but all in one pass over the keys (counterfactuals of several exclusions: `attribution.verify_attribution`)."""

    name = "pspc-square"
    query_log_w = None

    def __init__(self, data: TrainingSet, patch_size: int | None = None, schedule: Schedule | None = None,
                 dtype: torch.dtype | None = None, query_exclusions: torch.Tensor | None = None):
        super().__init__(data)
        self.fixed, self.dtype = patch_size, dtype
        if query_exclusions is not None:
            self.exclude_per_query(query_exclusions)
        # (rank, world): this process's share of the crop locations (torchrun location split)
        self.locations = (0, 1)
        self.schedule = schedule or default_schedule(*data.shape[1:])
        if patch_size is not None:
            SquareCrops(*data.shape[1:], patch_size)  # validates the size now, not at the first call

    def exclude_per_query(self, excluded: torch.Tensor) -> "PSPCSquare":
        """From now on, query b of every call (batches of B) leaves out the stored images excluded[b]
        (bool [B, N]); see the class docstring. Returns self. ValueError for another shape."""
        ex = torch.as_tensor(excluded, dtype=torch.bool)
        if ex.ndim != 2 or ex.shape[1] != self.data.n_stored:
            raise ValueError(f"query exclusions must be [B, {self.data.n_stored}], got {list(ex.shape)}")
        self.query_log_w = torch.zeros(ex.shape, dtype=torch.float64).masked_fill(ex, -math.inf)
        return self

    def sizes(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.fixed, dtype=torch.long) if self.fixed else self.schedule.patch_size(t)

    def crop_shapes(self) -> list[tuple[int, int]]:
        """The (sh, sw) crop shapes this denoiser's calls use (full size: the whole image)."""
        h, w = self.data.shape[1:]
        sizes = [self.fixed] if self.fixed else sorted(set(self.schedule.patch_sizes))
        return [(h, w) if s >= max(h, w) else (s, s) for s in sizes]

    def denoise(self, z, t):
        out = torch.empty_like(z)
        h, w = self.data.shape[1:]
        sizes = self.sizes(t)
        qlw = self.query_log_w
        if qlw is not None and len(qlw) != len(z):
            raise ValueError(f"this denoiser excludes per query for batches of {len(qlw)}, got {len(z)} queries")
        for s in sizes.unique().tolist():
            sel = (sizes == s).nonzero().flatten().to(z.device)
            per_query = {} if qlw is None else {"log_w": qlw[sel.cpu()]}
            out[sel] = self.patch_mean(z[sel], t[sel.cpu()], int(s), **per_query)
        return out

    def patch_mean(self, z, t, s, on_weights=None, log_w=None, on_shares=None, weight_ids=None):
        """The composite of patch size s (s >= max(H, W): the one full-image crop, i.e. D*).
        on_weights(rows, ids [r, n], a [r, n, H, W], window) sees the per-pixel weights a_i[p] of the
        images ids (attribution; the retrieval path calls it sparsely). on_shares(ids [n], a [r, n]): only
        the shares of the virtual images ids (`square_composite`; the exact path only). weight_ids (stored
        ids [m]): report only these images' weights, at the cost of a pass over their keys. log_w
        [r, N]: per-query log weights of the stored images (`query_exclusions`)."""
        h, w = self.data.shape[1:]
        sh, sw = (h, w) if s >= max(h, w) else (s, s)
        hook = None if on_weights is None else dense_weights_hook(on_weights, len(z), h, w)
        rank, world = self.locations
        if world == 1 or sh == h:
            return square_composite(z, t, self.data, sh, sw, on_weights=hook, log_w=log_w, dtype=self.dtype,
                                    on_shares=on_shares, weight_ids=weight_ids)
        # this process's rows of crop locations; the parts (each over the whole set's coverage) sum to the whole
        from .distributed import all_reduce_sum, split_range

        mine = split_range(h - sh + 1, rank, world)
        out = (square_composite(z, t, self.data, sh, sw, rows=(mine.start, mine.stop), on_weights=hook,
                                log_w=log_w, dtype=self.dtype, on_shares=on_shares, weight_ids=weight_ids)
               if len(mine) else torch.zeros_like(z))
        return all_reduce_sum(out)


class PSPCFlex(Denoiser):
    """PSPC-Flex: one crop per output pixel, the pixels holding a fraction lambda(t) of its gradient
    heatmap (Eq. 12). `heatmaps` [L, H, W, H, W] at noise levels `heatmap_ts`; a query uses the heatmap
    at the nearest heatmap t and lambda(t) from the schedule (lambda = 1 is the optimal denoiser)."""

    name = "pspc-flex"

    def __init__(self, data: TrainingSet, heatmaps: torch.Tensor, heatmap_ts: torch.Tensor,
                 schedule: Schedule | None = None, lam: float | None = None):
        super().__init__(data)
        h, w = data.shape[1:]
        if tuple(heatmaps.shape[1:]) != (h, w, h, w) or len(heatmaps) != len(heatmap_ts):
            raise UserError(f"heatmaps of shape {list(heatmaps.shape)} do not fit {h}x{w} images")
        self.heatmaps, self.heatmap_ts = heatmaps, torch.as_tensor(heatmap_ts, dtype=torch.float64)
        self.schedule = schedule or default_schedule(h, w)
        self.fixed_lam = lam
        self._cache: dict[tuple[int, float], MaskCrops] = {}

    def lams(self, t):
        return torch.full_like(t, self.fixed_lam) if self.fixed_lam is not None else self.schedule.lam(t)

    def crops(self, t: float, lam: float) -> MaskCrops:
        j = int((self.heatmap_ts - t).abs().argmin())
        if (j, lam) not in self._cache:
            self._cache[(j, lam)] = MaskCrops(flex_masks(self.heatmaps[j], lam))
        return self._cache[(j, lam)]

    def denoise(self, z, t):
        out = torch.empty_like(z)
        lams = self.lams(t)
        j = (self.heatmap_ts[None] - t[:, None]).abs().argmin(1)
        for key in torch.stack([j.to(torch.float64), lams], 1).unique(dim=0):
            sel = ((j == key[0]) & (lams == key[1])).nonzero().flatten()
            lam, tj = float(key[1]), float(self.heatmap_ts[int(key[0])])
            zs, ts = z[sel.to(z.device)], t[sel]
            out[sel.to(z.device)] = (empirical_mean(zs, ts, self.data) if lam >= 1
                                     else mask_composite(zs, ts, self.data, self.crops(tj, lam).masks()))
        return out


class ELS(Denoiser):
    """Kamb & Ganguli's (ICML 2025) equivariant local score machine: each pixel the centre of its k x k
    window's posterior mean over the training patches pooled from every location (els.py; boundary "broken":
    their boundary-broken ELS, for zero-padded networks, or "circular"). k = `k`, else the schedule's k(t)
    at the nearest grid t; in the broken form k >= 2 max(H, W) - 1 is the optimal denoiser over the pool.
    max_images: pool only a seeded random subset of that many stored images (`keep`, sorted; flips follow),
    since a call costs ~ B N (H-k+1)^2 (W-k+1)^2 k^2 multiply-adds (README: measured cost)."""

    name = "els"

    def __init__(self, data: TrainingSet, k: int | None = None, schedule: Schedule | None = None,
                 boundary: str = "broken", max_images: int | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__(data)
        if k is not None and (k < 1 or k % 2 == 0):
            raise UserError(f"ELS needs an odd window size k >= 1, got {k}")
        self.fixed, self.boundary, self.dtype = k, boundary, dtype
        self.schedule = schedule or default_schedule(*data.shape[1:])
        if max_images is not None and max_images < data.n_stored:
            self.keep = torch.randperm(data.n_stored, generator=torch.Generator().manual_seed(seed))[:max_images]
            self.keep = self.keep.sort().values
            self.pool = data.subset(self.keep)
        else:
            self.keep, self.pool = torch.arange(data.n_stored), data

    def sizes(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.fixed, dtype=torch.long) if self.fixed else self.schedule.els_size(t)

    def denoise(self, z, t):
        out = torch.empty_like(z)
        whole = 2 * max(self.shape[1:]) - 1
        sizes = self.sizes(t)
        for k in sizes.unique().tolist():
            sel = (sizes == k).nonzero().flatten()
            zs, ts = z[sel.to(z.device)], t[sel]
            out[sel.to(z.device)] = (empirical_mean(zs, ts, self.pool) if k >= whole and self.boundary == "broken"
                                     else els_mean(zs, ts, self.pool, int(k), self.boundary, self.dtype))
        return out


class Network(Denoiser):
    """Any torch module called as net(z, t) (EDM-preconditioned x-prediction) for images of `shape`."""

    name = "network"

    def __init__(self, net: torch.nn.Module, shape: tuple[int, int, int], data: TrainingSet | None = None):
        super().__init__(data)
        from .network import check_image_shape
        check_image_shape(net, shape)
        self.net, self._shape = net.eval(), tuple(shape)

    @property
    def shape(self):
        return self._shape

    @property
    def device(self):
        return next(self.net.parameters()).device

    def denoise(self, z, t):
        with torch.no_grad():
            return self.net(z, t.to(z.device, torch.float32)).to(torch.float32)
