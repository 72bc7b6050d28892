"""PF-ODE samplers (Euler, Heun) on the Karras grid, seeding, and trajectories."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pspc_index.denoisers import Empirical
from pspc_index.errors import UserError
from pspc_index.sampler import Trajectory, initial_noise, pf_ode_sample, sample
from pspc_index.schedule import karras_grid
from pspc_index.store import TrainingSet

SHAPE = (1, 5, 5)


def tiny_data():
    rng = np.random.default_rng(0)
    return TrainingSet(torch.from_numpy(rng.integers(0, 256, size=(6, *SHAPE), dtype=np.uint8)))


class Const:
    """D(z, t) = c for every z, t."""

    def __init__(self, c):
        self.c = c
        self.shape = tuple(c.shape)

    def __call__(self, z, t):
        return self.c.expand_as(z).clone()


class Zero:
    shape = SHAPE

    def __call__(self, z, t):
        return torch.zeros_like(z)


def test_karras_grid_18_matches_paper():
    g = karras_grid(18)
    assert g.dtype == torch.float64 and len(g) == 18
    assert float(g[0]) == 80.0
    assert float(g[-1]) == pytest.approx(0.002, rel=1e-12, abs=0)
    assert (g[1:] < g[:-1]).all()
    vals = g.tolist()
    assert round(vals[1], 2) == 57.59
    for v in (12.91, 1.088, 0.02293):
        digits = len(str(v).split(".")[1])
        assert any(round(x, digits) == v for x in vals), v
    # the closed form, element by element
    i = np.arange(18)
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert np.allclose(vals, want, rtol=1e-14, atol=0)
    with pytest.raises(UserError):
        karras_grid(1)


def test_euler_with_constant_denoiser_ends_at_c():
    c = torch.linspace(-1, 1, 25).reshape(SHAPE)
    z = initial_noise(3, range(4), SHAPE)
    out = pf_ode_sample(Const(c), z, steps=18, solver="euler")
    assert (out - c).abs().max() <= 1e-6


def test_euler_with_constant_denoiser_ends_exactly_at_c():
    c = torch.linspace(-1, 1, 25).reshape(SHAPE)
    z = initial_noise(3, range(4), SHAPE)
    out = pf_ode_sample(Const(c), z, steps=18, solver="euler")
    assert torch.equal(out, c.expand_as(out))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_zero_denoiser_closed_form(solver):
    """D = 0: dz/dt = z/t, so z(t) = z0 t / t0; each Euler (and Heun) step multiplies z by t_next/t."""
    z0 = initial_noise(1, range(3), SHAPE).double()
    steps = 10
    out, traj = pf_ode_sample(Zero(), z0, steps=steps, solver=solver, record=True)
    ts = karras_grid(steps)
    assert torch.equal(traj.ts, ts)
    for i in range(steps):
        want = z0 * (ts[i] / ts[0])
        assert torch.allclose(traj.z[i], want, rtol=1e-12, atol=1e-14), i
    assert out.abs().max() <= 1e-12


def test_samples_depend_on_seed_not_batch():
    den = Empirical(tiny_data())
    a = sample(den, n=5, seed=7, steps=8, batch=2)
    b = sample(den, n=5, seed=7, steps=8, batch=5)
    c = sample(den, n=3, seed=7, steps=8)
    assert a.shape == (5, *SHAPE)
    assert (a - b).abs().max() <= 1e-6
    assert (a[:3] - c).abs().max() <= 1e-6
    d = sample(den, n=2, seed=7, steps=8, first=3)
    assert (a[3:] - d).abs().max() <= 1e-6
    e = sample(den, n=5, seed=8, steps=8, batch=5)
    assert (a - e).abs().max() > 1e-3
    # samples are distinct from each other
    assert (a[0] - a[1]).abs().max() > 0 or (a[1] - a[2]).abs().max() > 0


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_record_trajectory(solver):
    den = Empirical(tiny_data())
    steps = 6
    x, traj = sample(den, n=3, seed=1, steps=steps, solver=solver, batch=2, record=True)
    assert isinstance(traj, Trajectory)
    assert traj.z.shape == (steps, 3, *SHAPE) and traj.denoised.shape == (steps, 3, *SHAPE)
    assert traj.ts.shape == (steps,) and torch.equal(traj.ts, karras_grid(steps))
    assert torch.equal(traj.z[0], initial_noise(1, range(3), SHAPE))
    x2 = sample(den, n=3, seed=1, steps=steps, solver=solver, batch=3)
    assert (x - x2).abs().max() <= 1e-6
    if solver == "euler":
        assert (traj.denoised[-1] - x).abs().max() <= 1e-5
    # each recorded denoised is D at the recorded state
    for i in (0, steps - 1):
        assert (den(traj.z[i], float(traj.ts[i])) - traj.denoised[i]).abs().max() <= 1e-5


def test_euler_final_sample_is_exactly_last_denoised():
    den = Empirical(tiny_data())
    x, traj = sample(den, n=3, seed=1, steps=6, solver="euler", record=True)
    assert torch.equal(traj.denoised[-1], x), float((traj.denoised[-1] - x).abs().max())


def test_heun_differs_from_euler_and_lands_near_data():
    data = tiny_data()
    den = Empirical(data)
    e = sample(den, n=2, seed=4, steps=8, solver="euler")
    h = sample(den, n=2, seed=4, steps=8, solver="heun")
    assert e.shape == h.shape
    assert (e.abs() <= 1 + 1e-5).all() and (h.abs() <= 1 + 1e-5).all()


def test_bad_arguments():
    den = Empirical(tiny_data())
    with pytest.raises(UserError):
        sample(den, n=0, seed=0)
    with pytest.raises(UserError):
        sample(den, n=2, seed=0, batch=0)
    with pytest.raises(UserError):
        pf_ode_sample(den, initial_noise(0, range(1), SHAPE), steps=4, solver="rk4")
