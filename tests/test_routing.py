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
            den = RetrievalPSPC(data, without_predictor(bundles[kind]), k=16, tail=tail, m=16, patch_size=3, projection=False, tol=tol,
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
    # the bound is not vacuous: IVF cells certify locations (flat at stride 2 only with everything scored);
    # the index path here (projection cells, which would take these 3x3 crops, in tests/test_projection.py)
    assert (certified > 0) == kind.startswith("ivf")


def test_flat_stride_one_all_candidates_certified(tmp_path):
    # a flat index at stride 1 (window = crop): the k-th distance bounds the rest; k = N leaves nothing
    store = write_store(tmp_path / "s.zarr", smooth_images(n=30))
    build_bundle(store.path, tmp_path / "b", [3], stride=1, kind="flat", progress=False)
    data = store.training_set()
    z = queries(data, 0.02)
    den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=len(data), tail="none", patch_size=3, projection=False,
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
    den = RetrievalPSPC(data, bundles["flat"], k=8, tail="none", patch_size=3, projection=False, tol=1e-3)
    assert den.diffuse(t, 3).tolist() == [False, True]
    z = queries(data, 1.0, b=2)
    out = den(z, t)
    rep = den.last_report[3]
    assert rep["fractions"]["skipped"] == 0.5 and den.history[-1]["fractions"] == rep["fractions"]
    np.testing.assert_allclose(out[1:].double().numpy(), naive_composite(data, z[1:], 30.0, 3).numpy(), atol=1e-6)
    assert not RetrievalPSPC(data, bundles["flat"], k=8, patch_size=3).diffuse(t, 3).any()  # no tol: no skip
    # predictor off: the diffuse query searches too, and stays within tol of exact (routed where uncertified)
    off = RetrievalPSPC(data, bundles["flat"], k=8, tail="none", patch_size=3, projection=False, tol=1e-3, predict=False)
    assert not off.diffuse(t, 3).any()
    out = off(z, t)
    assert off.last_report[3]["fractions"]["skipped"] == 0
    np.testing.assert_allclose(out[1:].double().numpy(), naive_composite(data, z[1:], 30.0, 3).numpy(), atol=1e-3)


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


def naive_tail_case(seed, m, n=300, k=20, d=4, b=6, t=0.35):
    """One seeded draw of the tail estimator against its float64 oracle, for b queries at one location:
    patches x [n, d] in [-1, 1], each query's k heaviest images scored exactly, m uniform draws with
    replacement. Returns tail_bound's arguments and the exact means [1, b, d]."""
    g = torch.Generator().manual_seed(1000 + b)  # the data and queries: fixed; the draws: seeded
    x = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    zq = torch.rand(b, d, generator=g, dtype=torch.float64) * 2 - 1
    dist = ((zq[:, None] - x[None]) ** 2).sum(2)  # [b, n]
    logw = -dist / (2 * t ** 2)
    exact = (torch.softmax(logw, 1) @ x)[None]
    scored = torch.zeros(b, n, dtype=torch.bool).scatter_(1, logw.topk(k, 1).indices, True)
    lse_s = torch.logsumexp(logw.masked_fill(~scored, -np.inf), 1)
    mu_s = (torch.softmax(logw.masked_fill(~scored, -np.inf), 1) @ x)[None]
    draws = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(seed))
    lw = (logw[:, draws] + np.log(n / m)).masked_fill(scored[:, draws], -np.inf)  # [b, m]
    lse_t = torch.logsumexp(lw, 1)
    mean_t = torch.softmax(lw, 1) @ x[draws]
    lse2 = torch.logsumexp(2 * lw, 1)
    merged = (torch.exp(lse_s)[:, None] * mu_s[0] + torch.exp(lse_t)[:, None] * mean_t) / torch.exp(
        torch.logaddexp(lse_s, lse_t))[:, None]
    low = dist.masked_fill(scored, np.inf).amin(1)[:, None, None]  # [b, 1, 1]: the unscored images' nearest
    unscored = torch.full((b, 1), float(n - k), dtype=torch.float64)
    log_u = np.log(n - k) - low[:, 0, 0] / (2 * t ** 2)
    eps = torch.sigmoid(log_u - lse_s)[None]
    args = (mu_s, lse_s[None], (mean_t[None], lse_t[None], lse2[None]), merged[None], m, n, low, unscored,
            lse_s[None], eps, torch.full((b,), t, dtype=torch.float64))
    return args, exact


def test_tail_confidence_bound_covers_at_its_rate():
    # Maurer-Pontil's empirical-Bernstein bound, over 300 seeded tails: the exact mean is within the bound
    # at (far) more than 1 - delta of (seed, query) cells, at a delta large enough for misses to show
    from pspc_index.retrieval import tail_bound
    for m, delta in ((64, 0.3), (1024, 0.1)):
        miss, total, widths = 0, 0, []
        for seed in range(300):
            args, exact = naive_tail_case(seed, m)
            bound = tail_bound(*args, delta)
            err = (args[3] - exact).abs().amax(2)
            miss += int((err > bound).sum())
            total += err.numel()
            widths.append(bound)
        assert miss <= delta * total, (m, miss, total)
        widths = torch.stack(widths)
        assert torch.isfinite(widths).all() and (widths >= 0).all()
        if m == 1024:  # not vacuous: below the certified bound of the merged mean (2 eps plus its move)
            cert = 2 * args[9] + (args[3] - args[0]).abs().amax(2)
            assert (widths.median(0).values < cert).all()
    # more draws, a tighter bound (same delta)
    small = torch.stack([tail_bound(*naive_tail_case(s, 64)[0], 0.1) for s in range(20)]).median()
    large = torch.stack([tail_bound(*naive_tail_case(s, 1024)[0], 0.1) for s in range(20)]).median()
    assert large < small / 2


def test_tail_bound_in_retrieval_and_its_routing(tmp_path):
    # a flat index at stride 1 (window = crop): the k-th distance bounds every unscored term, the range
    # the confidence bound needs; at mid t the tail's bound is then tighter than the certified one
    store = write_store(tmp_path / "s.zarr", smooth_images())
    build_bundle(store.path, tmp_path / "b", [3], stride=1, kind="flat", progress=False)
    data = store.training_set()
    bundle = without_predictor(open_bundle(tmp_path / "b", store))
    t, delta = 0.5, 0.2
    z = queries(data, t)
    oracle = naive_composite(data, z, t, 3)
    # no tol: the merged mean everywhere; its bound is certified or the tail's confidence bound. The corner
    # pixels are covered by one crop each (miss rate <= delta), every pixel by at most 9 (<= 9 delta)
    corner = every = total_c = total_e = 0
    for seed in range(40):
        den = RetrievalPSPC(data, bundle, k=16, tail="sample", m=100, seed=seed, patch_size=3, projection=False, delta=delta,
                            dtype=torch.float64)
        err = (den(z, t).double() - oracle).abs()[:, 0]
        rep = den.last_report[3]
        assert rep["fractions"]["tail"] > 0 and not rep["certified"] and rep["confidence"] == 1 - delta
        assert (rep["tail_bound"] < 2 * rep["eps_bar"]).float().mean() > 0.5  # tighter than certified
        over = err > rep["pixel_bound"] + 1e-6
        corner += int(over[:, [0, 0, -1, -1], [0, -1, 0, -1]].sum())
        every += int(over.sum())
        total_c, total_e = total_c + 4 * len(z), total_e + over.numel()
    assert corner <= delta * total_c and every <= 9 * delta * total_e
    # a tol the tail cannot meet: those locations go to exact, and the report says so
    strict = RetrievalPSPC(data, bundle, k=16, tail="sample", m=100, patch_size=3, projection=False, tol=1e-4, dtype=torch.float64)
    err = (strict(z, t).double() - oracle).abs()
    rep = strict.last_report[3]
    assert rep["tail_unmet"] > 0 and "routed to the exact kernel" in rep["note"] and rep["fractions"]["exact"] > 0
    assert err.max() <= 1e-4 and rep["certified"] and strict.history[-1]["tail_unmet"] == rep["tail_unmet"]
    # a loose tol: locations whose certified bound exceeds it but the tail's meets it rest on the tail
    loose = RetrievalPSPC(data, bundle, k=16, tail="sample", m=100, patch_size=3, projection=False, tol=0.1, delta=delta,
                          dtype=torch.float64)
    err = (loose(z, t).double() - oracle).abs()
    rep = loose.last_report[3]
    assert rep["fractions"]["tail"] > 0 and not rep["certified"] and rep["bound_max"] <= 0.1
    assert abs(sum(rep["fractions"].values()) - 1) < 1e-12 and err.max() <= 0.1
    # a tail of every image is exact, hence certified with bound 0
    full = RetrievalPSPC(data, bundle, k=4, tail="sample", m=len(data), patch_size=3, dtype=torch.float64)
    assert (full(z, t).double() - oracle).abs().max() < 1e-6 and full.last_report[3]["certified"]
    assert full.last_report[3]["bound_max"] == 0


def test_cli_default_tol_routes_and_reports(smooth, tmp_path):
    from click.testing import CliRunner

    from pspc_index.cli import cli
    store, bundles = smooth
    run = lambda *a: CliRunner().invoke(cli, [str(v) for v in a])  # noqa: E731
    base = ("denoise", "--store", store.path, "--index", bundles["ivf-flat"].path, "--t", 0.3, "--patch-size", 3,
            "--n", 3, "--k", 8)
    # the default tol (1e-3 per pixel): within it of exact; the routing line and the JSON report
    r = run(*base, "--out", tmp_path / "d.npy", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "pspc-index: routing t=0.3 s=3: retrieval" in r.output and "(certified" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["tol"] == 1e-3 and rep["tail"] == "none" and len(rep["steps"]) == 1
    st = rep["steps"][0]
    assert abs(sum(st["fractions"].values()) - 1) < 1e-12 and st["bound_max"] <= 1e-3 and st["certified"]
    data = store.training_set()
    g = torch.Generator().manual_seed(0)  # the CLI's forward-process draw
    z = data.get(torch.randint(0, len(data), (3,), generator=g)) + 0.3 * torch.randn(3, *data.shape, generator=g)
    d = torch.from_numpy(np.load(tmp_path / "d.npy")).double()
    assert (d - naive_composite(data, z, 0.3, 3)).abs().max() <= 1e-3 + 1e-6
    # --tol inf: bounds reported, nothing routed
    r = run(*base, "--out", tmp_path / "e.npy", "--tol", "inf", "--report", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    st = json.loads((tmp_path / "e.json").read_text())["steps"][0]
    assert st["fractions"]["exact"] == 0 and st["fractions"]["skipped"] == 0
    # small t: projection cells certify by default, --certificate index takes the index's cells; both within tol
    for cert, name in (("projection", "projection cells"), ("index", "index cells")):
        r = run("denoise", "--store", store.path, "--index", bundles["ivf-flat"].path, "--t", 0.01, "--patch-size", 3,
                "--n", 3, "--out", tmp_path / f"{cert}.npy", "--certificate", cert, "--report", tmp_path / f"{cert}.json")
        assert r.exit_code == 0, r.output
        st = json.loads((tmp_path / f"{cert}.json").read_text())["steps"][0]
        assert st["certificate"] == name and f"(certified, {name})" in r.output and st["bound_max"] <= 1e-3
    assert np.abs(np.load(tmp_path / "projection.npy") - np.load(tmp_path / "index.npy")).max() <= 2e-3 + 1e-6
    # --no-skip: a step the predictor calls diffuse is searched (and certified or routed) all the same
    r = run("denoise", "--store", store.path, "--index", bundles["ivf-flat"].path, "--t", 30, "--patch-size", 3,
            "--n", 3, "--out", tmp_path / "n.npy", "--no-skip", "--report", tmp_path / "n.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "n.json").read_text())["steps"][0]["fractions"]["skipped"] == 0
    # --report without --index: one line, exit 2
    r = run("denoise", "--store", store.path, "--t", 0.3, "--out", tmp_path / "f.npy", "--report", tmp_path / "f.json")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    # sample: one routing line per step below full size, the calls merged per step
    r = run("sample", "--store", store.path, "--index", bundles["ivf-flat"].path, "--n", 2, "--steps", 3,
            "--patch-size", 3, "--out", tmp_path / "x.npy", "--report", tmp_path / "x.json", "--batch", 1)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "x.json").read_text())
    assert len(rep["steps"]) == 3 and len(rep["calls"]) == 6 and all(st["queries"] == 2 for st in rep["steps"])
    assert r.output.count("pspc-index: routing") == 3


def test_cell_radius_rounds_up_from_float32():
    # the float32 distances, rounded up, bound the exact float64 ones, and are within 1e-5 relative of them
    from pspc_index.index import cell_bounds, crop_mask
    rs = np.random.RandomState(5)
    u = rs.randint(0, 256, (3000, 2 * 6 * 6)).astype(np.uint8)
    u[:500] = rs.choice([0, 255], (500, 72))  # extremes: the largest distances
    cell = rs.randint(0, 7, 3000).astype(np.int32)
    x = torch.from_numpy(u).double() / 127.5 - 1
    centroids = torch.stack([x[torch.from_numpy(cell == j)].mean(0) for j in range(7)]).float().numpy()
    radius, lo, hi = cell_bounds(u, 2, (0, 6, 0, 6), 3, cell, centroids)
    mask = crop_mask(2, 6, 6, 3)
    exact = (((x - torch.from_numpy(centroids).double()[cell]) ** 2) @ mask.T).sqrt()  # [E, P]
    naive = torch.stack([exact[torch.from_numpy(cell == j)].amax(0) for j in range(7)])
    assert (torch.from_numpy(radius) >= naive).all() and ((torch.from_numpy(radius) - naive) / naive).max() < 1e-5
    assert all((lo[j] == u[cell == j].min(0)).all() and (hi[j] == u[cell == j].max(0)).all() for j in range(7))


def test_cli_refuses_retrieval_options_that_would_be_ignored(smooth, tmp_path):
    from click.testing import CliRunner

    from pspc_index.cli import cli
    store, bundles = smooth
    run = lambda *a: CliRunner().invoke(cli, [str(v) for v in a])  # noqa: E731
    exact = ("denoise", "--store", store.path, "--t", 0.3, "--n", 2, "--out", tmp_path / "d.npy")
    idx = ("--index", bundles["ivf-flat"].path, "--patch-size", 3)
    for extra in (("--no-skip",), ("--certificate", "index"), ("--tol", 1e-3), ("--k", 10), ("--tail", "sample")):
        r = run(*exact, *extra)
        assert r.exit_code == 2 and "give --index BUNDLE" in r.output and len(r.output.strip().splitlines()) == 1
    for extra in (("--no-skip",), ("--certificate", "projection")):
        r = run(*exact, *idx, "--tol", "inf", *extra)
        assert r.exit_code == 2 and "finite --tol" in r.output
    r = run("attribute", "--store", store.path, "--image", tmp_path / "q.npy", "--t", 0.3, *idx, "--tol", 1e-3,
            "--certificate", "projection")
    assert r.exit_code == 2 and "index's cells" in r.output
    assert not (tmp_path / "d.npy").exists()


def test_size_missing_from_the_bundle_is_reported(smooth):
    store, bundles = smooth
    data = store.training_set()
    den = RetrievalPSPC(data, bundles["flat"], patch_size=5, tol=1e-3)
    z = queries(data, 0.05, b=2)
    np.testing.assert_allclose(den(z, 0.05).numpy(), PSPCSquare(data, patch_size=5)(z, 0.05).numpy(), atol=1e-6)
    assert den.history[-1]["fractions"]["exact"] == 1 and "not in the bundle" in den.history[-1]["note"]
