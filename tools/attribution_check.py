"""Counterfactual check of PSPC attribution on Fashion-MNIST (exact engine; issue 14, item 4).

1. Draw S samples (PSPC-Square, Fashion-MNIST schedule, Euler) over the first --n-data stored images (+ flips)
   and attribute each over its recorded trajectory (Euler-weighted shares, an image's and its flip's summed).
2. `attribution.verify_attribution`: per sample, remove its top-m attributed stored images (flips with them)
   and regenerate from the same initial noise; compare the change ||x' - x|| with removing m random images
   (--draws sets, the same for every sample). All counterfactuals run as one batch of per-query exclusions.
3. Report the median changes, the median ratio top / random, and the fraction of samples with ratio >= 5.
The linear datamodeling score is tools/lds.py. Each stage is kept in --state when done (a rerun continues).
Prints JSON.

    python tools/attribution_check.py --state check_state      # all 60,000 images, 64 samples, m = 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pspc_index.attribution import attribute_trajectory, verify_attribution
from pspc_index.denoisers import PSPCSquare
from pspc_index.errors import UserError, check_device
from pspc_index.ingest import read_source
from pspc_index.outputs import kept
from pspc_index.sampler import initial_noise, pf_ode_sample
from pspc_index.store import TrainingSet


def stage(state: Path | None, name: str, fn):
    """fn() once; with a state folder its result is kept there for a rerun (outputs.kept)."""
    return fn() if state is None else kept(state / f"{name}.pt", fn)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--n-data", type=int, default=60000, help="stored images used (the first ones; flips added)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--remove", type=int, default=10)
    p.add_argument("--draws", type=int, default=2, help="random removal sets")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state", default=None, help="folder of finished stages (resumable)")
    p.add_argument("--device", default="cpu", help="where the denoiser computes (cpu, cuda)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    state = None if a.state is None else Path(a.state)
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in vars(a).items() if k not in ("json", "threads", "state", "device")}
        cfg_path = state / "config.json"
        if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg:
            print(f"attribution_check: {state} was made with other settings; use another --state", file=sys.stderr)
            sys.exit(2)
        cfg_path.write_text(json.dumps(cfg))
    images = torch.from_numpy(read_source("fashion-mnist").images[:a.n_data].copy())
    try:
        check_device(a.device)
    except UserError as e:
        print(f"attribution_check: {e}", file=sys.stderr)
        sys.exit(2)
    data = TrainingSet(images, xflip=True).to(a.device)
    z0 = initial_noise(a.seed, range(a.samples), data.shape)  # drawn on the CPU, the same on every device
    seconds = {}

    # 1. samples and their trajectory attributions
    def draw():
        s0 = time.time()
        x, traj = pf_ode_sample(PSPCSquare(data), z0.to(data.device), a.steps, record=True)
        return {"x": x.cpu(), "ts": traj.ts, "zs": traj.z, "seconds": time.time() - s0}
    smp = stage(state, "samples", draw)

    def attribute():
        s0 = time.time()
        _, shares, _ = attribute_trajectory(PSPCSquare(data), smp["ts"], smp["zs"], top=a.remove)
        return {"shares": shares, "seconds": time.time() - s0}
    att = stage(state, "shares", attribute)

    # 2. every counterfactual from the same noise, in one batch
    def verify():
        s0 = time.time()
        reports, _ = verify_attribution(PSPCSquare, data, att["shares"], a.remove, z0, steps=a.steps,
                                        original=smp["x"], draws=a.draws, seed=a.seed)
        return {"reports": reports, "seconds": time.time() - s0}
    ver = stage(state, "verify", verify)
    for name, st in (("samples", smp), ("attribution", att), ("verify", ver)):
        seconds[name] = round(st["seconds"], 1)

    # 3. the criterion: change with the top m removed over the mean change with m random ones removed
    rep = ver["reports"]
    top = np.array([r["change_top"] for r in rep])
    rand = np.array([r["change_random_mean"] for r in rep])
    ratio = np.array([np.inf if r["ratio"] is None else r["ratio"] for r in rep])
    print(json.dumps({
        "data": f"Fashion-MNIST, first {a.n_data} training images + flips ({2 * a.n_data})", "samples": a.samples,
        "denoiser": "pspc-square (exact, Fashion-MNIST schedule), Euler", "steps": a.steps, "removed": a.remove,
        "random_draws": a.draws, "change": "L2 over all pixels, [-1, 1] units",
        "change_top_median": float(np.median(top)), "change_random_median": float(np.median(rand)),
        "ratio_median": float(np.median(ratio)), "fraction_ratio_ge_5": float((ratio >= 5).mean()),
        "ratio_per_sample": [round(float(v), 2) for v in ratio],
        "top_share_total_median": float(np.median([
            float((att["shares"][j, :a.n_data] + att["shares"][j, a.n_data:])[torch.as_tensor(r["removed"])].sum())
            for j, r in enumerate(rep)])),
        "seconds": seconds, "threads": a.threads, "device": a.device}, indent=1))


if __name__ == "__main__":
    main()
