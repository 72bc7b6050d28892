"""Large sampling runs: resumable zarr output, split over processes (torchrun) by batch or by crop location.

Output layout (zarr v3 group at `out_path`):
  samples   float32 [N, C, H, W], one chunk per batch along N
  ts        float64 [steps] (with record)
  z         float32 [steps, N, C, H, W] (with record), one chunk per batch
  denoised  float32 [steps, N, C, H, W] (with record), one chunk per batch
  done      uint8 [n_batches], one chunk per flag; set only after the batch's data is written
  attrs     the run settings; a rerun must match them and skips the done batches.

Each sample depends only on (seed, its index) and batches are fixed by `batch`, so any split of the
batches over processes (b % world == rank) gives the same bytes as one process. With split="locations"
every process runs every batch on its rows of crop locations (`PSPCSquare.locations`; retrieval then
loads only those rows' indices), the partial composites are summed with all-reduce, and rank 0 writes.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .outputs import SAMPLES

FORMAT = SAMPLES


def launched_distributed() -> bool:
    """True when started by torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) if launched with WORLD_SIZE > 1.
    Returns (rank, world); (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched_distributed():
        return 0, 1
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def split_range(n: int, rank: int, world: int) -> range:
    """Process rank's contiguous share of 0..n-1 (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the process group (in place; x itself when not distributed)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not x.is_cuda:  # NCCL reduces device tensors only
            y = x.cuda()
            dist.all_reduce(y)
            x.copy_(y.cpu())
        else:
            dist.all_reduce(x)
    return x


BASELINE_BYTES = 400 * 2 ** 20  # python + torch + faiss loaded, measured RSS before any work


def estimate_memory(denoiser, batch: int, steps: int, record: bool) -> int:
    """Estimated peak bytes of sampling `batch` images at once (checked against peak RSS in
    tools/bench_sampling.py). Fixed: the runtime, the training images and the index bundle (all its
    indices end up loaded). Exact calls: `posterior.exact_memory` (cached unfolded patches up to the
    cache budget, per-call queries and accumulators, one tile); retrieval works per block on query chunks
    of at most 4 CHUNK_ELEMENTS elements (~3 such tensors), fewer when the batch is small. Per sample:
    ~8 image buffers (z, D, solver state, float64 accumulators), the recorded trajectory (2 images per
    step), and with retrieval k int64 candidate ids.
    """
    from .posterior import CHUNK_ELEMENTS, exact_memory

    c, h, w = denoiser.shape
    image = 4 * c * h * w
    data = getattr(denoiser, "data", None)
    total = BASELINE_BYTES
    if data is not None:
        shapes = denoiser.crop_shapes() if hasattr(denoiser, "crop_shapes") else [(h, w)]
        draws = len(getattr(denoiser, "eps", [None]))  # CFDM denoises M perturbed copies of each query
        total += data.images.numel() + exact_memory(data, shapes, batch * draws)
    total += batch * image * (8 + (2 * steps if record else 0))
    bundle = getattr(denoiser, "bundle", None)
    if bundle is not None:
        files = bundle.manifest["files"].values()
        total += sum(f["size"] for f in files)
        n_cand = denoiser.k + (denoiser.m if denoiser.tail == "sample" else 0)
        per_query = max(n_cand * c * max((r1 - r0) * (c1 - c0), (r1 - r0 - f["s"] + 1) * (c1 - c0 - f["s"] + 1)
                                         * f["s"] ** 2) for f in files for r0, r1, c0, c1 in [f["window"]])
        total += 3 * 4 * min(batch * per_query, 4 * CHUNK_ELEMENTS) + batch * 8 * denoiser.k
    return int(total)


def fit_batch(denoiser, n: int, steps: int, record: bool, budget_bytes: float) -> int:
    """The largest batch (<= n) whose `estimate_memory` fits `budget_bytes` (the estimate grows with
    the batch, so a bisection finds it)."""
    if estimate_memory(denoiser, 1, steps, record) > budget_bytes:
        raise UserError(f"memory budget {budget_bytes / 2 ** 30:.2f} GiB is below the estimated minimum "
                        f"{estimate_memory(denoiser, 1, steps, record) / 2 ** 30:.2f} GiB for one sample")
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate_memory(denoiser, mid, steps, record) <= budget_bytes else (lo, mid - 1)
    return lo


def available_memory(device: str) -> int:
    """Bytes available now: free GPU memory on cuda, else MemAvailable from /proc/meminfo (Linux)."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise UserError("cannot read the available memory here; give --memory-gb")


def resolve_batch(batch: str, memory_gb: float | None, denoiser, n: int, steps: int, record: bool, device: str,
                  zarr_out=None) -> int:
    """`--batch` as an int. 'auto': the batch a resumed .zarr run recorded, else the largest that fits
    `memory_gb` GiB (default: half of `available_memory`), of which the exact engine's patch cache takes at
    most half. Raises UserError for a budget <= 0."""
    import zarr

    from .posterior import DEFAULT_CACHE_BUDGET, set_patch_cache_budget

    if memory_gb is not None and memory_gb <= 0:
        raise UserError(f"--memory-gb must be > 0, got {memory_gb}")
    if memory_gb is not None:  # cached patches take at most half the budget
        set_patch_cache_budget(min(DEFAULT_CACHE_BUDGET, int(memory_gb * 2 ** 30 / 2)))
    if batch != "auto":
        return int(batch)
    if zarr_out is not None and Path(zarr_out).exists():
        try:
            return int(zarr.open_group(str(zarr_out), mode="r").attrs["batch"])
        except Exception:
            pass  # not a sample run: sample_to_zarr reports it
    budget = memory_gb * 2 ** 30 if memory_gb is not None else available_memory(device) / 2
    return fit_batch(denoiser, n, steps, record, budget)


def run_meta(store_sha256: str, denoiser: str, xflip: bool, patch_size, schedule, retrieval: dict | None,
             default_tail: str = "sample", **extra) -> dict:
    """What a resumable sample run records of its denoiser, so a resume with other settings is refused
    and one with the same settings, however written, is not.
    store_sha256: the store's content hash as read now (ImageStore.sha256), so a resume on pixels edited
    in place is refused too. schedule: give the resolved name (the default for the resolution written
    out). Recorded resolved: the paths (index_path, and network / heatmaps in extra) as absolute paths
    (a network checkpoint by its stem: x, x.json and x.safetensors are one), and with an index the tail
    (None: `default_tail`); without an index the tail does not apply and is recorded as None, and the
    certificate is left out.
    extra: further settings, None ones left out (e.g. exclusion=`counterfactual.Exclusion.record()`: a run
    without exclusion records none, as runs made before it)."""
    r = dict(retrieval or {})
    if r.get("index_path") is not None:
        r["index_path"] = str(Path(r["index_path"]).resolve())
        r["tail"] = r.get("tail") or default_tail
    else:  # without an index neither the tail nor the certificate applies (runs before it recorded none)
        if "tail" in r:
            r["tail"] = None
        r.pop("certificate", None)
        r.pop("no_skip", None)
    meta = {"denoiser": denoiser, "xflip": xflip, "patch_size": patch_size, "schedule": schedule,
            "store_sha256": store_sha256, "retrieval": r}
    if extra.get("network") is not None:
        from .network import _stem
        extra["network"] = str(_stem(Path(extra["network"]).resolve()))
    if extra.get("heatmaps") is not None:
        extra["heatmaps"] = str(Path(extra["heatmaps"]).resolve())
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _settings(denoiser, n, seed, steps, solver, batch, record, meta) -> dict:
    s = {"format": FORMAT, "n": int(n), "seed": int(seed), "steps": int(steps), "solver": solver,
         "batch": int(batch), "record": bool(record), "shape": [int(v) for v in denoiser.shape],
         "denoiser": type(denoiser).__name__}
    s.update(meta or {})
    return s


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v


def _create(out: Path, settings: dict, shape, n_batches: int) -> None:
    """Make the empty group under a temporary name and rename it into place (another process that
    got there first wins; its group is then checked like any existing one)."""
    import zarr
    from .schedule import karras_grid

    n, steps, batch = settings["n"], settings["steps"], settings["batch"]
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.create_array("samples", shape=(n, *shape), dtype="float32", chunks=(batch, *shape), fill_value=0)
        if settings["record"]:
            root.create_array("ts", data=karras_grid(steps).numpy())
            for name in ("z", "denoised"):
                root.create_array(name, shape=(steps, n, *shape), dtype="float32",
                                  chunks=(steps, batch, *shape), fill_value=0)
        root.create_array("done", shape=(n_batches,), dtype="uint8", chunks=(1,), fill_value=0)
        root.attrs.update({k: _jsonable(v) for k, v in settings.items()})
        try:
            tmp.rename(out)
        except OSError:
            if not out.exists():
                raise
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


def _open_checked(out: Path, settings: dict):
    """Open an existing sample group and check its settings match; UserError (one line) if not."""
    import zarr

    try:
        root = zarr.open_group(str(out), mode="r+")
        attrs = dict(root.attrs)
    except Exception as e:
        raise UserError(f"{out}: exists and is not a readable zarr group ({type(e).__name__})") from None
    if attrs.get("format") != FORMAT or "done" not in root:
        raise UserError(f"{out}: exists and is not a resumable sample run; remove it or choose another --out")
    want = {k: _jsonable(v) for k, v in settings.items()}
    if attrs.get("store_sha256") != want.get("store_sha256"):
        raise UserError(f"{out}: was sampled from store content {str(attrs.get('store_sha256'))[:12]}, the store "
                        f"now holds {str(want.get('store_sha256'))[:12]} (changed since); choose another --out")
    diff = [k for k in sorted(set(want) | set(attrs)) if attrs.get(k) != want.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"{out}: was started with different settings ({k}={attrs.get(k)!r}, now {want.get(k)!r}); "
                        "rerun with the same arguments or choose another --out")
    return root


def sample_to_zarr(denoiser, out_path, n: int, seed: int, steps: int = 18, solver: str = "euler",
                   batch: int = 64, record: bool = False, progress: bool = True, rank: int | None = None,
                   world: int | None = None, meta: dict | None = None, split: str = "samples"):
    """Draw samples 0..n-1 of the run seeded `seed` into a resumable zarr group at `out_path`.

    Process `rank` of `world` takes batches b with b % world == rank (rank/world default to the
    torch.distributed group if one is initialized, else 0/1). Batches already flagged done are skipped.
    Returns all samples as float32 numpy [N, C, H, W] once every batch is done, else None."""
    from tqdm import tqdm
    from .sampler import initial_noise, pf_ode_sample

    if n <= 0 or batch <= 0 or steps < 2:
        raise UserError(f"need n > 0, batch > 0 and steps >= 2, got n={n}, batch={batch}, steps={steps}")
    if solver not in ("euler", "heun"):
        raise UserError(f"unknown solver {solver!r}; use euler or heun")
    dist = _dist()
    if rank is None:
        rank = dist.get_rank() if dist else 0
    if world is None:
        world = dist.get_world_size() if dist else 1
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if split not in ("samples", "locations"):
        raise UserError(f"unknown split {split!r}; use samples or locations")
    by_location = split == "locations" and world > 1
    if by_location and getattr(denoiser, "locations", None) != (rank, world):
        raise UserError("--split locations needs the pspc-square denoiser with its locations set to (rank, world)")
    out = Path(out_path)
    shape = tuple(int(v) for v in denoiser.shape)
    settings = _settings(denoiser, n, seed, steps, solver, batch, record, meta)
    n_batches = -(-n // batch)

    # 1. rank 0 creates (or checks) the group; the others wait, then open it
    err = None
    if rank == 0 or dist is None:
        try:
            if not out.exists() or not any(out.iterdir()):
                _create(out, settings, shape, n_batches)
            _open_checked(out, settings)
        except UserError as e:
            err = str(e)
    if dist is not None:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise UserError(err)
    root = _open_checked(out, settings)

    # 2. this process's batches that are not done yet, written as they finish, flag after data
    done = np.asarray(root["done"][...])
    mine = list(range(n_batches)) if by_location else list(range(rank, n_batches, world))
    writer = rank == 0 or not by_location
    todo = [b for b in mine if not done[b]]
    size = lambda b: min(batch, n - b * batch)  # noqa: E731
    bar = tqdm(total=sum(size(b) for b in mine), initial=sum(size(b) for b in mine if done[b]), unit="img",
               disable=not progress or not writer, file=sys.stderr,
               desc=f"rank {rank}" if world > 1 and not by_location else None,
               dynamic_ncols=True)
    device = getattr(denoiser, "device", "cpu")
    try:
        for b in todo:
            lo, hi = b * batch, b * batch + size(b)
            z = initial_noise(seed, range(lo, hi), shape).to(device)
            res = pf_ode_sample(denoiser, z, steps, solver, record)
            x = res[0] if record else res
            if not writer:
                continue
            root["samples"][lo:hi] = x.detach().cpu().numpy().astype(np.float32)
            if record:
                root["z"][:, lo:hi] = res[1].z.numpy().astype(np.float32)
                root["denoised"][:, lo:hi] = res[1].denoised.numpy().astype(np.float32)
            root["done"][b] = 1
            bar.update(hi - lo)
    finally:
        bar.close()

    # 3. everyone finished -> the full result (each rank may read it; rank 0 writes pictures)
    if dist is not None:
        dist.barrier()
    if not np.asarray(root["done"][...]).all():
        return None
    return np.asarray(root["samples"][...])
