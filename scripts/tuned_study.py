"""Paper defaults against tuned on val (one budget) on two more long-tailed problems; writes
docs/results/tuned_study.md (linked from docs/results.md).

    python scripts/tuned_study.py            # 3 seeds (about 5 min on 2 idle cores)

- digits-lt: scikit-learn's digits made long-tailed (369 training images, 120 ... 4 per class),
  the small CNN trained 30 epochs with instance-balanced sampling, as `make demo` does.
- many-class: 200 classes of synthetic Gaussian features (64-d, 200 ... 2 training images per
  class, 8,562 rows), with a joint classifier whose weight norms grow with the class size, as joint
  training makes them (tests/synthetic.py). Synthetic: it shows the mechanics at a many-class
  shape, not what a real backbone gives.

Every method runs at its paper's defaults, then tuned (`lt-cls sweep --tune`, at most 12 trials per
method, chosen on the balanced val split); the test split is never used for a choice.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.records import load_records  # noqa: E402
from scripts.reproduce_fashion_mnist import FEATCACHE, LT_CLS, PUBLISHED, defaults_against_tuned, run  # noqa: E402

METHODS = ",".join(("joint",) + PUBLISHED)


def digits_entry(work: Path, log: Path) -> str:
    run(FEATCACHE + ["train", "--data", "digits-lt", "--arch", "tinycnn", "--sampler", "instance", "--epochs", "30",
                     "--out", str(work / "digits"), "--quiet"], log)
    return run(FEATCACHE + ["extract", "--ckpt", str(work / "digits" / "last.pt"), "--quiet"], log)


def many_class_entry(work: Path, log: Path) -> str:
    import numpy as np
    import torch

    from tests.synthetic import long_tailed_features
    data = long_tailed_features(num_classes=200, dim=64, max_count=200, imbalance=100, val_per_class=10,
                                test_per_class=20, spread=2.5, seed=3)
    args = []
    for split in ("train", "val", "test"):
        np.savez(work / f"{split}.npz", features=data[split][0], labels=data[split][1])
        args += ["--split", f"{split}={work / f'{split}.npz'}"]
    torch.save({"fc.weight": torch.from_numpy(data["W"]), "fc.bias": torch.from_numpy(data["b"])}, work / "clf.pth")
    return run(FEATCACHE + ["import", "--name", "many-class", *args,
                "--classifier", str(work / "clf.pth")], log)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results" / "tuned_study.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        os.environ["FEATCACHE_DIR"] = str(work / "cache")  # the commands' cache: this run's own
        log = work / "commands.log"
        entries = {"digits-lt": digits_entry(work, log), "many-class (synthetic)": many_class_entry(work, log)}
        sections = []
        for title, entry in entries.items():
            records = {}
            for mode in ("defaults", "tuned"):
                out = work / f"{title.split()[0]}-{mode}"
                run(LT_CLS + ["sweep", "--cache", entry, "--methods", METHODS,
                     "--seeds", args.seeds, "--out", str(out), "--quiet", "--no-plots"]
                    + (["--tune"] if mode == "tuned" else []), log)
                records[mode] = load_records(out / "results.jsonl")
            sections.append(f"## {title}\n\n{defaults_against_tuned(records['defaults'], records['tuned'])}\n")
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(f"""# Paper defaults against tuned on val: two more problems

Made by `python scripts/tuned_study.py` (commit {done.stdout.strip() or "?"}; seeds {args.seeds}). {__doc__.split(chr(10) * 2, 2)[2].strip()}

All = balanced top-1 on test, Few = classes with < 20 training images, ECE in %, NLL in nats;
mean ± std over seeds.

{chr(10).join(sections)}""")
    print(args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
