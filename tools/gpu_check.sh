#!/usr/bin/env bash
# One prepared GPU check (under 5 minutes on one H200): the exact kernel's tests on CUDA, then the exact
# engine at full Fashion-MNIST scale (N = 60,000 + flips, B = 64, every s of the schedule) and 64 exact
# samples, printed as a markdown table for the README. Usage: bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0))"
python -m pytest -q tests/test_cuda.py tests/test_denoisers.py -x
python - <<'PY'
import time, torch
from pspc_index.denoisers import PSPCSquare
from pspc_index.ingest import read_source
from pspc_index.sampler import sample
from pspc_index.schedule import default_schedule
from pspc_index.store import TrainingSet

data = TrainingSet(torch.from_numpy(read_source("fashion-mnist").images.copy())).to("cuda")
sched = default_schedule(28, 28)
firsts = {}
for i, s in enumerate(sched.patch_sizes):
    firsts.setdefault(int(s), float(sched.grid[i]))
g = torch.Generator().manual_seed(0)
print("| s | t | cold s | warm s | peak GPU GB |\n|---|---|---|---|---|")
for s, t in firsts.items():
    z = (data.get(torch.randint(0, len(data), (64,), generator=g).cuda())
         + t * torch.randn(64, 1, 28, 28, generator=g).cuda())
    den = PSPCSquare(data, patch_size=s)
    torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
    t0 = time.perf_counter(); den(z, t); torch.cuda.synchronize(); cold = time.perf_counter() - t0
    t0 = time.perf_counter(); den(z, t); torch.cuda.synchronize(); warm = time.perf_counter() - t0
    print(f"| {s} | {t:.4g} | {cold:.2f} | {warm:.2f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} |")
torch.cuda.synchronize(); t0 = time.perf_counter()
x = sample(PSPCSquare(data), 64, 0, steps=18, batch=64); torch.cuda.synchronize()
print(f"\n64 exact samples, 18 Euler steps, N = 120,000: {time.perf_counter() - t0:.1f} s (finite: {bool(torch.isfinite(x).all())})")
PY
