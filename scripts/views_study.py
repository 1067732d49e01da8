"""Do cached augmented views help cRT and LWS? (issue 17) K = 1 against K = 4 and 8 on Fashion-MNIST-LT.

    python scripts/views_study.py --ckpt runs/fashion-mnist/stage1/instance-e12-s0/last.pt --seed 0 \\
        [--ckpt ... --seed 1 ...] --out runs/views --section views.md

For every instance-balanced checkpoint: `featcache extract --views K` (K = 1, 4, 8; views 1..K-1
the data set's own training augmentation), timed; `lt-cls sweep --methods crt,lws` on the three
entries with the checkpoint's seed. :func:`views_section` returns the Markdown section (the table
and a sentence, computed from the numbers, on whether the views help); the reproduction script
puts it into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.base import display_name  # noqa: E402
from classifiers.records import load_records  # noqa: E402

VIEW_COUNTS = (1, 4, 8)
METHODS = ("crt", "lws")
MIN_GAIN = 0.5  # points of balanced top-1 below which a difference is not called a difference


def views_section(checkpoints: list[Path], seeds: list[int], out: Path, cache_dir: Path) -> str:
    """Extract, sweep and tabulate; ``seeds[i]`` is the Stage 2 seed of ``checkpoints[i]`` (its own)."""
    # imported here, not at the top: the reproduction script imports this module
    from scripts.reproduce_fashion_mnist import DATA, run

    if len(checkpoints) != len(seeds) or not checkpoints:
        raise SystemExit("views_section needs one seed per checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    featcache = [sys.executable, "-m", "cli.featcache_cmd"]
    lt_cls = [sys.executable, "-m", "cli.lt_cls_cmd"]
    costs: dict[int, list[dict]] = {k: [] for k in VIEW_COUNTS}
    for index, (ckpt, seed) in enumerate(zip(checkpoints, seeds)):
        entries = {}
        for views in VIEW_COUNTS:
            before = {p.name for p in cache_dir.iterdir()} if cache_dir.is_dir() else set()
            began = time.perf_counter()
            entries[views] = Path(run(featcache + ["extract", "--ckpt", str(ckpt), *DATA, "--views", str(views),
                                                   "--cache-dir", str(cache_dir), "--quiet"], log))
            seconds = time.perf_counter() - began
            manifest = json.loads((entries[views] / "manifest.json").read_text())
            train_files = [s["size"] for s in manifest["splits"]["train"]["shards"]]
            costs[views].append({"seconds": None if entries[views].name in before else seconds,
                                 "train_mib": sum(train_files) / 2**20,
                                 "rows": manifest["splits"]["train"]["rows"],
                                 "augmentation": manifest["splits"]["train"].get("view_transform")})
        caches = [x for views, path in entries.items() for x in ("--cache", f"K{views}={path}")]
        run(lt_cls + ["sweep", *caches, "--methods", ",".join(METHODS), "--seeds", str(seed), "--out",
                      str(out / "sweep"), "--quiet", "--no-plots", "--overwrite" if index == 0 else "--resume"], log)
    records = [r for r in load_records(out / "sweep" / "results.jsonl") if r["status"] == "ok"]
    return _render(records, costs, checkpoints, seeds)


def _stats(records: list[dict], views: int, method: str, metric: str) -> tuple[float, float, int] | None:
    values = [r[metric] for r in records if r["representation"] == f"K{views}" and r["method"] == method]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std, len(values)


def _cell(stats) -> str:
    if stats is None:
        return "failed"
    mean, std, n = stats
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def verdict(records: list[dict], method: str) -> str:
    """Whether K = 4 or 8 beats K = 1 for ``method`` by more than the seeds' spread (and MIN_GAIN)."""
    base = _stats(records, 1, method, "top1")
    if base is None:
        return f"{display_name(method)} failed with K = 1"
    rivals = {k: _stats(records, k, method, "top1") for k in VIEW_COUNTS[1:]}
    rivals = {k: s for k, s in rivals.items() if s is not None}
    if not rivals:
        return f"{display_name(method)} failed with every K > 1"
    best_k = max(rivals, key=lambda k: rivals[k][0])
    worst_k = min(rivals, key=lambda k: rivals[k][0])
    margin = max(MIN_GAIN, base[1], *(s[1] for s in rivals.values()))
    shown = ", ".join(f"K = {k}: {s[0]:.1f}" for k, s in rivals.items())
    if rivals[best_k][0] - base[0] > margin:
        return (f"the views **help** {display_name(method)} (balanced top-1 {base[0]:.1f} with K = 1; {shown}; "
                f"gain larger than the {margin:.1f}-point noise margin)")
    if base[0] - rivals[worst_k][0] > margin:
        return (f"the views **hurt** {display_name(method)} (balanced top-1 {base[0]:.1f} with K = 1; {shown}; "
                f"loss larger than the {margin:.1f}-point noise margin)")
    return (f"the views **make no clear difference** to {display_name(method)} (balanced top-1 {base[0]:.1f} with "
            f"K = 1; {shown}; all within the {margin:.1f}-point noise margin)")


def _render(records, costs, checkpoints, seeds) -> str:
    header = "| K | " + " | ".join(f"{display_name(m)} All | {display_name(m)} Few" for m in METHODS) + \
             " | extract seconds (train + val + test) | training split on disk |"
    lines = [header, "|" + "---|" * (2 * len(METHODS) + 3)]
    for views in VIEW_COUNTS:
        cells = [_cell(_stats(records, views, m, metric)) for m in METHODS for metric in ("top1", "few")]
        timed = [c["seconds"] for c in costs[views] if c["seconds"] is not None]
        seconds = f"{sum(timed) / len(timed):.1f}" if timed else "cached"
        mib = sum(c["train_mib"] for c in costs[views]) / len(costs[views])
        lines.append(f"| {views} | " + " | ".join(cells) + f" | {seconds} | {mib:.1f} MiB |")
    augmentation = next((c["augmentation"] for c in costs[VIEW_COUNTS[-1]] if c["augmentation"]), "?")
    sentences = "; ".join(verdict(records, m) for m in METHODS)
    caveat = ("" if len(seeds) > 1 else
              f" With one seed there is no spread to judge by: the margin is only the {MIN_GAIN}-point floor.")
    runs = ", ".join(f"{Path(c).parent.name} (seed {s})" for c, s in zip(checkpoints, seeds))
    return f"""## Augmented views in the cache: cRT and LWS with K = 1, 4, 8

`featcache extract --views K` stores K views of every training image: view 0 the eval transform,
views 1..K-1 the data set's training augmentation (here `{augmentation}`); cRT and LWS draw a
sample by their sampler, then one of its views uniformly (docs/methods.md). Instance-balanced
representations {runs}; each swept with its own seed; All = balanced top-1 on test, Few = Few-shot
accuracy, mean ± std over {len(seeds)} seed(s). Extraction time is the wall time of
`featcache extract` for the whole entry ("cached": the entry already existed).

{chr(10).join(lines)}

Here {sentences}.{caveat}
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, action="append", required=True, help="Instance-balanced checkpoint (repeat).")
    parser.add_argument("--seed", type=int, action="append", required=True, help="Its seed (repeat, in order).")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "views")
    parser.add_argument("--cache-dir", type=Path, help="Cache root (default OUT/cache).")
    parser.add_argument("--section", type=Path, required=True, help="Write the Markdown section here.")
    args = parser.parse_args(argv)
    text = views_section(args.ckpt, args.seed, args.out, args.cache_dir or args.out / "cache")
    args.section.write_text(text)
    print(args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
