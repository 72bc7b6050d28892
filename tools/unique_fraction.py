"""Unique fraction of index entries per patch size (issue 11, item 2): how many distinct uint8 union
windows (per virtual image, flips included) a bundle's blocks hold, against the number of images.

    OMP_NUM_THREADS=1 python tools/unique_fraction.py --json docs/unique_fraction.json

Per size s (default: 3, 5, 7, 9, 13, 21) at the default stride: the blocks' entry counts E over N virtual
images, as `index.block_entries` computes them when building (hashing only, no FAISS), summarised as the
total sum(E) / (blocks x N) and the smallest, median and largest per-block E / N.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch

from pspc_index.index import block_entries, blocks
from pspc_index.ingest import read_source
from pspc_index.store import TrainingSet


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="fashion-mnist", help="an ingest source (default: the bundled Fashion-MNIST)")
    p.add_argument("--sizes", default="3,5,7,9,13,21")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--no-xflip", action="store_true")
    p.add_argument("--json", default=None, help="write the result here as well")
    a = p.parse_args()
    images = read_source(a.source).images
    data = TrainingSet(torch.from_numpy(np.ascontiguousarray(images)), xflip=not a.no_xflip)
    _, h, w = data.shape
    rows = []
    for s in (int(v) for v in a.sizes.split(",")):
        start = time.time()
        frac = np.array([(len(block_entries(data, win)[0]) - 1) / len(data) for _, _, win in blocks(h, w, s, a.stride)])
        rows.append({"s": s, "blocks": len(frac), "unique_fraction": round(float(frac.mean()), 4),
                     "block_min": round(float(frac.min()), 4), "block_median": round(float(np.median(frac)), 4),
                     "block_max": round(float(frac.max()), 4), "seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    out = {"source": a.source, "images": len(data), "xflip": not a.no_xflip, "stride": a.stride,
           "command": "OMP_NUM_THREADS=1 python tools/unique_fraction.py " + " ".join(sys.argv[1:]), "sizes": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
