"""PSPC-Square with retrieval (DESIGN.md section 2): top-k candidates from an index bundle, rescored
exactly from the uint8 store, plus an optional uniform tail sample (Niedoba et al. 2024).

Per s and anchor block: one FAISS search on the block's union-window query patch gives k candidate ids
per query. For every position of the block, the candidates' exact squared distances (direct
differences of the stored uint8 pixels; FAISS distances never enter the softmax) are folded into the
position's OnlineSoftmax with weight 1; with tail="sample", m ids drawn uniformly (with replacement)
from all N, seeded by (seed, s, position) and shared by all queries, enter with weight N/m, their terms
zeroed where the id is one of the query's candidates: an unbiased estimate of the rest's normaliser.

Report (`last_report[s]`): eps_bar = (N-k) e^{l_k} / (Z_k + (N-k) e^{l_k}) per query and position
from the top-k part. It bounds the neglected mass only if the k are the true k nearest of that
position; that holds for a flat index with stride 1 ("certified": True). With union windows
(stride > 1) or sq8 codes the candidates are the nearest by another distance, so eps_bar is an estimate,
not a certificate. With tail="sample", rel_se is the estimated relative standard error of the
normaliser estimate (0 when m >= N: then the tail is every image, exactly); log_z is the log of the
normaliser used (max-shifted logits as in OnlineSoftmax, i.e. log sum of e^{-d/2t^2}).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .denoisers import PSPCSquare
from .errors import UserError
from .geometry import SquareCrops
from .index import Bundle, blocks, window_u8
from .posterior import OnlineSoftmax, composite_mean, empirical_mean
from .schedule import Schedule
from .store import TrainingSet


class RetrievalPSPC(PSPCSquare):
    name = "pspc-square+index"

    def __init__(self, data: TrainingSet, bundle: Bundle, k: int = 1024, tail: str = "sample", m: int = 4096,
                 seed: int = 0, patch_size: int | None = None, schedule: Schedule | None = None,
                 tol: float | None = None, dtype=torch.float32):
        super().__init__(data, patch_size=patch_size, schedule=schedule)
        if tail not in ("sample", "none"):
            raise UserError(f"--tail must be 'sample' or 'none', got {tail!r}")
        if k < 1 or m < 1:
            raise UserError(f"k and m must be >= 1, got k={k}, m={m}")
        if list(bundle.manifest["shape"][1:]) != list(data.shape) or bundle.xflip != data.xflip:
            raise UserError(f"{bundle.path}: built for {bundle.manifest['shape']} with xflip={bundle.xflip}, "
                            f"the training set is {list(data.shape)} with xflip={data.xflip}")
        self.bundle, self.k, self.tail, self.m, self.seed, self.tol = bundle, k, tail, m, seed, tol
        self.dtype = dtype
        self.certified = bundle.kind == "flat" and bundle.stride == 1
        self.last_report: dict[int, dict] = {}
        self._tail_ids: dict[tuple[int, int, int], torch.Tensor] = {}

    def denoise(self, z, t):
        self.last_report = {}
        return super().denoise(z, t)

    def patch_mean(self, z, t, s):
        h, w = self.data.shape[1:]
        if s >= max(h, w):
            return empirical_mean(z, t, self.data)
        if s not in self.bundle.patch_sizes:
            self.last_report[s] = {"path": "exact (s not in bundle)"}
            return composite_mean(z, t, self.data, SquareCrops(h, w, s))
        out, rep = self.retrieve(z, t, s)
        bad = rep["eps_bar"].max().item() if self.tail == "none" else rep["rel_se"].max().item()
        if self.tol is not None and bad > self.tol:
            rep["path"] = f"exact (fallback: {'eps_bar' if self.tail == 'none' else 'rel_se'} {bad:.3g} > tol)"
            out = composite_mean(z, t, self.data, SquareCrops(h, w, s))
        self.last_report[s] = rep
        return out

    def tail_ids(self, s: int, py: int, px: int) -> torch.Tensor:
        """The position's m uniform ids, seeded by (seed, s, position): the same for every query."""
        key = (s, py, px)
        if key not in self._tail_ids:
            state = np.random.SeedSequence([self.seed, s, py, px]).generate_state(2)
            g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            n = len(self.data)
            ids = torch.arange(n) if self.m >= n else torch.randint(0, n, (self.m,), generator=g)
            self._tail_ids[key] = ids.to(self.device)
        return self._tail_ids[key]

    def retrieve(self, z, t, s):
        c, h, w = self.data.shape
        n, b, dt = len(self.data), z.shape[0], self.dtype
        k = min(self.k, n)
        crops = SquareCrops(h, w, s)
        gh, gw = crops.grid
        inv2t2 = (1 / (2 * t.to(torch.float64) ** 2)).to(self.device)[:, None]  # [B, 1]
        acc = torch.zeros(b, c, h, w, dtype=torch.float64, device=z.device)
        eps_bar = torch.zeros(b, gh, gw, dtype=torch.float64)
        rel_se = torch.zeros(b, gh, gw, dtype=torch.float64)
        log_z = torch.zeros(b, gh, gw, dtype=torch.float64)
        exact_tail = self.tail == "sample" and self.m >= n
        for by, bx, win in blocks(h, w, s, self.bundle.stride):
            r0, r1, c0, c1 = win
            # 1. k candidates per query from the block's union-window index
            q = z[:, :, r0:r1, c0:c1].flatten(1).to(torch.float32).cpu().numpy()
            _, ids = self.bundle.index(s, by, bx).search(np.ascontiguousarray(q), k)
            ids = torch.from_numpy(ids).to(self.device)
            if (ids < 0).any():
                raise UserError(f"{self.bundle.path}: index returned fewer than k={k} candidates")
            cand = window_u8(self.data, ids, win).to(dt) / 127.5 - 1  # [B, k, C, wh, ww]
            ids_sorted = ids.sort(1).values
            for py in range(r0, min(r0 + self.bundle.stride, gh)):
                for px in range(c0, min(c0 + self.bundle.stride, gw)):
                    oy, ox = py - r0, px - c0
                    zp = z[:, :, py:py + s, px:px + s].to(dt)
                    xc = cand[:, :, :, oy:oy + s, ox:ox + s].flatten(2)  # [B, k, D]
                    # 2. exact logits of the candidates, direct differences
                    d = ((xc - zp.flatten(1)[:, None]) ** 2).sum(2).to(torch.float64)
                    lc = -d * inv2t2  # [B, k]
                    sm = OnlineSoftmax(dim=1)
                    sm.update(lc, lambda wt: torch.einsum("bk,bkd->bd", wt.to(dt), xc).to(torch.float64))
                    # 3. certificate-style bound of the top-k part (see the module docstring)
                    if k < n:
                        log_rest = math.log(n - k) + lc.amin(1)
                        eps_bar[:, py, px] = torch.sigmoid(log_rest - torch.logsumexp(lc, 1)).cpu()
                    # 4. uniform tail, candidates' terms zeroed, weight N/m
                    if self.tail == "sample" and k < n:
                        tid = self.tail_ids(s, py, px)
                        xt = window_u8(self.data, tid, (py, py + s, px, px + s)).to(dt).flatten(1) / 127.5 - 1
                        dtl = ((xt[None] - zp.flatten(1)[:, None]) ** 2).sum(2).to(torch.float64)
                        lt = -dtl * inv2t2  # [B, m]
                        pos = torch.searchsorted(ids_sorted, tid.expand(b, -1).contiguous()).clamp(max=k - 1)
                        outside = (ids_sorted.gather(1, pos) != tid[None]).to(torch.float64)
                        wgt = outside * (1.0 if exact_tail else n / len(tid))
                        sm.update(lt, lambda wt: (wt.to(dt) @ xt).to(torch.float64), weights=wgt)
                        if not exact_tail and len(tid) > 1:
                            ref = torch.maximum(lc.amax(1), lt.amax(1))[:, None]
                            y = torch.exp(lt - ref) * outside
                            zk = torch.exp(lc - ref).sum(1)
                            est = zk + n * y.mean(1)
                            rel_se[:, py, px] = (n * y.std(1) / math.sqrt(len(tid)) / est).cpu()
                    # 5. composite: add the patch mean where the crop sits
                    acc[:, :, py:py + s, px:px + s] += sm.mean().reshape(b, c, s, s)
                    log_z[:, py, px] = sm.logsumexp().cpu()
        out = acc / crops.coverage.to(acc.device)
        rep = {"path": "retrieval", "s": s, "k": k, "tail": self.tail, "m": self.m, "kind": self.bundle.kind,
               "stride": self.bundle.stride, "certified": self.certified, "eps_bar": eps_bar,
               "log_z": log_z, "rel_se": rel_se if self.tail == "sample" else None}
        return out.to(z.dtype), rep
