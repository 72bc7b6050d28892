"""A small EDM-preconditioned U-Net (DDPM++-like) and safe checkpoint IO.

The network is the reference the PSPC denoisers are compared with, and the source of the
gradient-sensitivity heatmaps (sensitivity.py). Checkpoints are a safetensors file of weights and
a json file of config and training metadata: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

FORMAT = "pspc-index-network"
FORMAT_VERSION = 1
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net. Resolution must be divisible by 2^(len(channel_mult) - 1).

    The defaults are sized for one CPU thread: 16/32/64 channels at 28/14/7 pixels (0.7 M
    parameters) trains at ~150 images/s and gives a heatmap (784 backward passes) in ~2 ms per z
    and output pixel; the 4 M-parameter variant (32/64/128, two blocks) is 5x slower at both.
    """

    img_channels: int = 1
    img_resolution: int = 28
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_blocks: int = 1
    attention: bool = True  # one self-attention block at the lowest resolution
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.img_channels not in (1, 3):
            raise UserError(f"network: img_channels must be 1 or 3, got {self.img_channels}")
        if not self.channel_mult or self.img_resolution % 2 ** (len(self.channel_mult) - 1):
            raise UserError(f"network: resolution {self.img_resolution} is not divisible by "
                            f"2^{len(self.channel_mult) - 1} (one halving per extra level of {self.channel_mult})")
        if self.model_channels < 4 or self.num_blocks < 1:
            raise UserError("network: need model_channels >= 4 and num_blocks >= 1")


def group_norm(channels: int) -> nn.GroupNorm:
    # EDM's choice: up to 32 groups of at least 4 channels (here: the most that divide the channels).
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, noise embedding added in between, optional 2x down/up-sampling.

    The skip path is rescaled by 1/sqrt(2) as in DDPM++ so activations keep their scale with depth.
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.norm0, self.conv0 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, cout)
        self.norm1, self.conv1 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv1.weight)  # each block starts as the identity on its skip path
        nn.init.zeros_(self.conv1.bias)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return (h + self.skip(self._resample(x))) * math.sqrt(0.5)


class Attention(nn.Module):
    """Single-head self-attention over pixels, residual, for the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))) * math.sqrt(0.5)


def positional_embedding(c_noise: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal embedding of the scalar noise input, [B] -> [B, channels]."""
    half = torch.arange(channels // 2, dtype=c_noise.dtype, device=c_noise.device) / (channels // 2)
    arg = c_noise[:, None] * torch.exp(-math.log(10000) * half)[None]
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class UNet(nn.Module):
    """U-Net F(x, c_noise) with len(channel_mult) resolution levels (EDM's SongUNet, reduced)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb = cfg.model_channels, 4 * cfg.model_channels
        self.map = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.conv_in = nn.Conv2d(cfg.img_channels, mc, 3, padding=1)
        block = lambda cin, cout, resample=None: ResBlock(cin, cout, emb, cfg.dropout, resample)  # noqa: E731

        # Encoder: per level an optional down-sampling block, then num_blocks blocks; every output is a skip.
        self.enc, skips, ch = nn.ModuleList(), [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            if level > 0:
                self.enc.append(block(ch, ch, "down"))
                skips.append(ch)
            for _ in range(cfg.num_blocks):
                self.enc.append(block(ch, mc * mult))
                ch = mc * mult
                skips.append(ch)
        self.mid0, self.mid1 = block(ch, ch), block(ch, ch)
        self.attn = Attention(ch) if cfg.attention else nn.Identity()

        # Decoder: per level num_blocks + 1 blocks that each take one skip, then up-sampling.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_blocks + 1):
                self.dec.append(block(ch + skips.pop(), mc * mult))
                ch = mc * mult
            if level > 0:
                self.dec.append(block(ch, ch, "up"))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.img_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.map(positional_embedding(c_noise, self.config.model_channels))
        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        h = self.mid1(self.attn(self.mid0(h, emb)), emb)
        for blk in self.dec:
            h = blk(h, emb) if blk.resample == "up" else blk(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class EDMPrecond(nn.Module):
    """D(z, sigma) = c_skip z + c_out F(c_in z, c_noise) (Karras et al. 2022), an x-prediction."""

    def __init__(self, config: UNetConfig, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.config, self.sigma_data = config, sigma_data
        self.unet = UNet(config)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(z.shape[0], 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log().flatten() / 4
        return c_skip * z + c_out * self.unet(c_in * z, c_noise).to(z.dtype)


def image_shape(config: UNetConfig) -> tuple[int, int, int]:
    """The [C, H, W] of the images a network of this config takes."""
    return (config.img_channels, config.img_resolution, config.img_resolution)


def check_image_shape(net: nn.Module, shape, where: str | os.PathLike = "network") -> None:
    """UserError (one line) unless the network takes images of `shape` [C, H, W] (checked up front, not
    as a torch error at the first call)."""
    config = getattr(net, "config", None)
    if not isinstance(config, UNetConfig):
        return  # any other module: its shape is its own business
    want, have = image_shape(config), tuple(int(v) for v in shape)
    if want != have:
        raise UserError(f"{where}: the network takes {'x'.join(map(str, want))} images, the store holds "
                        f"{'x'.join(map(str, have))}; use a network trained at this shape, or another denoiser")


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _stem(path: str | os.PathLike) -> Path:
    """`x`, `x.json` and `x.safetensors` all name the checkpoint pair x.json + x.safetensors."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def save_network(path: str | os.PathLike, net: EDMPrecond, extra_meta: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Write `<path>.safetensors` (weights, in `dtype`) and `<path>.json` (config, metadata).

    Each file is written under a temporary name and renamed, weights first, so the json (which
    names the weights' dtype and parameter count) only appears once its weights are complete.
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(net.config),
           "sigma_data": net.sigma_data, "dtype": str(dtype).removeprefix("torch."),
           "parameters": parameter_count(net), "meta": extra_meta or {}}
    write_checkpoint(stem, tensors, doc, FORMAT)


def write_checkpoint(stem: Path, tensors: dict, doc: dict, fmt: str) -> None:
    """`<stem>.safetensors` then `<stem>.json`, each under a temporary name and renamed, so the json only
    appears once its weights are complete (the safetensors + json pair of the network and the classifier)."""
    from safetensors.torch import save_file

    for suffix, write in ((".safetensors", lambda p: save_file(tensors, str(p), metadata={"format": fmt})),
                          (".json", lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))):
        final = stem.with_name(stem.name + suffix)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file owner-only
        os.replace(tmp, final)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_checkpoint_meta(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """The json document of a `what` ("network", "classifier") checkpoint of format `fmt`; UserError if
    missing, unreadable or of another format."""
    stem = _stem(path)
    where = stem.with_name(stem.name + ".json")
    if not where.exists():
        raise UserError(f"{where}: {what} checkpoint not found")
    try:
        doc = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not a readable {what} json ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt or not isinstance(doc.get("config"), dict):
        raise UserError(f"{where}: not a {fmt} checkpoint json")
    return doc


def read_checkpoint_weights(path: str | os.PathLike, expected: dict, what: str) -> dict:
    """The safetensors state of a checkpoint, checked against a model's `expected` state dict (names and
    shapes); UserError if missing, unreadable or mismatched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = _stem(path)
    weights = stem.with_name(stem.name + ".safetensors")
    if not weights.exists():
        raise UserError(f"{weights}: {what} weights not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        raise UserError(f"{weights}: weights do not match the config in {stem}.json "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {bad[:3]})")
    return state


def read_network_meta(path: str | os.PathLike) -> dict:
    """The json document of a checkpoint (config, sigma_data, training metadata)."""
    return read_checkpoint_meta(path, FORMAT, "network")


def load_network(path: str | os.PathLike, device: str | torch.device = "cpu") -> EDMPrecond:
    """Read a checkpoint written by `save_network` as a float32 EDMPrecond in eval mode."""
    doc = read_network_meta(path)
    stem = _stem(path)
    known = {f.name for f in fields(UNetConfig)}
    unknown = set(doc["config"]) - known
    if unknown:
        raise UserError(f"{stem}.json: unknown network config keys {sorted(unknown)}")
    try:
        net = EDMPrecond(UNetConfig(**doc["config"]), float(doc.get("sigma_data", SIGMA_DATA)))
    except (TypeError, ValueError) as e:
        raise UserError(f"{stem}.json: bad network config ({e})") from None
    state = read_checkpoint_weights(stem, net.state_dict(), "network")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.to(device).eval()
