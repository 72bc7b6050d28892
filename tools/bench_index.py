"""Benchmark (issue 11, item 6): the hybrid retrieval path (an index bundle with certified per-location
routing to the exact kernel) against the exact engine, in the same run.

On Fashion-MNIST (the first --n-data training images, 0 = all 60,000, plus flips: N = 120,000), with the
default index (--kind) built once for every size of the schedule below full size (build seconds, bytes
per patch size against the store's pixel bytes),
for every t of the 18-step schedule (--ts to choose): one batch of --batch forward-process queries
z = x + t eps (seeded by the step), the exact engine (PSPCSquare) and the hybrid (RetrievalPSPC with the
CLI's defaults: k, tol = retrieval.DEFAULT_TOL, tail none; 3x3 crops certified by projection cells, which
its warm-up builds: cells_build_seconds; --no-projection: the index's cells only) each warmed up on one
query, then timed on the batch. Per t: the path mix (fractions of crop locations by retrieval, tail, exact,
skipped search), seconds per call of both, MSE and max abs error of the hybrid against exact, the reported
bound per pixel (the composite's certified bound, `pixel_bound`) beside the measured error, and the fraction of pixels
where bound >= error (also with the kernel's own rounding, 4e-6, added to the bound); optionally
recall@k of the candidates' members against the exact top-k at sampled locations. Then --samples hybrid
samples against as many exact-only samples (same initial noise), timed in the same run, with the routing
per step.

Resumable: with --work DIR the store, the bundle (a killed build resumes) and a state file (every finished
t, the build, the sampling) live there; a rerun with the same settings skips what is recorded, one with
other settings is refused. Prints JSON; --markdown writes the per-t table, --plot a PNG of both paths'
seconds per call against t.
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
from pspc_index.errors import UserError
from pspc_index.index import blocks, build_bundle, bundle_bytes, open_bundle
from pspc_index.ingest import read_source
from pspc_index.retrieval import DEFAULT_TOL, RetrievalPSPC, routing_summary
from pspc_index.sampler import sample
from pspc_index.schedule import FASHION_MNIST
from pspc_index.store import ImageStore, write_store

KERNEL_ROUNDING = 4e-6  # the kernel's own rounding of a patch mean (posterior.py), beyond any bound


def recall_at_k(data, bundle, z, s, k, positions, nprobe, g) -> float:
    """Mean over queries and sampled crop locations of the fraction of the location's exact top-k images
    (virtual ids) that are members of the block's k candidate entries (an entry: identical windows)."""
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
        ent = bundle.entries(s, by, bx)
        zp = z[:, :, py:py + s, px:px + s].flatten(1)
        d = ((allx[None, :, :, py:py + s, px:px + s].flatten(2) - zp[:, None]) ** 2).sum(2)  # [B, N]
        top = d.topk(min(k, len(data)), largest=False).indices
        for e, b in zip(cand, top):
            e = e[e >= 0].numpy()
            members = np.concatenate([ent.members[ent.offsets[j]:ent.offsets[j + 1]] for j in e])
            hits.append(len(np.intersect1d(members, b.numpy())) / len(b))
    return float(np.mean(hits))


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def step_row(data, bundle, sched, i, a, g_recall) -> dict:
    """One t of the schedule: the exact engine and the hybrid on the same seeded batch (module docstring)."""
    t, s = float(sched.grid[i]), int(sched.patch_sizes[i])
    g = torch.Generator().manual_seed(1000 + i)
    idx = torch.randint(0, len(data), (a.batch,), generator=g)
    z = data.get(idx) + t * torch.randn(a.batch, *data.shape, generator=g)
    exact_den = PSPCSquare(data, schedule=sched)
    hybrid = RetrievalPSPC(data, bundle, k=a.k, tail=a.tail, m=a.m, schedule=sched, tol=a.tol, nprobe=a.nprobe,
                           predict=not a.no_skip, projection=not a.no_projection)
    warm = {"exact": timed(lambda: exact_den(z[:1], t))[1], "hybrid": timed(lambda: hybrid(z[:1], t))[1]}
    built = hybrid.last_report.get(s, {}).get("cells_seconds")  # projection cells are built in the warm-up
    exact, exact_s = timed(lambda: exact_den(z, t))
    got, secs = timed(lambda: hybrid(z, t))
    rep = hybrid.last_report[s]
    err = (got - exact).double()
    px_err = err.abs().amax(1)  # [B, H, W]: the worst channel at each pixel
    bound = rep.get("pixel_bound", torch.zeros_like(px_err))  # a step run exactly (s = H) has none: 0
    return {"step": i, "t": round(t, 4), "s": s, "path": rep["path"],
            "fractions": rep.get("fractions", {"retrieval": 0.0, "tail": 0.0, "exact": 1.0, "skipped": 0.0}),
            "seconds": round(secs, 3), "exact_seconds": round(exact_s, 3), "speedup": round(exact_s / secs, 2),
            "warmup_seconds": {key: round(v, 3) for key, v in warm.items()},
            "certificate": rep.get("certificate"), "cells_build_seconds": built,
            "mse_vs_exact": float((err ** 2).mean()), "max_abs_vs_exact": float(err.abs().max()),
            "bound_max": float(bound.max()), "bound_median": float(bound.median()),
            "bound_holds": float((px_err <= bound).double().mean()),
            "bound_holds_with_rounding": float((px_err <= bound + KERNEL_ROUNDING).double().mean()),
            "certified": rep.get("certified", True),
            "recall_at_k": (round(recall_at_k(data, bundle, z, s, a.k, a.recall_positions, a.nprobe, g_recall), 3)
                            if a.recall_positions and s in bundle.patch_sizes else None)}


def sampling(data, bundle, sched, a) -> dict:
    """--samples hybrid samples against as many exact-only ones from the same initial noise, both timed."""
    hybrid = RetrievalPSPC(data, bundle, k=a.k, tail=a.tail, m=a.m, schedule=sched, tol=a.tol, nprobe=a.nprobe,
                           predict=not a.no_skip, projection=not a.no_projection)
    x_h, secs = timed(lambda: sample(hybrid, a.samples, 0, steps=sched.steps, batch=a.batch))
    x_e, exact_s = timed(lambda: sample(PSPCSquare(data, schedule=sched), a.samples, 0, steps=sched.steps,
                                        batch=a.batch))
    diff = (x_h - x_e).double()
    return {"samples": a.samples, "seconds": round(secs, 2), "exact_seconds": round(exact_s, 2),
            "speedup": round(exact_s / secs, 2), "mse_vs_exact": float((diff ** 2).mean()),
            "max_abs_vs_exact": float(diff.abs().max()),
            "routing": [{key: st[key] for key in ("s", "t_max", "fractions", "bound_max", "certified")}
                        for st in routing_summary(hybrid.history)]}


def load_state(path: Path, settings: dict) -> dict:
    """The state file's content for these settings (a new state if none); other settings: UserError."""
    if not path.exists():
        return {"settings": settings, "rows": {}}
    state = json.loads(path.read_text())
    if state.get("settings") != settings:
        differ = next(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise UserError(f"{path}: a state of other settings ({differ}={state['settings'].get(differ)!r}, now "
                        f"{settings[differ]!r}); use another --work")
    return state


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def markdown(rows: list[dict]) -> str:
    lines = ["| t | s | retrieval / tail / exact / skipped | s/call | exact s/call | speedup | MSE vs exact "
             "| max abs | bound max | bound >= error |", "|" + "---|" * 10]
    for r in rows:
        f = r["fractions"]
        lines.append(f"| {r['t']} | {r['s']} | {f['retrieval']:.0%} / {f['tail']:.0%} / {f['exact']:.0%} / "
                     f"{f['skipped']:.0%} | {r['seconds']} | {r['exact_seconds']} | {r['speedup']}x "
                     f"| {r['mse_vs_exact']:.1e} | {r['max_abs_vs_exact']:.2g} | {r['bound_max']:.2g} "
                     f"| {r['bound_holds']:.2%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Seconds per call of the exact engine and the hybrid against t (log-log), each hybrid point marked by
    its path (certified by retrieval, or skipped / exact), with the speedup written beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["s"] < 28]  # full-size steps are the optimal denoiser on both paths
    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(t, [r["exact_seconds"] for r in rows], "o-", color="0.4", label="exact engine")
    ax.plot(t, [r["seconds"] for r in rows], "-", color="C0")
    for r in rows:
        searched = r["fractions"]["retrieval"] > 0.5
        ax.plot(r["t"], r["seconds"], "s" if searched else "x", color="C0" if searched else "C3")
        ax.annotate(f"{r['speedup']:g}x (s={r['s']})", (r["t"], r["seconds"]), textcoords="offset points",
                    xytext=(4, -10 if searched else 6), fontsize=7)
    ax.plot([], [], "s", color="C0", label="hybrid: certified by retrieval")
    ax.plot([], [], "x", color="C3", label="hybrid: predicted diffuse, run exact")
    ax.set(xscale="log", yscale="log", xlabel="t (EDM sigma)", ylabel="seconds per call",
           title=f"PSPC-Square, B = {rows[0].get('batch', 64)}: hybrid (tol 1e-3) against exact")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(a) -> dict:
    sched = FASHION_MNIST
    steps = [int(i) for i in a.ts.split(",")] if a.ts else list(range(sched.steps))
    if any(not 0 <= i < sched.steps for i in steps):
        raise UserError(f"--ts: grid indices are 0..{sched.steps - 1}, got {a.ts}")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_index-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = {"n_data": a.n_data, "batch": a.batch, "k": a.k, "tol": a.tol, "tail": a.tail, "m": a.m,
                "kind": a.kind, "stride": a.stride, "nprobe": a.nprobe, "samples": a.samples,
                "recall_positions": a.recall_positions, **({"no_skip": True} if a.no_skip else {}),
                **({"no_projection": True} if a.no_projection else {}), "threads": torch.get_num_threads()}
    state = load_state(work / "state.json", settings)
    store_path = work / "store.zarr"
    if not (store_path / "zarr.json").exists():
        images = read_source("fashion-mnist").images
        write_store(store_path, images if a.n_data == 0 else images[:a.n_data], source="fashion-mnist")
    store = ImageStore.open(store_path)
    data = store.training_set()
    sizes = sorted({s for s in sched.patch_sizes if s < data.shape[1]})  # the whole schedule's bundle
    if "build" not in state:
        # a build killed before its manifest resumes from its journal; its seconds are then this run's part
        resumed = (work / "bundle").exists()
        man, secs = timed(lambda: build_bundle(store_path, work / "bundle", sizes, stride=a.stride, kind=a.kind,
                                               progress=False))
        pixel_bytes = int(np.prod(store.images.shape))
        state["build"] = {"seconds": round(secs, 1), "resumed": resumed, "kind": a.kind, "nlist": man["nlist"],
                          "store_bytes": pixel_bytes, "bytes": bundle_bytes(work / "bundle", "s"),
                          "over_store_per_size": {str(s): round(bundle_bytes(work / "bundle", f"s{s}_") / pixel_bytes, 3)
                                                  for s in sizes}}
        save_state(work / "state.json", state)
        print(json.dumps({"build": state["build"]}), file=sys.stderr, flush=True)
    bundle = open_bundle(work / "bundle", store)
    g_recall = torch.Generator().manual_seed(0)
    for i in steps:
        if str(i) in state["rows"]:
            continue
        state["rows"][str(i)] = step_row(data, bundle, sched, i, a, g_recall)
        save_state(work / "state.json", state)
        print(json.dumps(state["rows"][str(i)]), file=sys.stderr, flush=True)
    if a.samples and "sampling" not in state:
        state["sampling"] = sampling(data, bundle, sched, a)
        save_state(work / "state.json", state)
    rows = [state["rows"][str(i)] for i in steps]
    if a.markdown:
        Path(a.markdown).write_text(markdown(rows))
    if a.plot:
        plot([{**r, "batch": a.batch} for r in rows], a.plot)
    return {"data": f"{data.n_stored} Fashion-MNIST images + flips (N = {len(data)})", **settings,
            "work": str(work), "build": state.get("build"), "rows": rows, "sampling": state.get("sampling")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n-data", type=int, default=0, help="stored images used (0 = all 60,000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--tol", type=float, default=DEFAULT_TOL)
    p.add_argument("--tail", default="none", choices=["none", "sample"])
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--kind", default="ivf-pq")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--ts", default=None, help="comma-separated grid indices (default: every t of the schedule)")
    p.add_argument("--samples", type=int, default=64, help="hybrid and exact-only samples (0: none)")
    p.add_argument("--no-skip", action="store_true", help="search at every t, also where the skip predictor "
                   "would run the step exact (what the certificate achieves there)")
    p.add_argument("--no-projection", action="store_true", help="certify with the index's cells only (no "
                   "projection cells for small crops; the path before them)")
    p.add_argument("--recall-positions", type=int, default=0, help="sampled locations per t for recall@k")
    p.add_argument("--work", default=None, help="directory of the store, bundle and state (resumable)")
    p.add_argument("--markdown", default=None, help="also write the per-t table here")
    p.add_argument("--plot", default=None, help="also plot seconds per call against t here (PNG)")
    a = p.parse_args()
    try:
        out = run(a)
    except UserError as e:
        print(f"bench_index: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
