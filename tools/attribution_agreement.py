"""Exact against retrieval attribution on Fashion-MNIST: do the two paths name the same top-m images?

Queries: --queries images (uint8 .npy, e.g. samples) or the first --n training images shifted by one
pixel (so no query is itself a training image). For each t: z = x + t eps (seeded), attribution over
all N = 120,000 virtual images on the exact path and through an index bundle (built here for the
schedule's patch sizes at those t, or given with --bundle), for each tail estimator. Reports the mean
top-m overlap (|exact top-m & retrieval top-m| / m), the share the exact top-m hold, and the seconds
of each path. Prints JSON.
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

from pspc_index.attribution import attribute_image
from pspc_index.denoisers import PSPCSquare
from pspc_index.index import build_bundle, open_bundle
from pspc_index.ingest import read_source
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.schedule import FASHION_MNIST
from pspc_index.store import write_store


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n-data", type=int, default=0, help="stored images (0 = all 60,000)")
    p.add_argument("--queries", default=None)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--ts", default="0.3,0.08,0.02")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--kind", default="ivf-pq")
    a = p.parse_args()
    src = read_source("fashion-mnist")
    images = src.images if a.n_data == 0 else src.images[:a.n_data]
    if a.queries:
        q = np.load(a.queries)[:a.n]
        x = torch.from_numpy(q.astype(np.float32) / 127.5 - 1 if q.dtype == np.uint8 else q.astype(np.float32))
    else:
        x = torch.from_numpy(np.roll(images[:a.n], 1, axis=-1).astype(np.float32) / 127.5 - 1)
    ts = [float(v) for v in a.ts.split(",")]
    size_of = {t: int(FASHION_MNIST.patch_size(torch.tensor([t])).item()) for t in ts}
    sizes = sorted(set(size_of.values()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s.zarr", images, source="fashion-mnist")
        data = store.training_set()
        build_bundle(store.path, Path(tmp) / "b", [s for s in sizes if s < 28], kind=a.kind, progress=False)
        bundle = open_bundle(Path(tmp) / "b", store)
        for t in ts:
            t0 = time.perf_counter()
            ex, shares, _ = attribute_image(PSPCSquare(data), x, t, seed=0, top=a.top)
            ex_s = time.perf_counter() - t0
            for tail in ("none", "sample"):
                den = RetrievalPSPC(data, bundle, k=a.k, tail=tail, m=a.m)
                t0 = time.perf_counter()
                rt, _, _ = attribute_image(den, x, t, seed=0, top=a.top)
                rt_s = time.perf_counter() - t0
                overlap = [len({(e["index"], e["flip"]) for e in u} & {(e["index"], e["flip"]) for e in v}) / a.top
                           for u, v in zip(ex, rt)]
                rows.append({"t": t, "s": size_of[t], "tail": tail, "top": a.top,
                             "overlap_mean": round(float(np.mean(overlap)), 3), "overlap": overlap,
                             "exact_top_share_mean": round(float(np.mean([sum(e["share"] for e in u) for u in ex])), 4),
                             "retrieval_top_share_mean": round(float(np.mean([sum(e["share"] for e in v) for v in rt])), 4),
                             "exact_seconds": round(ex_s, 1), "retrieval_seconds": round(rt_s, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"data": f"{len(images)} Fashion-MNIST images + flips", "queries": len(x), "kind": a.kind,
                      "k": a.k, "m": a.m, "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
