"""Projection cells (issue 11): a certificate per crop location where posteriors are peaked (small t) and
crops have few dimensions, built in memory from the uint8 store.

Why not the bundle's cells: an index over union windows (index.py) bounds a crop's distances with cells
fitted to the whole window, which at t <= 0.06 certify almost nothing (eps_bar median 0.99997 on
Fashion-MNIST, s = 3); cells fitted to each 3x3 crop by k-means (stride 1) certified 18% of locations at
t = 0.06 and 46% at t = 0.023. With a perfect bound (the exact sorted distances) a (query, location)
needs 1,885 of 120,000 images scored at t = 0.06 and 812 at t = 0.023 (means); the bound below needs
2,609 and 1,139 (r = 3).

Per crop location l of size s (`build_cells`, once per process, patch size and exclusion set):
  1. entries: the distinct uint8 crops of the included virtual images at l (a flip's crop is the mirror
     location's crop, mirrored), each with its multiplicity, which enters the softmax as log(count) (exact:
     identical crops have identical terms);
  2. projection: the entries' count-weighted mean mu and top r principal directions V (orthonormal, r =
     PROJ_DIMS); per entry the coordinates y = V^T (x - mu) and the residual norm rho = ||(I - V V^T)(x - mu)||;
  3. cells: a k-d partition by equal-count splits of y_1, .., y_r in turn, about CELL_SIZE entries per cell;
     per cell its total count and the box [lo, hi] of (y, rho), widened by BOX_MARGIN for rounding.
For a query patch z and any entry x of a cell, Pythagoras over V and its complement, then the triangle
inequality in the complement:
    ||z - x||^2 = ||V^T (z - x)||^2 + ||R (z - x)||^2
               >= sum_k dist(y_k(z), [lo_k, hi_k])^2 + dist(rho(z), [lo_rho, hi_rho])^2.
Query (`projection_posterior`, every (location, query) pair at once), t the EDM sigma:
  a. bound: low_j per cell from the inequality; the cell's terms sum to at most count_j e^(-low_j / 2t^2);
  b. seed: the cell of largest bound on its mass is scored exactly (the one kernel's ragged form,
     `posterior.ragged_terms`), normaliser Z_1;
  c. selection: cells whose bound is below tol/8L Z_1 (L cells) together hold at most tol/8 Z_1 and are
     left; the others are scored exactly in decreasing order of bound until what is left may hold at most
     tol/4 Z_S (Z_S the normaliser so far), so eps <= tol/4;
  d. certificate: eps = U / (Z_S + U), U the complement's bound: the mean is within 2 eps per coordinate.
A pair whose next cell would take it past SCORE_CAP N scored entries (N the included images) stops (eps 1:
the caller routes it to the exact kernel, whose batched pass costs less than scoring most of the set).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .index import distinct_rows
from .posterior import jit, prange, ragged_state, ragged_terms, set_jit_threads
from .store import TrainingSet

PROJ_DIMS = 3  # principal directions per location (1-2 fewer keys at r = 4 cost more to bound: measured, README)
CELL_SIZE = 128  # entries per k-d cell: fewer cells to bound against fewer wasted keys per scored cell
BOX_MARGIN = 1e-9  # cell boxes widened by this much (float64 rounding of coordinates of size <= 2 sqrt(d))
SCORE_CAP = 1 / 2  # most entries a pair may score, as a share of the included images, before it is routed
MAX_SIZE = 3  # crops up to s x s (grey or RGB: <= 27 values) use projection cells; larger ones the bundle's
# cells (at s = 5, 25 grey values, three directions bound too loosely: a 5,000-image store routed 73% at t = 0.585)


@dataclass
class ProjectionCells:
    """Projection cells of every crop location of one patch size (module docstring), P locations row-major:
    u8 [E, d] uint8 and counts [E] int32: the entries of all locations, concatenated, each location's sorted by
    cell; mu [P, d], basis [P, d, r] float64; per cell, padded to Lmax per location: start [P, Lmax + 1] int64
    (entry ranges, empty for padding), count [P, Lmax] float64 (0 for padding), lo / hi [P, Lmax, r + 1]
    float64 (boxes of (y, rho)); seconds to build. Location i's entries are start[i, 0]..start[i, -1]."""

    u8: torch.Tensor
    counts: torch.Tensor
    mu: torch.Tensor
    basis: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    seconds: float = 0.0


def kd_cells(y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-d cells of the points y [E, r]: equal-count splits of coordinate 1, then within each part of
    coordinate 2, and so on, into about E / size cells. Returns (order [E]: the points sorted by cell,
    cell ids [E] int64 of the sorted points, 0.. consecutive)."""
    e, r = y.shape
    g = max(1, math.ceil((e / size) ** (1 / r)))
    grp = torch.zeros(e, dtype=torch.int64)
    for k in range(r):
        # order by (group, y_k): y_k scaled into [0, 0.5] under the integer group id
        yk = y[:, k]
        order = torch.argsort(grp.double() + (yk - yk.min()) / (2 * float(yk.max() - yk.min()) + 1e-300), stable=True)
        gs = grp[order]
        size_g = torch.bincount(gs)
        pos = torch.arange(e) - (size_g.cumsum(0) - size_g)[gs]
        grp = torch.empty_like(grp).index_put_((order,), gs * g + pos * g // size_g[gs])
    # the last order sorts by the final groups already
    return order, torch.unique_consecutive(grp[order], return_inverse=True)[1]


def location_cells(crops: torch.Tensor, r: int, size: int):
    """Steps 1-3 at one location: crops uint8 [n, d] -> (distinct crops sorted by cell [E, d], counts [E],
    mu [d], basis [d, r], entries per cell [L], count per cell [L], lo [L, r + 1], hi [L, r + 1])."""
    # 1. the distinct crops and their multiplicities
    u, cnt = (torch.from_numpy(v) for v in distinct_rows(crops.numpy()))
    x, wt = u.double() / 127.5 - 1, cnt.double()
    # 2. weighted mean and top-r principal directions; coordinates and residual norms
    mu = (wt @ x) / wt.sum()
    xc = x - mu
    basis = torch.linalg.eigh((xc.T * wt) @ xc)[1].flip(1)[:, :r]
    yr = xc @ basis
    rho = (xc - yr @ basis.T).norm(dim=1)
    # 3. k-d cells, entries sorted by cell; per cell its count and the box of (y, rho)
    order, cell = kd_cells(yr, size)
    coords = torch.cat([yr, rho[:, None]], 1)[order]
    nc = int(cell[-1]) + 1
    at = cell[:, None].expand(-1, r + 1)
    lo = torch.full((nc, r + 1), math.inf, dtype=torch.float64).scatter_reduce(0, at, coords, "amin")
    hi = torch.full((nc, r + 1), -math.inf, dtype=torch.float64).scatter_reduce(0, at, coords, "amax")
    return (u[order], cnt[order].to(torch.int32), mu, basis, torch.bincount(cell, minlength=nc),
            torch.zeros(nc, dtype=torch.float64).index_add_(0, cell, wt[order]), lo - BOX_MARGIN, hi + BOX_MARGIN)


def build_cells(data: TrainingSet, s: int, r: int = PROJ_DIMS, size: int = CELL_SIZE,
                rows: range | None = None) -> ProjectionCells:
    """`ProjectionCells` of every s x s crop location (location rows `rows` only; others get no entries) of
    the included virtual images, locations on torch's threads. Cost: a sort of the N crops and of their
    projections per location (measured 26-33 s for 676 locations at N = 120,000, d = 9, 2 threads)."""
    start_time = time.perf_counter()
    c, h, w = data.shape
    gh, gw, d = h - s + 1, w - s + 1, c * s * s
    r = min(r, d)
    rows = range(gh) if rows is None else rows
    img = (data.images if data.excluded is None else data.images[~data.excluded.to(data.images.device)]).cpu()
    mirrored = img.flip(-1) if data.xflip else None

    def at(i):
        # the included virtual images' crops at location i (a flip's crop: the flipped image's, same corner)
        ly, lx = divmod(i, gw)
        crops = [img[:, :, ly:ly + s, lx:lx + s]] + ([] if mirrored is None else [mirrored[:, :, ly:ly + s, lx:lx + s]])
        return location_cells(torch.cat(crops).flatten(1), r, size)
    mine = [i for i in range(gh * gw) if i // gw in rows]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        per = dict(zip(mine, pool.map(at, mine)))
    # padded per-location cell tables over the concatenated entries
    p = gh * gw
    lmax = max((len(v[4]) for v in per.values()), default=1)
    start = torch.zeros(p, lmax + 1, dtype=torch.int64)
    count = torch.zeros(p, lmax, dtype=torch.float64)
    lo = torch.zeros(p, lmax, r + 1, dtype=torch.float64)
    hi = torch.zeros(p, lmax, r + 1, dtype=torch.float64)
    mu = torch.zeros(p, d, dtype=torch.float64)
    basis = torch.eye(d, r, dtype=torch.float64).repeat(p, 1, 1)
    u8 = torch.empty(sum(len(v[0]) for v in per.values()), d, dtype=torch.uint8)
    counts = torch.empty(len(u8), dtype=torch.int32)
    offset = 0
    for i in range(p):
        start[i] = offset
        if i not in per:
            continue
        # each location's entries copied into place and released (no second copy of all of them)
        u, cnt_e, mu[i], basis[i], n_in, cnt, clo, chi = per.pop(i)
        nc = len(n_in)
        start[i, 1:nc + 1] += n_in.cumsum(0)
        start[i, nc + 1:] = start[i, nc]
        count[i, :nc], lo[i, :nc], hi[i, :nc] = cnt, clo, chi
        u8[offset:offset + len(u)], counts[offset:offset + len(u)] = u, cnt_e
        offset += len(u)
    return ProjectionCells(u8, counts, mu, basis, start, count, lo, hi, time.perf_counter() - start_time)


def query_coords(q: torch.Tensor, pc: ProjectionCells, loc: torch.Tensor) -> torch.Tensor:
    """Query patches q [n, d] float64 at locations loc [n] -> their (y, rho) [n, r + 1] float64 (step 2)."""
    zc, v = q - pc.mu[loc], pc.basis[loc]
    y = torch.einsum("nd,ndr->nr", zc, v)
    rho = (zc - torch.einsum("nr,ndr->nd", y, v)).norm(dim=1)
    return torch.cat([y, rho[:, None]], 1)


@jit(parallel=True)  # not cached: a cache would not see changes to ragged_terms
def _certify(q, inv_2t2, coords, loc, lo, hi, count, start, u8, counts, log_tol4, cap, out, eps, keys):
    n, d = q.shape
    lmax, r1 = lo.shape[1], lo.shape[2]
    for p in prange(n):
        l = loc[p]
        # a. every cell's bound on its terms' sum: log count_j - low_j / 2t^2
        mass = np.full(lmax, -np.inf)
        seed = -1
        for j in range(lmax):
            if count[l, j] == 0:
                continue
            low = 0.0
            for k in range(r1):
                gap = max(lo[l, j, k] - coords[p, k], 0.0) + max(coords[p, k] - hi[l, j, k], 0.0)
                low += gap * gap
            mass[j] = math.log(count[l, j]) - low * (1 - 1e-12) * inv_2t2[p]
            if seed < 0 or mass[j] > mass[seed]:
                seed = j
        state = out[p]
        state[:] = 0.0
        state[0] = -np.inf
        eps[p], keys[p] = 1.0, 0
        if seed < 0:
            continue
        # b. the seed cell, scored exactly
        ragged_terms(q[p], inv_2t2[p], u8, counts, start[l, seed], start[l, seed + 1], state)
        # c. cells below tol/8L Z_1 (L cells) together hold at most half of tol/4 Z_1: left unscored; the
        # nearer ones are scored in decreasing order of bound until what is left may hold <= tol/4 Z_S
        far = log_tol4 + state[0] + math.log(state[1]) - math.log(2.0 * lmax)
        left = -np.inf
        near = np.empty(lmax, np.int64)
        nn = 0
        for j in range(lmax):
            if j == seed or mass[j] == -np.inf:
                continue
            if mass[j] <= far:
                left = np.logaddexp(left, mass[j])
            else:
                near[nn] = j
                nn += 1
        near = near[:nn][np.argsort(mass[near[:nn]])]
        below = np.empty(nn + 1)  # below[i]: bound on what cells near[:i] and the far ones hold
        below[0] = left
        for i in range(nn):
            below[i + 1] = np.logaddexp(below[i], mass[near[i]])
        total = start[l, seed + 1] - start[l, seed]
        i = nn
        capped = False
        while i > 0 and below[i] > log_tol4 + state[0] + math.log(state[1]):
            j = near[i - 1]
            if total + start[l, j + 1] - start[l, j] > cap[p]:
                capped = True
                break
            total += start[l, j + 1] - start[l, j]
            ragged_terms(q[p], inv_2t2[p], u8, counts, start[l, j], start[l, j + 1], state)
            i -= 1
        keys[p] = total
        if capped:
            continue  # not certified: routed by the caller
        # d. the certificate: eps = U / (Z_S + U)
        log_zs = state[0] + math.log(state[1])
        eps[p] = 0.0 if below[i] == -np.inf else 1.0 / (1.0 + math.exp(log_zs - below[i]))


def projection_posterior(q: torch.Tensor, t: torch.Tensor, pc: ProjectionCells, loc: torch.Tensor, tol: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps a-d (module docstring) for pairs (query patch q [n, d] float64 at location loc [n], noise level
    t [n] float64, EDM sigma) -> (mean [n, d] float64, log Z_S [n] (log sum over scored entries of count
    e^(-||z - x||^2 / 2t^2)), eps [n] (certified unscored mass fraction; the mean is within 2 eps per
    coordinate of the exact patch mean), keys [n] int64 (entries scored; 0 where none)). A pair whose
    next cell would take it past SCORE_CAP N scored entries (its seed cell is always scored) stops with eps 1
    (the caller routes it)."""
    n, d = q.shape
    out = np.empty((n, d + 2))
    eps = np.empty(n)
    keys = np.empty(n, np.int64)
    cap = (SCORE_CAP * pc.count.sum(1))[loc]
    set_jit_threads()
    _certify(q.numpy(), (0.5 / t ** 2).numpy(), query_coords(q, pc, loc).numpy(), loc.numpy(), pc.lo.numpy(),
             pc.hi.numpy(), pc.count.numpy(), pc.start.numpy(), pc.u8.numpy(), pc.counts.numpy(), math.log(tol / 4),
             cap.numpy(), out, eps, keys)
    mean, log_zs = ragged_state(torch.from_numpy(out))
    return mean, log_zs, torch.from_numpy(eps), torch.from_numpy(keys)
