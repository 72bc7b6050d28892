"""Benchmark: 18-step Euler sampling of Fashion-MNIST images (all 60,000 + flips, N = 120,000).

Measures, on this machine: the retrieval path (index bundle, k candidates + uniform tail) drawing --n
samples in batches of --batch; the exact engine drawing --exact-n samples (the first --exact-n of the
same run: identical initial noise, so their difference is the retrieval error after 18 steps); and the
naive per-position loop (the published algorithm, tools/bench_exact.py) timed for one query at every
distinct patch size on a --loop-n-data subset, scaled linearly in N and in the number of samples
(its cost is linear in both). Reports images/s, the ratios, and peak RSS against `estimate_memory` (what --batch auto uses).
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_exact import loop_pspc_square, timed  # noqa: E402

from pspc_index.denoisers import PSPCSquare  # noqa: E402
from pspc_index.distributed import estimate_memory  # noqa: E402
from pspc_index.index import build_bundle, open_bundle  # noqa: E402
from pspc_index.ingest import read_source  # noqa: E402
from pspc_index.retrieval import RetrievalPSPC  # noqa: E402
from pspc_index.sampler import sample  # noqa: E402
from pspc_index.schedule import FASHION_MNIST, karras_grid  # noqa: E402
from pspc_index.store import TrainingSet, write_store  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--n-data", type=int, default=0, help="stored images (0 = all 60,000)")
    p.add_argument("--exact-n", type=int, default=2)
    p.add_argument("--loop-n-data", type=int, default=1000)
    p.add_argument("--kind", default="sq8")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--tail", default="sample")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    src = read_source("fashion-mnist")
    images = src.images if a.n_data == 0 else src.images[:a.n_data]
    sched = FASHION_MNIST
    ts = karras_grid(a.steps)  # Euler calls the denoiser once at each grid t
    sizes = [sched.patch_size(torch.tensor([float(t)])).item() for t in ts]
    out = {"data": f"{len(images)} Fashion-MNIST images + flips (N = {2 * len(images)})", "steps": a.steps,
           "threads": torch.get_num_threads(), "device": a.device}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s.zarr", images, source="fashion-mnist")
        data = store.training_set(device=a.device)
        man, build_s = timed(build_bundle, store.path, Path(tmp) / "b", sched.sizes_below_full(), kind=a.kind,
                             progress=False)
        den = RetrievalPSPC(data, open_bundle(Path(tmp) / "b", store), k=a.k, tail=a.tail, m=a.m, schedule=sched)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ret, ret_s = timed(sample, den, a.n, 0, steps=a.steps, batch=a.batch, progress=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        out["retrieval"] = {"kind": a.kind, "k": a.k, "m": a.m, "tail": a.tail, "samples": a.n, "batch": a.batch,
                            "build_seconds": round(build_s, 1), "seconds": round(ret_s, 1),
                            "images_per_s": round(a.n / ret_s, 4), "peak_rss_gb": round(peak, 2),
                            "rss_before_gb": round(base_rss / 2 ** 20, 2),
                            "estimated_peak_gb": round(estimate_memory(den, a.batch, a.steps, False) / 2 ** 30, 2)}
        print(json.dumps(out["retrieval"]), file=sys.stderr, flush=True)
        if a.exact_n == 0:  # --exact-n 0 skips the exact and loop parts (to re-time retrieval only)
            print(json.dumps(out, indent=1))
            return
        ex, ex_s = timed(sample, PSPCSquare(data, schedule=sched), a.exact_n, 0, steps=a.steps, batch=a.exact_n,
                         progress=True)
        err = (ret[:a.exact_n] - ex).double()
        out["exact"] = {"samples": a.exact_n, "seconds": round(ex_s, 1), "images_per_s": round(a.exact_n / ex_s, 5),
                        "retrieval_vs_exact_sample_mse": float((err ** 2).mean()),
                        "retrieval_vs_exact_sample_max_abs": float(err.abs().max())}
        print(json.dumps(out["exact"]), file=sys.stderr, flush=True)
    # naive loop: one query per distinct size on a subset, scaled to N and to one sample's calls
    sub = TrainingSet(torch.from_numpy(np.ascontiguousarray(images[:a.loop_n_data])), xflip=True)
    g = torch.Generator().manual_seed(0)
    per_size = {}
    for s in sorted(set(sizes)):
        t = float(ts[sizes.index(s)])
        z = sub.get(torch.randint(0, len(sub), (1,), generator=g)) + t * torch.randn(1, *sub.shape, generator=g)
        _, secs = timed(loop_pspc_square, z, t, sub, s)
        per_size[s] = secs * (2 * len(images)) / len(sub)
    loop_per_sample = sum(per_size[s] for s in sizes)
    out["naive_loop"] = {"subset_images": len(sub), "seconds_per_call_scaled": {str(s): round(v, 1)
                                                                               for s, v in per_size.items()},
                         "seconds_per_sample_scaled": round(loop_per_sample, 1),
                         "images_per_s": round(1 / loop_per_sample, 6)}
    out["speedup_vs_loop"] = {"exact": round(loop_per_sample / (ex_s / a.exact_n), 1),
                              "retrieval": round(loop_per_sample / (ret_s / a.n), 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
