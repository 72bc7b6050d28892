"""Exact PSPC attribution (DESIGN.md section 3): maps, shares, naive check, duplicates, CLI."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.attribution import attribute_image, attribution_maps, euler_weights
from pspc_index.cli import cli
from pspc_index.denoisers import PSPCSquare
from pspc_index.store import TrainingSet, write_store


def tiny(n=8, seed=0, xflip=True):
    images = torch.from_numpy(np.random.RandomState(seed).randint(0, 256, (n, 1, 5, 5)).astype(np.uint8))
    return TrainingSet(images, xflip=xflip)


def naive_shares(data, z, t, s):
    """a_i[p] = mean over the s x s crops covering p of the crop posterior w_ik, in float64 loops."""
    x = data.get(torch.arange(len(data)), torch.float64).numpy()[:, 0]
    z = z.numpy().astype(np.float64)[:, 0]
    n, h, w = x.shape
    out = np.zeros((len(z), n))
    for b in range(len(z)):
        a, cov = np.zeros((n, h, w)), np.zeros((h, w))
        for r in range(h - s + 1):
            for c in range(w - s + 1):
                d = np.array([((z[b, r:r + s, c:c + s] - x[i, r:r + s, c:c + s]) ** 2).sum() for i in range(n)])
                lw = -d / (2 * t * t)
                wk = np.exp(lw - lw.max())
                wk /= wk.sum()
                a[:, r:r + s, c:c + s] += wk[:, None, None]
                cov[r:r + s, c:c + s] += 1
        out[b] = (a / cov).sum((1, 2)) / (h * w)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_shares_match_naive_loop(dtype, tol):
    data = tiny()
    z = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.7
    shares, _ = attribution_maps(PSPCSquare(data, patch_size=3), z, 0.6, dtype=dtype)
    np.testing.assert_allclose(shares.numpy(), naive_shares(data, z, 0.6, 3), atol=tol)


def test_maps_and_shares_sum_to_one_and_reproduce_output():
    data = tiny()
    den = PSPCSquare(data, patch_size=3)
    z = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    shares, tm = attribution_maps(den, z, 0.4, top=len(data))
    assert shares.shape == (3, 16) and shares.dtype == torch.float64
    np.testing.assert_allclose(shares.sum(1).numpy(), 1, atol=1e-6)
    np.testing.assert_allclose(tm.maps.sum(1).numpy(), 1, atol=1e-6)       # every pixel
    np.testing.assert_allclose(tm.maps.mean((2, 3)).numpy(), shares.gather(1, tm.ids).numpy(), atol=1e-12)
    # the maps are the composite's weights: sum_i a_i x_i is the denoiser output
    x = data.get(tm.ids)[:, :, 0].to(torch.float64)
    np.testing.assert_allclose((tm.maps * x).sum(1).numpy(), den(z, 0.4)[:, 0].numpy(), atol=1e-5)
    # running top-m agrees with the full ranking; s = H (one crop) still sums to 1
    _, t3 = attribution_maps(den, z, 0.4, top=3)
    assert torch.equal(t3.ids, tm.ids[:, :3])
    full, _ = attribution_maps(PSPCSquare(data, patch_size=5), z, 0.4)
    np.testing.assert_allclose(full.sum(1).numpy(), 1, atol=1e-6)


def test_duplicate_image_is_top_attribution():
    data = tiny(n=10, seed=3)
    images = torch.cat([data.images, data.images[4:5]])     # store row 10 duplicates row 4
    den = PSPCSquare(TrainingSet(images, xflip=True), patch_size=3)
    res, shares, _ = attribute_image(den, den.data.get(torch.tensor([4])), 0.05, seed=0, top=3)
    top2 = {(e["index"], e["flip"]) for e in res[0][:2]}
    assert top2 == {(4, False), (10, False)}
    assert res[0][0]["share"] == res[0][1]["share"] > 0.45


def test_euler_weights_sum_to_one():
    w = euler_weights([80.0, 10.0, 1.0, 0.1, 0.002])
    assert abs(float(w.sum()) - 1) < 1e-12 and (w >= 0).all() and w[-2] > w[0]


@pytest.fixture()
def store(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (6, 1, 5, 5)).astype(np.uint8)
    write_store(tmp_path / "s.zarr", images, labels=np.arange(6) % 3)
    np.save(tmp_path / "x.npy", images[:2])
    return tmp_path / "s.zarr"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_json_and_panel(store, tmp_path):
    res = run("attribute", "--store", store, "--image", tmp_path / "x.npy", "--t", 0.05, "--top", 3,
              "--patch-size", 3, "--json", "--panel", tmp_path / "p.png")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["t"] == 0.05 and rep["patch_size"] == 3 and len(rep["queries"]) == 2
    for q, entries in enumerate(rep["queries"]):
        assert len(entries) == 3 and set(entries[0]) == {"index", "flip", "share", "label"}
        assert entries[0]["index"] == q and not entries[0]["flip"] and entries[0]["label"] == q % 3
        assert [e["share"] for e in entries] == sorted((e["share"] for e in entries), reverse=True)
    assert (tmp_path / "p.png").stat().st_size > 0
    ts = np.array([1.0, 0.1, 0.01])
    z = np.random.RandomState(1).randn(3, 1, 1, 5, 5).astype(np.float32)
    np.savez(tmp_path / "r.trajectory.npz", ts=ts, z=z, denoised=z)
    res = run("attribute", "--store", store, "--trajectory", tmp_path / "r.trajectory.npz", "--top", 2, "--json",
              "--patch-size", 3, "--no-xflip")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert len(rep["queries"]) == 1 and len(rep["queries"][0]) == 2 and rep["t"] == ts.tolist()


@pytest.mark.parametrize("case", ["two", "none", "shape", "missing", "no_t"])
def test_cli_bad_query_exit_2(store, tmp_path, case):
    np.save(tmp_path / "bad.npy", np.zeros((2, 1, 4, 5), np.float32))
    x = tmp_path / "x.npy"
    args = {"two": ["--image", x, "--z", x, "--t", 0.1], "none": ["--t", 0.1],
            "shape": ["--z", tmp_path / "bad.npy", "--t", 0.1], "missing": ["--image", tmp_path / "no.npy", "--t", 0.1],
            "no_t": ["--image", x]}[case]
    res = run("attribute", "--store", store, "--top", 2, *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
