"""Regenerate docs/results.md: the paper's study on real Fashion-MNIST-LT, from scratch.

    python scripts/reproduce_fashion_mnist.py            # 3 seeds, 12 epochs, lengths 4/12/24 (~70 min, 2 cores)
    python scripts/reproduce_fashion_mnist.py --quick    # 1 seed, 4 epochs, lengths 2/4 (~25 min)

Each step prints one line on stderr (minutes so far, command, its output folder).

Fashion-MNIST-LT: max 5000 per class, imbalance 500 (counts 5000 ... 10), a balanced val split of
20 per class from unused training images, the full balanced test set; the small CNN (tinycnn).

- The grid (the paper's Fig. 1): representations trained with instance / class / square-root /
  progressively-balanced sampling x classifiers joint / NCM / cRT / tau-norm / LWS, every seed
  training its own backbone.
- Table B: every Stage 2 method on the instance-balanced representation, at the papers' defaults
  and tuned on val under one trial budget (``lt-cls sweep --tune``), with ECE and NLL.
- The grid tuned on val as well.
- Training length: IB against CB representations at several lengths (first seed).
- Augmented views (scripts/views_study.py): cRT and LWS on K = 1, 4, 8 cached views of the IB
  representation.

``--stage 1`` only trains (the long part), ``--stage 2`` extracts, sweeps and writes the page from
the runs in --out; the default does both. Everything goes through the CLI, as a user would run
it; the test split is never used for a choice.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers import REGISTRY  # noqa: E402
from classifiers.records import load_records  # noqa: E402
from classifiers.tables import aggregate, render  # noqa: E402

DATA = ["--data", "fashion-mnist-lt", "--max-per-class", "5000", "--imbalance", "500", "--val-per-class", "20"]
SAMPLERS = {"instance": "IB", "class": "CB", "sqrt": "SR", "progressive": "PB"}
PAPER = [name for name, cls in REGISTRY.items() if cls.info.family == "paper"]
GRID = ",".join(PAPER)
REBALANCED = [name for name in PAPER if name != "joint"]
TABLE_B_EXTRA = [name for name, cls in REGISTRY.items() if cls.info.family == "beyond-paper"]
AUTO = ["--param", "tau.tau=auto"]
FEATCACHE = [sys.executable, "-m", "cli.featcache_cmd"]  # the CLIs as run() runs them
LT_CLS = [sys.executable, "-m", "cli.lt_cls_cmd"]


STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr per step, with the minutes since the script started."""
    print(f"[{(time.perf_counter() - STARTED) / 60:5.1f} min] {message}", file=sys.stderr, flush=True)


def run(command: list[str], log: Path, env: dict | None = None) -> str:
    """Run a CLI command; its stdout's last line is returned, everything is kept in ``log``."""
    program, step = command[2].removeprefix("cli.").removesuffix("_cmd"), command[3]  # [python, -m, cli.X, step, ...]
    where = next((command[i + 1] for i, part in enumerate(command[:-1]) if part in ("--out", "--ckpt")), "")
    progress(f"{program} {step} {where}")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12, help="Stage 1 epochs of the grid and Table B.")
    parser.add_argument("--lengths", default="4,12,24", help="Stage 1 epochs of the IB-vs-CB length study.")
    parser.add_argument("--jobs", type=int, default=2, help="Stage 1 trainings at a time (one thread each when > 1).")
    parser.add_argument("--quick", action="store_true", help="Seed 0, 4 epochs, lengths 2,4.")
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fashion-mnist")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start --out over (only a folder an earlier run of this script made).")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.lengths = "0", 4, "2,4"
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.stage in ("1", "all"):
        fresh_out_dir(parser, args.out, args.overwrite)
        stage1(args, seeds, lengths)
    if args.stage in ("2", "all"):
        stage2(args, seeds, lengths)
        print(args.doc)
    return 0


OUT_MARKER = ".reproduce-fashion-mnist"  # marks an --out this script made (and may start over)


def fresh_out_dir(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    """An empty --out for Stage 1. A non-empty one is refused, and started over with --overwrite
    only when this script made it: a user's folder is never deleted."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / OUT_MARKER).is_file():
            parser.error(f"--out {out} is not empty and was not made by this script; choose another --out")
        if not overwrite:
            parser.error(f"--out {out} holds an earlier run; --overwrite starts it over, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_MARKER).write_text("made by scripts/reproduce_fashion_mnist.py\n")


def runs(args, seeds, lengths) -> list[tuple[str, int, int]]:
    """(sampler, seed, epochs) of every Stage 1 run."""
    grid = [(sampler, seed, args.epochs) for seed in seeds for sampler in SAMPLERS]
    extra = [(sampler, seeds[0], n) for n in lengths if n != args.epochs for sampler in ("instance", "class")]
    return grid + extra


def run_dir(args, sampler, seed, epochs) -> Path:
    return args.out / "stage1" / f"{sampler}-e{epochs}-s{seed}"


def stage1(args, seeds, lengths) -> None:
    """Train every run, ``--jobs`` at a time (longest first); one thread per job when several run,
    since OpenMP threads of concurrent processes fighting for 2 cores slow everything down."""
    featcache = FEATCACHE
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None

    def train(job):
        sampler, seed, epochs = job
        began = time.perf_counter()
        run(featcache + ["train", *DATA, "--arch", "tinycnn", "--sampler", sampler, "--epochs", str(epochs),
                         "--batch-size", "128", "--lr", "0.1", "--seed", str(seed),
                         "--out", str(run_dir(args, sampler, seed, epochs)), "--quiet"],
            args.out / f"commands-{sampler}-e{epochs}-s{seed}.log", env)
        return f"{sampler}-e{epochs}-s{seed}", time.perf_counter() - began

    jobs = sorted(runs(args, seeds, lengths), key=lambda job: -job[2])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        timings = dict(pool.map(train, jobs))
    (args.out / "stage1" / "timings.json").write_text(json.dumps({**timings, "jobs": args.jobs}))


def stage2(args, seeds, lengths) -> None:
    featcache, lt_cls = FEATCACHE, LT_CLS
    log, cache = args.out / "commands.log", args.out / "cache"
    timings = {"extract": [], "sweep": []}
    entries = {}
    for sampler, seed, epochs in runs(args, seeds, lengths):
        ckpt = run_dir(args, sampler, seed, epochs) / "last.pt"
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt} is missing: run --stage 1 first")
        began = time.perf_counter()
        entries[sampler, seed, epochs] = run(featcache + ["extract", "--ckpt", str(ckpt), "--cache-dir", str(cache),
                                                          "--quiet"], log)
        timings["extract"].append(time.perf_counter() - began)
    table_b_methods = ",".join(PAPER + TABLE_B_EXTRA)
    sweeps = {"grid": [], "table_b": [], "lengths": [], "table_b_tuned": [], "grid_tuned": []}
    for seed in seeds:  # one backbone per seed: each entry swept with its own seed, so tables average them
        sweeps["grid"].append([*(x for sampler, name in SAMPLERS.items()
                                 for x in ("--cache", f"{name}={entries[sampler, seed, args.epochs]}")),
                               "--methods", GRID, *AUTO, "--seeds", str(seed)])
        sweeps["table_b"].append(["--cache", f"IB={entries['instance', seed, args.epochs]}", "--methods",
                                  table_b_methods, *AUTO, "--param", "logit_adjust.tau=auto", "--seeds", str(seed)])
        sweeps["table_b_tuned"].append(["--cache", f"IB={entries['instance', seed, args.epochs]}", "--methods",
                                        table_b_methods, "--tune", "--seeds", str(seed)])
        sweeps["grid_tuned"].append([*(x for sampler, name in SAMPLERS.items()
                                       for x in ("--cache", f"{name}={entries[sampler, seed, args.epochs]}")),
                                     "--methods", GRID, "--tune", "--seeds", str(seed)])
    sweeps["lengths"].append([*(x for n in lengths for sampler in ("instance", "class")
                                for x in ("--cache", f"{SAMPLERS[sampler]} e{n}={entries[sampler, seeds[0], n]}")),
                              "--methods", GRID, *AUTO, "--seeds", str(seeds[0])])
    for name, commands in sweeps.items():
        out = args.out / name
        for index, command in enumerate(commands):
            began = time.perf_counter()
            run(lt_cls + ["sweep", *command, "--out", str(out), "--quiet",
                          "--overwrite" if index == 0 else "--resume"], log)
            timings["sweep"].append(time.perf_counter() - began)
    figures = args.doc.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    for picture in ("representations.png", "weight_norms-IB.png", "tau_curve-IB.png", "per_class_accuracy-IB.png"):
        shutil.copy(args.out / "grid" / picture, figures / picture)
    shutil.copy(args.out / "lengths" / "representations.png", figures / "lengths.png")
    records = {name: load_records(args.out / name / "results.jsonl") for name in sweeps}
    (figures / "grid.tex").write_text(render(records["grid"], "latex", "grid") + "\n")
    (figures / "table_b.tex").write_text(render(records["table_b"], "latex") + "\n")
    (figures / "table_b_tuned.tex").write_text(render(records["table_b_tuned"], "latex",
                                                      metrics=("many", "medium", "few", "top1", "ece")) + "\n")
    from scripts.views_study import views_section
    views = views_section([run_dir(args, "instance", seed, args.epochs) / "last.pt" for seed in seeds], seeds,
                          args.out / "views", args.out / "views" / "cache")  # own cache: K = 1 is timed too
    stage1_timings = json.loads((args.out / "stage1" / "timings.json").read_text())
    jobs = stage1_timings.pop("jobs", 1)
    write_doc(args, seeds, lengths, records, stage1_timings, jobs, timings, views)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def best_cells(records: list[dict], metric: str = "top1") -> dict[tuple[str, str], float]:
    """{(representation, method label): mean metric} of the successful cells."""
    return {(row.representation, row.method): row.stats[metric][0] for row in aggregate(records)
            if row.stats[metric] is not None}


def finding(records: list[dict], ib: str, others: list[str]) -> str:
    """Whether IB + its best re-balanced classifier beats every other cell, with the numbers."""
    cells = {k: v for k, v in best_cells(records).items() if k[0] in [ib, *others]}
    ib_best = max(((v, m) for (rep, m), v in cells.items() if rep == ib and m in REBALANCED), default=None)
    if ib_best is None:
        return "no IB cell to compare"
    rivals = sorted(((v, rep, m) for (rep, m), v in cells.items() if (rep, m) != (ib, ib_best[1])), reverse=True)
    value, method = ib_best
    if all(value > v for v, _, _ in rivals):
        runner_up = rivals[0]
        return (f"**holds**: {ib} + {method} ({value:.1f}) beats every other cell; the next best is "
                f"{runner_up[1]} + {runner_up[2]} ({runner_up[0]:.1f})")
    better = [f"{rep} + {m} ({v:.1f})" for v, rep, m in rivals if v >= value]
    return (f"**does not hold**: {ib} + its best re-balanced classifier, {method}, reaches {value:.1f}, "
            f"below or tied with {', '.join(better)}")


PUBLISHED = ("crt", "lws", "tau", "la_loss", "cb_loss", "ldam_drw", "las", "bsce", "disalign", "marc")


def defaults_against_tuned(defaults: list[dict], tuned: list[dict]) -> str:
    """Table B twice: each method at its paper's defaults and tuned on val, All / Few / ECE / NLL
    side by side (mean ± std over seeds), then which published methods beat joint, tuned."""
    plain = {row.method: row for row in aggregate(defaults)}
    chosen = {row.method: row for row in aggregate(tuned)}

    def cell(row, metric):
        stat = None if row is None else row.stats[metric]
        if stat is None:
            return "-"
        digits = 3 if metric == "nll" else 1
        return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"
    lines = ["| Method | defaults All | Few | ECE | NLL | tuned All | Few | ECE | NLL | chosen on val |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in plain.items():
        picked = chosen.get(method)
        label = picked.label.partition("(tuned: ")[2].rstrip(")") if picked else ""
        lines.append(f"| {row.label} | " + " | ".join(cell(row, m) for m in ("top1", "few", "ece", "nll")) + " | "
                     + " | ".join(cell(picked, m) for m in ("top1", "few", "ece", "nll")) + f" | {label} |")
    joint = chosen.get("joint")
    beat, fell = [], []
    for method in PUBLISHED:
        row = chosen.get(method)
        if row is None or joint is None or row.stats["top1"] is None or row.stats["few"] is None:
            continue
        wins = row.stats["top1"][0] > joint.stats["top1"][0] and row.stats["few"][0] > joint.stats["few"][0]
        (beat if wins else fell).append(row.label.split(" (tuned")[0])
    verdict = (f"Tuned on val, {len(beat)} of {len(beat) + len(fell)} published methods beat joint on both "
               f"balanced top-1 and Few-shot" + (f"; these do not: {', '.join(fell)}." if fell else "."))
    return "\n".join(lines) + "\n\n" + verdict


def write_doc(args, seeds, lengths, records, stage1_timings, jobs, timings, views: str) -> None:
    grid, table_b, length = records["grid"], records["table_b"], records["lengths"]
    counts = json.loads((args.out / "grid" / "diagnostics.json").read_text())["representations"]["IB"]["train_counts"]
    reps = list(SAMPLERS.values())
    length_lines = []
    for n in lengths:
        subset = [r for r in length if r["representation"] in (f"IB e{n}", f"CB e{n}")]
        length_lines.append(f"- {n} epoch(s): {finding(subset, f'IB e{n}', [f'CB e{n}'])}.")
    ib_joint = {n: best_cells(length).get((f"IB e{n}", "joint")) for n in lengths}
    chosen = [r["params"]["tau"] for r in table_b if r["method"] == "tau"]
    train_seconds = [v for k, v in stage1_timings.items() if f"-e{args.epochs}-" in k]
    text = f"""# Results: the decoupling study on real Fashion-MNIST-LT

Regenerate with `make reproduce` (`python scripts/reproduce_fashion_mnist.py`; `--quick` for a
one-seed, short version); every number below comes from that run. Data: Fashion-MNIST (Debian's
`dataset-fashion-mnist`) made long-tailed with max 5000 per class and imbalance 500 (training
counts {", ".join(map(str, counts))}), a balanced val split of 20 per class from unused training
images, and the full balanced test set (1000 per class). Backbone: `tinycnn` (6 conv layers
32/32/64/64/128/128, BN + ReLU, 128-d), SGD lr 0.1, momentum 0.9, wd 5e-4, cosine, batch 128,
horizontal flips, {args.epochs} epoch(s). Stage 2 with the official schedules (cRT 10 epochs, LWS 5,
lr 0.2, batch 512); tau and the logit-adjustment tau chosen on val. Seeds: {", ".join(map(str, seeds))}
(each seed trains its own backbone and is swept with its own Stage 2 seed). Many / Medium / Few:
classes with > 100 / 20-100 / < 20 training images ({_group_sizes(table_b)}); All = balanced top-1
on test; mean ± std over seeds.

## The grid: representation x classifier (paper Fig. 1)

Rows: the Stage 1 sampler that trained the representation (instance-, class-, square-root-,
progressively-balanced). Columns: the Stage 2 classifier. Bold: best classifier of the
representation; †: best representation for the classifier.

### All (balanced top-1)

{render(grid, "md", "grid", "top1")}

### Few-shot

{render(grid, "md", "grid", "few")}

The paper's finding, "instance-balanced representation + the best re-balanced classifier beats
every other combination", {finding(grid, "IB", [r for r in reps if r != "IB"])}.

![representation x classifier](results/representations.png)

LaTeX: [results/grid.tex](results/grid.tex).

## Training length: IB against CB representations (seed {seeds[0]})

The paper trains 90-200 epochs; here {", ".join(map(str, lengths))} epochs, one seed.

{render(length, "md", "grid", "top1")}

{chr(10).join(length_lines)}

IB joint training alone: {", ".join(f"{n} epochs {v:.1f}" for n, v in ib_joint.items() if v is not None)}.

![training length](results/lengths.png)

## Table B: every classifier strategy on the instance-balanced representation (paper Table 2)

{render(table_b, "md")}

tau chosen on val: {", ".join(f"{t:g}" for t in chosen)}. LaTeX: [results/table_b.tex](results/table_b.tex).

### Paper defaults against tuned on val (one budget)

The same representation; every method tuned on the val split under the same budget
(`lt-cls sweep --tune`: at most 12 trials per method, docs/methods.md), the test numbers of its
val-best trial reported. ECE in %, NLL in nats; mean ± std over seeds.

{defaults_against_tuned(table_b, records["table_b_tuned"])}

{render(records["table_b_tuned"], "md", metrics=("many", "medium", "few", "top1", "ece", "nll"))}

LaTeX: [results/table_b_tuned.tex](results/table_b_tuned.tex). The same comparison on a small
problem (digits-lt, 369 training images) and a 200-class synthetic one:
[results/tuned_study.md](results/tuned_study.md) (`python scripts/tuned_study.py`).

### The grid, tuned on val

{render(records["grid_tuned"], "md", "grid", "top1")}

Tuned, the paper's finding {finding(records["grid_tuned"], "IB", [r for r in reps if r != "IB"])}.

{views}

## Pictures (IB representation, seed {seeds[0]})

![weight norms](results/weight_norms-IB.png)
![accuracy against tau](results/tau_curve-IB.png)
![per-class accuracy](results/per_class_accuracy-IB.png)

## Wall-clock time on the machine that made this ({platform.processor() or platform.machine()}, 2 cores)

| stage | mean seconds per run | runs |
|---|---|---|
| Stage 1 train, {args.epochs} epoch(s) | {_mean(train_seconds):.1f} | {len(train_seconds)} |
| Stage 1 train, all lengths ({jobs} at a time) | {sum(stage1_timings.values()) / 60:.1f} min in all | {len(stage1_timings)} |
| extract (train + val + test) | {_mean(timings['extract']):.1f} | {len(timings['extract'])} |
| Stage 2 sweep | {_mean(timings['sweep']):.1f} | {len(timings['sweep'])} |

Whole reproduction: about {(sum(stage1_timings.values()) / jobs + sum(timings['extract']) + sum(timings['sweep'])) / 60:.0f} minutes
(the views study's extractions come on top, in its own table). `--quick` (one seed, 4 epochs,
lengths 2 and 4) is the short variant.
"""
    args.doc.write_text(text)


def _group_sizes(records: list[dict]) -> str:
    r = records[0]
    return f"{r['n_many']} / {r['n_medium']} / {r['n_few']} classes"


if __name__ == "__main__":
    sys.exit(main())
