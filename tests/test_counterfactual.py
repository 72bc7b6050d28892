"""Counterfactuals (issue 14): exclusion on every verb equals a store without those images; self-verifying
attribution (`attribute --verify`, `attribution.verify_attribution`)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pspc_index.attribution import attribute, trajectory_settings, verify_attribution
from pspc_index.cli import cli
from pspc_index.counterfactual import exclusion, training_set
from pspc_index.denoisers import PSPCSquare
from pspc_index.errors import UserError
from pspc_index.sampler import initial_noise, pf_ode_sample
from pspc_index.store import ImageStore, write_store

N, SHAPE = 24, (1, 7, 7)
GONE = [2, 5, 11]          # the excluded indices of every case below
LABELS = np.arange(N) % 3  # labels 0, 1, 2 in turn


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The full labelled store, and for each exclusion case the store ingested without those images."""
    root = tmp_path_factory.mktemp("cf")
    images = np.random.RandomState(0).randint(0, 256, (N, *SHAPE)).astype(np.uint8)
    write_store(root / "full.zarr", images, LABELS, extra={"classes": ["a", "b", "c"]})
    write_store(root / "plain.zarr", images)  # no labels
    cases = {"ids": np.isin(np.arange(N), GONE), "label": LABELS == 1, "only": LABELS != 2,
             "both": np.isin(np.arange(N), GONE) | (LABELS == 0)}
    for name, gone in cases.items():
        write_store(root / f"{name}.zarr", images[~gone], LABELS[~gone])
    (root / "gone.txt").write_text("\n".join(map(str, GONE)) + "\n")
    np.save(root / "gone.npy", np.array(GONE))
    return root, {name: np.flatnonzero(~gone) for name, gone in cases.items()}


def options(root, case):
    """The CLI options of each exclusion case (a text file, an .npy, labels by number or class name)."""
    return {"ids": ["--exclude", root / "gone.txt"], "label": ["--exclude-label", "b"],
            "only": ["--label", 2], "both": ["--exclude", root / "gone.npy", "--exclude-label", "0"]}[case]


# ----------------------------------------------------------------------------------------------
# exclusion through the API and every verb
# ----------------------------------------------------------------------------------------------

def test_api_view_equals_smaller_store(stores):
    root, keep = stores
    full = ImageStore.open(root / "full.zarr")
    view = training_set(full, exclude=GONE, exclude_labels=["a"])
    small = ImageStore.open(root / "both.zarr").training_set()
    assert view.images.data_ptr() == full.images.ctypes.data  # a view of the store's pixels, not a copy
    assert view.n_included == len(small)
    z = small.get(torch.arange(4)) + 0.3 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    for s in (3, 7):
        np.testing.assert_allclose(PSPCSquare(view, patch_size=s)(z, 0.3), PSPCSquare(small, patch_size=s)(z, 0.3),
                                   atol=1e-6)
    # the record names the effective set: the same ids however they were given
    a = exclusion(full, exclude=root / "gone.txt").record()
    assert a == exclusion(full, exclude=list(reversed(GONE)) + GONE).record() and a["count"] == 3
    assert exclusion(full).record() is None


@pytest.mark.parametrize("case", ["ids", "label", "only", "both"])
@pytest.mark.parametrize("denoiser", ["pspc-square", "empirical", "gaussian"])
def test_denoise_excluded_equals_smaller_store(stores, tmp_path, case, denoiser):
    root, _ = stores
    z = np.random.RandomState(3).randn(3, *SHAPE).astype(np.float32) * 0.5
    np.save(tmp_path / "z.npy", z)
    # --patch-size only where it applies (elsewhere it is refused, not ignored)
    common = ["--t", 0.4, "--denoiser", denoiser, *(["--patch-size", 3] if denoiser == "pspc-square" else [])]
    for query in (["--z", tmp_path / "z.npy"], ["--n", 4, "--seed", 2]):  # given z, and z drawn from the store
        res = run("denoise", "--store", root / "full.zarr", *query, *common, "--out", tmp_path / "a.npy",
                  "--overwrite", *options(root, case))
        assert res.exit_code == 0, res.output
        res = run("denoise", "--store", root / f"{case}.zarr", *query, *common, "--out", tmp_path / "b.npy",
                  "--overwrite")
        assert res.exit_code == 0, res.output
        np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6)


@pytest.mark.parametrize("case", ["ids", "only"])
def test_sample_excluded_equals_smaller_store(stores, tmp_path, case):
    root, _ = stores
    common = ["--n", 3, "--seed", 5, "--steps", 5, "--patch-size", 3, "--record"]
    assert run("sample", "--store", root / "full.zarr", *common, "--out", tmp_path / "a.npy",
               *options(root, case)).exit_code == 0
    assert run("sample", "--store", root / f"{case}.zarr", *common, "--out", tmp_path / "b.npy").exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6)
    ta, tb = np.load(tmp_path / "a.trajectory.npz"), np.load(tmp_path / "b.trajectory.npz")
    np.testing.assert_allclose(ta["denoised"], tb["denoised"], atol=1e-6)


@pytest.mark.parametrize("case", ["ids", "label", "both"])
def test_attribute_excluded_equals_smaller_store_and_never_lists_them(stores, tmp_path, case):
    root, keep = stores
    z = np.random.RandomState(4).randn(2, *SHAPE).astype(np.float32) * 0.3
    np.save(tmp_path / "z.npy", z)
    common = ["--z", tmp_path / "z.npy", "--t", 0.3, "--patch-size", 3, "--top", 2 * N, "--json"]
    a = json.loads(run("attribute", "--store", root / "full.zarr", *common, *options(root, case)).output)
    b = json.loads(run("attribute", "--store", root / f"{case}.zarr", *common).output)
    for qa, qb in zip(a["queries"], b["queries"]):
        assert len(qa) == len(qb) == 2 * len(keep[case])  # every image taking part, flips too, none excluded
        assert {(e["index"], e["flip"]) for e in qa} == {(int(keep[case][e["index"]]), e["flip"]) for e in qb}
        share = {(e["index"], e["flip"]): e["share"] for e in qa}
        for e in qb:
            assert abs(share[(int(keep[case][e["index"]]), e["flip"])] - e["share"]) < 1e-6


def test_flip_of_an_excluded_image_is_excluded(stores):
    root, _ = stores
    full = ImageStore.open(root / "full.zarr")
    data = training_set(full, exclude=[7])
    x = data.get(torch.tensor([N + 7]))  # the flip of image 7 itself, barely noised
    ranking, shares, _ = attribute(PSPCSquare(data, patch_size=3), x + 0.01, 0.05, top=2 * N)
    assert shares[0, 7] == 0 and shares[0, N + 7] == 0
    assert all(e["index"] != 7 for e in ranking[0]) and len(ranking[0]) == 2 * (N - 1)


def test_retrieval_excluded_equals_smaller_store_exact(stores, tmp_path):
    root, _ = stores
    assert run("build", root / "full.zarr", tmp_path / "flat", "--patch-sizes", 3, "--index", "flat",
               "--stride", 1).exit_code == 0
    z = np.random.RandomState(6).randn(2, *SHAPE).astype(np.float32) * 0.4
    np.save(tmp_path / "z.npy", z)
    common = ["--z", tmp_path / "z.npy", "--t", 0.4, "--patch-size", 3]
    assert run("denoise", "--store", root / "full.zarr", *common, "--index", tmp_path / "flat", "--k", 2 * N,
               "--tail", "none", "--out", tmp_path / "a.npy", *options(root, "ids")).exit_code == 0
    assert run("denoise", "--store", root / "ids.zarr", *common, "--out", tmp_path / "b.npy").exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-5)
    # attribution over the candidates: the same images and shares, none excluded
    common = ["--z", tmp_path / "z.npy", "--t", 0.4, "--patch-size", 3, "--top", 2 * N, "--json"]
    a = json.loads(run("attribute", "--store", root / "full.zarr", *common, "--index", tmp_path / "flat", "--k",
                       2 * N, *options(root, "ids")).output)
    b = json.loads(run("attribute", "--store", root / "ids.zarr", *common).output)
    keep = stores[1]["ids"]
    for qa, qb in zip(a["queries"], b["queries"]):
        share = {(e["index"], e["flip"]): e["share"] for e in qa}
        assert len(qa) == len(qb) and not {e["index"] for e in qa} & set(GONE)
        for e in qb:
            assert abs(share[(int(keep[e["index"]]), e["flip"])] - e["share"]) < 1e-5


# ----------------------------------------------------------------------------------------------
# resumable runs record the exclusion
# ----------------------------------------------------------------------------------------------

def test_resume_refuses_a_different_exclusion(stores, tmp_path):
    root, _ = stores
    out = tmp_path / "run.zarr"
    base = ["sample", "--store", root / "full.zarr", "--n", 2, "--seed", 1, "--steps", 3, "--patch-size", 3,
            "--out", out]
    assert run(*base, "--exclude", root / "gone.txt").exit_code == 0
    import zarr
    rec = dict(zarr.open_group(str(out), mode="r").attrs)["exclusion"]
    assert rec["count"] == 3 and len(rec["sha256"]) == 64 and rec["label"] is None
    # the same ids in another form resume; another exclusion, a label filter or none is refused
    (tmp_path / "same.txt").write_text("11\n5\n2\n5\n")
    assert run(*base, "--exclude", tmp_path / "same.txt").exit_code == 0
    for other in (["--exclude", root / "gone.npy", "--exclude-label", 0], ["--label", 1], []):
        res = run(*base, *other)
        assert res.exit_code == 2 and "exclusion" in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "text", "float-npy", "range", "negative", "label-unknown",
                                  "label-name", "no-labels", "exclude-label-no-labels", "everything", "network",
                                  "empty-text", "empty-npy"])
@pytest.mark.parametrize("verb", ["denoise", "sample", "attribute"])
def test_bad_exclusion_one_line_exit_2(stores, tmp_path, case, verb):
    root, _ = stores
    (tmp_path / "text.txt").write_text("3\nfour\n")
    (tmp_path / "range.txt").write_text(f"{N}\n")
    (tmp_path / "neg.txt").write_text("-1\n")
    np.save(tmp_path / "f.npy", np.array([1.5]))
    (tmp_path / "empty.txt").write_text("\n")
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int64))
    np.save(tmp_path / "z.npy", np.zeros((1, *SHAPE), np.float32))
    store = root / ("plain.zarr" if case in ("no-labels", "exclude-label-no-labels") else "full.zarr")
    opts = {"missing": ["--exclude", tmp_path / "none.txt"], "text": ["--exclude", tmp_path / "text.txt"],
            "float-npy": ["--exclude", tmp_path / "f.npy"], "range": ["--exclude", tmp_path / "range.txt"],
            "negative": ["--exclude", tmp_path / "neg.txt"], "label-unknown": ["--label", 7],
            "label-name": ["--exclude-label", "zebra"], "no-labels": ["--label", 1],
            "exclude-label-no-labels": ["--exclude-label", 1], "everything": ["--exclude-label", "0,1", "--label", 1],
            "network": ["--exclude", root / "gone.txt", "--denoiser", "network"],
            "empty-text": ["--exclude", tmp_path / "empty.txt"], "empty-npy": ["--exclude", tmp_path / "empty.npy"]}[case]
    if case == "network" and verb == "attribute":
        pytest.skip("attribute has no --denoiser (PSPC-Square only)")
    out = tmp_path / ("out.npy" if verb != "attribute" else "p.png")
    args = {"denoise": ["--t", 0.3, "--out", out], "sample": ["--n", 1, "--steps", 2, "--out", out],
            "attribute": ["--z", tmp_path / "z.npy", "--t", 0.3, "--panel", out]}[verb]
    res = run(verb, "--store", store, *args, *opts)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# self-verifying attribution
# ----------------------------------------------------------------------------------------------

def planted_store(root, n=30):
    """Random images plus one planted image far from them (smooth, bright): the one a query near it uses."""
    rng = np.random.RandomState(9)
    images = rng.randint(0, 120, (n, *SHAPE)).astype(np.uint8)
    images[13] = np.linspace(150, 255, 49).reshape(SHAPE).astype(np.uint8)
    return write_store(root, images)


@pytest.mark.parametrize("t", [0.05, 0.4])
def test_verify_api_planted_image_dominates(tmp_path, t):
    store = planted_store(tmp_path / "p.zarr")
    data = store.training_set()
    den = PSPCSquare(data, patch_size=3)
    z = data.get(torch.tensor([13])) + t * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    ranking, shares, _ = attribute(den, z, t, top=3)
    assert ranking[0][0]["index"] == 13
    rep, cf = verify_attribution(lambda d: PSPCSquare(d, patch_size=3), data, shares, 1, z, t=t, draws=5, seed=0)
    v = rep[0]
    assert v["removed"] == [13] and 13 not in sum(v["random_removed"], [])
    assert len(v["change_random"]) == 5 and v["change_top_rel"] > 0.5
    assert v["change_top"] > 5 * max(v["change_random"])
    # at t = 0.05 the random images have no weight at all: removing them changes nothing, and ratio is None
    assert (v["ratio"] is None) == (t == 0.05) and (v["ratio"] is None or v["ratio"] > 5)
    # the counterfactual is the denoiser without image 13 (and its flip)
    np.testing.assert_allclose(cf, PSPCSquare(data.without([13]), patch_size=3)(z, t), atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_trajectory_settings_detect_the_solver(solver):
    store_images = torch.from_numpy(np.random.RandomState(2).randint(0, 256, (10, *SHAPE)).astype(np.uint8))
    from pspc_index.store import TrainingSet
    den = PSPCSquare(TrainingSet(store_images), patch_size=3)
    _, traj = pf_ode_sample(den, initial_noise(0, range(2), SHAPE), 6, solver, record=True)
    assert trajectory_settings(traj.ts, traj.z, traj.denoised) == (6, solver)
    with pytest.raises(UserError, match="Karras"):
        trajectory_settings(traj.ts * 2, traj.z, traj.denoised)


def test_attribute_verify_trajectory_cli(tmp_path):
    # with s = H the sampler is the empirical denoiser: each sample is a training image, which dominates it
    planted_store(tmp_path / "p.zarr")
    rec = tmp_path / "s.npy"
    assert run("sample", "--store", tmp_path / "p.zarr", "--n", 2, "--seed", 3, "--steps", 6, "--patch-size", 7,
               "--out", rec, "--record").exit_code == 0
    res = run("attribute", "--store", tmp_path / "p.zarr", "--trajectory", tmp_path / "s.trajectory.npz",
              "--patch-size", 7, "--top", 3, "--verify", 1, "--json", "--panel", tmp_path / "panel.png")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output.splitlines()[0])
    assert len(rep["verify"]) == len(rep["queries"]) == 2
    for q, v in zip(rep["queries"], rep["verify"]):
        assert {"removed", "change_top", "change_top_rel", "change_random", "change_random_rel",
                "change_random_mean", "ratio", "random_removed", "norm"} <= set(v)
        assert v["removed"] == [q[0]["index"]] and len(v["change_random"]) == 5
        assert v["change_top"] >= max(v["change_random"]) and v["change_top_rel"] > 0.1
    assert (tmp_path / "panel.png").exists()
    # the counterfactual regenerates exactly what a store without the top image samples from the same noise
    data = ImageStore.open(tmp_path / "p.zarr").training_set()
    removed = rep["verify"][0]["removed"]
    want = pf_ode_sample(PSPCSquare(data.without(removed), patch_size=7), initial_noise(3, [0], SHAPE), 6)
    x = np.load(rec)
    assert np.linalg.norm(want.numpy()[0] - x[0]) == pytest.approx(rep["verify"][0]["change_top"], abs=1e-4)


def test_attribute_verify_text_and_image_query(tmp_path):
    planted_store(tmp_path / "p.zarr")
    x = ImageStore.open(tmp_path / "p.zarr").images[13:14]
    np.save(tmp_path / "x.npy", x)
    res = run("attribute", "--store", tmp_path / "p.zarr", "--image", tmp_path / "x.npy", "--t", 0.05,
              "--patch-size", 3, "--top", 2, "--verify", 1, "--verify-draws", 3)
    assert res.exit_code == 0, res.output
    assert "without its top 1: change" in res.output and "over 3 draws" in res.output
    res = run("attribute", "--store", tmp_path / "p.zarr", "--image", tmp_path / "x.npy", "--t", 0.05,
              "--verify", 30)
    assert res.exit_code == 2 and "--verify 30" in res.output


def test_attribute_refuses_a_trajectory_sampled_over_another_set(stores, tmp_path):
    """A recorded trajectory carries the store hash and exclusion of its sample run; attribute accepts the
    same (in any form) and refuses another exclusion, none, or another store with one line, exit 2."""
    root, _ = stores
    out = tmp_path / "s.npy"
    assert run("sample", "--store", root / "full.zarr", "--n", 2, "--seed", 1, "--steps", 3, "--patch-size", 3,
               "--out", out, "--record", "--exclude", root / "gone.txt").exit_code == 0
    traj = tmp_path / "s.trajectory.npz"
    base = ["attribute", "--trajectory", traj, "--top", 2, "--patch-size", 3]
    res = run(*base, "--store", root / "full.zarr", "--exclude", root / "gone.npy")
    assert res.exit_code == 0, res.output
    for other in (["--store", root / "full.zarr"], ["--store", root / "full.zarr", "--label", 1],
                  ["--store", root / "ids.zarr"]):
        res = run(*base, *other)
        assert res.exit_code == 2 and "was sampled" in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    res = run(*base, "--store", root / "full.zarr")  # the exclusions in words, not as records
    assert "excluded images" in res.output and "this run has no exclusion" in res.output, res.output


def test_console_usage_errors_are_one_line_exit_2():
    """The entry point turns click's usage errors (an integer option given text, an unknown option) into one
    line on stderr and exit 2, as every other bad input."""
    import subprocess
    import sys
    for args in (["sample", "--n", "ten", "--store", "x.zarr", "--out", "o.npy"], ["--bogus"]):
        res = subprocess.run([sys.executable, "-m", "pspc_index.cli", *args], capture_output=True, text=True)
        assert res.returncode == 2 and res.stdout == "", res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pspc-index: error:"), res.stderr
