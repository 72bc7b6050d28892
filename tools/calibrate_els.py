"""Calibrate the ELS window k(t) against the shipped Fashion-MNIST network (Kamb & Ganguli 2025: per noise
level, the odd k with the best median similarity to the network). Prints JSON; `els_sizes` is the schedule
line for pspc_index/schedule.py (FASHION_MNIST.els_sizes, one k per grid t, high t first).

    python tools/calibrate_els.py --quick --json     # smoke run, < 2 min
    python tools/calibrate_els.py --json             # 18 grid t x 14 k x 16 z, 100-image pool (README: time)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pspc_index.denoisers import Network  # noqa: E402
from pspc_index.els import calibrate_k  # noqa: E402
from pspc_index.errors import UserError, check_device  # noqa: E402
from pspc_index.ingest import read_source  # noqa: E402
from pspc_index.network import load_network  # noqa: E402
from pspc_index.schedule import FASHION_MNIST  # noqa: E402
from pspc_index.store import TrainingSet  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="3,5,7,9,11,13,15,17,19,21,23,25,27,55",
                   help="odd candidate windows (55 = 2*28-1: the whole image, the optimal denoiser over the pool)")
    p.add_argument("--n-z", type=int, default=16, help="forward-process z per grid t")
    p.add_argument("--els-images", type=int, default=100, help="ELS pool: seeded subset of stored images")
    p.add_argument("--boundary", choices=["broken", "circular"], default="broken")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--network", default="data/network/fmnist-unet-ft", help="checkpoint stem of the network")
    p.add_argument("--device", default="cpu", help="where the network and ELS compute (cpu, cuda)")
    p.add_argument("--quick", action="store_true", help="4 grid t, k in 3,7,55, 4 z, 20-image pool")
    p.add_argument("--json", action="store_true", help="print the JSON report (else a table)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ks = [int(k) for k in a.ks.split(",")]
    idx = list(range(FASHION_MNIST.steps))
    if a.quick:
        idx, ks, a.n_z, a.els_images = [0, 8, 12, 17], [3, 7, 55], 4, 20
    try:
        check_device(a.device)
    except UserError as e:
        print(f"calibrate_els: {e}", file=sys.stderr)
        sys.exit(2)
    data = TrainingSet(torch.from_numpy(np.ascontiguousarray(read_source("fashion-mnist").images)), xflip=True)
    data = data.to(a.device)
    net = Network(load_network(a.network).to(a.device), data.shape)
    t0 = time.time()
    rows = calibrate_k(net, data, FASHION_MNIST.grid[idx], ks, a.n_z, a.els_images, a.seed, a.boundary)
    for i, r in zip(idx, rows):
        r["grid_index"] = i
    out = dict(network=a.network, device=a.device, similarity="median over z of per-image r^2 against the network",
               ks=ks, n_z=a.n_z, els_images=a.els_images, boundary=a.boundary, seed=a.seed, threads=a.threads,
               seconds=round(time.time() - t0, 1), rows=rows,
               els_sizes=[r["k"] for r in rows] if len(rows) == FASHION_MNIST.steps else None)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for r in rows:
            print(f"t={r['t']:.4g}: k={r['k']}  " + " ".join(f"{k}:{v:.3f}" for k, v in r["median_r2"].items()))
        print(f"els_sizes={tuple(out['els_sizes']) if out['els_sizes'] else None} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
