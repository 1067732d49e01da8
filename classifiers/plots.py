"""The paper's pictures from a sweep directory (matplotlib, PNG): per-class weight norms sorted by
training count (Fig. 2 left), balanced top-1 against tau on val and the eval split, per-class
accuracy against training count for each method."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

from .base import display_name
from .records import DIAGNOSTICS_FILE, RESULTS_FILE, load_records, read_diagnostics
from .tables import aggregate


def plot_sweep(directory: str | Path, records: list[dict] | None = None) -> list[Path]:
    """Write the PNGs next to the sweep's diagnostics; return their paths. With several
    representations each gets its own set (file names suffixed with its label) and the
    representation x classifier bars (the paper's Fig. 1) are drawn from the records (``records``:
    those of the directory's results file, already read; default: read them)."""
    import matplotlib
    matplotlib.use("Agg")

    directory = Path(directory)
    source = directory / DIAGNOSTICS_FILE
    if not source.is_file():
        raise FeatcacheError(f"{directory} has no {DIAGNOSTICS_FILE} (run `lt-cls sweep --out {directory}` first)")
    diagnostics = read_diagnostics(source, "rerun the sweep with --overwrite to rebuild it")
    if "representations" not in diagnostics:
        raise FeatcacheError(f"{source} is damaged or not a sweep's diagnostics file (no 'representations'); "
                             "rerun the sweep with --overwrite to rebuild it")
    representations = diagnostics["representations"]
    written = []
    for label, diagnostics in representations.items():
        suffix = "" if len(representations) == 1 else "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        written += _plot_representation(diagnostics, directory, suffix, "" if not suffix else f" ({label})")
    if records is None:
        records = load_records(directory / RESULTS_FILE)
    if len({r["representation"] for r in records}) > 1:
        written.append(_plot_grid(records, directory / "representations.png"))
    return written


def _plot_representation(diagnostics: dict, directory: Path, suffix: str, title: str) -> list[Path]:
    import matplotlib.pyplot as plt

    counts = np.asarray(diagnostics["train_counts"])
    order = np.argsort(-counts, kind="stable")
    written = []
    if diagnostics.get("weight_norms"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, norms in diagnostics["weight_norms"].items():
            norms = np.asarray(norms)
            ax.plot(np.arange(len(order)), norms[order] / norms.max(), label=display_name(method))
        ax.set(xlabel="class index, sorted by training count (head -> tail)", ylabel="weight norm (/ max)",
               title="Per-class classifier weight norms" + title)
        ax.legend()
        written.append(_save(fig, directory / f"weight_norms{suffix}.png"))

    if diagnostics.get("tau_curve"):
        curve = diagnostics["tau_curve"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, values in curve.items():
            if split == "chosen":
                continue
            taus = sorted(values, key=float)
            ax.plot([float(t) for t in taus], [values[t] for t in taus], marker="o", ms=3, label=split)
        ax.axvline(curve["chosen"], color="grey", linestyle="--", label=f"chosen tau = {curve['chosen']:g} (on val)")
        ax.set(xlabel="tau", ylabel="balanced top-1 (%)", title="tau-normalisation" + title)
        ax.legend()
        written.append(_save(fig, directory / f"tau_curve{suffix}.png"))

    if diagnostics.get("per_class"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, accuracies in diagnostics["per_class"].items():
            acc = np.array([np.nan if a is None else a for a in accuracies], dtype=float)
            ax.plot(counts[order], 100 * acc[order], marker=".", label=display_name(method))
        ax.set_xscale("log")
        ax.set(xlabel="training images of the class (log scale)", ylabel="accuracy (%)",
               title="Per-class accuracy against training count" + title)
        ax.legend(fontsize=8)
        written.append(_save(fig, directory / f"per_class_accuracy{suffix}.png"))
    return written


def _plot_grid(records: list[dict], path: Path) -> Path:
    """The paper's Fig. 1: one group of bars per representation, one bar per method (and parameters),
    mean over seeds with the std as error bar, for Many / Medium / Few / All."""
    import matplotlib.pyplot as plt

    rows = aggregate(records)
    representations = list(dict.fromkeys(r.representation for r in rows))
    methods = list(dict.fromkeys(r.requested for r in rows))
    cells = {(r.representation, r.requested): r for r in rows}
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
    width = 0.8 / len(methods)
    for ax, (column, title) in zip(axes, (("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("top1", "All"))):
        for i, method in enumerate(methods):
            stats = [getattr(cells.get((rep, method)), "stats", {}).get(column) for rep in representations]
            ax.bar(np.arange(len(representations)) + (i - (len(methods) - 1) / 2) * width,
                   [np.nan if s is None else s[0] for s in stats], width,
                   yerr=[0.0 if s is None else s[1] for s in stats], label=method, capsize=2)
        ax.set_xticks(np.arange(len(representations)), representations, rotation=20, ha="right")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Representation x classifier (mean over seeds)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
