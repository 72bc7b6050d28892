"""Every denoiser and the attribution paths on CUDA against the CPU float64 path (skipped without a GPU;
run by tools/gpu_check.sh). PSPC_TEST_DEVICE=cpu runs the same checks on the CPU, which tests their own logic
on a machine without a GPU."""
import os

import pytest
import torch

from pspc_index.attribution import attribute_trajectory, attribution_maps, verify_attribution
from pspc_index.denoisers import CFDM, ELS, Empirical, Gaussian, Network, PSPCFlex, PSPCSquare
from pspc_index.geometry import SquareCrops
from pspc_index.network import EDMPrecond, UNetConfig
from pspc_index.posterior import empirical_mean, mask_composite
from pspc_index.sampler import initial_noise, pf_ode_sample, sample
from pspc_index.store import TrainingSet

DEV = os.environ.get("PSPC_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def data(shape=(3, 9, 8), n=40):
    g = torch.Generator().manual_seed(0)
    return TrainingSet(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g))


@pytest.mark.parametrize("t", [0.002, 0.05, 0.6, 5.0, 80.0])
@pytest.mark.parametrize("s", [1, 3, 5, 8])
def test_square_cuda_equals_cpu_float64(t, s):
    cpu = data()
    z = cpu.get(torch.arange(4)) + t * torch.randn(4, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    want = PSPCSquare(cpu, patch_size=s, dtype=torch.float64)(z, t)
    got = PSPCSquare(cpu.to(DEV), patch_size=s)(z.to(DEV), t).cpu()
    assert (got - want).abs().max() <= 1e-4


def test_masks_and_empirical_cuda():
    cpu, t = data(), 0.3
    z = cpu.get(torch.arange(3)) + t * torch.randn(3, 3, 9, 8, generator=torch.Generator().manual_seed(2))
    masks = SquareCrops(9, 8, 4).masks()
    assert (mask_composite(z.to(DEV), t, cpu.to(DEV), masks).cpu()
            - mask_composite(z, t, cpu, masks, dtype=torch.float64)).abs().max() <= 1e-4
    assert (empirical_mean(z.to(DEV), t, cpu.to(DEV)).cpu() - empirical_mean(z, t, cpu)).abs().max() <= 1e-4


def test_sampling_cuda_equals_cpu():
    cpu = data((1, 8, 8))
    a = sample(PSPCSquare(cpu), 4, 0, steps=6)
    b = sample(PSPCSquare(cpu.to(DEV)), 4, 0, steps=6).cpu()
    assert (a - b).abs().max() <= 1e-3


def noisy(cpu, t, b=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return cpu.get(torch.randint(0, len(cpu), (b,), generator=g)) + t * torch.randn(b, *cpu.shape, generator=g)


def close(got, want, tol=1e-4):
    assert got.device.type == torch.device(DEV).type
    assert (got.cpu().double() - want.double()).abs().max() <= tol


def test_per_query_exclusions_on_device():
    cpu, t = data(n=30), 0.4
    z = noisy(cpu, t)
    ex = torch.zeros(4, 30, dtype=torch.bool)
    ex[0, :10], ex[1, 5:25], ex[3, ::2] = True, True, True
    got = PSPCSquare(cpu.to(DEV), patch_size=3, query_exclusions=ex)(z, t)
    want = torch.cat([PSPCSquare(cpu.without(ex[q].nonzero().flatten()), patch_size=3, dtype=torch.float64)(
        z[q:q + 1], t) for q in range(4)])
    close(got, want)


@pytest.mark.parametrize("top", [None, 2])
def test_attribution_shares_and_maps_on_device(top):
    cpu, t = data(n=30), 0.3
    z = noisy(cpu, t, b=3)
    shares, tm = attribution_maps(PSPCSquare(cpu.to(DEV), patch_size=3), z, t, top=top)
    want, wtm = attribution_maps(PSPCSquare(cpu, patch_size=3, dtype=torch.float64), z, t, top=top)
    assert (shares - want).abs().max() <= 1e-6 and (shares.sum(1) - 1).abs().max() <= 1e-6
    if top is not None:
        assert torch.equal(tm.ids, wtm.ids) and (tm.maps - wtm.maps).abs().max() <= 1e-6


def test_baseline_denoisers_on_device():
    cpu, t = data(n=30), 0.5
    z = noisy(cpu, t)
    close(Gaussian(cpu.to(DEV))(z, t), Gaussian(cpu)(z, t))
    close(CFDM(cpu.to(DEV), m=4)(z, t), CFDM(cpu, m=4)(z, t))
    close(Empirical(cpu.to(DEV))(z, t), Empirical(cpu)(z, t))


@pytest.mark.parametrize("boundary,k", [("broken", 3), ("broken", 5), ("circular", 3)])
def test_els_on_device(boundary, k):
    cpu, t = data(n=12), 0.4
    z = noisy(cpu, t)
    close(ELS(cpu.to(DEV), k=k, boundary=boundary)(z, t), ELS(cpu, k=k, boundary=boundary, dtype=torch.float64)(z, t))


def test_flex_on_device():
    cpu = data(n=20)
    h, w = cpu.shape[1:]
    maps = torch.rand(2, h, w, h, w, generator=torch.Generator().manual_seed(4))
    ts = torch.tensor([2.0, 0.2], dtype=torch.float64)
    z = noisy(cpu, 0.25)
    for lam in (0.3, 0.7):
        close(PSPCFlex(cpu.to(DEV), maps, ts, lam=lam)(z, 0.25), PSPCFlex(cpu, maps, ts, lam=lam)(z, 0.25))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("t", [0.01, 0.3, 4.0])
def test_mask_composite_formulations_on_device(dense, t):
    """Both formulations of the mask composite (gathered crops; masked whole images with shared keys) on
    the device against the CPU float64 gathered path, flips included, chunks shorter than the set."""
    cpu = TrainingSet(data(n=30).images, xflip=True)
    masks = torch.rand(72, 9, 8, generator=torch.Generator().manual_seed(5)) < 0.4
    masks[0] = True
    z = noisy(cpu, t)
    want = mask_composite(z, t, cpu, masks, dtype=torch.float64, dense=False)
    close(mask_composite(z.to(DEV), t, cpu.to(DEV), masks, dense=dense, chunk=16), want)


def test_network_on_device():
    torch.manual_seed(0)
    net = EDMPrecond(UNetConfig(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2),
                                num_blocks=1))
    z = torch.randn(3, 1, 8, 8)
    want = Network(net, (1, 8, 8))(z, 0.7)
    close(Network(net.to(DEV), (1, 8, 8))(z, 0.7), want)


def test_trajectory_attribution_and_verify_on_device():
    cpu = data((1, 8, 8), n=24)
    z0 = initial_noise(5, range(3), cpu.shape)
    res = {}
    for name, d in (("dev", cpu.to(DEV)), ("cpu", cpu)):
        x, traj = pf_ode_sample(PSPCSquare(d), z0.to(d.device), 6, record=True)
        _, shares, _ = attribute_trajectory(PSPCSquare(d), traj.ts, traj.z, top=2)
        reports, cf = verify_attribution(PSPCSquare, d, shares, 2, z0, steps=6, original=x.cpu(), draws=2)
        res[name] = shares, reports, cf
    (sd, rd, cd), (sc, rc, cc) = res["dev"], res["cpu"]
    assert (sd - sc).abs().max() <= 1e-4 and (cd - cc).abs().max() <= 1e-3
    assert [r["removed"] for r in rd] == [r["removed"] for r in rc]


@pytest.mark.parametrize("kind", ["flat", "ivf-pq"])
def test_retrieval_on_device(tmp_path, kind):
    """The retrieval path with its torch maths on the device (FAISS searches on the CPU without faiss-gpu):
    certified bound, routing and the output against the CPU float64 exact path."""
    pytest.importorskip("faiss")
    from pspc_index.index import build_bundle, open_bundle
    from pspc_index.retrieval import RetrievalPSPC
    from pspc_index.store import write_store

    rs = torch.Generator().manual_seed(6)
    base = torch.randint(0, 256, (40, 1, 4, 4), generator=rs).repeat_interleave(2, 2).repeat_interleave(2, 3)
    store = write_store(tmp_path / "s.zarr", (base + torch.randint(-6, 7, base.shape, generator=rs)).clamp(0, 255)
                        .to(torch.uint8).numpy())
    build_bundle(store.path, tmp_path / "b", [3], stride=2, kind=kind, nlist=4, pq_m=9, progress=False)
    cpu = store.training_set()
    bundle = open_bundle(tmp_path / "b", store)
    for t in (0.01, 0.3):
        z = noisy(cpu, t)
        want = PSPCSquare(cpu, patch_size=3, dtype=torch.float64)(z, t)
        den = RetrievalPSPC(cpu.to(DEV), bundle, k=8, patch_size=3, tol=1e-3)
        close(den(z.to(DEV), t), want, tol=1e-3 + 1e-5)
        rep = den.last_report[3]
        assert rep["certified"] and rep["bound_max"] <= 1e-3
