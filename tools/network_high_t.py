"""Where a trained EDM network errs over t, and why: distance to the data mean and to the optimal denoiser on
seeded forward z, split into a bias image and a z-dependent part, next to the EDM preconditioning and how
often training drew sigma above t; plus sample quality (Frechet distance of classifier features).

Issue 12, item 5; findings in docs/network_high_t.md. Every network gets the same z (per t, z = x + t eps with
x uniform over the 60,000 Fashion-MNIST training images and their flips, from a generator seeded by
(--seed, t)) and the same initial noise for its samples. The optimal denoiser is the posterior mean over all
120,000 images (pspc_index.posterior.empirical_mean); the data mean is their average.

    OMP_NUM_THREADS=1 python tools/network_high_t.py --json > /tmp/high_t.json
    OMP_NUM_THREADS=1 python tools/network_high_t.py --net data/network/fmnist-unet \\
        --net data/network/fmnist-unet-ft --png docs/network_high_t.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_denoiser import sigma_tail  # noqa: E402

from pspc_index.classifier import load_classifier  # noqa: E402
from pspc_index.errors import UserError  # noqa: E402
from pspc_index.ingest import read_source  # noqa: E402
from pspc_index.network import SIGMA_DATA, load_network, read_network_meta  # noqa: E402
from pspc_index.posterior import empirical_mean  # noqa: E402
from pspc_index.sampler import initial_noise, pf_ode_sample  # noqa: E402
from pspc_index.store import TrainingSet  # noqa: E402

TS = (0.0229, 0.2964, 1.9233, 5.0, 10.0, 19.3525, 40.0, 80.0)  # grid t (0.0229 ... 19.3525) and round ones
CLASSIFIER = "data/classifier/fmnist-cnn"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", action="append", default=None,
                    help="checkpoint stem, repeatable (default data/network/fmnist-unet)")
    ap.add_argument("--ts", default=",".join(map(str, TS)), help="comma-separated t (EDM sigma)")
    ap.add_argument("--n-z", type=int, default=64, help="forward z per t")
    ap.add_argument("--samples", type=int, default=512, help="18-step Euler samples per network (0: none)")
    ap.add_argument("--n-ref", type=int, default=10000, help="training images for the reference features")
    ap.add_argument("--clamp-sd", type=float, default=3.09,
                    help="also run each network with c_noise held at the lognormal's P_mean + this many P_std "
                         "(default: its 99.9%% quantile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the JSON document only")
    ap.add_argument("--png", default=None, help="write the mean-over-z error images per t here")
    return ap.parse_args(argv)


def preconditioning(t: float, sigma_data: float = SIGMA_DATA) -> dict:
    """EDM's c_skip, c_out, c_in, c_noise and loss weight lambda at sigma = t (Karras et al. 2022, Table 1),
    as network.EDMPrecond and train_denoiser.edm_loss use them."""
    s2, d2 = t * t, sigma_data * sigma_data
    return dict(c_skip=d2 / (s2 + d2), c_out=t * sigma_data / math.sqrt(s2 + d2), c_in=1 / math.sqrt(s2 + d2),
                c_noise=math.log(t) / 4, loss_weight=(s2 + d2) / (t * sigma_data) ** 2)


def training_draws(meta: dict, t: float) -> dict:
    """How often the network's training (and that of its --init, one level) drew sigma > t: probability per
    draw of its own run, expected draws over all its images above t and above t / 2 (a log-uniform part ending
    at sigma_max = t draws nothing above t), and ln t in standard deviations of the lognormal."""
    def tail(m, s):
        return sigma_tail(s, m.get("uniform_frac", 0.0), m.get("sigma_min", 0.002), m.get("sigma_max", 80.0),
                          m["p_mean"], m["p_std"])

    def draws(s):
        n = tail(meta, s) * meta["images_seen"]
        init = meta.get("init")
        return n + (0 if init is None else tail(read_network_meta(init["path"])["meta"], s) * init["images_seen"])
    return dict(p_sigma_above=tail(meta, t), draws_above=draws(t), draws_above_half=draws(t / 2),
                ln_t_sd=(math.log(t) - meta["p_mean"]) / meta["p_std"])


def clamped_noise_input(net, z: torch.Tensor, t: float, t_clamp: float) -> torch.Tensor:
    """The network at sigma = t with only its noise input c_noise = ln(min(t, t_clamp)) / 4 held back to t_clamp
    (c_skip, c_out, c_in stay at t): whether the error above t_clamp comes from c_noise outside training."""
    pre, fed = preconditioning(t, net.sigma_data), preconditioning(min(t, t_clamp), net.sigma_data)
    c_noise = torch.full((len(z),), fed["c_noise"], dtype=z.dtype)
    return pre["c_skip"] * z + pre["c_out"] * net.unet(pre["c_in"] * z, c_noise)


def forward_z(data: TrainingSet, t: float, n: int, seed: int):
    """(x, eps) [n, C, H, W]: x uniform over the virtual set, eps standard normal, from a generator seeded by
    (seed, t in 1e-4 units), so a t's z do not depend on the other t asked for."""
    key = int(np.random.SeedSequence([seed, round(t * 1e4)]).generate_state(1)[0])
    gen = torch.Generator().manual_seed(key)
    x = data.get(torch.randint(len(data), (n,), generator=gen))
    return x, torch.randn(x.shape, generator=gen)


def error_split(net_out: torch.Tensor, opt_out: torch.Tensor, eps: torch.Tensor) -> dict:
    """The network's error e = D_net - D* [n, C, H, W] as bias image + z-dependent part (per-pixel MSE units):
    bias2 = mean_pix (mean_z e)^2, spread = mean (e - mean_z e)^2 (bias2 + spread = mean MSE); and the share of
    the spread that is linear in the input noise: at the same pixel, and in its 4x4-block means."""
    e = (net_out - opt_out).double()
    bias = e.mean(0, keepdim=True)
    ec = e - bias
    spread = float(ec.square().mean())

    def linear_share(v: torch.Tensor) -> float:  # one pooled least-squares slope of ec on v
        v = v.double() - v.double().mean(0, keepdim=True)
        return float((ec * v).sum() ** 2 / (v.square().sum() * ec.square().sum()))
    coarse = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(eps, 4), scale_factor=4)
    return dict(bias2=float(bias.square().mean()), spread=spread, eps_linear_share=linear_share(eps),
                eps_coarse_share=linear_share(coarse)), bias[0]


def contrast(out: torch.Tensor, opt: torch.Tensor) -> float:
    """Slope of the network's mean-over-z output on the optimal denoiser's, both centred over pixels: 1 when
    the average image has the right contrast, < 1 when it is washed out towards a flat grey."""
    a, b = out.mean(0).flatten(), opt.mean(0).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / b.square().sum())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of feature sets a [n, d], b [m, d], float64 (the
    FID formula, Heusel et al. 2017, here on the classifier's penultimate features)."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root_a = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp_min(0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * cross)


def sample_quality(net, data: TrainingSet, n: int, n_ref: int, seed: int) -> dict:
    """n 18-step Euler samples from initial_noise(seed): Frechet distance of their classifier features to
    n_ref training images' (a stand-in for FID), the same for n training images (its floor at this n), the
    total variation between the classifier's class histogram of the samples and the training set's, and the
    fraction of pixels outside [-1.05, 1.05]."""
    clf = load_classifier(CLASSIFIER)
    ref_idx = torch.randperm(data.n_stored, generator=torch.Generator().manual_seed(seed))[:n_ref]
    with torch.no_grad():
        x = torch.cat([pf_ode_sample(lambda z, t: net(z, t), initial_noise(seed, range(i, min(i + 256, n)),
                                                                            data.shape)) for i in range(0, n, 256)])
        fx, fr = clf.features(x.clamp(-1, 1)), clf.features(data.get(ref_idx))
        classes = clf.head.out_features
        hist_x = torch.bincount(clf.head(fx).argmax(1), minlength=classes).double() / n
        hist_r = torch.bincount(clf.head(fr).argmax(1), minlength=classes).double() / len(fr)
        fh = clf.features(data.get(torch.randperm(data.n_stored, generator=torch.Generator().manual_seed(seed + 1))
                                   [:n]))
    return dict(n=n, n_ref=n_ref, fd_features=frechet_distance(fx, fr),
                fd_features_data=frechet_distance(fh, fr), class_tv=float(0.5 * (hist_x - hist_r).abs().sum()),
                class_hist=[round(float(v), 4) for v in hist_x], out_of_range=float((x.abs() > 1.05).double().mean()))


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    nets = args.net or ["data/network/fmnist-unet"]
    ts = [float(v) for v in args.ts.split(",")]
    if min(ts) <= 0 or args.n_z < 2 or args.samples < 0:
        raise UserError("--ts must be positive, --n-z >= 2, --samples >= 0")
    metas = {p: read_network_meta(p) for p in nets}
    models = {p: load_network(p) for p in nets}
    data = TrainingSet(torch.from_numpy(read_source("fashion-mnist").images), xflip=True)
    mean = sum(x.double().sum(0) for _, x in data.chunks(8192)) / len(data)
    doc = {"n_z": args.n_z, "seed": args.seed, "threads": args.threads, "n_data": len(data),
           "networks": {p: {k: metas[p]["meta"].get(k) for k in ("images_seen", "wall_seconds", "p_mean", "p_std",
                                                                 "uniform_frac", "ema_halflife_kimg", "init")}
                        | {"ema_halflife_end_kimg": min(metas[p]["meta"]["ema_halflife_kimg"],
                                                        0.05 * metas[p]["meta"]["images_seen"] / 1e3)}
                        for p in nets},
           "rows": [], "bias_images": {}}
    for t in ts:
        t0 = time.time()
        # 1. the same z for every network; the optimal denoiser over all images, the data mean
        x, eps = forward_z(data, t, args.n_z, args.seed)
        z = x + t * eps
        opt = empirical_mean(z, t, data).double()
        row = dict(t=t, **preconditioning(t), opt_vs_mean=float((opt - mean).square().mean()),
                   opt_vs_x=float((opt - x.double()).square().mean()), nets={})
        for p in nets:
            # 2. per network: its distances, the split of its error, its training's coverage of t
            m = metas[p]["meta"]
            t_clamp = math.exp(m["p_mean"] + args.clamp_sd * m["p_std"])
            with torch.no_grad():
                out = models[p](z, t).double()
                clamped = clamped_noise_input(models[p], z, t, t_clamp).double()
            per_z = (out - opt).square().flatten(1).mean(1)
            split, bias = error_split(out, opt, eps)
            row["nets"][p] = dict(vs_opt=float(per_z.mean()), vs_opt_se=float(per_z.std() / math.sqrt(len(per_z))),
                                  vs_mean=float((out - mean).square().mean()),
                                  vs_x=float((out - x.double()).square().mean()),
                                  spread_net=float((out - out.mean(0)).square().mean()),
                                  contrast=contrast(out, opt), t_clamp=t_clamp, vs_opt_clamped=float((clamped - opt).square().mean()),
                                  **split, **training_draws(metas[p]["meta"], t))
            doc["bias_images"].setdefault(p, {})[t] = bias
        row["spread_opt"] = float((opt - opt.mean(0)).square().mean())
        row["seconds"] = round(time.time() - t0, 1)
        doc["rows"].append(row)
    # 3. sample quality, the same initial noise for every network
    if args.samples:
        doc["samples"] = {p: sample_quality(models[p], data, args.samples, args.n_ref, args.seed) for p in nets}
    doc["mean_image"] = mean
    return doc


def save_png(doc: dict, path: str) -> None:
    """Per network a row of mean-over-z errors D_net - D* (the bias image) per t, on one colour scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets, ts = list(doc["bias_images"]), [r["t"] for r in doc["rows"]]
    lim = max(float(b.abs().max()) for imgs in doc["bias_images"].values() for b in imgs.values())
    fig, axes = plt.subplots(len(nets), len(ts), figsize=(1.5 * len(ts) + 1.5, 1.5 * len(nets) + 0.4),
                             squeeze=False)
    for i, p in enumerate(nets):
        for j, t in enumerate(ts):
            ax = axes[i, j]
            im = ax.imshow(doc["bias_images"][p][t][0].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t={t:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(Path(p).name, fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean_z (D_net - D*)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(doc: dict) -> None:
    """The table: per t and network, MSE to D* (with its split) and to the data mean, and training's draws."""
    print(f"{doc['n_z']} z per t, seed {doc['seed']}, {doc['n_data']} images (with flips), {doc['threads']} thread(s)")
    print(f"{'t':>8} {'c_noise':>7} {'opt-mean':>9} | {'network':<22} {'vs opt':>8} {'bias2':>8} {'spread':>8} "
          f"{'eps lin':>7} {'contrast':>8} {'clamped':>8} {'vs mean':>8} {'vs x':>8} {'P(s>t)':>8} {'draws>t/2':>9}")
    for r in doc["rows"]:
        for p, v in r["nets"].items():
            print(f"{r['t']:>8.4g} {r['c_noise']:>7.3f} {r['opt_vs_mean']:>9.2e} | {Path(p).name:<22} "
                  f"{v['vs_opt']:>8.2e} {v['bias2']:>8.2e} {v['spread']:>8.2e} {v['eps_linear_share']:>7.3f} {v['contrast']:>8.3f} {v['vs_opt_clamped']:>8.2e} "
                  f"{v['vs_mean']:>8.2e} {v['vs_x']:>8.2e} {v['p_sigma_above']:>8.1e} {v['draws_above_half']:>9.3g}")
    for p, s in doc.get("samples", {}).items():
        print(f"samples {Path(p).name}: feature FD {s['fd_features']:.3f} (training images: "
              f"{s['fd_features_data']:.3f}), class TV {s['class_tv']:.3f}, out of range {s['out_of_range']:.4f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        doc = measure(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.png:
        save_png(doc, args.png)
    doc.pop("bias_images")
    doc.pop("mean_image")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        report(doc)


if __name__ == "__main__":
    main()
