#!/usr/bin/env bash
# One prepared GPU check (under 5 minutes on one H200), printed as markdown for the README:
#  1. every denoiser and the attribution paths on CUDA against the CPU float64 path (tests/test_cuda.py);
#  2. the exact engine at full Fashion-MNIST scale (N = 60,000 + flips, B = 64, every s of the schedule);
#  3. 64 exact samples (18 Euler steps), recorded;
#  4. attribution of one of them over its trajectory with the top-6 maps and `--verify 10` (2 random
#     draws): the API work of `pspc-index attribute --trajectory --top 6 --verify 10 --panel`;
#  5. the top-10 removal check over 64 samples (tools/attribution_check.py --device cuda);
#  6. the retrieval path on CUDA against the exact engine (where faiss is installed: faiss-gpu searches on the
#     GPU, faiss-cpu on the CPU), 5,000 images, s = 3.
# A failing CUDA test stops it (exit 3): timings of wrong code are not worth the device time.
# Usage: bash tools/gpu_check.sh [--engine]   (--engine: parts 1-3 only, under a minute)
set -uo pipefail
cd "$(dirname "$0")/.."
ENGINE_ONLY=0
[ "${1:-}" = "--engine" ] && ENGINE_ONLY=1
python -c "import torch, pspc_index; assert torch.cuda.is_available(), 'no CUDA'
print('#', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 1
python -m pytest -q -p no:cacheprovider tests/test_cuda.py || { echo "**CUDA TESTS FAILED**"; exit 3; }
ENGINE_ONLY=$ENGINE_ONLY python - <<'PY'
import os, time, torch
from pspc_index.attribution import attribute_trajectory, verify_attribution
from pspc_index.denoisers import PSPCSquare
from pspc_index.ingest import read_source
from pspc_index.sampler import initial_noise, pf_ode_sample
from pspc_index.schedule import default_schedule
from pspc_index.store import TrainingSet

def clock(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); out = fn(); torch.cuda.synchronize()
    return out, time.perf_counter() - t0

data = TrainingSet(torch.from_numpy(read_source("fashion-mnist").images.copy())).to("cuda")
sched = default_schedule(28, 28)
firsts = {}
for i, s in enumerate(sched.patch_sizes):
    firsts.setdefault(int(s), float(sched.grid[i]))
g = torch.Generator().manual_seed(0)
print("\n| s | t | cold s | warm s | peak GPU GiB |\n|---|---|---|---|---|")
for s, t in firsts.items():
    z = (data.get(torch.randint(0, len(data), (64,), generator=g).cuda())
         + t * torch.randn(64, 1, 28, 28, generator=g).cuda())
    den = PSPCSquare(data, patch_size=s)
    torch.cuda.reset_peak_memory_stats()
    cold = clock(lambda: den(z, t))[1]
    warm = clock(lambda: den(z, t))[1]
    print(f"| {s} | {t:.4g} | {cold:.3f} | {warm:.3f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} |")
z0 = initial_noise(0, range(64), data.shape).cuda()
(x, traj), sec = clock(lambda: pf_ode_sample(PSPCSquare(data), z0, 18, record=True))
print(f"\n64 exact samples, 18 Euler steps, N = 120,000: {sec:.1f} s (finite: {bool(torch.isfinite(x).all())})")
if os.environ["ENGINE_ONLY"] == "1":
    raise SystemExit
(_, shares, tm), sec_a = clock(lambda: attribute_trajectory(PSPCSquare(data), traj.ts, traj.z[:, :1], top=6, maps=True))
(rep, _), sec_v = clock(lambda: verify_attribution(PSPCSquare, data, shares, 10, z0[:1].cpu(), steps=18,
                                                    original=x[:1].cpu(), draws=2))
print(f"one sample's trajectory attribution with top-6 maps: {sec_a:.1f} s; --verify 10 (2 random draws): "
      f"{sec_v:.1f} s; ratio top/random {rep[0]['ratio']:.1f}")
PY
[ $ENGINE_ONLY = 1 ] && exit 0
python tools/attribution_check.py --device cuda --samples 64 | python -c "import json, sys
d = json.load(sys.stdin)
print(f\"\ntop-10 removal over {d['samples']} samples (N = 120,000): median ratio {d['ratio_median']:.1f}, \"
      f\"{100 * d['fraction_ratio_ge_5']:.0f}% >= 5x; seconds {d['seconds']}\")"
python - <<'PY'
# 6. the retrieval path with its torch maths on CUDA (FAISS on the GPU with faiss-gpu, else on the CPU)
import importlib.util, tempfile, time, torch
if importlib.util.find_spec("faiss") is None:
    print("\nretrieval: skipped (no faiss on this machine; so were tests/test_cuda.py's retrieval tests)")
    raise SystemExit
from pspc_index.denoisers import PSPCSquare
from pspc_index.index import build_bundle, faiss_has_gpu, open_bundle
from pspc_index.ingest import read_source
from pspc_index.retrieval import RetrievalPSPC
from pspc_index.store import write_store

def clock(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); out = fn(); torch.cuda.synchronize()
    return out, time.perf_counter() - t0

work = tempfile.mkdtemp()
store = write_store(f"{work}/s.zarr", read_source("fashion-mnist").images[:5000])
gpu = faiss_has_gpu()
_, build_s = clock(lambda: build_bundle(store.path, f"{work}/b", [3], kind="ivf-pq", gpu=gpu, progress=False))
data = store.training_set().to("cuda")
bundle = open_bundle(f"{work}/b", store, gpu=gpu)
print(f"\nretrieval, s = 3, 5,000 images + flips, ivf-pq (FAISS on the {'GPU' if gpu else 'CPU'}), built in "
      f"{build_s:.1f} s; B = 64, tol 1e-3:\n\n| t | hybrid s | exact s | max abs vs exact | max bound | locations by "
      "retrieval |\n|---|---|---|---|---|---|")
g = torch.Generator().manual_seed(0)
for t in (0.002, 0.06, 0.3):
    z = (data.get(torch.randint(0, len(data), (64,), generator=g).cuda())
         + t * torch.randn(64, 1, 28, 28, generator=g).cuda())
    den, exact = RetrievalPSPC(data, bundle, patch_size=3, tol=1e-3), PSPCSquare(data, patch_size=3)
    den(z[:1], t), exact(z[:1], t)  # warm-up
    (got, sec), (want, sec_e) = clock(lambda: den(z, t)), clock(lambda: exact(z, t))
    rep = den.last_report[3]
    print(f"| {t:g} | {sec:.3f} | {sec_e:.3f} | {(got - want).abs().max().item():.1e} | {rep['bound_max']:.1e} | "
          f"{rep['fractions']['retrieval']:.1%} |")
PY
