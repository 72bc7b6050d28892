"""Which formulation of the exact kernel serves a first pass: the fused CPU attention op against the GEMM
tiles, by queries per location (posterior.FUSED_MIN_ROWS is set from this).

PSPC-Square on the first --n-data Fashion-MNIST images (+ flips), t = 0.5, patches cached, both formulations
forced in turn on the same z; each cell is the best of --repeats calls. Prints JSON rows.

    OMP_NUM_THREADS=1 python tools/bench_dispatch.py --json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pspc_index import posterior
from pspc_index.ingest import read_source
from pspc_index.store import TrainingSet


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n-data", type=int, default=10000)
    p.add_argument("--sizes", default="3,5,9,13")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = TrainingSet(torch.from_numpy(read_source("fashion-mnist").images[:a.n_data].copy()), xflip=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in map(int, a.sizes.split(",")):
        for b in map(int, a.batches.split(",")):
            z = torch.randn(b, *data.shape, generator=g) * 0.5
            t = torch.full((b,), 0.5, dtype=torch.float64)
            posterior.square_composite(z, t, data, s)  # caches this size's patches
            sec = {}
            for name, min_rows in (("fused", 1), ("tiles", 10 ** 9)):
                posterior.FUSED_MIN_ROWS = min_rows
                sec[name] = timed(lambda: posterior.square_composite(z, t, data, s), a.repeats)
            rows.append({"s": s, "batch": b, "rows_per_location": 2 * b, "fused_s": round(sec["fused"], 3),
                         "tiles_s": round(sec["tiles"], 3), "tiles_speedup": round(sec["fused"] / sec["tiles"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"n_data": a.n_data, "threads": a.threads, "t": 0.5, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
