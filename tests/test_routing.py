"""Certified per-location routing and duplicate-aware entries (issue 11, items 1-2), against naive float64
oracles on small stores."""
import json

import numpy as np
import pytest
import torch

from pspc_index.attribution import attribution_maps
from pspc_index.denoisers import PSPCSquare
from pspc_index.errors import UserError
from pspc_index.index import build_bundle, open_bundle, window_u8
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.store import write_store


def naive_composite(data, z, t, s):
    """PSPC-Square by loops over crop locations, float64: softmax over every virtual image's patch."""
    x = data.get(torch.arange(len(data)), torch.float64)  # [N, C, H, W]
    b, c, h, w = z.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    cov = torch.zeros(h, w, dtype=torch.float64)
    lw = data.log_weights(virtual=True)
    for y in range(h - s + 1):
        for xx in range(w - s + 1):
            zp = z[:, :, y:y + s, xx:xx + s].double().flatten(1)
            xp = x[:, :, y:y + s, xx:xx + s].flatten(1)
            logits = -((zp[:, None] - xp[None]) ** 2).sum(2) / (2 * t ** 2) + (0 if lw is None else lw[None])
            out[:, :, y:y + s, xx:xx + s] += (torch.softmax(logits, 1) @ xp).view(b, c, s, s)
            cov[y:y + s, xx:xx + s] += 1
    return out / cov


def smooth_images(n=60, h=8, seed=0):
    """Blocky images with a little noise: neighbours at every distance, so posteriors range from peaked
    to diffuse over t."""
    rs = np.random.RandomState(seed)
    base = np.repeat(np.repeat(rs.randint(0, 256, (n, 1, h // 2, h // 2)), 2, 2), 2, 3)
    return np.clip(base + rs.randint(-6, 7, (n, 1, h, h)), 0, 255).astype(np.uint8)


def duplicated_images(seed=0):
    """20 black images, 3 copies each of 8 random ones, and 6 distinct ones: 50 images."""
    rs = np.random.RandomState(seed)
    uniq = rs.randint(0, 256, (8, 1, 8, 8))
    return np.concatenate([np.zeros((20, 1, 8, 8)), np.repeat(uniq, 3, 0),
                           rs.randint(0, 256, (6, 1, 8, 8))]).astype(np.uint8)[rs.permutation(50)]


def queries(data, t, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return data.get(torch.randint(0, len(data), (b,), generator=g)) + t * torch.randn(b, *data.shape, generator=g)


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    store = write_store(root / "s.zarr", smooth_images())
    paths = {kind: root / kind for kind in ("flat", "ivf-flat", "ivf-pq")}
    for kind, path in paths.items():
        build_bundle(store.path, path, [3], stride=2, kind=kind, nlist=6, pq_m=9, progress=False)
    return store, {kind: open_bundle(path, store) for kind, path in paths.items()}


def without_predictor(bundle):
    """The bundle with no neighbour statistics: the skip predictor never skips (every location searched)."""
    return type(bundle)(bundle.path, {**bundle.manifest, "neighbours": {}})


@pytest.mark.parametrize("tail", ["none", "sample"])
@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-pq"])
def test_bound_holds_at_every_location(smooth, kind, tail):
    store, bundles = smooth
    data = store.training_set()
    certified = 0
    for t in (0.01, 0.05, 0.2, 0.6):
        z = queries(data, t)
        oracle = naive_composite(data, z, t, 3)
        for tol in (None, 1e-3, 0.3):
            den = RetrievalPSPC(data, without_predictor(bundles[kind]), k=16, tail=tail, m=16, patch_size=3, tol=tol,
                                dtype=torch.float64)
            out = den(z, t).double()
            rep = den.last_report[3]
            err = (out - oracle).abs()[:, 0]
            # float32 output rounding is the only slack (the kernel runs in float64 here)
            assert (err <= rep["pixel_bound"] + 1e-6).all(), (kind, t, tol, float((err - rep["pixel_bound"]).max()))
            if tol is not None:
                assert err.max() <= tol + 1e-6 and rep["bound_max"] <= tol
                assert abs(sum(rep["fractions"].values()) - 1) < 1e-12
                certified += (rep["bound"] < 1)[~rep["routed"]].sum()
    # the bound is not vacuous: IVF cells certify locations (flat at stride 2 only with everything scored)
    assert (certified > 0) == kind.startswith("ivf")


def test_flat_stride_one_all_candidates_certified(tmp_path):
    # a flat index at stride 1 (window = crop): the k-th distance bounds the rest; k = N leaves nothing
    store = write_store(tmp_path / "s.zarr", smooth_images(n=30))
    build_bundle(store.path, tmp_path / "b", [3], stride=1, kind="flat", progress=False)
    data = store.training_set()
    z = queries(data, 0.02)
    den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=len(data), tail="none", patch_size=3,
                        dtype=torch.float64, tol=1e-9)
    out = den(z, 0.02)
    assert den.last_report[3]["fractions"]["retrieval"] == 1 and den.last_report[3]["bound_max"] == 0
    assert (out.double() - naive_composite(data, z, 0.02, 3)).abs().max() < 1e-6


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    store = write_store(root / "s.zarr", duplicated_images())
    for kind in ("flat", "ivf-flat"):
        build_bundle(store.path, root / kind, [3], stride=4, kind=kind, nlist=2, progress=False)
    return store, {kind: open_bundle(root / kind, store) for kind in ("flat", "ivf-flat")}


def test_entries_are_identical_windows(duplicated):
    store, bundles = duplicated
    data = store.training_set()
    for kind, bundle in bundles.items():
        for name, rec in bundle.manifest["files"].items():
            by, bx = rec["block"]
            e = bundle.entries(3, by, bx)
            assert e.counts.sum() == len(data) and sorted(e.members.tolist()) == list(range(len(data)))
            win = tuple(rec["window"])
            u = window_u8(data, torch.arange(len(data)), win).flatten(1)
            reps = u[torch.from_numpy(e.reps.astype(np.int64))]
            assert len(torch.unique(reps, dim=0)) == len(reps)  # entries are distinct windows
            for j in range(len(e.counts)):  # and each entry's members are one window
                mem = torch.from_numpy(e.members[e.offsets[j]:e.offsets[j + 1]].astype(np.int64))
                assert (u[mem] == u[mem[0]]).all()
            assert len(e.counts) < len(data)  # 40 black windows (flips included) share an entry


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_duplicates_exact(duplicated, kind):
    # k = the largest entry count scores every image once through its entry: exact with k < N images
    store, bundles = duplicated
    data = store.training_set()
    entries = max(rec["entries"]["count"] for rec in bundles[kind].manifest["files"].values())
    assert entries < len(data)
    for t in (0.05, 0.5):
        z = queries(data, t)
        oracle = naive_composite(data, z, t, 3)
        den = RetrievalPSPC(data, bundles[kind], k=entries, tail="none", patch_size=3, dtype=torch.float64)
        out = den(z, t).double()
        assert (out - oracle).abs().max() < 1e-6 and den.last_report[3]["bound_max"] == 0
        every = RetrievalPSPC(data, bundles[kind], k=len(data), tail="sample", patch_size=3, dtype=torch.float64)
        assert torch.equal(every(z, t).double(), out)
        # with an exclusion, the counts shrink to the members taking part
        view = data.without([int(np.flatnonzero(duplicated_images().reshape(50, -1).max(1) == 0)[0]), 3])
        ex = RetrievalPSPC(view, bundles[kind], k=entries, tail="none", patch_size=3, dtype=torch.float64)
        assert (ex(z, t).double() - naive_composite(view, z, t, 3)).abs().max() < 1e-6


def test_dedup_attribution_equals_exact_shares(duplicated):
    store, bundles = duplicated
    data = store.training_set()
    z = queries(data, 0.3, b=2)
    exact, _ = attribution_maps(PSPCSquare(data, patch_size=3, dtype=torch.float64), z, 0.3)
    den = RetrievalPSPC(data, bundles["ivf-flat"], k=len(data), tail="none", patch_size=3, dtype=torch.float64)
    shares, _ = attribution_maps(den, z, 0.3)
    np.testing.assert_allclose(shares.numpy(), exact.numpy(), atol=1e-12)
    # identical images get identical shares (the black ones, all 40 virtual copies)
    black = torch.from_numpy(np.flatnonzero(data.u8(torch.arange(len(data))).flatten(1).max(1).values.numpy() == 0))
    assert len(black) == 40 and torch.allclose(shares[:, black], shares[:, black[:1]])


def test_routed_attribution_equals_exact(smooth):
    # a tiny tol sends every location to exact_pairs (the predictor switched off): its weights pass must
    # give the exact path's shares and reproduce the output
    store, bundles = smooth
    data = store.training_set().without([4])
    den = RetrievalPSPC(data, without_predictor(bundles["ivf-pq"]), k=4, tail="none", patch_size=3, tol=1e-12,
                        dtype=torch.float64)
    z = queries(data, 0.4, b=2)
    shares, tm = attribution_maps(den, z, 0.4, top=len(data))
    assert den.last_report[3]["fractions"]["exact"] > 0.5
    exact, _ = attribution_maps(PSPCSquare(data, patch_size=3, dtype=torch.float64), z, 0.4)
    np.testing.assert_allclose(shares.numpy(), exact.numpy(), atol=1e-10)
    x = data.get(tm.ids)[:, :, 0].to(torch.float64)
    np.testing.assert_allclose((tm.maps * x).sum(1).numpy(), den(z, 0.4)[:, 0].numpy(), atol=1e-6)


def test_predictor_skips_diffuse_steps(smooth):
    store, bundles = smooth
    data = store.training_set()
    t = torch.tensor([0.001, 30.0], dtype=torch.float64)
    den = RetrievalPSPC(data, bundles["flat"], k=8, tail="none", patch_size=3, tol=1e-3)
    assert den.diffuse(t, 3).tolist() == [False, True]
    z = queries(data, 1.0, b=2)
    out = den(z, t)
    rep = den.last_report[3]
    assert rep["fractions"]["skipped"] == 0.5 and den.history[-1]["fractions"] == rep["fractions"]
    np.testing.assert_allclose(out[1:].double().numpy(), naive_composite(data, z[1:], 30.0, 3).numpy(), atol=1e-6)
    assert not RetrievalPSPC(data, bundles["flat"], k=8, patch_size=3).diffuse(t, 3).any()  # no tol: no skip


def test_identical_images_default_query(tmp_path):
    # every image the same: each block is two entries (the image, its flip) of N members each; a default
    # build and a default query (no tol, and the CLI's tol) must work and be exact
    x = np.repeat(np.random.RandomState(3).randint(0, 256, (1, 1, 16, 16)), 200, 0).astype(np.uint8)
    store = write_store(tmp_path / "s.zarr", x)
    man = build_bundle(store.path, tmp_path / "b", None, progress=False)
    assert {rec["entries"]["count"] for rec in man["files"].values()} == {2}
    assert {rec["kind"] for rec in man["files"].values()} == {"flat"}
    data = store.training_set()
    z = queries(data, 0.3)
    t = torch.full((4,), 0.3, dtype=torch.float64)
    exact = PSPCSquare(data)(z, t)
    for tol in (None, 1e-3):
        den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), tol=tol)
        assert (den(z, t) - exact).abs().max() < 1e-5


def test_format_1_bundle_refused(duplicated, tmp_path):
    store, bundles = duplicated
    import shutil
    shutil.copytree(bundles["flat"].path, tmp_path / "old")
    man = json.loads((tmp_path / "old" / "manifest.json").read_text())
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**man, "format_version": 1}))
    with pytest.raises(UserError, match="rebuild it"):
        open_bundle(tmp_path / "old", store)
