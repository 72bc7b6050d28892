"""Index bundles (DESIGN.md section 2): per patch size s and per anchor block of positions, one FAISS
index over the distinct training windows of the block's union window, with their member lists and the
cell bounds that certify retrieval.

Positions (corners of the s x s crops, grid (H-s+1) x (W-s+1)) are grouped in stride x stride blocks.
A block's union window is the region covering all its crops: (s+stride-1)^2, clipped at the border.
The uint8 store stays the one copy of pixels: retrieval rescores nothing from FAISS, it only takes ids.

Entries (duplicate-aware indices). Identical uint8 windows (per virtual image, flips included; Fashion-
MNIST's black background) are one entry with a multiplicity: identical windows give identical patch terms
at every location of the block, so one representative scored with log(count) in its logit is exact. Index
id e is entry e; its members (virtual ids, ascending) are a CSR (offsets, members), entries numbered by
their first member.

Kinds: flat (exact L2 search), sq8 (1 byte per dimension), ivf-flat / ivf-sq8 / ivf-pq (inverted
lists over nlist k-means cells, searched in nprobe of them; ivf-pq: M/2 bytes per entry, M <= pq_m).
Every kind only proposes candidates; their distances are recomputed from the store. A block with fewer
distinct windows than an IVF kind can train on (nlist, and 16 for 4-bit PQ codebooks) gets a flat index
over them (recorded as the file's "kind"); one whose k-means still collapsed gets one list (its "nlist");
a search whose probed lists hold fewer than k entries widens its probe, up to every list, so every query
gets min(k, entries) candidates.

Cell bounds (what certifies a retrieval result, `BlockEntries`): per cell L (IVF lists; the whole block for
flat kinds) the centroid mu, the radius r[L, C] = max over the cell's entries of ||x_C - mu_C|| at each crop
location C of the block (float64, rounded up), and the per-pixel range [lo, hi] of its entries. For any
query z and any entry x of the cell, ||z_C - x_C|| >= ||z_C - mu_C|| - r[L, C] (triangle inequality) and
||z_C - x_C||^2 >= sum over C's pixels of dist(z_p, [lo_p, hi_p])^2.

Bundle layout: a directory with one `s{s}_b{by}_{bx}.faiss` per (s, block) (the serialised FAISS index,
deflated: "codec": "zlib" in its record; files without a codec are read as written), its `.npz` of
entries and cell bounds (deflated), and `manifest.json` (written last), which records both files' sizes
and sha256 and per size the neighbour distances of the skip predictor (`neighbour_stats`). Files are
written under temporary names and renamed; a progress journal lets a killed build resume, skipping files
whose checksums are recorded.
Bundles of format 1 (before entries) are refused with a line asking for a rebuild.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .outputs import BUNDLE, claim

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
FORMAT = BUNDLE
FORMAT_VERSION = 2
KINDS = ("sq8", "flat", "ivf-flat", "ivf-sq8", "ivf-pq")
TRAIN_MAX = 262144  # most training points of a quantizer (k-means cells, SQ ranges, PQ codebooks)
RANKS = (1, 16, 256, 4096)  # neighbour ranks whose distances the skip predictor records per size
KMEANS_ITER = 10  # k-means iterations of IVF cells and PQ codebooks (FAISS's 25 cost 2.5x; they only propose and bound)
BOUND_MARGIN = 1e-9  # added to stored radii (float64 rounding of sums of at most 10^5 squares in [0, 4])


def blocks(h: int, w: int, s: int, stride: int) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(by, bx, (r0, r1, c0, c1)) per anchor block: the union window rows r0:r1, cols c0:c1."""
    gh, gw = h - s + 1, w - s + 1
    out = []
    for by in range((gh + stride - 1) // stride):
        for bx in range((gw + stride - 1) // stride):
            r0, c0 = by * stride, bx * stride
            r1, c1 = min(r0 + stride, gh) - 1 + s, min(c0 + stride, gw) - 1 + s
            out.append((by, bx, (r0, r1, c0, c1)))
    return out


def window_u8(data, idx: torch.Tensor, win: tuple[int, int, int, int]) -> torch.Tensor:
    """uint8 windows [*, C, r1-r0, c1-c0] of the virtual images idx, without materialising whole images
    (a flipped image's window is the mirrored window of the stored image, flipped)."""
    r0, r1, c0, c1 = win
    w = data.shape[2]
    idx = torch.as_tensor(idx, device=data.device)
    flat = idx.reshape(-1)
    stored, flip = flat % data.n_stored, flat >= data.n_stored
    out = data.images[stored, :, r0:r1, c0:c1]
    if flip.any():
        out[flip] = data.images[stored[flip], :, r0:r1, w - c1:w - c0].flip(-1)
    return out.reshape(*idx.shape, *out.shape[1:])


def block_windows(data, win: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [Nv, D] (C-contiguous): the window of every virtual image, row v = `window_u8(data, v, win)`
    flattened (D = C*wh*ww, C-major), cut by two slices of the stored images (the flipped half: the mirrored
    window, flipped), not gathered image by image."""
    r0, r1, c0, c1 = win
    w = data.shape[2]
    x = data.images[:, :, r0:r1, c0:c1]
    if data.xflip:
        x = torch.cat([x, data.images[:, :, r0:r1, w - c1:w - c0].flip(-1)])
    return np.ascontiguousarray(x.flatten(1).cpu().numpy())


def to_vectors(u: np.ndarray) -> np.ndarray:
    """uint8 windows [n, D] -> float32 [n, D] in [-1, 1] (u / 127.5 - 1, rounded as float32)."""
    return u.astype(np.float32) / np.float32(127.5) - np.float32(1)


def factory_spec(kind: str, d: int, nlist: int, pq_m: int) -> str:
    """FAISS index_factory string of a kind. ivf-pq is 4-bit fast-scan PQ (PQ{M}x4fs: 16-centroid codebooks
    train in a fraction of a second, where 8-bit ones took a minute per index on one core) with the
    largest number M <= pq_m of sub-quantizers that divides d (FAISS needs d % M == 0): M/2 bytes a patch."""
    if kind == "flat":
        return "Flat"
    if kind == "sq8":
        return "SQ8"
    if kind == "ivf-flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf-sq8":
        return f"IVF{nlist},SQ8"
    if kind == "ivf-pq":
        return f"IVF{nlist},PQ{max(j for j in range(1, pq_m + 1) if d % j == 0)}x4fs"
    raise UserError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU = {}


def gpu_resources():
    """The one StandardGpuResources shared by every GPU index of the process (faiss-gpu only)."""
    import faiss

    if not faiss_has_gpu():
        raise UserError("--gpu needs faiss-gpu and a CUDA device (pip install -e '.[gpu]'); this faiss has none")
    if "res" not in _GPU:
        _GPU["res"] = faiss.StandardGpuResources()
    return _GPU["res"]


def make_index(u: np.ndarray, seed: list[int], kind: str, nlist: int = 0, pq_m: int = 32, gpu: bool = False,
               chunk: int = 65536):
    """Train and fill an index over windows u uint8 [E, D] (a block's entries; index id e is row e), adding
    in chunks so memory stays at one chunk of float32 vectors. Training uses a sample seeded by `seed`: all
    entries for sq8 (its value ranges must cover every entry, up to TRAIN_MAX), max(64 nlist, 16,384) for
    the k-means cells (KMEANS_ITER iterations) and PQ codebooks (FAISS asks 39 points per centroid; more
    only slows the build). Entries are distinct windows, so k-means places cells on content, not on the
    multiplicity of a background. FAISS runs on its OpenMP threads (`build_bundle`'s threads)."""
    import faiss

    n, d = u.shape
    index = faiss.index_factory(d, factory_spec(kind, d, nlist, pq_m))
    if kind.startswith("ivf"):  # the cells' k-means, and the PQ codebooks' where there are some
        faiss.extract_index_ivf(index).cp.niter = KMEANS_ITER
        if kind == "ivf-pq":
            faiss.downcast_index(index).pq.cp.niter = KMEANS_ITER
    if gpu:
        if kind == "sq8":
            raise UserError("--gpu: faiss-gpu has no plain sq8 index; use flat, ivf-flat, ivf-sq8 or ivf-pq")
        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
        if hasattr(index, "cp"):
            index.cp.niter = KMEANS_ITER
    try:
        if not index.is_trained:
            n_train = TRAIN_MAX if kind == "sq8" else min(TRAIN_MAX, max(64 * nlist, 16384))
            rng = np.random.default_rng(np.random.SeedSequence(seed))
            sample = np.sort(rng.choice(n, n_train, replace=False)) if n > n_train else np.arange(n)
            index.train(to_vectors(u[sample]))
        for start in range(0, n, chunk):
            index.add(to_vectors(u[start:start + chunk]))
    except RuntimeError as e:  # FAISS refusals (e.g. fewer training patches than PQ centroids)
        msg = [ln for ln in str(e).splitlines() if "Error" in ln or ln.strip()][-1].strip()
        raise UserError(f"FAISS could not build the {kind} index over {n} patches: {msg[:200]}") from None
    return faiss.index_gpu_to_cpu(index) if gpu else index


def collapsed(index) -> bool:
    """Whether an IVF index's k-means collapsed: fewer than half of its lists hold an entry (the cells
    prune nothing, and queries whose nearest centroids are empty would widen their probe to every list)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    filled = sum(ivf.invlists.list_size(i) > 0 for i in range(ivf.nlist))
    return 2 * filled < ivf.nlist


def block_index(u: np.ndarray, seed: list[int], kind: str, nlist: int, pq_m: int, gpu: bool):
    """(index, kind, lists) of one block over its entries' windows u [E, D]: `make_index` with nlist lists;
    a flat index where the entries are fewer than an IVF kind trains on (nlist cells, 16 centroids of 4-bit
    PQ): scanning so few is exact and cheap; one list where IVF k-means collapsed (a scan of every code;
    the kind's compact codes stay)."""
    if kind.startswith("ivf") and len(u) < max(nlist, 16 if kind == "ivf-pq" else 1):
        return make_index(u, seed, "flat", gpu=gpu), "flat", None
    index = make_index(u, seed, kind, nlist, pq_m, gpu)
    if kind.startswith("ivf") and nlist > 1 and collapsed(index):
        return make_index(u, seed, kind, 1, pq_m, gpu), kind, 1
    return index, kind, nlist if kind.startswith("ivf") else None


def block_entries(data, win, u: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Duplicate-aware entries of a window: identical uint8 windows of the virtual images (flips included)
    are one entry. u: the windows [Nv, D] if already cut (`block_windows`). Returns (offsets int64 [E+1],
    members int32 [Nv]): entry e's members are members[offsets[e]:offsets[e+1]], ascending; entries are
    numbered by their first member."""
    u = block_windows(data, win) if u is None else u
    _, first, inverse, counts = np.unique(u.view(np.dtype((np.void, u.shape[1])))[:, 0], return_index=True,
                                          return_inverse=True, return_counts=True)
    # renumber entries by first occurrence, then group the members per entry (stable: ascending ids)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    entry = rank[inverse.reshape(-1)]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(entry, minlength=len(first)))]).astype(np.int64)
    return offsets, np.argsort(entry, kind="stable").astype(np.int32)


def distinct_rows(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 rows [n, D] -> (the distinct rows [E, D] in byte order, their counts [E] int64), by sorting the
    rows' bytes."""
    u = np.ascontiguousarray(u)
    rows, counts = np.unique(u.view(np.dtype((np.void, u.shape[1])))[:, 0], return_counts=True)
    return rows.view(np.uint8).reshape(-1, u.shape[1]), counts


def crop_mask(c: int, wh: int, ww: int, s: int) -> torch.Tensor:
    """0/1 float64 [P, C*wh*ww]: the coordinates of each s x s crop location of a window (row-major by
    corner), in the C-major order of a flattened window."""
    from .geometry import SquareCrops

    return SquareCrops(wh, ww, s).masks()[:, None].expand(-1, c, -1, -1).flatten(1).to(torch.float64)


def cell_bounds(u: np.ndarray, c: int, win, s: int, cell: np.ndarray, centroids: np.ndarray, chunk: int = 16384):
    """Per cell L and crop location C of the block: radius [L, P] float64 >= max over the cell's entries
    (windows u uint8 [E, D], cells cell [E]) of ||x_C - mu_C|| (x = u / 127.5 - 1 exactly, mu = centroids
    [L, D] float32 as stored); and the per-pixel range lo, hi uint8 [L, D] of the cell's entries (one
    reduction per run of entries sorted by cell).

    The distances are float32 (x - mu, squared, summed by a GEMM with the crops' 0/1 masks), rounded up:
    with u_r = 2^-24, x is off by <= 3 u_r and x - mu by <= u_r |x - mu| + 4 u_r <= 7 u_r, so the exact
    ||x_C - mu_C|| <= ||d_C|| + 7 u_r sqrt(D) (Minkowski), and the float32 sum S of the D' <= D rounded
    squares has ||d_C||^2 <= S / (1 - gamma), gamma = (D + 1) u_r / (1 - (D + 1) u_r) (Higham's bound for
    any summation order); BOUND_MARGIN on top."""
    mask = crop_mask(c, win[1] - win[0], win[3] - win[2], s).to(torch.float32)  # [P, D]
    d = u.shape[1]
    unit = 2.0 ** -24
    gamma = (d + 1) * unit / (1 - (d + 1) * unit)
    mu = torch.from_numpy(centroids)
    cells = len(centroids)
    radius = torch.zeros(cells, len(mask), dtype=torch.float32)
    for i in range(0, len(u), chunk):
        j = torch.from_numpy(cell[i:i + chunk]).long()
        sq = (torch.from_numpy(to_vectors(u[i:i + chunk])) - mu[j]) ** 2 @ mask.T  # [n, P]
        radius.scatter_reduce_(0, j[:, None].expand_as(sq), sq, "amax")
    radius = (radius.to(torch.float64) / (1 - gamma)).sqrt() + 7 * unit * math.sqrt(d) + BOUND_MARGIN
    order = np.argsort(cell, kind="stable")
    present, starts = np.unique(cell[order], return_index=True)
    lo = np.full((cells, d), 255, np.uint8)
    hi = np.zeros((cells, d), np.uint8)
    lo[present] = np.minimum.reduceat(u[order], starts, axis=0)
    hi[present] = np.maximum.reduceat(u[order], starts, axis=0)
    return radius.numpy(), lo, hi


def entry_cells(index, kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell int32 [E], centroids float32 [L, D]) of an index over n entries: the inverted list each entry
    sits in and the IVF centroids; for flat kinds one cell, centred at the entries' mean."""
    import faiss

    if not kind.startswith("ivf"):
        return np.zeros(n, np.int32), None
    ivf = faiss.extract_index_ivf(index)
    cell = np.empty(n, np.int32)
    for j in range(ivf.nlist):
        size = ivf.invlists.list_size(j)
        if size:
            cell[faiss.rev_swig_ptr(ivf.invlists.get_ids(j), size)] = j
    return cell, ivf.quantizer.reconstruct_n(0, ivf.nlist)


def entries_bytes(u: np.ndarray, c: int, win, s: int, index, kind: str, offsets: np.ndarray,
                  members: np.ndarray) -> bytes:
    """The block's `.npz`: members, offsets, cell, centroids, radius, lo, hi (`BlockEntries`); u [E, D]
    the entries' windows."""
    cell, centroids = entry_cells(index, kind, len(u))
    if centroids is None:
        centroids = np.stack([to_vectors(u[i:i + 65536]).sum(0, dtype=np.float64)
                              for i in range(0, len(u), 65536)]).sum(0, keepdims=True)
        centroids = (centroids / len(u)).astype(np.float32)
    radius, lo, hi = cell_bounds(u, c, win, s, cell, centroids)
    # the smallest integer types that hold them (read back as int64 / int32, `Bundle.entries`)
    small = lambda v, top: v.astype(  # noqa: E731
        np.uint16 if top < 2 ** 16 else np.int32 if top < 2 ** 31 else np.int64)
    return npz_bytes(members=small(members, len(members)), offsets=small(offsets, int(offsets[-1]) + 1),
                     cell=small(cell, len(centroids)),
                     centroids=centroids, radius=radius, lo=lo, hi=hi)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An .npz (deflated) of the arrays, byte-identical for equal arrays: np.savez stamps each member
    with the time of writing, this one with 1980-01-01."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for key, val in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(val), allow_pickle=False)
    return buf.getvalue()


def neighbour_stats(data, s: int, samples: int = 32, seed: int = 0) -> list[float | None]:
    """The skip predictor's data for size s: at three crop locations (corner, centre, edge middle), the
    median over `samples` seeded training crops of the squared distance (x = u / 127.5 - 1, summed over the
    crop) to its r-th nearest distinct other crop, for r in RANKS (None: fewer distinct crops, no such
    neighbour)."""
    c, h, w = data.shape
    rng = np.random.default_rng(np.random.SeedSequence([seed, s, len(data)]))
    picks = torch.from_numpy(rng.choice(len(data), min(samples, len(data)), replace=False))
    dists = []
    for y, x in ((0, 0), ((h - s) // 2, (w - s) // 2), ((h - s) // 2, 0)):
        win = (y, y + s, x, x + s)
        u = torch.from_numpy(distinct_rows(block_windows(data, win))[0]).to(torch.float64)
        q = window_u8(data, picks, win).flatten(1).to(torch.float64)
        d2 = torch.cdist(q / 127.5, u / 127.5) ** 2  # [samples, distinct]: itself at distance 0
        srt = d2.sort(1).values
        dists.append(torch.stack([srt[:, r] if r < srt.shape[1] else torch.full((len(q),), np.inf)
                                  for r in RANKS], 1))
    return [float(v) if np.isfinite(float(v)) else None for v in torch.cat(dists).median(0).values]


def default_nlist(n: int) -> int:
    """About sqrt(N) inverted lists (k-means training cost grows with nlist^2 here; candidates are
    rescored exactly, so coarse cells cost little accuracy), at least 39 training points per list."""
    return int(max(1, min(round(n ** 0.5), n // 39)))


def bundle_bytes(path, prefix: str = "") -> int:
    """Bytes on disk of a bundle's files whose names start with prefix (all: index files, their entries and
    the manifest; "s3_": one patch size's)."""
    return sum(f.stat().st_size for f in Path(path).glob(f"{prefix}*") if f.is_file())


def file_name(s: int, by: int, bx: int) -> str:
    return f"s{s}_b{by}_{bx}.faiss"


def entries_name(s: int, by: int, bx: int) -> str:
    return f"s{s}_b{by}_{bx}.npz"


def _recorded(path: Path, rec: dict | None) -> bool:
    """Whether a file is there with the size and sha256 a record gives."""
    return bool(rec) and path.exists() and path.stat().st_size == rec["size"] and sha256_file(path) == rec["sha256"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, raw: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _versions() -> dict:
    import faiss

    return {"faiss": faiss.__version__, "torch": torch.__version__.split("+")[0], "numpy": np.__version__}


def threads_for(n: int | None):
    """A context in which FAISS's OpenMP threads and torch's are n (None: unchanged), restored after."""
    import contextlib

    import faiss

    @contextlib.contextmanager
    def scope():
        before = faiss.omp_get_max_threads(), torch.get_num_threads()
        if n is not None:
            faiss.omp_set_num_threads(n)
            torch.set_num_threads(n)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before[0])
            torch.set_num_threads(before[1])
    return scope()


def build_bundle(store_path, bundle_path, patch_sizes, stride: int = 4, kind: str = "ivf-pq",
                 xflip: bool = True, nlist: int | None = None, pq_m: int = 32, gpu: bool = False,
                 progress: bool = True, rank: int = 0, world: int = 1, overwrite: bool = False,
                 threads: int | None = None) -> dict:
    """Build (or finish) an index bundle for a store; returns the manifest. patch_sizes None: the sizes the
    store's default schedule uses below full size.

    An unfinished or finished bundle at `bundle_path` built with the same settings is resumed; one built
    with other settings is rebuilt only with `overwrite`; any other existing path is refused (UserError).

    With world > 1 (an initialised torch.distributed group, e.g. under torchrun), process `rank` builds
    every world-th index file; the file records are gathered and rank 0 writes the manifest.
    Memory: the block's uint8 windows (N x d bytes, for the duplicate scan), one chunk of float32 training
    vectors (65,536 x d) and the index being built. threads: FAISS's OpenMP threads and torch's while the
    indices are built (`threads_for`, restored after; None: as set, e.g. by OMP_NUM_THREADS, else FAISS
    takes every core).
    """
    import faiss
    from tqdm import tqdm

    from .store import ImageStore

    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if stride < 1:
        raise UserError(f"--stride must be >= 1, got {stride}")
    store = ImageStore.open(store_path)
    data = store.training_set(xflip=xflip)
    c, h, w = data.shape
    if patch_sizes is None:
        from .schedule import default_schedule

        patch_sizes = default_schedule(h, w).sizes_below_full()
    sizes = sorted({int(s) for s in patch_sizes})
    if not sizes:
        raise UserError("no patch sizes to index")
    for s in sizes:
        # crops fit the short side; a crop that is the whole image (square stores) is the exact empirical denoiser
        if not 1 <= s <= min(h, w) - (h == w):
            raise UserError(f"patch size {s} is outside 1..{min(h, w) - (h == w)} for {h}x{w} images "
                            f"(a crop covering the whole image is the exact empirical denoiser)")
    if gpu:
        gpu_resources()  # fail before any work
    ivf = kind.startswith("ivf")
    if ivf:
        nlist = nlist or default_nlist(len(data))
        if not 1 <= nlist <= len(data):
            raise UserError(f"--nlist must be in 1..{len(data)}, got {nlist}")
    # an existing bundle is resumed; any other existing path is refused before anything is written
    bundle = claim(bundle_path, BUNDLE, resume=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every process checks the path before any of them creates it
    params = {"format": FORMAT, "format_version": FORMAT_VERSION, "store_sha256": store.sha256,
              "shape": list(store.shape), "xflip": xflip, "patch_sizes": sizes, "stride": stride,
              "kind": kind, "nlist": nlist if ivf else None, "pq_m": pq_m if kind == "ivf-pq" else None,
              "nprobe": max(1, nlist // 8) if ivf else None, "versions": _versions()}
    # resume: files recorded (by a finished manifest or the progress journals) under the same parameters
    done: dict[str, dict] = {}
    for name in [MANIFEST, PROGRESS] + [f".progress-{r}.json" for r in range(world)]:
        try:
            old = json.loads((bundle / name).read_text())
        except (OSError, ValueError):
            continue
        if {k: old.get(k) for k in params} == params:
            done.update(old.get("files", {}))
        elif not overwrite:
            differ = next(k for k in params if old.get(k) != params[k])
            raise UserError(f"{bundle_path}: an existing bundle was built with other settings ({differ}="
                            f"{old.get(differ)!r}, now {params[differ]!r}); pass --overwrite to rebuild it")
    bundle.mkdir(parents=True, exist_ok=True)
    journal = bundle / (PROGRESS if world == 1 else f".progress-{rank}.json")
    files: dict[str, dict] = {}
    # files recorded with their checksums are kept; this process builds every world-th of the others
    todo = []
    for i, (s, by, bx, win) in enumerate((s, by, bx, win) for s in sizes for by, bx, win in blocks(h, w, s, stride)):
        name = file_name(s, by, bx)
        rec = done.get(name)
        if _recorded(bundle / name, rec) and _recorded(bundle / entries_name(s, by, bx), rec.get("entries")):
            files[name] = rec
        elif i % world == rank:
            todo.append((s, by, bx, win))
    # progress weighted by window pixels (a block's k-means, adding and bounds grow with them): a fair ETA
    weight = lambda win: (win[1] - win[0]) * (win[3] - win[2])  # noqa: E731
    bar = tqdm(total=sum(weight(job[3]) for job in todo), disable=not progress, file=sys.stderr, desc="build",
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    total = len(files) + len(todo)
    with threads_for(threads):
        for s, by, bx, win in todo:
            bar.set_postfix_str(f"s={s} block ({by}, {bx}), {len(files)}/{total} indices done")
            # the block's windows, cut once: distinct ones (entries) with their members, the index over the
            # entries, then their cell bounds
            u = block_windows(data, win)
            offsets, members = block_entries(data, win, u)
            u = u[members[offsets[:-1]]]
            index, file_kind, lists = block_index(u, [len(u), u.shape[1], win[0], win[2]], kind, nlist or 0, pq_m, gpu)
            # the serialised index deflated (its lists' 8-byte ascending ids shrink most): about 0.55x
            raw = zlib.compress(faiss.serialize_index(index).tobytes(), 1)
            ent = entries_bytes(u, c, win, s, index, file_kind, offsets, members)
            name = file_name(s, by, bx)
            _write_atomic(bundle / entries_name(s, by, bx), ent)
            _write_atomic(bundle / name, raw)
            files[name] = {"s": s, "block": [by, bx], "window": list(win), "kind": file_kind, "nlist": lists,
                           "codec": "zlib", "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                           "entries": {"count": len(u), "size": len(ent), "sha256": hashlib.sha256(ent).hexdigest()}}
            _write_json(journal, {**params, "files": {**done, **files}})
            bar.update(weight(win))
    bar.set_postfix_str(f"{total}/{total} indices done")
    bar.close()
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, files)
        files = {k: v for part in parts for k, v in part.items()}
    manifest = {**params, "files": dict(sorted(files.items()))}
    if rank == 0:
        manifest["neighbours"] = {str(s): neighbour_stats(data, s) for s in sizes}
        # the manifest is written last: a bundle without one is unfinished
        _write_json(bundle / MANIFEST, manifest)
        for f in bundle.glob(".progress*.json"):
            f.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return manifest


@dataclass
class BlockEntries:
    """One block's entries and cell bounds, as stored in its `.npz` (module docstring).

    members [Nv] (stored in the narrowest of uint16 / int32 / int64 that holds them) and offsets int64
    [E+1]: entry e (index id e) is the identical windows of virtual images members[offsets[e]:offsets[e+1]];
    cell int32 [E]: its cell (offsets and cell are stored narrow too, widened on load); centroids float32 [L, D]; radius
    float64 [L, P]: the cell's radius at each crop location of the block (row-major by corner); lo, hi
    uint8 [L, D]: the per-pixel range of the cell's entries."""

    members: np.ndarray
    offsets: np.ndarray
    cell: np.ndarray
    centroids: np.ndarray
    radius: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def reps(self) -> np.ndarray:
        """The representative virtual id of each entry (its first member) [E]."""
        return self.members[self.offsets[:-1]]

    def entry_of(self) -> np.ndarray:
        """The entry of every virtual image [Nv] (int64)."""
        out = np.empty(len(self.members), np.int64)
        out[self.members] = np.repeat(np.arange(len(self.counts)), self.counts)
        return out


@dataclass
class Bundle:
    """An opened, verified bundle; indices are loaded on first use (moved to the GPU with `gpu`)."""

    path: Path
    manifest: dict
    gpu: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def patch_sizes(self) -> list[int]:
        return list(self.manifest["patch_sizes"])

    @property
    def stride(self) -> int:
        return int(self.manifest["stride"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def xflip(self) -> bool:
        return bool(self.manifest["xflip"])

    def file_kind(self, s: int, by: int, bx: int) -> str:
        """One block's index kind: the bundle's, or flat where it has too few entries for IVF."""
        return self.manifest["files"][file_name(s, by, bx)]["kind"]

    def file_nlist(self, s: int, by: int, bx: int) -> int:
        """Lists of one block's IVF index: the bundle's nlist, or 1 where its k-means collapsed."""
        return int(self.manifest["files"][file_name(s, by, bx)].get("nlist") or self.manifest["nlist"])

    def entries(self, s: int, by: int, bx: int) -> BlockEntries:
        """The block's entries and cell bounds (checksum verified on load, cached)."""
        import io

        name = entries_name(s, by, bx)
        if name not in self._cache:
            raw = (self.path / name).read_bytes()
            if hashlib.sha256(raw).hexdigest() != self.manifest["files"][file_name(s, by, bx)]["entries"]["sha256"]:
                raise UserError(f"{self.path / name}: checksum mismatch (file changed since the bundle was opened)")
            with np.load(io.BytesIO(raw)) as f:
                arrays = {k: f[k] for k in f.files}
            arrays["offsets"], arrays["cell"] = arrays["offsets"].astype(np.int64), arrays["cell"].astype(np.int32)
            self._cache[name] = BlockEntries(**arrays)
        return self._cache[name]

    def index(self, s: int, by: int, bx: int):
        import faiss

        name = file_name(s, by, bx)
        if name not in self._cache:
            raw = (self.path / name).read_bytes()
            rec = self.manifest["files"][name]
            if hashlib.sha256(raw).hexdigest() != rec["sha256"]:
                raise UserError(f"{self.path / name}: checksum mismatch (file changed since the bundle was opened)")
            raw = zlib.decompress(raw) if rec.get("codec") == "zlib" else raw  # files without a codec: as written
            index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            self._cache[name] = faiss.index_cpu_to_gpu(gpu_resources(), 0, index) if self.gpu else index
        return self._cache[name]

    def search(self, s: int, by: int, bx: int, queries: torch.Tensor, k: int, nprobe: int | None = None,
               distances: bool = False):
        """Candidate entries [B, min(k, E)] (int64 index ids, `entries`) for window queries [B, d], every
        row full; with `distances` also their FAISS squared distances [B, min(k, E)] float32 (approximate
        for sq8 and PQ codes, rounded for flat ones).

        IVF indices are probed in nprobe lists (default: the manifest's); rows whose probed lists hold
        fewer than k entries are searched again with the probe doubled, up to every list, which holds all
        E (on the GPU, up to 2048 lists). Raises UserError for k > 2048 on the GPU."""
        index = self.index(s, by, bx)
        k = min(k, index.ntotal)
        if self.gpu and k > 2048:
            raise UserError(f"k={k}: FAISS GPU search returns at most 2048 candidates")
        x = np.ascontiguousarray(queries.to(torch.float32).cpu().numpy())
        if not self.file_kind(s, by, bx).startswith("ivf"):
            dist, ids = index.search(x, k)
            return (torch.from_numpy(ids), torch.from_numpy(dist)) if distances else torch.from_numpy(ids)
        # faiss-gpu probes at most 2048 lists: a row still short there keeps -1 ids (retrieve masks them)
        lists = self.file_nlist(s, by, bx)
        most = min(lists, 2048) if self.gpu else lists
        probe = min(int(nprobe or self.manifest["nprobe"]), most)
        self._set_nprobe(index, probe)
        dist, ids = index.search(x, k)
        short = np.flatnonzero((ids < 0).any(1))
        while len(short) and probe < most:
            probe = min(2 * probe, most)
            self._set_nprobe(index, probe)
            dist[short], ids[short] = index.search(x[short], k)
            short = short[(ids[short] < 0).any(1)]
        return (torch.from_numpy(ids), torch.from_numpy(dist)) if distances else torch.from_numpy(ids)

    def _set_nprobe(self, index, nprobe: int) -> None:
        """faiss-gpu IVF indices take nprobe directly; CPU ones are reached through their wrappers."""
        import faiss

        if self.gpu:
            index.nprobe = nprobe
        else:
            faiss.extract_index_ivf(index).nprobe = nprobe


def open_bundle(path, store, gpu: bool = False) -> Bundle:
    """Open a bundle and verify it against `store` (an ImageStore or a store path) and its checksums.
    gpu: search on the GPU (faiss-gpu; sq8 has no GPU version and stays on the CPU)."""
    from .store import ImageStore

    if not isinstance(store, ImageStore):
        store = ImageStore.open(store)
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not an index bundle (no {MANIFEST}; unfinished build?)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable bundle manifest ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a pspc-index bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: bundle format {manifest.get('format_version')}, this pspc-index reads format "
                        f"{FORMAT_VERSION} (duplicate-aware entries and cell bounds); rebuild it: pspc-index "
                        f"build STORE {path} --overwrite")
    # store.sha256 is hashed from the pixels as read, so a store rewritten in place is caught here too
    if manifest.get("store_sha256") != store.sha256 or manifest.get("shape") != list(store.shape):
        built = str(manifest.get("store_sha256"))
        if store.edited_in_place and built == store.recorded_sha256:
            raise UserError(f"{path}: built for {store.path} as ingested ({built[:12]}), but its images were "
                            f"rewritten since ingest, edited in place (now {store.sha256[:12]}); rebuild the bundle")
        raise UserError(f"{path}: built for another store (content {built[:12]}, shape {manifest.get('shape')}), "
                        f"not {store.path} ({store.sha256[:12]}, shape {list(store.shape)}); give the bundle "
                        "built for this store, or build one")
    for name, rec in manifest.get("files", {}).items():
        for f, r in ((path / name, rec), (path / name.replace(".faiss", ".npz"), rec["entries"])):
            if not f.exists():
                raise UserError(f"{f}: index file missing (rebuild the bundle to resume)")
            if f.stat().st_size != r["size"]:
                raise UserError(f"{f}: truncated or resized ({f.stat().st_size} bytes, manifest says {r['size']})")
            if sha256_file(f) != r["sha256"]:
                raise UserError(f"{f}: checksum mismatch (corrupted index file)")
    if gpu:
        gpu_resources()
    return Bundle(path=path, manifest=manifest, gpu=gpu and manifest["kind"] != "sq8")
