"""Gradient-sensitivity heatmaps of a network denoiser (paper Eq. 8) and their concentration.

G[t, y, x, i, j] = E_z[ sum_c |dD(z, t)[c, y, x] / dz[c, i, j]| ] over forward-process z = x + t eps.
Stored [L, H, W, H, W]: t index, output y, output x, input i, input j. PSPC-Flex turns each map
into a crop (geometry.py); the concentration curve is the paper's Fig. 3 (left).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .outputs import HEATMAPS, atomic_dir, claim, commit_dir, save_png
from .store import TrainingSet, read_group

FORMAT = HEATMAPS
FORMAT_VERSION = 1
CHANNEL_CONVENTION = ("same-channel: sum over c of |dD[c, y, x] / dz[c, i, j]| "
                      "(output channel c w.r.t. input channel c only)")


def gradient_heatmaps(net, training_set: TrainingSet, ts, m: int, batch: int,
                      generator: torch.Generator, progress: bool = True) -> torch.Tensor:
    """Monte-Carlo estimate of Eq. 8 over m forward-process z per t -> float32 [L, H, W, H, W].

    Channel convention (the literal reading of the paper): output channel c is differentiated
    with respect to input channel c only, and the absolute values are summed over c; cross-channel
    derivatives dD[c] / dz[c'], c' != c, are not counted. Each output pixel and channel costs one
    backward pass over a whole batch of z at once: samples are independent (GroupNorm normalises
    per sample), so the gradient of sum_b D_b[c, y, x] w.r.t. z_b is each sample's own row of its
    Jacobian. For each t the m images (uniform over the training set, flips included) and noises
    are drawn before batching, so the estimate does not depend on `batch`.
    """
    from tqdm import tqdm

    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    c, h, w = training_set.shape
    ts = [float(t) for t in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]
    if m < 1 or batch < 1:
        raise UserError(f"heatmaps need m >= 1 and batch >= 1, got m={m}, batch={batch}")
    out = torch.zeros(len(ts), h, w, h, w, dtype=torch.float64)
    bar = tqdm(total=len(ts) * m, unit="z", desc="heatmaps", disable=not progress)
    for l, t in enumerate(ts):
        idx = torch.randint(len(training_set), (m,), generator=generator)
        eps = torch.randn(m, c, h, w, generator=generator, dtype=torch.float64)
        for start in range(0, m, batch):
            x = training_set.get(idx[start:start + batch], dtype=torch.float64).cpu()
            z = (x + t * eps[start:start + batch]).to(device, dtype)
            out[l] += batch_abs_jacobian(net, z, t).to(torch.float64).sum(0).cpu()
            bar.update(len(z))
    bar.close()
    return (out / m).to(torch.float32)


def batch_abs_jacobian(net, z: torch.Tensor, t: float) -> torch.Tensor:
    """Per sample, sum_c |dD[c, y, x] / dz[c, i, j]| -> [B, H, W, H, W] (one backward per (c, y, x))."""
    b, c, h, w = z.shape
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        d = net(z, torch.full((b,), t, dtype=z.dtype, device=z.device))
        out = torch.zeros(b, h, w, h, w, dtype=z.dtype, device=z.device)
        onehot = torch.zeros_like(d)
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    onehot[:, ch, y, x] = 1
                    (g,) = torch.autograd.grad(d, z, onehot, retain_graph=True)
                    onehot[:, ch, y, x] = 0
                    out[:, y, x] += g[:, ch].abs()
    return out


def write_heatmaps(path: str | os.PathLike, heatmaps: torch.Tensor, ts, meta: dict | None = None,
                   overwrite: bool = False) -> None:
    """Write heatmaps [L, H, W, H, W] and their t values as a zarr v3 group, atomically. Existing heatmaps
    at `path` are replaced only with `overwrite`; anything else there is refused (UserError), untouched."""
    import zarr

    heatmaps = torch.as_tensor(heatmaps, dtype=torch.float32).cpu()
    ts = [float(t) for t in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]
    if heatmaps.ndim != 5 or heatmaps.shape[1:3] != heatmaps.shape[3:5] or len(ts) != heatmaps.shape[0]:
        raise UserError(f"{path}: heatmaps must be [L, H, W, H, W] with L = len(ts) = {len(ts)}, "
                        f"got {list(heatmaps.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    path = claim(path, HEATMAPS, overwrite=overwrite)
    tmp = atomic_dir(path)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        arr = root.create_array("heatmaps", shape=tuple(heatmaps.shape), dtype="float32",
                                chunks=(1, *heatmaps.shape[1:]))
        arr[...] = heatmaps.numpy()
        root.attrs.update({**(meta or {}), "format": FORMAT, "format_version": FORMAT_VERSION, "ts": ts,
                           "channel_convention": (meta or {}).get("channel_convention", CHANNEL_CONVENTION)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, path, HEATMAPS)


def read_heatmaps(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(heatmaps float32 [L, H, W, H, W], ts float64 [L], metadata) from `write_heatmaps`' output."""
    path = Path(path)
    meta, heatmaps = read_group(path, "heatmaps group", FORMAT, lambda root: torch.from_numpy(root["heatmaps"][...]))
    ts = torch.tensor(meta.get("ts", []), dtype=torch.float64)
    if heatmaps.ndim != 5 or heatmaps.shape[1:3] != heatmaps.shape[3:5] or len(ts) != heatmaps.shape[0]:
        raise UserError(f"{path}: heatmaps {list(heatmaps.shape)} do not match {len(ts)} t values")
    return heatmaps.to(torch.float32), ts, meta


def concentration_side(heatmaps: torch.Tensor, fractions=(0.5, 0.75, 0.95)) -> torch.Tensor:
    """Mean over output pixels of the side of the smallest centred square holding each mass fraction.

    The square of half-width r around output pixel (y, x) is clipped at the image border; its side
    is 2r + 1, capped at the image size max(H, W) (a square that already covers the image). A delta
    map at the output pixel gives 1; a uniform map gives the image size as the fraction -> 1.
    Returns float64 [L, len(fractions)].
    """
    heatmaps = torch.as_tensor(heatmaps, dtype=torch.float64)
    l, h, w = heatmaps.shape[:3]
    size = max(h, w)
    # Chebyshev distance from output (y, x) to input (i, j): the ring of squares that first holds it.
    yy, xx = torch.arange(h), torch.arange(w)
    dist = torch.maximum((yy[:, None, None, None] - yy[None, None, :, None]).abs(),
                         (xx[None, :, None, None] - xx[None, None, None, :]).abs()).reshape(h, w, h * w)
    rings = torch.zeros(l, h, w, size, dtype=torch.float64)
    rings.scatter_add_(3, dist.expand(l, h, w, h * w), heatmaps.reshape(l, h, w, h * w))
    cum = rings.cumsum(3)
    total = cum[..., -1:]
    sides = []
    for f in fractions:
        # The number of rings still short of the fraction is the half-width r (cum is non-decreasing);
        # a relative tolerance keeps rounding in the sums from pushing r one ring further out.
        r = (cum < f * total * (1 - 1e-9)).sum(3)
        sides.append((2 * r + 1).clamp(max=size).to(torch.float64).mean((1, 2)))
    return torch.stack(sides, dim=1)


def plot_concentration(ts, sides, fractions, path: str | os.PathLike, title: str = "") -> None:
    """Side of the centred square holding each mass fraction vs t (log t), as in paper Fig. 3 (left)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, sides = torch.as_tensor(ts, dtype=torch.float64), torch.as_tensor(sides, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, f in enumerate(fractions):
        ax.plot(ts.numpy(), sides[:, k].numpy(), marker="o", ms=3, label=f"{f:.0%} of the gradient")
    ax.set(xscale="log", xlabel="noise level t", ylabel="side of centred square (pixels)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(path, fig, dpi=130)
    plt.close(fig)
