"""Evaluate the training-free denoisers against the Fashion-MNIST network (Niedoba et al. 2025, Sec. 4; issue 12).

Writes results.md (tables, verdicts), results.json, PNG plots and tuned_schedule.json (s(t) and lambda(t)
tuned on half A of the forward z, reported on half B) into --out. Everything is seeded. Every section is
resumable: each unit of work (a denoiser on a batch of z at one t, a batch of samples or trajectories) is
saved under <out>/eval_state/ when it finishes, so a killed run continues where it stopped when started
again with the same arguments; results.md is rewritten after every unit group. The counts (--n-z,
--n-z-study, --n-z-lam, --n-rev, --n-samples, --n-z-els-check) may be raised on an existing state: z, noises
and trajectories are drawn per index (prefix-stable), so the finished units are reused and only new ones
run; any other changed setting is refused.

    python tools/evaluate.py --quick --out /tmp/ev     # smoke run
    python tools/evaluate.py                           # all 60,000 images (+ flips), 256 z / t, 64 + 256 samples
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pspc_index.classifier import feature_cosine, load_classifier, read_classifier_meta  # noqa: E402
from pspc_index.denoisers import CFDM, ELS, Empirical, Gaussian, Network, PSPCFlex, PSPCSquare  # noqa: E402
from pspc_index.els import r_squared  # noqa: E402
from pspc_index.errors import UserError, check_device  # noqa: E402
from pspc_index.ingest import read_source  # noqa: E402
from pspc_index.network import load_network  # noqa: E402
from pspc_index.posterior import set_patch_cache_budget  # noqa: E402
from pspc_index.sampler import initial_noise, pf_ode_sample  # noqa: E402
from pspc_index.schedule import FASHION_MNIST, Schedule, karras_grid, schedule_to_json  # noqa: E402
from pspc_index.sensitivity import read_heatmaps  # noqa: E402
from pspc_index.store import TrainingSet  # noqa: E402

SIZES = (3, 5, 7, 9, 13, 21, 28)
DEN_NAMES = ["optimal", "gaussian", "cfdm", "els", "pspc-square", "pspc-flex"]
SECTIONS = ("cost", "forward", "identity", "reverse", "els_subset", "samples")
H = 28
MID = (0.3, 3.5)  # the middle t range of verdicts (ii), (iii), (vi)
TUNED_NAME = "fashion-mnist-tuned"
# the reference network (the high-t fine-tune, docs/network_high_t.md) and its heatmaps
NETWORK, HEATMAPS = "data/network/fmnist-unet-ft", "data/heatmaps/fmnist-unet-ft.zarr"
CLASSIFIER = "data/classifier/fmnist-cnn"  # penultimate-layer features: the SSCD stand-in of section 4
# Settings a state folder may change between runs: every unit is keyed by its index range (or lambda) and every
# z, noise and trajectory is drawn from its own index, so a larger count reuses the finished units. STATE_VERSION
# names that drawing scheme: a state written before it (one stream for all z) is refused.
COUNTS = ("n_z", "n_z_study", "n_z_lam", "n_rev", "n_samples", "n_z_els_check")
CHANGEABLE = COUNTS + ("lam_grid",)
STATE_VERSION = 2
GPU_PATCH_CACHE = 16 * 2 ** 30
UNIT_META = ("_s", "_dev")  # a unit's compute seconds and device, not results
# The default sizes of a full run and of --quick (a size given on the command line wins).
FULL = dict(n_z=256, n_z_study=256, n_z_lam=64, n_rev=64, n_samples=256, els_images=100, n_z_els_check=32,
            batch=64, cost_batch=64)
QUICK = dict(n_z=4, n_z_study=4, n_z_lam=4, n_rev=4, n_samples=4, els_images=8, n_z_els_check=2, batch=4,
             cost_batch=4)


def stream_seed(*key: int) -> int:
    """An independent 63-bit seed per key tuple (numpy SeedSequence): one generator per z or noise, so the
    first n draws are the same for any count."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def mse(a, b):
    """Per-image MSE over pixels ([-1, 1] units) -> [B] float64."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def halves(m: torch.Tensor) -> dict:
    """Mean of per-z values over half A (even z indices: the tuning half) and half B (odd: the held-out half);
    interleaved so that a larger count keeps every z in its half."""
    return dict(vs_net_A=m[0::2].mean().item(), vs_net_B=m[1::2].mean().item() if len(m) > 1 else float("nan"))


def summary(per_z: dict) -> dict:
    """Per-z MSE and r^2 tensors -> mean, standard error over z, r^2 mean and median."""
    m, r = per_z["mse"], per_z["r2"]
    return dict(mse=m.mean().item(), se=(m.std() / math.sqrt(len(m))).item() if len(m) > 1 else 0.0,
                r2=r.mean().item(), r2_median=r.median().item())


def device_name(dev: torch.device) -> str:
    """The device a run computes on, in words."""
    return f"CUDA ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f"CPU ({platform.machine()})"


def memory_mib(cost_row: dict) -> str:
    """A cost row's peak memory in MiB: the GPU's where the call ran on one, else the resident-set increase
    (0 where the call fit in memory the process already held, e.g. freed by its warm-up call)."""
    gpu = cost_row.get("gpu_peak_bytes")
    return f"{gpu / 2 ** 20:.0f} GPU" if gpu is not None else f"{max(0.0, cost_row['peak_bytes']) / 2 ** 20:.0f}"


def cost_row(name: str, unit: dict) -> dict:
    """A cost unit as a table row: its measurements under the denoiser's name, without the unit's metadata."""
    return dict(name=name, **{k: v for k, v in unit.items() if k not in UNIT_META})


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_call(fn):
    """(result, seconds, peak RSS increase in bytes over the call, sampled every 2 ms by a thread)."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t0
    done.set()
    th.join()
    return out, sec, max(peak[0], rss_bytes()) - base


class Host:
    """A denoiser on another device, called with CPU tensors and returning CPU tensors (every reference,
    metric and resumable unit of the evaluation stays on the CPU)."""

    def __init__(self, den):
        self.den, self.shape = den, den.shape

    def __call__(self, z, t):
        return self.den(z, t).cpu()


class Eval:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.state = Path(args.state) if args.state else self.out / "eval_state"
        self.t_start = time.time()
        self.res: dict = {"timings": {}}
        self._unit_meta: dict = {}
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

    # ------------------------------------------------------------------ resumable units
    def open_state(self):
        """The state folder: created with a config record, or resumed with the same fixed settings (CHANGEABLE
        ones may change; the units of the first z, noises and trajectories are reused). Other settings: one line on
        stderr, exit 2 (unless --restart, which discards the folder)."""
        a = self.args
        fixed = dict(version=STATE_VERSION, n_data=a.n_data, els_images=a.els_images, batch=a.batch, seed=a.seed,
                     quick=a.quick, network=a.network, heatmaps=a.heatmaps)
        # states written before these were settings ran the first network and its heatmaps
        defaults = dict(network="data/network/fmnist-unet", heatmaps="data/heatmaps/fmnist-unet.zarr")
        rec = self.state / "config.json"
        if rec.exists():
            old = json.loads(rec.read_text()).get("fixed", {})
            differ = [f"{k} {old.get(k, defaults.get(k))} -> {v}" for k, v in fixed.items()
                      if old.get(k, defaults.get(k)) != v]
            if differ and not a.restart:
                print(f"evaluate: {self.state} holds a run with other settings ({', '.join(differ)}); only "
                      f"{', '.join('--' + c.replace('_', '-') for c in CHANGEABLE)} may change: use another "
                      "--state/--out, or --restart to discard it", file=sys.stderr)
                sys.exit(2)
            if differ:
                shutil.rmtree(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        rec.write_text(json.dumps(dict(fixed=fixed, changeable={c: getattr(a, c) for c in CHANGEABLE})))

    def unit(self, key: str, fn):
        """fn() -> dict of tensors/numbers, computed once: saved as <state>/<key>.pt (atomically, with its
        compute seconds under "_s" and device under "_dev") and loaded on every later call, in this run or a
        resumed one (on any device)."""
        path = self.state / f"{key}.pt"
        if path.exists():
            return torch.load(path)
        t0 = time.time()
        val = fn()
        val["_s"], val["_dev"] = time.time() - t0, device_name(self.dev)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(val, tmp)
        os.replace(tmp, path)
        return val

    def batched(self, key: str, n: int, fn) -> dict:
        """fn(slice) -> dict of tensors (batch first) over range(n), as resumable units <key>_<start>-<stop> at
        multiples of --batch (so a larger n reuses every full batch) -> dict of the concatenations."""
        b = self.args.batch
        parts = [self.unit(f"{key}_{j}-{min(j + b, n)}", lambda j=j: fn(slice(j, min(j + b, n))))
                 for j in range(0, n, b)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in UNIT_META}

    def per_z(self, key: str, name: str, z, t, ref, keep=False, opt=None):
        """A denoiser's per-z MSE and r^2 against ref over all z, in resumable batches; keep: also the
        outputs (as "out"); opt: also the MSE against these outputs (as "vs_opt")."""
        def run(sl):
            d = self.den(name)(z[sl], t)
            v = dict(mse=mse(d, ref[sl]), r2=r_squared(d, ref[sl]))
            if keep:
                v["out"] = d
            if opt is not None:
                v["vs_opt"] = mse(d, opt[sl])
            return v
        return self.batched(key, len(z), run)

    def network_z(self, i: int, z) -> torch.Tensor:
        """The network's outputs on forward z at grid t_i, in resumable batches."""
        t = float(self.grid[i])
        return self.batched(f"fwd_t{i:02d}_network", len(z), lambda sl: dict(out=self.net(z[sl], t)))["out"]

    def seconds(self, prefix: str) -> dict:
        """Compute seconds of the saved units whose key starts with prefix (this run and earlier ones), per
        device they ran on."""
        out: dict = {}
        for p in sorted(self.state.glob(f"{prefix}*.pt")):
            if p not in self._unit_meta:  # units never change: read each once
                v = torch.load(p)
                self._unit_meta[p] = (v["_s"], v.get("_dev", "device not recorded"))
            s, dev = self._unit_meta[p]
            out[dev] = out.get(dev, 0.0) + s
        return out

    # ------------------------------------------------------------------ setup
    def setup(self):
        a = self.args
        imgs = read_source("fashion-mnist").images
        keep = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(a.seed))[: a.n_data].sort().values
        self.data = TrainingSet(torch.from_numpy(np.ascontiguousarray(imgs[keep.numpy()])), xflip=True)
        self.dev = torch.device(a.device)
        self.ddata = self.data.to(self.dev)  # the denoisers' copy (the same set on the CPU)
        if self.dev.type == "cuda":  # every size of the patch-size study stays unfolded (8.8 GB at full N)
            set_patch_cache_budget(GPU_PATCH_CACHE)
        self.maps, self.hts, _ = read_heatmaps(a.heatmaps)
        self.net = Host(Network(load_network(a.network).to(self.dev), (1, H, H)))
        self.clf_meta = read_classifier_meta(CLASSIFIER)  # checked up front, used by the samples section
        self._dens = {}
        self.res["setup"] = dict(n_stored=len(keep), n_virtual=len(self.data), n_z=a.n_z, n_z_study=a.n_z_study,
                                 n_z_lam=a.n_z_lam, n_rev=a.n_rev, n_samples=a.n_samples, els_images=a.els_images,
                                 batch=a.batch, seed=a.seed, quick=a.quick, threads=torch.get_num_threads(),
                                 device=device_name(self.dev),
                                 argv=sys.argv[1:], reduced_note=a.reduced_note)

    def den(self, name: str):
        """The named denoiser (made on first use: the Gaussian's eigendecomposition takes a while)."""
        if name not in self._dens:
            if name == "network":
                return self.net
            if name.startswith(("square-", "els-m", "flex-lam")):
                return Host(self.den_extra(name))
            d = self.ddata
            make = {"optimal": lambda: Empirical(d), "gaussian": lambda: Gaussian(d), "cfdm": lambda: CFDM(d),
                    "els": lambda: ELS(d, schedule=self.sched, max_images=self.args.els_images, seed=self.args.seed),
                    "pspc-square": lambda: PSPCSquare(d, schedule=self.sched),
                    "pspc-flex": lambda: PSPCFlex(d, self.maps, self.hts, schedule=self.sched)}
            self._dens[name] = Host(make[name]())
        return self._dens[name]

    def den_extra(self, name: str):
        """Denoisers of the studies, made per use: square-S (PSPC-Square at fixed S), els-mM (ELS pool M),
        flex-lamL (PSPC-Flex at fixed lambda L)."""
        if name.startswith("square-"):
            return PSPCSquare(self.ddata, patch_size=int(name[7:]))
        if name.startswith("flex-lam"):
            return PSPCFlex(self.ddata, self.maps, self.hts, lam=float(name[8:]))
        return ELS(self.ddata, schedule=self.sched, max_images=int(name[5:]), seed=self.args.seed)

    def row(self, pz: dict, **fields) -> dict:
        """One table row: per denoiser, mean MSE against the network, its standard error over z, mean r^2."""
        row = dict(fields)
        for k, v in pz.items():
            s = summary(v)
            row[k], row[k + "_se"], row[k + "_r2"], row[k + "_r2_median"] = s["mse"], s["se"], s["r2"], s["r2_median"]
        return row

    # ------------------------------------------------------------------ cost per call (GoldDiff columns)
    def cost(self):
        """Seconds and peak memory of one call per denoiser at B = --cost-batch, mid t (patch caches warm), on
        this run's device; the state keeps each device kind's (CPU units cost_<name>, CUDA cost_cuda_<name>),
        and the table shows every one measured."""
        i = self.small_idx[len(self.small_idx) // 2]
        t = float(self.grid[i])
        g = torch.Generator().manual_seed(self.args.seed * 1000 + 5)
        x = self.data.get(torch.randint(0, len(self.data), (self.args.cost_batch,), generator=g))
        z = x + t * torch.randn(x.shape, generator=g)
        rows, kind = [], "" if self.dev.type == "cpu" else f"{self.dev.type}_"
        for name in ["network"] + DEN_NAMES:
            def run(name=name):
                d = self.den(name)
                d(z[:1], t)  # warm-up: builds the unfolded-patch caches the timed call then reuses
                gpu = self.dev.type == "cuda"
                if gpu:
                    torch.cuda.reset_peak_memory_stats(self.dev)
                _, sec, mem = timed_call(lambda: d(z, t))  # Host returns on the CPU: the call has finished
                return dict(seconds=sec, peak_bytes=float(mem), rss_before=float(rss_bytes()),
                            device=device_name(self.dev),
                            gpu_peak_bytes=float(torch.cuda.max_memory_allocated(self.dev)) if gpu else None)
            rows.append(cost_row(name, self.unit(f"cost_{kind}{name}", run)))
            print(f"[cost] {name}: {rows[-1]['seconds']:.2f} s, {memory_mib(rows[-1])} MiB", flush=True)
        by_device = {rows[0]["device"]: rows}
        other = [self.state / f"cost_{'cuda_' if not kind else ''}{n}.pt" for n in ["network"] + DEN_NAMES]
        if all(p.exists() for p in other):  # the other device kind's, measured by an earlier run
            part = [cost_row(n, torch.load(p)) for n, p in zip(["network"] + DEN_NAMES, other)]
            by_device[part[0]["device"]] = part
        self.res["cost"] = dict(t=t, batch=len(z), rows=rows, by_device=by_device)

    # ------------------------------------------------------------------ shared by forward and reverse
    def baselines(self, key, z, t, net):
        """One t's optimal (kept whole: the patch-size study measures against it), Gaussian, CFDM and ELS units."""
        pz = {"optimal": self.per_z(f"{key}_optimal", "optimal", z, t, net, keep=True)}
        for name in ("gaussian", "cfdm", "els"):
            pz[name] = self.per_z(f"{key}_{name}", name, z, t, net)
        return pz

    def close_row(self, section, tag, i, pz, z, t, net, s_t, lam, rows, study):
        """Add PSPC-Flex (the optimal denoiser where lambda = 1), append the row, report it, save the section."""
        pz["pspc-flex"] = self.per_z(f"{tag}_t{i:02d}_flex", "pspc-flex", z, t, net) if lam < 1 else pz["optimal"]
        rows.append(self.row(pz, i=i, t=t, s=s_t, lam=lam))
        print(f"[{tag}] t={t:.4g} " + " ".join(f"{k}={rows[-1][k]:.4g}" for k in DEN_NAMES), flush=True)
        self.res[section], self.res[f"study_{tag}"] = rows, study
        self.write(plots=False)

    # ------------------------------------------------------------------ 1 + 3a: forward process
    def forward_z(self, i: int, n: int | None = None):
        """(t_i, z [n, 1, H, W]) with z_j = x_j + t_i eps_j, x_j uniform over D; z_j is drawn from its own
        generator seeded by (seed, i, j), so the first n z are the same for any --n-z (default n)."""
        t = float(self.grid[i])
        gens = [torch.Generator().manual_seed(stream_seed(self.args.seed, 17, i, j))
                for j in range(self.args.n_z if n is None else n)]
        x = self.data.get(torch.tensor([int(torch.randint(len(self.data), (1,), generator=g)) for g in gens]))
        return t, x + t * torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])

    def forward(self):
        rows, study, lam_study = [], [], []
        ns, nl = self.args.n_z_study, self.args.n_z_lam
        for i in self.fwd_idx:
            t, z = self.forward_z(i)
            net = self.network_z(i, z)
            pz = self.baselines(f"fwd_t{i:02d}", z, t, net)
            opt = pz["optimal"]
            s_t, lam = int(self.sched.patch_sizes[i]), float(self.sched.lambdas[i])
            if i in self.small_idx:
                for s in SIZES:  # the study's first ns z share their batches with the pspc-square row's
                    st = opt if s == H else self.per_z(f"fwd_t{i:02d}_square{s}", f"square-{s}", z[:ns], t, net[:ns],
                                                       opt=opt["out"][:ns])
                    study.append(dict(i=i, t=t, s=s, vs_opt=0.0 if s == H else st["vs_opt"][:ns].mean().item(),
                                      vs_net=st["mse"][:ns].mean().item(), **halves(st["mse"][:ns])))
                pz["pspc-square"] = self.per_z(f"fwd_t{i:02d}_square{s_t}", f"square-{s_t}", z, t, net,
                                               opt=opt["out"])
            else:  # s(t) = H: the one full-image crop, the optimal denoiser itself (section 4, verdict iv)
                pz["pspc-square"] = opt
            self.close_row("forward", "fwd", i, pz, z, t, net, s_t, lam, rows, study)
            if i in self.small_idx:  # lambda(t) study on the first nl z (lambda = 1 is the optimal denoiser)
                for v in sorted(set(self.args.lam_grid) | {lam, 1.0}):  # shipped lambda: the pspc-flex row's z
                    st = (opt if v >= 1 else pz["pspc-flex"] if v == lam else
                          self.per_z(f"fwd_t{i:02d}_lam{v:g}", f"flex-lam{v:g}", z[:nl], t, net[:nl]))
                    lam_study.append(dict(i=i, t=t, lam=v, candidate=v in self.args.lam_grid, shipped=v == lam,
                                          vs_net=st["mse"][:nl].mean().item(), **halves(st["mse"][:nl])))
                self.res["study_lam"] = lam_study
                self.write(plots=False)
        self.res["forward_seconds"] = {k: self.seconds(f"fwd_t*_{k}") for k in ("optimal", "gaussian", "cfdm", "els",
                                                                                 "flex", "lam")}
        self.tune_schedule()

    def tune_schedule(self):
        """Per tuned grid t (those of both studies): the odd study size s (PSPC-Square) and the --lam-grid lambda
        (PSPC-Flex) with the lowest mean MSE against the network on half A of the forward z, and the MSE of
        each on half B next to the shipped schedule's. Writes <out>/tuned_schedule.json: the shipped schedule
        with the tuned values at those t (schedule.read_schedule_json reads it; ship it in pspc_index/schedules/)."""
        sf, sl = self.res.get("study_fwd") or [], self.res.get("study_lam") or []
        sizes, lams, rows = list(self.sched.patch_sizes), list(self.sched.lambdas), []
        for i in sorted({r["i"] for r in sf} & {r["i"] for r in sl}):
            # 1. the candidates at this t: odd sizes (s = H is the optimal denoiser), the lambda grid
            sq = {r["s"]: r for r in sf if r["i"] == i}
            lm = {r["lam"]: r for r in sl if r["i"] == i}
            ship_s, ship_l = int(self.sched.patch_sizes[i]), float(self.sched.lambdas[i])
            # 2. the best of each on half A
            best_s = min((s for s in sq if s % 2), key=lambda s: sq[s]["vs_net_A"])
            best_l = min((v for v in lm if lm[v]["candidate"]), key=lambda v: lm[v]["vs_net_A"])
            # 3. their MSE on the held-out half B, and the shipped values' and the optimal denoiser's there
            rows.append(dict(i=i, t=float(self.grid[i]), s=best_s, s_B=sq[best_s]["vs_net_B"], s_shipped=ship_s,
                             s_shipped_B=sq[ship_s]["vs_net_B"], optimal_B=sq[H]["vs_net_B"], lam=best_l,
                             lam_B=lm[best_l]["vs_net_B"], lam_shipped=ship_l, lam_shipped_B=lm[ship_l]["vs_net_B"],
                             optimal_lam_B=lm[1.0]["vs_net_B"]))
            sizes[i], lams[i] = best_s, best_l
        if not rows:
            return
        tuned = Schedule(TUNED_NAME, (H, H), tuple(sizes), tuple(lams), self.sched.els_sizes)
        a = self.args
        meta = dict(made_by="tools/evaluate.py " + " ".join(sys.argv[1:]), base=self.sched.name,
                    tuned_grid_indices=[r["i"] for r in rows], n_data=self.res["setup"]["n_stored"],
                    n_z_study=a.n_z_study, n_z_lam=a.n_z_lam, seed=a.seed, lam_grid=list(a.lam_grid),
                    sizes=[s for s in SIZES if s % 2], halves="A = even z indices (tuning), B = odd (held out)",
                    rows=rows)
        (self.out / "tuned_schedule.json").write_text(json.dumps(schedule_to_json(tuned, meta), indent=1) + "\n")
        self.res["tuned"] = dict(rows=rows, patch_sizes=list(sizes), lambdas=list(lams))

    # ------------------------------------------------------------------ 2 + 3b: reverse process
    def reverse(self):
        a = self.args
        z0 = initial_noise(a.seed + 1, range(a.n_rev), (1, H, H))  # noise j seeded by (seed + 1, j)

        def trajectories(sl):  # batch first, so that batches concatenate
            _, tr = pf_ode_sample(self.net, z0[sl], steps=18, solver="heun", record=True)
            return dict(z=tr.z.transpose(0, 1), denoised=tr.denoised.transpose(0, 1))
        traj = {k: v.transpose(0, 1) for k, v in self.batched("rev_traj", a.n_rev, trajectories).items()}
        traj["ts"] = karras_grid(18)
        rows, study = [], []
        half = a.n_rev // 2
        steps = range(18) if not a.quick else list(range(0, 18, 3)) + [17]
        for i in steps:
            t, z, net = float(traj["ts"][i]), traj["z"][i], traj["denoised"][i]
            pz = self.baselines(f"rev_t{i:02d}", z, t, net)
            opt = pz["optimal"]
            s_t, lam = int(self.sched.patch_sizes[i]), float(self.sched.lambdas[i])
            if lam < 1:
                for s in SIZES:
                    st = opt if s == H else self.per_z(f"rev_t{i:02d}_square{s}", f"square-{s}", z, t, net,
                                                       opt=opt["out"])
                    m = st["mse"]
                    study.append(dict(i=i, t=t, s=s, vs_net=m.mean().item(), vs_net_A=m[:half].mean().item(),
                                      vs_net_B=m[half:].mean().item(),
                                      vs_opt=0.0 if s == H else st["vs_opt"].mean().item()))
                    if s == s_t:
                        pz["pspc-square"] = st
            else:
                pz["pspc-square"] = opt
            self.close_row("reverse", "rev", i, pz, z, t, net, s_t, lam, rows, study)

    # ------------------------------------------------------------------ (iv) s = H, lambda = 1
    def identity_check(self):
        def run():
            from pspc_index.geometry import MaskCrops, flex_masks
            from pspc_index.posterior import composite_mean
            out = []
            idx = (self.small_idx[0], self.small_idx[len(self.small_idx) // 2], self.small_idx[-1], self.big_idx[0])
            for i in idx[1::2] if self.args.quick else idx:
                t, z = self.forward_z(i, 8)
                dd, zd = self.ddata, z.to(self.dev)
                opt = self.den("optimal")(z, t)
                d_sq = (PSPCSquare(dd, patch_size=H)(zd, t).cpu() - opt).abs().max().item()
                d_fx = (PSPCFlex(dd, self.maps, self.hts, lam=1.0)(zd, t).cpu() - opt).abs().max().item()
                # lambda = 1 through the mask (composite) path too, not only the lam >= 1 shortcut; on 2 z and
                # the first 100 images (an identity for any set; the path gathers 784 whole-image masks per key)
                j = int((self.hts - t).abs().argmin())
                masks = MaskCrops(flex_masks(self.maps[j], 1.0))
                sub = dd.subset(torch.arange(min(100, dd.n_stored)))
                d_fm = (composite_mean(zd[:2], t, sub, masks) - Empirical(sub)(zd[:2], t)).abs().max().item()
                d_els = (ELS(dd, k=2 * H - 1)(zd, t).cpu() - opt).abs().max().item()
                out.append(dict(t=t, square_sH=d_sq, flex_lam1=d_fx, flex_lam1_masks=d_fm, els_whole=d_els))
            return dict(rows=out)
        self.res["identity"] = self.unit("identity", run)["rows"]

    # ------------------------------------------------------------------ ELS pool size
    def els_subset(self):
        """ELS MSE against the network for pools of m/4, m/2, m and 2m stored images at mid t: how much the
        --els-images subset moves it (paired differences over the same z)."""
        m, n = self.args.els_images, self.args.n_z_els_check
        ms = sorted({max(1, m // 4), max(1, m // 2), m, 2 * m})
        idx = [i for i in self.small_idx if MID[0] <= float(self.grid[i]) <= MID[1]][:3] or self.small_idx[:1]
        rows = []
        for i in idx:
            t, z = self.forward_z(i, n)
            net = self.network_z(i, z)
            per = {mm: self.per_z(f"elssub_t{i:02d}_m{mm}", f"els-m{mm}", z, t, net) for mm in ms}
            top = per[ms[-1]]["mse"]
            for mm in ms:
                d = per[mm]["mse"] - top
                rows.append(dict(t=t, k=int(self.sched.els_size(t)), m=mm, **summary(per[mm]), diff=d.mean().item(),
                                 diff_se=(d.std() / math.sqrt(len(d))).item() if len(d) > 1 else 0.0))
        self.res["els_subset"] = rows

    # ------------------------------------------------------------------ 4: samples
    def samples(self):
        a = self.args
        z0 = initial_noise(a.seed + 2, range(a.n_samples), (1, H, H))  # noise j seeded by (seed + 2, j)
        xs = {}
        for name in ["network"] + DEN_NAMES:
            t0 = time.time()
            xs[name] = self.batched(f"smp_{name}", a.n_samples, lambda sl, name=name: dict(
                x=pf_ode_sample(self.den(name), z0[sl].clone(), steps=18, solver="euler")))["x"]
            print(f"[samples] {name} {time.time() - t0:.1f}s (this run)", flush=True)
        names = list(xs)
        mu = self.data.get(torch.arange(len(self.data))).mean(0).flatten()
        clf = load_classifier(CLASSIFIER)
        cos_c, cos_u, cos_f = (np.zeros((len(names),) * 2) for _ in range(3))
        for p, u in enumerate(names):
            for q, v in enumerate(names):
                xu, xv = xs[u].flatten(1).double(), xs[v].flatten(1).double()
                cos_u[p, q] = torch.nn.functional.cosine_similarity(xu, xv, dim=1).mean().item()
                cos_c[p, q] = torch.nn.functional.cosine_similarity(xu - mu.double(), xv - mu.double(), dim=1).mean().item()
                cos_f[p, q] = feature_cosine(clf, xs[u], xs[v]).mean().item()
        meta = self.clf_meta
        clf_info = dict(path=CLASSIFIER, test_accuracy=meta["meta"].get("test_accuracy"),
                        n_test=meta["meta"].get("n_test"), features=meta["config"]["features"])
        self.res["samples"] = dict(names=names, cos_centered=cos_c.tolist(), cos_raw=cos_u.tolist(),
                                   cos_features=cos_f.tolist(), classifier=clf_info)
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
            ax.set_title(title, fontsize=9), ax.grid(alpha=0.3)
            if ax.lines:  # a study not run yet has nothing to label
                ax.legend(fontsize=7)
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
            mid = [r for r in rows if MID[0] <= r["t"] <= MID[1]]
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
            rivals = [r for r in mid if all(r[p] < min(r["els"], r["gaussian"]) for p in ("pspc-square", "pspc-flex"))]
            det = "; ".join(f"t={r['t']:.3g}: sq {r['pspc-square']:.3g} / flex {r['pspc-flex']:.3g} / els "
                            f"{r['els']:.3g} / gauss {r['gaussian']:.3g}" for r in mid)
            v.append((f"(vi) PSPC-Square and PSPC-Flex below ELS and Gaussian vs network, t in [0.3, 3] ({name})",
                      len(rivals) == len(mid) and len(mid) > 0, f"both PSPC below both rivals at {len(rivals)}/"
                      f"{len(mid)} t. {det}"))
        if self.res.get("identity"):
            idn = self.res["identity"]
            keys = ("square_sH", "flex_lam1", "flex_lam1_masks", "els_whole")
            mx = max(r[k] for r in idn for k in keys)
            v.append(("(iv) s = H and lambda = 1 equal the optimal denoiser", mx < 1e-4,
                      f"max |diff| over {len(idn)} t x 8 z: square s=28 {max(r['square_sH'] for r in idn):.2e}, "
                      f"flex lam=1 {max(r['flex_lam1'] for r in idn):.2e}, flex lam=1 through the mask path "
                      f"{max(r['flex_lam1_masks'] for r in idn):.2e}; ELS with the whole-image window k = 55 "
                      f"(full N) {max(r['els_whole'] for r in idn):.2e} (tolerance 1e-4)"))
        if self.res.get("samples"):
            s = self.res["samples"]
            nm = s["names"]
            c = np.array(s["cos_centered"])
            r = np.array(s["cos_raw"])
            j = nm.index("network")
            f = {k: c[j, nm.index(k)] for k in DEN_NAMES}
            fr = {k: r[j, nm.index(k)] for k in DEN_NAMES}
            ff = {k: np.array(s["cos_features"])[j, nm.index(k)] for k in DEN_NAMES}
            holds = f["pspc-flex"] > f["optimal"] and f["pspc-square"] > f["optimal"]
            v.append(("(v) PSPC samples closer to network samples than optimal's are (centred cosine)", holds,
                      "centred cos to network: " + ", ".join(f"{k} {f[k]:.3f}" for k in DEN_NAMES)
                      + "; raw cos: " + ", ".join(f"{k} {fr[k]:.3f}" for k in DEN_NAMES)
                      + "; classifier-feature cos (the SSCD stand-in, section 4): "
                      + ", ".join(f"{k} {ff[k]:.3f}" for k in DEN_NAMES) + " (both PSPC above optimal there: "
                      + ("yes" if min(ff["pspc-flex"], ff["pspc-square"]) > ff["optimal"] else "no") + ")"))
        numerals = ["(i)", "(ii)", "(iii)", "(iv)", "(v)", "(vi)"]  # in order; forward before reverse within one
        return sorted(v, key=lambda item: numerals.index(item[0].split(" ", 1)[0]))

    def subsampling(self) -> list[str]:
        """The first lines of results.md: every subsample of the run, and why."""
        a, st = self.args, self.res.get("setup", {})
        n = st.get("n_stored", a.n_data)
        lines = [f"- Training set D: {'all 60,000' if n >= 60000 else f'a seeded random subset of {n} of the 60,000'} "
                 f"Fashion-MNIST training images with x-flips ({2 * n} images) for the optimal, Gaussian, CFDM, "
                 "PSPC-Square and PSPC-Flex denoisers (the network was trained on all 60,000)"
                 + ("." if n >= 60000 else f"; why: {a.reduced_note or 'reduced by --n-data'}.")]
        why = "a call costs ~ B N (H-k+1)^2 (W-k+1)^2 k^2 multiply-adds (every pooled patch at every pixel)"
        for dev, rows in (self.res.get("cost", {}).get("by_device") or {}).items():
            c = next(r for r in rows if r["name"] == "els")
            full = c["seconds"] * 60000 / a.els_images  # linear in the pool
            why += (f"; measured {c['seconds']:.3g} s per call at B = {self.res['cost']['batch']} with this pool on "
                    f"{dev}, so ~{full / 60:.0f} min per call with all 60,000")
        lines.append(f"- ELS pools the patches of a seeded random subset of {a.els_images} stored images (+ flips), "
                     f"because {why}. Section 5 shows how its MSE moves with the pool size.")
        if a.n_z_study < a.n_z:
            lines.append(f"- The patch-size study (section 3, forward z) uses the first {a.n_z_study} of the {a.n_z} z "
                         "per t (each size is a full PSPC-Square pass).")
        if a.n_z_lam < a.n_z:
            lines.append(f"- The lambda(t) tuning (section 6) uses the first {a.n_z_lam} of the {a.n_z} forward z "
                         "per t: each lambda is a PSPC-Flex pass over all images per batch of z.")
        if a.quick:
            lines.append("- QUICK smoke run: tiny sizes throughout; no number here is evidence.")
        if a.reduced_note and n >= 60000:
            lines.append(f"- {a.reduced_note}")
        return lines

    def write(self, final=False, plots=True):
        self.res["timings"] = {s: self.seconds(p) for s, p in (("cost", "cost_"), ("forward", "fwd_"),
                               ("identity", "identity"), ("reverse", "rev_"), ("els_subset", "elssub_"),
                               ("samples", "smp_"))}
        self.res["timings"]["this_run_wall_s"] = time.time() - self.t_start
        (self.out / "results.json").write_text(json.dumps(self.res, indent=1))
        try:
            if plots:
                self.plots()
        except Exception as e:  # a plot failing must not lose the tables
            print(f"plot failed: {e}", flush=True)
        st = self.res.get("setup", {})
        L = ["# PSPC evaluation on Fashion-MNIST (tools/evaluate.py)", "", "**Subsampling.**", ""] + self.subsampling()
        L += ["", f"Status: {'complete' if final else 'PARTIAL (run in progress or cut short; rerun the same command to continue)'}. "
              "Compute seconds per section (summed over resumed runs, per device): "
              + ", ".join(f"{k} " + (" + ".join(f"{s:.0f} s ({d})" for d, s in v.items()) or "0 s")
                          for k, v in self.res["timings"].items() if k != "this_run_wall_s") + "."]
        argv = list(st.get("argv", sys.argv[1:]))
        if "--reduced-note" in argv:
            k = argv.index("--reduced-note")
            argv[k + 1:k + 2] = ["'...'"]
        L += ["", f"Command: `python tools/evaluate.py {' '.join(argv)}`; torch {torch.__version__}, "
              f"{st.get('threads')} thread(s), {st.get('device') or f'CPU ({platform.machine()})'}. Forward process: {st.get('n_z')} z per t "
              f"(x uniform over D, z = x + t eps); reverse process: {st.get('n_rev')} network Heun trajectories; "
              f"samples: {st.get('n_samples')} shared-noise Euler samples per denoiser.", "",
              "MSE: mean over the 784 pixels in [-1, 1] units, averaged over z (± is the standard error over z). "
              "r^2: coefficient of determination of a denoiser's output against the network's, per image over its "
              "784 pixels, r^2 = 1 - sum_p (D_p - N_p)^2 / sum_p (N_p - mean_p N)^2 (SSE over SST of the network "
              "output about its own pixel mean), averaged over z. Network = `" + self.args.network + "` "
              "(EDM-preconditioned U-Net, zero padding). PSPC-Square uses the derived `fashion-mnist` schedule s(t) "
              "(the paper's CIFAR-10 schedule scaled to 28x28; section 6 tunes it); "
              f"PSPC-Flex that network's heatmaps (`{self.args.heatmaps}`) with the schedule's lambda(t); where s(t) = 28 or lambda(t) = 1 both "
              "are the optimal denoiser and its numbers are reused. CFDM: sigma_s = 0.1, M = 16. ELS: Kamb & "
              "Ganguli's boundary-broken equivariant local score machine (pspc_index/els.py) with the schedule's "
              f"window k(t) = {list(self.sched.els_size(self.grid).tolist())} on the grid (high t first"
              + (", calibrated against the network by tools/calibrate_els.py)" if self.sched.els_sizes else
                 ", derived from s(t): not yet calibrated)") + "."]
        L += ["", "## Summary (GoldDiff-shaped)", ""] + self.summary_table()
        L += ["", "## Verdicts", ""]
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
            L += ["", "r^2 against the network (mean over z):", "", "| t | " + " | ".join(DEN_NAMES) + " |",
                  "|---|" + "---|" * len(DEN_NAMES)]
            for r in sorted(rows, key=lambda r: -r["t"]):
                L.append(f"| {r['t']:.4g} | " + " | ".join(f"{r[k + '_r2']:.3f}" for k in DEN_NAMES) + " |")
            L += ["", f"![{key}]({fig})"]
        L += self.study_md()
        L += ["", "## 5. ELS pool size", ""]
        es = self.res.get("els_subset")
        if not es:
            L.append("not run")
        else:
            L += [f"ELS MSE against the network on the first {self.args.n_z_els_check} forward z per t, for pools of m "
                  "stored images (+ flips; seeded, nested draws of one permutation); 'change' is the paired mean "
                  f"difference to the largest pool over the same z, ± its standard error. The run uses m = "
                  f"{self.args.els_images}.", "", "| t | k(t) | m | MSE | r^2 | change vs largest m |",
                  "|---|---|---|---|---|---|"]
            for r in es:
                L.append(f"| {r['t']:.4g} | {r['k']} | {r['m']} | {r['mse']:.4g} ± {r['se']:.1g} | {r['r2']:.3f} | "
                         f"{r['diff']:+.2g} ± {r['diff_se']:.1g} |")
        L += self.samples_md()
        L += self.tuned_md()
        (self.out / "results.md").write_text("\n".join(L) + "\n")

    def summary_table(self) -> list[str]:
        """MSE and r^2 against the network averaged over the evaluated t (forward, reverse), seconds per call
        and peak memory: the columns of GoldDiff's comparison table."""
        fwd, rev = self.res.get("forward") or [], self.res.get("reverse") or []
        cr = self.res.get("cost", {})
        devices = cr.get("by_device") or ({cr["rows"][0]["device"]: cr["rows"]} if cr.get("rows") else {})
        costs = {dev: {r["name"]: r for r in rows} for dev, rows in devices.items()}
        avg = lambda rows, k: f"{np.mean([r[k] for r in rows]):.4g}" if rows else "-"  # noqa: E731
        L = [f"Averages over the evaluated t ({len(fwd)} forward, {len(rev)} reverse); seconds and peak memory of "
             f"one call at B = {cr.get('batch', '-')}, t = {cr.get('t', float('nan')):.4g}, patch caches built, "
             "on each device measured (peak memory: the largest resident-set increase during the call, sampled "
             "every 2 ms, 0 where the call fit in memory the process already held; on a GPU the peak GPU memory allocated by torch during the call, marked GPU).", "",
             "| denoiser | MSE fwd | r^2 fwd | MSE rev | r^2 rev | "
             + " | ".join(f"s / call, {d} | peak memory (MiB), {d}" for d in costs) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(costs)]
        for k in DEN_NAMES + ["network"]:
            cols = " | ".join(f"{c[k]['seconds']:.3g} | {memory_mib(c[k])}" if k in c else "- | -"
                              for c in costs.values())
            mse = ("0 | 1 | 0 | 1" if k == "network" else
                   f"{avg(fwd, k)} | {avg(fwd, k + '_r2')} | {avg(rev, k)} | {avg(rev, k + '_r2')}")
            name = "network (reference)" if k == "network" else k + (f" (pool {self.args.els_images})" if k == "els" else "")
            L.append(f"| {name} | {mse} |" + (f" {cols} |" if costs else ""))
        return L

    def study_md(self) -> list[str]:
        L = []
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
            half = self.args.n_rev // 2
            L += [f"**Tuned Fashion-MNIST schedule (against the network, reverse z).** Best s per t chosen on "
                  f"trajectories 0..{half - 1} (half A); MSE reported on the held-out trajectories "
                  f"{half}..{self.args.n_rev - 1} (half B), next to the derived schedule's s(t) and the optimal "
                  "denoiser on half B.", "",
                  "| t | tuned s (half A) | MSE tuned s (half B) | derived s(t) | MSE derived s (half B) | optimal (half B) |",
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
            L += ["", f"Tuned s(t) over these t (descending): {tuned}; derived: "
                  f"{[int(self.sched.patch_sizes[r]) for r in sorted({r['i'] for r in sr})]}.", "",
                  "![patch sizes](eval_patch_sizes.png)"]
        return L

    def samples_md(self) -> list[str]:
        st = self.res.get("setup", {})
        L = []
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
            c, clf = np.array(s["cos_features"]), s["classifier"]
            acc = clf["test_accuracy"]
            L += [f"**Feature space (a stand-in for the paper's SSCD).** SSCD cannot be had here; instead, the cosine "
                  f"between the {clf['features']}-d penultimate-layer features of a small Fashion-MNIST CNN classifier "
                  f"(`{clf['path']}`, tools/train_classifier.py; test accuracy {acc:.4f} on {clf['n_test']} "
                  "held-out training images, the official test split not being bundled) of each pair of samples "
                  "from the same noise (pixels clamped to [-1, 1]), averaged over the noises. It measures whether two "
                  "samples look alike to a classifier, not copy detection as SSCD does.", "",
                  "| | " + " | ".join(nm) + " |", "|---|" + "---|" * len(nm)]
            for p, u in enumerate(nm):
                L.append(f"| {u} | " + " | ".join(f"{c[p, q]:.3f}" for q in range(len(nm))) + " |")
            L += ["", "![samples](eval_samples.png)"]
        L.append("")
        return L

    def tuned_md(self) -> list[str]:
        """Section 6: the schedules tuned on half A of the forward z, against the derived one on half B."""
        L = ["", "## 6. Schedules tuned on forward z (half A), reported on the held-out half B", ""]
        tu = self.res.get("tuned")
        if not tu:
            return L + ["not run"]
        a, rows = self.args, tu["rows"]
        L += [f"Per grid t with lambda(t) < 1: PSPC-Square's s over the odd sizes {[s for s in SIZES if s % 2]} on the "
              f"first {a.n_z_study} forward z, PSPC-Flex's lambda over {list(a.lam_grid)} on the first {a.n_z_lam}; "
              "each chosen by the lowest mean MSE against the network on half A (even z indices), reported as the "
              "mean MSE on half B (odd z indices) next to the derived schedule "
              f"(`{self.sched.name}`, the one every other section measures) and the optimal denoiser on half B. "
              f"Written to `tuned_schedule.json` (name `{TUNED_NAME}`; the derived values at the other grid t).", "",
              "| t | tuned s | MSE tuned s (B) | derived s | MSE derived s (B) | tuned lambda | MSE tuned lambda (B) "
              "| derived lambda | MSE derived lambda (B) | optimal (B) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -r["t"]):
            L.append(f"| {r['t']:.4g} | {r['s']} | {r['s_B']:.4g} | {r['s_shipped']} | {r['s_shipped_B']:.4g} | "
                     f"{r['lam']:g} | {r['lam_B']:.4g} | {r['lam_shipped']:g} | {r['lam_shipped_B']:.4g} | "
                     f"{r['optimal_B']:.4g} |")
        L.append("")
        for kind, k in (("s(t)", "s"), ("lambda(t)", "lam")):
            lower = sum(r[f"{k}_B"] < r[f"{k}_shipped_B"] for r in rows)
            same = sum(r[k] == r[f"{k}_shipped"] for r in rows)
            L.append(f"- Tuned {kind}: mean over these t on half B {np.mean([r[f'{k}_B'] for r in rows]):.4g}, "
                     f"derived {np.mean([r[f'{k}_shipped_B'] for r in rows]):.4g}; lower at {lower}/{len(rows)} t, "
                     f"the same value at {same}/{len(rows)} t.")
        L += ["", f"Tuned s(t) on the 18-step grid (high t first): {tu['patch_sizes']}; lambda(t): {tu['lambdas']}."]
        return L


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-data", type=int, default=60000, help="stored training images (x2 with flips); < 60,000: "
                   "a seeded subset")
    p.add_argument("--n-z", type=int, help="forward-process z per t (default 256; --quick 4)")
    p.add_argument("--n-z-study", type=int, help="forward z per t of the patch-size study and s(t) tuning (the first "
                   "ones; default 256; --quick 4)")
    p.add_argument("--n-z-lam", type=int, help=f"forward z per t of the lambda(t) tuning (the first ones; default "
                   f"{FULL['n_z_lam']}; --quick 4)")
    p.add_argument("--lam-grid", type=lambda v: tuple(sorted({float(x) for x in v.split(",")})),
                   default=(0.3, 0.5, 0.7, 0.9, 1.0), help="comma list of the lambda(t) tuning candidates in (0, 1] "
                   "(default 0.3,0.5,0.7,0.9,1.0); PSPC-Flex's cost grows steeply with lambda")
    p.add_argument("--n-rev", type=int, help="reverse-process trajectories (network Heun; default 64; --quick 4)")
    p.add_argument("--n-samples", type=int, help="shared-noise Euler samples per denoiser (default 256; --quick 4)")
    p.add_argument("--els-images", type=int, help="ELS pool: seeded subset of stored images (+ flips; default 100; "
                   "--quick 8)")
    p.add_argument("--n-z-els-check", type=int, help="forward z per t of the ELS pool-size check (default 32; "
                   "--quick 2)")
    p.add_argument("--batch", type=int, help="z per denoiser call (and per resumable unit; default 64; --quick 4)")
    p.add_argument("--cost-batch", type=int, help="B of the timed call per denoiser (default 64; --quick 4)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (at most 200 images; small defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--network", default=NETWORK, help="the reference network's checkpoint stem")
    p.add_argument("--heatmaps", default=HEATMAPS, help="PSPC-Flex's heatmaps (of that network)")
    p.add_argument("--device", default="cpu", help="where the denoisers compute (cpu, cuda, cuda:1, ...); "
                   "references, metrics and the state stay on the CPU")
    p.add_argument("--out", default="docs/")
    p.add_argument("--state", default=None, help="resumable state folder (default <out>/eval_state)")
    p.add_argument("--restart", action="store_true", help="discard a state folder made with other settings")
    p.add_argument("--reduced-note", default="", help="a sentence for results.md on why sizes were reduced")
    p.add_argument("--skip", default="", help="comma list of sections to skip: " + ",".join(SECTIONS))
    a = p.parse_args()
    for k, v in (QUICK if a.quick else FULL).items():  # the defaults of the sizes not given
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.n_data = min(a.n_data, 200)
    a.n_z_study, a.n_z_lam = min(a.n_z_study, a.n_z), min(a.n_z_lam, a.n_z)
    if not all(0 < v <= 1 for v in a.lam_grid):
        print(f"evaluate: --lam-grid values must lie in (0, 1], got {list(a.lam_grid)}", file=sys.stderr)
        sys.exit(2)
    small = [k for k in ("n_z_study", "n_z_lam") if getattr(a, k) < 2] + [
        k for k in COUNTS + ("n_data", "els_images", "batch", "cost_batch") if getattr(a, k) < 1]
    if small:
        print(f"evaluate: --{small[0].replace('_', '-')} is too small (the tuning halves need >= 2 z, every other "
              "size >= 1)", file=sys.stderr)
        sys.exit(2)
    check_device(a.device)  # a UserError: one line, exit 2 (below)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ev = Eval(a)
    if ev.out.exists() and not ev.out.is_dir():
        print(f"evaluate: --out {ev.out} is a file; give a folder", file=sys.stderr)
        sys.exit(2)
    ev.out.mkdir(parents=True, exist_ok=True)
    ev.open_state()
    ev.setup()
    skip = set(filter(None, a.skip.split(",")))
    ev.write()
    for name in SECTIONS:
        if name not in skip:
            t0 = time.time()
            {"cost": ev.cost, "forward": ev.forward, "identity": ev.identity_check, "reverse": ev.reverse,
             "els_subset": ev.els_subset, "samples": ev.samples}[name]()
            print(f"== {name} done in {time.time() - t0:.0f} s (this run)", flush=True)
            ev.write()
    ev.write(final=not skip)
    print((ev.out / "results.md").read_text())


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        sys.exit(2)
