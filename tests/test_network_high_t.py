"""tools/network_high_t.py: its measures against naive float64 formulas and the limits they must meet."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pspc_index.network import EDMPrecond, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("network_high_t", ROOT / "tools" / "network_high_t.py")
nh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nh)


def random_net(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = EDMPrecond(UNetConfig(img_resolution=8, model_channels=8, channel_mult=(1, 2))).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("t", [0.002, 0.5, 19.4, 80.0])
def test_preconditioning_is_the_networks(t):
    """D(z, t) rebuilt from preconditioning(t) and the bare U-Net equals EDMPrecond's forward; with c_noise
    held at t_clamp >= t nothing changes; c_out^2 lambda = 1 (EDM's unit effective weight)."""
    net, z = random_net(), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * t
    p = nh.preconditioning(t)
    with torch.no_grad():
        ref = net(z, t)
        mine = p["c_skip"] * z + p["c_out"] * net.unet(p["c_in"] * z, torch.full((3,), math.log(t) / 4))
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6 * max(1, t))
        assert torch.equal(nh.clamped_noise_input(net, z, t, t_clamp=2 * t), mine)
        held = nh.clamped_noise_input(net, z, t, t_clamp=t / 2)
        assert not torch.allclose(held, ref)
    assert p["c_out"] ** 2 * p["loss_weight"] == pytest.approx(1.0)


def test_error_split_adds_up_and_finds_linear_noise():
    """bias2 + spread is the mean squared error (exactly); an error made of a fixed image plus 0.3 eps is all
    bias (the image) and all linear in eps (the rest)."""
    g = torch.Generator().manual_seed(2)
    opt, eps, img = torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, 1, 8, 8, generator=g), \
        torch.randn(1, 1, 8, 8, generator=g)
    out = opt + img + 0.3 * eps
    split, bias = nh.error_split(out, opt, eps)
    e = (out - opt).double()
    assert split["bias2"] + split["spread"] == pytest.approx(float(e.square().mean()), rel=1e-12)
    naive_bias = np.mean(e.numpy(), axis=0)
    assert np.allclose(bias.numpy(), naive_bias)
    assert split["eps_linear_share"] > 0.999
    noise_only = nh.error_split(opt + torch.randn(64, 1, 8, 8, generator=g), opt, eps)[0]
    assert noise_only["eps_linear_share"] < 0.01


def test_contrast_limits():
    g = torch.Generator().manual_seed(3)
    opt = torch.randn(16, 1, 8, 8, generator=g)
    assert nh.contrast(opt, opt) == pytest.approx(1.0)
    assert nh.contrast(0.5 * opt + 3.0, opt) == pytest.approx(0.5)  # washed out and shifted: half the contrast


def test_frechet_distance_naive():
    """Against scipy's matrix square root in float64; zero for a set against itself."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(200, 6)) * 1.5 + 0.3
    sa, sb = np.cov(a.T), np.cov(b.T)
    naive = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert nh.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(naive, rel=1e-8)
    assert abs(nh.frechet_distance(torch.from_numpy(a), torch.from_numpy(a))) < 1e-8


def test_training_draws_shipped_recipe():
    """P(sigma > t) of EDM's lognormal(-1.2, 1.2) times the images seen; ln t in lognormal sd."""
    meta = {"p_mean": -1.2, "p_std": 1.2, "images_seen": 1000}
    d = nh.training_draws(meta, 80.0)
    assert d["ln_t_sd"] == pytest.approx((math.log(80) + 1.2) / 1.2)
    assert d["p_sigma_above"] == pytest.approx(0.5 * math.erfc(d["ln_t_sd"] / math.sqrt(2)))
    assert d["draws_above"] == pytest.approx(1000 * d["p_sigma_above"])
    assert d["draws_above_half"] > d["draws_above"]


def test_tool_runs_on_the_shipped_network():
    """Two t, 4 z, no samples: the JSON has every field; the optimal denoiser is near the data mean at t = 80."""
    res = subprocess.run([sys.executable, "tools/network_high_t.py", "--ts", "0.3,80", "--n-z", "4", "--samples",
                          "0", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert [r["t"] for r in doc["rows"]] == [0.3, 80.0]
    small, big = doc["rows"]
    assert big["opt_vs_mean"] < 0.01 < small["opt_vs_mean"]
    net = big["nets"]["data/network/fmnist-unet"]
    assert net["bias2"] + net["spread"] == pytest.approx(net["vs_opt"], rel=1e-9)
