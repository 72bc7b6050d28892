"""The exact kernel on CUDA against the CPU float64 path (skipped without a GPU; run by tools/gpu_check.sh)."""
import pytest
import torch

from pspc_index.denoisers import PSPCSquare
from pspc_index.posterior import empirical_mean, mask_composite
from pspc_index.geometry import SquareCrops
from pspc_index.sampler import sample
from pspc_index.store import TrainingSet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def data(shape=(3, 9, 8), n=40):
    g = torch.Generator().manual_seed(0)
    return TrainingSet(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g))


@pytest.mark.parametrize("t", [0.002, 0.05, 0.6, 5.0, 80.0])
@pytest.mark.parametrize("s", [1, 3, 5, 8])
def test_square_cuda_equals_cpu_float64(t, s):
    cpu = data()
    z = cpu.get(torch.arange(4)) + t * torch.randn(4, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    want = PSPCSquare(cpu, patch_size=s, dtype=torch.float64)(z, t)
    got = PSPCSquare(cpu.to("cuda"), patch_size=s)(z.cuda(), t).cpu()
    assert (got - want).abs().max() <= 1e-4


def test_masks_and_empirical_cuda():
    cpu, t = data(), 0.3
    z = cpu.get(torch.arange(3)) + t * torch.randn(3, 3, 9, 8, generator=torch.Generator().manual_seed(2))
    masks = SquareCrops(9, 8, 4).masks()
    assert (mask_composite(z.cuda(), t, cpu.to("cuda"), masks).cpu()
            - mask_composite(z, t, cpu, masks, dtype=torch.float64)).abs().max() <= 1e-4
    assert (empirical_mean(z.cuda(), t, cpu.to("cuda")).cpu() - empirical_mean(z, t, cpu)).abs().max() <= 1e-4


def test_sampling_cuda_equals_cpu():
    cpu = data((1, 8, 8))
    a = sample(PSPCSquare(cpu), 4, 0, steps=6)
    b = sample(PSPCSquare(cpu.to("cuda")), 4, 0, steps=6).cpu()
    assert (a - b).abs().max() <= 1e-3
