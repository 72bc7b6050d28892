"""Large runs: resumable zarr sampling, and the same bytes when split over two gloo processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.denoisers import Empirical
from pspc_index.distributed import sample_to_zarr
from pspc_index.errors import UserError
from pspc_index.sampler import sample
from pspc_index.schedule import DEFAULTS
from pspc_index.store import TrainingSet

SHAPE = (1, 6, 6)
ARGS = dict(n=10, seed=3, steps=4, solver="euler", batch=3, progress=False)


def tiny_data():
    rng = np.random.default_rng(0)
    return TrainingSet(torch.from_numpy(rng.integers(0, 256, size=(20, *SHAPE), dtype=np.uint8)))


class Killed(Exception):
    pass


class DiesAfter:
    """Wraps a denoiser; raises (a simulated kill) at the first call after `batches` full batches."""

    def __init__(self, den, batches, steps):
        self.den, self.calls_left = den, batches * steps

    @property
    def shape(self):
        return self.den.shape

    @property
    def device(self):
        return self.den.device

    def __call__(self, z, t):
        if self.calls_left == 0:
            raise Killed()
        self.calls_left -= 1
        return self.den(z, t)


@pytest.mark.parametrize("record", [False, True])
def test_resume_after_kill_equals_uninterrupted(tmp_path, record):
    den = Empirical(tiny_data())
    want = sample_to_zarr(den, tmp_path / "full.zarr", record=record, **ARGS)
    ref = sample(den, ARGS["n"], ARGS["seed"], steps=ARGS["steps"], batch=ARGS["batch"], record=record)
    np.testing.assert_array_equal(want, (ref[0] if record else ref).numpy())

    out = tmp_path / "run.zarr"
    with pytest.raises(Killed):
        sample_to_zarr(DiesAfter(Empirical(tiny_data()), 2, ARGS["steps"]), out, record=record,
                       meta={"denoiser": "Empirical"}, **ARGS)
    assert zarr.open_group(str(out))["done"][...].tolist() == [1, 1, 0, 0]
    got = sample_to_zarr(den, out, record=record, **ARGS)
    np.testing.assert_array_equal(got, want)
    g, f = zarr.open_group(str(out)), zarr.open_group(str(tmp_path / "full.zarr"))
    assert g["done"][...].all() and g.attrs["seed"] == 3 and g.attrs["batch"] == 3
    if record:
        for name in ("z", "denoised", "ts"):
            np.testing.assert_array_equal(g[name][...], f[name][...])
        np.testing.assert_array_equal(g["z"][...], ref[1].z.numpy())


@pytest.mark.parametrize("change", [{"seed": 4}, {"steps": 5}, {"batch": 4}, {"n": 11}, {"solver": "heun"}])
def test_mismatched_settings_user_error(tmp_path, change):
    den = Empirical(tiny_data())
    sample_to_zarr(den, tmp_path / "r.zarr", **{**ARGS, "n": 3})
    with pytest.raises(UserError, match="different settings"):
        sample_to_zarr(den, tmp_path / "r.zarr", **{**ARGS, "n": 3, **change})


def test_rank_split_without_group_equals_one_process(tmp_path):
    den = Empirical(tiny_data())
    want = sample_to_zarr(den, tmp_path / "one.zarr", **ARGS)
    assert sample_to_zarr(den, tmp_path / "two.zarr", rank=1, world=2, **ARGS) is None
    got = sample_to_zarr(den, tmp_path / "two.zarr", rank=0, world=2, **ARGS)
    np.testing.assert_array_equal(got, want)


@pytest.fixture()
def store(tmp_path):
    np.save(tmp_path / "imgs.npy", tiny_data().images.numpy())
    res = CliRunner().invoke(cli, ["ingest", str(tmp_path / "imgs.npy"), str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    return tmp_path / "s.zarr"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun2(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pspc_index.cli"] + [str(a) for a in args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr


def assert_same_samples(a, b):
    one, two = zarr.open_group(str(a)), zarr.open_group(str(b))
    assert two["done"][...].all() and b.with_suffix(".png").exists()
    assert np.abs(two["samples"][...] - one["samples"][...]).max() <= 1e-5


def test_torchrun_two_gloo_processes_equal_one(store, tmp_path):
    common = ["sample", "--store", str(store), "-n", "7", "--seed", "5", "--steps", "3", "--batch", "2",
              "--denoiser", "empirical"]
    res = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "one.zarr")])
    assert res.exit_code == 0, res.output
    torchrun2(common + ["--out", tmp_path / "two.zarr"])
    assert_same_samples(tmp_path / "one.zarr", tmp_path / "two.zarr")


def test_torchrun_location_split_equals_one(store, tmp_path):
    # index build split over two processes: the same bundle as one process
    torchrun2(["build", store, tmp_path / "b2", "--patch-sizes", "3", "--index", "flat", "--stride", "2"])
    res = CliRunner().invoke(cli, ["build", str(store), str(tmp_path / "b1"), "--patch-sizes", "3", "--index",
                                   "flat", "--stride", "2", "--json"])
    assert res.exit_code == 0, res.output
    for f in sorted(p.name for p in (tmp_path / "b1").iterdir()):
        assert (tmp_path / "b1" / f).read_bytes() == (tmp_path / "b2" / f).read_bytes(), f
    assert not list((tmp_path / "b2").glob(".progress*"))
    # sampling with the crop locations split (exact engine, and retrieval with each process's indices)
    common = ["sample", "--store", store, "-n", "5", "--seed", "2", "--steps", "3", "--batch", "3",
              "--patch-size", "3"]
    for name, extra in (("exact", []), ("ret", ["--index", tmp_path / "b1", "--k", "8", "--tail-size", "16"])):
        res = CliRunner().invoke(cli, [str(a) for a in common + extra + ["--out", tmp_path / f"{name}1.zarr"]])
        assert res.exit_code == 0, res.output
        torchrun2(common + extra + ["--split", "locations", "--out", tmp_path / f"{name}2.zarr"])
        assert_same_samples(tmp_path / f"{name}1.zarr", tmp_path / f"{name}2.zarr")


def test_cli_zarr_resume_and_bad_args(store, tmp_path):
    out = tmp_path / "r.zarr"
    base = ["sample", "--store", str(store), "--n", "4", "--steps", "3", "--batch", "2", "--denoiser", "empirical"]
    assert CliRunner().invoke(cli, base + ["--out", str(out)]).exit_code == 0
    res = CliRunner().invoke(cli, base + ["--out", str(out)])  # all done: a no-op rerun
    assert res.exit_code == 0, res.output
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr" / "notes.txt").write_text("a user's folder")
    for bad in (["--seed", "9", "--out", str(out)],          # settings differ from the existing run
                ["--batch", "0", "--out", str(tmp_path / "b.zarr")],
                ["--out", str(tmp_path / "plain.zarr")]):     # not a sample run
        res = CliRunner().invoke(cli, base + bad)
        assert res.exit_code == 2, res.output
        lines = [l for l in res.output.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "b.zarr").exists()


def test_fit_batch_follows_the_budget(store, tmp_path):
    from pspc_index.distributed import fit_batch
    den = Empirical(tiny_data())
    small, large = (fit_batch(den, 10 ** 6, 18, rec, 2 ** 30) for rec in (True, False))
    assert 1 <= small < large <= 10 ** 6 and fit_batch(den, 7, 18, False, 2 ** 30) == 7
    with pytest.raises(UserError, match="below the estimated minimum"):
        fit_batch(den, 10, 18, False, 2 ** 20)
    base = ["sample", "--store", str(store), "--n", "3", "--steps", "3", "--denoiser", "empirical", "--batch", "auto"]
    res = CliRunner().invoke(cli, base + ["--memory-gb", "1", "--out", str(tmp_path / "a.zarr")])
    assert res.exit_code == 0 and "batch 3" in res.output, res.output
    res = CliRunner().invoke(cli, base + ["--memory-gb", "0.001", "--out", str(tmp_path / "b.zarr")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def invoke_in(cwd, args):
    old = os.getcwd()
    try:
        os.chdir(cwd)
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def test_resume_with_equal_settings_written_differently(store, tmp_path):
    """The run records resolved settings (absolute paths, defaults written out): the same bundle by
    another path, or the default --tail given explicitly, resume; other settings do not."""
    assert CliRunner().invoke(cli, ["build", str(store), str(tmp_path / "b"), "--patch-sizes", "3", "--index",
                                    "flat", "--stride", "2"]).exit_code == 0
    sched = json.loads(CliRunner().invoke(cli, ["info", str(store), "--json"]).output)["default_schedule"]
    base = ["sample", "--store", store, "--n", 4, "--steps", 2, "--batch", 2, "--k", 8, "--m", 16,
            "--out", tmp_path / "run.zarr"]
    res = invoke_in(tmp_path, base + ["--index", "b"])
    assert res.exit_code == 0, res.output
    attrs = dict(zarr.open_group(str(tmp_path / "run.zarr")).attrs)
    assert attrs["retrieval"]["index_path"] == str((tmp_path / "b").resolve())
    assert attrs["retrieval"]["tail"] == "none" and attrs["schedule"] == sched
    for same in (["--index", tmp_path / "b"], ["--index", "./b/", "--tail", "none"]):
        res = invoke_in(tmp_path, base + same)
        assert res.exit_code == 0, res.output
    res = invoke_in(tmp_path, base + ["--index", "b", "--tail", "sample"])
    assert res.exit_code == 2 and "different settings" in res.output, res.output


def test_resume_network_by_another_spelling(tmp_path):
    from pspc_index.cli import DEFAULT_NETWORK
    images = np.random.default_rng(1).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    assert CliRunner().invoke(cli, ["ingest", str(tmp_path / "imgs.npy"), str(tmp_path / "s.zarr")]).exit_code == 0
    base = ["sample", "--store", tmp_path / "s.zarr", "--n", 2, "--steps", 2, "--denoiser", "network",
            "--out", tmp_path / "run.zarr"]
    assert invoke_in(tmp_path, base).exit_code == 0
    rel = os.path.relpath(f"{DEFAULT_NETWORK}.json", tmp_path)
    res = invoke_in(tmp_path, base + ["--network", rel, "--schedule", DEFAULTS[(28, 28)]])  # the default, by name
    assert res.exit_code == 0, res.output
    res = invoke_in(tmp_path, base + ["--no-xflip"])
    assert res.exit_code == 2 and "different settings" in res.output, res.output
