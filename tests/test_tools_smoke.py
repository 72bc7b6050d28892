"""Tiny smoke runs of the benchmark and evaluation tools (the real runs are documented in README/docs)."""
import json
import subprocess
import sys
from pathlib import Path

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


def test_attribution_check_tiny():
    out = json.loads(run_tool("tools/attribution_check.py", "--n-data", 40, "--samples", 2, "--subsets", 2,
                              "--steps", 4))
    assert out["samples"] == 2 and out["mse_change_top"] >= 0


def test_evaluate_quick(tmp_path):
    run_tool("tools/evaluate.py", "--quick", "--out", tmp_path)
    assert (tmp_path / "results.md").exists()


def test_bench_index_tiny(tmp_path):
    out = json.loads(run_tool("tools/bench_index.py", "--n-data", 100, "--batch", 2, "--k", 16, "--ms", 32,
                              "--ts", "12", "--recall-positions", 2, "--markdown", tmp_path / "t.md"))
    assert len(out["rows"]) == 4 and all(r["mse_vs_exact"] < 0.1 for r in out["rows"])
    assert all(0 <= r["recall_at_k"] <= 1 for r in out["rows"]) and (tmp_path / "t.md").exists()


def test_bench_sampling_tiny():
    out = json.loads(run_tool("tools/bench_sampling.py", "--n", 2, "--batch", 2, "--steps", 3, "--n-data", 60,
                              "--exact-n", 1, "--loop-n-data", 20, "--k", 8, "--m", 16))
    assert out["retrieval"]["samples"] == 2 and out["exact"]["samples"] == 1
    assert out["naive_loop"]["seconds_per_sample_scaled"] > 0 and out["speedup_vs_loop"]["retrieval"] > 0


def test_attribution_agreement_tiny():
    out = json.loads(run_tool("tools/attribution_agreement.py", "--n-data", 60, "--n", 2, "--ts", "0.05",
                              "--k", 16, "--m", 32, "--top", 3))
    assert len(out["rows"]) == 2 and all(0 <= r["overlap_mean"] <= 1 for r in out["rows"])
