"""Exact PSPC attribution (DESIGN.md section 3): maps, shares, naive check, duplicates, CLI."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.attribution import (_over_steps, attribute_image, attribute_trajectory, attribution_maps,
                                   euler_weights, tile_names)
from pspc_index.cli import cli
from pspc_index.denoisers import PSPCSquare
from pspc_index.store import TrainingSet, write_store
from pspc_index.sampler import initial_noise, pf_ode_sample


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
    shares, _ = attribution_maps(PSPCSquare(data, patch_size=3, dtype=dtype), z, 0.6)
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


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    from pspc_index.index import build_bundle, open_bundle
    from pspc_index.store import ImageStore
    root = tmp_path_factory.mktemp("attr-index")
    write_store(root / "s.zarr", np.random.RandomState(5).randint(0, 256, (30, 1, 8, 8)).astype(np.uint8))
    build_bundle(root / "s.zarr", root / "flat", [3], stride=2, kind="flat", progress=False)
    build_bundle(root / "s.zarr", root / "sq8", [3], stride=4, kind="sq8", progress=False)
    store = ImageStore.open(root / "s.zarr")
    return root, store.training_set(), {k: open_bundle(root / k, store) for k in ("flat", "sq8")}


def test_retrieval_attribution_all_candidates_equals_exact(indexed):
    from pspc_index.retrieval import RetrievalPSPC
    _, data, bundles = indexed
    z = data.get(torch.tensor([3, 40])) + 0.5 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact, te = attribution_maps(PSPCSquare(data, patch_size=3), z, 0.5, top=5)
    ret, tr = attribution_maps(RetrievalPSPC(data, bundles["flat"], k=len(data), tail="none", patch_size=3),
                               z, 0.5, top=5)
    np.testing.assert_allclose(ret.numpy(), exact.numpy(), atol=1e-6)
    assert torch.equal(tr.ids, te.ids)
    np.testing.assert_allclose(tr.maps.numpy(), te.maps.numpy(), atol=1e-6)


@pytest.mark.parametrize("tail", ["none", "sample"])
def test_retrieval_maps_sum_to_one_and_reproduce_output(indexed, tail):
    from pspc_index.retrieval import RetrievalPSPC
    _, data, bundles = indexed
    den = RetrievalPSPC(data, bundles["sq8"], k=6, tail=tail, m=10, patch_size=3)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.8
    shares, tm = attribution_maps(den, z, 0.4, top=len(data))
    np.testing.assert_allclose(shares.sum(1).numpy(), 1, atol=1e-6)
    np.testing.assert_allclose(tm.maps.sum(1).numpy(), 1, atol=1e-6)
    x = data.get(tm.ids)[:, :, 0].to(torch.float64)
    np.testing.assert_allclose((tm.maps * x).sum(1).numpy(), den(z, 0.4)[:, 0].numpy(), atol=1e-5)
    if tail == "none":  # sparse: only retrieved candidates carry weight
        assert ((shares > 0).sum(1) < len(data)).all()


def test_exact_and_retrieval_agree_on_top_m_at_small_t(tmp_path):
    # 8 base images, 3 near-copies each (+-3 grey levels): a query near a base has 3 comparable shares
    from pspc_index.index import build_bundle, open_bundle
    from pspc_index.retrieval import RetrievalPSPC
    from pspc_index.store import ImageStore
    rs = np.random.RandomState(11)
    base = rs.randint(10, 246, (8, 1, 1, 8, 8))
    copies = (base + rs.randint(-3, 4, (8, 3, 1, 8, 8))).reshape(24, 1, 8, 8).astype(np.uint8)
    write_store(tmp_path / "s.zarr", copies)
    build_bundle(tmp_path / "s.zarr", tmp_path / "b", [3], stride=4, kind="sq8", progress=False)
    store = ImageStore.open(tmp_path / "s.zarr")
    data = store.training_set()
    x = torch.from_numpy(base[[1, 4, 6], 0].astype(np.float32) / 127.5 - 1)
    ex, _, _ = attribute_image(PSPCSquare(data, patch_size=3), x, 0.1, seed=2, top=3)
    den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=8, tail="none", patch_size=3)
    rt, _, _ = attribute_image(den, x, 0.1, seed=2, top=3)
    for q, (a, b) in enumerate(zip(ex, rt)):
        assert {e["index"] for e in a} == {3 * [1, 4, 6][q] + j for j in range(3)}
        assert [(e["index"], e["flip"]) for e in a] == [(e["index"], e["flip"]) for e in b]
        np.testing.assert_allclose([e["share"] for e in a], [e["share"] for e in b], atol=1e-3)


def test_cli_attribute_with_index(indexed, tmp_path):
    root, data, _ = indexed
    np.save(tmp_path / "x.npy", data.u8(torch.tensor([2, 5])).numpy())
    res = run("attribute", "--store", root / "s.zarr", "--image", tmp_path / "x.npy", "--t", 0.1, "--top", 2,
              "--patch-size", 3, "--index", root / "sq8", "--k", 8, "--json", "--panel", tmp_path / "p.png")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert [q[0]["index"] for q in rep["queries"]] == [2, 5] and (tmp_path / "p.png").exists()


class _OneViewAtATime(PSPCSquare):
    """PSPC-Square that verify_attribution cannot batch (not exactly the PSPCSquare type): the per-view path."""


@pytest.mark.parametrize("trajectory", [False, True])
def test_verify_batched_counterfactuals_equal_one_view_at_a_time(trajectory):
    """verify_attribution runs every counterfactual (each query's top m, every random draw) as one batch of
    per-query exclusions; it must report what one run per excluded set reports."""
    from pspc_index.attribution import verify_attribution
    from pspc_index.sampler import initial_noise

    data = tiny(n=10, seed=3).without([2])
    z = initial_noise(0, range(3), data.shape) if trajectory else torch.randn(3, *data.shape) * 0.4
    t = None if trajectory else 0.3
    shares, _ = attribution_maps(PSPCSquare(data, patch_size=3), z if t else z / 80 * 0.3, 0.3)
    kw = dict(m=2, z=z, t=t, steps=4 if trajectory else None, draws=3, seed=1)
    got, cf = verify_attribution(lambda v: PSPCSquare(v, patch_size=3), data, shares, **kw)
    want, cf_want = verify_attribution(lambda v: _OneViewAtATime(v, patch_size=3), data, shares, **kw)
    assert torch.allclose(cf, cf_want, atol=1e-5)
    for g, w in zip(got, want):
        assert g["removed"] == w["removed"] and g["random_removed"] == w["random_removed"]
        assert g["change_top"] == pytest.approx(w["change_top"], abs=1e-4)
        assert g["change_random"] == pytest.approx(w["change_random"], abs=1e-4)


def test_panel_tile_names_give_store_index_and_flip():
    data = TrainingSet(torch.zeros(5, 1, 4, 4, dtype=torch.uint8))
    assert tile_names(data, torch.tensor([[0, 7], [9, 4]])) == [["#0", "#2 flip"], ["#4 flip", "#4"]]


@pytest.mark.parametrize("excluding", [False, True])
def test_trajectory_attribution_batched_by_size_equals_the_per_step_sum(excluding):
    """Steps of one patch size run as one batch (any chunking); the result is the per-step sum of shares
    and maps weighted by euler_weights. A denoiser with per-query exclusions runs step by step."""
    g = torch.Generator().manual_seed(3)
    data = TrainingSet(torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=g))
    den = PSPCSquare(data, dtype=torch.float64)
    if excluding:
        den.exclude_per_query(torch.rand(3, 12, generator=g) < 0.3)
    _, traj = pf_ode_sample(den, initial_noise(0, range(3), data.shape), 8, record=True)
    assert len(den.sizes(traj.ts).unique()) > 2  # several patch sizes along the trajectory
    _, shares, tm = attribute_trajectory(den, traj.ts, traj.z, top=2, maps=True)
    w = euler_weights(traj.ts)
    want = sum(float(w[i]) * attribution_maps(den, traj.z[i], float(traj.ts[i]))[0] for i in range(len(w)))
    want_maps = sum(float(w[i]) * attribution_maps(den, traj.z[i], float(traj.ts[i]), ids=tm.ids)[1].maps
                    for i in range(len(w)))
    assert (shares - want).abs().max() <= 1e-12 and (tm.maps - want_maps).abs().max() <= 1e-12
    one = lambda z, t, rows: attribution_maps(den, z, t)[0]  # noqa: E731
    assert (_over_steps(den, traj.ts, traj.z, w, one, rows_per_call=2) - want).abs().max() <= 1e-12
