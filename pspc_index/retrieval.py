"""PSPC-Square with retrieval (DESIGN.md section 2): top-k entries from an index bundle, rescored exactly
from the uint8 store by the exact kernel (`posterior.patch_posterior`), a certified bound on every crop
location's error, and per-location routing to the exact kernel where that bound exceeds the tolerance.

Per s and anchor block (stride x stride locations sharing one union-window index), for all queries at once
(`RetrievalPSPC.retrieve`, one named step each):
  1. search: one FAISS search of the block's window gives k candidate entries per query (an entry is the
     identical windows of several images, `index.BlockEntries`; entries none of whose members take part
     are dropped from a widened search);
  2. dedup expansion: each entry is scored once, by its representative's window, with log weight
     log(count of its members taking part) (exact: identical windows give identical patch terms at every
     location of the block);
  3. rescoring: the representatives' windows, gathered from the uint8 store, are the keys of one kernel
     call with a group per query whose rows are the block's crop locations as masked queries
     (`candidate_posterior`): exact logits (FAISS codes and distances never enter the softmax), each
     (location, query)'s candidate mean and log normaliser Z_S. With tail="sample", m ids drawn uniformly
     among the included images (seeded by seed, s, block; shared by the block's queries) are scored by a
     second call (`tail_posterior`), weight N/m, a draw that is a member of one of the query's candidate
     entries excluded (its term is already exact), and the two states merge by log normaliser;
  4. bounding (`lower_bounds`, `unscored_mass`): every image not scored lies in some cell of the block's
     index, and the stored cell bounds give, per location C, a lower bound on its squared crop distance: the triangle
     inequality with the cell's centroid and radius, the cell's per-pixel box, and, for flat indices, the
     k-th FAISS window distance less the most the rest of the window can add. With U the sum of the
     unscored images' largest possible terms, eps = U / (Z_S + U) bounds the unscored posterior mass, and
     the patch mean's error is at most 2 eps per coordinate (pixels in [-1, 1]). A valid bound, not an
     estimate (beyond the kernel's own rounding, posterior.py: <= 4e-6, 0 in float64). With a tolerance,
     every entry of the cells whose unscored images could still hold more than tol / 4L of the scored
     mass at some location is scored too (`complete`, up to COMPLETE_FACTOR k entries per query), after
     which the cells left hold at most tol / 4 of it;
     3c. the tail (tail="sample", for loose tolerances): the merged mean's error is bounded by an
     empirical-Bernstein confidence bound (`tail_bound`: Maurer & Pontil 2009, the draws' range from the
     cell bounds), which fails with probability <= delta per location and query: not certified. Without a
     tolerance the merged mean is used everywhere (bound: the smaller of that and its certified bound, 2 eps
     plus what the tail moved the mean); with one, only where the candidates' certified bound exceeds tol
     and the confidence bound meets it; where neither does, the location is routed (tail_unmet). A tail of
     every included image (m >= N) is exact: bound 0, certified;
  5. routing: with a tolerance, locations whose bound exceeds it are recomputed by the exact kernel over
     the whole training set, all of a patch size's routed (location, query) pairs in one batched call
     (`exact_pairs`); the composite's error at a pixel is the mean of its covering crops' errors, so every
     pixel's certified error is <= tol. Before searching, a predictor (`diffuse`) sends queries whose
     posterior is predictably too diffuse for k entries (the bundle's median squared distance Delta_k from a
     training crop to its k-th nearest distinct crop: predicted unscored mass N e^(-Delta_k / 2t^2) / (1 +
     N e^(-Delta_k / 2t^2)), doubled, above tol) to the exact kernel without searching.
Projection cells (projection.py) replace steps 1-4 where crops are small (s <= projection.MAX_SIZE: 3x3 grey
or RGB) and a tol is set, on the CPU and without attribution (`RetrievalPSPC.project`): per crop
location k-d cells of its distinct crops in a 3-dimensional PCA projection bound each crop's distances
tightly enough to certify peaked posteriors, which cells fitted to union windows cannot; their pairs that
stop uncertified are routed by step 5 like any other location.
The patch means are summed into the window and divided by the (global) coverage (`fold_window`). The
per-pixel weights a_i[p] (sum one at every pixel) come from the kernel's second pass with the merged log
normaliser, only for attribution (`attribute_block`); an entry's weight is spread equally over its members
taking part, as the exact path gives each identical member.

Exclusion (`TrainingSet.without`): with N the included virtual images, excluded members never count, an
entry without included members is never a candidate, and the tail draws among the included images only.

Report (`last_report[s]` of the last call, and the SUMMARY keys per call in `history`): per query and
location [B, gh, gw]: eps_bar (the certified unscored mass fraction), bound (the retrieval result's error
bound per coordinate, before routing), routed (recomputed exactly, skipped queries included), via_tail
(the bound is the tail's confidence bound), tail_bound (that bound wherever the tail was drawn; None
without a tail), rel_se (the tail normaliser's estimated relative standard error; 0 when m >= N; None
without a tail) and log_z (log of the normaliser used); per pixel [B, H, W]: pixel_bound (the composite's
error bound after routing: the mean of its covering crops' bounds); per call: fractions of locations that
took each path (retrieval: certified, tail, exact, skipped), bound_max, certified (no bound rests on the
tail), confidence (1, or 1 - delta per location where one does), tail_unmet (the fraction of locations
routed because the tail's bound exceeded tol) and note (a line saying so, else None); per size: certificate
("index cells", "projection cells", None where every query skipped the search) and cells_seconds (seconds
this call spent building projection cells: the size's first call; 0 after; None without them).
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
from .index import RANKS, Bundle, blocks, crop_mask, window_u8
from .projection import MAX_SIZE, SCORE_CAP, build_cells, projection_posterior
from .posterior import (CHUNK_ELEMENTS, COMPILED, KEYS_PER_TILE, KeyChunk, keys_per_chunk, logit_dtype, merge,
                        patch_posterior, square_patches, stored_key_chunks, unfold_u8)
from .schedule import Schedule
from .store import TrainingSet

DEFAULT_TOL = 1e-3  # certified composite error per pixel the CLI's routing aims at (issue 11)
EXACT_KEY_BYTES = 2 ** 28  # bytes of gathered stored patches per exact_pairs kernel call
MEMBERS_PER_CALL = 16384  # members per attribution callback when an entry's weight is spread
TAIL_DELTA = 1e-3  # the tail's confidence bound fails with at most this probability per location and query
SUMMARY = ("fractions", "bound_max", "certified", "confidence", "tail_unmet", "note", "certificate",
           "cells_seconds")  # per call, in `history`
COMPLETE_FACTOR = 4  # a query completes cells (step 3b) only up to this many times k entries per block


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
    [B, P, D]: each location's patch mean on its crop's coordinates, lse [B, P]), float64. With lse [B, P]
    (the merged one): the second pass, on_weights(w [B, P, k]) with the normalised weights.
    """
    b, p, _ = q.shape
    chunks = lambda: iter([(0, KeyChunk(keys[0], keys[1], log_w))])  # noqa: E731
    tg = t[:, None].expand(b, p)
    if lse is not None:
        return patch_posterior(q, tg, chunks, dtype, lse=lse, on_weights=lambda start, w: on_weights(w))
    return patch_posterior(q, tg, chunks, dtype)


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


def lower_bounds(zw: torch.Tensor, s: int, win: tuple[int, int, int, int], c: int, cells,
                 kth: torch.Tensor | None = None) -> torch.Tensor:
    """Certified lower bounds [B, P, L] float64 on the squared crop distance ||z_C - x_C||^2 of every entry x
    of each cell L at each crop location C of a block (x, z in [-1, 1] units).

    zw [B, D] float64 window queries (D = C*wh*ww); cells: (centroids [L, D], radius [L, P], lo [L, D],
    hi [L, D]) float64 (`Block`); kth [B] float64 or None: a lower bound on the squared window distance of
    every entry not scored (flat indices), which then holds only for those. The largest of: the triangle
    bound (||z_C - mu_C|| - r_C)^2; the box bound sum_{p in C} dist(z_p, [lo_p, hi_p])^2; kth less the most
    the window outside C can add, sum_{p not in C} max((z_p - lo_p)^2, (z_p - hi_p)^2). Every term is
    computed in float64 and lowered by a 1e-12 relative slack for its rounding.
    """
    mu, radius, lo, hi = cells
    mask = crop_mask(c, win[1] - win[0], win[3] - win[2], s).to(zw.device)  # [P, D]
    zz = (zw * zw) @ mask.T  # [B, P]
    # 1. triangle: ||z_C - mu_C||^2 = ||z_C||^2 - 2 z_C . mu_C + ||mu_C||^2, less its rounding slack
    mm = ((mu * mu) @ mask.T).T[None]  # [1, P, L]
    d2 = zz[..., None] - 2 * (zw[:, None, :] * mask[None]) @ mu.T + mm  # [B, P, L]
    d2 = (d2 - 1e-12 * (zz[..., None] + mm + 1)).clamp_min(0)
    low = (d2.sqrt() - radius.T[None]).clamp_min(0) ** 2
    # 2. box: each pixel's distance to the cell's range, summed over the crop (a few queries at a time)
    step = max(1, CHUNK_ELEMENTS // (8 * lo.numel()))
    for i in range(0, len(zw), step):
        zc = zw[i:i + step, None]
        gap = (lo[None] - zc).clamp_min(0) + (zc - hi[None]).clamp_min(0)  # [b, L, D]
        low[i:i + step] = torch.maximum(low[i:i + step], ((gap * gap) @ mask.T).transpose(1, 2) * (1 - 1e-12))
    # 3. flat: the window distance is >= kth, of which the rest of the window takes at most its farthest corner
    if kth is not None:
        far = torch.maximum((zw[:, None] - lo[None]) ** 2, (zw[:, None] - hi[None]) ** 2).amax(1)  # [B, D]
        rest = far @ (1 - mask).T  # [B, P]
        low = torch.maximum(low, (kth[:, None] - rest - 1e-12 * (kth[:, None] + rest + 1)).clamp_min(0)[..., None])
    return low


def unscored_mass(low: torch.Tensor, unscored: torch.Tensor, log_zs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Certified bound eps [P, B] float64 on the posterior mass fraction of the images not scored.

    low [B, P, L] from `lower_bounds`; unscored [B, L] float64: images taking part but not scored, per cell;
    log_zs [P, B]: log of the scored normaliser, log sum_scored count e^(-||z_C - x_C||^2 / 2t^2); t [B]
    (EDM sigma). With U = sum over cells of unscored e^(-low / 2t^2) >= the unscored normaliser,
    eps = U / (Z_S + U) (increasing in U, so >= the true fraction)."""
    log_u = torch.logsumexp(torch.log(unscored.clamp_min(0))[:, None, :] - low / (2 * t[:, None, None] ** 2), 2).T
    return torch.where(log_u == -math.inf, torch.zeros_like(log_u), torch.sigmoid(log_u - log_zs))


def empirical_bernstein(var: torch.Tensor, width, m: int, log_term: float) -> torch.Tensor:
    """Half-width of a two-sided confidence interval for E[X] from m >= 2 iid draws of X in an interval of
    `width`, with sample variance var (or any upper bound on it): sqrt(2 var L / m) + 7 width L / (3 (m - 1)),
    L = log_term = ln(4 / delta) for level 1 - delta (Maurer & Pontil 2009, Theorem 4, each side at delta / 2)."""
    return (2 * var * log_term / m).sqrt() + 7 * width * log_term / (3 * (m - 1))


def tail_bound(mu_s: torch.Tensor, lse_s: torch.Tensor, tail, merged: torch.Tensor, m: int, n: int, low: torch.Tensor,
               unscored: torch.Tensor, log_zs: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Confidence bound [P, B] float64 on the error per coordinate of the tail-merged patch mean merged
    [P, B, d]: with probability >= 1 - delta over the m uniform draws (per location and query), no
    coordinate is off the exact mean by more.

    mu_s [P, B, d], lse_s [P, B]: the candidates' mean and kernel log normaliser; tail (mean, lse, lse2)
    from `tail_posterior` over m iid uniform draws among n images; low [B, P, L], unscored [B, L], log_zs
    [P, B], eps [P, B] as in `unscored_mass`; t [B] (EDM sigma). Per draw j, Y_j = n w_j / Z_S (0 for a
    candidate) has mean z = Z_U / Z_S and lies in [0, R], R = n max_unscored w / Z_S from the cells' lower
    bounds; X_j = Y_j x_jp has mean a_p = A_U,p / Z_S, range 2R and sample variance <= sum Y^2 / (m - 1).
    Empirical-Bernstein intervals (`empirical_bernstein`, delta / (d + 1) each: z and every coordinate's
    a_p) meet the certified z <= eps / (1 - eps) and |a_p| <= z; the exact mean (mu_s + a_p) / (1 + z),
    monotone in both, is bracketed at the box's corners. Not certified: valid at the stated rate."""
    mean_t, lse_t, lse2 = tail
    log_term = math.log(4 * (mu_s.shape[-1] + 1) / delta)
    # 1. the draws' moments relative to Z_S: mean of Y (z_hat), sum of Y^2
    z_hat = torch.exp(lse_t - lse_s)
    sum_sq = m * m * torch.exp(lse2 - 2 * lse_s)
    # 2. R from the largest term any unscored image can have, then the two half-widths
    top = torch.where(unscored[:, None, :] > 0, -low / (2 * t[:, None, None] ** 2), -math.inf).amax(2).T
    r = torch.exp(math.log(n) + top - log_zs)
    h_z = empirical_bernstein(((sum_sq - m * z_hat ** 2) / (m - 1)).clamp_min(0), r, m, log_term)
    h_a = empirical_bernstein(sum_sq / (m - 1), 2 * r, m, log_term)[..., None]
    # 3. the intervals, cut by the certified limits
    z_hi = torch.minimum(z_hat + h_z, eps / (1 - eps) * (1 + 1e-12))
    z_lo = torch.minimum((z_hat - h_z).clamp_min(0), z_hi)
    a_hat = torch.where(z_hat[..., None] > 0, z_hat[..., None] * mean_t, 0)
    a_hi = torch.minimum(a_hat + h_a, z_hi[..., None])
    a_lo = torch.minimum(torch.maximum(a_hat - h_a, -z_hi[..., None]), a_hi)
    # 4. the exact mean's range over the box, against the merged mean
    up, dn = mu_s + a_hi, mu_s + a_lo
    f_max = up / (1 + torch.where(up >= 0, z_lo[..., None], z_hi[..., None]))
    f_min = dn / (1 + torch.where(dn >= 0, z_hi[..., None], z_lo[..., None]))
    bound = torch.maximum(f_max.clamp(max=1) - merged, merged - f_min.clamp(min=-1)).amax(2).clamp_min(0)
    return torch.nan_to_num(bound, nan=math.inf)


def tail_rel_se(tail, lse: torch.Tensor, m: int) -> torch.Tensor:
    """Estimated relative standard error [P, B] of the merged normaliser (log lse [P, B]) from the tail's
    (mean, lse, lse2) of m uniform draws: per-draw estimates X_j = m y_j of the tail sum T = sum_j y_j,
    Var(T) ~ (m sum y^2 - T^2) / (m - 1)."""
    _, lse_t, lse2 = tail
    var = (m * torch.exp(lse2 - 2 * lse) - torch.exp(2 * (lse_t - lse))) / (m - 1)
    return var.clamp_min(0).sqrt()


def routing_summary(history: list[dict]) -> list[dict]:
    """`RetrievalPSPC.history` merged per step (s, t_min, t_max), in order of first call (a sampler's
    batches are one step): queries summed; the fractions of locations per path and tail_unmet averaged
    weighted by queries; bound_max the largest; certified only if every call was; confidence the lowest;
    note and certificate the last given; cells_seconds summed."""
    steps: dict[tuple, dict] = {}
    for h in history:
        key = (h["s"], h["t_min"], h["t_max"])
        if key not in steps:
            steps[key] = {**h, "fractions": dict(h["fractions"])}
            continue
        st, n = steps[key], steps[key]["queries"] + h["queries"]
        mix = lambda a, b: (a * st["queries"] + b * h["queries"]) / n  # noqa: E731
        st["fractions"] = {k: mix(v, h["fractions"][k]) for k, v in st["fractions"].items()}
        st.update(tail_unmet=mix(st["tail_unmet"], h["tail_unmet"]), bound_max=max(st["bound_max"], h["bound_max"]),
                  certified=st["certified"] and h["certified"], confidence=min(st["confidence"], h["confidence"]),
                  note=h["note"] or st["note"], certificate=h["certificate"] or st["certificate"], queries=n,
                  cells_seconds=None if h["cells_seconds"] is None and st["cells_seconds"] is None
                  else (h["cells_seconds"] or 0.0) + (st["cells_seconds"] or 0.0))
    return list(steps.values())


class Block:
    """One block's entries as retrieval uses them, on `device`, with the training set's exclusions:
    reps [E] (representative virtual ids), counts [E], incl [E] (members taking part), members, offsets,
    cell [E], incl_cell [L] float64, by_cell (the entries taking part per cell) and cell_entries [L] (their
    number), cells (centroids, radius, lo, hi) float64 in [-1, 1] units (see `lower_bounds`), log_w_max
    (the largest log count), kind (the block's index kind); entry_of [Nv] (virtual id -> entry) on first use."""

    def __init__(self, bundle: Bundle, s: int, by: int, bx: int, excluded: torch.Tensor | None, device):
        e = bundle.entries(s, by, bx)
        self._entries = e
        self.kind = bundle.file_kind(s, by, bx)
        self.members = torch.from_numpy(e.members.astype(np.int64))
        self.offsets = torch.from_numpy(e.offsets)
        self.counts = torch.from_numpy(e.counts)
        self.reps = torch.from_numpy(e.reps.astype(np.int64)).to(device)
        # members taking part per entry: all of them, or those the training set does not exclude
        self.incl = self.counts if excluded is None else torch.from_numpy(
            np.add.reduceat((~excluded.numpy()[e.members]).astype(np.int64), e.offsets[:-1]))
        self.alive = int((self.incl > 0).sum())
        self.cell = torch.from_numpy(e.cell.astype(np.int64))
        self.incl_cell = torch.zeros(len(e.centroids), dtype=torch.float64).index_add_(0, self.cell, self.incl.double())
        self.log_w_max = math.log(int(self.incl.max()))
        # the entries taking part in each cell, and their number
        alive = (self.incl > 0).nonzero().flatten()
        self.by_cell = [alive[self.cell[alive] == j] for j in range(len(e.centroids))]
        self.cell_entries = torch.tensor([len(v) for v in self.by_cell])
        px = lambda u: torch.from_numpy(u).to(device, torch.float64) / 127.5 - 1  # noqa: E731
        self.cells = (torch.from_numpy(e.centroids).to(device, torch.float64), torch.from_numpy(e.radius).to(device),
                      px(e.lo), px(e.hi))
        self._entry_of = None

    @property
    def entry_of(self) -> torch.Tensor:
        if self._entry_of is None:
            self._entry_of = torch.from_numpy(self._entries.entry_of())
        return self._entry_of


def rows_hook(on_weights, idx: torch.Tensor):
    """on_weights for a sub-batch z[idx]: its rows mapped back to the batch's (None stays None)."""
    if on_weights is None:
        return None
    return lambda rows, ids, a, win: on_weights(idx[rows], ids, a, win)


class RetrievalPSPC(PSPCSquare):
    """PSPC-Square from an index bundle, certified per location (module docstring). tol: None reports the
    bounds and routes nothing; a value routes every location whose certified error exceeds it to the exact
    kernel (and lets the predictor skip the search), so every composite pixel is within tol of exact.
    tail="sample" (loose tolerances only) adds m uniform draws; where the output rests on them its bound is
    an empirical-Bernstein confidence bound that fails with probability <= delta per location and query
    (`tail_bound`), and a location whose tail cannot meet tol is routed (report: tail_unmet).
    predict=False turns the skip predictor off (`diffuse`): every query searches, to measure what the
    certificate achieves where the predictor would have skipped."""

    name = "pspc-square+index"

    def __init__(self, data: TrainingSet, bundle: Bundle, k: int = 1024, tail: str = "none", m: int = 4096,
                 seed: int = 0, patch_size: int | None = None, schedule: Schedule | None = None,
                 tol: float | None = None, nprobe: int | None = None, dtype: torch.dtype | None = None,
                 delta: float = TAIL_DELTA, predict: bool = True, projection: bool = True):
        super().__init__(data, patch_size=patch_size, schedule=schedule, dtype=dtype)
        if tail not in ("sample", "none"):
            raise UserError(f"--tail must be 'sample' or 'none', got {tail!r}")
        if k < 1 or m < 1 or (nprobe is not None and nprobe < 1):
            raise UserError(f"k, m and nprobe must be >= 1, got k={k}, m={m}, nprobe={nprobe}")
        if tol is not None and not tol > 0:
            raise UserError(f"--tol must be > 0, got {tol}")
        if not 0 < delta < 1:
            raise UserError(f"the tail's confidence delta must be in (0, 1), got {delta}")
        if list(bundle.manifest["shape"][1:]) != list(data.shape) or bundle.xflip != data.xflip:
            raise UserError(f"{bundle.path}: built for {bundle.manifest['shape']} with xflip={bundle.xflip}, "
                            f"the training set is {[data.n_stored, *data.shape]} with xflip={data.xflip}")
        self.bundle, self.k, self.tail, self.m, self.seed, self.tol = bundle, k, tail, m, seed, tol
        self.nprobe, self.delta, self.predict, self.projection = nprobe, delta, predict, projection
        self._cells: dict = {}
        self._built: dict = {}  # seconds spent building projection cells in the current call, per size
        self.last_report: dict[int, dict] = {}
        self.history: list[dict] = []
        self._tail_ids: dict[tuple, torch.Tensor] = {}
        self._blocks: dict[tuple, Block] = {}
        # excluded virtual images (flips share their original's flag) and the included ids, in order
        lw = data.log_weights(virtual=True)
        self.excluded = None if lw is None else torch.isinf(lw).cpu()
        self.included = torch.arange(len(data)) if lw is None else (~self.excluded).nonzero().flatten()

    def denoise(self, z, t):
        self.last_report = {}
        return super().denoise(z, t)

    def patch_mean(self, z, t, s, on_weights=None):
        h, w = self.data.shape[1:]
        if s >= max(h, w) or s not in self.bundle.patch_sizes:
            self.last_report[s] = {"path": "exact" if s >= max(h, w) else "exact (s not in bundle)"}
            if s < max(h, w):  # a size the bundle lacks runs exact: the routing report says so
                self.history.append({"s": s, "t_min": float(t.min()), "t_max": float(t.max()), "queries": len(t),
                                     "fractions": {"retrieval": 0.0, "tail": 0.0, "exact": 1.0, "skipped": 0.0},
                                     "bound_max": 0.0, "certified": True, "confidence": 1.0, "tail_unmet": 0.0,
                                     "note": f"size {s} is not in the bundle: exact", "certificate": None,
                                     "cells_seconds": None})
            return super().patch_mean(z, t, s, on_weights)
        t = t.to(torch.float64)
        projects = self.projects(s, on_weights)
        skip = self.diffuse(t, s, int(SCORE_CAP * len(self.included)) if projects else self.k)
        out, rep = torch.empty_like(z), None
        keep = (~skip).nonzero().flatten()
        if len(keep):
            kd = keep.to(z.device)
            if projects:
                out[kd], rep = self.project(z[kd], t[keep], s)
            else:
                out[kd], rep = self.retrieve(z[kd], t[keep], s, rows_hook(on_weights, keep))
        if bool(skip.any()):
            sk = skip.nonzero().flatten()
            out[sk.to(z.device)] = super().patch_mean(z[sk.to(z.device)], t[sk], s, rows_hook(on_weights, sk))
        self.last_report[s] = self.step_report(rep, skip, s, projects)
        self.history.append({"s": s, "t_min": float(t.min()), "t_max": float(t.max()), "queries": len(t),
                             **{key: self.last_report[s][key] for key in SUMMARY}})
        return out

    def projects(self, s: int, on_weights=None) -> bool:
        """Whether size s is certified by projection cells (projection.py) instead of the bundle's index:
        with a tol, crops of s <= MAX_SIZE, on the CPU with numba, and no attribution (on_weights None)."""
        return (self.projection and COMPILED and self.tol is not None and s <= MAX_SIZE and on_weights is None
                and self.device.type == "cpu")

    def diffuse(self, t: torch.Tensor, s: int, k: int | None = None) -> torch.Tensor:
        """The skip predictor: bool [B], queries (noise levels t [B]) whose size-s step runs exact without
        searching, where a routing tol is set and the bundle's neighbour statistics predict that k entries
        (default self.k; projection cells score up to SCORE_CAP N) cannot hold the posterior: 2 eps_pred > tol,
        eps_pred = N e^(-Delta / 2t^2) / (1 + N e^(-Delta / 2t^2))
        with Delta the median squared distance from a training crop to its r-th nearest distinct crop, r
        the largest recorded rank <= k (`index.neighbour_stats`; None there: no such neighbour, no skip)."""
        stats = self.bundle.manifest.get("neighbours", {}).get(str(s))
        if self.tol is None or stats is None or not self.predict:
            return torch.zeros(len(t), dtype=torch.bool)
        delta = stats[max(i for i, r in enumerate(RANKS) if r <= (k or self.k))]
        if delta is None:
            return torch.zeros(len(t), dtype=torch.bool)
        log_mass = math.log(len(self.included)) - delta / (2 * t.cpu() ** 2)
        return 2 * torch.sigmoid(log_mass) > self.tol

    def step_report(self, rep: dict | None, skip: torch.Tensor, s: int, projects: bool = False) -> dict:
        """The call's report for size s (module docstring): the retrieval report of the searched queries
        `rep` (None: none searched) with the skipped queries' rows (routed, no bound) filled in."""
        c, h, w = self.data.shape
        b, gh, gw = len(skip), h - s + 1, w - s + 1
        full = {"path": "retrieval" if rep is not None else "exact (skipped: predicted diffuse)", "s": s,
                "certificate": None if rep is None else "projection cells" if projects else "index cells",
                "k": self.k, "tail": self.tail, "m": self.m, "kind": self.bundle.kind, "stride": self.bundle.stride,
                "nprobe": self.nprobe or self.bundle.manifest.get("nprobe"), "tol": self.tol}
        keep = ~skip
        for key, fill in (("eps_bar", math.nan), ("bound", math.nan), ("routed", True), ("log_z", math.nan),
                          ("rel_se", math.nan), ("via_tail", False), ("tail_bound", math.nan),
                          ("tail_unmet", False), ("pixel_bound", 0.0)):
            shape = (b, h, w) if key == "pixel_bound" else (b, gh, gw)
            v = torch.full(shape, fill, dtype=torch.bool if isinstance(fill, bool) else torch.float64)
            if rep is not None:
                v[keep] = rep[key]
            full[key] = v
        if self.tail != "sample":
            full["rel_se"] = full["tail_bound"] = None
        routed, tail, total = full["routed"], full["via_tail"], full["routed"].numel()
        full["fractions"] = {"retrieval": float((~routed & ~tail).sum()) / total, "tail": float(tail.sum()) / total,
                             "exact": float(routed[keep].sum()) / total,
                             "skipped": float(skip.sum()) * gh * gw / total}
        full["bound_max"] = float(full["pixel_bound"].max())
        # certified: no location's bound is the tail's confidence bound (which fails with prob. <= delta)
        full["certified"] = not bool(tail.any())
        full["confidence"] = 1.0 if full["certified"] else 1 - self.delta
        full["tail_unmet"] = float(full["tail_unmet"].sum()) / total
        # projection cells are built on a size's first call (in memory, per process): their seconds
        full["cells_seconds"] = self._built.pop(s, 0.0) if projects else None
        full["note"] = (f"tail sample: its confidence bound exceeded tol {self.tol:g} at {full['tail_unmet']:.1%} "
                        "of locations, routed to the exact kernel") if full["tail_unmet"] > 0 else None
        return full

    def block(self, s: int, by: int, bx: int) -> Block:
        key = (s, by, bx)
        if key not in self._blocks:
            self._blocks[key] = Block(self.bundle, s, by, bx, self.excluded, self.device)
        return self._blocks[key]

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

    def retrieve(self, z, t, s, on_weights=None):
        """Composite of patch size s from the bundle, routed per location -> (output [B, C, H, W] z.dtype,
        report dict of [B, ...] tensors). z [B, C, H, W] in [-1, 1]; t [B] float64 (EDM sigma).
        on_weights(rows, ids [r, n], a [r, n, h, w], window) sees the per-pixel weights (attribution)."""
        c, h, w = self.data.shape
        n, b, dev = len(self.included), z.shape[0], z.device
        inv_cov = (1 / SquareCrops(h, w, s).coverage).to(dev)
        out = torch.zeros(b, c, h, w, dtype=torch.float64, device=dev)
        gh, gw = h - s + 1, w - s + 1
        rep = {key: torch.zeros(b, gh, gw, dtype=torch.float64, device=dev)
               for key in ("eps_bar", "bound", "routed", "log_z", "rel_se", "via_tail", "tail_bound", "tail_unmet")}
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
            blk = self.block(s, by, bx)
            qm = masked_queries(q, win, s)[0]
            dt = self.dtype or logit_dtype(qm, t[:, None].expand(qm.shape[:2]), qm.shape[-1], blk.log_w_max)
            z64 = zw.flatten(1).to(torch.float64)
            ids, dist = self.search(zw.flatten(1), s, by, bx, blk)  # 1. search
            cand = self.rescore(q, t, ids, win, s, blk, dt)  # 2.-3. dedup expansion, rescoring
            low = lower_bounds(z64, s, win, c, blk.cells, self.kth(z64, dist, blk))  # 4. bounding
            if self.tol is not None:
                extra = self.complete(low, ids, cand[1], q, t, blk)
                if extra is not None:  # 3b. every entry of the cells that could hold too much mass, scored
                    cand = merge(*cand, *self.rescore(q, t, extra, win, s, blk, dt))
                    ids = torch.cat([ids, extra], 1)
            unscored, log_zs = self.unscored(ids, blk), self.log_zs(cand[1], q, t)
            eps = unscored_mass(low, unscored, log_zs, t.to(z64.device))
            # the candidates' mean is within 2 eps of the exact one (certified)
            mean, lse, bound = cand[0], cand[1], torch.nan_to_num(2 * eps, nan=math.inf)
            use = via_tail = torch.zeros_like(bound, dtype=torch.bool)
            conf = rel_se = torch.zeros_like(bound)  # no tail drawn: nothing estimated
            tid = None
            if self.tail == "sample" and int((ids >= 0).sum(1).min()) < blk.alive:  # 3c. the tail
                tid = self.tail_ids(s, by, bx, self.m)
                tl = tail_posterior(q, t, crop_keys(self.data, tid, win, s), self.tail_log_w(ids, tid, blk), n, dt)
                mean, lse, bound, use, via_tail, conf = self.with_tail(cand, tl, bound, eps, low, unscored, log_zs,
                                                                       t.to(z64.device), n)
                if self.m < n:
                    rel_se = tail_rel_se(tl, torch.logaddexp(cand[1], tl[1]), len(tid))
            route = bound > self.tol if self.tol is not None else torch.zeros_like(bound, dtype=torch.bool)
            # 5. routing: certified locations fold in now, the rest after the block loop (exact_pairs)
            keep = ~route
            out[:, :, r0:r1, c0:c1] += fold_window(mean * keep[..., None], c, r1 - r0, c1 - c0, s) * inv_cov[r0:r1, c0:c1]
            if on_weights is not None:
                self.attribute_block(q, t, ids, tid, win, s, n, lse, inv_cov[r0:r1, c0:c1], keep, keep & use, blk,
                                     on_weights, dt)
            log_z = lse - (q * q).sum(2) / (2 * t.to(q) ** 2)
            unmet = route & (tid is not None and self.m < n)
            for key, v in (("eps_bar", eps), ("bound", bound), ("routed", route.double()), ("log_z", log_z),
                           ("rel_se", rel_se), ("via_tail", (via_tail & keep).double()), ("tail_bound", conf),
                           ("tail_unmet", unmet.double())):
                rep[key][:, r0:r0 + ph, c0:c0 + pw] = v.T.reshape(b, ph, pw)
        return self.route(z, t, s, out, rep, inv_cov, on_weights)

    def route(self, z, t, s, out, rep, inv_cov, on_weights=None):
        """Step 5 for a call's composite out [B, C, H, W] float64 of the certified locations: the locations
        rep["routed"] marks recomputed by the exact kernel (`exact_pairs`) and added, the report reduced over
        a location split and its per-pixel bound made -> (output z.dtype, report)."""
        c, h, w = self.data.shape
        b, gh, gw = len(z), h - s + 1, w - s + 1
        routed = rep["routed"] > 0
        if bool(routed.any()):
            qb, ly, lx = routed.nonzero(as_tuple=True)
            d = c * s * s
            pm = torch.zeros(gh * gw, b, d, dtype=torch.float64, device=z.device)
            pm[ly * gw + lx, qb] = self.exact_pairs(z, t, s, ly * gw + lx, qb, inv_cov, on_weights)
            out += fold_window(pm, c, h, w, s) * inv_cov
        if self.locations[1] > 1:
            for x in (out, *rep.values()):
                all_reduce_sum(x)
        rep = {key: v.cpu() for key, v in rep.items()}
        for key in ("routed", "via_tail", "tail_unmet"):
            rep[key] = rep[key] > 0
        # certified composite error per pixel: the mean of its covering crops' bounds (0 where exact)
        per_loc = rep["bound"].masked_fill(rep["routed"], 0).flatten(1)
        rep["pixel_bound"] = SquareCrops(h, w, s).uncrop(per_loc) * (1 / SquareCrops(h, w, s).coverage)
        return out.to(z.dtype), rep

    def project(self, z, t, s):
        """Composite of patch size s certified by projection cells (projection.py), routed per location like
        `retrieve` -> (output [B, C, H, W] z.dtype, report). z [B, C, H, W] in [-1, 1]; t [B] float64 (EDM
        sigma). Runs on the CPU (the cells live there); under a location split, on this process's rows."""
        c, h, w = self.data.shape
        b, gh, gw, dev = len(z), h - s + 1, w - s + 1, z.device
        inv_cov = (1 / SquareCrops(h, w, s).coverage).to(dev)
        rank, world = self.locations
        mine = split_range(gh, rank, world)
        if s not in self._cells:
            self._cells[s] = build_cells(self.data, s, rows=mine)
            self._built[s] = self._cells[s].seconds
        pc = self._cells[s]
        # every (location, query) pair of this process's rows, location-major
        locs = torch.arange(mine.start * gw, mine.stop * gw)
        loc, qb = locs.repeat_interleave(b), torch.arange(b).repeat(len(locs))
        q = unfold_u8(z.detach().to("cpu", torch.float64), s, s)
        mean, log_zs, eps, _ = projection_posterior(q[loc, qb], t.cpu()[qb], pc, loc, self.tol)
        bound = 2 * eps
        route = bound > self.tol
        pm = torch.zeros(gh * gw, b, c * s * s, dtype=torch.float64)
        pm[loc, qb] = torch.where(route[:, None], 0.0, mean.nan_to_num())
        out = (fold_window(pm, c, h, w, s) * inv_cov.cpu()).to(dev)
        rep = {key: torch.zeros(b, gh, gw, dtype=torch.float64) for key in
               ("eps_bar", "bound", "routed", "log_z", "rel_se", "via_tail", "tail_unmet")}
        rep["tail_bound"] = torch.full((b, gh, gw), math.nan, dtype=torch.float64)
        for key, v in (("eps_bar", eps), ("bound", bound), ("routed", route.double()), ("log_z", log_zs)):
            rep[key].view(b, -1)[qb, loc] = v
        rep = {key: v.to(dev) for key, v in rep.items()}
        return self.route(z, t, s, out, rep, inv_cov)

    def search(self, zw: torch.Tensor, s: int, by: int, bx: int, blk: Block):
        """Step 1: candidate entries [B, k'] (int64, nearest first by the index's distance, -1 where none)
        of window queries zw [B, C*wh*ww], k' = min(k, entries taking part), and their FAISS squared
        distances [B, k'] float64. Entries none of whose members take part are asked for on top of k and
        dropped (an IVF search then probes wider)."""
        k = min(self.k, blk.alive)
        asked = min(k + len(blk.incl) - blk.alive, len(blk.incl))
        ids, dist = self.bundle.search(s, by, bx, zw, asked, self.nprobe, distances=True)
        drop = (ids < 0) | (blk.incl[ids.clamp_min(0)] == 0)
        first = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]
        gone = drop.gather(1, first)
        return (ids.gather(1, first).masked_fill(gone, -1).to(self.device),
                dist.gather(1, first).to(torch.float64).masked_fill(gone, math.inf).to(self.device))

    def expand(self, ids: torch.Tensor, blk: Block):
        """Step 2: candidate entries ids [B, k] -> (representative virtual ids [B, k] (0 where none), log
        weights [B, k] float64: log(members taking part), -inf where none)."""
        valid = ids >= 0
        e = ids.clamp_min(0)
        log_w = torch.log(blk.incl.to(ids.device, torch.float64)[e]).masked_fill(~valid, -math.inf)
        return blk.reps[e], log_w

    def query_chunks(self, qm: torch.Tensor, k: int) -> list[slice]:
        """Query rows per candidate kernel call, from masked queries qm [B, P, D]: the gathered uint8
        windows [r, k, D], their crop norms [r, P, k] and the logits stay near CHUNK_ELEMENTS bytes."""
        b, p, d = qm.shape
        step = max(1, CHUNK_ELEMENTS // (max(k, 1) * (d + 16 * p)))
        return [slice(i, min(i + step, b)) for i in range(0, b, step)]

    def rescore(self, q, t, ids, win, s, blk, dt):
        """Steps 2-3: the exact posterior over each query's candidate entries ids [B, k] (-1: none), each
        scored once by its representative with log weight log(members taking part) (`expand`). q [P, B, d]
        float64 query patches, t [B], dt the kernel precision. Returns (mean [P, B, d], lse [P, B]) float64."""
        reps, log_w = self.expand(ids, blk)
        qm, at_crops = masked_queries(q, win, s)
        parts = []
        for r in self.query_chunks(qm, reps.shape[1]):
            keys = window_keys(self.data, reps[r], win, s)
            mean, lse = candidate_posterior(qm[r], t[r], keys, log_w[r], dt)
            parts.append((at_crops(mean), lse.T))
        return tuple(torch.cat(v, 1) for v in zip(*parts))

    def kth(self, z64: torch.Tensor, dist: torch.Tensor, blk: Block) -> torch.Tensor | None:
        """A flat index's k-th FAISS squared distance [B] less its float32 rounding (<= 4 (D+3) 2^-24
        (||z|| + sqrt(D))^2: three rounded terms of at most that size, and the query's rounding): a lower
        bound on the window distance of every entry not returned. None for other kinds (codes, cells)."""
        if blk.kind != "flat" or not dist.shape[1]:
            return None
        d = z64.shape[1]
        return dist[:, -1] - 4 * (d + 3) * 2.0 ** -24 * (z64.norm(dim=1) + math.sqrt(d)) ** 2

    def unscored(self, ids: torch.Tensor, blk: Block) -> torch.Tensor:
        """Images taking part but not scored, per query and cell [B, L] float64 (ids [B, k] the scored
        entries, -1: none)."""
        e = ids.clamp_min(0)
        scored = blk.incl.to(ids.device, torch.float64)[e] * (ids >= 0)
        per_cell = torch.zeros(len(ids), len(blk.incl_cell), dtype=torch.float64, device=ids.device)
        return blk.incl_cell.to(ids.device)[None] - per_cell.scatter_add_(1, blk.cell.to(ids.device)[e], scored)

    @staticmethod
    def log_zs(lse: torch.Tensor, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Z_S [P, B]: the kernel's log normaliser lse [P, B] with its row constant -||z_C||^2 / 2t^2."""
        return lse - (q * q).sum(2) / (2 * t.to(q) ** 2)

    def complete(self, low, ids, lse, q, t, blk: Block) -> torch.Tensor | None:
        """Step 3b (with a tol): entries [B, k2] (-1: none) to score on top of the candidates ids [B, k]: every
        entry of each cell whose unscored images could hold more than tol / 4L of the scored mass at some
        location (low [B, P, L] from `lower_bounds`, lse [P, B] the candidates' log normaliser). Then the
        cells left hold at most tol / 4 of it, eps <= tol / 4. A query whose cells to complete hold more than
        COMPLETE_FACTOR k entries completes none (its locations route to exact). None: nothing to add."""
        cells = len(blk.incl_cell)
        unscored = self.unscored(ids, blk)
        rel = (torch.log(unscored.clamp_min(0))[:, None, :] - low / (2 * t.to(low)[:, None, None] ** 2)
               - self.log_zs(lse, q, t).T[..., None])
        need = (rel > math.log(self.tol / (4 * cells))).any(1)  # [B, L]
        need &= (need.to(torch.float64) @ blk.cell_entries.to(need.device, torch.float64)
                 <= COMPLETE_FACTOR * self.k)[:, None]
        if not bool(need.any()):
            return None
        rows = []
        for b in range(len(ids)):
            # the cells' entry lists live on the CPU (Block); the candidates may not
            e = torch.cat([blk.by_cell[j] for j in need[b].nonzero().flatten().tolist()]
                          + [torch.zeros(0, dtype=torch.long)]).to(ids.device)
            rows.append(e[~torch.isin(e, ids[b])])
        extra = torch.full((len(ids), max(len(r) for r in rows)), -1, dtype=torch.long, device=ids.device)
        for b, r in enumerate(rows):
            extra[b, :len(r)] = r
        return extra if extra.shape[1] else None

    def with_tail(self, cand, tail, bound, eps, low, unscored, log_zs, t, n):
        """Step 3c (tail="sample"): the candidates' state cand (mean [P, B, d], lse [P, B]) with certified bound
        [P, B], and the tail's (`tail_posterior`) -> (mean, lse, bound, use, via_tail, conf): the output's
        state and bound per location, use [P, B] bool where it is the tail-merged state, via_tail where its
        bound is the tail's confidence bound (not certified), conf [P, B] that bound (`tail_bound`, level 1 -
        delta). A tail of every included image (m >= N) is exact: merged everywhere, bound 0, certified.
        Otherwise, without a tol the merged state is used everywhere, bounded by the smaller of its certified
        bound (2 eps plus what the tail moved the mean) and conf; with a tol only where the candidates'
        bound exceeds tol and conf meets it (loose tolerances: elsewhere the location keeps its certified
        candidates' mean, or is routed)."""
        merged = merge(*cand, tail[0], tail[1])
        if self.m >= n:
            every = torch.ones_like(bound, dtype=torch.bool)
            return (*merged, torch.zeros_like(bound), every, ~every, torch.zeros_like(bound))
        conf = tail_bound(*cand, tail, merged[0], self.m, n, low, unscored, log_zs, eps, t, self.delta)
        if self.tol is None:
            cert = bound + (merged[0] - cand[0]).abs().amax(2)
            return (*merged, torch.minimum(cert, conf), torch.ones_like(bound, dtype=torch.bool), conf < cert, conf)
        use = (bound > self.tol) & (conf <= self.tol)
        return (torch.where(use[..., None], merged[0], cand[0]), torch.where(use, merged[1], cand[1]),
                torch.where(use, conf, bound), use, use, conf)

    def exact_pairs(self, z, t, s, loc, qb, inv_cov, on_weights=None):
        """Step 5: the exact patch means [n, C*s*s] float64 of (location loc[i], query qb[i]) pairs (loc
        row-major over the (H-s+1) x (W-s+1) grid) over the whole training set, all pairs in one batch:
        one kernel group per key location, its rows the pairs' query patches there (the flipped half of the
        set: the mirror location's stored patches against the flipped query patch, merged per pair), padded
        to equal length. on_weights as in `retrieve` (one call per key chunk and half, whole-image window)."""
        c, h, w = self.data.shape
        gw, nst, d = w - s + 1, self.data.n_stored, c * s * s
        u8, sq = square_patches(self.data, s, s)
        q = unfold_u8(z.to(torch.float64), s, s)[loc, qb]  # [n, d]
        # rows: (key location, query patch, t) per pair, and its flipped half at the mirrored location
        halves = 2 if self.data.xflip else 1
        mirror = loc - loc % gw + (gw - 1 - loc % gw)
        rloc = torch.cat([loc, mirror][:halves])
        rq = torch.cat([q, q.unflatten(-1, (c, s, s)).flip(-1).flatten(1)][:halves])
        # groups: one per key location, its rows padded to the longest
        order = torch.argsort(rloc, stable=True)
        keys_at, counts = torch.unique_consecutive(rloc[order], return_counts=True)
        g_of = torch.repeat_interleave(torch.arange(len(counts), device=loc.device), counts)
        j_of = torch.arange(len(order), device=loc.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        zq = torch.zeros(len(counts), int(counts.max()), d, dtype=torch.float64, device=z.device)
        tq = torch.ones(len(counts), int(counts.max()), dtype=torch.float64, device=z.device)
        zq[g_of, j_of], tq[g_of, j_of] = rq[order], t.to(z.device)[qb].repeat(halves)[order]
        lw = self.data.log_weights()
        dt = self.dtype or logit_dtype(zq, tq, d)
        per = max(1, EXACT_KEY_BYTES // (nst * (d + 4)))  # key locations per call
        u8f = u8.transpose(1, 2)  # [P, d, N], contiguous: a gather keeps the feature-major layout
        mean = torch.empty_like(zq)
        lse = torch.empty_like(tq)
        for g0 in range(0, len(counts), per):
            at = keys_at[g0:g0 + per]
            chunks = stored_key_chunks(u8f[at].transpose(1, 2), sq[at], keys_per_chunk(z.device), lw, skip_excluded=True)
            mean[g0:g0 + per], lse[g0:g0 + per] = patch_posterior(zq[g0:g0 + per], tq[g0:g0 + per], chunks, dt)
        # back to pairs: the flipped half's means flipped back, merged by log normaliser
        row_mean, row_lse = torch.empty_like(rq), torch.empty(len(rq), dtype=torch.float64, device=z.device)
        row_mean[order], row_lse[order] = mean[g_of, j_of], lse[g_of, j_of]
        np_ = len(loc)
        pm, pl = row_mean[:np_], row_lse[:np_]
        if halves == 2:
            pm, pl = merge(pm, pl, row_mean[np_:].unflatten(-1, (c, s, s)).flip(-1).flatten(1), row_lse[np_:])
        if on_weights is not None:
            lse_g = torch.zeros_like(tq)
            lse_g[g_of, j_of] = pl.repeat(halves)[order]
            qsel = qb.unique()
            # per sorted row: (its query's position in qsel, its location in the original frame, its half)
            rq_pos = torch.searchsorted(qsel, qb).repeat(halves)[order]
            r_loc = loc.repeat(halves)[order]
            r_half = torch.arange(halves, device=loc.device).repeat_interleave(np_)[order]
            crops = SquareCrops(h, w, s)
            for g0 in range(0, len(counts), per):
                at = keys_at[g0:g0 + per]
                rows = ((g_of >= g0) & (g_of < g0 + per)).nonzero().flatten()

                def hook(start, wts, rows=rows, g0=g0):
                    nk = wts.shape[2]
                    wr = wts[g_of[rows] - g0, j_of[rows]]  # [rows, nk]
                    for half in range(halves):
                        sel = rows[r_half[rows] == half]
                        wm = torch.zeros(len(qsel), nk, crops.grid[0] * crops.grid[1], dtype=torch.float64,
                                         device=z.device)
                        wm.index_put_((rq_pos[sel][:, None], torch.arange(nk, device=z.device)[None], r_loc[sel][:, None]),
                                      wr[r_half[rows] == half], accumulate=True)
                        ids = (start + half * nst + torch.arange(nk, device=z.device)).expand(len(qsel), -1)
                        on_weights(qsel, ids, crops.uncrop(wm) * inv_cov, (0, h, 0, w))
                chunks = stored_key_chunks(u8f[at].transpose(1, 2), sq[at], KEYS_PER_TILE, lw)
                patch_posterior(zq[g0:g0 + per], tq[g0:g0 + per], chunks, dt, lse=lse_g[g0:g0 + per], on_weights=hook)
        return pm

    def attribute_block(self, q, t, ids, tid, win, s, n, lse, inv_cov, keep, keep_tail, blk, on_weights, dt):
        """The kernel's second pass over both key sets with the output's lse [P, B] (merged where the tail is
        used): on_weights(rows, ids [r, n], a [r, n, wh, ww], win) with per-pixel weights a_i[p] of the
        window (inv_cov [wh, ww] is 1 / the global coverage there), only for the locations kept, keep [P, B]
        (the routed ones come from `exact_pairs`), the tail draws' only where keep_tail [P, B] (the tail is
        used there); an entry's weight is spread over its members (`spread`); the weights of excluded or
        missing candidates are 0."""
        local = SquareCrops(win[1] - win[0], win[3] - win[2], s)
        per_pixel = lambda w: local.uncrop(w.permute(1, 2, 0)) * inv_cov  # noqa: E731  [P, r, n] -> [r, n, wh, ww]
        kf, kt = keep.to(torch.float64), keep_tail.to(torch.float64)
        reps, log_w = self.expand(ids, blk)
        qm, _ = masked_queries(q, win, s)
        for r in self.query_chunks(qm, ids.shape[1]):
            keys = window_keys(self.data, reps[r], win, s)
            hook = lambda w, r=r: self.spread(r, ids[r], per_pixel(w.transpose(0, 1) * kf[:, r, None]), win, blk,  # noqa: E731
                                              on_weights)
            candidate_posterior(qm[r], t[r], keys, log_w[r], dt, lse[:, r].T, hook)
        if tid is not None:
            def hook(start, w):
                on_weights(slice(0, len(ids)), tid[start:start + w.shape[2]].expand(len(ids), -1),
                           per_pixel(w * kt[..., None]), win)
            tail_posterior(q, t, crop_keys(self.data, tid, win, s), self.tail_log_w(ids, tid, blk), n, dt, lse, hook)

    def spread(self, rows: slice, ids: torch.Tensor, a: torch.Tensor, win, blk: Block, on_weights) -> None:
        """Entries' per-pixel weights a [r, k, wh, ww] (entries ids [r, k], -1: none) -> on_weights over
        their members taking part, each with its entry's weight / (members taking part): the weight the
        exact path gives each of identical members."""
        e = ids.clamp_min(0).cpu()
        if bool((blk.counts[e] == 1).all()):  # no duplicates among the candidates: each entry is one image
            on_weights(rows, blk.reps[e].to(a.device), a, win)
            return
        for i in range(len(ids)):
            ev = e[i][ids[i].cpu() >= 0]
            cnt = blk.counts[ev]
            owner = torch.repeat_interleave(torch.arange(len(ev)), cnt)
            pos = torch.repeat_interleave(blk.offsets[ev] - (cnt.cumsum(0) - cnt), cnt) + torch.arange(len(owner))
            mem = blk.members[pos]
            if self.excluded is not None:
                part = ~self.excluded[mem]
                mem, owner = mem[part], owner[part]
            share = 1 / blk.incl[ev].to(torch.float64)
            row = slice(rows.start + i, rows.start + i + 1)
            av = a[i][ids[i] >= 0]
            for j in range(0, len(mem), MEMBERS_PER_CALL):
                o = owner[j:j + MEMBERS_PER_CALL]
                on_weights(row, mem[None, j:j + MEMBERS_PER_CALL].to(a.device),
                           (av[o.to(a.device)] * share[o].to(a)[:, None, None])[None], win)

    @staticmethod
    def tail_log_w(ids: torch.Tensor, tid: torch.Tensor, blk: Block) -> torch.Tensor:
        """[B, m] float64 tail log weights: 0, or -inf where the draw is a member of one of the query's
        candidate entries ids [B, k] (those terms are already exact, with the entry's count)."""
        lw = torch.zeros(len(ids), len(tid), dtype=torch.float64, device=ids.device)
        return lw.masked_fill(isin_rows(ids, blk.entry_of.to(tid.device)[tid]), -math.inf)
