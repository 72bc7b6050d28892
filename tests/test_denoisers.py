"""Exact denoisers against deliberately naive float64 loop implementations (DESIGN.md section 1).

Small seeded data: N = 12 stored images (24 with flips), colour 3x7x6 and grayscale 1x5x5 (odd,
non-square sizes). Every comparison is max abs difference <= 1e-4.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pspc_index.denoisers import CFDM, Empirical, Gaussian, PSPCFlex, PSPCSquare
from pspc_index.errors import UserError
from pspc_index.geometry import MaskCrops, SquareCrops, flex_masks
from pspc_index import posterior
from pspc_index.posterior import (KeyChunk, composite_mean, empirical_mean, mask_composite, patch_posterior,
                                  square_composite)
from pspc_index.store import TrainingSet

# composite_mean (float32 default) computes crop logits -||z_C - x_C||^2 / 2t^2 and their log
# normaliser lse in float32, then weights exp(logit - lse). With |logit| ~ 5e4 (t = 0.002, a query
# ~0.6 away from the data) the float32 ulp of lse is ~4e-3, so when two or more training patches tie
# (common: 24 grayscale values per pixel, flips) the weights of a crop sum to 1 +- ~2e-3, and
# the output is scaled by that: gray 1x5x5, s = 1, t = 0.002, pure random z (seed 1):
# got 0.97032, naive 0.96863 (both tied patches have value 0.96863), |diff| = 1.7e-3 > 1e-4.
# The same call with dtype=torch.float64 agrees to 3e-8.
TS = [0.002, 0.02, 0.3, 3.0, 80.0]
TOL = 1e-4
SHAPES = {"rgb": (3, 7, 6), "gray": (1, 5, 5)}
N = 12
B = 3


# ----------------------------------------------------------------------------------------------
# data and queries
# ----------------------------------------------------------------------------------------------

def make_u8(shape, seed=0, n=N):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, *shape), dtype=np.uint8))


_DATA = {}


def data_for(kind, xflip=True):
    key = (kind, xflip)
    if key not in _DATA:
        _DATA[key] = TrainingSet(make_u8(SHAPES[kind], seed=1 if kind == "rgb" else 2), xflip=xflip)
    return _DATA[key]


def all_images(data):
    """The whole virtual set as float64 numpy [M, C, H, W] (flips built here by hand, not by the view)."""
    x = data.images.numpy().astype(np.float64) / 127.5 - 1
    if data.xflip:
        x = np.concatenate([x, x[..., ::-1]], 0)
    return np.ascontiguousarray(x)


def queries(data, t, mode, seed=0, b=B):
    """float32 z [b, C, H, W]: forward process x + t eps (sources returned too) or pure random."""
    g = torch.Generator().manual_seed(seed + int(1000 * t))
    shape = data.shape
    if mode == "forward":
        src = torch.randint(0, len(data), (b,), generator=g)
        x = data.get(src, torch.float64)
        z = x + t * torch.randn(b, *shape, generator=g, dtype=torch.float64)
        return z.float(), src
    z = torch.randn(b, *shape, generator=g, dtype=torch.float64) * math.sqrt(1 + t * t)
    return z.float(), None


# ----------------------------------------------------------------------------------------------
# naive references (float64, loops)
# ----------------------------------------------------------------------------------------------

def naive_softmax_mean(logits, values):
    m = max(logits)
    w = np.array([math.exp(l - m) for l in logits])
    w /= w.sum()
    return np.tensordot(w, values, axes=1)


def naive_empirical(z, t, X):
    """Per query, per image distance loop; softmax in float64."""
    z = np.asarray(z, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(z),))
    out = np.zeros_like(z)
    for b in range(len(z)):
        logits = []
        for i in range(len(X)):
            d = float(((z[b] - X[i]) ** 2).sum())
            logits.append(-d / (2 * t[b] ** 2))
        out[b] = naive_softmax_mean(logits, X)
    return out


def naive_mask_composite(z, t, X, masks):
    """Eq. 11 for arbitrary boolean masks [K, H, W]: patch posterior means accumulated, divided by count."""
    z = np.asarray(z, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(z),))
    out = np.zeros_like(z)
    for b in range(len(z)):
        acc = np.zeros(z.shape[1:])
        cnt = np.zeros(z.shape[2:])
        for m in masks:
            zp = z[b][:, m]                      # [C, |m|]
            xp = X[:, :, m]                      # [M, C, |m|]
            logits = [-float(((zp - xp[i]) ** 2).sum()) / (2 * t[b] ** 2) for i in range(len(X))]
            mean = naive_softmax_mean(logits, xp)
            acc[:, m] += mean
            cnt[m] += 1
        assert (cnt > 0).all()
        out[b] = acc / cnt
    return out


def naive_square(z, t, X, s):
    """PSPC-Square: every valid s x s position, patch posterior mean, accumulate + count (Eq. 11)."""
    z = np.asarray(z, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(z),))
    _, _, h, w = z.shape
    out = np.zeros_like(z)
    for b in range(len(z)):
        acc = np.zeros(z.shape[1:])
        cnt = np.zeros((h, w))
        for y in range(h - s + 1):
            for x in range(w - s + 1):
                zp = z[b, :, y:y + s, x:x + s]
                xp = X[:, :, y:y + s, x:x + s]
                logits = [-float(((zp - xp[i]) ** 2).sum()) / (2 * t[b] ** 2) for i in range(len(X))]
                acc[:, y:y + s, x:x + s] += naive_softmax_mean(logits, xp)
                cnt[y:y + s, x:x + s] += 1
        out[b] = acc / cnt
    return out


def naive_gaussian(z, t, X):
    z = np.asarray(z, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(z),))
    flat = X.reshape(len(X), -1)
    mu = flat.mean(0)
    cov = np.cov(flat, rowvar=False, bias=True)
    d = len(mu)
    out = np.zeros((len(z), d))
    for b in range(len(z)):
        out[b] = mu + cov @ np.linalg.solve(cov + t[b] ** 2 * np.eye(d), z[b].reshape(-1) - mu)
    return out.reshape(z.shape)


def naive_flex_masks(heat, lam):
    h, w = heat.shape[:2]
    out = np.zeros((h * w, h, w), dtype=bool)
    g = heat.reshape(h * w, h * w).astype(np.float64)
    for p in range(h * w):
        share = g[p] / g[p].sum()
        order = np.argsort(share, kind="stable")
        cum = 0.0
        for q in order:
            cum += share[q]
            if cum >= 1 - lam - 1e-12:
                out[p].flat[q] = True
    return out


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def random_heatmap(h, w, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, h, w, generator=g, dtype=torch.float64) + 1e-3


# ----------------------------------------------------------------------------------------------
# Empirical, Gaussian, CFDM
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("mode", ["forward", "random"])
def test_empirical_matches_naive(kind, mode):
    data = data_for(kind)
    X = all_images(data)
    den = Empirical(data)
    for t in TS:
        z, _ = queries(data, t, mode)
        got = den(z, t)
        assert got.shape == z.shape
        want = naive_empirical(z.double().numpy(), t, X)
        assert maxdiff(got, want) <= TOL, (kind, mode, t, maxdiff(got, want))


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("mode", ["forward", "random"])
def test_gaussian_matches_naive(kind, mode):
    data = data_for(kind)
    X = all_images(data)
    den = Gaussian(data)
    for t in TS:
        z, _ = queries(data, t, mode)
        want = naive_gaussian(z.double().numpy(), t, X)
        assert maxdiff(den(z, t), want) <= TOL, (kind, mode, t)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("mode", ["forward", "random"])
def test_cfdm_is_mean_of_empirical_over_eps(kind, mode):
    data = data_for(kind)
    X = all_images(data)
    den = CFDM(data, sigma_s=0.1, m=4, seed=5)
    eps = den.eps
    assert eps.shape == (4, *data.shape)
    for t in TS:
        z, _ = queries(data, t, mode)
        # the perturbed queries exactly as float32 (z + eps), then the naive posterior in float64
        zz = (z[:, None] + eps[None]).double().numpy()
        want = np.stack([naive_empirical(zz[:, k], t, X) for k in range(len(eps))], 1).mean(1)
        assert maxdiff(den(z, t), want) <= TOL, (kind, mode, t)


# ----------------------------------------------------------------------------------------------
# PSPC-Square
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,mode", [("rgb", "forward"), ("rgb", "random"), ("gray", "forward"),
                                       ("gray", "random")])
def test_square_matches_naive_every_size(kind, mode):
    data = data_for(kind)
    X = all_images(data)
    c, h, w = data.shape
    fails = []
    for s in range(1, min(h, w) + 1):
        den = PSPCSquare(data, patch_size=s)
        for t in TS:
            z, _ = queries(data, t, mode, seed=s)
            got = den(z, t)
            want = naive_square(z.double().numpy(), t, X, s)
            if not maxdiff(got, want) <= TOL:
                fails.append((s, t, maxdiff(got, want)))
    assert not fails, (kind, mode, fails)


@pytest.mark.parametrize("path", ["fused", "tiles"])
def test_both_first_pass_formulations_match_naive(path, monkeypatch):
    """The fused attention kernel and the GEMM tiles serve first passes by queries per location
    (FUSED_MIN_ROWS); forced either way, PSPC-Square agrees with the naive loop."""
    from pspc_index import posterior
    if path == "fused" and not posterior.fused_available("cpu", 10 ** 9):
        pytest.skip("this torch has no fused CPU attention op")
    monkeypatch.setattr(posterior, "FUSED_MIN_ROWS", 1 if path == "fused" else 10 ** 9)
    data = data_for("rgb")
    X = all_images(data)
    fails = []
    for s in (1, 3, 6):
        for t in TS:
            z, _ = queries(data, t, "random", seed=s)
            got = PSPCSquare(data, patch_size=s)(z, t)
            want = naive_square(z.double().numpy(), t, X, s)
            if not maxdiff(got, want) <= TOL:
                fails.append((s, t, maxdiff(got, want)))
    assert not fails, fails


def test_composite_pixel_weights_sum_to_one_small_t():
    data = data_for("gray")
    t = 0.002
    z, _ = queries(data, t, "random", seed=1)
    sums = torch.zeros(B, 5, 5, dtype=torch.float64)

    def grab(ids, a):
        sums.add_(a.sum(1).double())

    composite_mean(z, torch.full((B,), t, dtype=torch.float64), data, SquareCrops(5, 5, 1), on_weights=grab)
    assert (sums - 1).abs().max() <= 1e-5, float((sums - 1).abs().max())


@pytest.mark.parametrize("excluded", [False, True])
def test_weights_pass_restricted_to_chosen_images(excluded):
    """weight_ids: the chosen images' (and their flips') per-pixel weights equal those of the pass over every
    key, normalised over all keys; nothing else is reported."""
    g = torch.Generator().manual_seed(7)
    data = TrainingSet(torch.randint(0, 256, (20, 2, 7, 6), dtype=torch.uint8, generator=g))
    if excluded:
        data = data.without([3, 11])
    z = data.get(torch.arange(3)) + 0.5 * torch.randn(3, 2, 7, 6, generator=g)
    t = torch.full((3,), 0.5, dtype=torch.float64)

    def grab(into):
        return lambda ids, a: into.update({int(i): a[:, j].clone() for j, i in enumerate(ids.tolist())})
    full, part = {}, {}
    square_composite(z, t, data, 3, on_weights=grab(full), dtype=torch.float64)
    square_composite(z, t, data, 3, on_weights=grab(part), dtype=torch.float64, weight_ids=torch.tensor([2, 11, 17]))
    assert sorted(part) == [2, 11, 17, 22, 31, 37]
    assert max((part[i] - full[i]).abs().max().item() for i in part) <= 1e-12
    assert (sum(full.values()) - 1).abs().max() <= 1e-9  # every pixel's weights sum to one per query...
    assert all(part[i].abs().max() == 0 for i in (11, 31)) == excluded  # ...and an excluded image weighs 0


def test_composite_float64_matches_naive_small_t():
    """The same near-tie case computed in float64 is exact too."""
    data = data_for("gray")
    X = all_images(data)
    for t in (0.002, 0.02):
        z, _ = queries(data, t, "random", seed=1)
        got = composite_mean(z, torch.full((B,), t, dtype=torch.float64), data, SquareCrops(5, 5, 1),
                             dtype=torch.float64)
        assert maxdiff(got, naive_square(z.double().numpy(), t, X, 1)) <= TOL


def test_square_size_above_min_side_is_rejected():
    data = data_for("rgb")  # 7 x 6: no 7 x 7 crop fits
    with pytest.raises(UserError):
        PSPCSquare(data, patch_size=7)
    with pytest.raises(UserError):
        PSPCSquare(data, patch_size=0)


def test_square_full_size_equals_empirical():
    data = data_for("gray")  # 5 x 5
    X = all_images(data)
    emp = Empirical(data)
    full = PSPCSquare(data, patch_size=5)
    for t in TS:
        for mode in ("forward", "random"):
            z, _ = queries(data, t, mode)
            a, b = full(z, t), emp(z, t)
            assert maxdiff(a, b) <= TOL
            # the generic composite path with its one 5 x 5 crop gives the same
            comp = composite_mean(z, torch.full((B,), t, dtype=torch.float64), data, SquareCrops(5, 5, 5))
            assert maxdiff(comp, naive_empirical(z.double().numpy(), t, X)) <= TOL, (t, mode)


def test_square_crops_operators():
    crops = SquareCrops(7, 6, 3)
    masks = crops.masks()
    assert len(crops) == 5 * 4 == len(masks)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 7, 6, generator=g, dtype=torch.float64)
    wk = torch.rand(2, len(crops), generator=g, dtype=torch.float64)
    mf = masks.flatten(1).double()
    assert torch.allclose(crops.crop_sums(v), v.flatten(1) @ mf.T)
    assert torch.allclose(crops.uncrop(wk).flatten(1), wk @ mf)
    assert torch.allclose(crops.coverage, mf.sum(0).reshape(7, 6))


def test_square_schedule_picks_nearest_grid_t():
    data = data_for("gray")
    X = all_images(data)
    den = PSPCSquare(data)
    sched = den.schedule
    grid = sched.grid.tolist()
    assert len(grid) == len(sched.patch_sizes)
    # on the grid, just off it, and at points between grid neighbours (nearest by |t - t_i|)
    probe = []
    for i, tg in enumerate(grid):
        probe += [tg, tg * 1.001, tg * 0.999]
        if i + 1 < len(grid):
            nxt = grid[i + 1]
            probe += [tg - 0.3 * (tg - nxt), tg - 0.7 * (tg - nxt)]
    probe += [200.0, 1e-4]
    tt = torch.tensor(probe, dtype=torch.float64)
    want = [sched.patch_sizes[min(range(len(grid)), key=lambda k: abs(grid[k] - p))] for p in probe]
    assert den.sizes(tt).tolist() == want
    # the output with the schedule equals the naive square at the chosen size (mixed t in one batch)
    picks = [grid[0], grid[8], grid[9], grid[-1] * 1.1]
    g = torch.Generator().manual_seed(9)
    z = (data.get(torch.tensor([0, 5, 13, 20]), torch.float64)
         + torch.tensor(picks, dtype=torch.float64)[:, None, None, None]
         * torch.randn(4, *data.shape, generator=g, dtype=torch.float64)).float()
    got = den(z, torch.tensor(picks))
    sizes = den.sizes(torch.tensor(picks, dtype=torch.float64)).tolist()
    for b, (t, s) in enumerate(zip(picks, sizes)):
        want_b = naive_square(z[b:b + 1].double().numpy(), t, X, int(s))
        assert maxdiff(got[b:b + 1], want_b) <= TOL, (t, s)


# ----------------------------------------------------------------------------------------------
# masks / PSPC-Flex
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("lam", [0.3, 0.6])
def test_flex_matches_naive_mask_composite(kind, lam):
    data = data_for(kind)
    X = all_images(data)
    _, h, w = data.shape
    heat = random_heatmap(h, w)
    masks = flex_masks(heat, lam)
    assert masks.shape == (h * w, h, w)
    assert np.array_equal(masks.numpy(), naive_flex_masks(heat.numpy(), lam))
    # each crop holds its own pixel's mass >= lam
    g = heat.reshape(h * w, h * w)
    share = (g * masks.reshape(h * w, -1)).sum(1) / g.sum(1)
    assert (share >= lam - 1e-9).all()
    den = PSPCFlex(data, heat[None], torch.tensor([1.0]), lam=lam)
    for t in TS:
        for mode in ("forward", "random"):
            z, _ = queries(data, t, mode, seed=7)
            got = den(z, t)
            want = naive_mask_composite(z.double().numpy(), t, X, masks.numpy())
            assert maxdiff(got, want) <= TOL, (kind, lam, t, mode, maxdiff(got, want))


def test_arbitrary_masks_composite_matches_naive():
    data = data_for("rgb")
    X = all_images(data)
    _, h, w = data.shape
    g = torch.Generator().manual_seed(11)
    masks = torch.rand(9, h, w, generator=g) < 0.3
    masks[0] |= ~masks.any(0)  # cover every pixel
    crops = MaskCrops(masks)
    for t in TS:
        z, _ = queries(data, t, "random", seed=4)
        got = composite_mean(z, torch.full((B,), t, dtype=torch.float64), data, crops)
        want = naive_mask_composite(z.double().numpy(), t, X, masks.numpy())
        assert maxdiff(got, want) <= TOL, (t, maxdiff(got, want))


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("fused", [False, True])
def test_dense_mask_composite_matches_naive(kind, fused):
    """The dense formulation (every crop a masked whole image, keys shared by all groups; CUDA's default)
    against the naive float64 composite, on the tiles' shared-key GEMMs and on the fused CPU kernel."""
    data = data_for(kind)
    X = all_images(data)
    _, h, w = data.shape
    masks = flex_masks(random_heatmap(h, w), 0.5)
    for t in TS:
        z, _ = queries(data, t, "random", seed=5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(posterior, "_USE_FUSED", fused)
            mp.setattr(posterior, "FUSED_MIN_ROWS", 1)  # these tiny images have fewer crops than it
            got = mask_composite(z, t, data, masks, dense=True, chunk=7)
        want = naive_mask_composite(z.double().numpy(), t, X, masks.numpy())
        assert maxdiff(got, want) <= TOL, (kind, t, maxdiff(got, want))


@pytest.mark.parametrize("kind", list(SHAPES))
def test_flex_lambda_one_equals_empirical(kind):
    data = data_for(kind)
    _, h, w = data.shape
    heat = random_heatmap(h, w)
    assert flex_masks(heat, 1.0).all()
    den = PSPCFlex(data, heat[None], torch.tensor([1.0]), lam=1.0)
    emp = Empirical(data)
    crops = MaskCrops(flex_masks(heat, 1.0))
    for t in TS:
        z, _ = queries(data, t, "random")
        assert maxdiff(den(z, t), emp(z, t)) <= TOL
        # also through the generic composite with the all-pixel masks
        comp = composite_mean(z, torch.full((B,), t, dtype=torch.float64), data, crops)
        assert maxdiff(comp, emp(z, t)) <= TOL, t


def test_flex_schedule_and_heatmap_lookup():
    """lambda(t) from the schedule and the heatmap at the nearest heatmap t, per sample."""
    data = data_for("gray")
    X = all_images(data)
    _, h, w = data.shape
    heats = torch.stack([random_heatmap(h, w, seed=s) for s in (20, 21)])
    hts = torch.tensor([0.01, 1.0])
    den = PSPCFlex(data, heats, hts)
    sched = den.schedule
    grid = sched.grid
    ts = [float(grid[0]), float(grid[7]), float(grid[10]), float(grid[-1]), 0.5, 5.0]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(len(ts), *data.shape, generator=g)
    got = den(z, torch.tensor(ts))
    for b, t in enumerate(ts):
        lam = float(sched.lam(t)[0])
        j = int((hts - t).abs().argmin())
        if lam >= 1:
            want = naive_empirical(z[b:b + 1].double().numpy(), t, X)
        else:
            want = naive_mask_composite(z[b:b + 1].double().numpy(), t, X, flex_masks(heats[j], lam).numpy())
        assert maxdiff(got[b:b + 1], want) <= TOL, (t, lam, j)


def test_uncovered_pixel_raises():
    masks = torch.ones(3, 4, 5, dtype=torch.bool)
    masks[:, 2, 3] = False
    with pytest.raises(UserError):
        MaskCrops(masks)
    with pytest.raises(UserError):
        MaskCrops(torch.ones(4, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# per-sample t, limits, data set
# ----------------------------------------------------------------------------------------------

def _all_denoisers(data):
    _, h, w = data.shape
    heat = random_heatmap(h, w)
    return {
        "empirical": Empirical(data),
        "gaussian": Gaussian(data),
        "cfdm": CFDM(data, m=3, seed=1),
        "square2": PSPCSquare(data, patch_size=2),
        "square-sched": PSPCSquare(data),
        "flex0.3": PSPCFlex(data, heat[None], torch.tensor([1.0]), lam=0.3),
        "flex-sched": PSPCFlex(data, heat[None], torch.tensor([1.0])),
    }


@pytest.mark.parametrize("kind", list(SHAPES))
def test_mixed_t_batch_equals_one_at_a_time(kind):
    data = data_for(kind)
    ts = torch.tensor([80.0, 0.002, 3.0, 0.02, 0.3, 3.0, 0.5])
    g = torch.Generator().manual_seed(8)
    src = torch.randint(0, len(data), (len(ts),), generator=g)
    z = (data.get(src) + ts[:, None, None, None] * torch.randn(len(ts), *data.shape, generator=g)).float()
    for name, den in _all_denoisers(data).items():
        batch = den(z, ts)
        single = torch.cat([den(z[i:i + 1], float(ts[i])) for i in range(len(ts))])
        single_vec = torch.cat([den(z[i:i + 1], ts[i:i + 1]) for i in range(len(ts))])
        assert maxdiff(batch, single) <= TOL, name
        assert maxdiff(batch, single_vec) <= TOL, name


@pytest.mark.parametrize("kind", list(SHAPES))
def test_small_t_returns_source_image(kind):
    data = data_for(kind)
    t = 0.002
    dens = {"empirical": Empirical(data), "square-full": PSPCSquare(data, patch_size=min(data.shape[1:]))}
    if kind == "rgb":
        dens.update({f"square{s}": PSPCSquare(data, patch_size=s) for s in (2, 3, 4)})
    for seed in range(3):
        z, src = queries(data, t, "forward", seed=seed, b=4)
        x = data.get(src, torch.float64)
        for name, den in dens.items():
            assert maxdiff(den(z, t), x) <= 1e-3, (name, seed)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_huge_t_tends_to_data_mean(kind):
    data = data_for(kind)
    mean = all_images(data).mean(0)
    t = 1e4
    z, _ = queries(data, 1.0, "random", b=4)
    for name, den in _all_denoisers(data).items():
        out = den(z, t)
        assert maxdiff(out, np.broadcast_to(mean, out.shape)) <= 1e-3, name
    # without flips the limit is the mean of the N stored images only
    plain = data_for(kind, xflip=False)
    mean_n = all_images(plain).mean(0)
    assert maxdiff(Empirical(plain)(z, t), np.broadcast_to(mean_n, z.shape)) <= 1e-3


def test_xflip_false_changes_the_set():
    flip, plain = data_for("rgb"), data_for("rgb", xflip=False)
    assert len(flip) == 2 * N and len(plain) == N
    Xp = all_images(plain)
    assert Xp.shape[0] == N
    # the flipped half of the view is the mirror of the stored half
    assert torch.equal(flip.get(torch.arange(N, 2 * N)), flip.get(torch.arange(N)).flip(-1))
    z, _ = queries(plain, 0.3, "random")
    a, b = Empirical(plain)(z, 0.3), Empirical(flip)(z, 0.3)
    assert maxdiff(a, naive_empirical(z.double().numpy(), 0.3, Xp)) <= TOL
    assert maxdiff(a, b) > 1e-2
    s = PSPCSquare(plain, patch_size=3)(z, 0.3)
    assert maxdiff(s, naive_square(z.double().numpy(), 0.3, Xp, 3)) <= TOL
    assert maxdiff(s, PSPCSquare(flip, patch_size=3)(z, 0.3)) > 1e-2
    g = Gaussian(plain)(z, 0.3)
    assert maxdiff(g, naive_gaussian(z.double().numpy(), 0.3, Xp)) <= TOL
    # a query at a flipped image's location is recovered only when flips are on
    zf = flip.get(torch.tensor([N + 1, N + 4])) + 0.002 * torch.randn(2, *flip.shape,
                                                                        generator=torch.Generator().manual_seed(1))
    assert maxdiff(Empirical(flip)(zf, 0.002), flip.get(torch.tensor([N + 1, N + 4]))) <= 1e-3
    assert maxdiff(Empirical(plain)(zf, 0.002), flip.get(torch.tensor([N + 1, N + 4]))) > 1e-2


# ----------------------------------------------------------------------------------------------
# the kernel: streamed chunks in any order, weights, statistics
# ----------------------------------------------------------------------------------------------

def test_kernel_shuffled_chunks_weights_and_stats():
    g = torch.Generator().manual_seed(0)
    G, b, n, d = 3, 4, 37, 5
    u = torch.randint(0, 256, (G, n, d), generator=g, dtype=torch.uint8)
    x = u.double() / 127.5 - 1
    z = torch.rand(G, b, d, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.002, 0.05, 0.5, 20.0], dtype=torch.float64)
    sq = (x * x).sum(2)
    log_w = torch.randn(G, n, generator=g, dtype=torch.float64)
    log_w[1, 3] = -math.inf  # an excluded key
    row_w = torch.randn(G, b, n, generator=g, dtype=torch.float64)
    row_w[0, 2] = -math.inf  # a row with every key excluded
    row_w[2, 1, :36] = -math.inf  # a row with one key
    perm = torch.randperm(n, generator=g)
    cuts = [0, 3, 4, 17, 30, n]
    const = (z * z).sum(2) / (2 * t ** 2)
    d2 = ((z[:, :, None] - x[:, None]) ** 2).sum(3)
    # per-key weights (the GEMM's column) at the certified precision; per-row ones (added after it) in float64
    for dtype, lw in ((None, log_w), (torch.float64, log_w[:, None] + row_w)):
        def chunks(lw=lw):
            for a, c in zip(cuts[:-1], cuts[1:]):
                yield a, KeyChunk(u[:, perm[a:c]], sq[:, perm[a:c]], lw[..., perm[a:c]])
        # naive float64: l = -||z - x||^2 / 2t^2 + log w; the kernel's lse leaves out -||z||^2 / 2t^2
        lr = -d2 / (2 * t[:, None] ** 2) + (lw if lw.ndim == 3 else lw[:, None])
        want_lse = torch.logsumexp(lr, 2) + const
        want_lmin = lr.masked_fill(lr == -math.inf, math.inf).amin(2) + const
        want_lse2 = torch.logsumexp(2 * (lr + const[..., None]), 2)
        mean, lse, lmin, lse2 = patch_posterior(z, t, chunks, dtype, stats=True)
        ok = torch.isfinite(want_lse)
        assert ok.all() == (lw.ndim == 2)
        assert torch.isneginf(lse[~ok]).all() and torch.isposinf(lmin[~ok]).all()
        assert (mean[ok] - (torch.softmax(lr, 2) @ x)[ok]).abs().max() <= 1e-5
        for got, want in ((lse, want_lse), (lmin, want_lmin), (lse2, want_lse2)):  # nats: the certified LOGIT_TOL
            assert ((got[ok] - want[ok]).abs() - 1e-12 * want[ok].abs()).max() <= 4e-6
        # the second pass reports each chunk's normalised weights
        w = torch.zeros(G, b, n, dtype=torch.float64)

        def hook(start, wts):
            w[:, :, perm[start:start + wts.shape[2]]] = wts
        patch_posterior(z, t, chunks, dtype, lse=lse, on_weights=hook)
        assert (w[ok] - torch.softmax(lr, 2)[ok]).abs().max() <= 1e-5
    # masked queries: rows are crops of one window (zero outside), keys whole windows, sq per row
    crops = torch.zeros(b, d, dtype=torch.bool)
    for r in range(b):
        crops[r, r:r + 2] = True
    zm = z * crops
    sq_rows = ((x * x)[:, None] * crops[None, :, None]).sum(3)  # [G, b, n]
    mean, lse = patch_posterior(zm, t, lambda: iter([(0, KeyChunk(u, sq_rows))]), torch.float64)
    lc = -(((zm[:, :, None] - x[:, None]) ** 2) * crops[None, :, None]).sum(3) / (2 * t[:, None] ** 2)
    want = torch.softmax(lc, 2) @ x
    assert (mean - want)[crops.expand(G, -1, -1)].abs().max() <= 1e-9
    assert (lse - torch.logsumexp(lc, 2) - (zm * zm).sum(2) / (2 * t ** 2)).abs().max() <= 1e-6


def test_empirical_mean_chunked_equals_unchunked():
    data = data_for("rgb")
    z, _ = queries(data, 0.3, "random")
    t = torch.full((B,), 0.3, dtype=torch.float64)
    a = empirical_mean(z, t, data)
    b = empirical_mean(z, t, data, chunk=5)
    assert maxdiff(a, b) <= 1e-6
    c = composite_mean(z, t, data, SquareCrops(7, 6, 3))
    d = composite_mean(z, t, data, SquareCrops(7, 6, 3), chunk=7)
    assert maxdiff(c, d) <= 1e-5


# ----------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["empirical", "gaussian", "cfdm", "square2", "square-sched", "flex0.3"])
def test_bad_inputs_raise_user_error(name):
    data = data_for("gray")
    den = _all_denoisers(data)[name]
    z = torch.zeros(2, *data.shape)
    for bad_t in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([0.3, 0.0]), torch.tensor([0.3, 0.3, 0.3])):
        with pytest.raises(UserError):
            den(z, bad_t)
    zn = z.clone()
    zn[1, 0, 2, 2] = float("nan")
    with pytest.raises(UserError):
        den(zn, 0.3)
    zi = z.clone()
    zi[0, 0, 0, 0] = float("inf")
    with pytest.raises(UserError):
        den(zi, 0.3)
    for bad_shape in ((2, 1, 5, 4), (2, 3, 5, 5), (1, 5, 5), (2, 1, 6, 5)):
        with pytest.raises(UserError):
            den(torch.zeros(bad_shape), 0.3)


# ----------------------------------------------------------------------------------------------
# exclusion: a view with log weight -inf equals a store without those images
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("t", [0.002, 0.3, 80.0])
def test_excluded_images_equal_a_smaller_store(kind, t):
    full = data_for(kind)
    gone = [1, 4, 11]
    keep = [i for i in range(N) if i not in gone]
    view, small = full.without(gone), TrainingSet(full.images[keep], xflip=True)
    assert view.images is full.images and view.n_included == 2 * len(keep)
    z, _ = queries(small, t, "random")
    h, w = SHAPES[kind][1:]
    heat = torch.rand(1, h, w, h, w, generator=torch.Generator().manual_seed(3))
    for make in (Empirical, Gaussian, lambda d: PSPCSquare(d, patch_size=3), lambda d: CFDM(d, m=2),
                 lambda d: PSPCFlex(d, heat, torch.tensor([t]), lam=0.5)):
        assert (make(view)(z, t) - make(small)(z, t)).abs().max() <= TOL


@pytest.mark.parametrize("path", ["fused", "tiles"])
@pytest.mark.parametrize("t", [0.002, 0.3, 80.0])
def test_per_query_exclusions_equal_one_view_per_query(path, t, monkeypatch):
    """Query b over PSPCSquare(data, query_exclusions=E) equals query b over data.without(E[b]), for
    both first-pass formulations, every schedule size, with flips, on top of a view's own exclusions;
    the weights pass (attribution) sees the same per-query sets."""
    from pspc_index import posterior
    from pspc_index.attribution import attribution_maps
    if path == "fused" and not posterior.fused_available("cpu", 10 ** 9):
        pytest.skip("this torch has no fused CPU attention op")
    monkeypatch.setattr(posterior, "FUSED_MIN_ROWS", 1 if path == "fused" else 10 ** 9)
    data = data_for("rgb").without([7])
    ex = torch.zeros(4, N, dtype=torch.bool)
    ex[0, [1, 4]] = True
    ex[2, :6] = True
    ex[3, [0, 2, 3, 5, 6, 8, 9, 10, 11]] = True  # 1 and 4 left (and 7 excluded by the view)
    z, _ = queries(data, t, "random", seed=3, b=4)
    for s in (2, 3, 6):
        got = PSPCSquare(data, patch_size=s, query_exclusions=ex)(z, t)
        shares, _ = attribution_maps(PSPCSquare(data, patch_size=s, query_exclusions=ex), z, t)
        for b in range(4):
            view = data.without(ex[b].nonzero().flatten())
            want = PSPCSquare(view, patch_size=s)(z[b:b + 1], t)
            assert maxdiff(got[b:b + 1], want) <= 1e-5, (s, b)
            want_sh, _ = attribution_maps(PSPCSquare(view, patch_size=s), z[b:b + 1], t)
            assert torch.allclose(shares[b], want_sh[0], atol=1e-9), (s, b)
    with pytest.raises(ValueError):
        PSPCSquare(data, patch_size=3, query_exclusions=ex)(z[:2], t)


def test_excluding_everything_is_refused():
    data = data_for("gray")
    with pytest.raises(UserError, match="every training image"):
        data.without(range(N))
    with pytest.raises(UserError, match="outside"):
        data.without([N])


@pytest.mark.parametrize("t", [0.002, 0.3, 5.0])
def test_posterior_mean_under_a_mask_matches_naive(t):
    from pspc_index.posterior import posterior_mean

    data = data_for("rgb")
    z, _ = queries(data, t, "random")
    mask = torch.zeros(7, 6, dtype=torch.bool)
    mask[1:4, 2:6] = True
    mask[6, 0] = True
    mean, log_z = posterior_mean(z, t, data, mask)
    x = torch.from_numpy(all_images(data))[:, :, mask]  # [M, C, m] float64
    zm = z.to(torch.float64)[:, :, mask]
    d = ((zm[:, None] - x[None]) ** 2).sum((2, 3))  # [B, M]
    want_lz = torch.logsumexp(-d / (2 * t ** 2), 1)
    want = torch.einsum("bi,icm->bcm", torch.softmax(-d / (2 * t ** 2), 1), x)
    assert (mean[:, :, mask].double() - want).abs().max() <= TOL
    assert (mean[:, :, ~mask] == 0).all()
    assert ((log_z - want_lz).abs() / want_lz.abs().clamp_min(1)).max() <= 1e-6
    whole, _ = posterior_mean(z, t, data)
    assert (whole - empirical_mean(z, t, data)).abs().max() <= TOL


def test_class_conditional_view_streams_only_its_images():
    """With most images excluded the first pass gathers only the others: same result as the smaller store."""
    full = data_for("rgb")
    keep = [2, 7, 9]
    view, small = full.without([i for i in range(N) if i not in keep]), TrainingSet(full.images[keep])
    z, _ = queries(small, 0.3, "random")
    for s in (2, 6):
        got = PSPCSquare(view, patch_size=s)(z, 0.3)
        assert (got - PSPCSquare(small, patch_size=s)(z, 0.3)).abs().max() <= TOL
    grab = []
    PSPCSquare(view, patch_size=3).patch_mean(z, torch.full((B,), 0.3, dtype=torch.float64), 3,
                                            lambda rows, ids, a, win: grab.append((ids, a)))
    total = torch.zeros(B, len(full))
    for ids, a in grab:
        total.scatter_add_(1, ids, a.sum((2, 3)).float())
    assert torch.allclose(total.sum(1), torch.full((B,), 7.0 * 6.0), atol=1e-3)
    gone = [i for i in range(len(full)) if i % N not in keep]
    assert total[:, gone].abs().max() == 0


def test_streamed_patches_equal_cached_ones():
    """Patches not in the cache (beyond its budget, or for a call of few queries) are unfolded per key chunk
    (StreamedPatches): the same outputs and attribution weights as from the cached array, with exclusions
    and the skip of excluded keys."""
    from pspc_index.attribution import attribution_maps
    from pspc_index.posterior import DEFAULT_CACHE_BUDGET, StreamedPatches, set_patch_cache_budget, square_patches
    g = torch.Generator().manual_seed(11)
    data = TrainingSet(torch.randint(0, 256, (40, 2, 7, 6), dtype=torch.uint8, generator=g)).without(range(0, 40, 3))
    z = data.get(torch.arange(4)) + 0.4 * torch.randn(4, 2, 7, 6, generator=g)
    runs = []
    for budget in (DEFAULT_CACHE_BUDGET, 0):
        set_patch_cache_budget(budget)
        try:
            cached = square_patches(data, 3, 3)[0]  # builds (and, within the budget, caches) the array
            assert isinstance(cached, torch.Tensor)
            assert isinstance(square_patches(data, 3, 3, stream=True, build=False)[0],
                              torch.Tensor if budget else StreamedPatches)
            den = PSPCSquare(data, patch_size=3, dtype=torch.float64)
            runs.append((den(z, 0.4), *attribution_maps(den, z, 0.4, top=3)))
        finally:
            set_patch_cache_budget(DEFAULT_CACHE_BUDGET)
    (out_a, sh_a, tm_a), (out_b, sh_b, tm_b) = runs
    assert (out_a - out_b).abs().max() <= 1e-6 and (sh_a - sh_b).abs().max() <= 1e-12
    assert torch.equal(tm_a.ids, tm_b.ids) and (tm_a.maps - tm_b.maps).abs().max() <= 1e-12
