"""The equivariant local score (ELS) machine of Kamb & Ganguli (ICML 2025), through the exact kernel.

ELS is a patch posterior like PSPC's (posterior.py), with two differences: the patch set of a k x k window is
every training patch of that shape at EVERY location (translation-pooled, not same-location), and each output
pixel is the centre pixel of its own window's posterior-mean patch (no composite):
    ELS(z, t)[c, p] = sum_{i, q in Q(p)} softmax(-||z_W(p) - x_i,W(q)||^2 / 2t^2) x_i[c, q],
where W(p) is the k x k window centred at pixel p and Q(p) the locations pooled for it.

Boundary (`boundary`), following Kamb & Ganguli's reference code (github.com/Kambm/convolutional_diffusion):
  "broken"   their boundary-broken ELS (bbELS), the one they match to zero-padded CNNs such as our U-Net.
             Windows are clipped to the image (zero padding of query and keys alike is the same as dropping
             the padded pixels), and a pixel pools the locations whose clipped window has the same shape
             and offset: interior pixels pool every interior location, a pixel r' < k//2 rows from the top
             edge pools the windows of row r' at every interior column, a corner pixel only its own location.
             For k >= 2 max(H, W) - 1 every window is the whole image at one location: the optimal denoiser
             D* exactly (`ELS` takes that shortcut).
  "circular" their plain ELS: the query window wraps around the image (circular padding), keys are the
             interior k x k patches pooled over all locations; equivariant under circular shifts.
Horizontal flips: when `data.xflip`, the flipped images' patches are keys too (the pooled set of 2N images).

Cost: a class of pixels with P locations has B*P queries against N*P keys, so a call costs
~ 2 B N sum_classes P^2 (2d + 4) flops: N (H-k+1)^2 (W-k+1)^2 terms per image pair, the reason for
`ELS(max_images=...)`.
"""
from __future__ import annotations

import torch

from .posterior import KeyChunk, crop_sq_norms, patch_posterior, tile_keys, unfold_u8
from .store import TrainingSet

# queries per kernel group: the pooled keys are shared, so a class's queries are split into groups of this
# many rows (one group's logits tile stays in cache)
QUERY_BLOCK = 1024


def _axis_classes(n: int, k: int, boundary: str):
    """Pixels along one image axis of length n, grouped by their window's clipping: list of
    (p0, p1, lo, hi) = pixels p0..p1-1 whose k-window [p - k//2, p + k//2] loses lo pixels before 0 and hi
    after n - 1 (circular: one class, nothing lost)."""
    r = k // 2
    if boundary == "circular":
        return [(0, n, 0, 0)]
    out = []
    for p in range(n):
        lo, hi = max(0, r - p), max(0, p + r - (n - 1))
        if out and (out[-1][2], out[-1][3]) == (lo, hi):
            out[-1] = (out[-1][0], p + 1, lo, hi)
        else:
            out.append((p, p + 1, lo, hi))
    return out


def els_mean(z: torch.Tensor, t: torch.Tensor, data: TrainingSet, k: int, boundary: str = "broken",
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """ELS denoiser (Kamb & Ganguli 2025, the equivariant local score machine; module docstring) with an odd
    k x k window, over every image of `data` (flips included when data.xflip; excluded images take no part).

    z [B, C, H, W] float in [-1, 1] units; t float64 [B] (EDM sigma, > 0) -> [B, C, H, W] float32.
    dtype: the kernel precision (see posterior.patch_posterior; None: certified logits)."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"ELS needs an odd window size, got {k}")
    b, c, h, w = z.shape
    r = k // 2
    virt = data.u8(torch.arange(len(data), device=data.device))  # [N', C, H, W], flips explicit
    lw_img = data.log_weights(virtual=True)
    # queries: windows of z (circular: of z padded by wrapping, so every pixel has a whole window)
    zq = z.to(torch.float64)
    if boundary == "circular":
        zq = torch.nn.functional.pad(zq, (r, r, r, r), mode="circular")
        if k > min(h, w):
            raise ValueError(f"circular ELS needs k <= min(H, W) = {min(h, w)} (interior key patches), got {k}")
    elif boundary != "broken":
        raise ValueError(f"unknown ELS boundary {boundary!r}")
    out = torch.empty(b, c, h, w, dtype=torch.float32, device=z.device)
    for y0, y1, ylo, yhi in _axis_classes(h, k, boundary):
        for x0, x1, xlo, xhi in _axis_classes(w, k, boundary):
            # 1. the class's window shape, and the image regions whose unfold gives its query and key windows
            kh, kw = k - ylo - yhi, k - xlo - xhi
            p = (y1 - y0) * (x1 - x0)
            if boundary == "circular":  # queries: every wrapped window; keys: every interior window
                qreg, kreg = zq, virt
            else:  # clipped windows of pixels y0..y1-1 start at row y0 - r + ylo, for queries and keys alike
                rows, cols = slice(y0 - r + ylo, y1 - 1 + r - yhi + 1), slice(x0 - r + xlo, x1 - 1 + r - xhi + 1)
                qreg, kreg = zq[:, :, rows, cols], virt[:, :, rows, cols]
            q = unfold_u8(qreg, kh, kw).reshape(p * b, -1)  # [P*B, d], location-major
            d = q.shape[1]
            # 2. pooled keys: every location's patches of every image, kept feature-major [d, P*N'] (uint8)
            keys = unfold_u8(kreg, kh, kw)  # [P', N', d] view of [P', d, N']
            n_keys = keys.shape[0] * keys.shape[1]
            keys = keys.permute(2, 0, 1).reshape(d, n_keys).T
            sq = crop_sq_norms(kreg, kh, kw).reshape(-1).to(torch.float64) / 255.0 ** 2
            lw = None if lw_img is None else lw_img.repeat(n_keys // len(virt))[None]  # key p*N' + i: image i
            # 3. queries in groups of QUERY_BLOCK rows (padded), all groups against the same key stream
            g = -(-len(q) // QUERY_BLOCK)
            qb = -(-len(q) // g)
            qg = torch.zeros(g * qb, d, dtype=torch.float64, device=z.device)
            qg[:len(q)] = q
            tg = torch.ones(g * qb, dtype=torch.float64)
            tg[:len(q)] = t.to(torch.float64).cpu().repeat(p)

            step = tile_keys(z.device)

            def chunks(keys=keys, sq=sq, lw=lw, g=g):
                for i in range(0, n_keys, step):
                    j = min(i + step, n_keys)
                    yield i, KeyChunk(keys[None, i:j].expand(g, -1, -1), sq[None, i:j].expand(g, -1),
                                      None if lw is None else lw[:, i:j])
            mean, _ = patch_posterior(qg.view(g, qb, d), tg.view(g, qb), chunks, dtype)
            # 4. each query's centre pixel (row r - ylo, column r - xlo of its window, every channel)
            centre = torch.arange(c) * kh * kw + (r - ylo) * kw + (r - xlo)
            cen = mean.reshape(g * qb, d)[:len(q), centre].view(y1 - y0, x1 - x0, b, c)
            out[:, :, y0:y1, x0:x1] = cen.permute(2, 3, 0, 1).to(torch.float32)
    return out


def r_squared(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination of each image of pred against ref over its pixels (all channels):
    r^2 = 1 - sum_p (pred_p - ref_p)^2 / sum_p (ref_p - mean_p ref)^2. pred, ref [B, ...] -> float64 [B]."""
    pred, ref = pred.flatten(1).double(), ref.flatten(1).double()
    sst = ((ref - ref.mean(1, keepdim=True)) ** 2).sum(1)
    return 1 - ((pred - ref) ** 2).sum(1) / sst


def calibrate_k(network, data: TrainingSet, ts, ks, n_z: int = 16, max_images: int | None = 100, seed: int = 0,
                boundary: str = "broken") -> list[dict]:
    """ELS window k(t) calibrated against a network as Kamb & Ganguli do: per noise level, the odd k whose
    ELS output has the highest median similarity to the network's (here r^2, `r_squared`, over n_z
    forward-process z = x + t eps, x drawn from `data`, flips included; seeded per t).

    network: a denoiser called as network(z, t) (e.g. denoisers.Network); ts: noise levels (EDM sigma);
    ks: odd candidate windows (k >= 2 max(H, W) - 1 is the optimal denoiser over the pool); max_images: the
    ELS pool (`denoisers.ELS`). Returns per t {t, k (best), median_r2 {k: value}, median_cos {k: value}}."""
    from .denoisers import ELS

    rows = []
    for i, t in enumerate(torch.as_tensor(ts, dtype=torch.float64).tolist()):
        # 1. forward-process queries and the network's outputs
        g = torch.Generator().manual_seed(seed * 1000 + i)
        x = data.get(torch.randint(0, len(data), (n_z,), generator=g))
        z = x + t * torch.randn(x.shape, generator=g).to(x.device)  # drawn on the CPU: the same z on any device
        ref = network(z, t)
        # 2. ELS at every candidate k; median similarity over the z
        r2, cos = {}, {}
        for k in ks:
            out = ELS(data, k=k, boundary=boundary, max_images=max_images, seed=seed)(z, t)
            r2[k] = float(r_squared(out, ref).median())
            cos[k] = float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).median())
        rows.append(dict(t=t, k=max(r2, key=r2.get), median_r2=r2, median_cos=cos))
    return rows
