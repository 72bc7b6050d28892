"""No command deletes, overwrites or moves anything it did not create (DESIGN.md section 5).

A folder of the user's files (and single files) are pointed at as the output of every verb; each must
be refused with one line and exit 2, and come out byte-identical.
"""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pspc_index.cli import cli
from pspc_index.errors import UserError
from pspc_index.outputs import HEATMAPS, STORE, artefact_format, claim
from pspc_index.sensitivity import write_heatmaps
from pspc_index.store import ImageStore


def snapshot(root: Path) -> dict:
    """Every path under root (root itself included) with its bytes' sha256 (None for folders)."""
    out = {".": None}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def run(*args, cwd=None):
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def assert_refused(res):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.fixture()
def setup(tmp_path):
    """A store, a z file, and a folder of user files (PNGs usable as an ingest source)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    assert run("ingest", tmp_path / "imgs.npy", tmp_path / "s.zarr").exit_code == 0
    np.save(tmp_path / "z.npy", rng.standard_normal((2, 1, 6, 6)).astype(np.float32))
    user = tmp_path / "results"
    (user / "nested").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(images[i, 0]).save(user / f"photo{i}.png")
    (user / "notes.txt").write_text("my notes")
    (user / "nested" / "data.bin").write_bytes(b"\x00\x01")
    return tmp_path, user


def verbs_at(tmp, target):
    """Every verb with its output (or one of its outputs) at `target`."""
    s, z = tmp / "s.zarr", tmp / "z.npy"
    return {
        "ingest": ["ingest", tmp / "imgs.npy", target],
        "ingest-overwrite": ["ingest", tmp / "imgs.npy", target, "--overwrite"],
        "denoise": ["denoise", "--store", s, "--z", z, "--t", 0.5, "--patch-size", 3, "--out", target],
        "build": ["build", s, target, "--patch-sizes", 3, "--index", "flat"],
        "build-overwrite": ["build", s, target, "--patch-sizes", 3, "--index", "flat", "--overwrite"],
        "sample": ["sample", "--store", s, "--n", 1, "--steps", 2, "--out", target],
        "attribute": ["attribute", "--store", s, "--z", z, "--t", 0.5, "--patch-size", 3, "--top", 2,
                      "--panel", target],
        "demo": ["demo", "--out-dir", target, "--n", 1],
    }


@pytest.mark.parametrize("verb", list(verbs_at(Path("a"), Path("b"))))
def test_user_folder_survives_every_verb(setup, verb):
    tmp, user = setup
    before = snapshot(user)
    assert_refused(run(*verbs_at(tmp, user)[verb]))
    assert snapshot(user) == before


@pytest.mark.parametrize("verb", ["sample", "build"])
def test_user_folder_named_like_an_artefact_survives(setup, verb):
    tmp, user = setup
    named = user.rename(tmp / ("run.zarr" if verb == "sample" else "b.idx"))
    before = snapshot(named)
    assert_refused(run(*verbs_at(tmp, named)[verb]))
    assert snapshot(named) == before


def test_ingest_into_its_own_source_or_cwd(setup):
    tmp, user = setup
    before = snapshot(user)
    assert_refused(run("ingest", user, user))
    assert_refused(run("ingest", tmp / "imgs.npy", ".", cwd=user))
    assert_refused(run("ingest", "../imgs.npy", ".", "--overwrite", cwd=user))
    assert snapshot(user) == before


@pytest.mark.parametrize("suffix", ["npy", "png", "trajectory.npz"])
def test_existing_files_need_overwrite(setup, suffix):
    """sample --out x.npy writes x.npy, x.png and (with --record) x.trajectory.npz: any of them existing
    refuses the whole run before work; --overwrite replaces them."""
    tmp, _ = setup
    mine = tmp / f"x.{suffix}"
    mine.write_bytes(b"user bytes")
    args = ["sample", "--store", tmp / "s.zarr", "--n", 1, "--steps", 2, "--out", tmp / "x.npy", "--record"]
    assert_refused(run(*args))
    assert mine.read_bytes() == b"user bytes"
    assert not any(p.name.startswith(".x.") for p in tmp.iterdir())  # no temporary left behind
    assert run(*args, "--overwrite").exit_code == 0
    assert mine.read_bytes() != b"user bytes"


def test_store_replaced_only_with_overwrite(setup):
    tmp, _ = setup
    other = np.zeros((3, 1, 6, 6), np.uint8)
    np.save(tmp / "other.npy", other)
    before = snapshot(tmp / "s.zarr")
    assert_refused(run("ingest", tmp / "other.npy", tmp / "s.zarr"))
    assert snapshot(tmp / "s.zarr") == before
    assert run("ingest", tmp / "other.npy", tmp / "s.zarr", "--overwrite").exit_code == 0
    assert ImageStore.open(tmp / "s.zarr").shape[0] == 3


def test_bundle_resumes_and_refuses_other_settings(setup):
    tmp, _ = setup
    b = tmp / "b.idx"
    args = ["build", tmp / "s.zarr", b, "--patch-sizes", 3, "--index", "flat"]
    assert run(*args).exit_code == 0
    assert run(*args).exit_code == 0  # same settings: a finished bundle is resumed (nothing rebuilt)
    before = snapshot(b)
    assert_refused(run("build", tmp / "s.zarr", b, "--patch-sizes", 3, "--index", "sq8"))
    assert snapshot(b) == before
    assert run("build", tmp / "s.zarr", b, "--patch-sizes", 3, "--index", "sq8", "--overwrite").exit_code == 0


def test_artefacts_are_recognised_by_kind(setup):
    tmp, user = setup
    assert artefact_format(tmp / "s.zarr") == STORE
    assert artefact_format(user) is None
    with pytest.raises(UserError):
        claim(tmp / "s.zarr", HEATMAPS, overwrite=True)  # a store is not heatmaps, even with overwrite
    with pytest.raises(UserError):
        write_heatmaps(user, np.zeros((1, 6, 6, 6, 6)), [0.5], overwrite=True)
    assert claim(tmp / "new" / "h.zarr", HEATMAPS) == (tmp / "new" / "h.zarr").resolve()


def test_empty_folder_is_a_valid_output(setup):
    tmp, _ = setup
    (tmp / "empty.zarr").mkdir()
    assert run("ingest", tmp / "imgs.npy", tmp / "empty.zarr").exit_code == 0
    assert artefact_format(tmp / "empty.zarr") == STORE


def outputs_under(tmp, folder):
    """Every verb writing its output under `folder` (relative paths, as a user types them; run in tmp)."""
    s, z = tmp / "s.zarr", tmp / "z.npy"
    return {
        "denoise": (["denoise", "--store", s, "--z", z, "--t", 0.5, "--patch-size", 3,
                     "--out", f"{folder}/d.npy"], "d.npy"),
        "sample-npy": (["sample", "--store", s, "--n", 1, "--steps", 2, "--out", f"{folder}/x.npy"], "x.npy"),
        "sample-zarr": (["sample", "--store", s, "--n", 1, "--steps", 2, "--out", f"{folder}/r.zarr"], "r.zarr"),
        "attribute": (["attribute", "--store", s, "--z", z, "--t", 0.5, "--patch-size", 3, "--top", 2,
                       "--panel", f"{folder}/p.png"], "p.png"),
        "ingest": (["ingest", tmp / "imgs.npy", f"{folder}/t.zarr"], "t.zarr"),
        "build": (["build", s, f"{folder}/b", "--patch-sizes", 3, "--index", "flat"], "b"),
    }


@pytest.mark.parametrize("verb", list(outputs_under(Path("a"), "f")))
def test_missing_parent_folders_are_created(setup, verb):
    """Every output, file or directory artefact, gets its missing parent folders (README: Outputs)."""
    tmp, _ = setup
    args, name = outputs_under(tmp, "new/deeper")[verb]
    res = run(*args, cwd=tmp)
    assert res.exit_code == 0, res.output
    assert (tmp / "new" / "deeper" / name).exists()
    assert not [p for p in (tmp / "new" / "deeper").iterdir() if p.name.startswith(".")]  # no temporaries


@pytest.mark.parametrize("verb", list(outputs_under(Path("a"), "f")))
def test_a_file_where_a_parent_folder_goes_is_named(setup, verb):
    tmp, _ = setup
    (tmp / "notes.txt").write_text("mine")
    args, _ = outputs_under(tmp, "notes.txt/sub")[verb]
    res = run(*args, cwd=tmp)
    assert_refused(res)
    assert "notes.txt is not a directory" in res.output and ".tmp-" not in res.output, res.output
    assert (tmp / "notes.txt").read_text() == "mine"


def test_kept_computes_once_and_leaves_no_temporary(tmp_path):
    from pspc_index.outputs import kept

    calls = []
    value = kept(tmp_path / "a" / "s.pt", lambda: calls.append(1) or {"x": [1, 2]})
    assert kept(tmp_path / "a" / "s.pt", lambda: calls.append(1) or {"x": []}) == value == {"x": [1, 2]}
    assert calls == [1] and [p.name for p in (tmp_path / "a").iterdir()] == ["s.pt"]
