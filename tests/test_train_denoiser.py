"""tools/train_denoiser.py: the sigma mixture against naive float64 formulas, fine-tuning from a checkpoint,
a killed run resumed bit for bit, and the refusals (one line, exit 2). Toy data (20 images 8x8), seconds."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train_denoiser", ROOT / "tools" / "train_denoiser.py")
td = importlib.util.module_from_spec(spec)
spec.loader.exec_module(td)

TOY = ("--model-channels", "4", "--channel-mult", "1,2", "--batch", "4", "--log-every", "2", "--no-bf16",
       "--save-minutes", "0", "--minutes", "10")


@pytest.fixture
def toy(tmp_path):
    np.save(tmp_path / "toy.npy", np.random.default_rng(0).integers(0, 256, (20, 1, 8, 8), dtype=np.uint8))
    return tmp_path


def run(toy: Path, out: str, *args):
    torch.set_num_threads(1)
    td.main(["--data", str(toy / "toy.npy"), "--out", str(toy / out), *args])


def weights(stem: Path) -> dict:
    return load_file(f"{stem}.safetensors")


def naive_tail(t: float, frac: float, lo: float, hi: float) -> float:
    """P(sigma > t) of the mixture by trapezoid integration of the lognormal density in float64."""
    u = np.linspace(math.log(t), td.P_MEAN + 12 * td.P_STD, 200_001)
    pdf = np.exp(-0.5 * ((u - td.P_MEAN) / td.P_STD) ** 2) / (td.P_STD * math.sqrt(2 * math.pi))
    lognormal = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(u)))
    uniform = float(np.clip((math.log(hi) - math.log(t)) / (math.log(hi) - math.log(lo)), 0, 1))
    return (1 - frac) * lognormal + frac * uniform


def kill_at_step(monkeypatch, step: int) -> None:
    """Make training raise KeyboardInterrupt during `step` (its EMA update), as a kill would."""
    calls, real = [0], td.ema_update

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        real(*a, **k)
    monkeypatch.setattr(td, "ema_update", dying)


def test_sigma_lognormal_stream_unchanged():
    """uniform_frac = 0 draws exactly the shipped recipe's exp(randn P_std + P_mean), from the same stream."""
    a = td.sample_sigma(1000, torch.Generator().manual_seed(3))
    b = (torch.randn(1000, generator=torch.Generator().manual_seed(3)) * td.P_STD + td.P_MEAN).exp()
    assert torch.equal(a, b)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_sigma_mixture_matches_its_tail(frac):
    """Empirical P(sigma > t) of 200,000 draws within the DKW bound (1e-6 failure) of the naive integral,
    and sigma_tail equal to that integral; the log-uniform part stays inside [sigma_min, sigma_max]."""
    n, lo, hi = 200_000, 0.002, 80.0
    s = td.sample_sigma(n, torch.Generator().manual_seed(1), uniform_frac=frac, sigma_min=lo, sigma_max=hi).double()
    dkw = math.sqrt(math.log(2 / 1e-6) / (2 * n))
    for t in (0.005, 0.1, 1.0, 5.0, 20.0, 50.0, 79.0):
        exact = naive_tail(t, frac, lo, hi)
        assert td.sigma_tail(t, frac, lo, hi) == pytest.approx(exact, abs=1e-9)
        assert abs(float((s > t).double().mean()) - exact) < dkw
    if frac == 1.0:
        assert float(s.min()) >= lo and float(s.max()) <= hi
    assert td.sigma_tail(hi, 1.0, lo, hi) == 0.0 and td.sigma_tail(lo, 1.0, lo, hi) == 1.0


def test_init_with_no_steps_is_the_checkpoint(toy):
    """A fine-tune of 0 steps writes the --init weights unchanged, with its provenance in the json."""
    run(toy, "base", *TOY, "--max-steps", "3")
    run(toy, "ft", "--init", str(toy / "base"), "--uniform-frac", "0.3", "--max-steps", "0", "--no-bf16")
    a, b = weights(toy / "base"), weights(toy / "ft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((toy / "ft.json").read_text())["meta"]
    assert meta["init"]["path"] == str(toy / "base") and meta["init"]["images_seen"] == 12
    assert meta["uniform_frac"] == 0.3 and meta["complete"] and meta["steps"] == 0


def test_killed_run_resumes_bit_for_bit(toy, monkeypatch):
    """A fine-tune killed after 3 of 6 steps and started again ends with the same weights and loss log as
    one run straight through; the resume file is gone afterwards."""
    run(toy, "base", *TOY, "--max-steps", "2")
    ft = ("--init", str(toy / "base"), "--uniform-frac", "0.5", "--batch", "4", "--log-every", "2", "--no-bf16",
          "--save-minutes", "0", "--max-steps", "6")
    run(toy, "straight", *ft)
    kill_at_step(monkeypatch, 4)  # the kill arrives during step 4, after step 3's save
    with pytest.raises(KeyboardInterrupt):
        run(toy, "killed", *ft)
    assert (toy / "killed-resume.pt").exists()
    assert json.loads((toy / "killed.json").read_text())["meta"]["steps"] == 3
    monkeypatch.undo()
    run(toy, "killed", *ft)
    a, b = weights(toy / "straight"), weights(toy / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (toy / "killed-resume.pt").exists()

    def log(name):
        return [(r.split(",")[0], r.split(",")[3]) for r in (toy / f"{name}-loss.csv").read_text().splitlines()]
    assert log("straight") == log("killed") and len(log("straight")) == 4  # header + steps 2, 4, 6
    meta = json.loads((toy / "killed.json").read_text())["meta"]
    assert meta["steps"] == 6 and meta["images_seen"] == 24 and meta["complete"]


@pytest.mark.parametrize("args, says", [
    (("--init", "{d}/base", "--out", "{d}/base"), "is the --init checkpoint"),
    (("--init", "{d}/base.json", "--out", "{d}/base"), "is the --init checkpoint"),
    (("--init", "{d}/base", "--out", "{d}/x", "--model-channels", "8"), "drop --model-channels"),
    (("--out", "{d}/base"), "exists; pass --overwrite"),
    (("--out", "{d}/x", "--uniform-frac", "1.5"), "--uniform-frac must be in [0, 1]"),
    (("--out", "{d}/x", "--sigma-min", "0"), "need 0 < --sigma-min < --sigma-max"),
])
def test_refusals(toy, capsys, args, says):
    run(toy, "base", *TOY, "--max-steps", "1")
    before = weights(toy / "base")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        td.main(["--data", str(toy / "toy.npy"), *TOY[:-4], *(a.format(d=toy) for a in args)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1
    after = weights(toy / "base")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_other_settings_refused(toy, capsys, monkeypatch):
    """A resume file written with one --uniform-frac is not continued with another."""
    kill_at_step(monkeypatch, 2)  # killed during step 2, after step 1's save
    with pytest.raises(KeyboardInterrupt):
        run(toy, "k", *TOY, "--max-steps", "4")
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(toy, "k", *TOY, "--max-steps", "4", "--uniform-frac", "0.2")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "written with other settings (uniform_frac)" in err
