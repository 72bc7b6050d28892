"""PSPC-Square with retrieval (DESIGN.md section 2): top-k candidates from an index bundle, rescored
exactly from the uint8 store, plus an optional uniform tail sample (Niedoba et al. 2024).

Per s and anchor block (stride x stride positions sharing one union-window index), all at once:
  1. one FAISS search of the block's window gives k candidate ids per query;
  2. their exact crop logits at every position of the block, from the stored uint8 pixels (direct
     differences and box sums; FAISS distances never enter the softmax);
  3. with tail="sample", m ids drawn uniformly (with replacement) from all N, seeded by (seed, s, block)
     and shared by the block's positions and queries, enter with weight N/m, their terms zeroed where
     the id is one of the query's candidates: an unbiased estimate of the rest of each normaliser. Being
     shared, their distances and means are float64 GEMMs per location (norm expansion, whose
     cancellation error ~1e-13 is far below 2t^2, as in empirical_mean), so m can be large;
  4. one OnlineSoftmax per position over both parts; its normalised weights give the position's patch
     mean, and the patch means are summed into the window and divided by the (global) coverage. The
     equivalent per-pixel weights a_i[p] (sum one at every pixel) are formed only for attribution.

Report (`last_report[s]`): eps_bar = (N-k) e^{l_k} / (Z_k + (N-k) e^{l_k}) per query and position from
the top-k part. It bounds the neglected mass only if the k are the true k nearest of that position;
that holds for a flat index with stride 1 ("certified": True). With union windows (stride > 1), sq8 or
PQ codes, or IVF with nprobe < nlist, the candidates are the nearest by another distance, so eps_bar is
an estimate, not a certificate. With tail="sample", rel_se is the estimated relative standard error of
the normaliser estimate (0 when m >= N: then the tail is every image, exactly); log_z is the log of
the normaliser used (log sum of e^{-d/2t^2}).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .denoisers import PSPCSquare
from .distributed import all_reduce_sum, split_range
from .errors import UserError
from .geometry import SquareCrops
from .index import Bundle, blocks, window_u8
from .posterior import CHUNK_ELEMENTS, OnlineSoftmax, crop_sq_dists
from .schedule import Schedule
from .store import TrainingSet

TOL_GROWTH = (1, 4, 16)  # --tol: k and m multipliers tried before the exact fallback


def isin_rows(ids: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """[B, m] bool: probe[j] is among ids[b] (ids [B, k], probe [m]), by sorting and binary search."""
    srt = ids.sort(1).values
    pos = torch.searchsorted(srt, probe.expand(len(ids), -1).contiguous()).clamp(max=ids.shape[1] - 1)
    return srt.gather(1, pos) == probe[None]


class RetrievalPSPC(PSPCSquare):
    name = "pspc-square+index"

    def __init__(self, data: TrainingSet, bundle: Bundle, k: int = 1024, tail: str = "sample", m: int = 4096,
                 seed: int = 0, patch_size: int | None = None, schedule: Schedule | None = None,
                 tol: float | None = None, nprobe: int | None = None, dtype=torch.float32):
        super().__init__(data, patch_size=patch_size, schedule=schedule, dtype=dtype)
        if tail not in ("sample", "none"):
            raise UserError(f"--tail must be 'sample' or 'none', got {tail!r}")
        if k < 1 or m < 1 or (nprobe is not None and nprobe < 1):
            raise UserError(f"k, m and nprobe must be >= 1, got k={k}, m={m}, nprobe={nprobe}")
        if list(bundle.manifest["shape"][1:]) != list(data.shape) or bundle.xflip != data.xflip:
            raise UserError(f"{bundle.path}: built for {bundle.manifest['shape']} with xflip={bundle.xflip}, "
                            f"the training set is {list(data.shape)} with xflip={data.xflip}")
        self.bundle, self.k, self.tail, self.m, self.seed, self.tol = bundle, k, tail, m, seed, tol
        self.nprobe = nprobe
        self.certified = bundle.kind == "flat" and bundle.stride == 1
        self.last_report: dict[int, dict] = {}
        self._tail_ids: dict[tuple, torch.Tensor] = {}

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
        """The block's m uniform ids, seeded by (seed, s, block): the same for every query."""
        key = (s, by, bx, m)
        if key not in self._tail_ids:
            state = np.random.SeedSequence([self.seed, s, by, bx]).generate_state(2)
            g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            n = len(self.data)
            ids = torch.arange(n) if m >= n else torch.randint(0, n, (m,), generator=g)
            self._tail_ids[key] = ids.to(self.device)
        return self._tail_ids[key]

    def retrieve(self, z, t, s, k, m, on_weights=None):
        """Composite of patch size s from the bundle -> (output [B, C, H, W], report).
        on_weights(rows, ids [r, n], a [r, n, h, w], window) sees the per-pixel weights (attribution)."""
        c, h, w = self.data.shape
        n, b, dt, dev = len(self.data), z.shape[0], self.dtype, z.device
        k = min(k, n)
        tail = self.tail == "sample" and k < n
        exact_tail = m >= n
        crops = SquareCrops(h, w, s)
        gh, gw = crops.grid
        inv_cov = (1 / crops.coverage).to(dev)
        inv2t2 = (1 / (2 * t.to(torch.float64) ** 2)).to(dev)
        out = torch.zeros(b, c, h, w, dtype=torch.float64, device=dev)
        eps_bar, rel_se, log_z = (torch.zeros(b, gh, gw, dtype=torch.float64) for _ in range(3))
        # under a location split this process takes its rows of blocks (and loads only their indices)
        rank, world = self.locations
        mine = split_range(-(-gh // self.bundle.stride), rank, world)
        for by, bx, win in blocks(h, w, s, self.bundle.stride):
            if by not in mine:
                continue
            r0, r1, c0, c1 = win
            local = SquareCrops(r1 - r0, c1 - c0, s)  # the block's positions, as crops of its window
            ph, pw = local.grid
            zw = z[:, :, r0:r1, c0:c1].to(dt)
            # 1. k candidates per query (IVF probes are widened until every row is full)
            ids = self.bundle.search(s, by, bx, zw.flatten(1), k, self.nprobe).to(dev)
            if tail:
                tid = self.tail_ids(s, by, bx, m)
                # window pixels x and x^2 of the draws, float64, once per block: [m, 2P] (P = C h w); a
                # location's crop is a 0/1 mask over the window, so crop dot products are GEMMs with it
                xt = window_u8(self.data, tid, win).to(torch.float64).flatten(1) / 127.5 - 1
                xaug = torch.cat([xt, xt * xt], 1)
                mask = local.masks()[:, None].expand(-1, c, -1, -1).flatten(1).to(xt)  # [K, P]
            # query chunks bound memory: the einsum below may materialise [r, k, C, K, s, s]
            per_query = k * c * max((r1 - r0) * (c1 - c0), ph * pw * s * s) + (len(tid) * ph * pw * 4 if tail else 0)
            step = max(1, 4 * CHUNK_ELEMENTS // per_query)
            for q0 in range(0, b, step):
                q = slice(q0, min(q0 + step, b))
                qid, valid = ids[q].clamp_min(0), ids[q] >= 0
                # 2. exact logits of the candidates at every location of the block, location-major [K, r, k]
                xc = window_u8(self.data, qid, win).to(dt) / 127.5 - 1
                lc = -crop_sq_dists(zw[q], xc, local).to(torch.float64) * inv2t2[q][:, None, None]
                lc = lc.masked_fill(~valid[..., None], -math.inf)
                lc = lc.permute(2, 0, 1).contiguous()
                sm = OnlineSoftmax(dim=2)
                wc = sm.update(lc)
                m_cand = sm.m
                # 3. the uniform tail, candidates' terms zeroed, weight N/m. Its logits -a ||z_k - x_k||^2
                # (a = 1/2t^2) = 2a z_k.x - a mask_k.x^2 - a ||z_k||^2 are one float64 GEMM: [K, r, m]
                if tail:
                    a2 = inv2t2[q][None, :, None]
                    zq = zw[q].to(torch.float64).flatten(1)[None] * mask[:, None]  # [K, r, P]: z on crop k
                    zaug = torch.cat([2 * a2 * zq, -a2 * mask[:, None].expand_as(zq)], 2).flatten(0, 1)
                    lt = torch.addmm(-(a2 * (zq * zq).sum(2, keepdim=True)).flatten(0, 1), zaug, xaug.T)
                    lt = lt.view(len(mask), -1, len(tid))
                    outside = ~isin_rows(ids[q], tid)
                    wt = outside.to(torch.float64) * (1.0 if exact_tail else n / len(tid))
                    wtail = sm.update(lt, weights=wt[None])
                # 4. normalised weights -> each location's patch mean -> summed into the window / coverage
                wk = wc * (torch.exp(m_cand - sm.m) / sm.z)[..., None]  # [K, r, k]
                if on_weights is not None:  # per-pixel weights, only when asked (attribution)
                    on_weights(q, qid, local.uncrop(wk.permute(1, 2, 0)) * inv_cov[r0:r1, c0:c1], win)
                xu = xc.unfold(-2, s, 1).unfold(-2, s, 1)  # [r, k, C, ph, pw, s, s], a view
                wr = wk.permute(1, 2, 0).to(dt).unflatten(-1, (ph, pw))
                means = torch.einsum("rnyx,rncyxuv->rcyxuv", wr, xu).to(torch.float64)
                acc = torch.zeros(means.shape[0], c, r1 - r0, c1 - c0, dtype=torch.float64, device=dev)
                for u in range(s):
                    for v in range(s):
                        acc[:, :, u:u + ph, v:v + pw] += means[..., u, v]
                if tail:
                    # each location's weighted sum of whole windows, kept on its crop, summed over locations
                    wtail_n = wtail / sm.z[..., None]  # [K, r, m]
                    if on_weights is not None:
                        on_weights(q, tid.expand(len(qid), -1),
                                   local.uncrop(wtail_n.permute(1, 2, 0)) * inv_cov[r0:r1, c0:c1], win)
                    acc += ((wtail_n @ xt) * mask[:, None]).sum(0).reshape(acc.shape)
                out[q, :, r0:r1, c0:c1] += acc * inv_cov[r0:r1, c0:c1]
                # report per location ([K, r] -> [r, ph, pw]): certificate-style bound of the top-k part,
                # tail relative SE, log normaliser
                grid = lambda v: v.T.reshape(-1, ph, pw).cpu()  # noqa: E731
                kv = valid.sum(1)[None]
                if k < n:
                    log_rest = torch.log((n - kv).clamp_min(1).to(torch.float64)) + \
                        lc.masked_fill(~valid[None], math.inf).amin(2)
                    eps_bar[q, r0:r0 + ph, c0:c0 + pw] = grid(torch.sigmoid(log_rest - torch.logsumexp(lc, 2))
                                                              * (kv < n))
                if tail and not exact_tail and len(tid) > 1:
                    y = wtail * (len(tid) / n)  # exp(l - max) of the draws, zero where a candidate
                    est = (wc * torch.exp(m_cand - sm.m)[..., None]).sum(2) + n * y.mean(2)
                    rel_se[q, r0:r0 + ph, c0:c0 + pw] = grid(n * y.std(2) / math.sqrt(len(tid)) / est)
                log_z[q, r0:r0 + ph, c0:c0 + pw] = grid(sm.logsumexp())
        if world > 1:
            for x in (out, eps_bar, rel_se, log_z):
                all_reduce_sum(x)
        rep = {"path": "retrieval", "s": s, "k": k, "tail": self.tail, "m": m, "kind": self.bundle.kind,
               "stride": self.bundle.stride, "nprobe": self.nprobe or self.bundle.manifest.get("nprobe"),
               "certified": self.certified, "eps_bar": eps_bar, "log_z": log_z,
               "rel_se": rel_se if self.tail == "sample" else None}
        return out.to(z.dtype), rep
