"""Tiny smoke runs of the benchmark and evaluation tools (the real runs are documented in README/docs)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pspc_index.schedule import read_schedule_json
from pspc_index.store import TrainingSet

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args, timeout=240):
    res = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_bench_exact_quick():
    out = json.loads(run_tool("tools/bench_exact.py", "--quick", "--sizes", "3,12", "--sections", "loop,samples"))
    loop = [r for r in out["rows"] if r["section"] == "loop"]
    assert len(loop) == 2 and all(r["max_abs_diff"] < 1e-5 and r["floor_s"] >= 0 for r in loop)
    assert [r["finite"] for r in out["rows"] if r["section"] == "samples"] == [True]


def test_attribution_check_tiny(tmp_path):
    args = ("tools/attribution_check.py", "--n-data", 40, "--samples", 3, "--steps", 4, "--remove", 2,
            "--state", tmp_path / "st")
    out = json.loads(run_tool(*args))
    assert out["samples"] == 3 and len(out["ratio_per_sample"]) == 3 and out["change_top_median"] > 0
    assert json.loads(run_tool(*args)) == out  # a rerun reads the kept stages


def test_evaluate_quick_extended_on_its_state(tmp_path):
    """Every section at toy sizes; the counts raised (and the lambda grid widened) on the first run's state reuse
    its units (prefix-stable draws) and run only the new ones; another fixed setting is refused with one line,
    exit 2."""
    small = ("--n-z", 2, "--n-z-study", 2, "--n-z-lam", 2, "--n-rev", 2, "--n-samples", 2, "--n-z-els-check", 2)
    common = ("tools/evaluate.py", "--quick", "--threads", 1, "--batch", 2, "--out", tmp_path)
    run_tool(*common, *small, "--lam-grid", "0.5,1", "--skip", "cost,identity,els_subset", timeout=300)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval_state").glob("*.pt")}
    assert {"fwd_t00_network_0-2.pt", "rev_traj_0-2.pt", "smp_pspc-flex_0-2.pt", "fwd_t07_lam0.5_0-2.pt"} <= set(first)
    run_tool(*common, timeout=300)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval_state").glob("*.pt")}
    assert all(after[k] == v for k, v in first.items())  # reused, not recomputed
    assert {"fwd_t00_network_2-4.pt", "rev_traj_2-4.pt", "smp_pspc-flex_2-4.pt", "cost_els.pt"} <= set(after)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["setup"]["n_z"] == 4 and len(res["samples"]["cos_features"]) == 7
    assert res["samples"]["cos_features"][0][0] == pytest.approx(1.0)
    md = (tmp_path / "results.md").read_text()
    assert "stand-in for the paper's SSCD" in md and "## 6. Schedules tuned on forward z" in md
    tuned = read_schedule_json(tmp_path / "tuned_schedule.json")
    assert tuned.name == "fashion-mnist-tuned" and len(res["tuned"]["rows"]) >= 1
    assert {r["i"] for r in res["tuned"]["rows"]} == set(json.loads((tmp_path / "tuned_schedule.json").read_text())
                                                         ["meta"]["tuned_grid_indices"])
    bad = subprocess.run([sys.executable, *map(str, common), "--seed", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "seed 0 -> 1" in bad.stderr
    bad = subprocess.run([sys.executable, *map(str, common), "--network", "data/network/fmnist-unet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # another reference network: another state
    assert bad.returncode == 2 and "network data/network/fmnist-unet-ft -> data/network/fmnist-unet" in bad.stderr


def test_evaluate_out_file_refused(tmp_path):
    (tmp_path / "f.npy").write_bytes(b"keep")
    res = subprocess.run([sys.executable, "tools/evaluate.py", "--quick", "--out", str(tmp_path / "f.npy")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "is a file" in res.stderr
    assert (tmp_path / "f.npy").read_bytes() == b"keep"


def test_evaluate_forward_z_prefix_stable():
    """The first n forward z of a grid t are the same for any count (so raised counts reuse units)."""
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    ev_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev_mod)
    args = SimpleNamespace(quick=True, out="/nonexistent", state=None, n_z=3, seed=0, n_data=200)
    ev = ev_mod.Eval(args)
    g = torch.Generator().manual_seed(0)
    ev.data = TrainingSet(torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=g), xflip=True)
    t, z3 = ev.forward_z(9)
    _, z7 = ev.forward_z(9, 7)
    _, z7_other = ev.forward_z(10, 7)
    assert t == float(ev.grid[9]) and z3.shape == (3, 1, 28, 28) and torch.equal(z7[:3], z3)
    assert not torch.equal(z7_other[:3] / float(ev.grid[10]), z3 / t)


def test_train_classifier_tiny(tmp_path):
    out = json.loads(run_tool("tools/train_classifier.py", "--n-train", 300, "--n-test", 200, "--epochs", 1,
                              "--out", tmp_path / "c"))
    assert out["n_train"] == 300 and out["n_test"] == 200 and 0 <= out["test_accuracy"] <= 1
    assert (tmp_path / "c.safetensors").exists() and (tmp_path / "c.json").exists()


def test_bench_sampling_tiny():
    out = json.loads(run_tool("tools/bench_sampling.py", "--n", 2, "--batch", 2, "--steps", 3, "--n-data", 60,
                              "--exact-n", 1, "--loop-n-data", 20, "--k", 8, "--m", 16))
    assert out["retrieval"]["samples"] == 2 and out["exact"]["samples"] == 1
    assert out["naive_loop"]["seconds_per_sample_scaled"] > 0 and out["speedup_vs_loop"]["retrieval"] > 0


def test_attribution_agreement_tiny():
    out = json.loads(run_tool("tools/attribution_agreement.py", "--n-data", 60, "--n", 2, "--ts", "0.05",
                              "--k", 16, "--m", 32, "--top", 3))
    assert len(out["rows"]) == 2 and all(0 <= r["overlap_mean"] <= 1 for r in out["rows"])


def test_bench_scale_fashion_mnist_tiny(tmp_path):
    """The scale run's Fashion-MNIST source (shifted, flipped copies) end to end, certified routing at t."""
    res = subprocess.run([sys.executable, "tools/bench_scale.py", "--source", "fashion-mnist", "--n", "400", "--s", "3",
                          "--t", "0.06,0.002", "--tol", "1e-3", "--nlist", "4", "--dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["generate"]["images"] == 400 and out["build"]["bundle_bytes"] > 0
    assert [row["t"] for row in out["query"]["rows"]] == [0.06, 0.002]
    for row in out["query"]["rows"]:
        assert row["bound_holds"] == 1.0 and row["max_abs_vs_exact"] <= 1e-3 + 4e-6 and row["certified"]
        assert abs(sum(row["fractions"].values()) - 1) < 1e-9 and row["certificate"] == "projection cells"
