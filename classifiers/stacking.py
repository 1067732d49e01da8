"""Many trials of one method fitted in one pass (stacked heads), as DINOv2's linear evaluation
trains its heads: trials of the cRT family that differ only in lr, epochs and their loss's (or
recipe's) parameters, with the same seed and sampler, share every step's drawn rows, so one gather
and two matmuls serve all of them (classifiers/crt.py, :func:`~classifiers.crt.train_together`).
Each trial ends as if fitted alone, to float32 rounding (tests/test_stacking.py).

:func:`fit_together` is what the tuned sweep calls (``lt-cls sweep --tune``; ``--no-stack`` fits
each trial alone); it also takes any list of estimators, fitting those it cannot stack one by one.
"""
from __future__ import annotations

import numpy as np

from .crt import stack_key, train_together
from .training import DEFAULT_MEMORY_BUDGET


def stack_bytes(estimator, rows: int, dim: int, num_classes: int) -> int:
    """Bytes one trial adds to a stack: its training state (W^T, its gradient and momentum, D x C
    each), a step's B x C logits, gradient and two loss temporaries, and its fitted C x D matrices
    (the weights, W^T for inference, the numpy copy) until the caller is done with it."""
    batch = min(estimator.batch_size, max(1, rows)) if estimator.epoch_steps != "ceil+1" else estimator.batch_size
    return 4 * (6 * dim * num_classes + 4 * batch * num_classes)


def stack_groups(estimators: list, memory_budget: int = DEFAULT_MEMORY_BUDGET, *, rows: int, dim: int,
                 num_classes: int) -> list[list[int]]:
    """The estimators' positions, grouped into stacks: equal :func:`~classifiers.crt.stack_key`,
    in order of first appearance, each stack within ``memory_budget`` bytes (:func:`stack_bytes`;
    at least one trial); an estimator that cannot be stacked is a group of its own."""
    chunks: list[list[int]] = []
    filling: dict[tuple, list[int]] = {}  # stack key -> its chunk with room left
    for position, estimator in enumerate(estimators):
        key = stack_key(estimator)
        if key is None:
            chunks.append([position])
            continue
        chunk = filling.get(key)
        if chunk is None or len(chunk) * stack_bytes(estimator, rows, dim, num_classes) >= memory_budget:
            chunk = filling[key] = []
            chunks.append(chunk)
        chunk.append(position)
    return chunks


def fit_together(estimators: list, X, y, *, class_counts=None, classifier=None, val=None, views=None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, stack: bool = True, tile: int | None = None) -> list:
    """Fit every estimator on the same data, as ``estimator.fit(X, y, ...)`` would; the trials that
    :func:`stack_groups` puts together train in one pass (``stack=False``: each alone; ``tile``:
    trials per matmul, :func:`~classifiers.crt.train_together`). Returns the estimators, fitted."""
    kwargs = {"class_counts": class_counts, "classifier": classifier, "val": val, "views": views}
    dim = X.shape[1] if getattr(X, "ndim", 0) == 2 else 1
    num_classes = len(classifier[0]) if classifier is not None else \
        len(class_counts) if class_counts is not None else len(np.unique(np.asarray(y)))
    groups = stack_groups(estimators, memory_budget, rows=len(y), dim=dim, num_classes=max(1, num_classes)) \
        if stack else [[position] for position in range(len(estimators))]
    for group in groups:
        if len(group) == 1:
            estimators[group[0]].fit(X, y, **kwargs)
            continue
        first = estimators[group[0]]
        data = first._fit_data(X, y, **kwargs)
        for position in group[1:]:  # the validated features, not a second copy of them
            estimators[position]._fit_data(data.X, y, **kwargs)
            if hasattr(first, "feature_names_in_"):
                estimators[position].feature_names_in_ = first.feature_names_in_
        train_together([estimators[position] for position in group], data, tile)
    return estimators
