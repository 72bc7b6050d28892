"""CLI contracts (DESIGN.md section 5): outputs, and one-line errors with exit status 2."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.denoisers import PSPCSquare
from pspc_index.store import ImageStore


@pytest.fixture()
def store(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (30, 1, 7, 7)).astype(np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    res = CliRunner().invoke(cli, ["ingest", str(tmp_path / "imgs.npy"), str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    return tmp_path / "s.zarr"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_info_json(store):
    res = run("info", store, "--json")
    rep = json.loads(res.output)
    assert rep["images"] == 30 and rep["with_flips"] == 60 and rep["height"] == 7


@pytest.mark.parametrize("flip", [True, False])
def test_denoise_matches_api(store, tmp_path, flip):
    z = np.random.RandomState(1).randn(3, 1, 7, 7).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    args = ["denoise", "--store", store, "--z", tmp_path / "z.npy", "--t", 0.3, "--denoiser", "pspc-square",
            "--patch-size", 3, "--out", tmp_path / "d.npy"] + ([] if flip else ["--no-xflip"])
    res = run(*args)
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "d.npy")
    data = ImageStore.open(store).training_set(xflip=flip)
    want = PSPCSquare(data, patch_size=3)(torch.from_numpy(z), 0.3).numpy()
    assert got.shape == z.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_sample_writes_npy_zarr_png(store, tmp_path):
    res = run("sample", "--store", store, "--n", 3, "--seed", 4, "--out", tmp_path / "s.npy", "--denoiser", "empirical",
              "--record")
    assert res.exit_code == 0, res.output
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (3, 1, 7, 7) and (tmp_path / "s.png").exists() and (tmp_path / "s.trajectory.npz").exists()
    res = run("sample", "--store", store, "--n", 3, "--seed", 4, "--out", tmp_path / "samples.zarr", "--denoiser", "empirical")
    assert res.exit_code == 0, res.output
    import zarr
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "samples.zarr"))["samples"][...], x)
    # empirical samples reproduce training images (to uint8 precision)
    data = ImageStore.open(store).training_set().get(torch.arange(60)).numpy()
    d = ((x[:, None] - data[None]) ** 2).reshape(3, 60, -1).sum(-1).min(1)
    assert (d < 1e-6).all()


def bad_inputs(tmp_path, store):
    np.save(tmp_path / "nan.npy", np.full((2, 1, 7, 7), np.nan, np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((2, 1, 8, 7), np.float32))
    np.save(tmp_path / "int.npy", np.zeros((2, 1, 7, 7), np.int32))
    np.save(tmp_path / "ok.npy", np.zeros((2, 1, 7, 7), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    den = ["denoise", "--store", store, "--out", tmp_path / "out.npy"]
    return {
        "nan": den + ["--z", tmp_path / "nan.npy", "--t", 1],
        "shape": den + ["--z", tmp_path / "shape.npy", "--t", 1],
        "dtype": den + ["--z", tmp_path / "int.npy", "--t", 1],
        "junk": den + ["--z", tmp_path / "junk.npy", "--t", 1],
        "t0": den + ["--z", tmp_path / "ok.npy", "--t", 0],
        "tneg": den + ["--z", tmp_path / "ok.npy", "--t", -2],
        "missing-z": den + ["--z", tmp_path / "none.npy", "--t", 1],
        "missing-store": ["denoise", "--store", tmp_path / "no.zarr", "--t", 1, "--out", tmp_path / "out.npy"],
        "patch": den + ["--z", tmp_path / "ok.npy", "--t", 1, "--patch-size", 9],
        "ingest-missing": ["ingest", tmp_path / "nothing.npy", tmp_path / "x.zarr"],
        "ingest-empty": ["ingest", tmp_path / "emptydir", tmp_path / "x.zarr"],
        "sample-n": ["sample", "--store", store, "--n", 0, "--out", tmp_path / "out.npy"],
        "sample-suffix": ["sample", "--store", store, "--n", 1, "--out", tmp_path / "out.txt"],
        "not-a-store": ["info", tmp_path],
    }


@pytest.mark.parametrize("case", [
    "nan", "shape", "dtype", "junk", "t0", "tneg", "missing-z", "missing-store", "patch", "ingest-missing",
    "ingest-empty", "sample-n", "sample-suffix", "not-a-store"])
def test_bad_input_one_line_exit_2(store, tmp_path, case):
    (tmp_path / "emptydir").mkdir(exist_ok=True)
    res = CliRunner().invoke(cli, [str(a) for a in bad_inputs(tmp_path, store)[case]])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "x.zarr").exists()
