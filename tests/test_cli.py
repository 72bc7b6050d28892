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


def one_line_refusal(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("pspc-index: error: "), res.output
    for needle in needles:
        assert needle in lines[0], res.output


@pytest.fixture()
def rgb_store(tmp_path):
    images = np.random.RandomState(2).randint(0, 256, (6, 3, 16, 16)).astype(np.uint8)
    np.save(tmp_path / "rgb.npy", images)
    assert run("ingest", tmp_path / "rgb.npy", tmp_path / "rgb.zarr").exit_code == 0
    return tmp_path / "rgb.zarr"


@pytest.mark.parametrize("verb", ["denoise", "sample"])
def test_network_of_another_shape_refused_up_front(rgb_store, tmp_path, verb):
    args = ["--store", rgb_store, "--n", 2, "--denoiser", "network", "--out", tmp_path / "x.npy"]
    res = run(verb, *args, *(["--t", 0.5] if verb == "denoise" else ["--steps", 2]))
    one_line_refusal(res, "takes 1x28x28 images", "3x16x16")
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("n", [0, -1])
def test_denoise_n_must_be_positive(store, tmp_path, n):
    one_line_refusal(run("denoise", "--store", store, "--n", n, "--t", 0.5, "--out", tmp_path / "x.npy"), "--n")


@pytest.mark.parametrize("verb", ["denoise", "sample"])
def test_cuda_without_cuda_is_one_line(store, tmp_path, monkeypatch, verb):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["--store", store, "--n", 2, "--device", "cuda", "--denoiser", "empirical", "--out", tmp_path / "x.npy"]
    res = run(verb, *args, *(["--t", 0.5] if verb == "denoise" else ["--steps", 2]))
    one_line_refusal(res, "--device cuda", "not available")
    from pspc_index.cli import build_denoiser
    from pspc_index.errors import UserError
    with pytest.raises(UserError, match="not available"):
        build_denoiser(store, "empirical", device="cuda")


@pytest.mark.parametrize("extra,needle", [
    (["--denoiser", "empirical", "--patch-size", 3], "--patch-size"),
    (["--denoiser", "network", "--patch-size", 3], "--patch-size"),
    (["--denoiser", "pspc-square", "--els-images", 5], "--els-images"),
    (["--denoiser", "gaussian", "--els-boundary", "circular"], "--els-boundary"),
    (["--denoiser", "pspc-square", "--heatmaps", "nowhere.zarr"], "--heatmaps"),
    (["--denoiser", "network", "--heatmaps", "nowhere.zarr"], "--heatmaps"),
    (["--denoiser", "pspc-square", "--network", "nowhere"], "--network"),
    (["--seed", -1], "--seed"),
])
@pytest.mark.parametrize("verb", ["denoise", "sample"])
def test_ignored_options_refused(store, tmp_path, extra, needle, verb):
    res = run(verb, "--store", store, "--n", 2, "--out", tmp_path / "x.npy", *extra,
              *(["--t", 0.5] if verb == "denoise" else ["--steps", 2]))
    one_line_refusal(res, needle)
    assert not (tmp_path / "x.npy").exists()


def test_els_run_records_its_pool(store, tmp_path):
    """A resumable ELS run records --els-images and --els-boundary: a resume with others is refused."""
    base = ["sample", "--store", store, "--n", 2, "--steps", 2, "--denoiser", "els", "--patch-size", 3,
            "--out", tmp_path / "r.zarr"]
    assert run(*base, "--els-images", 3).exit_code == 0
    assert run(*base, "--els-images", 3).exit_code == 0  # the same settings resume
    for extra in (["--els-images", 2], ["--els-images", 3, "--els-boundary", "circular"]):
        one_line_refusal(run(*base, *extra), "different settings", "els")


def test_a_file_as_store_says_ingest(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4), np.uint8))
    one_line_refusal(run("sample", "--store", tmp_path / "x.npy", "--n", 1, "--out", tmp_path / "s.npy"),
                     "not a pspc-index store", "pspc-index ingest")


def test_denoise_out_must_be_npy(store, tmp_path):
    one_line_refusal(run("denoise", "--store", store, "--t", 0.5, "--out", tmp_path / "x.txt"), ".npy")
    assert not (tmp_path / "x.txt").exists()


def test_sample_prints_the_batch_used(store, tmp_path):
    for out in ("o.npy", "r.zarr"):
        res = run("sample", "--store", store, "--n", 4, "--steps", 2, "--denoiser", "empirical",
                  "--out", tmp_path / out)
        assert res.exit_code == 0 and "batch 4)" in res.output and "batch 64" not in res.output, res.output


def test_overwrite_help_says_what_it_replaces():
    for verb in ("ingest", "build", "denoise", "sample", "attribute"):
        text = " ".join(run(verb, "--help").output.split())
        assert "--overwrite" in text and "never a plain file or folder where a store" in text, text
