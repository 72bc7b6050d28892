"""A small Fashion-MNIST classifier whose penultimate layer serves as a feature space for sample similarity.

Niedoba et al. (2025, Sec. 4) compare samples by SSCD copy-detection descriptors, which cannot be had
here; the evaluation (tools/evaluate.py) uses the cosine between this classifier's penultimate-layer
features instead, a stand-in. Trained by tools/train_classifier.py; checkpoints are a safetensors file of
weights and a json file of config and training metadata, as for the U-Net (network.py): nothing is ever
unpickled.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .network import _stem, read_checkpoint_meta, read_checkpoint_weights, write_checkpoint

FORMAT = "pspc-index-classifier"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Two 3x3 conv + 2x2 max-pool stages (c1, c2 channels), a hidden layer of `features` units, `classes`
    logits; images [B, 1, resolution, resolution] with resolution divisible by 4."""

    resolution: int = 28
    c1: int = 16
    c2: int = 32
    features: int = 64
    classes: int = 10

    def __post_init__(self):
        if self.resolution % 4 or min(self.c1, self.c2, self.features, self.classes) < 1:
            raise UserError(f"classifier: bad config {asdict(self)} (resolution must be divisible by 4, "
                            "sizes positive)")


class Classifier(nn.Module):
    """conv-ReLU-pool, conv-ReLU-pool, linear-ReLU (the penultimate features), linear (the logits)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        self.conv1 = nn.Conv2d(1, c.c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c.c1, c.c2, 3, padding=1)
        self.hidden = nn.Linear(c.c2 * (c.resolution // 4) ** 2, c.features)
        self.head = nn.Linear(c.features, c.classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: x [B, 1, R, R] float, pixels in [-1, 1] -> [B, features] float (>= 0)."""
        # 1. two conv stages, each halving the resolution
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        # 2. the hidden layer the logits are read from
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of x [B, 1, R, R], pixels in [-1, 1]."""
        return self.head(self.features(x))


def feature_cosine(net: Classifier, a: torch.Tensor, b: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Cosine similarity of the penultimate features of paired images: a, b [B, 1, R, R], pixels in [-1, 1]
    (clamped to it first; samples may overshoot) -> [B] float64. The SSCD stand-in of tools/evaluate.py."""
    if a.shape != b.shape:
        raise UserError(f"feature_cosine: paired images of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    out = []
    with torch.no_grad():
        for j in range(0, len(a), batch):
            # 1. features of each pair's two images, in float64 for the cosine
            fa = net.features(a[j:j + batch].float().clamp(-1, 1)).double()
            fb = net.features(b[j:j + batch].float().clamp(-1, 1)).double()
            # 2. cosine per pair (0 where a feature vector is all zero)
            out.append(F.cosine_similarity(fa, fb, dim=1, eps=1e-12))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def save_classifier(path: str | os.PathLike, net: Classifier, extra_meta: dict | None = None) -> None:
    """Write `<path>.safetensors` (float32 weights) and `<path>.json` (config, metadata), weights first, each
    under a temporary name and renamed, so the json only appears once its weights are complete."""
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(net.config),
           "parameters": sum(p.numel() for p in net.parameters()), "meta": extra_meta or {}}
    write_checkpoint(stem, tensors, doc, FORMAT)


def read_classifier_meta(path: str | os.PathLike) -> dict:
    """The json document of a classifier checkpoint; UserError if missing or not one."""
    return read_checkpoint_meta(path, FORMAT, "classifier")


def load_classifier(path: str | os.PathLike) -> Classifier:
    """Read a checkpoint written by `save_classifier` as a float32 Classifier in eval mode (CPU); UserError
    if the files are missing, unreadable, or the weights do not match the config."""
    doc = read_classifier_meta(path)
    stem = _stem(path)
    unknown = set(doc["config"]) - {f.name for f in fields(ClassifierConfig)}
    if unknown:
        raise UserError(f"{stem}.json: unknown classifier config keys {sorted(unknown)}")
    try:
        net = Classifier(ClassifierConfig(**doc["config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{stem}.json: bad classifier config ({e})") from None
    state = read_checkpoint_weights(stem, net.state_dict(), "classifier")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()
