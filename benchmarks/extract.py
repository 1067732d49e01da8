"""Extraction: throughput with HDF5 writing against the pure forward pass, on-disk size and read
time per dtype and compression, and the backbone FLOPs that caching saves over the official
Stage 2 (which re-runs the frozen backbone on every batch of cRT and LWS). Extraction and the pure
forward pass are timed in --runs interleaved pairs and reported as medians with their spread.

    python benchmarks/extract.py                 # Fashion-MNIST-LT (Debian's files) or digits-lt
    python benchmarks/extract.py --data digits-lt

Prints a table; exits non-zero only when it cannot run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.backbones import build_model, model_channels  # noqa: E402
from featcache.batches import iterate_batches  # noqa: E402
from featcache.checkpoints import load_checkpoint, load_model  # noqa: E402
from featcache.datasets import FASHION_MNIST_ROOT, DataSpec  # noqa: E402
from featcache.extract import ExtractRequest, extract  # noqa: E402
from featcache.store import FeatureCache, writing  # noqa: E402


def pure_forward_seconds(ckpt: Path, spec: DataSpec, arch: str, batch_size: int, splits: list[str]) -> float:
    """Load the data set and the checkpoint, run the forward pass over the splits, store nothing."""
    began = time.perf_counter()
    source = spec.load()
    model = load_model(load_checkpoint(ckpt), arch)
    channels = model_channels(arch, source.channels)
    with torch.no_grad():
        for name in splits:
            samples = source.split(name)
            for images, _, _ in iterate_batches(source, samples, np.arange(len(samples)), batch_size, channels=channels):
                model.forward_features(images).numpy()
    return time.perf_counter() - began


def official_stage2_flops(arch: str = "resnext50_32x4d", size: int = 224, train: int = 115846, val: int = 20000,
                          test: int = 50000) -> dict:
    """Backbone FLOPs of the official cRT (10 epochs) + LWS (5 epochs) on ImageNet-LT against one
    extraction pass over train + val + test, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(arch, 1000).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.forward_features(torch.randn(1, 3, size, size))
    per_image = counter.get_total_flops()
    official = per_image * train * (10 + 5)
    cached = per_image * (train + val + test)
    return {"arch": arch, "per_image_gflop": per_image / 1e9, "official_pflop": official / 1e15,
            "cached_pflop": cached / 1e15, "saving": official / cached}


def storage_table(features: np.ndarray, labels: np.ndarray, root: Path) -> list[tuple]:
    rows = []
    for dtype in ("float32", "float16"):
        for compression in ("none", "lzf", "gzip"):
            key = f"{dtype}-{compression}"
            began = time.perf_counter()
            with writing(root, key, {"feature_dim": features.shape[1], "dtype": dtype, "num_classes": 10}) as entry:
                entry.write_split("train", features, labels, compression=compression)
            write_s = time.perf_counter() - began
            size = sum(p.stat().st_size for p in (root / key / "train").glob("*.h5"))
            read_s = min(_timed(lambda: FeatureCache.open(root / key).split("train")) for _ in range(3))
            rows.append((dtype, compression, size / 2**20, write_s, read_s))
    return rows


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "fashion-mnist-lt" if Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file() else "digits-lt"
    parser.add_argument("--data", default=default)
    parser.add_argument("--arch", default="tinycnn")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5, help="interleaved pairs (forward, extract)")
    args = parser.parse_args(argv)
    options = {"imbalance": 1.0, "max_per_class": 5000} if args.data == "fashion-mnist-lt" else {}
    spec = DataSpec(args.data, None, options)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        source = spec.load()
        torch.save({"arch": args.arch, "state_dict": build_model(args.arch, source.num_classes,
                                                                 source.channels).state_dict()}, ckpt)
        splits = [s for s in ("train", "val", "test") if s in source.splits]
        images = sum(len(source.split(s)) for s in splits)
        pure_forward_seconds(ckpt, spec, args.arch, args.batch_size, splits[-1:])  # warm-up: imports, caches
        extract(ExtractRequest(ckpt=str(ckpt), data=spec, splits=splits[-1:], cache_dir=str(Path(tmp) / "warm"),
                               batch_size=args.batch_size, progress=False))
        forward_s, extract_s = [], []
        for attempt in range(args.runs):  # interleaved: this machine is noisy, its load drifts
            forward_s.append(pure_forward_seconds(ckpt, spec, args.arch, args.batch_size, splits))
            began = time.perf_counter()
            entry = extract(ExtractRequest(ckpt=str(ckpt), data=spec, cache_dir=str(Path(tmp) / f"cache{attempt}"),
                                           batch_size=args.batch_size, progress=False))
            extract_s.append(time.perf_counter() - began)
        train = FeatureCache.open(entry).split("train")
        storage = storage_table(train.features, train.labels, Path(tmp) / "sizes")
    flops = official_stage2_flops()

    print(f"data {args.data} ({images} images), arch {args.arch}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    ratios = [f / e for f, e in zip(forward_s, extract_s)]
    print(f"{args.runs} interleaved runs (forward, extract, forward, ...); median (min-max):")
    for label, seconds in (("pure forward", forward_s), ("extract to cache", extract_s)):
        print(f"{label:<18}{images / np.median(seconds):9.0f} img/s  "
              f"({images / max(seconds):.0f}-{images / min(seconds):.0f}; {np.median(seconds):.2f} s)")
    print(f"extraction speed / pure forward: {np.median(forward_s) / np.median(extract_s):.3f}x (ratio of medians); "
          f"per pair {np.median(ratios):.3f}x median ({min(ratios):.3f}-{max(ratios):.3f}). Both load the data "
          "set and the checkpoint; extraction also writes, checksums and hashes every shard")
    print(f"\ntrain split, {train.features.shape[0]} x {train.features.shape[1]}:")
    print(f"{'dtype':<9}{'compression':<13}{'MiB':>8}{'write s':>9}{'read s':>8}")
    for dtype, compression, mib, write_s, read_s in storage:
        print(f"{dtype:<9}{compression:<13}{mib:>8.1f}{write_s:>9.3f}{read_s:>8.3f}")
    print(f"\ncaching vs the official Stage 2 on ImageNet-LT ({flops['arch']}, 224 px, "
          f"{flops['per_image_gflop']:.2f} GFLOP per image forward):")
    print(f"official cRT (10 epochs) + LWS (5 epochs) re-run the backbone: {flops['official_pflop']:.2f} PFLOP; "
          f"one extraction of train+val+test: {flops['cached_pflop']:.2f} PFLOP ({flops['saving']:.1f}x less), "
          "and every further Stage 2 run costs no backbone FLOPs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
