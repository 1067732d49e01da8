"""Many trials of one method fitted in one pass (stacked heads), as DINOv2's linear evaluation
trains its heads: trials of an SGD-trained method that differ only in lr, epochs and their own
loss's (or recipe's) parameters, with the same seed and sampler, share every step's drawn rows, so
one gather serves all of them, and on a GPU one batched matmul (the cRT family,
:func:`~classifiers.crt.train_together`; LWS, MARC and DisAlign, whose trials also share the
frozen logits). Each
trial ends as if fitted alone, bit for bit on the CPU and to float32 rounding on a GPU (tests/test_stacking.py).

:func:`fit_together` is what the tuned sweep calls (``lt-cls sweep --tune``; ``--no-stack`` fits
each trial alone); it also takes any list of estimators, fitting those it cannot stack one by one.
"""
from __future__ import annotations

import numpy as np

from .training import DEFAULT_MEMORY_BUDGET, SGDTrained


def stack_key(estimator) -> tuple | None:
    """What trials must share to be fitted in one pass (equal keys: they can), None for an
    estimator that fits alone: one whose method cannot stack (``stackable``), or with no epochs.
    A progressively-balanced sampler's draws depend on the number of epochs, so there it is shared too."""
    if not isinstance(estimator, SGDTrained) or not estimator.stackable or estimator.epochs < 1:
        return None
    varying = estimator.stack_varying()
    if estimator.sampler == "progressive":
        varying.discard("epochs")
    params = estimator.get_params()
    return (type(estimator), *sorted((k, repr(v)) for k, v in params.items() if k not in varying))


def check_stack(trials: list) -> None:
    """Refuse trials that cannot be fitted in one pass (a plain fit is a stack of one)."""
    keys = {stack_key(t) for t in trials}
    if len(trials) > 1 and (len(keys) > 1 or None in keys):
        raise ValueError(f"{trials[0].name}: these trials differ in more than {', '.join(sorted(trials[0].stack_varying()))}"
                         " (or cannot be stacked)")


def stack_groups(estimators: list, memory_budget: int = DEFAULT_MEMORY_BUDGET, *, rows: int, dim: int,
                 num_classes: int) -> list[list[int]]:
    """The estimators' positions, grouped into stacks: equal :func:`stack_key`, in order of first
    appearance, each stack within ``memory_budget`` bytes (each trial's ``stack_bytes``; at least
    one trial); an estimator that cannot be stacked is a group of its own."""
    chunks: list[list[int]] = []
    filling: dict[tuple, list[int]] = {}  # stack key -> its chunk with room left
    for position, estimator in enumerate(estimators):
        key = stack_key(estimator)
        if key is None:
            chunks.append([position])
            continue
        chunk = filling.get(key)
        if chunk is None or (len(chunk) + 1) * estimator.stack_bytes(rows, dim, num_classes) > memory_budget:
            chunk = filling[key] = []
            chunks.append(chunk)
        chunk.append(position)
    return chunks


def fit_together(estimators: list, X, y, *, class_counts=None, classifier=None, val=None, views=None,
                 stack_budget: int = DEFAULT_MEMORY_BUDGET, stack: bool = True, tile: int | None = None) -> list:
    """Fit every estimator on the same data, as ``estimator.fit(X, y, ...)`` would; the trials that
    :func:`stack_groups` puts together (within ``stack_budget`` bytes a stack) train in one pass
    (``stack=False``: each alone). Returns the estimators, fitted."""
    kwargs = {"class_counts": class_counts, "classifier": classifier, "val": val, "views": views}
    if not stack:
        return [estimator.fit(X, y, **kwargs) for estimator in estimators]
    dim = X.shape[1] if getattr(X, "ndim", 0) == 2 else 1
    for group in stack_groups(estimators, stack_budget, rows=len(y), dim=dim, num_classes=classes_of(y, **kwargs)):
        fit_stack([estimators[position] for position in group], X, y, **kwargs, tile=tile)
    return estimators


def classes_of(y, class_counts=None, classifier=None, **_) -> int:
    """The number of classes a fit on these inputs has (what a stack's size is reckoned with)."""
    if classifier is not None or class_counts is not None:
        return max(len(classifier[0]) if classifier is not None else 0,
                   len(class_counts) if class_counts is not None else 0)
    return max(1, len(np.unique(np.asarray(y))))


def fit_stack(estimators: list, X, y, *, tile: int | None = None, **kwargs) -> list:
    """Fit ``estimators``, trials of one stack (equal :func:`stack_key`), in one pass; ``tile``:
    trials per matmul (default: all on a GPU, one on the CPU, where the result is then bit for bit
    that of each trial alone). One estimator is a plain fit."""
    if len(estimators) == 1:
        return [estimators[0].fit(X, y, **kwargs)]
    first = estimators[0]
    data = first._fit_data(X, y, **kwargs)
    for estimator in estimators[1:]:  # the validated features, not a second copy of them
        estimator._fit_data(data.X, y, **kwargs)
        if hasattr(first, "feature_names_in_"):
            estimator.feature_names_in_ = first.feature_names_in_
    type(first)._fit_stack(estimators, data, tile)
    return estimators
