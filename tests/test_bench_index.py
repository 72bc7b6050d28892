"""Tiny smoke run of tools/bench_index.py (issue 11, item 6): two t, two samples, resumed from its state."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args):
    res = subprocess.run([sys.executable, "tools/bench_index.py", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    return res


def test_bench_index_tiny(tmp_path):
    args = ["--n-data", 60, "--batch", 2, "--k", 16, "--ts", "12,17", "--samples", 2, "--work", tmp_path / "w",
            "--recall-positions", 2, "--markdown", tmp_path / "t.md"]
    res = run_bench(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert [r["step"] for r in out["rows"]] == [12, 17] and (tmp_path / "t.md").exists()
    for r in out["rows"]:
        assert abs(sum(r["fractions"].values()) - 1) < 1e-9 and r["seconds"] > 0 and r["exact_seconds"] > 0
        # the default tol certifies every pixel: the error is within the bound (plus the kernel's rounding)
        assert r["bound_holds_with_rounding"] == 1 and r["max_abs_vs_exact"] <= 1e-3 + 4e-6
        assert 0 <= r["recall_at_k"] <= 1
    assert out["build"]["bytes"] > 0 and set(out["build"]["over_store_per_size"]) == {"3", "5", "7", "9", "13", "21"}
    assert out["sampling"]["samples"] == 2 and len(out["sampling"]["routing"]) > 0
    # resumed: every t, the build and the sampling come from the state file, unchanged; the plot from them
    again = run_bench(*args, "--plot", tmp_path / "p.png")
    assert again.returncode == 0 and json.loads(again.stdout) == out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # other settings on the same state: one line, exit 2
    other = run_bench(*args[:-2], "--k", 8)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
