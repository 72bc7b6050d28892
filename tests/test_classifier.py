"""The Fashion-MNIST classifier whose penultimate features stand in for SSCD (pspc_index.classifier)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pspc_index.classifier import (Classifier, ClassifierConfig, feature_cosine, load_classifier,
                                   read_classifier_meta, save_classifier)
from pspc_index.errors import UserError
from pspc_index.ingest import read_source
from pspc_index.store import to_float

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "classifier" / "fmnist-cnn"


def small_net(seed=0, **cfg) -> Classifier:
    torch.manual_seed(seed)
    net = Classifier(ClassifierConfig(**{"resolution": 8, "c1": 3, "c2": 4, "features": 5, "classes": 3, **cfg}))
    with torch.no_grad():  # biases too, so that the ReLUs cut
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net.eval()


def naive_features(net: Classifier, x: np.ndarray) -> np.ndarray:
    """Penultimate features in float64 by explicit sums over the 3x3 windows (zero padding) and 2x2 pools."""
    w = {k: v.double().numpy() for k, v in net.state_dict().items()}

    def conv_relu_pool(a, wt, b):  # a [C, R, R] -> [C', R/2, R/2]
        c_out, r = wt.shape[0], a.shape[1]
        pad = np.pad(a, ((0, 0), (1, 1), (1, 1)))
        out = np.zeros((c_out, r, r))
        for o in range(c_out):
            for i in range(r):
                for j in range(r):
                    out[o, i, j] = b[o] + (wt[o] * pad[:, i:i + 3, j:j + 3]).sum()
        out = np.maximum(out, 0)
        return out.reshape(c_out, r // 2, 2, r // 2, 2).max(axis=(2, 4))

    feats = []
    for img in x:
        h = conv_relu_pool(img, w["conv1.weight"], w["conv1.bias"])
        h = conv_relu_pool(h, w["conv2.weight"], w["conv2.bias"])
        feats.append(np.maximum(w["hidden.weight"] @ h.reshape(-1) + w["hidden.bias"], 0))
    return np.stack(feats)


def test_features_match_naive_float64():
    net = small_net()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = net.features(x).detach().double().numpy()
    want = naive_features(net, x.double().numpy())
    assert got.shape == (3, 5) and (want > 0).any()
    np.testing.assert_allclose(got, want, atol=1e-5)
    logits = net(x).detach().double().numpy()
    w = net.state_dict()
    np.testing.assert_allclose(logits, want @ w["head.weight"].double().numpy().T + w["head.bias"].double().numpy(),
                               atol=1e-5)


def test_feature_cosine_matches_naive_and_clamps():
    net = small_net()
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    got = feature_cosine(net, a, b, batch=2)
    fa, fb = naive_features(net, a.double().numpy()), naive_features(net, b.double().numpy())
    want = [u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) for u, v in zip(fa, fb)]
    assert got.dtype == torch.float64 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    # identical images: cosine 1; pixels beyond [-1, 1] count as the clamped values
    np.testing.assert_allclose(feature_cosine(net, a, a).numpy(), 1.0, atol=1e-9)
    np.testing.assert_array_equal(feature_cosine(net, a * 3, b).numpy(),
                                  feature_cosine(net, (a * 3).clamp(-1, 1), b).numpy())
    with pytest.raises(UserError, match="paired images"):
        feature_cosine(net, a, b[:4])


def test_save_load_round_trip_and_refusals(tmp_path):
    net = small_net()
    save_classifier(tmp_path / "c", net, {"test_accuracy": 0.5})
    back = load_classifier(tmp_path / "c.json")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(back(x), net(x)) and read_classifier_meta(tmp_path / "c")["meta"]["test_accuracy"] == 0.5
    with pytest.raises(UserError, match="not found"):
        load_classifier(tmp_path / "missing")
    save_classifier(tmp_path / "d", small_net(features=6))
    (tmp_path / "d.safetensors").replace(tmp_path / "c.safetensors")
    with pytest.raises(UserError, match="do not match"):
        load_classifier(tmp_path / "c")
    (tmp_path / "e.json").write_text(json.dumps({"format": "something-else", "config": {}}))
    with pytest.raises(UserError, match="not a pspc-index-classifier"):
        load_classifier(tmp_path / "e")
    with pytest.raises(UserError, match="resolution"):
        ClassifierConfig(resolution=30)


def test_shipped_classifier_accuracy_on_held_out_images():
    """The shipped weights: < 1 MB, and their recorded test accuracy reproduces on the seeded held-out split."""
    meta = read_classifier_meta(SHIPPED)["meta"]
    assert SHIPPED.with_suffix(".safetensors").stat().st_size < 2 ** 20
    net = load_classifier(SHIPPED)
    src = read_source("fashion-mnist")
    test = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:meta["n_test"]].sort().values[:2000]
    x, y = to_float(torch.from_numpy(src.images[test.numpy()])), torch.from_numpy(src.labels[test.numpy()]).long()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).double().mean().item()
    assert meta["test_accuracy"] > 0.85 and abs(acc - meta["test_accuracy"]) < 0.02
