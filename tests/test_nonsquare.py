"""Non-square stores (issue 13, item 6): crop sizes come from the short side, full-size steps are the whole
image, and every verb runs on portrait (16 x 8) and landscape (8 x 16) stores."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.denoisers import Empirical, PSPCSquare
from pspc_index.errors import UserError
from pspc_index.schedule import CIFAR10, FASHION_MNIST, default_schedule, get_schedule
from pspc_index.store import ImageStore, TrainingSet

SHAPES = {"portrait": (16, 8), "landscape": (8, 16)}


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module", params=list(SHAPES))
def store(request, tmp_path_factory):
    """20 seeded 1-channel images of the orientation, ingested from .npy through the CLI."""
    root = tmp_path_factory.mktemp(request.param)
    images = np.random.default_rng(6).integers(0, 256, (20, 1, *SHAPES[request.param]), dtype=np.uint8)
    np.save(root / "imgs.npy", images)
    run("ingest", root / "imgs.npy", root / "s.zarr")
    return root, root / "s.zarr"


def full_size_ts(sched) -> list[float]:
    return [t for t, s in zip(sched.grid.tolist(), sched.patch_sizes) if s == sched.full]


@pytest.mark.parametrize("h, w", [(16, 8), (8, 16), (178, 218), (218, 178), (7, 6), (5, 5), (3, 40)])
def test_default_schedule_fits_the_short_side(h, w):
    sched = default_schedule(h, w)
    assert sched.shape == (h, w) and sched.full == max(h, w)
    # the same steps as CIFAR-10's are full size; every other size is a crop that fits the short side
    assert [s == sched.full for s in sched.patch_sizes] == [s == 32 for s in CIFAR10.patch_sizes]
    assert all(1 <= s <= min(h, w) for s in sched.patch_sizes if s != sched.full)
    assert sched.sizes_below_full() == sorted({s for s in sched.patch_sizes if s != sched.full})
    # a non-square schedule's crops are those of the square schedule of its short side
    side = default_schedule(min(h, w), min(h, w))
    assert [min(s, min(h, w)) for s in sched.patch_sizes] == list(side.patch_sizes)


def test_square_schedules_unchanged():
    assert default_schedule(32, 32) is CIFAR10 and default_schedule(28, 28).shape == FASHION_MNIST.shape
    # the scaled square schedule as it was before non-square support (side 7)
    assert default_schedule(7, 7).patch_sizes == (7,) * 7 + (5, 3, 3, 1, 1, 1) + (1,) * 5
    assert get_schedule(None, 28, 28) is default_schedule(28, 28)
    with pytest.raises(UserError, match="28x28 images, the store holds 28x32"):
        get_schedule("fashion-mnist", 28, 32)


@pytest.mark.parametrize("shape", list(SHAPES.values()))
def test_full_size_steps_are_exactly_empirical(shape):
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (20, 3, *shape), dtype=np.uint8))
    data = TrainingSet(images)
    den, emp = PSPCSquare(data), Empirical(data)
    g = torch.Generator().manual_seed(2)
    for t in full_size_ts(den.schedule):
        z = data.get(torch.tensor([0, 7, 33])) + t * torch.randn(3, *data.shape, generator=g)
        assert torch.equal(den(z, t), emp(z, t)), t
    # below full size the schedule's step is the fixed-size composite of its size
    sched = den.schedule
    for t, s in zip(sched.grid.tolist(), sched.patch_sizes):
        if s < sched.full:
            z = data.get(torch.tensor([3])) + t * torch.randn(1, *data.shape, generator=g)
            assert torch.equal(den(z, t), PSPCSquare(data, patch_size=s)(z, t)), (t, s)


def test_info_and_denoise(store):
    root, path = store
    _, _, h, w = ImageStore.open(path).shape
    rep = json.loads(run("info", path, "--json").stdout)
    assert (rep["height"], rep["width"]) == (h, w) and rep["default_schedule"] == f"scaled-{h}x{w}"
    sched = default_schedule(h, w)
    z = np.random.default_rng(3).normal(size=(3, 1, h, w)).astype(np.float32) * 5
    np.save(root / "z.npy", z)
    data = ImageStore.open(path).training_set()
    for i, t in enumerate((5.0, full_size_ts(sched)[-1], 0.3)):
        run("denoise", "--store", path, "--z", root / "z.npy", "--t", t, "--out", root / f"d{i}.npy")
        want = PSPCSquare(data)(torch.from_numpy(z), t).numpy()
        np.testing.assert_array_equal(np.load(root / f"d{i}.npy"), want)
    # at a full-size step the CLI's pspc-square is the empirical denoiser, bit for bit
    t = full_size_ts(sched)[0]
    den = ["denoise", "--store", path, "--z", root / "z.npy"]
    run(*den, "--t", t, "--out", root / "sq.npy")
    run(*den, "--t", t, "--out", root / "emp.npy", "--denoiser", "empirical")
    np.testing.assert_array_equal(np.load(root / "sq.npy"), np.load(root / "emp.npy"))
    run("denoise", "--store", path, "--n", 2, "--t", 5, "--out", root / "fwd.npy")  # z drawn from the store
    assert np.load(root / "fwd.npy").shape == (2, 1, h, w)
    for name in ("gaussian", "cfdm"):
        run(*den, "--t", 5, "--out", root / f"{name}.npy", "--denoiser", name)
        assert np.isfinite(np.load(root / f"{name}.npy")).all()


def test_build_defaults_and_retrieval(store):
    root, path = store
    _, _, h, w = ImageStore.open(path).shape
    rep = json.loads(run("build", path, root / "b", "--index", "flat", "--stride", 2, "--json").stdout)
    assert rep["patch_sizes"] == default_schedule(h, w).sizes_below_full() != []
    z = np.random.default_rng(4).normal(size=(2, 1, h, w)).astype(np.float32)
    np.save(root / "zr.npy", z)
    data = ImageStore.open(path).training_set()
    for i, t in enumerate((5.0, 0.3, 40.0)):
        # k = all 40 virtual images and no tail: retrieval is the exact composite
        run("denoise", "--store", path, "--z", root / "zr.npy", "--t", t, "--index", root / "b", "--k", 40,
            "--tail", "none", "--out", root / f"r{i}.npy")
        want = PSPCSquare(data)(torch.from_numpy(z), t).numpy()
        np.testing.assert_allclose(np.load(root / f"r{i}.npy"), want, atol=1e-5)
    # the short side itself is a valid crop of a non-square image, and indexable
    rep = json.loads(run("build", path, root / "b8", "--index", "flat", "--patch-sizes", min(h, w), "--json").stdout)
    assert rep["patch_sizes"] == [min(h, w)]


def test_sample_and_attribute(store):
    root, path = store
    _, _, h, w = ImageStore.open(path).shape
    for out in ("x.npy", "y.zarr"):
        run("sample", "--store", path, "--n", 2, "--seed", 1, "--out", root / out, "--record")
    x = np.load(root / "x.npy")
    assert x.shape == (2, 1, h, w) and np.isfinite(x).all() and (root / "x.png").exists()
    import zarr
    np.testing.assert_array_equal(zarr.open_group(str(root / "y.zarr"))["samples"][...], x)
    run("build", path, root / "ba", "--index", "flat", "--json")
    run("sample", "--store", path, "--n", 2, "--out", root / "xi.npy", "--index", root / "ba", "--k", 8)
    assert np.isfinite(np.load(root / "xi.npy")).all()
    np.save(root / "q.npy", np.random.default_rng(5).normal(size=(2, 1, h, w)).astype(np.float32))
    for extra in ([], ["--index", root / "ba"]):
        for query in (["--z", root / "q.npy", "--t", 5], ["--trajectory", root / "x.trajectory.npz"]):
            rep = json.loads(run("attribute", "--store", path, *query, "--top", 3, "--json", *extra).stdout)
            assert len(rep["queries"]) == 2 and all(len(q) == 3 for q in rep["queries"])
