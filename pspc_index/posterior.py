"""The exact engine: patch posterior means as batched attention, streamed over the training set.

For a crop C and a query z, the patch posterior over training patches x_i (paper Eq. 9-10) is
attention with a per-key bias:
    E[x_C | z_C] = sum_i softmax_i(l_i) x_iC,   l_i = (z_C . x_iC - ||x_iC||^2 / 2) / t^2 + log w_i
(the -||z_C||^2 / 2t^2 term is the same for every i and cancels; w_i are optional per-key weights:
multiplicities, importance weights). `patch_posterior` is the one kernel: for G groups (crop
locations, or location x query pairs) of b queries each, it streams chunks of keys [G, n, d] in
homogeneous coordinates (q . [u, 1, -||x||^2/2, log w] is the logit) and dispatches between two
formulations of the same computation, measured in tools/bench_exact.py:
  fused  (CPU, first pass): torch's flash attention for CPU with the keys as values, which does logits,
         running max, exp, sums and weighted values in cache-sized blocks and returns the log normaliser;
         the chunks' states merge by it. 2-8x faster than the tiles here, and robust on a loaded machine.
  tiles  (second passes that report weights, statistics, CUDA): one batched GEMM for the logits of a
         cache-sized tile (on CUDA launch-bound, so 64x larger), an online softmax, a second batched GEMM
         against [u, 1] for the weighted sum and the normaliser. Keys shared by every group (an expanded
         chunk) are built once and both GEMMs run as one 2-D GEMM over all rows.
Every exact path is a choice of groups and keys:
  square_composite  PSPC-Square (Eq. 11): all (sh x sw) crop locations of the image, keys unfolded from
                    the uint8 store (strided views, cached per size); the full-image crop is the
                    optimal denoiser D* (Eq. 6-7), `empirical_mean`.
  mask_composite    PSPC-Flex and any crop masks: crops as index gathers, equal-size masks batched; or
                    (CUDA, large crops) every crop a masked whole image against shared whole-image keys.
  retrieval.py      exact rescoring of gathered candidates (one group per query, its crop locations as
                    masked queries over the candidates' windows) and of a shared tail sample.
A third formulation serves keys that differ per query and come as ranges of one key array (projection
cells, projection.py): `ragged_terms`, compiled (numba), adds a range's exact terms to one query's running
softmax state in float64 (distances ||z - x||^2 formed directly, no logit dtype to choose); its Python
entry point is `ragged_posterior`.

Horizontal flips (the training set's second half) never become keys: the flip of image i at location
(y, x) is the mirror of image i at (y, W - sw - x), so the flipped half is the original keys queried
with flip(z) at the mirrored location, and the two halves' softmax states are merged per location.

Numerics (what is guaranteed). Keys enter as their uint8 values u (exact in any float type) with
x = u / 127.5 - 1, and the logit GEMM's rounding error is bounded (Higham's gamma_K = K u / (1 - K u)
for K-term dot products, plus one rounding of each operand):
    |l~ - l| <= delta = (gamma_K + 2 u) (||z_C|| ||u_C|| / 127.5 + ||x_C||^2 / 2) / t^2 + (gamma_K + 2u) |log w|.
`logit_dtype` takes float32 only where delta <= LOGIT_TOL for every query, else float64 (u = 2^-53, so
delta stays below LOGIT_TOL for every t >= 0.002 up to d ~ 10^3). Logit errors <= delta perturb each
normalised weight by a factor in [e^-2delta, e^2delta], so every patch mean is within
(e^(2 delta) - 1) * 2 of the exact one (pixels in [-1, 1]): <= 4e-6 at LOGIT_TOL = 1e-6. The fused
path computes everything in the logit dtype; the tiles compute weights and means as float32 GEMMs.
Running max, normaliser and accumulators are combined across chunks in float64. Terms below
e^-80 of the running max are dropped (`EXP_FLOOR`): a mean moves by < 2 n e^-80 (n keys), nothing here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .store import TrainingSet

try:  # numba compiles the ragged form (a dependency); without it everything else runs, projection cells off
    import numba
except ImportError:
    numba = None
COMPILED = numba is not None
prange = numba.prange if COMPILED else range


def jit(parallel: bool = False):
    """numba.njit where numba is installed; else the function as written (`COMPILED` False: not used)."""
    return numba.njit(parallel=parallel) if COMPILED else (lambda f: f)

# keys per chunk of the key stream, and logits per tile (locations x queries x keys): a tile's logits,
# weights and keys stay in cache between the two GEMMs (measured: 2^24 logits a tile, streamed through
# memory, was 1.8x slower)
KEYS_PER_TILE = 512
TILE_ELEMENTS = 2 ** 20
# the same on CUDA, where kernel launches, not caches, bound a tile: at the CPU's sizes a full-N call ran
# ~10^4 tiles of small GEMMs (2.1 s for PSPC-Square at s = 3 on an H200, docs/gpu_check.md)
KEYS_PER_TILE_CUDA = 8192
TILE_ELEMENTS_CUDA = 2 ** 26
# the fused path: keys per chunk of the stream, and bytes of homogeneous keys per attention call
KEYS_FUSED = 8192
FUSED_KEY_BYTES = 2 ** 26
# queries per location below which the GEMM tiles beat the fused kernel: its keys are re-laid row-major per
# call (a transposing copy of the feature-major cache) whatever the queries, which small batches do not
# amortise (tools/bench_dispatch.py, docs/bench_dispatch.json: tiles 3.1-4.0x faster at 2 rows, 1.0-1.6x at
# 32; at 128 the fused kernel 1.5x faster at s = 3, the two within 1.3x at s = 5-13)
FUSED_MIN_ROWS = 64
# mask composites whose crops cover at least this fraction of the image on average run dense on the CPU too
# (Fashion-MNIST, N = 2,000 with flips, B = 64, one thread: mean fill 0.72 dense 13.6 s vs gathered 21.3 s;
# fill 0.34: 13.7 vs 8.5 s; fill 0.06: 13.5 vs 1.1 s)
DENSE_MIN_FILL = 0.5
# elements of the retrieval path's largest per-block intermediate (its query chunks; estimate_memory)
CHUNK_ELEMENTS = 2 ** 24
# largest logit error accepted from the float32 GEMM (nats); beyond it the logits are float64
LOGIT_TOL = 1e-6
# terms below e^EXP_FLOOR of the running max are dropped (exactly 0): exp of far-negative arguments
# takes the slow underflow path (measured 10x slower per element), and the dropped mass is < n e^-80
EXP_FLOOR = -80.0
# images per chunk of `crop_sq_norms` (its int32 temporaries stay a few MB: building them whole for every
# uncached call page-faulted ~2 GB per call at N = 60,000)
SQ_NORM_IMAGES = 2048
# bytes of unfolded uint8 patches kept between calls (`set_patch_cache_budget`)
DEFAULT_CACHE_BUDGET = 2 * 2 ** 30
_CACHE_BUDGET = DEFAULT_CACHE_BUDGET


def set_patch_cache_budget(nbytes: int) -> None:
    """Bytes of unfolded uint8 training patches kept between calls (a sampling run calls each size once
    per step, s = 3 six times on the paper's schedule); 0 disables the cache. Default 2 GiB."""
    global _CACHE_BUDGET
    _CACHE_BUDGET = int(nbytes)
    _PATCHES.clear()


# ------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------

@dataclass
class KeyChunk:
    """n keys of each of G groups. u: pixel values 0..255, uint8 or float [G, n, d] (exact); sq: ||x||^2
    of x = u / 127.5 - 1, float64 [G, n]; log_w: optional log weights (-inf excludes a key), float64,
    per key [G or 1, n] (a homogeneous column of the logit GEMM) or per query and key [G or 1, b, n]
    (added to the logits after the GEMM: e.g. a key excluded for some queries of a group only).
    Masked queries: when a group's b queries are crops of one window (zero outside their crop) and the
    keys are whole windows, sq [G, b, n] holds each query's crop norms ||x_C||^2 (added after the GEMM,
    like per-query log weights); the means then hold each query's patch mean on its crop's coordinates."""

    u: torch.Tensor
    sq: torch.Tensor
    log_w: torch.Tensor | None = None


def logit_dtype(z: torch.Tensor, t: torch.Tensor, d: int, log_w_max: float = 0.0) -> torch.dtype:
    """float32 where the float32 logit error bound (module docstring) is <= LOGIT_TOL for every query
    of z [G, b, d] at noise levels t [b] or [G, b], else float64."""
    k = d + 2
    u32 = 2.0 ** -24
    gamma = k * u32 / (1 - k * u32) + 2 * u32
    zn = z.to(torch.float64).norm(dim=-1).cpu()  # [G, b]
    scale = zn * 255 * math.sqrt(d) / 127.5 + d / 2  # ||z|| ||u|| / 127.5 + ||x||^2 / 2, keys at their largest
    delta = gamma * (scale / t.cpu() ** 2 + log_w_max)
    return torch.float32 if float(delta.max()) <= LOGIT_TOL else torch.float64


def patch_posterior(z: torch.Tensor, t: torch.Tensor, chunks: Callable[[], Iterator[tuple[int, KeyChunk]]],
                    dtype: torch.dtype | None = None, lse: torch.Tensor | None = None,
                    on_weights: Callable[[int, torch.Tensor], None] | None = None, stats: bool = False):
    """Posterior means of query patches over streamed key patches: softmax attention with per-key bias.

    z: queries [G, b, d] in [-1, 1] units (any float dtype); t: noise levels (EDM sigma, float64) [b],
    or [G, b] where a group's queries differ (e.g. one query per group); chunks(): iterator of
    (start, KeyChunk) over the key set, every chunk with the same G and d.
    dtype: None (default): logits in `logit_dtype` (certified, see the module docstring), weights and
    means in float32; torch.float64: everything in float64 (oracle precision); torch.float32: everything
    in float32 (fastest, logit error not certified at small t). Per-query log weights ([G, b, n]) are
    added in the logit dtype: their rounding is the (gamma_K + 2u) |log w| term of the bound.

    Returns (mean [G, b, d] float64 in [-1, 1] pixel units, lse [G, b] float64): lse is the log
    normaliser log sum_i w_i exp(l_i) with l_i = (z . x_i - ||x_i||^2 / 2) / t^2 (the row constant
    -||z||^2 / 2t^2 left out), so two key sets' results merge by their lse (`merge`). A row whose keys
    are all excluded has lse -inf (and mean NaN; `merge` gives it no weight).
    stats: also return (lmin, lse2), float64 [G, b]: the smallest finite logit log w_i + l_i of each row
    (+inf if none; e.g. the top-k certificate's e^{l_k}) and log sum_i (w_i exp(l_i))^2 (-inf if none;
    the second moment of importance-weighted terms, for a sampled key set's standard error).
    With `lse` given (a second pass, after the first and any merging): instead calls
    on_weights(start, w [G, b, n]) with each chunk's normalised weights w = exp(l - lse) (float64; a buffer
    refilled for the next chunk, so valid during the call only) and returns None.
    """
    g, b, d = z.shape
    dev = z.device
    inv_t2 = (1 / t.to(torch.float64) ** 2).to(dev).expand(g, b)
    ldt = dtype or logit_dtype(z, t, d)
    wdt = dtype or torch.float32
    # keys in homogeneous coordinates [u, 1, -||x||^2/2, log w] against queries [z/127.5t^2, 0, 1/t^2, 1]:
    # one GEMM gives every logit (1/127.5 turns u into x + 1; the resulting row constant c = sum(z)/t^2
    # is taken off lse in float64), and the values [u, 1] make the second GEMM return the normaliser too
    z64 = z.to(torch.float64)
    c = z64.sum(2) * inv_t2
    q = torch.cat([z64 * (inv_t2 / 127.5)[..., None], torch.zeros(g, b, 1, dtype=torch.float64, device=dev),
                   inv_t2[..., None], torch.ones(g, b, 1, dtype=torch.float64, device=dev)], 2).to(ldt)
    if lse is None and not stats and fused_available(dev, b):
        mean, lse_f = _flash_posterior(q, chunks, d)
        return mean, lse_f - c
    m = torch.full((g, b), -math.inf, dtype=ldt, device=dev)
    acc = torch.zeros(g, b, d + 1, dtype=torch.float64, device=dev)
    # (lmin, sum of squared terms relative to e^{2m}) per row, kept only when asked
    st = torch.stack([torch.full((g, b), math.inf), torch.zeros(g, b)], 2).to(dev, torch.float64) if stats else None
    lse_c = None if lse is None else lse + c
    weights = None  # pass 2: one buffer for a chunk's weights over every location, refilled per chunk
    for start, ch in chunks():
        n = ch.u.shape[1]
        # locations per tile, so that a tile's logits and keys stay in cache
        gt = max(1, tile_elements(dev) // (max(b, d + 3) * n))
        if lse is not None and (weights is None or weights.shape[2] < n):
            weights = torch.empty(g, b, n, dtype=torch.float64, device=dev)
        for g0 in range(0, g, gt):
            sl = slice(g0, min(g0 + gt, g))
            lw = None if ch.log_w is None else ch.log_w[sl] if len(ch.log_w) == g else ch.log_w
            w = _tile(q[sl], ch.u[sl], ch.sq[sl], lw, m[sl], acc[sl], wdt,
                      None if lse is None else lse_c[sl], None if st is None else st[sl])
            if lse is not None:
                weights[sl, :, :n] = w
        if lse is not None:
            on_weights(start, weights[:, :, :n])
    if lse is not None:
        return None
    zsum = acc[..., d]
    out = acc[..., :d] / zsum[..., None] / 127.5 - 1, m.to(torch.float64) + torch.log(zsum) - c
    if stats:
        return (*out, st[..., 0] - c, 2 * (m.to(torch.float64) - c) + torch.log(st[..., 1]))
    return out


def keys_per_chunk(device, rows: int = FUSED_MIN_ROWS) -> int:
    """Keys per chunk of a first pass with `rows` queries per location: long chunks for the fused kernel,
    tile-sized for the GEMM tiles."""
    return KEYS_FUSED if fused_available(device, rows) else tile_keys(device)


def tile_keys(device) -> int:
    """Keys per chunk of the GEMM tiles on this device (cache-sized on the CPU, launch-bound on CUDA)."""
    return KEYS_PER_TILE_CUDA if torch.device(device).type == "cuda" else KEYS_PER_TILE


def tile_elements(device) -> int:
    """Logits per GEMM tile on this device."""
    return TILE_ELEMENTS_CUDA if torch.device(device).type == "cuda" else TILE_ELEMENTS


def fused_available(device, rows: int = FUSED_MIN_ROWS) -> bool:
    """Whether the fused CPU attention kernel (torch's flash attention for CPU, which also returns the log
    normaliser) serves a first pass with `rows` queries per location: CPU tensors, the op present in this
    torch, and rows >= FUSED_MIN_ROWS (fewer: the GEMM tiles are faster)."""
    return (torch.device(device).type == "cpu" and _FLASH_CPU is not None and _USE_FUSED
            and rows >= FUSED_MIN_ROWS)


def _flash_cpu_op():
    """torch's fused CPU attention op, if this torch has it with the call used here (an internal op:
    probed once on a tiny problem, and the GEMM tiles serve every call where it is missing or differs)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    try:
        q = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
        out, lse = op(q, q, q, 0.0, False, attn_mask=torch.zeros(1, 1, 2, 2, dtype=torch.float64), scale=1.0)[:2]
        return op if out.shape == q.shape and lse.shape == (1, 1, 2) else None
    except (RuntimeError, TypeError):
        return None


_FLASH_CPU = _flash_cpu_op()
_USE_FUSED = True  # tools/bench_exact.py switches it off to time the explicit GEMM tiles


def _keys(u, sq, log_w, dtype, feature_major: bool = False):
    """Keys in homogeneous coordinates [u, 1, -||x||^2/2, log w]: [g, n, d + 3] (sq [g, n] or None for 0,
    log_w [g or 1, n] or None). feature_major: stored as [g, d + 3, n] (returned as its transposed view), where
    filling from the feature-major patch cache is a copy of rows."""
    g, n, d = u.shape
    if feature_major:
        k = torch.empty(g, d + 3, n, dtype=dtype, device=u.device).transpose(1, 2)
    else:
        k = torch.empty(g, n, d + 3, dtype=dtype, device=u.device)
    k[..., :d] = u
    k[..., d] = 1
    k[..., d + 1] = 0 if sq is None else sq * -0.5
    k[..., d + 2] = 0 if log_w is None else log_w
    return k


def _flash_posterior(q: torch.Tensor, chunks, d: int):
    """`patch_posterior`'s first pass by fused attention: per key chunk one call of torch's CPU flash
    attention (logits, running max, exp, sums and the weighted values in cache-sized blocks, in q's dtype)
    with values = the keys themselves, then the chunks' (mean, lse) merged. Per-query log weights
    ([G, b, n]) enter as its additive mask. Returns (mean [G, b, d] float64, lse [G, b] float64 with the
    row constant sum(z)/t^2 still in)."""
    g, b, _ = q.shape
    mean = torch.zeros(g, b, d, dtype=torch.float64, device=q.device)
    lse = torch.full((g, b), -math.inf, dtype=torch.float64, device=q.device)
    for _, ch in chunks():
        n = ch.u.shape[1]
        gt = max(1, FUSED_KEY_BYTES // (n * (d + 3) * q.element_size()))  # groups a call: bounded key memory
        for g0 in range(0, g, gt):
            sl = slice(g0, min(g0 + gt, g))
            m_part, part = _flash_call(q[sl], ch.u[sl], ch.sq[sl], None if ch.log_w is None else
                                       ch.log_w[sl] if len(ch.log_w) == g else ch.log_w, d)
            mean[sl], lse[sl] = merge(mean[sl], lse[sl], m_part, part)
    return mean / 127.5 - 1, lse


def _flash_call(q, u, sq, log_w, d):
    """One fused attention call: (mean of u [g, b, d] float64, lse [g, b] float64) of queries q [g, b, d+3]
    over keys u [g, n, d]; per-query terms (log weights [g, b, n], per-row crop norms sq [g, b, n]) form
    the additive mask."""
    g, b = q.shape[:2]
    row_w, row_sq = log_w is not None and log_w.ndim == 3, sq.ndim == 3
    k = _keys(u, None if row_sq else sq, None if row_w else log_w, q.dtype)
    mask = None
    if row_w or row_sq:
        mask = (log_w if row_w else 0) + (sq * (-0.5 * q[..., d + 1:d + 2].to(torch.float64)) if row_sq else 0)
        mask = mask[:, None].to(q.dtype)
    out, part = _FLASH_CPU(q[:, None], k[:, None], k[:, None], 0.0, False, attn_mask=mask, scale=1.0)[:2]
    part = part[:, 0].to(torch.float64)
    if log_w is not None:  # the fused kernel reports lse 0 for a row whose keys are all excluded
        lw = log_w if row_w else log_w[:, None].expand(g, b, -1)
        part = part.masked_fill(~torch.isfinite(lw).any(-1), -math.inf)
    return out[:, 0, :, :d].to(torch.float64), part


def _tile(q, u, sq, log_w, m, acc, wdt, lse=None, st=None):
    """One tile of `patch_posterior`: queries q [g, b, d+3] against keys u [g, n, d] (sq [g, n] or
    [g, b, n], log_w [g or 1, n] or [g or 1, b, n]); updates the running max m [g, b], accumulator
    acc [g, b, d+1] and, if given, the row statistics st [g, b, 2] (min finite logit, sum of squared
    terms relative to e^{2m}) in place. With lse [g, b] (pass 2, row constant included) it returns the
    normalised weights [g, b, n] instead."""
    g, n, d = u.shape
    # 1. the keys in homogeneous coordinates, and one batched GEMM for every logit [g, b, n]; per-query
    # norms and log weights are added after it. Keys shared by every group (an expanded chunk: ELS's pooled
    # keys, masked whole images) are built once, and both GEMMs run as one 2-D GEMM over all g*b rows
    row_w, row_sq = log_w is not None and log_w.ndim == 3, sq.ndim == 3
    shared = g > 1 and u.stride(0) == 0
    if shared:
        u, sq = u[:1], sq if row_sq else sq[:1]
        log_w = log_w if log_w is None or row_w else log_w[:1]
    k = _keys(u, None if row_sq else sq, None if row_w else log_w, q.dtype, feature_major=True)
    logits = torch.matmul(q, k[0].T) if shared else torch.bmm(q, k.transpose(1, 2))
    if row_sq:  # -||x_C||^2 / 2t^2, with the query's 1/t^2 as the GEMM column has it
        logits += (sq * -0.5).to(logits.dtype) * q[..., d + 1, None]
    if row_w:
        logits += log_w.to(logits.dtype)
    if lse is not None:
        return _floored_exp(logits.to(torch.float64).sub_(lse[..., None]))
    if st is not None:
        lmin = logits.masked_fill(logits == -math.inf, math.inf).amin(2)
        torch.minimum(st[..., 0], lmin.to(torch.float64), out=st[..., 0])
    # 2. online softmax: new running max, this chunk's terms relative to it
    m_new = torch.maximum(m, logits.amax(2))
    shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # rows with every key excluded
    w = _floored_exp(logits.sub_(shift[..., None]).to(wdt))
    # 3. second batched GEMM: [sum_i w_i u_i, sum_i w_i], folded into the rescaled accumulator
    v = k[..., :d + 1] if wdt == q.dtype else k[..., :d + 1].to(wdt)
    rescale = torch.exp((m - shift).to(torch.float64))
    acc.mul_(rescale[..., None]).add_(torch.matmul(w, v[0]) if shared else torch.bmm(w, v))
    if st is not None:
        st[..., 1].mul_(rescale ** 2).add_((w * w).sum(2).to(torch.float64))
    m.copy_(m_new)


def _floored_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(max(x, EXP_FLOOR)) - e^EXP_FLOOR, in place for x <= 0 (logits relative to their max): exactly 0
    at and below the floor (excluded keys, x = -inf, included); every other term is off by < e^-80."""
    return x.clamp_min_(EXP_FLOOR).exp_().sub_(math.exp(EXP_FLOOR))


def posterior_weights_pass(z, t, chunks, lse, on_weights, dtype=None) -> None:
    """The second pass of `patch_posterior`: on_weights(start, w [G, b, n]) with the normalised
    weights exp(l - lse) of every chunk (lse [G, b] from the first pass, possibly merged)."""
    patch_posterior(z, t, chunks, dtype=dtype or logit_dtype(z, t, z.shape[-1]), lse=lse, on_weights=on_weights)


def merge(mean_a, lse_a, mean_b, lse_b):
    """Two key sets' posterior states -> the state over their union (means weighted by normalisers).
    An empty state (lse -inf, mean NaN) contributes nothing."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return torch.where(wa > 0, wa * mean_a, 0) + torch.where(wb > 0, wb * mean_b, 0), lse


# ------------------------------------------------------------------------------------------------
# keys: unfolded training patches of rectangular crops at every location (cached per size)
# ------------------------------------------------------------------------------------------------

_PATCHES: dict = {}


def unfold_u8(images: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """Images [N, C, H, W] (any dtype) -> every (sh x sw) patch, location-major [P, N, C*sh*sw] with
    P = (H-sh+1)(W-sw+1) row-major by corner. Stored feature-major ([P, d, N], returned as its transposed
    view): from the images transposed to [C, H, W, N], every patch feature is a contiguous run of N
    values, so the copy moves whole rows (measured 20-60x faster than copying [N, C, sh, sw] blocks)."""
    n, c, h, w = images.shape
    return _patch_view(images, sh, sw).reshape((h - sh + 1) * (w - sw + 1), c * sh * sw, n).transpose(1, 2)


def _patch_view(images: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """Every (sh x sw) patch of images [N, C, H, W] as a strided view [H-sh+1, W-sw+1, C, sh, sw, N] of the
    images transposed to [C, H, W, N] (the one copy made)."""
    n, c, h, w = images.shape
    t = images.permute(1, 2, 3, 0).contiguous()
    return t.as_strided((h - sh + 1, w - sw + 1, c, sh, sw, n), (w * n, n, h * w * n, w * n, n, 1))


class StreamedPatches:
    """The patches [P, N, d] of `unfold_u8(images, sh, sw)` without forming them: [:, ids] (a slice or
    index tensor of images) unfolds only those images, so a pass that streams its keys in chunks never
    holds (or page-faults in) all P x N x d bytes. The result is a view of one buffer that the next
    indexing overwrites: a key stream consumes each chunk before it draws the next."""

    def __init__(self, images: torch.Tensor, sh: int, sw: int):
        n, c, h, w = images.shape
        self.images, self.sh, self.sw = images, sh, sw
        self.shape = ((h - sh + 1) * (w - sw + 1), n, c * sh * sw)
        self._buf = torch.empty(0, dtype=images.dtype, device=images.device)

    def __getitem__(self, key) -> torch.Tensor:
        locations, ids = key
        if locations != slice(None):
            raise IndexError("streamed patches are indexed [:, images]")
        imgs = self.images[ids]
        p, _, d = self.shape
        n = len(imgs)
        if self._buf.numel() < p * d * n:  # one allocation for the stream (a fresh one per chunk page-faults)
            self._buf = torch.empty(p * d * n, dtype=imgs.dtype, device=imgs.device)
        view = _patch_view(imgs, self.sh, self.sw)
        out = self._buf[:p * d * n].view(view.shape)
        out.copy_(view)
        return out.view(p, d, n).transpose(1, 2)


def square_patches(data: TrainingSet, sh: int, sw: int, rows: tuple[int, int] | None = None,
                   stream: bool = False, build: bool = True):
    """(patches uint8 [P, N, d], sq int32 [P, N]) of the stored images (no flips) for crop locations in
    location rows r0:r1 (all by default); sq = sum (2u - 255)^2 = 255^2 ||x||^2, exact in integers.
    Kept in a cache (oldest out first) while within the budget. With `stream`, patches not in the cache
    are a `StreamedPatches` (unfolded per key chunk) when they exceed the budget or `build` is False (a
    small call, for which building them costs as much as its whole pass); their norms are cached alone."""
    gh = data.shape[1] - sh + 1
    r0, r1 = rows or (0, gh)
    key = (id(data.images), data.images.data_ptr(), tuple(data.images.shape), sh, sw, r0, r1)
    u8, sq = _PATCHES.get(key, (None, None))
    if u8 is not None:
        return u8, sq
    imgs = data.images[:, :, r0:r1 - 1 + sh]
    sq = crop_sq_norms(imgs, sh, sw) if sq is None else sq
    streamed = StreamedPatches(imgs, sh, sw)
    if stream and (patch_bytes(streamed.shape) > _CACHE_BUDGET or not build):
        _keep(key, None, sq)
        return streamed, sq
    u8 = unfold_u8(imgs, sh, sw)
    _keep(key, u8, sq)
    return u8, sq


def _keep(key, u8: torch.Tensor | None, sq: torch.Tensor) -> None:
    """Cache (u8 or None: the norms alone, sq) under `key`, evicting the oldest entries to stay within the
    budget; an entry larger than the budget is not kept."""
    size = lambda entry: entry[1].numel() * 4 + (0 if entry[0] is None else entry[0].numel())  # noqa: E731
    _PATCHES.pop(key, None)
    if size((u8, sq)) > _CACHE_BUDGET:
        return
    while _PATCHES and sum(map(size, _PATCHES.values())) + size((u8, sq)) > _CACHE_BUDGET:
        _PATCHES.pop(next(iter(_PATCHES)))
    _PATCHES[key] = (u8, sq)


def crop_sq_norms(images: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """255^2 ||x_C||^2 of every (sh x sw) crop of uint8 images [N, C, H, W] -> int32 [P, N], exactly:
    per-pixel integer squares (2u - 255)^2 summed over channels, box-summed by integer prefix sums (O(1)
    per crop whatever its size) in the [H, W, N] layout, where each step adds contiguous N-vectors."""
    out = torch.empty((images.shape[2] - sh + 1) * (images.shape[3] - sw + 1), images.shape[0], dtype=torch.int32,
                      device=images.device)
    for i in range(0, images.shape[0], SQ_NORM_IMAGES):  # in image chunks: bounded temporaries
        v = images[i:i + SQ_NORM_IMAGES].permute(1, 2, 3, 0).to(torch.int32) * 2 - 255  # [C, H, W, n]
        cum = F.pad((v * v).sum(0).cumsum(0).cumsum(1), (0, 0, 1, 0, 1, 0))  # [H+1, W+1, n]
        box = cum[sh:, sw:] - cum[:-sh, sw:] - cum[sh:, :-sw] + cum[:-sh, :-sw]
        out[:, i:i + SQ_NORM_IMAGES] = box.reshape(out.shape[0], -1)
    return out


def patch_bytes(shape) -> int:
    """Bytes of one size's cached patches [P, N, d] (uint8) and their int32 norms."""
    p, n, d = shape
    return p * n * (d + 4)


def exact_memory(data: TrainingSet, sizes, batch: int) -> int:
    """Peak bytes of exact calls beyond the data, an upper bound: the cached patches (up to the budget)
    plus the largest size's being built, its queries and accumulators (float64 [P, 2B, d+3] each) and
    one tile's temporaries. sizes: (sh, sw) pairs."""
    c, h, w = data.shape
    per = []
    for sh, sw in sizes:
        p, d = (h - sh + 1) * (w - sw + 1), c * sh * sw
        per.append((patch_bytes((p, data.n_stored, d)), 2 * 8 * p * 2 * batch * (d + 3)))
    # a size's patches are built before the cache evicts for them: the cache's content plus the largest size
    cache = min(_CACHE_BUDGET, sum(b for b, _ in per))
    tile = TILE_ELEMENTS * (8 + 4 + 8) + KEYS_PER_TILE * max(c * sh * sw for sh, sw in sizes) * 64
    return int(cache + max(b for b, _ in per) + max(a for _, a in per) + tile)


def stored_key_chunks(u8: torch.Tensor, sq: torch.Tensor, n: int, log_w: torch.Tensor | None = None,
                      skip_excluded: bool = False):
    """chunks() over location-major patches u8 [G, N, d] (sq int32 [G, N] = 255^2 ||x||^2), n keys a
    chunk; log_w [N], per query [b, N] (the rows of every group), or None. With `skip_excluded` and a
    quarter or more of the keys at log weight -inf for every query (a class-conditional set, say), only
    the others are gathered and streamed: a first pass does not depend on key order, but `start` then no
    longer numbers the chunk's keys (no weights pass may use it)."""
    keep = None
    if skip_excluded and log_w is not None:
        out = torch.isinf(log_w) if log_w.ndim == 1 else torch.isinf(log_w).all(0)
        if int(out.sum()) * 4 >= len(out):
            keep = (~out).nonzero().flatten()

    def chunks():
        if keep is not None:
            for i in range(0, len(keep), n):
                idx = keep[i:i + n]
                yield i, KeyChunk(u8[:, idx], sq[:, idx].to(torch.float64) / 255.0 ** 2, log_w[..., idx][None])
            return
        for i in range(0, u8.shape[1], n):
            lw = None if log_w is None else log_w[None, ..., i:i + n]
            yield i, KeyChunk(u8[:, i:i + n], sq[:, i:i + n].to(torch.float64) / 255.0 ** 2, lw)
    return chunks


# ------------------------------------------------------------------------------------------------
# composites
# ------------------------------------------------------------------------------------------------

def _fold(patches: torch.Tensor, h: int, w: int, sh: int, sw: int) -> torch.Tensor:
    """Sum of per-location patches [P, B, C*sh*sw] into images [B, C, h, w] (the adjoint of unfold)."""
    return F.fold(patches.permute(1, 2, 0), (h, w), (sh, sw))  # F.fold takes [B, C*sh*sw, P]


def square_composite(z: torch.Tensor, t: torch.Tensor, data: TrainingSet, sh: int, sw: int | None = None,
                     rows: tuple[int, int] | None = None, coverage: torch.Tensor | None = None,
                     on_weights: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                     log_w: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                     chunk: int | None = None, on_shares: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                     weight_ids: torch.Tensor | None = None) -> torch.Tensor:
    """PSPC composite (Eq. 11) over every (sh x sw) crop location, exactly: the patch posterior at each
    location over the same-location training patches (flips included when `data.xflip`), averaged per
    pixel over the crops covering it. sh = H and sw = W is the optimal denoiser D* (Eq. 6-7).

    z [B, C, H, W] float in [-1, 1] units (noisy); t [B] float64 (EDM sigma) -> [B, C, H, W] float32.
    rows: only the crop locations whose top row is in r0:r1 (torchrun location split); the result is
    then that part of the composite's sum, divided by the whole crop set's `coverage` ([H, W], default
    this crop set's). log_w [N] (stored images; flips share their original's): per-image log weights;
    [B, N]: per query and image (counterfactuals of several exclusions in one batch, `PSPCSquare(...,
    query_exclusions=...)`).
    on_weights(ids, a [B, n, H, W]) sees the per-pixel weights a_i[p] = (1/#crops covering p)
    sum_{C covers p} w_i(C) of the virtual images ids (long [n]; attribution); over all calls sum_i a_i[p] = 1.
    on_shares(ids, a [B, n]) sees only their shares sum_p a_i[p] / HW, without forming the maps:
    sum_C w_i(C) kappa_C / HW with kappa_C = sum_{p in C} 1/#crops covering p (attribution's shares).
    weight_ids (long [m], stored images): the weights pass streams only these images' keys (and their
    flips'), normalised by the first pass over all keys: the maps of a few chosen images cost a pass over
    m keys, not N. None: every image.
    dtype: the kernel precision (see `patch_posterior`); chunk: keys per chunk (default `keys_per_chunk`).
    """
    sw = sh if sw is None else sw
    b, c, h, w = z.shape
    gh, gw = h - sh + 1, w - sw + 1
    r0, r1 = rows or (0, gh)
    log_w = _combine_log_w(log_w, data.log_weights())
    # queries: z and, for the flipped half, flip(z) (its location p holds the mirror of p's flipped keys)
    zz = torch.cat([z, z.flip(-1)]) if data.xflip else z
    u8, sq = square_patches(data, sh, sw, rows, stream=True, build=len(zz) >= FUSED_MIN_ROWS)
    q = unfold_u8(zz[:, :, r0:r1 - 1 + sh].to(torch.float64), sh, sw)  # [P, B or 2B, d]
    t2 = torch.cat([t, t]) if data.xflip else t
    dtype = dtype or logit_dtype(q, t2, q.shape[-1], _finite_max_abs(log_w))
    lw = None if log_w is None else log_w.to(z.device)
    if lw is not None and lw.ndim == 2 and data.xflip:  # the flip(z) rows exclude what their z rows do
        lw = torch.cat([lw, lw])
    chunks = stored_key_chunks(u8, sq, chunk or keys_per_chunk(z.device, len(zz)), lw, skip_excluded=True)
    mean, lse = patch_posterior(q, t2, chunks, dtype)
    mirror = torch.arange(len(q), device=z.device).view(r1 - r0, gw).flip(1).flatten()
    if data.xflip:
        # the flipped half at location p: the flip(z) rows at mirror(p), their means flipped back
        mb = mean[mirror, b:].unflatten(-1, (c, sh, sw)).flip(-1).flatten(2)
        mean, lse = merge(mean[:, :b], lse[:, :b], mb, lse[mirror, b:])
    cov = _coverage(h, w, sh, sw) if coverage is None else coverage
    out = torch.zeros(b, c, h, w, dtype=torch.float64, device=z.device)
    out[:, :, r0:r1 - 1 + sh] = _fold(mean, r1 - 1 + sh - r0, w, sh, sw)
    if on_weights is not None or on_shares is not None:
        ids = (torch.arange(data.n_stored, device=z.device) if weight_ids is None
               else torch.as_tensor(weight_ids, dtype=torch.long).to(z.device))
        keys = (u8, sq, lw) if weight_ids is None else (u8[:, ids], sq[:, ids], None if lw is None else lw[..., ids])
        _square_weights(q, t2, stored_key_chunks(*keys[:2], KEYS_PER_TILE, keys[2]), lse, mirror, b, data, ids,
                        (r0, r1), sh, sw, h, w, cov, on_weights or on_shares, dtype, shares=on_weights is None)
    return (out / cov.to(out)).to(torch.float32)


def _finite_max_abs(log_w: torch.Tensor | None) -> float:
    """Largest |log w| over the keys that take part (-inf excludes a key; it adds no rounding)."""
    if log_w is None or not bool(torch.isfinite(log_w).any()):
        return 0.0
    return float(log_w[torch.isfinite(log_w)].abs().max())


def _combine_log_w(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a.to(b) + b


def _coverage(h: int, w: int, sh: int, sw: int) -> torch.Tensor:
    """How many (sh x sw) crops cover each pixel, [H, W] float64."""
    ones = torch.ones(1, sh * sw, (h - sh + 1) * (w - sw + 1), dtype=torch.float64)
    return F.fold(ones, (h, w), (sh, sw))[0, 0]


def _square_weights(q, t2, chunks, lse, mirror, b, data, ids, rows, sh, sw, h, w, cov, on_weights, dtype,
                    shares: bool = False):
    """Second pass for attribution: per-location weights -> per-pixel weights of the original images
    (rows :b of q) and of their flips (rows b: at the mirrored locations), both over the merged lse;
    with `shares` only their sums over the pixels / HW (no per-pixel maps formed). ids [n]: the stored
    images whose keys `chunks` streams, in order."""
    r0, r1 = rows
    full = torch.cat([lse, lse[mirror]], 1) if data.xflip else lse
    inv_cov = 1 / cov.to(q.device, torch.float64)
    # kappa_C / HW per location: a crop's weight spread over its pixels, each divided by its coverage
    kappa = F.unfold(inv_cov[None, None, r0:r1 - 1 + sh], (sh, sw)).sum(1)[0] / (h * w)

    def per_pixel(wl):  # [P, B, n] location weights -> [B, n, H, W]
        bb, n = wl.shape[1:]
        cols = wl.permute(1, 2, 0).reshape(bb * n, 1, -1).expand(-1, sh * sw, -1)
        a = torch.zeros(bb * n, 1, h, w, dtype=torch.float64, device=wl.device)
        a[:, :, r0:r1 - 1 + sh] = F.fold(cols, (r1 - 1 + sh - r0, w), (sh, sw))
        return (a[:, 0] * inv_cov).reshape(bb, n, h, w)

    def per_image(wl):  # [P, B, n] location weights -> shares [B, n]
        return torch.einsum("prn,p->rn", wl.to(torch.float64), kappa)

    report = per_image if shares else per_pixel

    def hook(start, wts):
        part = ids[start:start + wts.shape[2]]
        on_weights(part, report(wts[:, :b]))
        if data.xflip:
            on_weights(data.n_stored + part, report(wts[mirror, b:]))
    posterior_weights_pass(q, t2, chunks, full, hook, dtype)


def empirical_mean(z: torch.Tensor, t, data: TrainingSet, chunk: int | None = None) -> torch.Tensor:
    """Optimal denoiser D*(z, t) = sum_i softmax_i(-||z - x_i||^2 / 2t^2) x_i (Eq. 6-7): the composite of
    the one full-image crop. z [B, C, H, W] in [-1, 1]; t scalar or [B] (EDM sigma) -> [B, C, H, W]."""
    b, _, h, w = z.shape
    return square_composite(z, _t_column(t, b), data, h, w, chunk=chunk).to(z.dtype)


def _t_column(t, batch: int) -> torch.Tensor:
    """t as float64 [B] (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)


def _gathered(z: torch.Tensor, data: TrainingSet, pix: torch.Tensor, step: int):
    """Queries and key chunks of G equal-size crops given as pixel indices pix [G, m] (row-major over
    H x W, all channels): (q [G, B, C*m] float64, chunks() over the virtual set, flips and exclusions
    included)."""
    b, c = z.shape[:2]
    g, size = pix.shape
    n_all, log_w = len(data), data.log_weights(virtual=True)
    q = z.flatten(2)[:, :, pix].permute(2, 0, 1, 3).reshape(g, b, c * size).to(torch.float64)

    def chunks():
        for i in range(0, n_all, step):
            u = data.u8(torch.arange(i, min(i + step, n_all), device=z.device)).flatten(2)[:, :, pix]
            u = u.permute(2, 0, 1, 3).reshape(g, -1, c * size)  # [G, n, C*m]
            v = u.to(torch.int32) * 2 - 255
            lw = None if log_w is None else log_w[None, i:i + step]
            yield i, KeyChunk(u, (v * v).sum(2).to(torch.float64) / 255.0 ** 2, lw)
    return q, chunks


def posterior_mean(z: torch.Tensor, t, data: TrainingSet, mask: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None):
    """E[x_M | z_M] = sum_i softmax_i(-||z_M - x_iM||^2 / 2t^2) x_iM over the training set under a pixel
    mask M (all channels of a chosen pixel; None: the whole image, the optimal denoiser), with its log
    normaliser log Z = log sum_i exp(-||z_M - x_iM||^2 / 2t^2) (a Gaussian kernel-density log score up to
    the constant -|M| log(2 pi t^2) / 2). For closed-form diffusion, unlearning targets, kNN scores.

    z [B, C, H, W] float in [-1, 1]; t scalar or [B] (EDM sigma, > 0); mask bool [H, W] (at least one
    pixel). Excluded images (`TrainingSet.without`) take no part. Returns (mean [B, C, H, W] float32,
    the posterior mean on the mask and 0 elsewhere; log_z [B] float64). Raises ValueError for a mask of
    another shape or an empty one.
    """
    b, c, h, w = z.shape
    t = _t_column(t, b)
    mask = torch.ones(h, w, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    if tuple(mask.shape) != (h, w):
        raise ValueError(f"mask has shape {list(mask.shape)}, expected [{h}, {w}]")
    pix = mask.flatten().nonzero().flatten()[None].to(z.device)
    if pix.shape[1] == 0:
        raise ValueError("empty mask")
    q, chunks = _gathered(z, data, pix, keys_per_chunk(z.device, b))
    mean, lse = patch_posterior(q, t, chunks, dtype)
    out = torch.zeros(b, c, h * w, dtype=torch.float32, device=z.device)
    out[:, :, pix[0]] = mean[0].view(b, c, -1).to(torch.float32)
    # the kernel's lse leaves out the row constant -||z_M||^2 / 2t^2
    return out.view(b, c, h, w), lse[0] - (q[0] ** 2).sum(1) / (2 * t.to(q) ** 2)


def _masked_images(z: torch.Tensor, data: TrainingSet, flat: torch.Tensor, step: int):
    """Queries and key chunks of K crops (bool [K, H*W]) as masked whole images: group b holds query b's
    K crops as rows z_b * a_k (zero outside crop k, all channels), the keys are the whole images of the
    virtual set, shared by every group, with each row's crop norms ||x_Ck||^2 (KeyChunk's masked queries).
    -> (q [B, K, C*H*W] float64, chunks())."""
    b, c = z.shape[:2]
    a = flat.to(torch.float64).repeat(1, c)  # [K, C*H*W], channel-major like z.flatten(1)
    q = z.flatten(1).to(torch.float64)[:, None] * a
    n_all, log_w = len(data), data.log_weights(virtual=True)

    def chunks():
        for i in range(0, n_all, step):
            u = data.u8(torch.arange(i, min(i + step, n_all), device=z.device)).flatten(1)  # [n, C*H*W]
            x2 = (u.to(torch.int32) * 2 - 255).to(torch.float64) ** 2 / 255.0 ** 2
            sq = a @ x2.T  # [K, n]: every crop's norm of every key
            lw = None if log_w is None else log_w[None, i:i + step]
            yield i, KeyChunk(u[None].expand(b, -1, -1), sq[None].expand(b, -1, -1), lw)
    return q, chunks


def _dense_mask_sum(z, t, data: TrainingSet, flat: torch.Tensor, dtype, chunk) -> torch.Tensor:
    """The dense formulation's composite sum: sum over the crops (bool [K, H*W]) covering each pixel of
    their patch posterior means, [B, C, H, W] float64 (not yet divided by the coverage)."""
    b, c, h, w = z.shape
    q, chunks = _masked_images(z, data, flat, chunk or tile_keys(z.device))
    tk = t[:, None].expand(b, len(flat))
    mean, _ = patch_posterior(q, tk, chunks, dtype or logit_dtype(q, tk, q.shape[-1]))
    # each crop's mean on its own pixels only
    return (mean.view(b, -1, c, h * w) * flat.to(mean)[None, :, None]).sum(1).view(b, c, h, w)


def mask_composite(z: torch.Tensor, t, data: TrainingSet, masks: torch.Tensor,
                   on_weights: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                   dtype: torch.dtype | None = None, chunk: int | None = None,
                   dense: bool | None = None) -> torch.Tensor:
    """PSPC composite (Eq. 11) over arbitrary crops `masks` (bool [K, H, W], all channels of a chosen
    pixel; PSPC-Flex, Eq. 12). Every pixel must be covered (MaskCrops checks). z [B, C, H, W], t scalar
    or [B] -> [B, C, H, W]. on_weights(ids, a [B, n, H, W]) as in `square_composite` (over the virtual
    set, flips explicit). Two formulations of the same sums:
      gathered (CPU, and any call with on_weights): crops are index gathers, masks of equal size run as
        one batch of groups: B N sum_k |C_k| terms, but ~10^2 sizes x chunks of small gathers and GEMMs;
      dense (default on CUDA, and on the CPU for crops covering >= DENSE_MIN_FILL of the image on
        average): every crop a masked whole image (`_masked_images`), two large GEMMs per key chunk:
        B N K H W terms (1.4-4x more at PSPC-Flex's lambda >= 0.7), no gathers.
    """
    b, c, h, w = z.shape
    t = _t_column(t, b)
    flat = masks.to(z.device).flatten(1)
    cov = flat.sum(0).to(torch.float64).reshape(h, w)
    if dense is None:
        dense = z.device.type == "cuda" or float(flat.sum()) >= DENSE_MIN_FILL * flat.numel()
    if on_weights is None and dense:
        return (_dense_mask_sum(z, t, data, flat, dtype, chunk) / cov).to(torch.float32)
    out = torch.zeros(b, c, h * w, dtype=torch.float64, device=z.device)
    sizes = flat.sum(1)
    for size in sizes.unique().tolist():
        sel = (sizes == size).nonzero().flatten()
        pix = flat[sel].nonzero()[:, 1].view(len(sel), size)  # [G, m] pixel indices, row-major
        q, chunks = _gathered(z, data, pix, chunk or keys_per_chunk(z.device, b))
        dt = dtype or logit_dtype(q, t, q.shape[-1])
        mean, lse = patch_posterior(q, t, chunks, dt)
        # each crop's mean back onto its pixels
        out.index_add_(2, pix.flatten(), mean.view(len(sel), b, c, size).permute(1, 2, 0, 3).reshape(b, c, -1))
        if on_weights is not None:
            def hook(start, wts, pix=pix, size=size):
                bb, n = wts.shape[1:]
                a = torch.zeros(bb, n, h * w, dtype=torch.float64, device=z.device)
                a.index_add_(2, pix.flatten(), wts.permute(1, 2, 0).repeat_interleave(size, 2))
                on_weights(torch.arange(start, start + n, device=z.device), (a / cov.flatten()).view(bb, n, h, w))
            posterior_weights_pass(q, t, _gathered(z, data, pix, KEYS_PER_TILE)[1], lse, hook, dt)
    return (out.view(b, c, h, w) / cov).to(torch.float32)


def composite_mean(z: torch.Tensor, t, data: TrainingSet, crops, on_weights=None, coverage=None,
                   dtype: torch.dtype | None = None, chunk: int | None = None) -> torch.Tensor:
    """PSPC composite (Eq. 11) over a crop set (geometry.SquareCrops or MaskCrops): `square_composite`
    or `mask_composite`. z [B, C, H, W] in [-1, 1]; t scalar or [B] (EDM sigma) -> [B, C, H, W] float32.
    `coverage` [H, W]: divide by another crop set's coverage (a part of a larger set)."""
    from .geometry import SquareCrops

    t = _t_column(t, z.shape[0])
    if isinstance(crops, SquareCrops):
        return square_composite(z, t, data, crops.s, coverage=coverage, on_weights=on_weights, dtype=dtype,
                                chunk=chunk)
    if coverage is not None:
        raise ValueError("coverage applies to square crop sets")
    return mask_composite(z, t, data, crops.masks(), on_weights=on_weights, dtype=dtype, chunk=chunk)


# ------------------------------------------------------------------------------------------------
# ragged keys: every query its own ranges of one key array (projection cells), compiled
# ------------------------------------------------------------------------------------------------

PIXEL = np.arange(256) / 127.5 - 1  # uint8 value -> pixel in [-1, 1]


@jit()
def ragged_terms(z, inv_2t2, u8, counts, j0, j1, state):
    """Add the exact terms count_j e^(-||z - x_j||^2 inv_2t2) of keys j0..j1-1 to one query's softmax state.

    z [d] float64 query patch in [-1, 1]; inv_2t2 = 1 / 2t^2 (t the EDM sigma); u8 [E, d] uint8 keys
    (x = u / 127.5 - 1); counts [E] integer multiplicities (log count enters the logit: exact for identical
    keys); state [d + 2] float64 (m, s, acc): running max logit m (-inf: empty), sum of e^(l - m), and
    sum of e^(l - m) x. Terms below e^EXP_FLOOR of the running max are dropped, as in the other forms."""
    d = z.shape[0]
    # 1. the range's logits and their max (the running max moves once per range)
    logits = np.empty(j1 - j0)
    top = state[0]
    for j in range(j0, j1):
        dist = 0.0
        for k in range(d):
            diff = z[k] - PIXEL[u8[j, k]]
            dist += diff * diff
        c = counts[j]
        logits[j - j0] = -dist * inv_2t2 + (0.0 if c == 1 else math.log(c))
        top = max(top, logits[j - j0])
    if top > state[0]:  # a new running max: rescale what was summed
        scale = math.exp(state[0] - top) if state[0] > -math.inf else 0.0
        for k in range(d + 1):
            state[1 + k] *= scale
        state[0] = top
    # 2. the terms relative to it, summed with their pixels
    for j in range(j0, j1):
        if logits[j - j0] - top >= EXP_FLOOR:
            w = math.exp(logits[j - j0] - top)
            state[1] += w
            for k in range(d):
                state[2 + k] += w * PIXEL[u8[j, k]]


@jit(parallel=True)  # not cached: a cache would not see changes to ragged_terms
def _ragged(q, inv_2t2, u8, counts, ptr, lo, hi, out):
    for p in prange(q.shape[0]):
        state = np.zeros(q.shape[1] + 2)
        state[0] = -np.inf
        for r in range(ptr[p], ptr[p + 1]):
            ragged_terms(q[p], inv_2t2[p], u8, counts, lo[r], hi[r], state)
        out[p] = state


def ragged_posterior(q: torch.Tensor, t: torch.Tensor, u8: torch.Tensor, counts: torch.Tensor, ptr: torch.Tensor,
                     lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior of each query over its own key ranges, float64 throughout (`ragged_terms`).

    q [n, d] float64 queries in [-1, 1]; t [n] float64 (EDM sigma); keys u8 [E, d] uint8 with counts [E]
    (any integer type); query p's keys are the ranges lo[r]..hi[r]-1 for r in ptr[p]..ptr[p+1]-1 (ptr
    [n + 1], lo, hi [R] int64). Returns (mean [n, d] float64, log_z [n] float64 = log sum_j count_j
    e^(-||z - x_j||^2 / 2t^2), with the row constant, unlike `patch_posterior`'s lse); a query without keys
    has log_z -inf, mean NaN."""
    n, d = q.shape
    out = np.empty((n, d + 2))
    set_jit_threads()
    _ragged(q.numpy(), (0.5 / t ** 2).numpy(), u8.numpy(), counts.numpy(), ptr.numpy(), lo.numpy(), hi.numpy(), out)
    return ragged_state(torch.from_numpy(out))


def set_jit_threads() -> None:
    """Compiled loops run on torch's number of threads (at most numba's)."""
    if COMPILED:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def ragged_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax states [n, d + 2] (`ragged_terms`) -> (mean [n, d], log_z [n]) float64."""
    return state[:, 2:] / state[:, 1:2], state[:, 0] + torch.log(state[:, 1])
