"""The EDM U-Net's preconditioning and checkpoint IO; gradient heatmaps against naive Jacobians."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pspc_index.errors import UserError
from pspc_index.network import EDMPrecond, UNetConfig, load_network, save_network
from pspc_index.sensitivity import (concentration_side, gradient_heatmaps, plot_concentration,
                                    read_heatmaps, write_heatmaps)
from pspc_index.store import TrainingSet

TINY = dict(img_resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1)


def random_net(seed: int = 0, **overrides) -> EDMPrecond:
    """A tiny U-Net with every parameter random (the zero-initialised layers would hide bugs)."""
    torch.manual_seed(seed)
    net = EDMPrecond(UNetConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


def random_training_set(n: int, c: int, h: int, seed: int = 0) -> TrainingSet:
    gen = torch.Generator().manual_seed(seed)
    return TrainingSet(torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=gen))


def test_save_load_round_trip(tmp_path):
    net = random_net(img_channels=3, img_resolution=12)
    save_network(tmp_path / "net", net, {"steps": 7})
    back = load_network(tmp_path / "net.safetensors")
    z, sigma = torch.randn(4, 3, 12, 12), torch.tensor([0.01, 0.3, 2.0, 50.0])
    with torch.no_grad():
        assert torch.equal(net(z, sigma), back(z, sigma))
    assert json.loads((tmp_path / "net.json").read_text())["meta"] == {"steps": 7}


def test_load_rejects_bad_checkpoints(tmp_path):
    save_network(tmp_path / "net", random_net())
    weights = tmp_path / "net.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="safetensors"):
        load_network(tmp_path / "net")
    weights.write_bytes(data)
    doc = json.loads((tmp_path / "net.json").read_text())
    doc["config"]["model_channels"] = 12
    (tmp_path / "net.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="do not match"):
        load_network(tmp_path / "net")
    with pytest.raises(UserError, match="not found"):
        load_network(tmp_path / "missing")


def test_preconditioning_is_identity_at_tiny_sigma():
    net = random_net()
    z = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(z, 1e-6), z, atol=1e-4)
        assert not torch.allclose(net(z, 1.0), z, atol=1e-2)


def test_heatmaps_match_naive_jacobian():
    net = random_net(img_channels=3, img_resolution=4).double()
    data = random_training_set(5, 3, 4)
    ts, m = [0.5, 2.0], 3
    got = gradient_heatmaps(net, data, ts, m=m, batch=2, generator=torch.Generator().manual_seed(1), progress=False)

    # The same draws as gradient_heatmaps: per t, m virtual indices then m noises.
    gen = torch.Generator().manual_seed(1)
    want = torch.zeros(len(ts), 4, 4, 4, 4, dtype=torch.float64)
    for l, t in enumerate(ts):
        idx = torch.randint(len(data), (m,), generator=gen)
        eps = torch.randn(m, 3, 4, 4, generator=gen, dtype=torch.float64)
        for z in data.get(idx, torch.float64) + t * eps:
            jac = torch.autograd.functional.jacobian(lambda v: net(v[None], torch.tensor([t]))[0], z)
            want[l] += sum(jac[c, :, :, c].abs() for c in range(3)) / m  # [y, x, i, j], same channel only
    assert got.shape == (2, 4, 4, 4, 4) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


class FixedConv(torch.nn.Module):
    """A linear denoiser D(z, t) = k * z (3x3 cross-correlation, zero padding)."""

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        self.register_buffer("kernel", kernel.reshape(1, 1, 3, 3))

    def forward(self, z, t):
        return F.conv2d(z, self.kernel.to(z.dtype), padding=1)


def test_heatmaps_of_a_linear_map_are_its_kernel():
    kernel = torch.tensor([[0.5, -1.0, 0.0], [2.0, -3.0, 0.25], [0.0, 0.0, -0.125]])
    got = gradient_heatmaps(FixedConv(kernel), random_training_set(4, 1, 6), [0.1, 3.0], m=2, batch=2,
                            generator=torch.Generator().manual_seed(0), progress=False)
    want = torch.zeros(6, 6, 6, 6)
    for y in range(6):
        for x in range(6):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < 6 and 0 <= x + dx < 6:
                        want[y, x, y + dy, x + dx] = kernel[dy + 1, dx + 1].abs()
    assert torch.allclose(got, want.expand(2, -1, -1, -1, -1), atol=1e-6)


def test_concentration_side_delta_block_and_uniform(tmp_path):
    h = 9
    eye = torch.eye(h * h).reshape(1, h, h, h, h)
    assert torch.equal(concentration_side(eye, (0.5, 0.95, 1.0)), torch.ones(1, 3, dtype=torch.float64))
    # Mass spread over the 3x3 block around each output pixel (clipped at borders): side 3 from 12%.
    block = F.max_pool2d(eye.reshape(h * h, 1, h, h), 3, stride=1, padding=1).reshape(1, h, h, h, h)
    assert torch.equal(concentration_side(block, (0.95,)), torch.full((1, 1), 3.0, dtype=torch.float64))
    uniform = torch.ones(2, h, h, h, h)
    sides = concentration_side(uniform, (0.5, 0.999))
    assert torch.equal(sides[:, 1], torch.full((2,), float(h), dtype=torch.float64))
    assert (sides[:, 0] > 1).all() and (sides[:, 0] < h).all()
    plot_concentration([0.1, 1.0], sides, (0.5, 0.999), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_heatmap_store_round_trip_and_errors(tmp_path):
    maps = torch.rand(2, 4, 4, 4, 4)
    write_heatmaps(tmp_path / "h.zarr", maps, [0.5, 0.1], {"m": 3, "network": "tiny"})
    got, ts, meta = read_heatmaps(tmp_path / "h.zarr")
    assert torch.equal(got, maps) and torch.equal(ts, torch.tensor([0.5, 0.1], dtype=torch.float64))
    assert meta["m"] == 3 and "same-channel" in meta["channel_convention"]
    assert [p.name for p in tmp_path.iterdir()] == ["h.zarr"]  # no temporary left behind
    with pytest.raises(UserError, match="L = len"):
        write_heatmaps(tmp_path / "bad.zarr", maps, [0.5])
    with pytest.raises(UserError, match="not found"):
        read_heatmaps(tmp_path / "missing.zarr")
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(UserError):
        read_heatmaps(tmp_path / "junk.zarr")
