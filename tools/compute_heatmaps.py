"""Gradient-sensitivity heatmaps (paper Eq. 8) of a trained network at the schedule's lambda < 1 steps.

Writes the zarr group PSPC-Flex reads, prints the concentration table (paper Fig. 3 left) as JSON
lines and plots it.

    python tools/compute_heatmaps.py --network data/network/fmnist-unet-ft --m 96 --batch 96 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pspc_index.errors import UserError, check_device
from pspc_index.ingest import read_source
from pspc_index.network import load_network, read_network_meta
from pspc_index.schedule import get_schedule
from pspc_index.sensitivity import concentration_side, gradient_heatmaps, plot_concentration, write_heatmaps
from pspc_index.store import TrainingSet

FRACTIONS = (0.5, 0.75, 0.95)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--network", default="data/network/fmnist-unet-ft", help="checkpoint stem")
    ap.add_argument("--data", default="fashion-mnist", help="a source read_source understands")
    ap.add_argument("--schedule", default=None, help="schedule name (default: the one for the resolution)")
    ap.add_argument("--m", type=int, default=64, help="forward-process z per t")
    ap.add_argument("--batch", type=int, default=64, help="z per backward pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda); the draws stay on the CPU")
    ap.add_argument("--no-xflip", action="store_true", help="draw x from the stored images only")
    ap.add_argument("--out", default="data/heatmaps/fmnist-unet-ft.zarr")
    ap.add_argument("--plot", default="docs/heatmap_concentration.png")
    return ap.parse_args(argv)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    check_device(args.device)
    net = load_network(args.network).requires_grad_(False).to(args.device)  # only input gradients are needed
    source = read_source(args.data)
    data = TrainingSet(torch.from_numpy(source.images), xflip=not args.no_xflip)
    schedule = get_schedule(args.schedule, *data.shape[1:])
    keep = torch.tensor(schedule.lambdas) < 1
    ts = schedule.grid[keep]
    gen = torch.Generator().manual_seed(args.seed)
    maps, seconds = [], []
    for t in ts:  # one t at a time draws exactly what a single call would, and times each t
        start = time.time()
        maps.append(gradient_heatmaps(net, data, [t], args.m, args.batch, gen)[0])
        seconds.append(round(time.time() - start, 1))
        print(json.dumps({"t": round(float(t), 5), "seconds": seconds[-1]}), flush=True)
    heatmaps = torch.stack(maps)
    net_meta = read_network_meta(args.network)["meta"]
    write_heatmaps(args.out, heatmaps, ts, {
        "m": args.m, "batch": args.batch, "seed": args.seed, "threads": args.threads,
        "network": Path(args.network).name, "network_steps": net_meta.get("steps"),
        "network_images_seen": net_meta.get("images_seen"), "data": source.description,
        "xflip": not args.no_xflip, "schedule": schedule.name,
        "lambdas": [float(v) for v in torch.tensor(schedule.lambdas)[keep]],
        "grid_steps": schedule.steps, "grid_index": [int(i) for i in torch.nonzero(keep).flatten()],
        "seconds_per_t": seconds})
    sides = concentration_side(heatmaps, FRACTIONS)
    for t, row in zip(ts, sides):
        print(json.dumps({"t": round(float(t), 5), **{f"side_{f:.0%}": round(float(v), 2)
                                                       for f, v in zip(FRACTIONS, row)}}))
    plot_concentration(ts, sides, FRACTIONS, args.plot,
                       title=f"{Path(args.network).name}: gradient concentration (m = {args.m})")
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
