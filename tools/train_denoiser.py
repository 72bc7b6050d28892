"""Train the small EDM U-Net (pspc_index.network) on a bundled or ingested data set, on a time budget.

EDM recipe (Karras et al. 2022): sigma ~ lognormal(P_mean, P_std), loss weight
(sigma^2 + sd^2) / (sigma sd)^2, Adam with linear warm-up, EMA of the weights with a half-life in
images (ramped up to 5% of the images seen, as EDM does), horizontal flips with probability 0.5.
Writes the EMA weights and json (`--out`), the loss log `<out>-loss.csv` and curve `<out>-loss.png`,
then checks the result: forward-process denoising MSE against the identity, and 16 Euler samples
`<out>-samples.png`.

    python tools/train_denoiser.py --threads 1 --minutes 45 --out data/network/fmnist-unet
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pspc_index.errors import UserError
from pspc_index.ingest import read_source
from pspc_index.network import (SIGMA_DATA, EDMPrecond, UNetConfig, load_network, parameter_count,
                                read_network_meta, save_network)
from pspc_index.sampler import initial_noise, pf_ode_sample
from pspc_index.store import to_float, to_uint8

P_MEAN, P_STD = -1.2, 1.2
CHECK_TS = (0.1, 1.0, 5.0)


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
    ap.add_argument("--model-channels", type=int, default=UNetConfig.model_channels)
    ap.add_argument("--channel-mult", default=",".join(map(str, UNetConfig.channel_mult)))
    ap.add_argument("--num-blocks", type=int, default=UNetConfig.num_blocks)
    ap.add_argument("--dropout", type=float, default=UNetConfig.dropout)
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast for the U-Net during training (~1.5x faster on CPUs with AVX512-BF16)")
    ap.add_argument("--log-every", type=int, default=25, help="steps per loss-log row")
    ap.add_argument("--save-minutes", type=float, default=10.0, help="checkpoint the EMA this often")
    return ap.parse_args(argv)


def edm_loss(net: EDMPrecond, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EDM loss: weighted x-prediction error at sigma ~ lognormal(P_MEAN, P_STD), mean per element."""
    sigma = (torch.randn(len(x), generator=gen) * P_STD + P_MEAN).exp()
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


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    source = read_source(args.data)
    images = torch.from_numpy(source.images)
    n, c, h, w = images.shape
    config = UNetConfig(img_channels=c, img_resolution=h, model_channels=args.model_channels,
                        channel_mult=tuple(int(v) for v in args.channel_mult.split(",")),
                        num_blocks=args.num_blocks, attention=not args.no_attention, dropout=args.dropout)
    if h != w:
        raise UserError(f"{args.data}: the network needs square images, got {h}x{w}")
    net = EDMPrecond(config).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out.with_name(out.name + "-loss.csv"), out.with_name(out.name + "-loss.png")
    print(f"{source.description}: {n} images {c}x{h}x{w}; U-Net {parameter_count(net):,} parameters; "
          f"{args.threads} thread(s), {args.minutes} min", flush=True)

    def meta(final: bool) -> dict:
        return {"data": source.description, "steps": step, "images_seen": seen, "batch": args.batch,
                "wall_seconds": round(time.time() - start, 1), "threads": args.threads, "seed": args.seed,
                "lr": args.lr, "warmup_kimg": args.warmup_kimg, "ema_halflife_kimg": args.ema_kimg,
                "bf16_autocast": args.bf16, "p_mean": P_MEAN, "p_std": P_STD, "xflip": 0.5,
                "final_loss": recent_loss(), "complete": final, "weights": "EMA"}

    def recent_loss() -> float | None:
        tail = [r["loss"] for r in rows[-4:]]
        return round(sum(tail) / len(tail), 5) if tail else None

    rows, step, seen, acc, acc_n = [], 0, 0, 0.0, 0
    start = last_save = time.time()
    bar = tqdm(total=round(args.minutes * 60), unit="s", desc="train", mininterval=30, file=sys.stdout)
    with open(csv_path, "w", newline="") as f:
        log = csv.DictWriter(f, ["step", "kimg", "seconds", "loss", "lr"])
        log.writeheader()
        while time.time() - start < args.minutes * 60:
            lr = args.lr * min(1.0, seen / (args.warmup_kimg * 1e3 + 1e-8))
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = edm_loss(net, training_batch(images, args.batch, gen), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + args.batch
            ema_update(ema, net, seen, args.batch, args.ema_kimg * 1e3)
            acc, acc_n = acc + loss.item(), acc_n + 1
            if step % args.log_every == 0:
                rows.append({"step": step, "kimg": round(seen / 1e3, 3), "seconds": round(time.time() - start, 1),
                             "loss": round(acc / acc_n, 6), "lr": lr})
                log.writerow(rows[-1])
                f.flush()
                acc, acc_n = 0.0, 0
                bar.set_postfix(step=step, kimg=f"{seen / 1e3:.0f}", loss=f"{rows[-1]['loss']:.4f}")
                bar.update(min(round(time.time() - start), bar.total) - bar.n)
            if time.time() - last_save > args.save_minutes * 60:
                save_network(out, ema, meta(final=False))
                last_save = time.time()
    bar.close()
    final = meta(final=True)
    final["ema_eval_loss"] = round(eval_loss(ema, images), 5)
    final["denoising_mse"] = denoising_check(ema, images)
    save_network(out, ema, final)
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
