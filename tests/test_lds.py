"""tools/lds.py: the LDS arithmetic, the baselines' scores against naive float64 loops, and a tiny resumable run."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pspc_index.store import TrainingSet

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lds", ROOT / "tools" / "lds.py")
lds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lds)


def tiny_set(n=6, shape=(1, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    return TrainingSet(torch.from_numpy(rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)), xflip=True)


def naive_virtual(data):
    x = data.images.numpy().astype(np.float64) / 127.5 - 1
    return np.concatenate([x, x[..., ::-1]], 0)


def test_spearman_with_ties_matches_pearson_of_average_ranks():
    a = np.array([3.0, 1.0, 3.0, 2.0, 5.0])
    b = np.array([1.0, 0.0, 2.0, 2.0, 7.0])
    ra = np.array([3.5, 1, 3.5, 2, 5])  # by hand: the tied 3s share ranks 3 and 4
    rb = np.array([2, 1, 3.5, 3.5, 5])
    assert lds.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
    assert math.isnan(lds.spearman(a, np.ones(5)))


def test_lds_is_one_for_an_exactly_linear_output_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    tau = rng.random((3, 40))
    keep = np.zeros((64, 40), dtype=bool)  # exact halves, as the tool draws them
    for k in range(64):
        keep[k, rng.choice(40, 20, replace=False)] = True
    linear = 2.0 - keep @ tau.T  # the output falls with the attributed mass kept
    assert np.allclose(lds.lds(tau, keep, linear), 1.0)
    noise = lds.lds(rng.random((3, 40)), keep, linear)
    assert np.abs(noise).max() < 0.4


def test_pixel_nn_scores_match_naive_softmax():
    data = tiny_set()
    x = torch.randn(2, *data.shape) * 0.5
    sigma = 2.0
    X = naive_virtual(data)
    for j in range(2):
        d2 = ((X - x[j].double().numpy()) ** 2).reshape(len(X), -1).sum(1)
        w = np.exp(-(d2 - d2.min()) / (2 * sigma ** 2))
        w /= w.sum()
        want = w[:data.n_stored] + w[data.n_stored:]
        assert np.allclose(lds.pixel_nn_scores(data, x, sigma)[j].numpy(), want, atol=1e-12)


@pytest.mark.parametrize("s,r", [(3, 1), (2, 2), (5, 0)])
def test_nda_patch_scores_match_naive_loop(s, r):
    """Per location, the posterior over every (image or flip, shift within r, in bounds) patch; an image's
    mass averaged over locations. Sums to one per sample."""
    data = tiny_set()
    x = torch.randn(2, *data.shape) * 0.6
    sigma = 0.7
    X = naive_virtual(data)
    n = data.n_stored
    _, h, w = data.shape
    gh, gw = h - s + 1, w - s + 1
    got = lds.nda_patch_scores(data, x, s, sigma, r).numpy()
    for j in range(2):
        want = np.zeros(n)
        xj = x[j].double().numpy()
        for y in range(gh):
            for c in range(gw):
                q = xj[:, y:y + s, c:c + s]
                logits, owner = [], []
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        yy, cc = y + dy, c + dx
                        if 0 <= yy < gh and 0 <= cc < gw:
                            for i in range(len(X)):
                                logits.append(-((q - X[i, :, yy:yy + s, cc:cc + s]) ** 2).sum() / (2 * sigma ** 2))
                                owner.append(i % n)
                logits = np.array(logits)
                wts = np.exp(logits - logits.max())
                np.add.at(want, owner, wts / wts.sum())
        want /= gh * gw
        assert np.allclose(got[j], want, atol=1e-9), (s, r, j)
        assert got[j].sum() == pytest.approx(1.0, abs=1e-6)  # weights pass in float32


def test_tiny_run_resumes_and_refuses_other_settings(tmp_path):
    args = [sys.executable, "tools/lds.py", "--n-data", "40", "--subsets", "5", "--samples", "2", "--pairs", "2",
            "--steps", "3", "--regen-samples", "2", "--nda-size", "3", "--state", str(tmp_path / "st")]
    run = lambda *extra: subprocess.run(args + list(extra), cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=240)
    first = run("--json")
    assert first.returncode == 0, first.stderr[-2000:]
    out = json.loads(first.stdout)
    assert set(out["lds"]) == {f"{m} {o}" for m in ("pspc-trajectory", "pspc-loss", "pixel-nn", "nda-patch", "random")
                               for o in ("loss", "regen")}
    stamp = (tmp_path / "st" / "subset_003.pt").stat().st_mtime_ns
    again = run()
    assert again.returncode == 0 and (tmp_path / "st" / "subset_003.pt").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "st" / "lds.json").read_text())["lds"] == out["lds"]
    other = run("--subsets", "6")
    assert other.returncode == 2 and "subsets 5 (now 6)" in other.stderr and other.stderr.count("\n") == 1
    moved = tmp_path / "moved"
    (tmp_path / "st").rename(moved)  # a state folder resumes wherever it lies
    args[args.index(str(tmp_path / "st"))] = str(moved) + "/"
    again = run()
    assert again.returncode == 0 and (moved / "subset_003.pt").stat().st_mtime_ns == stamp


def test_retrieval_method_with_a_flat_index_covering_everything_equals_exact(tmp_path):
    """pspc-retrieval with a flat bundle and k >= N scores every image: the exact trajectory shares."""
    from pspc_index.index import build_bundle
    from pspc_index.ingest import read_source
    from pspc_index.store import write_store

    write_store(tmp_path / "s.zarr", read_source("fashion-mnist").images[:30], None)
    build_bundle(tmp_path / "s.zarr", tmp_path / "b", [3], kind="flat", progress=False)
    res = subprocess.run([sys.executable, "tools/lds.py", "--n-data", "30", "--subsets", "4", "--samples", "2",
                          "--pairs", "1", "--steps", "3", "--regen-samples", "0", "--state", str(tmp_path / "st"),
                          "--methods", "pspc-trajectory,pspc-retrieval", "--store", str(tmp_path / "s.zarr"),
                          "--bundle", str(tmp_path / "b"), "--k", "100000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    load = lambda m: torch.load(tmp_path / "st" / f"method_{m}.pt", weights_only=False)["tau"]  # noqa: E731
    assert torch.allclose(load("pspc-trajectory"), load("pspc-retrieval"), atol=1e-9)
