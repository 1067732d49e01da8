"""Sweeps: methods x hyper-parameter grid x seeds on one cache entry, one JSON record per run.

Each split is loaded once (and moved to the device once); every run reuses it. Records are
appended to ``results.jsonl`` as runs finish, so an interrupted sweep keeps its work and
``resume`` skips runs already recorded. The record schema is documented in docs/records.md."""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featcache import __version__
from featcache.distributed import resolve_device
from featcache.errors import FeatcacheError

from .base import REGISTRY, as_tensor, create
from .metrics import evaluate, per_class_accuracy
from .tau_norm import tau_curve

RECORD_FIELDS = ("method", "params", "seed", "eval_split", "selected_on", "top1", "accuracy", "top5", "many",
                 "medium", "few", "n_many", "n_medium", "n_few", "macro_f1", "ece", "fit_seconds",
                 "eval_seconds", "cache_key", "version")
RESULTS_FILE = "results.jsonl"
DIAGNOSTICS_FILE = "diagnostics.json"


@dataclass
class SweepSpec:
    methods: list[str]
    params: dict[str, dict[str, list]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_split: str = "test"
    val_split: str | None = "val"
    device: str = "auto"
    many: int = 100
    few: int = 20


@dataclass(frozen=True)
class Run:
    method: str
    params: tuple  # sorted (name, value) pairs, every hyper-parameter but the device
    seed: int

    @property
    def key(self) -> str:
        return json.dumps([self.method, list(self.params), self.seed], sort_keys=True, default=str)


def parse_value(text: str):
    """'1' -> 1, '0.5' -> 0.5, 'true' -> True, anything else stays a string (e.g. 'auto')."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_param_flags(flags: list[str]) -> dict[str, dict[str, list]]:
    """``METHOD.KEY=V[,V...]`` flags -> {method: {key: [values]}}."""
    out: dict[str, dict[str, list]] = {}
    for flag in flags:
        target, sep, values = flag.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key or not values:
            raise FeatcacheError(f"--param {flag!r}: expected METHOD.KEY=VALUE[,VALUE...] (e.g. tau.tau=1.0)")
        out.setdefault(method.strip(), {})[key.strip()] = [parse_value(v) for v in values.split(",")]
    return out


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def expand_runs(spec: SweepSpec) -> list[Run]:
    for method in spec.params:
        if method not in spec.methods:
            raise FeatcacheError(f"--param for method {method!r}, which is not in --methods "
                                 f"({', '.join(spec.methods)})")
    runs = []
    for method in spec.methods:
        grid = spec.params.get(method, {})
        create(method, **{k: v[0] for k, v in grid.items()})  # unknown method / parameter: clear error now
        names = list(grid)
        for combo in itertools.product(*(grid[n] for n in names)):
            params = {k: v for k, v in REGISTRY[method].defaults().items() if k not in ("device", "seed")}
            params.update(zip(names, combo))
            has_seed = "seed" in REGISTRY[method].param_names()
            for seed in spec.seeds:
                run_params = {**params, "seed": seed} if has_seed else params
                runs.append(Run(method, tuple(sorted((k, _hashable(v)) for k, v in run_params.items())), seed))
    return runs


def requested_params(record: dict) -> dict:
    """The parameters a record was asked for: values chosen on val go back to 'auto'."""
    params = dict(record["params"])
    if record.get("selected_on"):
        for name in getattr(REGISTRY.get(record["method"]), "auto_params", ()):
            params[name] = "auto"
    return params


def record_key(record: dict) -> str:
    params = tuple(sorted((k, _hashable(v)) for k, v in requested_params(record).items()))
    return Run(record["method"], params, record["seed"]).key


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):  # only the last line may be half-written (an interrupted run)
                raise FeatcacheError(f"{path}:{number} is not valid JSON") from None
    return records


def effective_weight_norms(estimator) -> np.ndarray | None:
    """Per-class norm of the weights the method classifies with (for the paper's Fig. 2)."""
    weight = getattr(estimator, "weight_", None)
    if weight is None:
        return None
    norms = np.linalg.norm(weight, axis=1)
    return norms * np.abs(estimator.scales_) if estimator.name == "lws" else norms


class Sweeper:
    """Runs a sweep on a cache entry; yields each record as it is written."""

    def __init__(self, cache, spec: SweepSpec, out_dir: Path, resume: bool = False):
        self.cache, self.spec, self.out = cache, spec, Path(out_dir)
        self.device = resolve_device(spec.device)
        if spec.eval_split not in cache.splits:
            raise FeatcacheError(f"--eval-split {spec.eval_split!r}: entry {cache.path} has {', '.join(cache.splits)}")
        self.val_split = spec.val_split if spec.val_split in cache.splits else None
        if spec.val_split and spec.val_split not in cache.splits and spec.val_split != "val":
            raise FeatcacheError(f"--val-split {spec.val_split!r}: entry {cache.path} has {', '.join(cache.splits)}")
        self.runs = expand_runs(spec)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / RESULTS_FILE
        kept = load_records(self.results) if resume else []
        # rewrite what is kept: drops a line half-written by an interrupted run
        self.results.write_text("".join(json.dumps(r) + "\n" for r in kept))
        done = {record_key(r) for r in kept if r.get("cache_key") == cache.key and r.get("eval_split") == spec.eval_split}
        self.pending = [run for run in self.runs if run.key not in done]
        self.diagnostics = self._load_diagnostics() if resume else {}

    def _load_diagnostics(self) -> dict:
        path = self.out / DIAGNOSTICS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _split(self, name: str):
        split = self.cache.split(name)
        return as_tensor(split.features, self.device), split.labels

    def __iter__(self) -> Iterator[dict]:
        if not self.pending:
            return
        X, y = self._split("train")
        counts = self.cache.class_counts("train")
        X_eval, y_eval = self._split(self.spec.eval_split)
        val = self._split(self.val_split) if self.val_split else None
        classifier = self.cache.classifier
        self.diagnostics.setdefault("train_counts", counts.tolist())
        self.diagnostics.setdefault("cache_key", self.cache.key)
        for run in self.pending:
            record, estimator, logits = self._run(run, X, y, counts, classifier, val, X_eval, y_eval)
            with open(self.results, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self._diagnose(run, estimator, logits, y_eval, X_eval)
            yield record

    def _run(self, run, X, y, counts, classifier, val, X_eval, y_eval):
        params = dict(run.params)
        estimator = create(run.method, **params, device=str(self.device))
        began = time.perf_counter()
        estimator.fit(X, y, class_counts=counts, classifier=classifier, val=val)
        fitted = time.perf_counter()
        logits = estimator.decision_function(X_eval)
        evaluated = time.perf_counter()
        selected = getattr(estimator, "selected_", {}) or {}
        metrics = evaluate(logits, y_eval, counts, self.spec.many, self.spec.few)
        record = {"method": run.method, "params": {**_jsonable(params), **selected}, "seed": run.seed,
                  "eval_split": self.spec.eval_split, "selected_on": self.val_split if selected else None,
                  **metrics, "fit_seconds": round(fitted - began, 4), "eval_seconds": round(evaluated - fitted, 4),
                  "cache_key": self.cache.key, "version": __version__}
        return {k: record[k] for k in RECORD_FIELDS}, estimator, logits

    def _diagnose(self, run: Run, estimator, logits, y_eval, X_eval) -> None:
        """Keep what the plots need, for the first seed of each method: weight norms, per-class
        accuracy, and for tau the val and eval curves over its grid."""
        label = run.method if run.seed == self.spec.seeds[0] else None
        if label is None or label in self.diagnostics.get("per_class", {}):
            return
        per_class = per_class_accuracy(logits.argmax(1), y_eval, logits.shape[1])
        self.diagnostics.setdefault("per_class", {})[label] = [None if np.isnan(a) else float(a) for a in per_class]
        norms = effective_weight_norms(estimator)
        if norms is not None and run.method in ("joint", "crt", "tau", "lws"):
            self.diagnostics.setdefault("weight_norms", {})[label] = norms.tolist()
        if run.method == "tau" and getattr(estimator, "val_curve_", None):
            weight = torch.as_tensor(self.cache.classifier[0], device=X_eval.device)
            norms = weight.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            labels = torch.as_tensor(y_eval, device=X_eval.device)
            grid = list(estimator.val_curve_)
            curve = {str(t): 100 * a for t, a in zip(grid, tau_curve(X_eval, labels, weight, norms, grid,
                                                                      len(estimator.classes_)))}
            self.diagnostics["tau_curve"] = {"val": {str(k): 100 * v for k, v in estimator.val_curve_.items()},
                                             self.spec.eval_split: curve, "chosen": estimator.tau_}
        (self.out / DIAGNOSTICS_FILE).write_text(json.dumps(self.diagnostics))


def _jsonable(params: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
