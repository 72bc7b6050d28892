"""Evaluate PSPC denoisers against the Fashion-MNIST network (Niedoba et al. 2025, Sec. 4 / digest item 12).

Writes docs/results.md (tables, verdicts) and PNG plots into --out. Everything is seeded. results.md is
rewritten after every section, so a run cut short still leaves the finished sections (the rest say "not run").

    python tools/evaluate.py --quick            # smoke run, < 1 min
    python tools/evaluate.py                    # defaults: 6000 stored images (12,000 with flips), 48 z / t, 32 samples
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pspc_index.denoisers import CFDM, Empirical, Gaussian, Network, PSPCFlex, PSPCSquare  # noqa: E402
from pspc_index.ingest import read_source  # noqa: E402
from pspc_index.network import load_network  # noqa: E402
from pspc_index.sampler import initial_noise, pf_ode_sample  # noqa: E402
from pspc_index.schedule import FASHION_MNIST  # noqa: E402
from pspc_index.sensitivity import read_heatmaps  # noqa: E402
from pspc_index.store import TrainingSet  # noqa: E402

SIZES = (3, 5, 7, 9, 13, 21, 28)
DEN_NAMES = ["optimal", "gaussian", "cfdm", "pspc-square", "pspc-flex"]
H = 28


def mse(a, b):
    """Per-image MSE over pixels ([-1, 1] units) -> [B] float64."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)



def mse_row(outs: dict, net: torch.Tensor, **fields) -> dict:
    """One table row: per denoiser, mean MSE against the network and its standard error over z."""
    row = dict(fields)
    for k in DEN_NAMES:
        m = mse(outs[k], net)
        row[k] = m.mean().item()
        row[k + "_se"] = (m.std() / math.sqrt(len(m))).item()
    return row

class Eval:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.time()
        self.res: dict = {"timings": {}}
        self.sched = FASHION_MNIST
        self.grid = self.sched.grid  # 18 t, descending
        # t of the forward study: the grid points with lambda < 1, plus larger grid t
        lam = torch.tensor(self.sched.lambdas)
        self.small_idx = [i for i in range(len(self.grid)) if lam[i] < 1]
        big = [i for i in range(len(self.grid)) if lam[i] >= 1]
        self.big_idx = [big[-1], big[-3], big[0]] if not args.quick else [big[-1], big[0]]
        if args.quick:
            self.small_idx = self.small_idx[::4]
        self.fwd_idx = sorted(self.big_idx + self.small_idx)

    # ------------------------------------------------------------------ setup
    def setup(self):
        a = self.args
        imgs = read_source("fashion-mnist").images
        g = torch.Generator().manual_seed(a.seed)
        keep = torch.randperm(len(imgs), generator=g)[: a.n_data].sort().values
        self.data = TrainingSet(torch.from_numpy(np.ascontiguousarray(imgs[keep.numpy()])), xflip=True)
        maps, hts, _ = read_heatmaps("data/heatmaps/fmnist-unet.zarr")
        self.maps, self.hts = maps, hts
        self.net = Network(load_network("data/network/fmnist-unet"), (1, H, H))
        self.dens = {
            "optimal": Empirical(self.data),
            "gaussian": Gaussian(self.data),
            "cfdm": CFDM(self.data),
            "pspc-square": PSPCSquare(self.data, schedule=self.sched),
            "pspc-flex": PSPCFlex(self.data, maps, hts, schedule=self.sched),
        }
        self.res["setup"] = dict(n_stored=a.n_data, n_virtual=len(self.data), n_z=a.n_z,
                                 n_samples=a.n_samples, seed=a.seed, quick=a.quick,
                                 threads=torch.get_num_threads(), argv=sys.argv[1:],
                                 reduced_note=a.reduced_note)

    # ------------------------------------------------------------------ 1 + 3a: forward process
    def forward_z(self, i):
        t = float(self.grid[i])
        g = torch.Generator().manual_seed(self.args.seed * 1000 + 17 + i)
        idx = torch.randint(0, len(self.data), (self.args.n_z,), generator=g)
        x = self.data.get(idx)
        return t, x + t * torch.randn(x.shape, generator=g)

    def forward(self):
        rows, study = [], []
        for i in self.fwd_idx:
            t, z = self.forward_z(i)
            net = self.net(z, t)
            outs = {k: self.dens[k](z, t) for k in ("optimal", "gaussian", "cfdm")}
            s_t = int(self.sched.patch_sizes[i])
            if i in self.small_idx:
                sq = {s: (outs["optimal"] if s == H else PSPCSquare(self.data, patch_size=s)(z, t)) for s in SIZES}
                for s in SIZES:
                    study.append(dict(i=i, t=t, s=s, vs_opt=mse(sq[s], outs["optimal"]).mean().item(),
                                      vs_net=mse(sq[s], net).mean().item()))
                outs["pspc-square"] = sq[s_t]  # identical to PSPCSquare(schedule) at this grid t
            else:
                outs["pspc-square"] = self.dens["pspc-square"](z, t)
            outs["pspc-flex"] = self.dens["pspc-flex"](z, t)
            row = mse_row(outs, net, i=i, t=t, s=s_t, lam=float(self.sched.lambdas[i]), net_vs_x0=None)
            rows.append(row)
            print(f"[fwd] t={t:.4g} " + " ".join(f"{k}={row[k]:.4g}" for k in DEN_NAMES), flush=True)
        self.res["forward"] = rows
        self.res["study_fwd"] = study

    # ------------------------------------------------------------------ 2 + 3b: reverse process
    def reverse(self):
        a = self.args
        z0 = initial_noise(a.seed + 1, range(a.n_samples), (1, H, H))
        _, traj = pf_ode_sample(self.net, z0, steps=18, solver="heun", record=True)
        rows, study = [], []
        half = a.n_samples // 2
        steps = range(18) if not a.quick else list(range(0, 18, 3)) + [17]
        for i in steps:
            t, z, net = float(traj.ts[i]), traj.z[i], traj.denoised[i]
            outs = {k: self.dens[k](z, t) for k in ("optimal", "gaussian", "cfdm")}
            s_t = int(self.sched.patch_sizes[i])
            lam = float(self.sched.lambdas[i])
            if lam < 1:
                sq = {s: (outs["optimal"] if s == H else PSPCSquare(self.data, patch_size=s)(z, t)) for s in SIZES}
                for s in SIZES:
                    m = mse(sq[s], net)
                    study.append(dict(i=i, t=t, s=s, vs_net=m.mean().item(), vs_net_A=m[:half].mean().item(),
                                      vs_net_B=m[half:].mean().item(),
                                      vs_opt=mse(sq[s], outs["optimal"]).mean().item()))
                outs["pspc-square"] = sq[s_t]
            else:
                outs["pspc-square"] = self.dens["pspc-square"](z, t)
            outs["pspc-flex"] = self.dens["pspc-flex"](z, t)
            row = mse_row(outs, net, i=i, t=t, s=s_t, lam=lam)
            rows.append(row)
            print(f"[rev] t={t:.4g} " + " ".join(f"{k}={row[k]:.4g}" for k in DEN_NAMES), flush=True)
        self.res["reverse"] = rows
        self.res["study_rev"] = study

    # ------------------------------------------------------------------ (iv) s = H, lambda = 1
    def identity_check(self):
        out = []
        ts_idx = [self.small_idx[0], self.small_idx[len(self.small_idx) // 2], self.small_idx[-1], self.big_idx[0]]
        for i in ts_idx:
            t, z = self.forward_z(i)
            z = z[:8]
            opt = self.dens["optimal"](z, t)
            d_sq = (PSPCSquare(self.data, patch_size=H)(z, t) - opt).abs().max().item()
            d_fx = (PSPCFlex(self.data, self.maps, self.hts, lam=1.0)(z, t) - opt).abs().max().item()
            # lambda = 1 through the mask (composite) path too, not only the lam >= 1 shortcut
            from pspc_index.geometry import MaskCrops, flex_masks
            from pspc_index.posterior import composite_mean
            j = int((self.hts - t).abs().argmin())
            d_fx_masks = (composite_mean(z, t, self.data, MaskCrops(flex_masks(self.maps[j], 1.0))) - opt).abs().max().item()
            out.append(dict(t=t, square_sH=d_sq, flex_lam1=d_fx, flex_lam1_masks=d_fx_masks))
        self.res["identity"] = out

    # ------------------------------------------------------------------ 4: samples
    def samples(self):
        a = self.args
        z0 = initial_noise(a.seed + 2, range(a.n_samples), (1, H, H))
        xs = {"network": pf_ode_sample(self.net, z0.clone(), steps=18, solver="euler")}
        for k in DEN_NAMES:
            t0 = time.time()
            xs[k] = pf_ode_sample(self.dens[k], z0.clone(), steps=18, solver="euler")
            print(f"[samples] {k} {time.time() - t0:.1f}s", flush=True)
        names = list(xs)
        mu = self.data.get(torch.arange(len(self.data))).mean(0).flatten()
        cos_c, cos_u = np.zeros((len(names),) * 2), np.zeros((len(names),) * 2)
        for p, u in enumerate(names):
            for q, v in enumerate(names):
                xu, xv = xs[u].flatten(1).double(), xs[v].flatten(1).double()
                cos_u[p, q] = torch.nn.functional.cosine_similarity(xu, xv, dim=1).mean().item()
                cos_c[p, q] = torch.nn.functional.cosine_similarity(xu - mu.double(), xv - mu.double(), dim=1).mean().item()
        self.res["samples"] = dict(names=names, cos_centered=cos_c.tolist(), cos_raw=cos_u.tolist())
        torch.save(xs, self.out / "eval_samples.pt") if a.save_samples else None
        self._plot_samples(xs)

    # ------------------------------------------------------------------ plots
    def _plot_samples(self, xs):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names, n = list(xs), min(12, self.args.n_samples)
        fig, axes = plt.subplots(len(names), n, figsize=(n * 0.9, len(names) * 1.0), squeeze=False)
        for r, k in enumerate(names):
            for c in range(n):
                ax = axes[r, c]
                ax.imshow(xs[k][c, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(k, fontsize=7)
        fig.suptitle("Euler 18-step PF-ODE samples from shared noise (columns)", fontsize=9)
        fig.tight_layout()
        fig.savefig(self.out / "eval_samples.png", dpi=110)
        plt.close(fig)

    def plots(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        for key, title in (("forward", "forward process (z = x + t eps)"), ("reverse", "reverse process (network Heun z)")):
            rows = self.res.get(key)
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            ts = [r["t"] for r in rows]
            for k in DEN_NAMES:  # optimal dashed with larger markers: CFDM lies on top of it almost everywhere
                ax.plot(ts, [r[k] for r in rows], "s--" if k == "optimal" else "o-", ms=5 if k == "optimal" else 3,
                        label=k)
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.set_xlabel("t"), ax.set_ylabel("MSE vs network (pixels in [-1,1])")
            ax.set_title(f"Denoiser MSE vs network, {title}", fontsize=9)
            ax.legend(fontsize=7), ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(self.out / f"eval_mse_{key}.png", dpi=110)
            plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, col, title in ((axes[0], "study_fwd", "vs_opt", "forward z: square patch mean vs optimal"),
                                    (axes[1], "study_rev", "vs_net", "reverse z: square patch mean vs network")):
            st = self.res.get(key) or []
            for s in SIZES:
                pts = sorted((r["t"], r[col]) for r in st if r["s"] == s)
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, label=f"s={s}" + (" (optimal)" if s == H else ""))
            ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("t"), ax.set_ylabel("MSE")
            ax.set_title(title, fontsize=9), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.out / "eval_patch_sizes.png", dpi=110)
        plt.close(fig)

    # ------------------------------------------------------------------ report
    def verdicts(self):
        v = []
        fwd, rev = self.res.get("forward"), self.res.get("reverse")
        if fwd:
            opt = [(r["t"], r["optimal"]) for r in fwd]
            peak = max(opt, key=lambda p: p[1])
            # sorted by index = descending t: opt[0] is the largest t
            hi_t, lo_t = opt[0], min(opt, key=lambda p: p[0])
            holds = peak[1] > 3 * hi_t[1] and peak[1] > 3 * lo_t[1] and lo_t[0] < peak[0] < hi_t[0]
            big = [p for p in opt if p[0] > 8]
            bmin = min(big, key=lambda p: p[1]) if big else hi_t
            v.append(("(i) network-vs-optimal MSE small at small and large t, peaks between (forward)", holds,
                      f"peak {peak[1]:.4g} at t={peak[0]:.3g}; at smallest t={lo_t[0]:.3g}: {lo_t[1]:.3g} "
                      f"(peak/this = {peak[1] / max(lo_t[1], 1e-30):.0f}x); at largest t={hi_t[0]:.3g}: "
                      f"{hi_t[1]:.3g} (peak/this = {peak[1] / hi_t[1]:.1f}x); lowest at t > 8: {bmin[1]:.3g} at "
                      f"t={bmin[0]:.3g} (peak/this = {peak[1] / bmin[1]:.1f}x). Criterion (fixed before the run): "
                      "peak > 3x the values at both the smallest and the largest t"))
        for name, rows in (("forward", fwd), ("reverse", rev)):
            if not rows:
                continue
            mid = [r for r in rows if 0.3 <= r["t"] <= 3.5]
            n1 = sum(r["pspc-flex"] < r["pspc-square"] for r in mid)
            n2 = sum(r["pspc-square"] < r["optimal"] for r in mid)
            n3 = sum(r["pspc-flex"] < r["pspc-square"] < r["optimal"] for r in mid)
            det = "; ".join(f"t={r['t']:.3g}: flex {r['pspc-flex']:.3g} / sq {r['pspc-square']:.3g} / opt "
                            f"{r['optimal']:.3g}" for r in mid)
            v.append((f"(ii) PSPC-Flex < PSPC-Square < optimal vs network, t in [0.3, 3] ({name})",
                      n3 == len(mid) and len(mid) > 0,
                      f"full ordering at {n3}/{len(mid)} t (flex<sq {n1}/{len(mid)}, sq<opt {n2}/{len(mid)}). {det}"))
            m_sq = sum(r["pspc-square"] < r["gaussian"] for r in mid)
            m_fx = sum(r["pspc-flex"] < r["gaussian"] for r in mid)
            det = "; ".join(f"t={r['t']:.3g}: gauss {r['gaussian']:.3g}" for r in mid)
            v.append((f"(iii) PSPC beats Gaussian for t in [0.3, 3] ({name})",
                      m_sq == len(mid) and m_fx == len(mid) and len(mid) > 0,
                      f"PSPC-Square < Gaussian at {m_sq}/{len(mid)} t, PSPC-Flex < Gaussian at {m_fx}/{len(mid)} t. {det}"))
        if self.res.get("identity"):
            idn = self.res["identity"]
            mx = max(max(r["square_sH"], r["flex_lam1"], r["flex_lam1_masks"]) for r in idn)
            v.append(("(iv) s = H and lambda = 1 equal the optimal denoiser", mx < 1e-4,
                      f"max |diff| over {len(idn)} t x 8 z: square s=28 {max(r['square_sH'] for r in idn):.2e}, "
                      f"flex lam=1 {max(r['flex_lam1'] for r in idn):.2e}, flex lam=1 through the mask path "
                      f"{max(r['flex_lam1_masks'] for r in idn):.2e} (tolerance 1e-4)"))
        if self.res.get("samples"):
            s = self.res["samples"]
            nm = s["names"]
            c = np.array(s["cos_centered"])
            r = np.array(s["cos_raw"])
            j = nm.index("network")
            f = {k: c[j, nm.index(k)] for k in DEN_NAMES}
            fr = {k: r[j, nm.index(k)] for k in DEN_NAMES}
            holds = f["pspc-flex"] > f["optimal"] and f["pspc-square"] > f["optimal"]
            v.append(("(v) PSPC samples closer to network samples than optimal's are (centred cosine)", holds,
                      "centred cos to network: " + ", ".join(f"{k} {f[k]:.3f}" for k in DEN_NAMES)
                      + "; raw cos: " + ", ".join(f"{k} {fr[k]:.3f}" for k in DEN_NAMES)))
        return v

    def write(self, final=False):
        self.res["timings"]["total_s"] = time.time() - self.t_start
        (self.out / "results.json").write_text(json.dumps(self.res, indent=1))
        try:
            self.plots()
        except Exception as e:  # a plot failing must not lose the tables
            print(f"plot failed: {e}", flush=True)
        a, st = self.args, self.res.get("setup", {})
        L = ["# PSPC evaluation on Fashion-MNIST (tools/evaluate.py)", ""]
        L.append(f"Status: {'complete' if final else 'PARTIAL (run in progress or cut short)'}. "
                 f"Wall time {self.res['timings']['total_s']:.0f} s; per section: "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in self.res["timings"].items() if k != "total_s") + ".")
        L.append("")
        argv = list(st.get("argv", sys.argv[1:]))
        if "--reduced-note" in argv:
            k = argv.index("--reduced-note")
            argv[k + 1:k + 2] = ["'...'"]
        L.append(f"Command: `python tools/evaluate.py {' '.join(argv)}`; torch {torch.__version__}, "
                 f"{st.get('threads')} thread(s), CPU ({platform.machine()}).")
        L.append("")
        L.append("**Subsampling.** The training set D is a seeded random subset of "
                 f"N = {st.get('n_stored')} stored Fashion-MNIST training images, i.e. {st.get('n_virtual')} with "
                 "x-flips; every empirical/patch/Gaussian/CFDM denoiser uses this set (the network was trained on "
                 f"all 60,000). Forward process: {st.get('n_z')} z per t (x uniform over the {st.get('n_virtual')}, "
                 f"z = x + t eps). Reverse process and samples: {st.get('n_samples')} trajectories / samples each. "
                 "A smaller D makes the optimal denoiser memorise more strongly than with the full set, which "
                 "inflates every optimal-vs-network MSE; the shapes and orderings are the target, not the values.")
        note = a.reduced_note or st.get("reduced_note", "")
        if note:
            L.append("")
            L.append(f"**Reduced sizes.** {note}")
        L.append("")
        L.append("MSE: mean over the 784 pixels in [-1, 1] units, averaged over z (± is the standard error over z). "
                 "Network = the shipped `data/network/fmnist-unet` (EDM-preconditioned UNet). PSPC-Square uses the "
                 "shipped FASHION_MNIST schedule s(t); PSPC-Flex the shipped heatmaps with the schedule's lambda(t). "
                 "CFDM: sigma_s = 0.1, M = 16. At t >= 8.4 s(t) = 28 and lambda(t) = 1, so both PSPC variants "
                 "are the optimal denoiser there.")
        L.append("")
        L.append("## Verdicts")
        L.append("")
        for name, holds, det in self.verdicts():
            L.append(f"- **{name}: {'HOLDS' if holds else 'FAILS'}.** {det}")
        if not self.verdicts():
            L.append("not run")
        for key, title, fig in (("forward", "1. Forward process: MSE against the network", "eval_mse_forward.png"),
                                ("reverse", "2. Reverse process (network Heun 18-step trajectories): MSE against the network",
                                 "eval_mse_reverse.png")):
            L += ["", f"## {title}", ""]
            rows = self.res.get(key)
            if not rows:
                L.append("not run")
                continue
            L.append("| t | s(t) | lambda(t) | " + " | ".join(DEN_NAMES) + " |")
            L.append("|---|---|---|" + "---|" * len(DEN_NAMES))
            for r in sorted(rows, key=lambda r: -r["t"]):
                L.append(f"| {r['t']:.4g} | {r['s']} | {r['lam']:.1f} | "
                         + " | ".join(f"{r[k]:.4g} ± {r[k + '_se']:.1g}" for k in DEN_NAMES) + " |")
            L += ["", f"![{key}]({fig})"]
        L += ["", "## 3. Patch-size study (square patch posterior means, composite Eq. 11)", ""]
        sf, sr = self.res.get("study_fwd"), self.res.get("study_rev")
        if not sf and not sr:
            L.append("not run")
        for st_rows, col, title in ((sf, "vs_opt", "Forward z: MSE against the optimal denoiser"),
                                    (sr, "vs_net", "Reverse z: MSE against the network (all trajectories)")):
            if not st_rows:
                continue
            last = ("smallest s with MSE < 1e-4 (matches the optimal denoiser)" if col == "vs_opt"
                    else "best s")
            L += [f"**{title}**", "", "| t | " + " | ".join(f"s={s}" for s in SIZES) + f" | {last} |",
                  "|---|" + "---|" * (len(SIZES) + 1)]
            for t in sorted({r["t"] for r in st_rows}, reverse=True):
                vals = {r["s"]: r[col] for r in st_rows if r["t"] == t}
                if col == "vs_opt":  # s = 28 is the optimal denoiser itself: report the smallest s that matches it
                    best = min(s for s in SIZES if vals[s] < 1e-4)
                else:
                    best = min(vals, key=vals.get)
                L.append(f"| {t:.4g} | " + " | ".join(f"{vals[s]:.4g}" for s in SIZES) + f" | {best} |")
            L.append("")
        if sr:
            half = self.args.n_samples // 2
            L += [f"**Tuned Fashion-MNIST schedule (against the network, reverse z).** Best s per t chosen on "
                  f"trajectories 0..{half - 1} (half A); MSE reported on the held-out trajectories "
                  f"{half}..{self.args.n_samples - 1} (half B), next to the shipped schedule's s(t) and the optimal "
                  "denoiser on half B.", "",
                  "| t | tuned s (half A) | MSE tuned s (half B) | shipped s(t) | MSE shipped s (half B) | optimal (half B) |",
                  "|---|---|---|---|---|---|"]
            tuned = []
            for t in sorted({r["t"] for r in sr}, reverse=True):
                rr = {r["s"]: r for r in sr if r["t"] == t}
                i = next(iter(rr.values()))["i"]
                best = min(rr, key=lambda s: rr[s]["vs_net_A"])
                ship = int(self.sched.patch_sizes[i])
                tuned.append(best)
                L.append(f"| {t:.4g} | {best} | {rr[best]['vs_net_B']:.4g} | {ship} | {rr[ship]['vs_net_B']:.4g} "
                         f"| {rr[H]['vs_net_B']:.4g} |")
            L += ["", f"Tuned s(t) over these t (descending): {tuned}; shipped: "
                  f"{[int(self.sched.patch_sizes[r]) for r in sorted({r['i'] for r in sr})]}.", "",
                  "![patch sizes](eval_patch_sizes.png)"]
        L += ["", "## 4. Samples: Euler 18-step PF-ODE from shared noise", ""]
        s = self.res.get("samples")
        if not s:
            L.append("not run")
        else:
            nm = s["names"]
            for key, desc in (("cos_centered", "Pairwise mean cosine similarity, **centred**: each flattened sample "
                               "minus the mean image of D, then cosine per shared noise, averaged over the "
                               f"{st.get('n_samples')} noises (this is the headline matrix; SSCD is not available "
                               "here, so this is pixel space, not the paper's SSCD)."),
                              ("cos_raw", "Same, **uncentred** (raw flattened pixels in [-1, 1]; the dark background "
                               "dominates, so all values are high).")):
                c = np.array(s[key])
                L += [desc, "", "| | " + " | ".join(nm) + " |", "|---|" + "---|" * len(nm)]
                for p, u in enumerate(nm):
                    L.append(f"| {u} | " + " | ".join(f"{c[p, q]:.3f}" for q in range(len(nm))) + " |")
                L.append("")
            L.append("![samples](eval_samples.png)")
        L.append("")
        (self.out / "results.md").write_text("\n".join(L) + "\n")

    def timed(self, name, fn):
        t0 = time.time()
        fn()
        self.res["timings"][name] = time.time() - t0
        print(f"== {name} done in {self.res['timings'][name]:.0f} s", flush=True)
        self.write()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-data", type=int, default=6000, help="stored training images subsampled (x2 with flips)")
    p.add_argument("--n-z", type=int, default=48, help="forward-process z per t")
    p.add_argument("--n-samples", type=int, default=32, help="reverse trajectories and Euler samples")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/")
    p.add_argument("--save-samples", action="store_true")
    p.add_argument("--reduced-note", default="", help="a sentence for results.md on why sizes were reduced")
    p.add_argument("--skip", default="", help="comma list of sections to skip: forward,reverse,identity,samples")
    p.add_argument("--render-only", default="", help="rewrite results.md and plots from this results.json")
    a = p.parse_args()
    if a.render_only:
        res = json.loads(Path(a.render_only).read_text())
        st = res["setup"]
        a.n_data, a.n_z, a.n_samples, a.quick, a.seed = st["n_stored"], st["n_z"], st["n_samples"], st["quick"], st["seed"]
        ev = Eval(a)
        total = res["timings"].get("total_s", 0)
        ev.res = res
        ev.t_start = time.time() - total
        ev.write(final=all(k in res for k in ("forward", "reverse", "samples", "identity")))
        return
    if a.quick:
        a.n_data, a.n_z, a.n_samples = min(a.n_data, 200), min(a.n_z, 4), min(a.n_samples, 4)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ev = Eval(a)
    ev.setup()
    skip = set(filter(None, a.skip.split(",")))
    ev.write()
    for name, fn in (("forward", ev.forward), ("identity", ev.identity_check), ("reverse", ev.reverse),
                     ("samples", ev.samples)):
        if name not in skip:
            ev.timed(name, fn)
    ev.write(final=True)
    print((ev.out / "results.md").read_text())


if __name__ == "__main__":
    main()
