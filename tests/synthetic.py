"""Synthetic long-tailed features for Stage 2 tests: Gaussian class clusters and a head-biased
'joint' classifier (weight norms growing with class size, as joint training produces)."""
import numpy as np


def long_tailed_features(num_classes=8, dim=16, max_count=200, imbalance=40, val_per_class=15,
                         test_per_class=30, spread=1.6, seed=0):
    rng = np.random.default_rng(seed)
    counts = [max(1, int(max_count * imbalance ** (-i / (num_classes - 1)))) for i in range(num_classes)]
    centres = rng.normal(size=(num_classes, dim)).astype(np.float32) * 2.0

    def draw(per_class):
        y = np.repeat(np.arange(num_classes), per_class)
        X = centres[y] + spread * rng.normal(size=(len(y), dim)).astype(np.float32)
        return np.maximum(X, 0).astype(np.float32) + 0.1, y  # ReLU-like, positive

    train = draw(counts)
    val = draw([val_per_class] * num_classes)
    test = draw([test_per_class] * num_classes)
    scale = (1 + np.log(np.asarray(counts, np.float32)))[:, None]
    means = np.stack([train[0][train[1] == c].mean(0) for c in range(num_classes)])
    W = (means / np.linalg.norm(means, axis=1, keepdims=True) * scale).astype(np.float32)
    b = (0.3 * np.log(np.asarray(counts, np.float32))).astype(np.float32)
    return {"train": train, "val": val, "test": test, "W": W, "b": b, "counts": np.asarray(counts)}


def import_entry(runner, tmp_path, name: str, data: dict) -> str:
    """``featcache import`` of ``long_tailed_features`` output (train / val / test and the joint
    classifier W, b) under ``name``; returns the entry directory. A split ``data`` lacks is left out."""
    import torch

    from cli.featcache_cmd import main as featcache
    from tests.conftest import invoke
    args = ["import", "--name", name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    for split in (s for s in ("train", "val", "test") if s in data):
        X, y = data[split]
        np.savez(tmp_path / f"{split}.npz", features=X, labels=y)
        args += ["--split", f"{split}={tmp_path / f'{split}.npz'}"]
    torch.save({"fc.weight": torch.from_numpy(data["W"]), "fc.bias": torch.from_numpy(data["b"])}, tmp_path / "clf.pth")
    return invoke(runner, featcache, args + ["--classifier", tmp_path / "clf.pth"]).output.split()[-1]
