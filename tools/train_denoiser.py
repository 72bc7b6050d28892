"""Train the small EDM U-Net (pspc_index.network) on a bundled or ingested data set, on a time budget.

EDM recipe (Karras et al. 2022): sigma ~ lognormal(P_mean, P_std), loss weight
(sigma^2 + sd^2) / (sigma sd)^2, Adam with linear warm-up, EMA of the weights with a half-life in
images (ramped up to 5% of the images seen, as EDM does), horizontal flips with probability 0.5.
Writes the EMA weights and json (`--out`), the loss log `<out>-loss.csv` and curve `<out>-loss.png`,
then checks the result: forward-process denoising MSE against the identity, and 16 Euler samples
`<out>-samples.png`.

EDM's lognormal almost never draws sigma > 20 (P = 2.3e-4), so the network is untrained at the top of
the sampling grid (docs/network_high_t.md). `--uniform-frac p` draws a fraction p of the sigmas
log-uniform over [--sigma-min, --sigma-max] instead (the sampler's whole range), and `--init` starts from
a trained checkpoint (weights only: its Adam state and raw weights are not kept), so a fine-tune fixes
that end. A run saves `<out>-resume.pt` (raw and EMA weights, Adam state, random state, loss log) every
--save-minutes; started again with the same settings it continues from there (the --minutes budget
counts the time of every part), and the file is removed when the run completes.

    python tools/train_denoiser.py --threads 1 --minutes 45 --out data/network/fmnist-unet --overwrite
    python tools/train_denoiser.py --threads 1 --minutes 60 --init data/network/fmnist-unet \
        --uniform-frac 0.3 --warmup-kimg 5 --out data/network/fmnist-unet-ft
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from pspc_index.errors import UserError
from pspc_index.ingest import read_source
from pspc_index.network import (SIGMA_DATA, EDMPrecond, UNetConfig, _stem, load_network, parameter_count,
                                read_network_meta, save_network)
from pspc_index.sampler import initial_noise, pf_ode_sample
from pspc_index.store import to_float, to_uint8

P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # the sampler's grid ends (schedule.karras_grid)
CHECK_TS = (0.1, 1.0, 5.0)
# Settings a resumed run must share with the run that wrote the resume file (the rest may change).
RESUME_FIXED = ("data", "seed", "batch", "lr", "warmup_kimg", "ema_kimg", "model_channels", "channel_mult",
                "num_blocks", "dropout", "no_attention", "bf16", "log_every", "init", "uniform_frac", "sigma_min",
                "sigma_max")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="fashion-mnist", help="a source read_source understands (default: bundled)")
    ap.add_argument("--out", default="data/network/fmnist-unet", help="checkpoint stem")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-kimg", type=float, default=50.0, help="linear lr warm-up, thousands of images")
    ap.add_argument("--ema-kimg", type=float, default=500.0, help="EMA half-life, thousands of images")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint's (EMA) weights and architecture; never overwritten")
    ap.add_argument("--uniform-frac", type=float, default=0.0,
                    help="fraction of sigmas drawn log-uniform over [--sigma-min, --sigma-max] (0: EDM's lognormal)")
    ap.add_argument("--sigma-min", type=float, default=SIGMA_MIN)
    ap.add_argument("--sigma-max", type=float, default=SIGMA_MAX)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (all parts together)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    ap.add_argument("--model-channels", type=int, default=None, help=f"default {UNetConfig.model_channels}")
    ap.add_argument("--channel-mult", default=None, help=f"default {','.join(map(str, UNetConfig.channel_mult))}")
    ap.add_argument("--num-blocks", type=int, default=None, help=f"default {UNetConfig.num_blocks}")
    ap.add_argument("--dropout", type=float, default=None, help=f"default {UNetConfig.dropout}")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast for the U-Net during training (~1.5x faster on CPUs with AVX512-BF16)")
    ap.add_argument("--log-every", type=int, default=25, help="steps per loss-log row")
    ap.add_argument("--save-minutes", type=float, default=10.0, help="checkpoint the EMA this often")
    return ap.parse_args(argv)


def sample_sigma(n: int, gen: torch.Generator, uniform_frac: float = 0.0, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """n training noise levels (EDM sigma, [-1, 1] pixel units) -> float32 [n]: each with probability
    uniform_frac log-uniform over [sigma_min, sigma_max], else EDM's lognormal(P_MEAN, P_STD) (Karras et
    al. 2022, Table 1). uniform_frac = 0 draws one randn per sigma, the stream of the shipped network's run."""
    # 1. EDM's lognormal for every sigma
    sigma = (torch.randn(n, generator=gen) * P_STD + P_MEAN).exp()
    if uniform_frac > 0:
        # 2. the mixture: which sigmas are log-uniform, and their values
        pick = torch.rand(n, generator=gen) < uniform_frac
        log_u = math.log(sigma_min) + torch.rand(n, generator=gen) * math.log(sigma_max / sigma_min)
        sigma = torch.where(pick, log_u.exp(), sigma)
    return sigma


def sigma_tail(t: float, uniform_frac: float = 0.0, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               p_mean: float = P_MEAN, p_std: float = P_STD) -> float:
    """P(sigma > t) under sample_sigma's mixture (t > 0, EDM sigma): the lognormal's upper tail
    erfc((ln t - P_mean) / (P_std sqrt 2)) / 2 and the log-uniform's share of [t, sigma_max]."""
    lognormal = 0.5 * math.erfc((math.log(t) - p_mean) / (p_std * math.sqrt(2)))
    uniform = min(1.0, max(0.0, math.log(sigma_max / t) / math.log(sigma_max / sigma_min)))
    return (1 - uniform_frac) * lognormal + uniform_frac * uniform


def edm_loss(net: EDMPrecond, x: torch.Tensor, gen: torch.Generator, **sigma_dist) -> torch.Tensor:
    """EDM loss: weighted x-prediction error at sigma ~ sample_sigma(**sigma_dist), mean per element."""
    sigma = sample_sigma(len(x), gen, **sigma_dist)
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    z = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=gen)
    return (weight[:, None, None, None] * (net(z, sigma) - x).square()).mean()


def training_batch(images_u8: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """A uniform batch of training images in [-1, 1], each flipped horizontally with probability 0.5."""
    x = to_float(images_u8[torch.randint(len(images_u8), (batch,), generator=gen)])
    flip = torch.rand(batch, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


@torch.no_grad()
def ema_update(ema: EDMPrecond, net: EDMPrecond, images_seen: int, batch: int, halflife_img: float) -> None:
    """EMA with half-life min(halflife, 5% of images seen): early weights are forgotten quickly."""
    beta = 0.5 ** (batch / max(min(halflife_img, 0.05 * images_seen), 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - beta)


@torch.no_grad()
def eval_loss(net: EDMPrecond, images_u8: torch.Tensor, n: int = 2048, seed: int = 12345) -> float:
    """The EDM loss on a fixed seeded set of n (image, sigma, noise) draws: comparable across runs."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n // 256):
        total += float(edm_loss(net, training_batch(images_u8, 256, gen), gen))
    return total / (n // 256)


@torch.no_grad()
def denoising_check(net: EDMPrecond, images_u8: torch.Tensor, ts=CHECK_TS, n: int = 256, seed: int = 1) -> dict:
    """Forward-process MSE vs the clean image, of D(z, t) and of the identity z, per t."""
    gen = torch.Generator().manual_seed(seed)
    x = to_float(images_u8[torch.randperm(len(images_u8), generator=gen)[:n]])
    rows = {}
    for t in ts:
        z = x + t * torch.randn(x.shape, generator=gen)
        rows[str(t)] = {"network": float((net(z, t) - x).square().mean()),
                        "identity": float((z - x).square().mean())}
    return rows


def save_loss_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(xlabel="training images (thousands)", ylabel="EDM loss (mean per pixel)", yscale="log",
           title=path.stem.removesuffix("-loss"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_samples(net: EDMPrecond, shape, path: Path, n: int = 16, seed: int = 0) -> None:
    """n samples of the 18-step Euler PF-ODE from z_T = 80 randn, as a 4-wide PNG grid."""
    from PIL import Image

    with torch.no_grad():
        x = pf_ode_sample(lambda z, t: net(z, t), initial_noise(seed, range(n), shape), steps=18)
    u8 = to_uint8(x)  # [n, C, H, W]
    c, h, w = shape
    cols = 4
    grid = u8.reshape(n // cols, cols, c, h, w).transpose(0, 3, 1, 4, 2).reshape(n // cols * h, cols * w, c)
    Image.fromarray(grid[..., 0] if c == 1 else grid).resize((cols * w * 4, n // cols * h * 4),
                                                              Image.NEAREST).save(path)


def progress_line(step: int, steps_here: int, seen: int, elapsed: float, seconds_here: float, loss: float,
                  budget: float, max_steps: int | None) -> None:
    """One line on stdout: step, images, loss, speed, and the time left (to --minutes or --max-steps)."""
    rate = steps_here / max(seconds_here, 1e-9)
    left = budget - elapsed
    if max_steps is not None and rate > 0:
        left = min(left, (max_steps - step) / rate)
    print(f"train: step {step}, {seen / 1e3:.1f} kimg, loss {loss:.4f}, {rate:.2f} steps/s, "
          f"{elapsed:.0f} s, {max(left, 0):.0f} s left", flush=True)


def network_config(args, shape) -> tuple[UNetConfig, dict | None]:
    """The architecture: the --init checkpoint's (its json document returned too), else the flags'.
    UserError if --init is combined with architecture flags or its images are not `shape` [C, H, W]."""
    arch = dict(model_channels=args.model_channels, channel_mult=args.channel_mult, num_blocks=args.num_blocks,
                dropout=args.dropout)
    c, h, w = shape
    if args.init is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in arch.items() if v is not None] + \
            (["--no-attention"] if args.no_attention else [])
        if given:
            raise UserError(f"--init takes the architecture from {args.init}; drop {' '.join(given)}")
        doc = read_network_meta(args.init)
        config = UNetConfig(**doc["config"])
        if (config.img_channels, config.img_resolution, config.img_resolution) != (c, h, w):
            raise UserError(f"--init {args.init}: the network takes {config.img_channels}x{config.img_resolution}x"
                            f"{config.img_resolution} images, {args.data} holds {c}x{h}x{w}")
        return config, doc
    if h != w:
        raise UserError(f"{args.data}: the network needs square images, got {h}x{w}")
    d = UNetConfig()
    mult = d.channel_mult if args.channel_mult is None else tuple(int(v) for v in args.channel_mult.split(","))
    return UNetConfig(img_channels=c, img_resolution=h,
                      model_channels=d.model_channels if args.model_channels is None else args.model_channels,
                      channel_mult=mult, num_blocks=d.num_blocks if args.num_blocks is None else args.num_blocks,
                      attention=not args.no_attention,
                      dropout=d.dropout if args.dropout is None else args.dropout), None


def check_args(args) -> None:
    """UserError (one line) for settings that cannot run or would destroy a checkpoint."""
    if not 0 <= args.uniform_frac <= 1:
        raise UserError(f"--uniform-frac must be in [0, 1], got {args.uniform_frac}")
    if not 0 < args.sigma_min < args.sigma_max:
        raise UserError(f"need 0 < --sigma-min < --sigma-max, got {args.sigma_min}, {args.sigma_max}")
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f"--max-steps must be >= 0, got {args.max_steps}")
    if args.batch < 1 or args.log_every < 1 or args.threads < 1:
        raise UserError("--batch, --log-every and --threads must be >= 1")
    out = _stem(args.out)
    if args.init is not None:
        if out.resolve() == _stem(args.init).resolve():
            raise UserError(f"--out {args.out} is the --init checkpoint; write the fine-tune to a new --out")
    if out.with_name(out.name + ".json").exists() and not resume_path(out).exists() and not args.overwrite:
        raise UserError(f"{out}.json exists; pass --overwrite to replace it, or another --out")


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + "-resume.pt")


def save_resume(path: Path, state: dict) -> None:
    """Write the resume state under a temporary name and rename it (a kill never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume(path: Path, settings: dict) -> dict | None:
    """The resume state at `path` (None if there is none); UserError if it was written with other settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain values only: nothing is unpickled
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not a readable resume file ({e}); remove it to start afresh") from None
    changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
    if changed:
        raise UserError(f"{path}: written with other settings ({', '.join(changed)}); rerun with the same ones, "
                        "or remove it to start afresh")
    return state


def train(args) -> None:
    check_args(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    source = read_source(args.data)
    images = torch.from_numpy(source.images)
    n, c, h, w = images.shape
    config, init_doc = network_config(args, (c, h, w))
    net = (load_network(args.init) if args.init is not None else EDMPrecond(config)).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sigma_dist = dict(uniform_frac=args.uniform_frac, sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    out = _stem(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out.with_name(out.name + "-loss.csv"), out.with_name(out.name + "-loss.png")
    settings = {k: getattr(args, k) for k in RESUME_FIXED}

    # Continue a killed run: weights, Adam, random state, counters and loss log as of its last save.
    rows, step, seen, before, acc, acc_n = [], 0, 0, 0.0, 0.0, 0
    state = load_resume(resume_path(out), settings)
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        rows, step, seen, before = state["rows"], state["step"], state["seen"], state["elapsed"]
        acc, acc_n = state["acc"], state["acc_n"]
    print(f"{source.description}: {n} images {c}x{h}x{w}; U-Net {parameter_count(net):,} parameters"
          f"{f' from {args.init}' if args.init else ''}; {args.threads} thread(s), {args.minutes} min; "
          f"sigma: {1 - args.uniform_frac:g} lognormal({P_MEAN}, {P_STD}) + {args.uniform_frac:g} log-uniform"
          f"[{args.sigma_min}, {args.sigma_max}]" + (f"; resumed at step {step}, {before:.0f} s" if state else ""),
          flush=True)

    def meta(final: bool) -> dict:
        m = {"data": source.description, "steps": step, "images_seen": seen, "batch": args.batch,
             "wall_seconds": round(elapsed(), 1), "threads": args.threads, "seed": args.seed,
             "lr": args.lr, "warmup_kimg": args.warmup_kimg, "ema_halflife_kimg": args.ema_kimg,
             "bf16_autocast": args.bf16, "p_mean": P_MEAN, "p_std": P_STD, "uniform_frac": args.uniform_frac,
             "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "xflip": 0.5,
             "final_loss": recent_loss(), "complete": final, "weights": "EMA"}
        if init_doc is not None:
            m["init"] = {"path": str(args.init), "images_seen": init_doc["meta"].get("images_seen"),
                         "wall_seconds": init_doc["meta"].get("wall_seconds")}
        return m

    def recent_loss() -> float | None:
        tail = [r["loss"] for r in rows[-4:]]
        return round(sum(tail) / len(tail), 5) if tail else None

    def elapsed() -> float:
        return before + time.time() - start

    def running() -> bool:
        return elapsed() < args.minutes * 60 and (args.max_steps is None or step < args.max_steps)

    start = last_save = time.time()
    step0, last_line = step, 0.0
    with open(csv_path, "w", newline="") as f:
        log = csv.DictWriter(f, ["step", "kimg", "seconds", "loss", "lr"])
        log.writeheader()
        log.writerows(rows)
        while running():
            # 1. one Adam step on the weighted x-prediction loss, lr warmed up linearly
            lr = args.lr * min(1.0, seen / (args.warmup_kimg * 1e3 + 1e-8))
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = edm_loss(net, training_batch(images, args.batch, gen), gen, **sigma_dist)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + args.batch
            ema_update(ema, net, seen, args.batch, args.ema_kimg * 1e3)
            # 2. the loss log and the progress line
            acc, acc_n = acc + loss.item(), acc_n + 1
            if step % args.log_every == 0:
                rows.append({"step": step, "kimg": round(seen / 1e3, 3), "seconds": round(elapsed(), 1),
                             "loss": round(acc / acc_n, 6), "lr": lr})
                log.writerow(rows[-1])
                f.flush()
                acc, acc_n = 0.0, 0
                if time.time() - last_line >= 30:
                    progress_line(step, step - step0, seen, elapsed(), time.time() - start, rows[-1]["loss"],
                                  args.minutes * 60, args.max_steps)
                    last_line = time.time()
            # 3. the EMA checkpoint and the resume state, every --save-minutes
            if time.time() - last_save >= args.save_minutes * 60:
                save_network(out, ema, meta(final=False))
                save_resume(resume_path(out), {"settings": settings, "net": net.state_dict(),
                                               "ema": ema.state_dict(), "opt": opt.state_dict(),
                                               "gen": gen.get_state(), "rows": rows, "step": step, "seen": seen,
                                               "acc": acc, "acc_n": acc_n, "elapsed": elapsed()})
                last_save = time.time()
    final = meta(final=True)
    final["ema_eval_loss"] = round(eval_loss(ema, images), 5)
    final["denoising_mse"] = denoising_check(ema, images)
    save_network(out, ema, final)
    resume_path(out).unlink(missing_ok=True)
    if rows:
        save_loss_plot(rows, png_path)
    check(out, images)


def check(out: Path, images: torch.Tensor) -> None:
    """Reload the saved checkpoint, print its metadata and MSE table, and draw the sample grid."""
    net = load_network(out)
    doc = read_network_meta(out)["meta"]
    print(json.dumps({k: doc[k] for k in ("steps", "images_seen", "wall_seconds", "final_loss", "ema_eval_loss")}))
    print(f"{'t':>6} {'MSE D(z,t)':>12} {'MSE z':>12}")
    for t, r in doc["denoising_mse"].items():
        print(f"{float(t):>6} {r['network']:>12.5f} {r['identity']:>12.5f}")
    samples = out.with_name(out.name + "-samples.png")
    save_samples(net, tuple(images.shape[1:]), samples)
    print(f"wrote {out}.safetensors, {out}.json, {samples}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
