"""PSPC-Square with retrieval (DESIGN.md section 2): top-k candidates from an index bundle, rescored
exactly from the uint8 store by the exact kernel (`posterior.patch_posterior`), plus an optional
uniform tail sample (Niedoba et al. 2024).

Per s and anchor block (stride x stride locations sharing one union-window index), all at once:
  1. one FAISS search of the block's window gives k candidate ids per query (`RetrievalPSPC.candidates`;
     excluded images are dropped from a widened search, so every candidate takes part);
  2. the candidates' windows, gathered from the uint8 store, are the keys of one kernel call with a
     group per query whose rows are the block's crop locations as masked queries (zero outside the crop;
     per-row crop norms), so one GEMM scores every location without copying each location's patches
     (`candidate_posterior`): exact logits (FAISS codes and distances never enter the softmax), each
     (location, query)'s candidate posterior mean, log normaliser and smallest logit;
  3. with tail="sample", m ids drawn uniformly (with replacement) from the included images, seeded by
     (seed, s, block) and shared by the block's locations and queries: their patches at every location
     are the keys of one kernel call with a group per location and the queries as its rows
     (`tail_posterior`), each term weighted N/m (1 when m >= N: the tail is every image, exactly) and
     excluded (log weight -inf) where the draw is one of the query's candidates: an unbiased estimate of
     the rest of each normaliser and of its weighted sum;
  4. the two states merge per (location, query) by their log normalisers (`posterior.merge`); the patch
     means are summed into the window and divided by the (global) coverage (`fold_window`). The
     per-pixel weights a_i[p] (sum one at every pixel) come from the kernel's second pass with the merged
     log normaliser, only for attribution (`attribute_block`).

Exclusion (`TrainingSet.without`): with N the included virtual images, excluded ids (and their flips) are
never candidates, and the tail draws among the included images only, so its estimator (weight N/m over
included draws) is unbiased for the included rest and exact once m >= N.

Report (`last_report[s]`, per query and location [B, gh, gw]; `block_report`): eps_bar =
(N-k) e^{l_k} / (Z_k + (N-k) e^{l_k}) from the top-k part (l_k: the smallest candidate logit). It bounds
the neglected mass only if the k are the true k nearest of that location; that holds for a flat index
with stride 1 ("certified": True). With union windows (stride > 1), sq8 or PQ codes, or IVF with
nprobe < nlist, the candidates are the nearest by another distance, so eps_bar is an estimate, not a
certificate. With tail="sample", rel_se is the estimated relative standard error of the normaliser
estimate (sample variance of the m per-draw estimates; 0 when m >= N); log_z is the log of the
normaliser used (log sum of e^{-d/2t^2}).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .denoisers import PSPCSquare
from .distributed import all_reduce_sum, split_range
from .errors import UserError
from .geometry import SquareCrops
from .index import Bundle, blocks, window_u8
from .posterior import CHUNK_ELEMENTS, KEYS_PER_TILE, KeyChunk, merge, patch_posterior, unfold_u8
from .schedule import Schedule
from .store import TrainingSet

TOL_GROWTH = (1, 4, 16)  # --tol: k and m multipliers tried before the exact fallback


def isin_rows(ids: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """[B, m] bool: probe[j] is among ids[b] (ids [B, k], probe [m]), by sorting and binary search."""
    srt = ids.sort(1).values
    pos = torch.searchsorted(srt, probe.expand(len(ids), -1).contiguous()).clamp(max=ids.shape[1] - 1)
    return srt.gather(1, pos) == probe[None]


def crop_norms(u: torch.Tensor, s: int) -> torch.Tensor:
    """||x_C||^2 (x = u / 127.5 - 1) of every s x s crop C of uint8 windows u [n, C, wh, ww] -> float64
    [P, n], locations row-major by corner. One GEMM of the crops' 0/1 masks with the per-pixel integer
    squares (2u - 255)^2: exact (integer partial sums below 2^24 in float32, else float64), and 2-3x
    faster on gathered windows than prefix sums (`posterior.crop_sq_norms`, used for the whole store)."""
    c, wh, ww = u.shape[1:]
    dt = torch.float32 if c * s * s * 255 ** 2 < 2 ** 24 else torch.float64
    squares = ((torch.arange(256, device=u.device, dtype=torch.float64) * 2 - 255) ** 2).to(dt)
    mask = SquareCrops(wh, ww, s).masks()[:, None].expand(-1, c, -1, -1).flatten(1).to(u.device, dt)  # [P, D]
    return (mask @ squares[u.flatten(1).int()].T).to(torch.float64) / 255.0 ** 2


def crop_keys(data: TrainingSet, ids: torch.Tensor, win: tuple[int, int, int, int], s: int):
    """Patches of the virtual images ids [n] at every s x s location of the window win: (u8 uint8
    [P, n, C*s*s], sq float64 [P, n] = ||x||^2), locations row-major as in `posterior.unfold_u8`."""
    u = window_u8(data, ids, win)  # [n, C, wh, ww]
    return unfold_u8(u, s, s), crop_norms(u, s)


def window_keys(data: TrainingSet, ids: torch.Tensor, win: tuple[int, int, int, int], s: int):
    """Whole windows of the virtual images ids [B, k], for masked queries: (u8 uint8 [B, k, C*wh*ww],
    sq float64 [B, P, k] = ||x_C||^2 at every s x s location C of the window)."""
    u = window_u8(data, ids.flatten(), win)  # [B*k, C, wh, ww]
    b, k = ids.shape
    return u.view(b, k, -1), crop_norms(u, s).view(-1, b, k).transpose(0, 1)


def candidate_posterior(q: torch.Tensor, t: torch.Tensor, keys, log_w: torch.Tensor | None, dtype, lse=None,
                        on_weights=None):
    """Exact posterior over each query's own candidates: one kernel group per query, its rows the block's
    crop locations as masked queries (zero outside the crop), its keys the candidates' whole windows
    (one GEMM with P rows per query, and no per-location copy of the candidates' patches).

    q [B, P, D] float64 masked window queries (D = C*wh*ww); t [B] float64; keys (u8 [B, k, D],
    sq [B, P, k]) from `window_keys`; log_w [B, k] float64 (-inf: no candidate) or None. Returns (mean
    [B, P, D]: each location's patch mean on its crop's coordinates, lse [B, P], lmin [B, P]: the smallest
    candidate logit), float64. With lse [B, P] (the merged one): the second pass, on_weights(w [B, P, k])
    with the normalised weights.
    """
    b, p, _ = q.shape
    chunks = lambda: iter([(0, KeyChunk(keys[0], keys[1], log_w))])  # noqa: E731
    tg = t[:, None].expand(b, p)
    if lse is not None:
        return patch_posterior(q, tg, chunks, dtype, lse=lse, on_weights=lambda start, w: on_weights(w))
    mean, lse, lmin, _ = patch_posterior(q, tg, chunks, dtype, stats=True)
    return mean, lse, lmin


def tail_posterior(q: torch.Tensor, t: torch.Tensor, keys, log_w: torch.Tensor, n: int, dtype, lse=None,
                   on_weights=None):
    """Importance-weighted posterior over the tail draws, one kernel group per location, the queries its rows.

    q [P, B, d] float64; t [B] float64; keys (u8 [P, m, d], sq [P, m]) of the m draws of n included
    images; log_w [B, m] float64: 0, or -inf where the draw is one of the query's candidates. Every term
    has the importance weight n/m (1 when the draws are all n images): it enters the returned log
    normalisers, not the kernel (whose logits and weights stay exact and certified). Returns (mean
    [P, B, d], lse [P, B], lse2 [P, B]: log sum of the squared weighted terms), all float64. With lse
    [P, B] (the merged one): the second pass, on_weights(start, w [P, B, n]) for draws start..start+n.
    """
    u8, sq = keys
    lw = log_w[None]
    log_scale = math.log(n / u8.shape[1])

    def chunks():
        for i in range(0, u8.shape[1], KEYS_PER_TILE):
            yield i, KeyChunk(u8[:, i:i + KEYS_PER_TILE], sq[:, i:i + KEYS_PER_TILE], lw[..., i:i + KEYS_PER_TILE])
    if lse is not None:
        return patch_posterior(q, t, chunks, dtype, lse=lse - log_scale, on_weights=on_weights)
    mean, lse, _, lse2 = patch_posterior(q, t, chunks, dtype, stats=True)
    return mean, lse + log_scale, lse2 + 2 * log_scale


def masked_queries(q: torch.Tensor, win: tuple[int, int, int, int], s: int):
    """Query patches q [P, B, d] (float64) -> (masked window queries [B, P, D] (zero outside each location's
    crop), at_crops: window-coordinate means [B, P, D] -> patch means [P, B, d])."""
    p, b, d = q.shape
    c = d // (s * s)
    wh, ww = win[1] - win[0], win[3] - win[2]
    at = unfold_u8(torch.arange(c * wh * ww, device=q.device).view(1, c, wh, ww), s, s)[:, 0]  # [P, d] coordinates
    qm = q.new_zeros(b, p, c * wh * ww)
    qm.scatter_(2, at[None].expand(b, -1, -1), q.transpose(0, 1))
    return qm, lambda mean: mean.gather(2, at[None].expand(len(mean), -1, -1)).transpose(0, 1)


def fold_window(mean: torch.Tensor, c: int, wh: int, ww: int, s: int) -> torch.Tensor:
    """Per-location patch means [P, B, C*s*s] -> their sum over the window [B, C, wh, ww] (F.fold order)."""
    return F.fold(mean.permute(1, 2, 0), (wh, ww), (s, s)).view(mean.shape[1], c, wh, ww)


def block_report(cand, tail, lse, q, t, kv, n, m):
    """Per (location, query) report of one block, each [P, B] float64 (module docstring):
    eps_bar from the candidates' (mean, lse, lmin) `cand` and the valid candidate counts kv [B] of N = n
    included images; rel_se from the tail's (mean, lse, lse2) `tail` of m draws (None: no sampled tail);
    log_z = the merged lse [P, B] plus the row constant -||z_C||^2 / 2t^2 of the queries q [P, B, d].
    m = 0: no sampled tail, or the exact one (every included image): rel_se 0."""
    _, lse_c, lmin = cand
    log_rest = torch.log((n - kv).clamp_min(1).to(torch.float64)) + lmin
    eps_bar = torch.sigmoid(log_rest - lse_c) * (kv < n)
    rel_se = torch.zeros_like(lse)
    if tail is not None and m > 1:
        # per-draw estimates X_j = m y_j of the tail sum T = sum_j y_j: Var(T) ~ (m sum y^2 - T^2) / (m - 1)
        _, lse_t, lse2 = tail
        var = (m * torch.exp(lse2 - 2 * lse) - torch.exp(2 * (lse_t - lse))) / (m - 1)
        rel_se = var.clamp_min(0).sqrt()
    log_z = lse - (q * q).sum(2) / (2 * t.to(q) ** 2)
    return eps_bar, rel_se, log_z


class RetrievalPSPC(PSPCSquare):
    name = "pspc-square+index"

    def __init__(self, data: TrainingSet, bundle: Bundle, k: int = 1024, tail: str = "sample", m: int = 4096,
                 seed: int = 0, patch_size: int | None = None, schedule: Schedule | None = None,
                 tol: float | None = None, nprobe: int | None = None, dtype: torch.dtype | None = None):
        super().__init__(data, patch_size=patch_size, schedule=schedule, dtype=dtype)
        if tail not in ("sample", "none"):
            raise UserError(f"--tail must be 'sample' or 'none', got {tail!r}")
        if k < 1 or m < 1 or (nprobe is not None and nprobe < 1):
            raise UserError(f"k, m and nprobe must be >= 1, got k={k}, m={m}, nprobe={nprobe}")
        if list(bundle.manifest["shape"][1:]) != list(data.shape) or bundle.xflip != data.xflip:
            raise UserError(f"{bundle.path}: built for {bundle.manifest['shape']} with xflip={bundle.xflip}, "
                            f"the training set is {[data.n_stored, *data.shape]} with xflip={data.xflip}")
        self.bundle, self.k, self.tail, self.m, self.seed, self.tol = bundle, k, tail, m, seed, tol
        self.nprobe = nprobe
        self.certified = bundle.kind == "flat" and bundle.stride == 1
        self.last_report: dict[int, dict] = {}
        self._tail_ids: dict[tuple, torch.Tensor] = {}
        # excluded virtual images (flips share their original's flag) and the included ids, in order
        lw = data.log_weights(virtual=True)
        self.excluded = None if lw is None else torch.isinf(lw).cpu()
        self.included = torch.arange(len(data)) if lw is None else (~self.excluded).nonzero().flatten()

    def denoise(self, z, t):
        self.last_report = {}
        return super().denoise(z, t)

    def error(self, rep: dict) -> float:
        """What --tol is compared with: the largest eps_bar (tail none) or tail relative SE (sample)."""
        return float((rep["eps_bar"] if self.tail == "none" else rep["rel_se"]).max())

    def patch_mean(self, z, t, s, on_weights=None):
        h, w = self.data.shape[1:]
        if s >= max(h, w) or s not in self.bundle.patch_sizes:
            self.last_report[s] = {"path": "exact" if s >= max(h, w) else "exact (s not in bundle)"}
            return super().patch_mean(z, t, s, on_weights)
        # --tol: grow k and m until the reported error is below it, else the exact composite. The weights
        # callback sees only the accepted evaluation (replayed: retrieval is deterministic).
        growth = TOL_GROWTH if self.tol is not None else (1,)
        for g in growth:
            k, m = self.k * g, self.m * g
            out, rep = self.retrieve(z, t, s, k, m, None if self.tol is not None else on_weights)
            if self.tol is None or self.error(rep) <= self.tol:
                if self.tol is not None and on_weights is not None:
                    self.retrieve(z, t, s, k, m, on_weights)
                self.last_report[s] = rep
                return out
        self.last_report[s] = {"path": f"exact (fallback: error {self.error(rep):.3g} > tol at k={k}, m={m})"}
        return super().patch_mean(z, t, s, on_weights)

    def tail_ids(self, s: int, by: int, bx: int, m: int) -> torch.Tensor:
        """The block's m uniform draws among the included images [m] (all of them, once each, when
        m >= N), seeded by (seed, s, block): the same for every query."""
        key = (s, by, bx, m)
        if key not in self._tail_ids:
            state = np.random.SeedSequence([self.seed, s, by, bx]).generate_state(2)
            g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            n = len(self.included)
            ids = self.included if m >= n else self.included[torch.randint(0, n, (m,), generator=g)]
            self._tail_ids[key] = ids.to(self.device)
        return self._tail_ids[key]

    def candidates(self, zw: torch.Tensor, s: int, by: int, bx: int, k: int) -> torch.Tensor:
        """Candidate ids [B, k] (int64, nearest first by the index's distance, -1 where the index returned
        none) of window queries zw [B, C*wh*ww]: included images only. With exclusions the search asks for
        k + (excluded count) and keeps each row's first k included ids (an IVF search then probes wider)."""
        if self.excluded is None:
            return self.bundle.search(s, by, bx, zw, k, self.nprobe)
        ids = self.bundle.search(s, by, bx, zw, min(k + int(self.excluded.sum()), len(self.data)), self.nprobe)
        drop = (ids < 0) | self.excluded[ids.clamp_min(0)]
        first = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]
        return ids.gather(1, first).masked_fill(drop.gather(1, first), -1)

    def retrieve(self, z, t, s, k, m, on_weights=None):
        """Composite of patch size s from the bundle -> (output [B, C, H, W] z.dtype, report dict).
        z [B, C, H, W] in [-1, 1]; t [B] float64 (EDM sigma); k candidates and m tail draws per block.
        on_weights(rows, ids [r, n], a [r, n, h, w], window) sees the per-pixel weights (attribution)."""
        c, h, w = self.data.shape
        n, b, dev = len(self.included), z.shape[0], z.device
        k = min(k, n)
        tail = self.tail == "sample" and k < n
        t = t.to(torch.float64)
        inv_cov = (1 / SquareCrops(h, w, s).coverage).to(dev)
        out = torch.zeros(b, c, h, w, dtype=torch.float64, device=dev)
        gh, gw = h - s + 1, w - s + 1
        eps_bar, rel_se, log_z = (torch.zeros(b, gh, gw, dtype=torch.float64, device=dev) for _ in range(3))
        # under a location split this process takes its rows of blocks (and loads only their indices)
        rank, world = self.locations
        mine = split_range(-(-gh // self.bundle.stride), rank, world)
        for by, bx, win in blocks(h, w, s, self.bundle.stride):
            if by not in mine:
                continue
            r0, r1, c0, c1 = win
            ph, pw = r1 - r0 - s + 1, c1 - c0 - s + 1
            zw = z[:, :, r0:r1, c0:c1]
            q = unfold_u8(zw.to(torch.float64), s, s)  # [P, B, d] query patches
            # 1. candidates, and the draws of the tail
            ids = self.candidates(zw.flatten(1), s, by, bx, k).to(dev)
            tid = self.tail_ids(s, by, bx, m) if tail else None
            # 2.-3. the two exact kernel calls, merged per (location, query)
            cand, tl, mean, lse = self.block_posterior(q, t, ids, tid, win, s, n)
            # 4. patch means summed into the window, over the coverage; weights for attribution
            out[:, :, r0:r1, c0:c1] += fold_window(mean, c, r1 - r0, c1 - c0, s) * inv_cov[r0:r1, c0:c1]
            if on_weights is not None:
                self.attribute_block(q, t, ids, tid, win, s, n, lse, inv_cov[r0:r1, c0:c1], on_weights)
            rep = block_report(cand, tl, lse, q, t, (ids >= 0).sum(1), n, 0 if tid is None or m >= n else len(tid))
            for dst, v in zip((eps_bar, rel_se, log_z), rep):
                dst[:, r0:r0 + ph, c0:c0 + pw] = v.T.reshape(b, ph, pw)
        if world > 1:
            for x in (out, eps_bar, rel_se, log_z):
                all_reduce_sum(x)
        rep = {"path": "retrieval", "s": s, "k": k, "tail": self.tail, "m": m, "kind": self.bundle.kind,
               "stride": self.bundle.stride, "nprobe": self.nprobe or self.bundle.manifest.get("nprobe"),
               "certified": self.certified, "eps_bar": eps_bar.cpu(), "log_z": log_z.cpu(),
               "rel_se": rel_se.cpu() if self.tail == "sample" else None}
        return out.to(z.dtype), rep

    def query_chunks(self, qm: torch.Tensor, k: int) -> list[slice]:
        """Query rows per candidate kernel call, from masked queries qm [B, P, D]: the gathered uint8
        windows [r, k, D], their crop norms [r, P, k] and the logits stay near CHUNK_ELEMENTS bytes."""
        b, p, d = qm.shape
        step = max(1, CHUNK_ELEMENTS // (k * (d + 16 * p)))
        return [slice(i, min(i + step, b)) for i in range(0, b, step)]

    def block_posterior(self, q, t, ids, tid, win, s, n):
        """One block's exact rescoring. q [P, B, d] float64 query patches, t [B], ids [B, k] candidates
        (-1: none), tid [m] tail draws or None, n included images. Returns (cand, tail, mean, lse): the
        candidates' (mean, lse, lmin) and the tail's (mean, lse, lse2) (None without a sampled tail), each
        [P, B, d] / [P, B] float64, and the merged mean [P, B, d] and log normaliser [P, B]."""
        qm, at_crops = masked_queries(q, win, s)
        parts = []
        for r in self.query_chunks(qm, ids.shape[1]):
            keys = window_keys(self.data, ids[r].clamp_min(0), win, s)
            mean, lse, lmin = candidate_posterior(qm[r], t[r], keys, self._candidate_log_w(ids[r]), self.dtype)
            parts.append((at_crops(mean), lse.T, lmin.T))
        cand = tuple(torch.cat(v, 1) for v in zip(*parts))
        if tid is None:
            return cand, None, cand[0], cand[1]
        tl = tail_posterior(q, t, crop_keys(self.data, tid, win, s), self._tail_log_w(ids, tid), n, self.dtype)
        return (cand, tl, *merge(cand[0], cand[1], tl[0], tl[1]))

    def attribute_block(self, q, t, ids, tid, win, s, n, lse, inv_cov, on_weights):
        """The kernel's second pass over both key sets with the merged lse [P, B]: on_weights(rows, ids
        [r, n], a [r, n, wh, ww], win) with per-pixel weights a_i[p] of the window (inv_cov [wh, ww] is
        1 / the global coverage there); the weights of excluded or missing candidates are 0."""
        local = SquareCrops(win[1] - win[0], win[3] - win[2], s)
        per_pixel = lambda w: local.uncrop(w.permute(1, 2, 0)) * inv_cov  # noqa: E731  [P, r, n] -> [r, n, wh, ww]
        qm, _ = masked_queries(q, win, s)
        for r in self.query_chunks(qm, ids.shape[1]):
            keys = window_keys(self.data, ids[r].clamp_min(0), win, s)
            hook = lambda w, r=r: on_weights(r, ids[r].clamp_min(0), per_pixel(w.transpose(0, 1)), win)  # noqa: E731
            candidate_posterior(qm[r], t[r], keys, self._candidate_log_w(ids[r]), self.dtype, lse[:, r].T, hook)
        if tid is not None:
            def hook(start, w):
                on_weights(slice(0, len(ids)), tid[start:start + w.shape[2]].expand(len(ids), -1), per_pixel(w), win)
            tail_posterior(q, t, crop_keys(self.data, tid, win, s), self._tail_log_w(ids, tid), n, self.dtype,
                           lse, hook)

    @staticmethod
    def _candidate_log_w(ids: torch.Tensor) -> torch.Tensor | None:
        """[B, k] float64: 0 for a candidate, -inf where the row has none (-1); None when all are there."""
        return None if bool((ids >= 0).all()) else torch.zeros(ids.shape, dtype=torch.float64,
                                                               device=ids.device).masked_fill(ids < 0, -math.inf)

    @staticmethod
    def _tail_log_w(ids: torch.Tensor, tid: torch.Tensor) -> torch.Tensor:
        """[B, m] float64 tail log weights: 0, or -inf where the draw is one of the query's candidates
        ids [B, k] (those terms are already exact)."""
        lw = torch.zeros(len(ids), len(tid), dtype=torch.float64, device=ids.device)
        return lw.masked_fill(isin_rows(ids, tid), -math.inf)
