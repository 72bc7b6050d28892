"""Benchmark: retrieval PSPC-Square (index bundle, exact rescoring) against the exact engine.

For each (t, s) pair of the Fashion-MNIST schedule below full size: build time and bundle bytes against
the store, then per estimator (top-k only; top-k + uniform tail) seconds per call, composite MSE and max
abs error against the exact path, and the reported eps_bar / tail relative SE next to them. Prints JSON.
The data set is the first `--n-data` Fashion-MNIST training images plus flips.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pspc_index.denoisers import PSPCSquare
from pspc_index.index import build_bundle, open_bundle
from pspc_index.ingest import read_source
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.schedule import FASHION_MNIST
from pspc_index.store import write_store


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n-data", type=int, default=5000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--kind", default="sq8")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--sizes", default="3,5,7", help="patch sizes to measure (each at its schedule t)")
    a = p.parse_args()
    src = read_source("fashion-mnist")
    grid = FASHION_MNIST.grid.tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s.zarr", src.images[:a.n_data], source="fashion-mnist subset")
        data = store.training_set()
        sizes = [int(s) for s in a.sizes.split(",")]
        t0 = time.perf_counter()
        build_bundle(store.path, Path(tmp) / "b", sizes, stride=a.stride, kind=a.kind, progress=False)
        build_s = time.perf_counter() - t0
        bundle = open_bundle(Path(tmp) / "b", store)
        g = torch.Generator().manual_seed(0)
        for s in sizes:
            # the largest grid t at which the schedule uses this size
            t = max(tt for tt, ss in zip(grid, FASHION_MNIST.patch_sizes) if ss == s)
            idx = torch.randint(0, len(data), (a.batch,), generator=g)
            z = data.get(idx) + t * torch.randn(a.batch, *data.shape, generator=g)
            t1 = time.perf_counter()
            exact = PSPCSquare(data, patch_size=s)(z, t)
            exact_s = time.perf_counter() - t1
            for tail in ("none", "sample"):
                den = RetrievalPSPC(data, bundle, k=a.k, tail=tail, m=a.m, patch_size=s)
                t1 = time.perf_counter()
                got = den(z, t)
                secs = time.perf_counter() - t1
                rep = den.last_report[s]
                err = got - exact
                rows.append({"s": s, "t": round(t, 4), "tail": tail, "k": a.k, "m": a.m if tail == "sample" else 0,
                             "seconds": round(secs, 2), "exact_seconds": round(exact_s, 2),
                             "speedup": round(exact_s / secs, 2), "mse_vs_exact": float((err ** 2).mean()),
                             "max_abs_vs_exact": float(err.abs().max()),
                             "eps_bar_median": float(rep["eps_bar"].median()),
                             "eps_bar_max": float(rep["eps_bar"].max()),
                             "rel_se_max": None if rep["rel_se"] is None else float(rep["rel_se"].max()),
                             "certified": rep["certified"]})
                print(json.dumps(rows[-1]), file=__import__("sys").stderr)
        out = {"data": f"first {a.n_data} Fashion-MNIST images + flips ({len(data)})", "batch": a.batch,
               "kind": a.kind, "stride": a.stride, "threads": torch.get_num_threads(),
               "build_seconds": round(build_s, 1), "bundle_bytes": dir_bytes(Path(tmp) / "b"),
               "store_pixel_bytes": int(np.prod(store.images.shape)), "rows": rows}
    out["bundle_over_store_per_size"] = round(out["bundle_bytes"] / out["store_pixel_bytes"] / len(sizes), 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
