"""Scale run: a generated 1,000,000-image store (never committed), one patch size.

Three phases, each in its own process so each reports its own peak RSS:
  generate  --source fields: 32x32 RGB smooth random colour fields (bilinear upsampling of 4x4 and 8x8
            random grids, plus grain), so patches have the local structure of images rather than white
            noise; --source fashion-mnist: 28x28 copies of the bundled Fashion-MNIST images, each shifted
            by up to 2 pixels either way (black fill) and flipped with probability 1/2 (real image
            statistics, with their near-duplicates); written as a store
  build     one index bundle for s (ivf-pq by default: 4-bit fast-scan PQ codes + ids, stride-4 blocks)
  query     --batch forward-process queries at each t: retrieval (top-k; top-k + tail) against the exact
            path; with --tol, routed and certified (the CLI's default path: projection cells for s <= 3,
            built once in the first warm-up), with its bound and routing fractions
Prints one JSON object; `--phase all` runs the three in order. Flips are off by default (N = 1,000,000
virtual images; --xflip doubles N and the exact path's cost).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def shifted_fashion_mnist(n: int, g: torch.Generator) -> np.ndarray:
    """n copies of random bundled Fashion-MNIST images, each shifted by up to 2 pixels in each direction
    (the vacated pixels black) and flipped left-right with probability 1/2 -> uint8 [n, 1, 28, 28]."""
    from pspc_index.ingest import read_source

    src = torch.from_numpy(np.ascontiguousarray(read_source("fashion-mnist").images))
    out = np.empty((n, *src.shape[1:]), np.uint8)
    for start in range(0, n, 50000):
        b = min(50000, n - start)
        x = src[torch.randint(0, len(src), (b,), generator=g)]
        flip = torch.rand(b, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        pad = torch.nn.functional.pad(x, (2, 2, 2, 2))  # black border: a shift brings in black
        dy, dx = torch.randint(0, 5, (2, b), generator=g)
        for oy in range(5):
            for ox in range(5):
                sel = ((dy == oy) & (dx == ox)).nonzero().flatten()
                out[start + sel.numpy()] = pad[sel, :, oy:oy + 28, ox:ox + 28].numpy()
    return out


def smooth_fields(n: int, g: torch.Generator) -> np.ndarray:
    """n 32x32 RGB smooth random colour fields (module docstring) -> uint8 [n, 3, 32, 32]."""
    parts = []
    for start in range(0, n, 50000):
        b = min(50000, n - start)
        coarse = torch.nn.functional.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=32, mode="bilinear")
        fine = torch.nn.functional.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=32, mode="bilinear")
        x = 0.7 * coarse + 0.3 * fine + 0.03 * torch.randn(b, 3, 32, 32, generator=g)
        parts.append((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(parts)


def generate(a) -> dict:
    from pspc_index.store import write_store

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    if a.source == "fashion-mnist":
        images, what = shifted_fashion_mnist(a.n, g), "Fashion-MNIST shifted by <= 2 px and flipped"
    else:
        images, what = smooth_fields(a.n, g), "generated smooth fields"
    store = write_store(a.store, images, source=f"{what}, seed 0, n={a.n}")
    return {"images": a.n, "seconds": round(time.perf_counter() - t0, 1),
            "store_pixel_bytes": int(np.prod(store.images.shape)), "sha256": store.sha256[:12]}


def build(a) -> dict:
    from pspc_index.index import build_bundle, bundle_bytes

    t0 = time.perf_counter()
    man = build_bundle(a.store, a.bundle, [a.s], stride=a.stride, kind=a.kind, xflip=a.xflip, nlist=a.nlist,
                       progress=True)
    return {"kind": a.kind, "stride": a.stride, "nlist": man["nlist"], "files": len(man["files"]),
            "seconds": round(time.perf_counter() - t0, 1),
            "bundle_bytes": bundle_bytes(a.bundle)}


def query(a) -> dict:
    from pspc_index.denoisers import PSPCSquare
    from pspc_index.index import open_bundle
    from pspc_index.retrieval import RetrievalPSPC
    from pspc_index.store import ImageStore

    store = ImageStore.open(a.store)
    data = store.training_set(xflip=a.xflip)
    bundle = open_bundle(a.bundle, store)
    ts = [float(v) for v in a.t.split(",")]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(data), (a.batch,), generator=g)
    noise = torch.randn(a.batch, *data.shape, generator=g)
    out = {"batch": a.batch, "t": ts, "s": a.s, "n_virtual": len(data), "tol": a.tol, "no_skip": a.no_skip,
           "projection": not a.no_projection, "rows": []}
    results, bounds, secs = {}, {}, {}
    for tail in ("none",) if a.tol is not None else ("none", "sample"):
        # one denoiser for every t: its indices and projection cells load or build once, in the warm-up
        den = RetrievalPSPC(data, bundle, k=a.k, tail=tail, m=a.m, patch_size=a.s, tol=a.tol, predict=not a.no_skip,
                            projection=not a.no_projection)
        for t in ts:
            z = data.get(idx) + t * noise
            t0 = time.perf_counter()
            den(z[:1], t)
            warm = time.perf_counter() - t0
            built = den.last_report.get(a.s, {}).get("cells_seconds")  # projection cells: the first warm-up
            t0 = time.perf_counter()
            results[tail, t] = den(z, t)
            secs[tail, t] = time.perf_counter() - t0
            rep = den.last_report[a.s]
            bounds[tail, t] = rep.get("pixel_bound")
            out["rows"].append({"t": t, "tail": tail, "k": a.k, "m": a.m if tail == "sample" else 0,
                                "seconds": round(secs[tail, t], 3), "warmup_seconds": round(warm, 1),
                                "certificate": rep.get("certificate"), "cells_build_seconds": built,
                                "eps_bar_max": float(rep["eps_bar"].nan_to_num(1.0).max()),
                                "eps_bar_median": float(rep["eps_bar"].nanmedian()),
                                "rel_se_max": None if tail == "none" else float(rep["rel_se"].max()),
                                **({"fractions": rep["fractions"], "bound_max": rep["bound_max"],
                                    "certified": rep["certified"]} if a.tol is not None else {})})
            print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
        del den  # its cells and indices leave memory before the exact passes
    out["exact_seconds"] = {}
    for t in ts:
        t0 = time.perf_counter()
        exact = PSPCSquare(data, patch_size=a.s)(data.get(idx) + t * noise, t)
        exact_s = time.perf_counter() - t0
        out["exact_seconds"][str(t)] = round(exact_s, 3)
        for row in out["rows"]:
            if row["t"] != t:
                continue
            err = (results[row["tail"], t] - exact).double()
            if a.tol is not None:  # the certified pixel bound against the measured error, per pixel
                row["bound_holds"] = float((err.abs().amax(1) <= bounds[row["tail"], t]).double().mean())
            row.update({"mse_vs_exact": float((err ** 2).mean()), "max_abs_vs_exact": float(err.abs().max()),
                        "speedup": round(exact_s / secs[row["tail"], t], 1)})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--phase", choices=["all", "generate", "build", "query"], default="all")
    p.add_argument("--dir", default="scale-run", help="where the store and bundle go (not committed)")
    p.add_argument("--source", choices=["fields", "fashion-mnist"], default="fields")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--s", type=int, default=5)
    p.add_argument("--t", default="0.585", help="noise levels, comma-separated (default: the Fashion-MNIST "
                   "schedule's t for s = 5)")
    p.add_argument("--kind", default="ivf-pq")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--xflip", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--tol", type=float, default=None, help="route and certify (the CLI's default is 1e-3)")
    p.add_argument("--no-skip", action="store_true", help="search also where the skip predictor would not")
    p.add_argument("--no-projection", action="store_true", help="the index's cells only, no projection cells")
    a = p.parse_args()
    a.store, a.bundle = str(Path(a.dir) / "store.zarr"), str(Path(a.dir) / "bundle")
    if a.phase != "all":
        res = {"generate": generate, "build": build, "query": query}[a.phase](a)
        res["peak_rss_gb"] = peak_gb()
        print(json.dumps(res))
        return
    report = {"threads": torch.get_num_threads()}
    for phase in ("generate", "build", "query"):
        if phase == "generate" and Path(a.store).exists():
            continue
        cmd = [sys.executable, __file__, "--phase", phase] + [x for x in sys.argv[1:] if x != "--json"]
        res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        report[phase] = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps({phase: report[phase]}), file=sys.stderr, flush=True)
    if "generate" in report and "build" in report:
        report["bundle_over_store"] = round(report["build"]["bundle_bytes"] / report["generate"]["store_pixel_bytes"],
                                            2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
