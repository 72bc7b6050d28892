"""Linear datamodeling score (LDS) of PSPC attribution on Fashion-MNIST (issue 14), under one protocol.

LDS (Park et al. 2023, TRAK; for diffusion models D-TRAK, Zheng et al. 2024): draw K random halves S_k of
the training set, compute a model output f(x; S_k) of every generated sample x under the model "trained"
on S_k, and correlate it across the K subsets with what an attribution tau(x) [N] predicts,
g_k(x) = -sum_{i in S_k} tau_i(x): per sample the Spearman rank correlation over k, averaged over samples
(reported with its standard error over samples). PSPC needs no retraining, so f(x; S_k) is exact: PSPC
over S_k.

Protocol (fixed before the run):
- model: PSPC-Square, exact engine, the Fashion-MNIST schedule, Euler with `--steps` steps, over the
  first `--n-data` stored images (+ flips); S samples from seeded noise (sampler.initial_noise);
- subsets: K seeded random halves of the stored images, an image's flip with it;
- output "loss": f = mean_j lambda(t_j) ||D_S(x + t_j eps_j, t_j) - x||^2 / (C H W), EDM's weighted
  denoising loss (lambda(t) = (t^2 + sd^2) / (t sd)^2, sd = 0.5) at J pairs (t_j, eps_j) per sample, drawn
  once: J noise levels from EDM's training log-normal (ln t ~ N(-1.2, 1.2^2), clipped to the sampler's
  range) shared by all samples, eps_j per sample;
- output "regen": f = ||x_S - x|| (L2, [-1, 1] units), x_S regenerated over S from x's initial noise
  (for the first `--regen-samples` samples; it costs a whole sample run per subset);
- methods (tau >= 0, per stored image, an image's and its flip's summed):
  pspc-trajectory  the sample's trajectory shares (attribution.attribute_trajectory, Euler-weighted);
  pspc-retrieval   the same from an index bundle (--bundle, pure top-k --k; sizes it lacks run exact);
  pspc-loss        the shares of the loss's own denoiser calls D(x + t_j eps_j, t_j), averaged over j;
  pixel-nn         whole-image kernel weights softmax_i(-||x - x_i||^2 / 2 sigma^2), the best of a sigma
                   grid (chosen on this evaluation: optimistic for the baseline);
  nda-patch        translation-pooled patch weights in the manner of NDA (Zhao et al. 2025): each s x s
                   patch of x against every training patch at the same location shifted by up to r
                   pixels, softmax at temperature sigma, an image's weights summed over locations;
  random           seeded uniform scores.

Every stage is saved in --state when done (samples, each method's scores, each subset's outputs), so a
killed run continues; `--helper` processes on the same --state share the subsets' work.

    python tools/lds.py --json --state lds_state            # all 60,000 images, 64 subsets, 32 samples
    python tools/lds.py --helper --state lds_state          # optionally, a second process on the other core
    python tools/lds.py --n-data 300 --subsets 4 --samples 3 --pairs 2 --steps 4 --regen-samples 2 --state /tmp/l
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pspc_index.attribution import attribute_trajectory, attribution_maps, stored_shares
from pspc_index.denoisers import PSPCSquare
from pspc_index.ingest import read_source
from pspc_index.outputs import kept
from pspc_index.posterior import KEYS_PER_TILE, KeyChunk, merge, patch_posterior, square_patches, unfold_u8
from pspc_index.sampler import initial_noise, pf_ode_sample
from pspc_index.schedule import T_MAX, T_MIN
from pspc_index.store import TrainingSet

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2  # EDM's training noise distribution
PIXEL_SIGMAS = (1.0, 2.0, 4.0, 8.0)  # L2 over all pixels, [-1, 1] units


# ------------------------------------------------------------------------------------------------
# model outputs
# ------------------------------------------------------------------------------------------------

def loss_pairs(n: int, pairs: int, shape, seed: int):
    """The fixed (t, eps) of the loss output: t float64 [n, J], eps float32 [n, J, C, H, W]. The J noise
    levels are drawn once from EDM's log-normal (clipped) and shared by the samples, eps per sample and
    pair: a subset's outputs then cost J denoiser calls (one patch size each), not one per patch size the
    n x J draws would touch."""
    g = torch.Generator().manual_seed(seed + 7919)
    t = torch.exp(P_MEAN + P_STD * torch.randn(pairs, generator=g, dtype=torch.float64)).clamp(T_MIN, T_MAX)
    return t.expand(n, pairs).clone(), torch.randn(n, pairs, *shape, generator=g)


def edm_weight(t: torch.Tensor) -> torch.Tensor:
    """EDM's loss weight lambda(t) = (t^2 + sd^2) / (t sd)^2."""
    return (t ** 2 + SIGMA_DATA ** 2) / (t * SIGMA_DATA) ** 2


def loss_output(data: TrainingSet, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """f(x; data) = mean_j lambda(t_j) mean_pixels (D(x + t_j eps_j, t_j) - x)^2, PSPC-Square over data.
    x [n, C, H, W], t [n, J], eps [n, J, C, H, W] -> float64 [n]."""
    n, j = t.shape
    z = (x[:, None] + t[..., None, None, None].float() * eps).flatten(0, 1)
    d = PSPCSquare(data)(z, t.flatten()).view(n, j, *x.shape[1:])
    err = ((d.double() - x[:, None].double()) ** 2).flatten(2).mean(2)
    return (edm_weight(t) * err).mean(1)


def regen_output(data: TrainingSet, x: torch.Tensor, seed: int, steps: int) -> torch.Tensor:
    """||x_S - x|| per sample: x regenerated over `data` from its initial noise. x [n, ...] -> float64 [n]."""
    xs = pf_ode_sample(PSPCSquare(data), initial_noise(seed, range(len(x)), data.shape), steps)
    return (xs.double() - x.double()).flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------------
# attribution methods: tau [n, N] float64 over the stored images
# ------------------------------------------------------------------------------------------------

def pixel_nn_scores(data: TrainingSet, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """softmax_i(-||x - x_i||^2 / 2 sigma^2) over the virtual set, an image's and its flip's summed."""
    xf = x.double().flatten(1)
    logits = torch.cat([-torch.cdist(xf, xi.double().flatten(1)) ** 2 / (2 * sigma ** 2)
                        for _, xi in data.chunks(8192)], 1)
    return stored_shares(data, torch.softmax(logits, 1))


def nda_patch_scores(data: TrainingSet, x: torch.Tensor, s: int, sigma: float, r: int) -> torch.Tensor:
    """Translation-pooled patch attribution (NDA-style): at every s x s location p, the posterior of x's
    patch over the training patches at p + (dy, dx), |dy|, |dx| <= r, and their flips, at temperature
    sigma; tau_i = the mean over locations of image i's (and its flip's) posterior mass. -> [n, N]."""
    n, (_, h, w) = len(x), data.shape
    gh, gw = h - s + 1, w - s + 1
    u8, sq = square_patches(data, s, s)  # [P, N, d] stored patches, sq = 255^2 ||x||^2
    nst = u8.shape[1]
    # queries: x and flip(x); flip(x) at mirror(p) against original keys is x at p against flipped keys
    q = unfold_u8(torch.cat([x, x.flip(-1)]).double(), s, s)  # [P, 2n, d]
    t = torch.full((2 * n,), sigma, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]

    def chunks(step):
        def gen():
            for si, (dy, dx) in enumerate(shifts):
                ty, tx = yy + dy, xx + dx
                ok = ((ty >= 0) & (ty < gh) & (tx >= 0) & (tx < gw)).flatten()
                at = (ty.clamp(0, gh - 1) * gw + tx.clamp(0, gw - 1)).flatten()
                lw = torch.zeros(len(at), 1, dtype=torch.float64).masked_fill(~ok[:, None], -math.inf)
                for i in range(0, nst, step):
                    j = min(i + step, nst)
                    yield si * nst + i, KeyChunk(u8[at, i:j], sq[at, i:j].double() / 255.0 ** 2,
                                                 lw.expand(-1, j - i))
        return gen

    # 1. first pass: log normalisers per (location, row), x's half merged with flip(x)'s at the mirror
    _, lse = patch_posterior(q, t, chunks(8192))
    mirror = torch.arange(gh * gw).view(gh, gw).flip(1).flatten()
    _, tot = merge(torch.zeros(gh * gw, n, 1), lse[:, :n], torch.zeros(gh * gw, n, 1), lse[mirror, n:])
    full = torch.cat([tot, tot[mirror]], 1)
    # 2. second pass: every key's weight under the pooled normaliser, summed per image over locations
    tau = torch.zeros(n, nst, dtype=torch.float64)

    def on_weights(start, wts):
        i = start % nst
        tau[:, i:i + wts.shape[2]] += (wts[:, :n] + wts[:, n:]).sum(0).double()
    patch_posterior(q, t, chunks(KEYS_PER_TILE), lse=full, on_weights=on_weights)
    return tau / (gh * gw)


def method_scores(name: str, data: TrainingSet, st: dict, a) -> torch.Tensor | dict:
    """tau [n, N] of one method (pixel-nn: {sigma: tau})."""
    x = st["x"][:a.samples]
    if name == "pspc-trajectory":
        _, shares, _ = attribute_trajectory(PSPCSquare(data), st["ts"], st["zs"][:, :a.samples], top=1)
        return stored_shares(data, shares)
    if name == "pspc-retrieval":  # the same trajectory shares from an index bundle (pure top-k, sparse)
        from pspc_index.index import open_bundle
        from pspc_index.retrieval import RetrievalPSPC
        from pspc_index.store import ImageStore
        store = ImageStore.open(a.store)
        if len(store.images) != a.n_data or not torch.equal(torch.from_numpy(store.images), data.images):
            raise SystemExit(f"lds: {a.store} is not the first {a.n_data} Fashion-MNIST images")
        den = RetrievalPSPC(data, open_bundle(a.bundle, store), k=a.k)
        _, shares, _ = attribute_trajectory(den, st["ts"], st["zs"][:, :a.samples], top=1)
        return stored_shares(data, shares)
    if name == "pspc-loss":
        t, eps = loss_pairs(a.samples, a.pairs, data.shape, a.seed)
        z = (x[:, None] + t[..., None, None, None].float() * eps).flatten(0, 1)
        shares, _ = attribution_maps(PSPCSquare(data), z, t.flatten())
        return stored_shares(data, shares).view(a.samples, a.pairs, -1).mean(1)
    if name == "pixel-nn":
        return {sg: pixel_nn_scores(data, x, sg) for sg in PIXEL_SIGMAS}
    if name == "nda-patch":
        return nda_patch_scores(data, x, a.nda_size, a.nda_sigma, a.nda_shift)
    if name == "random":
        return torch.from_numpy(np.random.default_rng(a.seed + 17).random((a.samples, data.n_stored)))
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing their average rank."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    _, inv = np.unique(v, return_inverse=True)
    return (np.bincount(inv, r) / np.bincount(inv))[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan if either side is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def lds(tau: np.ndarray, keep: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-sample LDS: Spearman over subsets of predicted g_k = -sum_{i in S_k} tau_i and actual f_k.
    tau [n, N], keep bool [K, N], out [K, n] -> [n]."""
    pred = -(keep.astype(np.float64) @ tau.T)  # [K, n]
    return np.array([spearman(pred[:, j], out[:, j]) for j in range(tau.shape[0])])


def summary(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(len(v))), "n": int(len(v))}


# ------------------------------------------------------------------------------------------------

def claim(lock: Path) -> bool:
    """Take `lock` for this process: create it, or take it over from a process that is gone."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.write_text(str(os.getpid()))
            return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as JSON (it is always written to --out)")
    p.add_argument("--n-data", type=int, default=60000, help="stored images (the first ones; flips added)")
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--pairs", type=int, default=4, help="(t, eps) pairs per sample of the loss output")
    p.add_argument("--regen-samples", type=int, default=4, help="samples with the regenerated-distance output")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--nda-size", type=int, default=5)
    p.add_argument("--nda-sigma", type=float, default=0.3)
    p.add_argument("--nda-shift", type=int, default=2)
    p.add_argument("--methods", default="pspc-trajectory,pspc-loss,pixel-nn,nda-patch,random")
    p.add_argument("--store", help="pspc-retrieval: the store the bundle was built for (the same images)")
    p.add_argument("--bundle", help="pspc-retrieval: index bundle (sizes it lacks run exact)")
    p.add_argument("--k", type=int, default=1024, help="pspc-retrieval: candidates per location")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state", required=True, help="folder of finished stages (resumable)")
    p.add_argument("--helper", action="store_true",
                   help="only evaluate unclaimed subsets of a run another process leads (same --state)")
    p.add_argument("--out", default=None, help="JSON result (default <state>/lds.json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    state = Path(a.state)
    state.mkdir(parents=True, exist_ok=True)
    per_run = ("json", "threads", "helper", "out", "methods", "regen_samples", "store", "bundle", "k", "state")
    cfg = {"loss_t": "shared per pair"} | {k: v for k, v in vars(a).items() if k not in per_run}
    cfg_path = state / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg:
        old = json.loads(cfg_path.read_text())
        diff = ", ".join(f"{k} {old.get(k)} (now {cfg.get(k)})" for k in sorted(set(old) | set(cfg))
                         if old.get(k) != cfg.get(k))
        print(f"lds: {state} was made with other settings: {diff}; use another --state", file=sys.stderr)
        sys.exit(2)
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.time()
    images = torch.from_numpy(read_source("fashion-mnist").images[:a.n_data].copy())
    data = TrainingSet(images, xflip=True)
    nst = data.n_stored
    timing = {}

    # 1. samples with their trajectories, over the whole set
    def make_samples():
        x, traj = pf_ode_sample(PSPCSquare(data), initial_noise(a.seed, range(a.samples), data.shape), a.steps,
                                record=True)
        return {"x": x, "ts": traj.ts, "zs": traj.z, "seconds": time.time() - t0}
    while a.helper and not (state / "samples.pt").exists():  # the leading process draws them
        time.sleep(5)
    st = kept(state / "samples.pt", make_samples)
    x = st["x"]
    timing["samples"] = st["seconds"]
    # 2. subsets, drawn once
    rng = np.random.default_rng(a.seed)
    keep = np.zeros((a.subsets, nst), dtype=bool)
    for k in range(a.subsets):
        keep[k, rng.choice(nst, nst // 2, replace=False)] = True
    t_pairs, eps = loss_pairs(a.samples, a.pairs, data.shape, a.seed)
    # 3. every method's scores, over the whole set (not by helper processes)
    scores = {}
    for name in [] if a.helper else a.methods.split(","):
        def run(name=name):
            s0 = time.time()
            return {"tau": method_scores(name, data, st, a), "seconds": time.time() - s0}
        r = kept(state / f"method_{name}.pt", run)
        scores[name], timing[f"method {name}"] = r["tau"], r["seconds"]
    # 4. each subset's outputs; processes sharing the state claim subsets one by one
    for k in range(a.subsets):
        def loss(k=k):
            s0 = time.time()
            return {"loss": loss_output(data.subset(np.flatnonzero(keep[k])), x, t_pairs, eps),
                    "seconds": time.time() - s0}

        def regen(k=k):
            s0 = time.time()
            return {"regen": regen_output(data.subset(np.flatnonzero(keep[k])), x[:a.regen_samples], a.seed,
                                          a.steps), "seconds": time.time() - s0}
        for name, fn in ((f"subset_{k:03d}", loss), (f"regen{a.regen_samples}_{k:03d}", regen)):
            if (name.startswith("regen") and not a.regen_samples) or (state / f"{name}.pt").exists():
                continue
            if claim(state / f"{name}.lock"):
                r = kept(state / f"{name}.pt", fn)
                (state / f"{name}.lock").unlink()
                print(f"{name}: {r['seconds']:.0f} s", file=sys.stderr)
    if a.helper:
        return
    names = [f"subset_{k:03d}" for k in range(a.subsets)]
    names += [f"regen{a.regen_samples}_{k:03d}" for k in range(a.subsets)] if a.regen_samples else []
    while not all((state / f"{n}.pt").exists() for n in names):  # the helpers' last subsets
        time.sleep(5)
    # 4. LDS per method and output
    load = lambda n: torch.load(state / f"{n}.pt", weights_only=False)  # noqa: E731
    subs = [load(f"subset_{k:03d}") for k in range(a.subsets)]
    outs = {"loss": np.stack([s["loss"].numpy() for s in subs])}
    timing["subset loss (mean)"] = float(np.mean([s["seconds"] for s in subs]))
    if a.regen_samples:
        regs = [load(f"regen{a.regen_samples}_{k:03d}") for k in range(a.subsets)]
        outs["regen"] = np.stack([s["regen"].numpy() for s in regs])
        timing["subset regen (mean)"] = float(np.mean([s["seconds"] for s in regs]))
    table = {}
    for name, tau in scores.items():
        for out_name, f in outs.items():
            if isinstance(tau, dict):  # pixel-nn: the best sigma on this evaluation
                per = {sg: lds(tv.numpy()[:f.shape[1]], keep, f) for sg, tv in tau.items()}
                best = max(per, key=lambda sg: np.nanmean(per[sg]))
                table[f"{name} {out_name}"] = {**summary(per[best]), "sigma": best,
                                               "by_sigma": {str(sg): summary(v)["mean"] for sg, v in per.items()}}
            else:
                table[f"{name} {out_name}"] = summary(lds(tau.numpy()[:f.shape[1]], keep, f))
    result = {
        "protocol": {"data": f"Fashion-MNIST, first {a.n_data} training images + flips ({2 * a.n_data})",
                     "model": f"pspc-square (exact, Fashion-MNIST schedule), Euler {a.steps} steps",
                     "subsets": a.subsets, "samples": a.samples, "loss_pairs": a.pairs,
                     "regen_samples": a.regen_samples, "seed": a.seed,
                     "nda": {"size": a.nda_size, "sigma": a.nda_sigma, "shift": a.nda_shift},
                     "pixel_sigmas": list(PIXEL_SIGMAS), "threads": a.threads},
        "lds": table, "seconds": timing, "torch": torch.__version__}
    out = Path(a.out) if a.out else state / "lds.json"
    out.write_text(json.dumps(result, indent=1))
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
