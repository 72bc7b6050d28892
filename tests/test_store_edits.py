"""A store edited in place (issue 13, item 8): the content hash is computed from the pixels on every open,
so `info` shows it and every artefact tied to the store (index bundles, resumable sample runs) refuses
changed pixels with one line and exit 2."""
import hashlib
import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.errors import UserError
from pspc_index.index import open_bundle
from pspc_index.store import ImageStore, content_hash


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return res


def refused(*args, match: str):
    res = invoke(*args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert match in lines[0], lines[0]


def sha256_of(images: np.ndarray) -> str:
    """The oracle: sha256 of the shape as JSON, then the C-order pixel bytes."""
    return hashlib.sha256(json.dumps(list(images.shape)).encode() + images.tobytes()).hexdigest()


@pytest.fixture(params=[(1, 8, 8), (3, 6, 10)], ids=["gray-8x8", "rgb-6x10"])
def edited(request, tmp_path):
    """A 40-image store with a bundle and a finished resumable sample run, then 20 images rewritten in place
    with zarr (as a user fixing labels or pixels would). Returns (tmp_path, store, old and new images)."""
    rng = np.random.default_rng(8)
    old = rng.integers(0, 256, (40, *request.param), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", old)
    store = tmp_path / "s.zarr"
    ok("ingest", tmp_path / "imgs.npy", store)
    ok("build", store, tmp_path / "b", "--index", "flat", "--patch-sizes", 3)
    ok("sample", "--store", store, "--n", 4, "--batch", 2, "--steps", 4, "--out", tmp_path / "run.zarr")
    new = old.copy()
    new[5:25] = rng.integers(0, 256, (20, *request.param), dtype=np.uint8)
    zarr.open_group(str(store), mode="r+")["images"][5:25] = new[5:25]
    return tmp_path, store, old, new


def test_open_hashes_the_content(edited):
    _, store, old, new = edited
    s = ImageStore.open(store)
    assert s.sha256 == sha256_of(new) == content_hash(new) and s.recorded_sha256 == sha256_of(old)
    assert s.edited_in_place


def test_info_shows_true_hash_and_the_edit(edited):
    _, store, old, new = edited
    res = ok("info", store, "--json")
    rep = json.loads(res.stdout)
    assert rep["sha256"] == sha256_of(new) and rep["recorded_sha256"] == sha256_of(old) and rep["edited_in_place"]
    assert "rewritten since ingest" in res.stderr
    assert f"sha256: {sha256_of(new)}" in ok("info", store).stdout


def test_old_bundle_refused(edited):
    tmp_path, store, _, new = edited
    np.save(tmp_path / "z.npy", np.zeros((1, *new.shape[1:]), np.float32))
    refused("denoise", "--store", store, "--z", tmp_path / "z.npy", "--t", 0.3, "--index", tmp_path / "b",
            "--out", tmp_path / "d.npy", match="rebuild the bundle")
    refused("sample", "--store", store, "--n", 2, "--index", tmp_path / "b", "--out", tmp_path / "x.npy",
            match="rebuild the bundle")
    refused("attribute", "--store", store, "--z", tmp_path / "z.npy", "--t", 0.3, "--index", tmp_path / "b",
            match="rebuild the bundle")
    assert not (tmp_path / "d.npy").exists() and not (tmp_path / "x.npy").exists()
    with pytest.raises(UserError, match="rewritten since ingest"):
        open_bundle(tmp_path / "b", store)


def test_resumed_sample_run_refused(edited):
    tmp_path, store, _, _ = edited
    before = zarr.open_group(str(tmp_path / "run.zarr"))["samples"][...]
    refused("sample", "--store", store, "--n", 4, "--batch", 2, "--steps", 4, "--out", tmp_path / "run.zarr",
            match="the store now holds")
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "run.zarr"))["samples"][...], before)


def test_untouched_store_and_artefacts_still_open(tmp_path):
    images = np.random.default_rng(9).integers(0, 256, (30, 1, 7, 7), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    store = tmp_path / "s.zarr"
    ok("ingest", tmp_path / "imgs.npy", store)
    rep = json.loads(ok("info", store, "--json").stdout)
    assert rep["sha256"] == rep["recorded_sha256"] == sha256_of(images) and not rep["edited_in_place"]
    ok("build", store, tmp_path / "b", "--index", "flat", "--patch-sizes", 3)
    open_bundle(tmp_path / "b", store)
    args = ["sample", "--store", store, "--n", 2, "--batch", 1, "--steps", 3, "--out", tmp_path / "run.zarr"]
    ok(*args)
    ok(*args)  # resuming a finished run on the same pixels is accepted
    # rewriting pixels with identical values is no change
    zarr.open_group(str(store), mode="r+")["images"][:5] = images[:5]
    assert not ImageStore.open(store).edited_in_place
    ok(*args)
