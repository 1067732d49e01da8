"""Tuning on val under one budget (``lt-cls sweep --tune``): every method gets the same number of
trials, and the test split never influences a choice.

A method's trials are the points of its search space (``search_space``, declared next to its
parameters; ``--param METHOD.KEY=V1,V2`` replaces a dimension, ``--param METHOD.KEY=V`` fixes
it), each with the method's other parameters at their defaults. Where the space has more points
than the budget, the budget's worth is drawn from it without replacement, by a generator seeded
with the method's name alone (the same trials for every representation, seed and data set), the
paper's defaults always among them when they lie in the space; defaults first, then the space's
order. Each trial is fitted per (representation, seed), scored on the val split, and the trial with
the best val score (ties: the earlier trial) is the method's result, with its test numbers.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError

from .base import REGISTRY
from .records import METRIC_FIELDS, SELECTION_METRICS, param_items

DEFAULT_BUDGET = 12
DEFAULT_METRIC = "top1"


@dataclass(frozen=True)
class Trials:
    """A method's trials: ``params`` (every parameter but the seed and the device, one dict per
    trial, in trial order) and ``searched``, the parameters they differ in."""

    params: list[dict]
    searched: tuple[str, ...]


def method_trials(method: str, overrides: dict[str, list], budget: int) -> Trials:
    """The trials of ``method`` under ``budget`` (module docstring); ``overrides`` are its
    ``--param`` values (one value fixes the parameter, several replace its dimension)."""
    cls = REGISTRY[method]
    defaults = {k: v for k, v in cls.defaults().items() if k not in ("device", "seed")}
    fixed = {name: values[0] for name, values in overrides.items() if len(values) == 1}
    space = {name: tuple(values) for name, values in cls.info.search_space.items() if name not in fixed}
    space.update({name: tuple(values) for name, values in overrides.items() if len(values) > 1})
    names = tuple(space)

    def trial(values) -> dict:
        params = cls.trial_params({**defaults, **dict(zip(names, values))}, set(names))
        return {**params, **fixed}

    points = list({param_items(p): p for p in map(trial, itertools.product(*space.values()))}.values())
    default_point = trial(tuple(defaults.get(name) for name in names))
    in_space = all(defaults.get(name) in space[name] for name in names)
    first = [default_point] if in_space else []
    others = [p for p in points if param_items(p) != param_items(default_point)] if in_space else points
    room = budget - len(first)
    if len(others) > room:
        rng = np.random.default_rng(zlib.crc32(method.encode()))
        others = [others[i] for i in sorted(rng.choice(len(others), size=room, replace=False))]
    return Trials(first + others, names)


def check_selection(metric: str, budget) -> None:
    """Refuse a selection metric or budget a tuned sweep cannot use."""
    if metric not in SELECTION_METRICS:
        raise FeatcacheError(f"--select-metric {metric!r}: choose one of {', '.join(SELECTION_METRICS)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise FeatcacheError(f"--budget {budget!r}: the number of trials per method must be a positive integer")


def better(metric: str, score: float, than: float | None) -> bool:
    """Whether ``score`` beats ``than`` (None: nothing to beat) on ``metric``: higher, or lower for
    ECE and NLL; a tie is not better (the earlier trial keeps it)."""
    return than is None or (score > than if SELECTION_METRICS[metric] else score < than)


def best_trial(trials: list[dict], metric: str) -> dict | None:
    """The ``ok`` trial record (in trial order) with the best val ``metric``, the earlier on a tie;
    None when no trial has the metric (every trial failed, or the val split has no class of the
    metric's shot group)."""
    best, best_score = None, None
    for record in trials:
        score = record["tuning"]["val"].get(metric) if record["status"] == "ok" else None
        if score is not None and better(metric, score, best_score):
            best, best_score = record, score
    return best


def selection_record(trials: list[dict], metric: str, budget: int, searched: tuple[str, ...],
                     val_split: str) -> dict:
    """The record of a tuned method: the best trial's test numbers and parameters, its chosen
    values and val metrics under ``tuning``, the trials' total fit / eval seconds; a failed record
    (with the first trial's parameters) where no trial can be chosen."""
    best = best_trial(trials, metric)
    failures = sum(r["status"] != "ok" for r in trials)
    seconds = {name: round(sum(r[name] or 0.0 for r in trials), 4) for name in ("fit_seconds", "eval_seconds")}
    tuning = {"role": "selected", "metric": metric, "budget": budget, "trials": len(trials),
              "failed_trials": failures, "chosen": {}, "val": None}
    if best is None:
        reason = (f"every one of its {len(trials)} trials failed (first: {trials[0]['failure']})"
                  if failures == len(trials) else
                  f"no trial has a val {metric} (the {val_split!r} split has no class in that shot group)")
        return {**trials[0], **dict.fromkeys(METRIC_FIELDS), "status": "failed", "failure": reason,
                "selected_on": val_split, "job": None, **seconds, "tuning": tuning}
    tuning.update(chosen={name: best["params"][name] for name in searched}, val=best["tuning"]["val"])
    return {**best, "selected_on": val_split, "job": None, **seconds, "tuning": tuning}
