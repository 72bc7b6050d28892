"""Train the small Fashion-MNIST classifier (pspc_index.classifier) whose penultimate layer is the SSCD stand-in
of tools/evaluate.py, on a time budget, and report its accuracy on held-out images.

The bundled data (data/fashion-mnist) hold only the 60,000 training images, not the 10,000 test images, so a
seeded 10,000 of them are held out as the test split (`--seed`, `--n-test`) and never trained on. Adam,
cross-entropy, horizontal flips with probability 0.5 (the denoisers' data sets hold the flips too).
Writes `<out>.safetensors` + `<out>.json` (config, test accuracy, split, time) and prints the json meta.

    OMP_NUM_THREADS=1 python tools/train_classifier.py --minutes 6 --out data/classifier/fmnist-cnn
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pspc_index.classifier import Classifier, ClassifierConfig, save_classifier  # noqa: E402
from pspc_index.ingest import read_source  # noqa: E402
from pspc_index.store import to_float  # noqa: E402


def held_out_split(n: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors: a seeded permutation of range(n), its first n_test held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def accuracy(net: Classifier, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of x [N, 1, R, R] (pixels in [-1, 1]) whose argmax logit is the label y [N]."""
    with torch.no_grad():
        hits = sum((net(x[j:j + batch]).argmax(1) == y[j:j + batch]).sum().item() for j in range(0, len(x), batch))
    return hits / max(1, len(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, config: ClassifierConfig, minutes: float, epochs: int,
                     batch: int, lr: float, seed: int) -> tuple[Classifier, dict]:
    """Adam on cross-entropy over x [N, 1, R, R] in [-1, 1], labels y [N], until `epochs` passes or
    `minutes` of wall clock, whichever comes first -> (net in eval mode, {epochs, steps, seconds})."""
    torch.manual_seed(seed)
    net, gen = Classifier(config), torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    t0, steps, ep = time.time(), 0, 0
    while ep < epochs and time.time() - t0 < 60 * minutes:
        # 1. one pass over a fresh permutation of the training images
        for j in torch.randperm(len(x), generator=gen).split(batch):
            xb = x[j]
            # 2. flip half of the batch horizontally
            flip = torch.rand(len(j), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            # 3. one Adam step on the cross-entropy
            loss = F.cross_entropy(net(xb), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.time() - t0 >= 60 * minutes:
                break
        ep += 1
        print(f"epoch {ep}: loss {loss.item():.3f}, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return net.eval(), dict(epochs=ep, steps=steps, seconds=round(time.time() - t0, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/classifier/fmnist-cnn", help="checkpoint stem")
    ap.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget")
    ap.add_argument("--epochs", type=int, default=20, help="at most this many passes")
    ap.add_argument("--n-test", type=int, default=10000, help="held-out images (seeded)")
    ap.add_argument("--n-train", type=int, default=0, help="train on the first N of the rest only (0: all; smoke runs)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    src = read_source("fashion-mnist")
    x, y = to_float(torch.from_numpy(src.images)), torch.from_numpy(src.labels).long()
    train, test = held_out_split(len(x), a.n_test, a.seed)
    if a.n_train:
        train = train[:a.n_train]
    config = ClassifierConfig(resolution=x.shape[-1], classes=len(src.classes))
    net, run = train_classifier(x[train], y[train], config, a.minutes, a.epochs, a.batch, a.lr, a.seed)
    meta = dict(test_accuracy=round(accuracy(net, x[test], y[test]), 4),
                train_accuracy=round(accuracy(net, x[train], y[train]), 4), n_train=len(train), n_test=len(test),
                test_split=f"seeded hold-out of the bundled 60,000 training images: torch.randperm(60000, "
                           f"Generator().manual_seed({a.seed}))[:{a.n_test}] (the 10,000 official test images are "
                           "not bundled)",
                threads=torch.get_num_threads(), torch=torch.__version__, argv=sys.argv[1:] if argv is None else argv,
                **run)
    save_classifier(a.out, net, meta)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
