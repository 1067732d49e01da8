"""The paper's pictures from a sweep directory (matplotlib; PNG, PDF or SVG): per-class weight norms
sorted by training count (Fig. 2 left), balanced top-1 against tau on val and the eval split,
per-class accuracy against training count for each method (the shot thresholds marked, an empty
group said), a reliability diagram per method (accuracy against confidence, with its ECE), and
with several representations the representation x classifier bars (Fig. 1)."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.metrics import binned_calibration_error

from .base import display_name
from .records import DIAGNOSTICS_FILE, RESULTS_FILE, load_records, read_diagnostics
from .tables import aggregate

PLOT_FORMATS = ("png", "pdf", "svg")


def plot_sweep(directory: str | Path, records: list[dict] | None = None, fmt: str = "png",
               dpi: int = 120) -> list[Path]:
    """Write the pictures (``fmt``: png, pdf or svg; ``dpi`` for png) next to the sweep's
    diagnostics; return their paths. With several representations each gets its own set (file
    names suffixed with its label) and the representation x classifier bars (the paper's Fig. 1)
    are drawn from the records (``records``: those of the directory's results file, already read;
    default: read them)."""
    import matplotlib
    matplotlib.use("Agg")
    if fmt not in PLOT_FORMATS:
        raise FeatcacheError(f"--plot-format {fmt!r}: choose one of {', '.join(PLOT_FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 2400:
        raise FeatcacheError(f"--dpi {dpi!r}: give an integer in 10..2400")

    directory = Path(directory)
    source = directory / DIAGNOSTICS_FILE
    if not source.is_file():
        raise FeatcacheError(f"{directory} has no {DIAGNOSTICS_FILE} (run `lt-cls sweep --out {directory}` first)")
    diagnostics = read_diagnostics(source, "rerun the sweep with --overwrite to rebuild it")
    if "representations" not in diagnostics:
        raise FeatcacheError(f"{source} is damaged or not a sweep's diagnostics file (no 'representations'); "
                             "rerun the sweep with --overwrite to rebuild it")
    representations = diagnostics["representations"]
    if records is None:
        records = load_records(directory / RESULTS_FILE)
    shots = (records[0]["many_threshold"], records[0]["few_threshold"]) if records else (100, 20)
    save = functools.partial(_save, fmt=fmt, dpi=dpi)
    written = []
    for label, diagnostics in representations.items():
        suffix = "" if len(representations) == 1 else "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        written += _plot_representation(diagnostics, directory, suffix, "" if not suffix else f" ({label})", shots,
                                        save)
    if len({r["representation"] for r in records}) > 1:
        written.append(_plot_grid(records, directory / "representations", save))
    return written


def _plot_representation(diagnostics: dict, directory: Path, suffix: str, title: str, shots: tuple,
                         save) -> list[Path]:
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
        written.append(save(fig, directory / f"weight_norms{suffix}"))

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
        written.append(save(fig, directory / f"tau_curve{suffix}"))

    if diagnostics.get("per_class"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, accuracies in diagnostics["per_class"].items():
            acc = np.array([np.nan if a is None else a for a in accuracies], dtype=float)
            ax.plot(counts[order], 100 * acc[order], marker=".", label=display_name(method))
        ax.set_xscale("log")
        many, few = shots
        for threshold in (few, many):
            ax.axvline(max(threshold, 0.5), color="grey", linestyle=":", linewidth=1)
        empty = [name for name, none in (("Many", not (counts > many).any()), ("Medium", not (
            (counts >= few) & (counts <= many)).any()), ("Few", not (counts < few).any())) if none]
        said = f" -- empty: {', '.join(empty)}" if empty else ""
        ax.set(xlabel=f"training images of the class (log scale; dotted: Few < {few}, Many > {many}){said}",
               ylabel="accuracy (%)", title="Per-class accuracy against training count" + title)
        ax.legend(fontsize=8)
        written.append(save(fig, directory / f"per_class_accuracy{suffix}"))

    if diagnostics.get("reliability"):
        written.append(_plot_reliability(diagnostics["reliability"], directory / f"reliability{suffix}", title, save))
    return written


def _plot_reliability(reliability: dict, path: Path, title: str, save) -> Path:
    """One reliability diagram per method: each confidence bin's accuracy against its mean
    confidence (the gap to the diagonal is miscalibration), bar widths the bins, ECE in the title."""
    import matplotlib.pyplot as plt

    methods = list(reliability)
    columns = min(4, len(methods))
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False, sharex=True,
                             sharey=True)
    for ax, method in zip(axes.flat, methods):
        bins = reliability[method]
        width = 1 / len(bins["count"])
        left = np.arange(len(bins["count"])) * width
        accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
        confidence = np.array([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
        ece = 100 * binned_calibration_error(bins)
        ax.bar(left, np.nan_to_num(accuracy), width, align="edge", edgecolor="black", linewidth=0.5, label="accuracy")
        ax.bar(left, np.nan_to_num(np.abs(confidence - accuracy)), width, align="edge", fill=False, hatch="//",
               edgecolor="tab:red", linewidth=0, bottom=np.nan_to_num(np.minimum(accuracy, confidence)), label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{display_name(method)} (ECE {ece:.1f}%)")
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Reliability diagrams" + title)
    return save(fig, path)


def _plot_grid(records: list[dict], path: Path, save) -> Path:
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
        if column != "top1" and all(r.sizes.get(column) == 0 for r in rows):
            title += ": empty (no class in the group)"
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
    return save(fig, path)


def _save(fig, path: Path, fmt: str, dpi: int) -> Path:
    """Save ``fig`` as ``path`` + the format's suffix; return the file's path."""
    path = path.with_name(f"{path.name}.{fmt}")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format=fmt)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
