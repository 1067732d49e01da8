"""Stage 2 metrics: the shared ones (featcache.metrics) and long-tail scorers for scikit-learn."""
from __future__ import annotations

import numpy as np

from featcache.metrics import (accuracy, balanced_accuracy, calibration_bins, evaluate,  # noqa: F401
                               expected_calibration_error, macro_f1, negative_log_likelihood, per_class_accuracy,
                               predictions, shot_groups, topk_accuracy)


def shot_accuracy(y_true, y_pred, *, train_counts, group: str = "few", many: int = 100, few: int = 20) -> float:
    """Mean per-class accuracy over the classes of one shot group ("many", "medium", "few" or
    "all") present in ``y_true``; NaN when none is. ``train_counts``: training images per class, a
    mapping label -> count (any labels) or a sequence indexed by class index."""
    if group not in ("many", "medium", "few", "all"):
        raise ValueError(f"group {group!r}: choose many, medium, few or all")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = train_counts if hasattr(train_counts, "get") else dict(enumerate(np.asarray(train_counts).tolist()))
    accuracies = []
    for label in np.unique(y_true):
        if label not in counts:
            raise ValueError(f"class {label!r} has no entry in train_counts")
        n = counts[label]
        if group == "all" or (group == "many" and n > many) or (group == "few" and n < few) or \
                (group == "medium" and few <= n <= many):
            accuracies.append(np.mean(y_pred[y_true == label] == label))
    return float(np.mean(accuracies)) if accuracies else float("nan")


def long_tail_scorers(train_counts, many: int = 100, few: int = 20) -> dict:
    """scikit-learn scorers ``{"top1", "many", "medium", "few"}`` (balanced top-1 and the shot groups
    of ``train_counts``), for ``scoring=`` in GridSearchCV / cross_validate (``refit="top1"``)."""
    from sklearn.metrics import make_scorer
    return {name: make_scorer(shot_accuracy, train_counts=train_counts, group="all" if name == "top1" else name,
                              many=many, few=few)
            for name in ("top1", "many", "medium", "few")}
