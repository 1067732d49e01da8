"""What checking every chunk costs when a split is read (docs/performance.md, "Loading").

    python benchmarks/read.py                    # 115,847 x 512 float32 (ImageNet-LT train, D = 512)
    python benchmarks/read.py --rows 20000 --dim 256

Writes one split through the real cache, then times (best of 5, warm page cache): np.load of
the same array from a .npy file, FeatureCache.split with fletcher32 checked on every chunk (the
default), the same with check_chunks=False (trusted scratch), and fletcher32 alone on an
in-memory copy of the array.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stage2 import best_of  # noqa: E402
from featcache.store import FeatureCache, fletcher32, writing  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=115_847)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    labels = rng.integers(0, 10, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with writing(root, "bench", {"kind": "benchmark", "feature_dim": args.dim, "dtype": "float32",
                                     "num_classes": 10}) as entry:
            entry.write_split("train", features, labels)
        np.save(root / "train.npy", features)
        assert np.array_equal(FeatureCache.open(root / "bench").split("train").features, features)
        npload = best_of(lambda: np.load(root / "train.npy"), 5)
        checked = best_of(lambda: FeatureCache.open(root / "bench").split("train"), 5)
        trusted = best_of(lambda: FeatureCache.open(root / "bench", check_chunks=False).split("train"), 5)
        chunk = 1 << 20
        raw = features.reshape(-1).view(np.uint8)
        alone = best_of(lambda: [fletcher32(raw[i:i + chunk]) for i in range(0, len(raw), chunk)], 5)
    mb = features.nbytes / 1e6
    print(f"split: {args.rows} x {args.dim} float32, {mb:.0f} MB")
    print(f"np.load                     {npload:.3f} s  {mb / 1e3 / npload:5.2f} GB/s")
    print(f"read, fletcher32 checked    {checked:.3f} s  {mb / 1e3 / checked:5.2f} GB/s  ({npload / checked:.2f}x np.load speed)")
    print(f"read, check_chunks=False    {trusted:.3f} s  {mb / 1e3 / trusted:5.2f} GB/s  ({npload / trusted:.2f}x np.load speed)")
    print(f"fletcher32 alone (1 MiB)    {alone:.3f} s  {mb / 1e3 / alone:5.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
