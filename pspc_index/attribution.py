"""Exact training-data attribution for PSPC-Square (DESIGN.md section 3).

The PSPC composite is a per-pixel convex combination of training pixels,
    D[c, p] = sum_i a_i[p] x_i[c, p],   sum_i a_i[p] = 1 at every pixel p,
so each (virtual) training image i has an exact *map* a_i[.] and a *share* sum_p a_i[p] / (H W) of the
output (shares sum to 1 per query). Both come from the denoiser's weights callback, in the
same streaming passes that compute the denoiser output: memory stays bounded for any N (shares are
[B, N_virtual] float64; maps are kept only for the top-m images, found in a second evaluation).

The weights are the denoiser's own (`patch_mean(..., on_weights)`): the exact path reports every image
(s = H as the composite over the single full-image crop, which equals `empirical_mean`), the retrieval
path only its candidates and tail draws, so attribution there costs what a retrieval call costs. With
`--tail sample`, a tail draw carries its importance weight N/m: its share estimates the mass of the
images it stands for, not its own. `--tail none` (pure top-k) is the sparse, per-image choice.

Trajectory attribution (a recorded PF-ODE sample) aggregates per-step shares with `euler_weights`;
see that function for the weighting and its derivation.

Attribution checks itself (`verify_attribution`): PSPC needs no training, so removing an output's top
images and recomputing it from the same noise is the exact counterfactual, compared with removing as
many random images.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .denoisers import PSPCSquare, as_t
from .errors import UserError
from .outputs import save_png


class TopMaps(NamedTuple):
    """Per query: virtual ids [B, m] (share desc, ties by id asc) and their maps a_i [B, m, H, W] float64."""

    ids: torch.Tensor
    maps: torch.Tensor


def attribution_maps(denoiser: PSPCSquare, z: torch.Tensor, t, top: int | None = None,
                     ids: torch.Tensor | None = None):
    """Shares [B, Nv] float64 of every virtual training image in D(z, t), and per-pixel maps.

    top: maps of the top-m images per query -> TopMaps (a second evaluation, once the shares are
    known). ids [B, m]: maps of these virtual ids instead (e.g. chosen from aggregated shares).
    Neither: maps is None. The weights come from the denoiser's own evaluation: dense over all images
    on the exact path, sparse (k candidates + tail ids) on the retrieval path, so cost follows k.
    """
    if not isinstance(denoiser, PSPCSquare):
        raise UserError(f"attribution needs the pspc-square denoiser, got {getattr(denoiser, 'name', denoiser)}")
    if top is not None and ids is not None:
        raise ValueError("give top or ids, not both")
    data = denoiser.data
    z = torch.as_tensor(z)
    if z.ndim != 4 or tuple(z.shape[1:]) != tuple(data.shape):
        raise UserError(f"z has shape {list(z.shape)}, expected [B, {', '.join(map(str, data.shape))}]")
    if not torch.isfinite(z).all():
        raise UserError("z contains NaN or Inf")
    if top is not None and top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    b, (_, h, w), nv = z.shape[0], data.shape, len(data)
    tt = as_t(t, b)
    z = z.to(data.device, torch.float32)
    sizes = denoiser.sizes(tt)

    def evaluate(keep: torch.Tensor | None):
        """One evaluation of D(z, t): shares of every image, and the maps of the ids `keep` [B, m]."""
        shares = torch.zeros(b, nv, dtype=torch.float64)
        maps = None if keep is None else torch.zeros(b, keep.shape[1], h, w, dtype=torch.float64)
        for s in sizes.unique().tolist():
            sel = (sizes == s).nonzero().flatten()

            def on_weights(rows, pid, a, win, sel=sel):
                r, pid, a = sel[rows], pid.cpu(), a.to(torch.float64).cpu()
                # ids may repeat (tail draws): scatter-add sums their terms
                shares[r] = shares[r].scatter_add(1, pid, a.sum((2, 3)) / (h * w))
                if keep is not None:
                    r0, r1, c0, c1 = win
                    hit = (pid[:, :, None] == keep[r][:, None, :]).to(torch.float64)  # [r, n, m]
                    maps[r, :, r0:r1, c0:c1] += torch.einsum("rnm,rnhw->rmhw", hit, a)

            qlw = denoiser.query_log_w
            per_query = {} if qlw is None else {"log_w": qlw[sel]}
            if type(denoiser) is PSPCSquare:  # the exact path: shares without maps, maps of the kept keys only
                if keep is None:

                    def on_shares(ids, a, sel=sel):
                        shares[sel[:, None], ids.cpu()[None]] += a.cpu()
                    denoiser.patch_mean(z[sel.to(z.device)], tt[sel], int(s), on_shares=on_shares, **per_query)
                    continue
                per_query["weight_ids"] = torch.unique(keep[sel] % data.n_stored)
            denoiser.patch_mean(z[sel.to(z.device)], tt[sel], int(s), on_weights, **per_query)
        return shares, maps

    if ids is not None:
        keep = ids.clone().long().cpu()
        shares, maps = evaluate(keep)
        return shares, TopMaps(keep, maps)
    shares, _ = evaluate(None)
    if top is None:
        return shares, None
    keep = top_ids(shares, top, data)
    return shares, TopMaps(keep, evaluate(keep)[1])


def top_ids(shares: torch.Tensor, m: int, data=None) -> torch.Tensor:
    """Virtual ids [B, m] by share, largest first, ties by ascending id. With `data` (the TrainingSet the
    shares are over), images it excludes are never among them (m is capped at data.n_included)."""
    if data is not None and data.excluded is not None:
        gone = data.excluded.repeat(2 if data.xflip else 1)
        shares, m = shares.masked_fill(gone, -np.inf), min(m, data.n_included)
    return torch.sort(shares, dim=1, descending=True, stable=True).indices[:, :min(m, shares.shape[1])]


def ranking(data, shares: torch.Tensor, m: int, labels=None) -> list[list[dict]]:
    """Per query, the top-m images as {"index", "flip", "share", "label"}, largest share first (never an
    image `data` excludes)."""
    out = []
    for row, ids in zip(shares, top_ids(shares, m, data)):
        entries = []
        for i in ids.tolist():
            idx, flip = data.describe(i)
            entries.append({"index": idx, "flip": flip, "share": float(row[i]),
                            "label": None if labels is None else int(labels[idx])})
        out.append(entries)
    return out


def forward_query(x: torch.Tensor, t: float, seed: int = 0) -> torch.Tensor:
    """z = x + t eps, eps ~ N(0, I) seeded (one generator for the batch)."""
    g = torch.Generator().manual_seed(int(seed))
    return x.to(torch.float32) + float(t) * torch.randn(x.shape, generator=g)


def attribute(denoiser: PSPCSquare, z: torch.Tensor, t, top: int = 10, labels=None, maps: bool = False):
    """Attribution of D(z, t): (ranking list per query, shares [B, Nv], TopMaps or None)."""
    shares, tm = attribution_maps(denoiser, z, t, top=top if maps else None)
    return ranking(denoiser.data, shares, top, labels), shares, tm


def attribute_image(denoiser: PSPCSquare, x: torch.Tensor, t: float, seed: int = 0, top: int = 10,
                    labels=None, maps: bool = False):
    """Attribution of the denoised forward-process query z = x + t eps (seeded); see `attribute`."""
    return attribute(denoiser, forward_query(x, t, seed), t, top, labels, maps)


def euler_weights(ts) -> torch.Tensor:
    """Weights [S] (sum 1) of the S recorded steps t_0 > ... > t_{S-1} of an Euler PF-ODE sample.

    Euler on dz/dt = (z - D)/t gives z_{i+1} = r_i z_i + (1 - r_i) D_i with r_i = t_{i+1}/t_i. The last
    step goes to t = 0 (r = 0), so the sample is x = D_{S-1}(z_{S-1}, t_{S-1}): a cleanup at t_min that
    moves z_{S-1} by O(t_min). Unrolling the recurrence up to the state it cleans,
        z_{S-1} = sum_{i<S-1} c_i D_i + (t_{S-1}/t_0) z_0,   c_i = (1 - r_i) prod_{i<j<S-1} r_j
                = (t_i - t_{i+1}) t_{S-1} / (t_i t_{i+1}),
    and the c_i telescope to 1 - t_{S-1}/t_0. Step i < S-1 gets weight c_i (the coefficient with which its
    denoiser output enters the content of the sample), and the final step gets the remaining
    t_{S-1}/t_0: the fraction of z_{S-1} that is still initial noise, which the last denoise replaces.
    The c_i are computed numerically by unrolling the recurrence. Late (small-t) steps dominate, as
    they fix the sample's pixels; early steps, whose posteriors are diffuse, weigh little.
    """
    ts = torch.as_tensor(np.asarray(ts), dtype=torch.float64).reshape(-1)
    if len(ts) == 0 or not torch.isfinite(ts).all() or (ts <= 0).any():
        raise UserError("trajectory noise levels ts must be finite and > 0")
    if len(ts) > 1 and (ts[1:] >= ts[:-1]).any():
        raise UserError("trajectory noise levels ts must decrease")
    n = len(ts)
    w = torch.zeros(n, dtype=torch.float64)
    for i in range(n - 1):  # coefficient of z_0 and of D_i in z_{i+1}, carried forward
        r = ts[i + 1] / ts[i]
        w[:i] *= r
        w[i] = 1 - r
    w[n - 1] = ts[n - 1] / ts[0]
    return w


def attribute_trajectory(denoiser: PSPCSquare, ts, zs: torch.Tensor, top: int = 10, labels=None,
                         maps: bool = False):
    """Attribution of recorded samples: shares of every step (z_i at t_i, zs [S, B, C, H, W]) aggregated
    with `euler_weights`. With `maps`, the top ids' maps are aggregated the same way (second evaluation).
    Steps that use the same patch size run as one batch (`_over_steps`)."""
    zs = torch.as_tensor(zs)
    w = euler_weights(ts)
    if zs.ndim != 5 or zs.shape[0] != len(w):
        raise UserError(f"trajectory z has shape {list(zs.shape)}, expected [{len(w)}, B, C, H, W]")
    shares = _over_steps(denoiser, ts, zs, w, lambda z, t, rows: attribution_maps(denoiser, z, t)[0])
    tm = None
    if maps:
        ids = top_ids(shares, top, denoiser.data)
        tm = TopMaps(ids, _over_steps(denoiser, ts, zs, w, lambda z, t, rows: attribution_maps(
            denoiser, z, t, ids=ids[rows])[1].maps))
    return ranking(denoiser.data, shares, top, labels), shares, tm


def _over_steps(denoiser, ts, zs, w, per_batch, rows_per_call: int = 64) -> torch.Tensor:
    """sum_i w_i f(z_i, t_i) over the steps of trajectories zs [S, B, ...], f = per_batch(z [r, ...],
    t [r], query rows [r]) -> [r, ...] (float64). The steps of one patch size are stacked into calls of up
    to `rows_per_call` queries, each with its own t: a size's keys are then converted once for all its
    steps, which dominates the cost of small batches (one sample: 2 rows per location with its flip).
    A denoiser with per-query exclusions (fixed batches) runs step by step."""
    s_steps, b = zs.shape[:2]
    t_all = torch.as_tensor(np.asarray(ts), dtype=torch.float64).repeat_interleave(b)  # step-major, as zs
    z_all, w_all = zs.flatten(0, 1), w.repeat_interleave(b)
    rows_all = torch.arange(b).repeat(s_steps)
    if denoiser.query_log_w is not None:
        groups = [torch.arange(i * b, (i + 1) * b) for i in range(s_steps)]
    else:
        sizes = denoiser.sizes(t_all)
        groups = [sel[j:j + rows_per_call] for s in sizes.unique().tolist()
                  for sel in [(sizes == s).nonzero().flatten()] for j in range(0, len(sel), rows_per_call)]
    total = None
    for sel in groups:
        part = per_batch(z_all[sel], t_all[sel], rows_all[sel]).to(torch.float64)
        total = torch.zeros(b, *part.shape[1:], dtype=torch.float64) if total is None else total
        total.index_add_(0, rows_all[sel], part * w_all[sel].view(-1, *[1] * (part.ndim - 1)))
    return total


def stored_shares(data, shares: torch.Tensor) -> torch.Tensor:
    """Shares [B, N] float64 of the stored images: an image's plus its flip's (shares [B, Nv] over `data`)."""
    n = data.n_stored
    return shares[:, :n] + shares[:, n:] if data.xflip else shares.clone()


def trajectory_settings(ts, zs: torch.Tensor, ds: torch.Tensor) -> tuple[int, str]:
    """(steps, solver) that regenerate a recorded trajectory (ts [S], zs and ds [S, B, C, H, W]) with
    `sampler.pf_ode_sample` from its z_T = zs[0]. A recording does not name its solver; its first step
    does: Euler's is z_1 = z_0 + (t_1 - t_0)(z_0 - D_0)/t_0 exactly (to float32), Heun's is not.
    UserError if ts is not the Karras grid of S steps (the only grid the sampler runs)."""
    from .schedule import karras_grid

    ts = torch.as_tensor(ts, dtype=torch.float64)
    if len(ts) < 2 or not torch.allclose(ts, karras_grid(len(ts)), rtol=1e-6):
        raise UserError(f"the trajectory's {len(ts)} noise levels are not the Karras grid the sampler runs; "
                        "it cannot be regenerated")
    z0, d0, z1 = (v.to(torch.float64) for v in (zs[0], ds[0], zs[1]))
    euler = z0 + (ts[1] - ts[0]) * (z0 - d0) / ts[0]
    return len(ts), "euler" if torch.allclose(euler, z1, rtol=1e-4, atol=1e-5 * float(ts[0])) else "heun"


def verify_attribution(make, data, shares: torch.Tensor, m: int, z: torch.Tensor, t=None, steps: int | None = None,
                       solver: str = "euler", original: torch.Tensor | None = None, draws: int = 5, seed: int = 0):
    """Counterfactual check of an attribution: remove each query's top-m stored images (flips with
    them), recompute its output from the same noise, and compare the change with removing m random images.

    make: TrainingSet -> denoiser (the attributing one's settings over another view of the set).
    data: the TrainingSet the attribution used (its exclusions stay excluded); shares [B, Nv] float64.
    z [B, C, H, W] float32: with `t` (scalar or [B]) the denoiser's input (output D(z, t)); else z_T of a
    PF-ODE sample, regenerated with `steps` and `solver` (`trajectory_settings`).
    original [B, C, H, W]: the output explained (the recorded sample); None: recomputed over `data`.
    The top m are the stored images with the largest share (an image's plus its flip's); the random
    removals are `draws` sets of m images taking part, drawn once from `seed` and shared by the queries.
    Returns (per-query dicts, counterfactual outputs [B, C, H, W] without each query's top m). A dict holds
    "removed" (store indices), "random_removed" (draws x m), "norm" ||x|| (L2 over all pixels, [-1, 1]
    units), "change_top" ||x' - x|| and "change_top_rel" (/ ||x||), "change_random" and
    "change_random_rel" (one per draw), "change_random_mean", and "ratio" change_top / change_random_mean
    (None if random removal changed nothing). UserError unless 1 <= m < the stored images taking part.
    """
    from .sampler import pf_ode_sample

    def run(view, zz, tt):
        """The output over `view`: one denoise at tt, or the PF-ODE sample from zz."""
        den = make(view)
        return (den(zz, tt) if t is not None else pf_ode_sample(den, zz.to(den.device), steps, solver)).cpu()

    z = torch.as_tensor(z, dtype=torch.float32)
    b = len(z)
    tq = None if t is None else torch.as_tensor(t, dtype=torch.float64).expand(b)
    pool = np.flatnonzero(~data.excluded.numpy()) if data.excluded is not None else np.arange(data.n_stored)
    if not 1 <= m < len(pool) or draws < 1:
        raise UserError(f"--verify {m}: need 1 <= M < {len(pool)} (the stored images taking part) and draws >= 1")
    # 1. the output explained, and the top m stored images of each query
    x = run(data, z, tq) if original is None else torch.as_tensor(original, dtype=torch.float32).cpu()
    per = stored_shares(data, shares)
    if data.excluded is not None:
        per = per.masked_fill(data.excluded, -np.inf)
    top = torch.sort(per, dim=1, descending=True, stable=True).indices[:, :m]
    # 2. the counterfactuals from the same noise: each query without its own top m, and all queries
    # without m random images, `draws` times (one set for every query per draw); in one batch of
    # per-query exclusions where the denoiser takes them (one pass over the keys for all)
    rng = np.random.default_rng(seed)
    rand = [np.sort(rng.choice(pool, m, replace=False)) for _ in range(draws)]
    ex = torch.zeros(1 + draws, b, data.n_stored, dtype=torch.bool)
    ex[0].scatter_(1, top, True)
    for i, r in enumerate(rand):
        ex[1 + i, :, torch.as_tensor(r)] = True
    den = make(data)
    if type(den) is PSPCSquare:
        zz, tt = z.repeat(1 + draws, 1, 1, 1), None if tq is None else tq.repeat(1 + draws)
        den.exclude_per_query(ex.flatten(0, 1))
        outs = (den(zz, tt) if t is not None else pf_ode_sample(den, zz.to(den.device), steps, solver)).cpu()
        cf, rand_x = outs[:b], list(outs[b:].unflatten(0, (draws, b)))
    else:
        cf = torch.cat([run(data.without(top[q]), z[q:q + 1], None if tq is None else tq[q:q + 1])
                        for q in range(b)])
        rand_x = [run(data.without(r), z, tq) for r in rand]
    # 3. the changes, L2 over all pixels per sample, absolute and relative to ||x||
    size = lambda v: v.to(torch.float64).flatten(1).norm(dim=1)  # noqa: E731
    norm, top_change = size(x), size(cf - x)
    rand_change = torch.stack([size(v - x) for v in rand_x], 1)  # [B, draws]
    reports = []
    for q in range(b):
        rel = lambda v: float(v / norm[q]) if norm[q] > 0 else None  # noqa: E731
        mean = float(rand_change[q].mean())
        reports.append({"removed": top[q].tolist(), "random_removed": [r.tolist() for r in rand],
                        "norm": float(norm[q]), "change_top": float(top_change[q]),
                        "change_top_rel": rel(top_change[q]), "change_random": rand_change[q].tolist(),
                        "change_random_rel": [rel(v) for v in rand_change[q]], "change_random_mean": mean,
                        "ratio": float(top_change[q]) / mean if mean > 0 else None})
    return reports, cf


def _show(img: np.ndarray):
    """[C, H, W] in [-1, 1] -> something imshow draws, plus its colormap."""
    img = np.clip((np.asarray(img, np.float64) + 1) / 2, 0, 1)
    return (img[0], "gray") if img.shape[0] == 1 else (img.transpose(1, 2, 0), None)


def attribution_panel(path, query_image, top_images, top_maps, shares, columns=None, names=None) -> None:
    """PNG: per query a row with the query, the `columns`, then its top-m training images with their maps
    overlaid.

    query_image [B, C, H, W] (or [C, H, W]) in [-1, 1]; top_images [B, m, C, H, W] in [-1, 1];
    top_maps [B, m, H, W]; shares [B, m] (titles); columns: optional [(title, images [B, C, H, W] in
    [-1, 1])] shown after the query (e.g. the output without the top images); names: optional [B][m]
    strings above each top image's share (e.g. its store index, `tile_names`). Written atomically.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = np.asarray(query_image)
    q = q[None] if q.ndim == 3 else q
    extra = [("query", q)] + [(title, np.asarray(v)) for title, v in (columns or [])]
    imgs, maps, sh = np.asarray(top_images), np.asarray(top_maps), np.asarray(shares)
    b, m = maps.shape[:2]
    k = len(extra)
    # two-line titles (names) need more room between rows than tight_layout finds in 1.8 inches
    fig, axes = plt.subplots(b, m + k, figsize=(1.6 * (m + k), (1.8 if names is None else 2.2) * b), squeeze=False)
    for r in range(b):
        for j, (title, v) in enumerate(extra):
            im, cmap = _show(v[r])
            axes[r, j].imshow(im, cmap=cmap, vmin=0, vmax=1)
            axes[r, j].set_title(title, fontsize=8)
        for j in range(m):
            ax = axes[r, j + k]
            im, cmap = _show(imgs[r, j])
            ax.imshow(im, cmap=cmap, vmin=0, vmax=1)
            mp = maps[r, j]
            ax.imshow(mp, cmap="inferno", alpha=0.55, vmin=0, vmax=max(float(mp.max()), 1e-12))
            ax.set_title(("" if names is None else f"{names[r][j]}\n") + f"share {sh[r, j]:.2g}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_png(path, fig)
    plt.close(fig)


def tile_names(data, ids: torch.Tensor) -> list[list[str]]:
    """Panel titles of virtual ids [B, m]: the store index, and "flip" for a mirror image."""
    def name(i):
        stored, flipped = data.describe(i)
        return f"#{stored} flip" if flipped else f"#{stored}"
    return [[name(i) for i in row] for row in torch.as_tensor(ids).tolist()]


def _load_npy(path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__})") from None


def load_images(path, shape) -> torch.Tensor:
    """Query images .npy: uint8 or float in [-1, 1], [B, C, H, W] matching `shape` -> float32 in [-1, 1]."""
    x = _load_npy(path, ".npy array")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"{path}: images have shape {list(x.shape)}, the store's are [B, {', '.join(map(str, shape))}]")
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 127.5 - 1)
    if x.dtype.kind != "f":
        raise UserError(f"{path}: images must be uint8 or float in [-1, 1], got {x.dtype}")
    if not np.isfinite(x).all() or np.abs(x).max() > 1 + 1e-3:
        raise UserError(f"{path}: float images must be finite and in [-1, 1]")
    return torch.from_numpy(x.astype(np.float32)).clamp(-1, 1)


def check_trajectory_provenance(path, store_sha256: str, exclusion: dict | None) -> None:
    """UserError if the trajectory at `path` records that it was sampled over another store or exclusion
    (`sampler.save_samples`' provenance; trajectories written without one are not checked)."""
    import json

    f = _load_npy(path, "trajectory .npz")
    if not hasattr(f, "files") or "provenance" not in f.files:
        return
    prov = json.loads(str(f["provenance"]))
    if prov.get("store_sha256") != store_sha256:
        raise UserError(f"{path} was sampled over another store (sha256 {str(prov.get('store_sha256'))[:12]}...); "
                        "attribute it with the store it was sampled from")
    if prov.get("exclusion") != exclusion:
        raise UserError(f"{path} was sampled with {exclusion_text(prov.get('exclusion'))}, this run has "
                        f"{exclusion_text(exclusion)}; give attribute the same --exclude / --exclude-label / "
                        "--label as the sample run")


def exclusion_text(record: dict | None) -> str:
    """A run's exclusion record (`counterfactual.Exclusion.record`) in words."""
    if not record:
        return "no exclusion"
    parts = []
    if record.get("count"):
        parts.append(f"{record['count']} excluded images (ids sha256 {str(record.get('sha256'))[:12]}...)")
    if record.get("exclude_labels"):
        parts.append("labels " + ", ".join(map(str, record["exclude_labels"])) + " excluded")
    if record.get("label") is not None:
        parts.append(f"only label {record['label']}")
    return "; ".join(parts) or "no exclusion"


def load_trajectory(path, shape):
    """A `sample --record` trajectory .npz -> (ts [S], z [S, B, C, H, W], denoised [S, B, C, H, W])."""
    f = _load_npy(path, "trajectory .npz")
    if not hasattr(f, "files") or not {"ts", "z", "denoised"} <= set(f.files):
        raise UserError(f"{path}: not a trajectory .npz (needs arrays ts, z, denoised)")
    ts, z, d = f["ts"], f["z"], f["denoised"]
    if z.ndim != 5 or tuple(z.shape[2:]) != tuple(shape) or z.shape[0] != len(ts) or d.shape != z.shape:
        raise UserError(f"{path}: trajectory z has shape {list(z.shape)} for {len(ts)} steps, "
                        f"expected [{len(ts)}, B, {', '.join(map(str, shape))}]")
    if not np.isfinite(z).all():
        raise UserError(f"{path}: trajectory z contains NaN or Inf")
    return torch.from_numpy(ts.astype(np.float64)), torch.from_numpy(z.astype(np.float32)), \
        torch.from_numpy(d.astype(np.float32))
