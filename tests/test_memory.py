"""A float16 entry holds float16 in memory through a whole Stage 2 sweep (peak RSS measured in a
child process, so this process's allocations do not count)."""
import json
import os
import subprocess
import sys

import numpy as np

from cli.featcache_cmd import main as featcache
from tests.conftest import invoke

CHILD = """
import json, os, sys, threading
from pathlib import Path
from classifiers.sweep import Representation, SweepSpec, Sweeper
from featcache import FeatureCache

def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

base, peak, done = resident(), [0], threading.Event()
def watch():  # ru_maxrss would also count the import's transient peak
    while not done.wait(0.002):
        peak[0] = max(peak[0], resident())
watcher = threading.Thread(target=watch)
watcher.start()
cache = FeatureCache.open(sys.argv[1])
with Sweeper([Representation("r", cache)], SweepSpec(["ncm", "crt", "tau"], params={"crt": {"epochs": [1]}}),
             Path(sys.argv[2])) as sweeper:
    records = list(sweeper)
done.set()
watcher.join()
print(json.dumps({"peak_kib": max(peak[0], resident()) - base, "top1": [r["top1"] for r in records]}))
"""


def test_float16_entry_needs_about_half_the_memory_of_float32(tmp_path, cache_dir, runner):
    rng = np.random.default_rng(0)
    rows, dim, classes = 120_000, 256, 20
    y = rng.integers(0, classes, rows)
    X = (rng.normal(size=(classes, dim))[y] + rng.normal(size=(rows, dim))).astype(np.float32)
    np.savez(tmp_path / "train.npz", features=X, labels=y)
    np.savez(tmp_path / "test.npz", features=X[:2000], labels=y[:2000])
    W = rng.normal(size=(classes, dim)).astype(np.float32)
    import torch
    torch.save({"fc.weight": torch.from_numpy(W), "fc.bias": torch.zeros(classes)}, tmp_path / "clf.pth")
    peaks = {}
    for dtype in ("float32", "float16"):
        entry = invoke(runner, featcache, ["import", "--name", dtype, "--dtype", dtype, "--classifier",
                                           tmp_path / "clf.pth", "--split", f"train={tmp_path / 'train.npz'}",
                                           "--split", f"test={tmp_path / 'test.npz'}"]).output.split()[-1]
        done = subprocess.run([sys.executable, "-c", CHILD, entry, str(tmp_path / f"sweep-{dtype}")],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        peaks[dtype] = json.loads(done.stdout.splitlines()[-1])
    assert peaks["float32"]["peak_kib"] > 0.9 * X.nbytes / 1024, peaks  # the float32 split itself is resident
    assert peaks["float16"]["peak_kib"] < 0.75 * peaks["float32"]["peak_kib"], peaks
    np.testing.assert_allclose(peaks["float16"]["top1"], peaks["float32"]["top1"], atol=0.5)
