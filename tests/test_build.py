"""Index builds (issue 11, item 4): windows cut by slicing, deterministic entries files, threads, progress."""
import io
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.denoisers import PSPCSquare
from pspc_index.errors import UserError
from pspc_index.index import block_windows, blocks, build_bundle, npz_bytes, open_bundle, window_u8
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.store import TrainingSet, write_store


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("xflip", [True, False])
def test_block_windows_equal_the_gathered_ones(channels, xflip):
    # two slices per block against the per-image gather of every virtual image (flips: mirrored, flipped)
    x = torch.from_numpy(np.random.RandomState(channels).randint(0, 256, (7, channels, 9, 11)).astype(np.uint8))
    data = TrainingSet(x, xflip=xflip)
    for s in (2, 4):
        for _, _, win in blocks(9, 11, s, 3):
            naive = window_u8(data, torch.arange(len(data)), win).flatten(1).numpy()
            assert np.array_equal(block_windows(data, win), naive)


def test_entries_file_is_byte_identical_whenever_written(monkeypatch):
    arrays = {"a": np.arange(5, dtype=np.uint16), "b": np.ones((2, 3), np.float32)}
    first = npz_bytes(**arrays)
    monkeypatch.setattr(time, "time", lambda: 2e9)  # another date: np.savez would stamp it
    assert npz_bytes(**arrays) == first
    with np.load(io.BytesIO(first)) as f:
        assert all(np.array_equal(f[k], v) and f[k].dtype == v.dtype for k, v in arrays.items())


def test_threads_and_progress(tmp_path, capsys):
    store = write_store(tmp_path / "s.zarr", np.random.RandomState(2).randint(0, 256, (80, 1, 8, 8)).astype(np.uint8))
    with pytest.raises(UserError, match="--threads"):
        build_bundle(store.path, tmp_path / "x", [3], threads=0, progress=False)
    before = torch.get_num_threads()
    build_bundle(store.path, tmp_path / "b", [3], kind="ivf-flat", nlist=4, threads=2, progress=True)
    assert torch.get_num_threads() == before  # restored after the build
    err = capsys.readouterr().err
    assert "build 100%" in err and "4/4 indices done" in err
    # the two-thread bundle serves a query exactly when every entry is a candidate
    data = store.training_set()
    z = data.get(torch.arange(3)) + 0.3 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    den = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=len(data), patch_size=3)
    assert (den(z, 0.3) - PSPCSquare(data, patch_size=3)(z, 0.3)).abs().max() < 1e-5
    r = CliRunner().invoke(cli, ["build", str(store.path), str(tmp_path / "c"), "--threads", "0"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_index_files_deflated_and_plain_ones_still_read(tmp_path):
    import hashlib
    import json
    import zlib
    store = write_store(tmp_path / "s.zarr", np.random.RandomState(3).randint(0, 256, (80, 1, 8, 8)).astype(np.uint8))
    man = build_bundle(store.path, tmp_path / "b", [3], kind="ivf-pq", nlist=4, pq_m=9, progress=False)
    assert {rec["codec"] for rec in man["files"].values()} == {"zlib"}
    data = store.training_set()
    z = data.get(torch.arange(2)) + 0.2 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    want = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=8, patch_size=3)(z, 0.2)
    # a file as bundles wrote it before the codec (plain, no "codec" in its record) reads the same
    name = sorted(man["files"])[0]
    plain = zlib.decompress((tmp_path / "b" / name).read_bytes())
    (tmp_path / "b" / name).write_bytes(plain)
    rec = {k: v for k, v in man["files"][name].items() if k != "codec"}
    man["files"][name] = {**rec, "size": len(plain), "sha256": hashlib.sha256(plain).hexdigest()}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(man))
    got = RetrievalPSPC(data, open_bundle(tmp_path / "b", store), k=8, patch_size=3)(z, 0.2)
    assert torch.equal(got, want)
