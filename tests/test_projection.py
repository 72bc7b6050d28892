"""Projection cells (issue 11): the per-crop certificate at small t and the kernel's ragged form, against
naive float64 oracles on small stores."""
import math

import numpy as np
import pytest
import torch

from pspc_index.denoisers import PSPCSquare
from pspc_index.index import build_bundle, open_bundle
from pspc_index.posterior import ragged_posterior, unfold_u8
from pspc_index.projection import build_cells, kd_cells, projection_posterior, query_coords
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.store import write_store
from test_routing import duplicated_images, naive_composite, queries, smooth_images


def naive_patch_posterior(data, z, t, s):
    """Every (location, query) patch posterior over every virtual image's crop, float64 loops: means
    [P, B, d] and log Z [P, B] = log sum_i e^(-||z - x_i||^2 / 2t^2) over the included images."""
    x = unfold_u8(data.get(torch.arange(len(data)), torch.float64), s, s)  # [P, N, d]
    q = unfold_u8(z.double(), s, s)  # [P, B, d]
    lw = data.log_weights(virtual=True)
    logits = -((q[:, :, None] - x[:, None]) ** 2).sum(3) / (2 * t ** 2) + (0 if lw is None else lw)
    return torch.einsum("pbn,pnd->pbd", torch.softmax(logits, 2), x), torch.logsumexp(logits, 2)


def pairs(data, z, s):
    c, h, w = data.shape
    p, b = (h - s + 1) * (w - s + 1), len(z)
    loc, qb = torch.arange(p).repeat_interleave(b), torch.arange(b).repeat(p)
    return unfold_u8(z.double(), s, s)[loc, qb], loc, qb


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    store = write_store(tmp_path_factory.mktemp("proj") / "s.zarr", smooth_images(n=200))
    return store.training_set()


def test_ragged_posterior_is_exact():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (50, 6), generator=g, dtype=torch.uint8)
    counts = torch.randint(1, 4, (50,), generator=g)
    q = torch.rand(3, 6, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.05, 0.3, 2.0], dtype=torch.float64)
    # query 0: ranges [0, 10) and [30, 50); query 1: none; query 2: [5, 45)
    ptr, lo, hi = torch.tensor([0, 2, 2, 3]), torch.tensor([0, 30, 5]), torch.tensor([10, 50, 45])
    mean, log_z = ragged_posterior(q, t, u8, counts, ptr, lo, hi)
    x = u8.double() / 127.5 - 1
    for p, ids in ((0, list(range(10)) + list(range(30, 50))), (2, list(range(5, 45)))):
        logits = -((q[p] - x[ids]) ** 2).sum(1) / (2 * t[p] ** 2) + torch.log(counts[ids].double())
        np.testing.assert_allclose(mean[p].numpy(), (torch.softmax(logits, 0) @ x[ids]).numpy(), atol=1e-12)
        assert abs(float(log_z[p] - torch.logsumexp(logits, 0))) < 1e-10
    assert log_z[1] == -math.inf and torch.isnan(mean[1]).all()


def test_cells_partition_the_distinct_crops(smooth):
    pc = build_cells(smooth, 3, size=16)
    c, h, w = smooth.shape
    x = unfold_u8(smooth.get(torch.arange(len(smooth)), torch.float64), 3, 3)
    for loc in (0, 7, (h - 2) * (w - 2) - 1):
        lo, hi = int(pc.start[loc, 0]), int(pc.start[loc, -1])
        u = pc.u8[lo:hi]
        # 1. distinct crops whose multiplicities add up to N, each the count of its copies
        assert len(torch.unique(u, dim=0)) == len(u) and int(pc.counts[lo:hi].sum()) == len(smooth)
        want = torch.unique(((x[loc] + 1) * 127.5).round().to(torch.uint8), dim=0, return_counts=True)
        got = sorted(zip(map(tuple, u.tolist()), pc.counts[lo:hi].tolist()))
        assert got == sorted(zip(map(tuple, want[0].tolist()), want[1].tolist()))
        # 2.-3. every entry's (y, rho) inside its cell's box; cell counts are their entries' counts
        coords = query_coords(u.double() / 127.5 - 1, pc, torch.full((len(u),), loc))
        for j in range(int((pc.count[loc] > 0).sum())):
            a, b = int(pc.start[loc, j]) - lo, int(pc.start[loc, j + 1]) - lo
            assert (coords[a:b] >= pc.lo[loc, j]).all() and (coords[a:b] <= pc.hi[loc, j]).all()
            assert float(pc.counts[lo + a:lo + b].sum()) == float(pc.count[loc, j])


def test_kd_cells_equal_counts():
    y = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    order, cell = kd_cells(y, 20)
    assert sorted(order.tolist()) == list(range(1000)) and (cell[1:] >= cell[:-1]).all()
    sizes = torch.bincount(cell)
    assert len(sizes) == 64 and sizes.min() >= 15 and sizes.max() <= 16  # g = 4 splits of 1000 per level


@pytest.mark.parametrize("t", [0.005, 0.05, 0.3, 2.0])
def test_certificate_holds_against_naive(smooth, t, monkeypatch):
    z = queries(smooth, t, b=3)
    exact, log_z = naive_patch_posterior(smooth, z, t, 3)
    q, loc, qb = pairs(smooth, z, 3)
    pc = build_cells(smooth, 3, size=16)
    for tol in (1e-1, 1e-3, 1e-9):
        mean, log_zs, eps, keys = projection_posterior(q, torch.full((len(q),), t, dtype=torch.float64), pc, loc, tol)
        err = (mean - exact[loc, qb]).abs().amax(1)
        done = eps < 1
        # the mean is within 2 eps of exact, the scored normaliser below the whole one, and the unscored
        # mass fraction 1 - Z_S / Z at most eps
        assert (err[done] <= 2 * eps[done] + 1e-12).all(), float((err - 2 * eps)[done].max())
        assert (log_zs <= log_z[loc, qb] + 1e-9).all()
        assert (1 - torch.exp(log_zs - log_z[loc, qb]))[done].le(eps[done] + 1e-9).all()
        if tol == 1e-3 and t <= 0.05:
            assert done.double().mean() > 0.9 and keys.double().mean() < len(smooth) / 2  # peaked: few cells
    # with no cap, a tolerance far below any mass that matters scores every such cell: the exact posterior
    import pspc_index.projection as projection
    monkeypatch.setattr(projection, "SCORE_CAP", 1.0)
    mean, log_zs, eps, _ = projection_posterior(q, torch.full((len(q),), t, dtype=torch.float64), pc, loc, 1e-300)
    np.testing.assert_allclose(mean.numpy(), exact[loc, qb].numpy(), atol=1e-12)
    assert (eps <= 1e-290).all()


def test_duplicates_and_exclusions_exact(tmp_path):
    # 20 black images, triplicates: entries merge them with their counts; excluded images never count
    store = write_store(tmp_path / "s.zarr", duplicated_images())
    for data in (store.training_set(), store.training_set().without([0, 3, 7])):
        pc = build_cells(data, 3, size=4)
        assert int(pc.counts.sum()) == len(data) * 36 - (0 if data.excluded is None else 2 * 3 * 36)
        z = queries(data, 0.01, b=2)
        exact, _ = naive_patch_posterior(data, z, 0.01, 3)
        q, loc, qb = pairs(data, z, 3)
        mean, _, eps, _ = projection_posterior(q, torch.full((len(q),), 0.01, dtype=torch.float64), pc, loc, 1e-6)
        assert ((mean - exact[loc, qb]).abs().amax(1) <= 2 * eps + 1e-12).all()


def test_retrieval_takes_projection_cells(tmp_path, smooth):
    store = write_store(tmp_path / "s.zarr", smooth_images(n=200))
    build_bundle(store.path, tmp_path / "b", [3], stride=2, kind="ivf-flat", nlist=6, progress=False)
    data = store.training_set()
    bundle = open_bundle(tmp_path / "b", store)
    for t in (0.01, 0.1, 0.5):
        z = queries(data, t)
        oracle = naive_composite(data, z, t, 3)
        den = RetrievalPSPC(data, bundle, patch_size=3, tol=1e-3, predict=False)
        out = den(z, t).double()
        rep = den.last_report[3]
        assert rep["certificate"] == "projection cells" and abs(sum(rep["fractions"].values()) - 1) < 1e-12
        err = (out - oracle).abs()[:, 0]
        # float32 output rounding is the only slack beyond the certified bound
        assert (err <= rep["pixel_bound"] + 1e-6).all() and rep["bound_max"] <= 1e-3
        if t == 0.01:
            assert rep["fractions"]["retrieval"] > 0.9
    # attribution (on_weights) and no tol take the index's path
    assert not den.projects(3, on_weights=lambda *a: None)
    assert not RetrievalPSPC(data, bundle, patch_size=3).projects(3)
    assert not RetrievalPSPC(data, bundle, patch_size=3, tol=1e-3, projection=False).projects(3)


def test_without_numba_the_index_path(tmp_path, monkeypatch):
    # numba is a dependency, but a machine without it (a GPU image) still runs: no projection cells
    import pspc_index.retrieval as retrieval
    monkeypatch.setattr(retrieval, "COMPILED", False)
    store = write_store(tmp_path / "s.zarr", smooth_images(n=30))
    build_bundle(store.path, tmp_path / "b", [3], stride=2, kind="flat", progress=False)
    den = RetrievalPSPC(store.training_set(), open_bundle(tmp_path / "b", store), patch_size=3, tol=1e-3)
    assert not den.projects(3)


def test_routed_pairs_are_exact(smooth, tmp_path, monkeypatch):
    # a cap of no entries beyond the seed routes every uncertified pair to the exact kernel
    import pspc_index.projection as projection
    monkeypatch.setattr(projection, "SCORE_CAP", 0.0)
    store = write_store(tmp_path / "s.zarr", smooth_images(n=200))
    build_bundle(store.path, tmp_path / "b", [3], stride=2, kind="flat", progress=False)
    data = store.training_set()
    z = queries(data, 0.5)
    den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), patch_size=3, tol=1e-3, predict=False)
    out = den(z, 0.5).double()
    rep = den.last_report[3]
    assert rep["fractions"]["exact"] > 0.5
    np.testing.assert_allclose(out.numpy(), PSPCSquare(data, patch_size=3, dtype=torch.float64)(z, 0.5).double().numpy(),
                               atol=1e-5)
    assert ((out - naive_composite(data, z, 0.5, 3)).abs()[:, 0] <= rep["pixel_bound"] + 1e-5).all()
