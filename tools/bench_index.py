"""Benchmark: retrieval PSPC-Square (index bundles, exact rescoring) against the exact engine.

On Fashion-MNIST (the first --n-data training images, 0 = all 60,000, plus flips), for every grid t of
the default 18-step schedule whose patch size is below full size, one batch of forward-process queries
z = x + t eps. Per index kind: build seconds and bundle bytes against the store's pixel bytes, per size.
Per (t, kind, estimator) -- top-k only, top-k + uniform tail: seconds per call against the exact path,
composite MSE and max abs error against it, recall@k of the candidates against the exact top-k (at
--recall-positions sampled positions per t), and the reported eps_bar / tail relative SE beside the
measured error. Prints JSON; --markdown writes the table for the README.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pspc_index.denoisers import PSPCSquare
from pspc_index.index import blocks, build_bundle, open_bundle
from pspc_index.ingest import read_source
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.schedule import FASHION_MNIST
from pspc_index.store import write_store


def dir_bytes(path: Path, prefix: str = "") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(f"{prefix}*") if f.is_file())


def recall_at_k(data, bundle, z, s, k, positions, nprobe, g) -> float:
    """Mean over queries and sampled positions of |candidates of the block & exact top-k| / k."""
    c, h, w = data.shape
    gh, gw = h - s + 1, w - s + 1
    allx = data.get(torch.arange(len(data)))
    hits = []
    for _ in range(positions):
        py, px = int(torch.randint(0, gh, (1,), generator=g)), int(torch.randint(0, gw, (1,), generator=g))
        by, bx = py // bundle.stride, px // bundle.stride
        win = next(wn for yy, xx, wn in blocks(h, w, s, bundle.stride) if (yy, xx) == (by, bx))
        r0, r1, c0, c1 = win
        cand = bundle.search(s, by, bx, z[:, :, r0:r1, c0:c1].flatten(1), k, nprobe)
        zp = z[:, :, py:py + s, px:px + s].flatten(1)
        d = ((allx[None, :, :, py:py + s, px:px + s].flatten(2) - zp[:, None]) ** 2).sum(2)  # [B, N]
        top = d.topk(k, largest=False).indices
        for a, b in zip(cand, top):
            hits.append(len(np.intersect1d(a.numpy(), b.numpy())) / k)
    return float(np.mean(hits))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n-data", type=int, default=0, help="stored images used (0 = all 60,000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--ms", default="4096", help="tail sample sizes to measure (comma-separated)")
    p.add_argument("--kinds", default="sq8,ivf-pq")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--ts", default=None, help="comma-separated grid indices (default: every t with s < H)")
    p.add_argument("--recall-positions", type=int, default=8)
    p.add_argument("--markdown", default=None, help="also write the table here")
    a = p.parse_args()
    src = read_source("fashion-mnist")
    images = src.images if a.n_data == 0 else src.images[:a.n_data]
    sched = FASHION_MNIST
    grid, sizes_t = sched.grid.tolist(), [int(s) for s in sched.patch_sizes]
    steps = [i for i, s in enumerate(sizes_t) if s < 28]
    if a.ts:
        steps = [int(i) for i in a.ts.split(",")]
    sizes = sorted({sizes_t[i] for i in steps})
    kinds = a.kinds.split(",")
    rows, builds = [], {}
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s.zarr", images, source="fashion-mnist")
        data = store.training_set()
        pixel_bytes = int(np.prod(store.images.shape))
        bundles = {}
        for kind in kinds:
            t0 = time.perf_counter()
            man = build_bundle(store.path, Path(tmp) / kind, sizes, stride=a.stride, kind=kind, progress=False)
            builds[kind] = {"seconds": round(time.perf_counter() - t0, 1), "nlist": man["nlist"],
                            "over_store_per_size": {s: round(dir_bytes(Path(tmp) / kind, f"s{s}_") / pixel_bytes, 2)
                                                    for s in sizes}}
            print(json.dumps({kind: builds[kind]}), file=sys.stderr, flush=True)
            bundles[kind] = open_bundle(Path(tmp) / kind, store)
        for i in steps:
            t, s = grid[i], sizes_t[i]
            idx = torch.randint(0, len(data), (a.batch,), generator=g)
            z = data.get(idx) + t * torch.randn(a.batch, *data.shape, generator=g)
            t1 = time.perf_counter()
            exact = PSPCSquare(data, patch_size=s)(z, t)
            exact_s = time.perf_counter() - t1
            for kind in kinds:
                rec = recall_at_k(data, bundles[kind], z, s, a.k, a.recall_positions, a.nprobe, g)
                for tail, m in [("none", 0)] + [("sample", int(v)) for v in a.ms.split(",")]:
                    den = RetrievalPSPC(data, bundles[kind], k=a.k, tail=tail, m=max(m, 1), patch_size=s,
                                        nprobe=a.nprobe)
                    t1 = time.perf_counter()
                    got = den(z, t)
                    secs = time.perf_counter() - t1
                    rep = den.last_report[s]
                    err = (got - exact).double()
                    rows.append({"step": i, "t": round(t, 4), "s": s, "kind": kind, "tail": tail, "k": a.k,
                                 "m": m, "recall_at_k": round(rec, 3),
                                 "seconds": round(secs, 2), "exact_seconds": round(exact_s, 2),
                                 "speedup": round(exact_s / secs, 1), "mse_vs_exact": float((err ** 2).mean()),
                                 "max_abs_vs_exact": float(err.abs().max()),
                                 "eps_bar_median": float(rep["eps_bar"].median()),
                                 "eps_bar_max": float(rep["eps_bar"].max()),
                                 "rel_se_median": None if rep["rel_se"] is None else float(rep["rel_se"].median()),
                                 "rel_se_max": None if rep["rel_se"] is None else float(rep["rel_se"].max()),
                                 "certified": rep["certified"]})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {"data": f"{len(images)} Fashion-MNIST images + flips (N = {2 * len(images)})", "batch": a.batch,
           "stride": a.stride, "k": a.k, "ms": a.ms, "nprobe": a.nprobe, "threads": torch.get_num_threads(),
           "builds": builds, "rows": rows}
    print(json.dumps(out, indent=1))
    if a.markdown:
        lines = ["| t | s | index | tail m | recall@k | s/call | exact s/call | speedup | MSE vs exact | max abs "
                 "| eps_bar median / max | tail rel. SE median / max |", "|" + "---|" * 12]
        for r in rows:
            se = "-" if r["rel_se_max"] is None else f"{r['rel_se_median']:.2g} / {r['rel_se_max']:.2g}"
            lines.append(f"| {r['t']} | {r['s']} | {r['kind']} | {r['m'] or 'none'} | {r['recall_at_k']} | {r['seconds']} "
                         f"| {r['exact_seconds']} | {r['speedup']}x | {r['mse_vs_exact']:.1e} "
                         f"| {r['max_abs_vs_exact']:.2g} | {r['eps_bar_median']:.2g} / {r['eps_bar_max']:.2g} "
                         f"| {se} |")
        Path(a.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
