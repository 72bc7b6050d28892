"""Benchmark of the exact engine (issue 10). Prints JSON; rows are appended to --state as they finish, so
a killed run resumes where it stopped (delete the state file to start over).

Sections (all timed in this one run, threads as set by OMP_NUM_THREADS for every side):
  loop     N = 4,000 random 32x32 RGB images (no flips), B = 32, t = 1, s in {3, 7, 15, 23, 32}: the exact
           engine (default: fused attention, certified logits; float32; the GEMM tiles formulation) on
           cached patches against the published per-position loop, and the floor: bare bmm + exp + bmm of
           the GEMM tiles' shapes in float32, nothing else.
  full     Fashion-MNIST, N = 60,000 + flips, B = 64, every s of the schedule at the grid t where it
           is first used: this engine (cold: patches unfolded in the call; warm: cached) against the
           engine of commit --old-ref in a git worktree, each in a subprocess for its peak RSS.
  samples  64 exact PSPC-Square samples, 18 Euler steps, N = 60,000 + flips, one batch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(f, *args, **kwargs):
    t0 = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t0


def loop_pspc_square(z, t, data, s: int, chunk: int = 100):
    """The published algorithm: for every crop position, one streaming softmax pass over all images."""
    b, c, h, w = z.shape
    out = torch.zeros_like(z, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h - s + 1):
        for x in range(w - s + 1):
            zp = z[:, :, y:y + s, x:x + s].reshape(b, -1)
            m, zsum, acc = None, None, None
            for _, imgs in data.chunks(chunk):
                xp = imgs[:, :, y:y + s, x:x + s].reshape(len(imgs), -1)
                lg = -((zp[:, None] - xp[None]) ** 2).sum(-1) / (2 * t ** 2)
                mn = lg.amax(1) if m is None else torch.maximum(m, lg.amax(1))
                wts = torch.exp(lg - mn[:, None])
                r = 0 if m is None else torch.exp(m - mn)
                zsum = wts.sum(1) + (0 if m is None else zsum * r)
                acc = wts @ xp + (0 if m is None else acc * r[:, None])
                m = mn
            out[:, :, y:y + s, x:x + s] += (acc / zsum[:, None]).reshape(b, c, s, s)
            count[y:y + s, x:x + s] += 1
    return (out / count).float()


def floor_seconds(data, b: int, s: int) -> float:
    """bmm + exp + bmm over the same tiles as the kernel (float32, keys and queries already in place)."""
    from pspc_index import posterior as P

    c, h, w = data.shape
    g, d, n = (h - s + 1) * (w - s + 1), c * s * s, P.KEYS_PER_TILE
    gt = max(1, P.TILE_ELEMENTS // (b * n))
    q, k = torch.randn(gt, b, d + 3) * 1e-3, torch.randn(gt, n, d + 3)
    t0 = time.perf_counter()
    for _ in range(0, len(data) if not data.xflip else data.n_stored, n):
        for g0 in range(0, g, gt):
            m = min(gt, g - g0)
            w_ = torch.bmm(q[:m], k[:m].transpose(1, 2)).exp_()
            torch.bmm(w_, k[:m, :, :d + 1])
    return time.perf_counter() - t0


def fmnist(n: int, xflip: bool = True):
    from pspc_index.ingest import read_source
    from pspc_index.store import TrainingSet

    return TrainingSet(torch.from_numpy(read_source("fashion-mnist").images[:n].copy()), xflip=xflip)


def child(engine: str, s: int, t: float, n: int, batch: int) -> None:
    """One exact PSPC-Square call (with this checkout or, via PYTHONPATH, an old one); prints JSON."""
    from pspc_index.denoisers import PSPCSquare

    data = fmnist(n)
    g = torch.Generator().manual_seed(0)
    z = data.get(torch.randint(0, len(data), (batch,), generator=g)) + t * torch.randn(batch, 1, 28, 28, generator=g)
    den = PSPCSquare(data, patch_size=s)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, cold = timed(den, z, t)
    row = {"engine": engine, "s": s, "t": t, "cold_s": round(cold, 3)}
    if engine == "new":
        again, warm = timed(den, z, t)
        row["warm_s"] = round(warm, 3)
        row["rerun_max_abs_diff"] = float((again - out).abs().max())
    torch.save(out, f"/tmp/bench_exact_{engine}_{s}.pt")
    row.update(peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
               rss_before_call_gb=round(base / 2 ** 20, 3))
    print(json.dumps(row))


def run_child(engine: str, old_tree: Path, s: int, t: float, n: int, batch: int) -> dict:
    env = dict(os.environ)
    if engine == "old":
        env["PYTHONPATH"] = str(old_tree)
    cmd = [sys.executable, __file__, "--child", engine, str(s), str(t), str(n), str(batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd="/tmp")
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_worktree(ref: str) -> Path:
    tree = Path(f"/tmp/pspc-old-{ref}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), ref],
                       check=True, capture_output=True)
    return tree


def section_loop(a, done):
    from pspc_index import posterior as P
    from pspc_index.denoisers import PSPCSquare
    from pspc_index.store import TrainingSet

    n, batch, res = (200, 4, 12) if a.quick else (4000, 32, 32)
    g = torch.Generator().manual_seed(0)
    data = TrainingSet(torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g), xflip=False)
    z = data.get(torch.randint(0, n, (batch,), generator=g)) + 1.0 * torch.randn(batch, 3, res, res, generator=g)
    for s in sorted({min(int(v), res) for v in a.sizes.split(",")}):
        if ("loop", s) in done:
            continue
        PSPCSquare(data, patch_size=s)(z[:1], 1.0)  # unfold this size's patches once (kept cached)
        fast, t_cert = timed(PSPCSquare(data, patch_size=s), z, 1.0)
        _, t_f32 = timed(PSPCSquare(data, patch_size=s, dtype=torch.float32), z, 1.0)
        P._USE_FUSED = False
        _, t_tiles = timed(PSPCSquare(data, patch_size=s), z, 1.0)
        P._USE_FUSED = True
        # the loop's small ops run fastest on one thread (two threads only wake each other): give it that
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        slow, t_loop = timed(loop_pspc_square, z, 1.0, data, s)
        torch.set_num_threads(threads)
        t_floor = floor_seconds(data, batch, s)
        yield {"section": "loop", "s": s, "positions": (res - s + 1) ** 2, "exact_s": round(t_cert, 3),
               "exact_float32_s": round(t_f32, 3), "gemm_tiles_s": round(t_tiles, 3), "loop_s": round(t_loop, 3),
               "floor_s": round(t_floor, 4),
               "loop_threads": 1, "speedup": round(t_loop / t_cert, 1), "vs_floor": round(t_cert / max(t_floor, 1e-6), 2),
               "float32_vs_floor": round(t_f32 / max(t_floor, 1e-6), 2), "max_abs_diff": float((fast - slow).abs().max())}


def section_full(a, done):
    from pspc_index.schedule import default_schedule

    sched = default_schedule(28, 28)
    n, batch = (600, 4) if a.quick else (60000, 64)
    firsts = {}
    for i, s in enumerate(sched.patch_sizes):
        firsts.setdefault(int(s), float(sched.grid[i]))
    tree = old_worktree(a.old_ref)
    for s, t in firsts.items():
        if ("full", s) in done:
            continue
        new = run_child("new", tree, s, t, n, batch)
        old = run_child("old", tree, s, t, n, batch)
        diff = float((torch.load(f"/tmp/bench_exact_new_{s}.pt") - torch.load(f"/tmp/bench_exact_old_{s}.pt")).abs().max())
        yield {"section": "full", "s": s, "t": round(t, 4), "n_with_flips": 2 * n, "batch": batch,
               "new_cold_s": new["cold_s"], "new_warm_s": new["warm_s"], "new_peak_rss_gb": new["peak_rss_gb"],
               "old_s": old["cold_s"], "old_peak_rss_gb": old["peak_rss_gb"],
               "speedup_cold": round(old["cold_s"] / max(new["cold_s"], 1e-3), 1),
               "speedup_warm": round(old["cold_s"] / max(new["warm_s"], 1e-3), 1), "max_abs_diff_vs_old": diff}


def section_samples(a, done):
    from pspc_index.denoisers import PSPCSquare
    from pspc_index.sampler import sample

    if ("samples", 0) in done:
        return
    n, count = (600, 4) if a.quick else (60000, 64)
    data = fmnist(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x, secs = timed(sample, PSPCSquare(data), count, 0, steps=18, solver="euler", batch=count)
    yield {"section": "samples", "s": 0, "n_with_flips": 2 * n, "samples": count, "steps": 18,
           "seconds": round(secs, 1), "per_sample_s": round(secs / count, 2),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
           "rss_before_gb": round(base / 2 ** 20, 3), "finite": bool(torch.isfinite(x).all())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--sections", default="loop,full,samples")
    p.add_argument("--sizes", default="3,7,15,23,32", help="loop section patch sizes")
    p.add_argument("--old-ref", default="e9c2d9a", help="commit of the engine to compare with (full section)")
    p.add_argument("--state", default=None, help="JSON-lines file of finished rows (default: none, no resume)")
    p.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        engine, s, t, n, b = a.child
        return child(engine, int(s), float(t), int(n), int(b))
    state = Path(a.state) if a.state else None
    rows = [json.loads(line) for line in state.read_text().splitlines()] if state and state.exists() else []
    done = {(r["section"], r["s"]) for r in rows}
    sections = {"loop": section_loop, "full": section_full, "samples": section_samples}
    for name in a.sections.split(","):
        for row in sections[name](a, done):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if state:
                with state.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"commit": commit, "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
