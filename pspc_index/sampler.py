"""Deterministic PF-ODE samplers on the Karras grid (EDM conventions: dz/dt = (z - D(z, t)) / t)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .schedule import T_MAX, karras_grid


def sample_seed(seed: int, i: int) -> int:
    """Independent 63-bit seed of sample i of a run seeded `seed` (so a sample never depends on its batch)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def initial_noise(seed: int, indices, shape, t_max: float = T_MAX) -> torch.Tensor:
    """z_T ~ N(0, t_max^2 I) for samples `indices` of the run seeded `seed` -> [len(indices), *shape]."""
    out = [torch.randn(*shape, generator=torch.Generator().manual_seed(sample_seed(seed, int(i))))
           for i in indices]
    return torch.stack(out) * t_max


@dataclass
class Trajectory:
    """States z_i entering each step (t_i) and the denoiser outputs D(z_i, t_i): [steps, B, C, H, W]."""

    ts: torch.Tensor
    z: torch.Tensor
    denoised: torch.Tensor


def pf_ode_sample(denoiser, z: torch.Tensor, steps: int = 18, solver: str = "euler",
                  record: bool = False, progress=None):
    """Euler or Heun PF-ODE from z at t_0 = t_max down the Karras grid; the last step goes to t = 0,
    which returns D(z, t_min). Returns the samples, and the Trajectory when `record`."""
    if solver not in ("euler", "heun"):
        raise UserError(f"unknown solver {solver!r}; use euler or heun")
    ts = torch.cat([karras_grid(steps), torch.zeros(1, dtype=torch.float64)])
    zs, ds = [], []
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        # 1. Euler step along dz/dt = (z - D(z, t)) / t
        d = denoiser(z, t)
        slope = (z - d) / t
        z_next = z + (t_next - t) * slope if t_next > 0 else d  # the step to t = 0 lands exactly on D
        # 2. Heun's correction with the slope at the end point (not on the last step, which ends at t = 0)
        if solver == "heun" and t_next > 0:
            slope_next = (z_next - denoiser(z_next, t_next)) / t_next
            z_next = z + (t_next - t) * 0.5 * (slope + slope_next)
        if record:
            zs.append(z.cpu())
            ds.append(d.cpu())
        z = z_next
        if progress is not None:
            progress(i + 1, steps)
    traj = Trajectory(ts[:-1], torch.stack(zs), torch.stack(ds)) if record else None
    return (z, traj) if record else z


def sample(denoiser, n: int, seed: int, steps: int = 18, solver: str = "euler", batch: int = 64,
           record: bool = False, first: int = 0, progress: bool = False):
    """Draw samples first..first+n-1 of the run seeded `seed`, `batch` at a time."""
    from tqdm import tqdm

    if n <= 0 or batch <= 0 or steps < 2:
        raise UserError(f"need n > 0, batch > 0 and steps >= 2, got n={n}, batch={batch}, steps={steps}")
    outs, trajs = [], []
    bar = tqdm(total=n * steps, unit="img-step", disable=not progress, file=sys.stderr)
    for start in range(first, first + n, batch):
        idx = range(start, min(start + batch, first + n))
        z = initial_noise(seed, idx, denoiser.shape).to(getattr(denoiser, "device", "cpu"))  # noise drawn on CPU
        res = pf_ode_sample(denoiser, z, steps, solver, record, progress=lambda i, s: bar.update(len(idx)))
        outs.append(res[0] if record else res)
        if record:
            trajs.append(res[1])
    x = torch.cat(outs).cpu()
    if not record:
        return x
    traj = Trajectory(trajs[0].ts, torch.cat([tr.z for tr in trajs], 1), torch.cat([tr.denoised for tr in trajs], 1))
    return x, traj


def save_samples(out, x: torch.Tensor, traj: Trajectory | None = None, provenance: dict | None = None) -> None:
    """Samples x [N, C, H, W] as float32 .npy at `out` (atomically); a trajectory goes beside it as
    <stem>.trajectory.npz with arrays ts [S], z and denoised [S, N, C, H, W], and `provenance` (what it
    was sampled over: store hash, exclusion record) as a JSON string array."""
    import json

    from .outputs import save_npy, save_npz

    save_npy(out, x.cpu().numpy().astype(np.float32))
    if traj is not None:
        extra = {} if provenance is None else {"provenance": np.array(json.dumps(provenance, sort_keys=True))}
        save_npz(str(out)[:-4] + ".trajectory.npz", ts=traj.ts.numpy(), z=traj.z.numpy(),
                 denoised=traj.denoised.numpy(), **extra)
