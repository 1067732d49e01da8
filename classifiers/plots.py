"""The paper's pictures from a sweep directory (matplotlib, PNG): per-class weight norms sorted by
training count (Fig. 2 left), balanced top-1 against tau on val and the eval split, per-class
accuracy against training count for each method."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

from .sweep import DIAGNOSTICS_FILE
from .tables import DISPLAY


def plot_sweep(directory: str | Path) -> list[Path]:
    """Write the PNGs next to the sweep's diagnostics; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    source = directory / DIAGNOSTICS_FILE
    if not source.is_file():
        raise FeatcacheError(f"{directory} has no {DIAGNOSTICS_FILE} (run `lt-cls sweep --out {directory}` first)")
    diagnostics = json.loads(source.read_text())
    counts = np.asarray(diagnostics["train_counts"])
    order = np.argsort(-counts, kind="stable")
    written = []

    if diagnostics.get("weight_norms"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, norms in diagnostics["weight_norms"].items():
            norms = np.asarray(norms)
            ax.plot(np.arange(len(order)), norms[order] / norms.max(), label=DISPLAY.get(method, method))
        ax.set(xlabel="class index, sorted by training count (head -> tail)", ylabel="weight norm (/ max)",
               title="Per-class classifier weight norms")
        ax.legend()
        written.append(_save(fig, directory / "weight_norms.png"))

    if diagnostics.get("tau_curve"):
        curve = diagnostics["tau_curve"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, values in curve.items():
            if split == "chosen":
                continue
            taus = sorted(values, key=float)
            ax.plot([float(t) for t in taus], [values[t] for t in taus], marker="o", ms=3, label=split)
        ax.axvline(curve["chosen"], color="grey", linestyle="--", label=f"chosen tau = {curve['chosen']:g} (on val)")
        ax.set(xlabel="tau", ylabel="balanced top-1 (%)", title="tau-normalisation")
        ax.legend()
        written.append(_save(fig, directory / "tau_curve.png"))

    if diagnostics.get("per_class"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, accuracies in diagnostics["per_class"].items():
            acc = np.array([np.nan if a is None else a for a in accuracies], dtype=float)
            ax.plot(counts[order], 100 * acc[order], marker=".", label=DISPLAY.get(method, method))
        ax.set_xscale("log")
        ax.set(xlabel="training images of the class (log scale)", ylabel="accuracy (%)",
               title="Per-class accuracy against training count")
        ax.legend(fontsize=8)
        written.append(_save(fig, directory / "per_class_accuracy.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
