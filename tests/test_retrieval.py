"""Retrieval (DESIGN.md section 2): index bundles and RetrievalPSPC against the exact composite."""
import json
import math

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.denoisers import PSPCSquare
from pspc_index.errors import UserError
from pspc_index.geometry import SquareCrops
from pspc_index.index import build_bundle, open_bundle
from pspc_index.posterior import composite_mean
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.store import ImageStore, write_store


def images(seed=0, n=20):
    return np.random.RandomState(seed).randint(0, 256, (n, 1, 8, 8)).astype(np.uint8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ret")
    store = write_store(root / "s.zarr", images())
    build_bundle(root / "s.zarr", root / "flat", [3], stride=2, kind="flat", progress=False)
    build_bundle(root / "s.zarr", root / "sq8", [3, 5], stride=4, kind="sq8", progress=False)
    return root, store


def queries(data, t, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (b,), generator=g)
    return data.get(idx) + t * torch.randn(b, *data.shape, generator=g)


def test_all_candidates_equal_exact(built):
    root, store = built
    data = store.training_set()
    den = RetrievalPSPC(data, open_bundle(root / "flat", store), k=len(data), tail="none", patch_size=3)
    z = queries(data, 0.3)
    exact = composite_mean(z, 0.3, data, SquareCrops(8, 8, 3))
    assert (den(z, 0.3) - exact).abs().max() < 1e-5
    rep = den.last_report[3]
    assert rep["path"] == "retrieval" and rep["eps_bar"].max() == 0


def test_sq8_all_candidates_with_exact_tail(built):
    # sq8 codes only choose candidates; with m >= N the tail is every other image: exact again
    root, store = built
    data = store.training_set()
    den = RetrievalPSPC(data, open_bundle(root / "sq8", store), k=5, tail="sample", m=len(data), patch_size=5)
    z = queries(data, 0.5)
    exact = composite_mean(z, 0.5, data, SquareCrops(8, 8, 5))
    assert (den(z, 0.5) - exact).abs().max() < 1e-5


def test_tail_unbiased_and_shrinks(tmp_path):
    # 4x4 images, s = 3: four positions in one block (kept small: 2 x 100 seeded runs)
    store = write_store(tmp_path / "s.zarr", np.random.RandomState(7).randint(0, 256, (20, 1, 4, 4)).astype(np.uint8))
    build_bundle(tmp_path / "s.zarr", tmp_path / "b", [3], stride=2, kind="flat", progress=False)
    data = store.training_set()
    n, s, t, py, px = len(data), 3, 0.6, 1, 0
    z = queries(data, t, b=2)
    bundle = open_bundle(tmp_path / "b", store)
    zp = z[:, :, py:py + s, px:px + s].flatten(1).double()
    allx = data.get(torch.arange(n), torch.float64)[:, :, py:py + s, px:px + s].flatten(1)
    exact = torch.logsumexp(-((allx[None] - zp[:, None]) ** 2).sum(2) / (2 * t ** 2), 1)
    errs = {}
    for m in (4, 32):
        ests, ses = [], []
        for seed in range(100):
            den = RetrievalPSPC(data, bundle, k=4, tail="sample", m=m, seed=seed, patch_size=s)
            den(z, t)
            ests.append(den.last_report[s]["log_z"][:, py, px])
            ses.append(den.last_report[s]["rel_se"][:, py, px])
        ratio = torch.exp(torch.stack(ests) - exact)  # Z_hat / Z  [seeds, B]
        mean, sem = ratio.mean(0), ratio.std(0) / math.sqrt(len(ratio))
        assert ((mean - 1).abs() < 4 * sem + 1e-9).all(), (m, mean, sem)
        errs[m] = ratio.std(0)
        # the reported relative standard error (rms over seeds) tracks the spread across seeds once m is
        # not tiny (at m = 4 the sample variance of heavy-tailed terms underestimates, as expected)
        q = torch.stack(ses).pow(2).mean(0).sqrt() / errs[m]
        assert m < 32 or ((q > 0.5) & (q < 2)).all(), q
    assert (errs[32] < errs[4]).all()


def test_tol_forces_exact(built):
    root, store = built
    data = store.training_set()
    bundle = open_bundle(root / "sq8", store)
    z = queries(data, 0.8)
    exact = composite_mean(z, 0.8, data, SquareCrops(8, 8, 3))
    loose = RetrievalPSPC(data, bundle, k=2, tail="none", patch_size=3)
    assert (loose(z, 0.8) - exact).abs().max() > 1e-3
    strict = RetrievalPSPC(data, bundle, k=2, tail="none", patch_size=3, tol=1e-6)
    assert (strict(z, 0.8) - exact).abs().max() < 1e-6
    rep = strict.last_report[3]
    assert rep["fractions"]["retrieval"] == 0 and rep["bound_max"] <= 1e-6
    # s not in the bundle: the exact composite
    other = RetrievalPSPC(data, bundle, k=2, tail="none", patch_size=7)
    assert (other(z, 0.8) - composite_mean(z, 0.8, data, SquareCrops(8, 8, 7))).abs().max() < 1e-6


def test_resume_byte_identical(tmp_path):
    write_store(tmp_path / "s.zarr", images(2))
    a, b = tmp_path / "a", tmp_path / "b"
    man = build_bundle(tmp_path / "s.zarr", a, [3, 5], stride=4, kind="sq8", progress=False)
    build_bundle(tmp_path / "s.zarr", b, [3, 5], stride=4, kind="sq8", progress=False)
    victim = sorted(man["files"])[1]
    (b / victim).unlink()
    (b / "manifest.json").rename(b / ".progress.json")  # as if killed before the manifest: only the journal
    man_b = build_bundle(tmp_path / "s.zarr", b, [3, 5], stride=4, kind="sq8", progress=False)
    assert man_b == man
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    for name in man["files"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_bad_bundles(tmp_path):
    write_store(tmp_path / "s.zarr", images(3))
    build_bundle(tmp_path / "s.zarr", tmp_path / "b", [3], stride=4, kind="flat", progress=False)
    other = write_store(tmp_path / "o.zarr", images(4))
    with pytest.raises(UserError, match="built for another store") as e:  # not "edited in place": another store
        open_bundle(tmp_path / "b", other)
    assert "rewritten" not in str(e.value) and "o.zarr" in str(e.value)
    # the store the bundle was built for, as ingested: the xflip mismatch names N too
    bundle = open_bundle(tmp_path / "b", ImageStore.open(tmp_path / "s.zarr"))
    with pytest.raises(UserError, match=r"the training set is \[20, 1, 8, 8\] with xflip=False"):
        RetrievalPSPC(ImageStore.open(tmp_path / "s.zarr").training_set(xflip=False), bundle)
    name = sorted(json.loads((tmp_path / "b" / "manifest.json").read_text())["files"])[0]
    raw = (tmp_path / "b" / name).read_bytes()
    (tmp_path / "b" / name).write_bytes(raw[:len(raw) // 2])
    with pytest.raises(UserError, match="truncated"):
        open_bundle(tmp_path / "b", ImageStore.open(tmp_path / "s.zarr"))


def test_cli_build_and_denoise(tmp_path):
    write_store(tmp_path / "s.zarr", images(5))
    r = CliRunner().invoke(cli, ["build", str(tmp_path / "s.zarr"), str(tmp_path / "b"), "--patch-sizes", "3,5",
                                 "--index", "flat", "--stride", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["patch_sizes"] == [3, 5]
    args = ["denoise", "--store", str(tmp_path / "s.zarr"), "--t", "0.3", "--n", "2", "--patch-size", "3",
            "--out", str(tmp_path / "d.npy"), "--index", str(tmp_path / "b"), "--k", "40", "--tail", "none"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "d.npy").shape == (2, 1, 8, 8)
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_ivf_all_cells_equals_flat(tmp_path):
    # an IVF index searched in every cell returns the flat index's candidates: equal outputs
    write_store(tmp_path / "s.zarr", np.random.RandomState(9).randint(0, 256, (120, 1, 8, 8)).astype(np.uint8))
    build_bundle(tmp_path / "s.zarr", tmp_path / "flat", [3], stride=3, kind="flat", progress=False)
    build_bundle(tmp_path / "s.zarr", tmp_path / "ivf", [3], stride=3, kind="ivf-flat", nlist=6, progress=False)
    store = ImageStore.open(tmp_path / "s.zarr")
    data = store.training_set()
    z = queries(data, 0.4, b=4)
    flat = RetrievalPSPC(data, open_bundle(tmp_path / "flat", store), k=16, tail="none", patch_size=3)
    ivf = RetrievalPSPC(data, open_bundle(tmp_path / "ivf", store), k=16, tail="none", patch_size=3, nprobe=6)
    assert torch.equal(flat(z, 0.4), ivf(z, 0.4))
    # one cell holds fewer than k = 64 patches: the probe widens until all k candidates come back
    bundle = open_bundle(tmp_path / "ivf", store)
    assert (bundle.search(3, 0, 0, z[:, :, :5, :5].flatten(1), 64, nprobe=1) >= 0).all()
    few = RetrievalPSPC(data, bundle, k=64, tail="none", patch_size=3, nprobe=1)
    out = few(z, 0.4)
    assert out.abs().max() <= 1 + 1e-6 and few.last_report[3]["nprobe"] == 1


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq"])
def test_compressed_ivf_with_exact_tail_is_exact(tmp_path, kind):
    # whatever the codes propose, rescoring plus a tail of every image is the exact composite
    write_store(tmp_path / "s.zarr", np.random.RandomState(4).randint(0, 256, (90, 1, 8, 8)).astype(np.uint8))
    man = build_bundle(tmp_path / "s.zarr", tmp_path / "b", [3], stride=4, kind=kind, nlist=4, pq_m=8,
                       progress=False)
    assert man["nlist"] == 4 and man["nprobe"] == 1
    store = ImageStore.open(tmp_path / "s.zarr")
    data = store.training_set()
    z = queries(data, 0.5, b=3)
    den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=8, tail="sample", m=len(data), patch_size=3)
    assert (den(z, 0.5) - composite_mean(z, 0.5, data, SquareCrops(8, 8, 3))).abs().max() < 1e-5


def test_gpu_build_without_faiss_gpu_is_one_line(tmp_path):
    import faiss
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss-gpu with a GPU present")
    write_store(tmp_path / "s.zarr", images(6))
    r = CliRunner().invoke(cli, ["build", str(tmp_path / "s.zarr"), str(tmp_path / "b"), "--patch-sizes", "3",
                                 "--index", "ivf-flat", "--gpu"])
    assert r.exit_code == 2 and "faiss-gpu" in r.output and len(r.output.strip().splitlines()) == 1


# Duplicate-heavy stores (issue 13, item 7): k-means cells collapse on identical patches. Images are
# left-right symmetric in content placement, so flipped copies duplicate their originals too.
def identical_store(n=120, h=16, seed=0):
    """Every image the same (mirror-symmetric) random image."""
    half = np.random.RandomState(seed).randint(0, 256, (1, 1, h, h // 2))
    return np.repeat(np.concatenate([half, half[..., ::-1]], -1), n, 0).astype(np.uint8)


def black_background_store(n=120, h=16, seed=0):
    """Black except a random 2x2 centre (the issue's case; Fashion-MNIST's background in small)."""
    x = np.zeros((n, 1, h, h), np.uint8)
    x[:, :, h // 2 - 1:h // 2 + 1, h // 2 - 1:h // 2 + 1] = np.random.RandomState(seed).randint(0, 256, (n, 1, 2, 2))
    return x


def two_valued_store(n=120, h=16, seed=0):
    """Constant images, half black and half white, in a seeded order."""
    return np.repeat(np.random.RandomState(seed).permutation(n) % 2 * 255, h * h).reshape(n, 1, h, h).astype(np.uint8)


DUP_STORES = {"identical": identical_store, "black-background": black_background_store, "two-valued": two_valued_store}
KINDS = ("flat", "sq8", "ivf-flat", "ivf-sq8", "ivf-pq")


@pytest.fixture(scope="module")
def dup_bundles(tmp_path_factory):
    """{store name: (store, {kind: bundle path})}, s = 3, default stride 4 and default nlist (6 lists)."""
    root = tmp_path_factory.mktemp("dup")
    out = {}
    for name, make in DUP_STORES.items():
        store = write_store(root / f"{name}.zarr", make())
        paths = {kind: root / f"{name}-{kind}" for kind in KINDS}
        for kind, path in paths.items():
            build_bundle(store.path, path, [3], kind=kind, pq_m=8, progress=False)
        out[name] = (store, paths)
    return out


def f32_mean_tol(terms):
    """Rounding bound of a float32 mean of `terms` equal values in [-1, 1] under weights summing to one:
    recursive summation errs by at most about terms * 2^-24 (the weights' own rounding included)."""
    return terms * 2.0 ** -24


def determined_pixels(data, s):
    """[H, W] bool: pixels all of whose covering s x s crops hold one patch across the training set
    (the posterior mean there is that patch, whatever the weights)."""
    x = data.get(torch.arange(len(data)))
    same = (x == x[:1]).all(0).all(0)  # [H, W]: the pixel is equal in every training image
    crop_same = same.unfold(0, s, 1).unfold(1, s, 1).all(-1).all(-1).float()  # [gh, gw]
    # a pixel is determined iff every crop covering it is: full convolution of the "crop varies" map
    varies = torch.nn.functional.conv2d(1 - crop_same[None, None], torch.ones(1, 1, s, s), padding=s - 1)
    return varies[0, 0] == 0


def test_few_entry_blocks_are_flat(dup_bundles):
    # duplicates collapse to entries; a block with fewer entries than an IVF kind trains on is flat
    for name, (store, paths) in dup_bundles.items():
        for kind in ("ivf-flat", "ivf-sq8", "ivf-pq"):
            man = json.loads((paths[kind] / "manifest.json").read_text())
            need = max(man["nlist"], 16 if kind == "ivf-pq" else 1)
            for rec in man["files"].values():
                assert (rec["kind"] == "flat") == (rec["entries"]["count"] < need), (name, kind, rec)
            kinds = {rec["kind"] for rec in man["files"].values()}
            # black corners are one entry (flat); the varied centre keeps its cells
            assert kinds == ({"flat", kind} if name == "black-background" else {"flat"}), (name, kind, kinds)
            assert man["files"]["s3_b0_0.faiss"]["entries"]["count"] == (1 if name != "two-valued" else 2)


@pytest.mark.parametrize("tail", ["none", "sample"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", DUP_STORES)
def test_duplicate_stores_match_exact(dup_bundles, name, kind, tail):
    store, paths = dup_bundles[name]
    data, s, t = store.training_set(), 3, 0.3
    bundle = open_bundle(paths[kind], store)
    z = queries(data, t, b=4, seed=3)
    exact = PSPCSquare(data, patch_size=s)(z, t)
    known = determined_pixels(data, s)
    assert known.all() if name == "identical" else known.any() == (name == "black-background")
    # k >= N (the default k = 1024 here): every image is a candidate, a reordering of the exact sum;
    # float32 rounding of a few hundred terms in [-1, 1] stays below 1e-5
    every = RetrievalPSPC(data, bundle, k=1024, tail=tail, patch_size=s)
    assert (every(z, t) - exact).abs().max() < 1e-5
    assert every.last_report[s]["eps_bar"].max() == 0  # every entry scored: nothing unscored
    # few candidates (and a small tail): where every covering crop holds one patch, any convex
    # combination of the candidates is that patch; each side sums at most N terms, then s^2 crops
    few = RetrievalPSPC(data, bundle, k=4, tail=tail, m=8, patch_size=s)
    out = few(z, t)
    assert ((out - exact).abs() * known).max() <= 2 * f32_mean_tol(len(data) + s * s)
    assert out.abs().max() <= 1 + 1e-6
    if tail == "sample":  # a tail of every image makes any candidate set exact again
        full_tail = RetrievalPSPC(data, bundle, k=4, tail="sample", m=len(data), patch_size=s)
        assert (full_tail(z, t) - exact).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-pq"])
def test_short_probes_widen(tmp_path, kind):
    # three lists of about 40 entries each: one probed list cannot hold k = 64, so the probe widens
    store = write_store(tmp_path / "s.zarr", np.random.RandomState(8).randint(0, 256, (60, 1, 8, 8)).astype(np.uint8))
    man = build_bundle(store.path, tmp_path / "b", [3], stride=8, kind=kind, nlist=3, pq_m=8, progress=False)
    assert man["nprobe"] == 1 and {rec["nlist"] for rec in man["files"].values()} == {3}
    data = store.training_set()
    bundle = open_bundle(tmp_path / "b", store)
    zw = queries(data, 0.3, b=32, seed=5)[:, :, :8, :8].flatten(1)
    raw = bundle.index(3, 0, 0).search(zw.numpy(), 64)[1]  # FAISS alone, one list probed
    assert (raw < 0).any(1).all(), "a list held 64 entries: the test would not test widening"
    ids = bundle.search(3, 0, 0, zw, 64)
    assert ids.shape == (32, 64) and (ids >= 0).all()
    # k > E: every entry once (random images: one entry per virtual image)
    ids = bundle.search(3, 0, 0, zw, 1000)
    assert ids.shape == (32, len(data)) and (ids.sort(1).values == torch.arange(len(data))).all()


def test_cli_default_build_and_sample_on_black_background(tmp_path):
    # the reproduction: default ivf-pq build, default sample; and ivf-flat denoise with either tail
    write_store(tmp_path / "s.zarr", black_background_store(n=300, h=16))
    run = lambda *a: CliRunner().invoke(cli, [str(v) for v in a])  # noqa: E731
    r = run("build", tmp_path / "s.zarr", tmp_path / "b")
    assert r.exit_code == 0, r.output
    r = run("sample", "--store", tmp_path / "s.zarr", "--index", tmp_path / "b", "--n", 4, "--out", tmp_path / "x.npy")
    assert r.exit_code == 0, r.output
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (4, 1, 16, 16) and np.isfinite(x).all()
    r = run("build", tmp_path / "s.zarr", tmp_path / "f", "--patch-sizes", 3, "--index", "ivf-flat")
    assert r.exit_code == 0, r.output
    for tail in ("none", "sample"):
        r = run("denoise", "--store", tmp_path / "s.zarr", "--index", tmp_path / "f", "--t", 0.3, "--patch-size", 3,
                "--n", 4, "--out", tmp_path / f"d-{tail}.npy", "--tail", tail)
        assert r.exit_code == 0, r.output
        d = np.load(tmp_path / f"d-{tail}.npy")
        # the black corner, where every patch is black: k = N = 600 candidates, then 9 crops
        assert np.abs(d[..., :5, :5] + 1).max() <= f32_mean_tol(600 + 9)


def test_mostly_duplicate_blocks_keep_their_cells(tmp_path):
    # 90% black corners, 10% varied: the black copies are one entry, so k-means sees distinct windows
    # and every list fills
    x = np.zeros((200, 1, 8, 8), np.uint8)
    rng = np.random.RandomState(11)
    x[:20, :, :2, :2] = rng.randint(0, 256, (20, 1, 2, 2))
    store = write_store(tmp_path / "s.zarr", x[rng.permutation(200)])
    man = build_bundle(store.path, tmp_path / "b", [3], kind="ivf-flat", nlist=4, progress=False)
    assert man["files"]["s3_b0_0.faiss"]["nlist"] == man["nlist"] == 4
    assert man["files"]["s3_b0_0.faiss"]["entries"]["count"] == 21  # 20 varied corners and one black window
    b11 = man["files"]["s3_b1_1.faiss"]  # rows 4-7: black in every image, one entry of all 400
    assert b11["kind"] == "flat" and b11["entries"]["count"] == 1
    assert open_bundle(tmp_path / "b", store).entries(3, 1, 1).counts.tolist() == [400]
    index = open_bundle(tmp_path / "b", store).index(3, 0, 0)  # held: the IVF view below borrows it
    ivf = faiss.extract_index_ivf(index)
    assert all(ivf.invlists.list_size(i) > 0 for i in range(ivf.nlist))


# Exclusion (TrainingSet.without): excluded images and their flips never take part
@pytest.mark.parametrize("kind", ["flat", "sq8"])
def test_exclusion_all_candidates_equal_exact_on_the_view(built, kind):
    root, store = built
    full = store.training_set()
    data = full.without([2, 7, 11])
    n_inc = len(full) - 6
    z = queries(full, 0.4, b=3)
    exact = PSPCSquare(data, patch_size=3)(z, 0.4)
    bundle = open_bundle(root / kind, store)
    every = RetrievalPSPC(data, bundle, k=len(full), tail="none", patch_size=3)
    assert (every(z, 0.4) - exact).abs().max() < 1e-5
    rep = every.last_report[3]
    assert rep["eps_bar"].max() == 0 and rep["bound_max"] == 0
    # a few candidates and a tail of every included image: exact again
    tail = RetrievalPSPC(data, bundle, k=4, tail="sample", m=n_inc, patch_size=3)
    assert (tail(z, 0.4) - exact).abs().max() < 1e-5
    assert tail.last_report[3]["rel_se"].max() == 0
    # the view differs from the full set: the test sees the exclusion
    assert (PSPCSquare(full, patch_size=3)(z, 0.4) - exact).abs().max() > 1e-3


@pytest.mark.parametrize("tail", ["none", "sample"])
def test_excluded_images_never_contribute(built, tail):
    from pspc_index.attribution import attribution_maps
    root, store = built
    full = store.training_set()
    gone = [3, 5]
    data = full.without(gone)
    virtual = gone + [i + full.n_stored for i in gone]
    # queries at the excluded images and their flips, at small t: each would be its own top candidate
    z = full.get(torch.tensor(virtual)) + 0.05 * torch.randn(4, *full.shape, generator=torch.Generator().manual_seed(2))
    den = RetrievalPSPC(data, open_bundle(root / "sq8", store), k=3, tail=tail, m=6, patch_size=3)
    zw = z[:, :, :6, :6].flatten(1)  # block (0, 0): a 6 x 6 window
    # the raw search finds them (random images: entry e is virtual image e); the candidates leave them out
    assert torch.isin(den.bundle.search(3, 0, 0, zw, 3), torch.tensor(virtual)).any(1).all()
    blk = den.block(3, 0, 0)
    ids, _ = den.search(zw, 3, 0, 0, blk)
    reps, _ = den.expand(ids, blk)
    assert (ids >= 0).all() and not torch.isin(reps, torch.tensor(virtual)).any()
    drawn = den.tail_ids(3, 0, 0, 500)
    assert not torch.isin(drawn, torch.tensor(virtual)).any()
    shares, tm = attribution_maps(den, z, 0.05, top=len(full))
    assert (shares[:, virtual] == 0).all()
    np.testing.assert_allclose(shares.sum(1).numpy(), 1, atol=1e-6)
    # the weights reproduce the output, which is a combination of included images only
    x = data.get(tm.ids)[:, :, 0].to(torch.float64)
    np.testing.assert_allclose((tm.maps * x).sum(1).numpy(), den(z, 0.05)[:, 0].numpy(), atol=1e-5)
