"""ELS (Kamb & Ganguli 2025) against a naive float64 loop over pixels, pooled locations and images."""
import math

import pytest
import torch

from pspc_index.denoisers import ELS
from pspc_index.els import els_mean
from pspc_index.posterior import empirical_mean
from pspc_index.schedule import FASHION_MNIST, Schedule
from pspc_index.store import TrainingSet

TS = [0.002, 0.03, 0.3, 2.0, 80.0]


def naive_els(z, t, data, k, boundary):
    """Per pixel: the k x k window (clipped, or wrapped for circular), every pooled training window of the
    same shape (broken: same clipping; circular: every interior window), softmax over -||.||^2 / 2t^2 in
    float64, the centre pixel of the mean. Also returns each pixel's nearest pooled centre."""
    b, c, h, w = z.shape
    r = k // 2
    x = data.get(torch.arange(len(data)), torch.float64)
    out, near = torch.zeros(b, c, h, w, dtype=torch.float64), torch.zeros(b, c, h, w, dtype=torch.float64)
    for bi in range(b):
        for y in range(h):
            for xx in range(w):
                if boundary == "circular":
                    rows, cols = [(y + i) % h for i in range(-r, r + 1)], [(xx + j) % w for j in range(-r, r + 1)]
                    zq = z[bi][:, rows][:, :, cols].double()
                    locs = [(qy, qx) for qy in range(r, h - r) for qx in range(r, w - r)]
                    offs = (range(-r, r + 1), range(-r, r + 1))
                else:
                    clip = lambda p, n: (max(0, r - p), max(0, p + r - (n - 1)))  # noqa: E731
                    (ylo, yhi), (xlo, xhi) = clip(y, h), clip(xx, w)
                    offs = (range(-r + ylo, r - yhi + 1), range(-r + xlo, r - xhi + 1))
                    zq = z[bi][:, [y + i for i in offs[0]]][:, :, [xx + j for j in offs[1]]].double()
                    locs = [(qy, qx) for qy in range(h) for qx in range(w) if clip(qy, h) == (ylo, yhi)
                            and clip(qx, w) == (xlo, xhi)]
                logits, cen = [], []
                for qy, qx in locs:
                    win = x[:, :, [qy + i for i in offs[0]]][:, :, :, [qx + j for j in offs[1]]]
                    logits.append(-((win - zq) ** 2).flatten(1).sum(1) / (2 * float(t[bi]) ** 2))
                    cen.append(x[:, :, qy, qx])
                lg, cn = torch.cat(logits), torch.cat(cen)
                out[bi, :, y, xx] = (torch.softmax(lg, 0)[:, None] * cn).sum(0)
                near[bi, :, y, xx] = cn[lg.argmax()]
    return out, near


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 2, 6, 5), generator=g, dtype=torch.uint8)  # non-square, 2 channels
    data = TrainingSet(imgs, xflip=True)
    z = data.get(torch.tensor([0, 4])) + 0.4 * torch.randn(2, 2, 6, 5, generator=g)
    return data, z


@pytest.mark.parametrize("boundary,ks", [("broken", [1, 3, 5, 7, 9, 11]), ("circular", [1, 3, 5])])
def test_els_matches_naive_loop(tiny, boundary, ks):
    data, z = tiny
    for k in ks:
        for tv in TS:
            t = torch.tensor([tv, 1.5 * tv], dtype=torch.float64)
            ref, _ = naive_els(z, t, data, k, boundary)
            exact = els_mean(z, t, data, k, boundary, dtype=torch.float64)
            assert (exact.double() - ref).abs().max() < 1e-6, (k, tv)
            cert = els_mean(z, t, data, k, boundary)  # certified logits: <= 4e-6 per pixel (posterior.py)
            assert (cert.double() - ref).abs().max() < 1e-5, (k, tv)


def test_els_small_t_is_nearest_pooled_centre(tiny):
    data, z = tiny
    t = torch.full((2,), 1e-4, dtype=torch.float64)
    for boundary, k in (("broken", 3), ("broken", 5), ("circular", 3)):
        _, near = naive_els(z, t, data, k, boundary)
        assert (els_mean(z, t, data, k, boundary, dtype=torch.float64).double() - near).abs().max() < 1e-6


def test_els_whole_image_window_is_optimal(tiny):
    """k >= 2 max(H, W) - 1 (broken): every window is the whole image at one location, i.e. D*."""
    data, z = tiny
    for tv in TS:
        t = torch.full((2,), tv, dtype=torch.float64)
        opt = empirical_mean(z, t, data).double()
        assert (els_mean(z, t, data, 11, dtype=torch.float64).double() - opt).abs().max() < 1e-6
        assert (ELS(data, k=13)(z, t).double() - opt).abs().max() < 1e-6


def test_circular_els_is_shift_equivariant(tiny):
    data, z = tiny
    t = torch.full((2,), 0.5, dtype=torch.float64)
    shifted = els_mean(z.roll((2, 1), (2, 3)), t, data, 3, "circular")
    assert (shifted - els_mean(z, t, data, 3, "circular").roll((2, 1), (2, 3))).abs().max() < 1e-5


def test_els_denoiser_subset_schedule_and_exclusion(tiny):
    data, z = tiny
    t = torch.tensor([0.3, 5.0], dtype=torch.float64)
    # max_images: a seeded subset of stored images (flips follow), the same as ELS over that subset
    d = ELS(data, k=3, max_images=2, seed=1)
    assert d.keep.tolist() == sorted(d.keep.tolist()) and len(d.keep) == 2
    assert (d(z, t) - els_mean(z, t, data.subset(d.keep), 3)).abs().max() < 1e-6
    # excluded images take no part: the same as the set without them
    assert (ELS(data.without([1]), k=3)(z, t) - els_mean(z, t, data.subset([0, 2]), 3)).abs().max() < 1e-6
    # the schedule's k(t) at the nearest grid t
    grid = FASHION_MNIST.grid
    assert ELS(TrainingSet(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))).sizes(grid).equal(FASHION_MNIST.els_size(grid))
    derived = [55 if s == 28 else s for s in FASHION_MNIST.patch_sizes]  # full size: the whole-image window
    assert Schedule("x", (28, 28), FASHION_MNIST.patch_sizes, FASHION_MNIST.lambdas).els_size(grid).tolist() == derived
    with pytest.raises(ValueError):
        els_mean(z, t, data, 4)
    assert math.isfinite(float(ELS(data, k=5, boundary="circular")(z, t).sum()))


def test_cli_denoise_els(tmp_path, tiny):
    import numpy as np
    from click.testing import CliRunner

    from pspc_index.cli import cli
    from pspc_index.store import ImageStore, write_store

    data, z = tiny
    z = z[:, :1]
    write_store(tmp_path / "s.zarr", data.images[:, :1].numpy())  # stores hold 1 or 3 channels
    np.save(tmp_path / "z.npy", z.numpy())
    args = ["denoise", "--store", tmp_path / "s.zarr", "--z", tmp_path / "z.npy", "--t", "0.5", "--denoiser", "els",
            "--patch-size", "3", "--els-images", "2", "--out", tmp_path / "d.npy"]
    res = CliRunner().invoke(cli, list(map(str, args)))
    assert res.exit_code == 0, res.output
    want = ELS(ImageStore.open(tmp_path / "s.zarr").training_set(), k=3, max_images=2)(z, 0.5)
    assert np.abs(np.load(tmp_path / "d.npy") - want.numpy()).max() < 1e-6
    res = CliRunner().invoke(cli, list(map(str, args[:-4] + ["--patch-size", "4", "--out", tmp_path / "e.npy"])))
    assert res.exit_code == 2 and "odd window" in res.output
