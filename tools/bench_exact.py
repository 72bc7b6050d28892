"""Benchmark: exact PSPC-Square (one pass over the data for all positions) against the per-position
loop of the published code (one streaming pass over the data, in chunks of 100 images, per crop).

Prints JSON. `--quick` shrinks everything for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from pspc_index.geometry import SquareCrops
from pspc_index.posterior import OnlineSoftmax, composite_mean, empirical_mean
from pspc_index.store import TrainingSet


def loop_pspc_square(z, t, data: TrainingSet, s: int, chunk: int = 100):
    """The published algorithm: for every crop position, a streaming softmax over all images."""
    b, c, h, w = z.shape
    out = torch.zeros_like(z, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h - s + 1):
        for x in range(w - s + 1):
            zp = z[:, :, y:y + s, x:x + s].reshape(b, -1)
            sm = OnlineSoftmax(dim=1)
            for _, imgs in data.chunks(chunk):
                xp = imgs[:, :, y:y + s, x:x + s].reshape(len(imgs), -1)
                d = ((zp[:, None] - xp[None]) ** 2).sum(-1)
                sm.update(-d / (2 * t ** 2), lambda wts: wts @ xp)
            out[:, :, y:y + s, x:x + s] += sm.mean().reshape(b, c, s, s)
            count[y:y + s, x:x + s] += 1
    return (out / count).float()


def exact(z, t, data, s):
    h, w = z.shape[2:]
    return empirical_mean(z, t, data) if s == h else composite_mean(z, t, data, SquareCrops(h, w, s))


def timed(f, *args, **kwargs):
    t0 = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t0


def peak_memory_child(n_stored: int, batch: int, s: int, t: float) -> None:
    """Run one exact call on Fashion-MNIST-sized data and print peak RSS (GB)."""
    from pspc_index.ingest import read_source

    images = torch.from_numpy(read_source("fashion-mnist").images[:n_stored].copy())
    data = TrainingSet(images, xflip=True)
    g = torch.Generator().manual_seed(0)
    z = data.get(torch.randint(0, len(data), (batch,), generator=g)) + t * torch.randn(batch, 1, 28, 28, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, secs = timed(exact, z, t, data, s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n_with_flips": len(data), "batch": batch, "s": s, "t": t, "seconds": round(secs, 2),
                      "peak_rss_gb": round(peak / 2**20, 3), "rss_before_call_gb": round(base / 2**20, 3)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="3,7,15,23,32")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--t", type=float, default=1.0)
    p.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        n, b, s, t = a.memory_child
        return peak_memory_child(int(n), int(b), int(s), float(t))
    n, batch, res = (200, 4, 12) if a.quick else (a.n, a.batch, 32)
    sizes = [min(int(s), res) for s in a.sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    data = TrainingSet(torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g), xflip=False)
    z = data.get(torch.randint(0, n, (batch,), generator=g)) + a.t * torch.randn(batch, 3, res, res, generator=g)
    rows = []
    for s in sizes:
        fast, t_fast = timed(exact, z, a.t, data, s)
        slow, t_loop = timed(loop_pspc_square, z, a.t, data, s)
        rows.append({"s": s, "positions": (res - s + 1) ** 2, "exact_s": round(t_fast, 3), "loop_s": round(t_loop, 3),
                     "speedup": round(t_loop / t_fast, 2), "max_abs_diff": float((fast - slow).abs().max())})
        print(json.dumps(rows[-1]), file=sys.stderr)
    mem_args = ["600", "4", "5", "0.585"] if a.quick else ["60000", "64", "5", "0.585"]
    mem = subprocess.run([sys.executable, __file__, "--memory-child", *mem_args], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    print(json.dumps({"data": f"{n} random {res}x{res} RGB images, no flips", "batch": batch, "t": a.t,
                      "threads": torch.get_num_threads(), "rows": rows, "peak_memory": json.loads(mem)}, indent=1))


if __name__ == "__main__":
    main()
