"""Sweeps: representations (cache entries) x methods x hyper-parameter grid x seeds, one JSON record
per run.

Entries are loaded one at a time (peak memory is one entry's); within an entry each split is loaded
once and every run reuses it. Records are appended to ``results.jsonl`` as runs finish, so an
interrupted sweep keeps its work and ``resume`` skips runs already recorded under the same key. The
output directory is locked while a sweep writes to it. The record schema is in ``records.py`` and
docs/records.md."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featcache import __version__
from featcache.distributed import resolve_device
from featcache.errors import FeatcacheError
from featcache.metrics import ROWS_PER_CHUNK as METRIC_CHUNK
from featcache.store.durable import append_line, atomic_write_text, exclusive_lock
from featcache.store.format import training_run_label

from .base import REGISTRY, as_features, as_tensor, create
from .cluster import collect_parts, is_lost, merge_diagnostics, remove_parts
from .metrics import calibration_bins, evaluate, per_class_accuracy, predictions
from .records import (
    DIAGNOSTICS_FILE,
    METRIC_FIELDS,
    RECORD_FIELDS,
    RESULTS_FILE,
    SEED_LIMIT,
    gc_paused,
    load_records,
    param_items,
    read_diagnostics,
    record_key,
    run_key,
)
from .stacking import classes_of, fit_stack, stack_groups
from .tau_norm import tau_curve
from .training import DEFAULT_MEMORY_BUDGET
from .tuning import (DEFAULT_BUDGET, DEFAULT_METRIC, best_trial, better, check_selection, method_trials,
                     selection_record)

LOCK_FILE = ".sweep.lock"


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
    tune: bool = False  # each method's trials (classifiers/tuning.py), the val-best reported
    budget: int = DEFAULT_BUDGET  # trials per method when tuning
    select_metric: str = DEFAULT_METRIC  # what the val-best is best at
    stack: bool = True  # when tuning, fit a method's stackable trials of one seed in one pass (stacking.py)
    stack_budget: int = DEFAULT_MEMORY_BUDGET  # bytes one stack of trials may hold

    def check(self) -> list[str]:
        """Refuse what cannot be a sweep; drop repeated methods / seeds and return a note for each."""
        if not self.methods:
            raise FeatcacheError("no methods to sweep (--methods)")
        if not self.seeds:
            raise FeatcacheError("no seeds to sweep (--seeds)")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
                raise FeatcacheError(f"--seeds: {seed!r} is not an integer in 0..2**64-1")
        if self.few < 0 or self.many < 0:
            raise FeatcacheError(f"--many {self.many} / --few {self.few}: thresholds must be >= 0")
        if self.tune:
            check_selection(self.select_metric, self.budget)
        if self.few > self.many:
            raise FeatcacheError(f"--few {self.few} is above --many {self.many}: the Many-, Medium- and Few-shot "
                                 "groups would overlap (Few = fewer than --few, Many = more than --many)")
        notes = []
        for name, values in (("--methods", self.methods), ("--seeds", self.seeds)):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=values.index)
            if repeated:
                notes.append(f"{name}: {', '.join(map(str, repeated))} given more than once; each runs once")
        self.methods = list(dict.fromkeys(self.methods))
        self.seeds = list(dict.fromkeys(self.seeds))
        return notes


@dataclass(frozen=True)
class Run:
    representation: str
    cache_key: str
    method: str
    params: tuple  # sorted (name, value) pairs, every hyper-parameter but the device
    seed: int
    trial: bool = False  # a trial of a tuned sweep


@dataclass(frozen=True)
class Selection:
    """The choice among one method's trials for one representation and seed (a tuned sweep)."""

    representation: str
    cache_key: str
    method: str
    seed: int
    trials: tuple[Run, ...]


def expand_grid(spec: SweepSpec) -> list[tuple[str, tuple, int]]:
    """(method, params, seed) of every run: the grid of ``--param`` values, or in a tuned sweep
    every method's trials; each parameter combination is checked by ``create`` now, so a bad value
    stops the sweep before anything runs."""
    for method in spec.params:
        if method not in spec.methods:
            raise FeatcacheError(f"--param for method {method!r}, which is not in --methods "
                                 f"({', '.join(spec.methods)})")
    runs = []
    for method in spec.methods:
        grid = spec.params.get(method, {})
        if method not in REGISTRY:
            create(method)  # the error that lists the registered methods
        for name, values in grid.items():
            if not isinstance(values, (list, tuple)):
                raise FeatcacheError(f"{method}.{name}: expected a list of values to sweep, got {values!r}")
            if not values:
                raise FeatcacheError(f"{method}.{name}: no values to sweep (an empty list); give at least one")
        names = list(grid)
        defaults = {k: v for k, v in REGISTRY[method].defaults().items() if k not in ("device", "seed")}
        has_seed = "seed" in REGISTRY[method].param_names()
        combos = method_trials(method, grid, spec.budget).params if spec.tune else \
            [{**defaults, **dict(zip(names, combo))} for combo in itertools.product(*(grid[n] for n in names))]
        for params in combos:
            # the parameters are checked once per combination (the seeds are checked by SweepSpec.check)
            create(method, **({**params, "seed": spec.seeds[0] if spec.seeds else 0} if has_seed else params))
            shared = param_items(params)
            for seed in spec.seeds:
                runs.append((method, param_items({**params, "seed": seed}) if has_seed else shared, seed))
    return runs


def effective_weight_norms(estimator) -> np.ndarray | None:
    """Per-class norm of the weights the method classifies with (for the paper's Fig. 2): of
    ``weight_``, times ``|scales_|`` for a method that scales each class's logit (LWS)."""
    weight = getattr(estimator, "weight_", None)
    if weight is None:
        return None
    norms = np.linalg.norm(weight, axis=1)
    scales = getattr(estimator, "scales_", None)
    return norms if scales is None else norms * np.abs(scales)


def flushing_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes denormal floats to zero, as
    ``torch.set_flush_denormal(True)`` makes it. torch has no getter, so the mode is read off a
    product: half the smallest normal float32 is a denormal, and comes out as zero only while
    flushing is on."""
    smallest_normal = torch.full((1,), torch.finfo(torch.float32).tiny, dtype=torch.float32)
    return float(smallest_normal * 0.5) == 0.0


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes free for the sweep, and where: the GPU's free memory, else MemAvailable (Linux) or the
    free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device}"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "this machine"


@dataclass
class Representation:
    """One cache entry of a sweep and the label its records carry."""

    label: str
    cache: object  # featcache.store.FeatureCache


def default_label(cache) -> str:
    """The entry's name, else a short form of the training run that made its checkpoint
    (``tinycnn/instance/e12/s0``, ``/K4`` added for 4 views per training image), else the first 12
    digits of its key."""
    return cache.meta.get("name") or training_run_label(cache.meta) or cache.key[:12]


class Sweeper:
    """Runs a sweep over one or more representations; yields each record as it is written.

    ``mode``: "new" refuses an output directory that already holds records, "resume" adds the
    runs not recorded yet, "overwrite" starts the results over. Use as a context manager (the
    output directory stays locked until it exits). While it is entered, denormal floats are flushed
    to zero (softmax tails of confident logits underflow into denormals, which slow CPU arithmetic
    several-fold and change no prediction); the previous mode is restored on exit."""

    def __init__(self, representations: list[Representation], spec: SweepSpec, out_dir: Path, mode: str = "new",
                 memory_check: bool = True, executor=None):
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode {mode!r}")
        self.representations, self.spec, self.out, self.mode = representations, spec, Path(out_dir), mode
        self.executor = executor  # None: run here; a classifiers.cluster.SlurmExecutor: a SLURM job array
        if executor is not None:
            executor.check()
        self.notes = spec.check()
        self.device = resolve_device(spec.device)
        self.val_split = self._check_entries()
        self.grid = expand_grid(spec)
        self._refuse_choosing_on_the_eval_split()
        if memory_check:
            self._check_memory()
        self.shots = (spec.many, spec.few)
        self.runs = [Run(r.label, r.cache.key, method, params, seed, spec.tune)
                     for r in representations for method, params, seed in self.grid]
        self.selections = self._selections() if spec.tune else []
        self.searched = {m: method_trials(m, spec.params.get(m, {}), spec.budget).searched
                         for m in spec.methods} if spec.tune else {}
        self.results = self.out / RESULTS_FILE
        self.diagnostics_path = self.out / DIAGNOSTICS_FILE
        self.job: dict | None = None  # the SLURM task that runs these runs (records carry it)
        self._lock = None
        self._flushing_before: bool | None = None  # the denormal mode to restore on exit
        self.pending: list[Run] = []
        self.pending_selections: list[Selection] = []
        self.records: list[dict] = []  # every record of the results file: those read on entry, then each new one
        self._recorded: dict[tuple, dict] = {}  # the records by key
        self.diagnostics: dict = {}
        self._candidates: dict[tuple, tuple] = {}  # (label, method) -> (val score, key, diagnostics) of the best trial
        self._selecting = True  # False in a SLURM task: its submitter makes the choices

    @property
    def total(self) -> int:
        """Records the sweep writes in all: its runs, and a tuned sweep's choices."""
        return len(self.runs) + len(self.selections)

    @property
    def remaining(self) -> int:
        return len(self.pending) + len(self.pending_selections)

    def _selections(self) -> list[Selection]:
        """One choice per representation, method and seed, over its trials (in trial order)."""
        groups: dict[tuple, list[Run]] = {}
        for run in self.runs:
            groups.setdefault((run.representation, run.cache_key, run.method, run.seed), []).append(run)
        return [Selection(*key, tuple(runs)) for key, runs in groups.items()]

    def selection_key(self, selection: Selection) -> tuple:
        return run_key(selection.representation, selection.cache_key, self.spec.eval_split, self.shots,
                       selection.method, (), selection.seed, ("selected", self.spec.select_metric, self.spec.budget))

    def _check_entries(self) -> str | None:
        """Same classes and the splits the sweep uses in every entry; the val split to use, if any."""
        reps = self.representations
        if not reps:
            raise FeatcacheError("no cache entry to sweep (--cache)")
        labels = [r.label for r in reps]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise FeatcacheError(f"--cache: the label {repeated[0]!r} names two entries; give LABEL=ENTRY")
        first = reps[0]
        for rep in reps:
            cache = rep.cache
            if "train" not in cache.splits:
                raise FeatcacheError(f"entry {rep.label!r} ({cache.path}) has no train split")
            if self.spec.eval_split not in cache.splits:
                raise FeatcacheError(f"--eval-split {self.spec.eval_split!r}: entry {rep.label!r} ({cache.path}) "
                                     f"has {', '.join(cache.splits)}")
            if cache.num_classes != first.cache.num_classes:
                raise FeatcacheError(f"entry {rep.label!r} ({cache.path}) has {cache.num_classes} classes, entry "
                                     f"{first.label!r} has {first.cache.num_classes}: representations must share "
                                     "their classes")
        val = self.spec.val_split
        if not val:
            return None
        having = [r.label for r in reps if val in r.cache.splits]
        if val != "val" and len(having) < len(reps):
            missing = next(r for r in reps if val not in r.cache.splits)
            raise FeatcacheError(f"--val-split {val!r}: entry {missing.label!r} ({missing.cache.path}) has "
                                 f"{', '.join(missing.cache.splits)}")
        if 0 < len(having) < len(reps):
            missing = next(r.label for r in reps if val not in r.cache.splits)
            raise FeatcacheError(f"entry {missing!r} has no {val!r} split but entry {having[0]!r} has: every "
                                 "representation must choose on the same split")
        return val if having else None

    def _refuse_choosing_on_the_eval_split(self) -> None:
        """A value chosen on the split the table reports would be reported on its own selection split."""
        if self.spec.tune and self.val_split is None:
            rep = self.representations[0]
            raise FeatcacheError(f"--tune chooses each method's trial on a val split, and entry {rep.label!r} "
                                 f"({rep.cache.path}) has {', '.join(rep.cache.splits)}: extract a val split, or "
                                 "name one with --val-split")
        if self.spec.tune and self.val_split == self.spec.eval_split:
            raise FeatcacheError(f"--tune chooses on --val-split {self.val_split!r}, the split the table reports "
                                 "(--eval-split): give another --eval-split or --val-split")
        if self.val_split != self.spec.eval_split:
            return
        for method, params, _ in self.grid:
            chosen = [name for name in REGISTRY[method].info.chosen_on_val if dict(params).get(name) == "auto"]
            if chosen:
                raise FeatcacheError(f"--eval-split {self.spec.eval_split!r} is the split {method}.{chosen[0]}=auto "
                                     "chooses on: the table would report the selection split; give another "
                                     "--eval-split, or another --val-split")

    def memory_needed(self, rep: Representation) -> dict[str, int]:
        """Bytes one entry's sweep needs at its peak, by part: the splits as stored, the eval
        logits, and the hungrier of two phases that never overlap: the hungriest method's fit and
        inference (its estimate for its settings, once per setting: seeds change nothing; the
        temporaries of a chunk of logits are bounded by the split's rows), or the metrics and
        diagnostics on the eval logits (the ECE's and NLL's float64 softmax holds four float64
        arrays of a chunk of rows at its peak; the tau curve one N x C float32 array) beside the
        fitted classifier's C x D matrices."""
        meta, cache = rep.cache.meta, rep.cache
        itemsize = 2 if meta.get("dtype") == "float16" else 4
        dim, classes = int(meta["feature_dim"]), cache.num_classes
        splits = {"train", self.spec.eval_split} | ({self.val_split} if self.val_split else set())
        rows = {name: int(meta["splits"][name]["rows"]) for name in splits}
        largest = max(rows.values())  # the most rows a method computes logits of at once
        methods, seen = {}, set()
        for method, params, _ in self.grid:
            settings = tuple(p for p in params if p[0] != "seed")  # the seed changes no allocation
            if (method, settings) in seen:
                continue
            seen.add((method, settings))
            estimator = create(method, **dict(params))
            methods[method] = max(methods.get(method, 0),
                                  estimator.memory_estimate(rows["train"], dim, classes, largest))
        if self.spec.tune and self.spec.stack:  # a stack of trials is fitted, and held, at once
            for method in methods:
                trials = [create(m, **dict(p)) for m, p, seed in self.grid if m == method and seed == self.spec.seeds[0]]
                for group in stack_groups(trials, self.spec.stack_budget, rows=rows["train"], dim=dim,
                                          num_classes=classes):
                    if len(group) > 1:
                        held = len(group) * trials[group[0]].stack_bytes(rows["train"], dim, classes)
                        methods[method] = max(methods[method], held)
        hungriest = max(methods, key=methods.get)
        eval_rows = rows[self.spec.eval_split]
        metrics = (min(eval_rows, METRIC_CHUNK) * 32 + eval_rows * 4) * classes + 4 * classes * dim * 4
        phase = (f"method {hungriest}", methods[hungriest]) if methods[hungriest] >= metrics else ("metrics", metrics)
        return {"features": sum(rows.values()) * dim * itemsize, "eval logits": eval_rows * classes * 4,
                phase[0]: phase[1]}

    def _check_memory(self) -> None:
        available, where = available_memory(self.device)
        for rep in self.representations:
            parts = self.memory_needed(rep)
            need = sum(parts.values())
            if need > 0.9 * available:
                shown = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in parts.items())
                raise FeatcacheError(
                    f"entry {rep.label!r} needs about {need / 2**30:.1f} GiB ({shown} GiB) but {where} has "
                    f"{available / 2**30:.1f} GiB available: use a float16 entry (featcache extract --dtype "
                    "float16), a smaller eval split, lws.memory_budget=0, fewer methods, or --no-memory-check")

    # -- output directory -----------------------------------------------------------------------
    def __enter__(self) -> "Sweeper":
        held = contextlib.ExitStack()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_lock(self.out / LOCK_FILE, wait=False))
        except BlockingIOError:
            raise FeatcacheError(f"--out {self.out}: another sweep is writing there; wait for it or use another "
                                 "--out") from None
        except OSError as exc:
            raise FeatcacheError(f"--out {self.out}: cannot create the output directory ({exc.strerror or exc})") \
                from None
        self._lock = held
        self._flushing_before = flushing_denormals()
        torch.set_flush_denormal(True)
        try:
            self._prepare()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._flushing_before is not None:
            torch.set_flush_denormal(self._flushing_before)
            self._flushing_before = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _prepare(self) -> None:
        existing = load_records(self.results)
        if self.mode == "new" and (existing or self.results.is_file() and self.results.stat().st_size):
            raise FeatcacheError(f"{self.results} already holds {len(existing)} record(s): --resume adds the "
                                 "missing runs, --overwrite starts over, or choose another --out")
        if self.mode == "overwrite":
            atomic_write_text(self.results, "")
            (self.out / DIAGNOSTICS_FILE).unlink(missing_ok=True)
            remove_parts(self.out)
            existing = []
        elif self.results.is_file() and not self.results.read_bytes().endswith(b"\n") and self.results.stat().st_size:
            # a line half-written by an interrupted run: drop it, atomically
            atomic_write_text(self.results, "".join(json.dumps(r, allow_nan=False) + "\n" for r in existing))
        if self.mode == "resume":
            existing = self._with_parts(existing)
        with gc_paused():
            self._recorded = {record_key(r): r for r in existing}
        self.pending = [run for run in self.runs if self.run_key(run) not in self._recorded]
        self.pending_selections = [s for s in self.selections if self.selection_key(s) not in self._recorded]
        self.records = existing
        self.diagnostics = self._load_diagnostics() if self.mode == "resume" else {}

    def run_key(self, run: Run) -> tuple:
        return run_key(run.representation, run.cache_key, self.spec.eval_split, self.shots, run.method, run.params,
                       run.seed, ("trial",) if run.trial else None)

    def _load_diagnostics(self) -> dict:
        path = self.out / DIAGNOSTICS_FILE
        return read_diagnostics(path, "delete it to resume (it only feeds the plots)") if path.is_file() else {}

    def _with_parts(self, existing: list[dict]) -> list[dict]:
        """The results with the records of SLURM tasks a killed submitter did not merge, and without
        the failed records of runs a task lost (so they run again); rewritten when that changes them."""
        parts = collect_parts(self.out)
        if not parts and not any(map(is_lost, existing)):
            return existing
        keys = {record_key(r) for r in existing}
        added = [r for part in parts for r in part if record_key(r) not in keys]
        kept = [r for r in existing + list({record_key(r): r for r in added}.values()) if not is_lost(r)]
        if added or len(kept) != len(existing):
            atomic_write_text(self.results, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        return kept

    # -- running --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        if self._lock is None:
            raise RuntimeError("use the Sweeper as a context manager: with Sweeper(...) as sweeper")
        if self.executor is not None:
            yield from self.executor.run(self)
            merged = merge_diagnostics(self.out, self.diagnostics)
            if merged:
                atomic_write_text(self.diagnostics_path, json.dumps(merged))
            yield from self._select_ready()
            return
        for rep in self.representations:
            runs = [run for run in self.pending if run.representation == rep.label]
            if runs:
                yield from self._sweep_entry(rep, runs)
        yield from self._select_ready()  # choices whose trials were all recorded before (a resumed sweep)

    def _record(self, record: dict) -> None:
        self._append(record)
        self.records.append(record)
        self._recorded[record_key(record)] = record

    def _select_ready(self, representation: str | None = None, method: str | None = None,
                      seed: int | None = None) -> Iterator[dict]:
        """Write the choice of every pending selection (of this representation, method and seed)
        whose trials are all recorded, none lost on SLURM; yield each."""
        if not self._selecting:
            return
        for selection in list(self.pending_selections):
            if (representation, method, seed) != (None, None, None) and \
                    (selection.representation, selection.method, selection.seed) != (representation, method, seed):
                continue
            trials = [self._recorded.get(self.run_key(run)) for run in selection.trials]
            if any(t is None or is_lost(t) for t in trials):
                continue
            record = selection_record(trials, self.spec.select_metric, self.spec.budget,
                                      self.searched[selection.method], self.val_split)
            self._record(record)
            self.pending_selections.remove(selection)
            candidate = self._candidates.pop((selection.representation, selection.method), None)
            if selection.seed == self.spec.seeds[0] and candidate and record["status"] == "ok" and \
                    candidate[1] == record_key(best_trial(trials, self.spec.select_metric)):
                self._keep_diagnostics(selection.representation, selection.method, candidate[2])
            yield record

    def _split(self, cache, name: str):
        split = cache.split(name)
        return as_features(split.features, self.device), split.labels

    def _sweep_entry(self, rep: Representation, runs: list[Run]) -> Iterator[dict]:
        cache = rep.cache
        train = cache.split("train", view=None)  # every view; X is view 0's rows (a zero-copy slice)
        views = as_features(train.view_stack(), self.device) if train.num_views > 1 else None
        X, y = (views[0], train.view(0).labels) if views is not None else self._split(cache, "train")
        counts = cache.class_counts("train")
        X_eval, y_eval = self._split(cache, self.spec.eval_split)
        val = self._split(cache, self.val_split) if self.val_split else None
        # on the device once for every run of the entry, as the features (a fit would copy them each time)
        classifier = None if cache.classifier is None else tuple(as_tensor(t, self.device) for t in cache.classifier)
        diagnostics = self.diagnostics.setdefault("representations", {}).setdefault(rep.label, {})
        diagnostics.setdefault("train_counts", counts.tolist())
        diagnostics.setdefault("cache_key", cache.key)
        try:
            for batch in self._batches(runs, X, counts, classifier):
                fitted = self._fit_stack(batch, X, y, counts, classifier, val, views) if len(batch) > 1 else [None]
                for run in batch:
                    prefit = fitted.pop(0)  # (estimator, fit seconds), released once recorded; None: fit here
                    record, estimator, logits = self._run(run, X, y, counts, classifier, val, X_eval, y_eval, views,
                                                          prefit, stacked=len(batch) if prefit else None)
                    self._record(record)
                    if record["status"] == "ok":
                        self._diagnose(diagnostics, cache, run, record, estimator, logits, y_eval, X_eval)
                    del estimator, logits, prefit  # not alive beside the next run's (memory_needed counts one)
                    yield record
                if batch[-1].trial:
                    for method, seed in dict.fromkeys((run.method, run.seed) for run in batch):
                        yield from self._select_ready(batch[0].representation, method, seed)
        finally:
            cache.release()  # one entry in memory at a time

    def _append(self, record: dict) -> None:
        append_line(self.results, json.dumps(record, allow_nan=False) + "\n")

    # -- the pieces a SLURM task and its submitter use (classifiers/cluster.py) ------------------
    def run_part(self, runs: list[Run], records_path: Path, diagnostics_path: Path, job: dict) -> int:
        """Run ``runs`` here (an array task), appending their records to ``records_path`` (the
        task's own file) and the plot diagnostics to ``diagnostics_path``; runs the file already
        holds (a requeued task) are skipped. Returns the number of runs recorded."""
        self.results, self.diagnostics_path, self.job = Path(records_path), Path(diagnostics_path), job
        self._selecting = False
        done = {record_key(r) for r in load_records(self.results)}
        self.pending = [run for run in runs if self.run_key(run) not in done]
        before = flushing_denormals()
        torch.set_flush_denormal(True)
        try:
            count = 0
            for rep in self.representations:
                todo = [run for run in self.pending if run.representation == rep.label]
                count += sum(1 for _ in self._sweep_entry(rep, todo)) if todo else 0
            return count
        finally:
            torch.set_flush_denormal(before)

    def merge_part(self, records: list[dict], lost: list[dict]) -> Iterator[dict]:
        """Add a finished task's records and the failed records of the runs it lost to the results
        file (one atomic replace); yield the failed ones."""
        new = [r for r in records + lost if record_key(r) not in self._recorded]
        if new:
            self.records.extend(new)
            self._recorded.update((record_key(r), r) for r in new)
            atomic_write_text(self.results, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))
        yield from lost

    def failed_record(self, run: Run, failure: str, job: dict) -> dict:
        """The record of a run that never finished (its SLURM task ended first)."""
        record = {"method": run.method, "params": _jsonable(dict(run.params)), "seed": run.seed,
                  "representation": run.representation, "eval_split": self.spec.eval_split, "selected_on": None,
                  "status": "failed", "failure": failure, "many_threshold": self.spec.many,
                  "few_threshold": self.spec.few, "fit_seconds": None, "eval_seconds": None,
                  "cache_key": run.cache_key, "version": __version__, "job": job,
                  "tuning": {"role": "trial", "val": None} if run.trial else None, **dict.fromkeys(METRIC_FIELDS)}
        return {k: record[k] for k in RECORD_FIELDS}

    def _batches(self, runs: list[Run], X, counts, classifier) -> list[list[Run]]:
        """The runs in the groups fitted together: a tuned method's trials of one seed that can be
        stacked (classifiers/stacking.py), within ``stack_budget``; every other run alone."""
        if not (self.spec.tune and self.spec.stack):
            return [[run] for run in runs]
        estimators = [create(run.method, **dict(run.params)) for run in runs]
        groups = stack_groups(estimators, self.spec.stack_budget, rows=len(X), dim=X.shape[1],
                              num_classes=classes_of(None, class_counts=counts, classifier=classifier))
        return [[runs[position] for position in group] for group in groups]

    def _fit_stack(self, batch: list[Run], X, y, counts, classifier, val, views) -> list[tuple]:
        """The batch's estimators fitted in one pass, each with its share of the seconds it took."""
        estimators = [create(run.method, **dict(run.params), device=str(self.device)) for run in batch]
        began = time.perf_counter()
        fit_stack(estimators, X, y, class_counts=counts, classifier=classifier, val=val, views=views)
        share = self._seconds_since(began) / len(batch)
        return [(estimator, share) for estimator in estimators]

    def _seconds_since(self, began: float) -> float:
        """Seconds since ``began`` once the device has finished the work queued (CUDA is asynchronous)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - began

    def _run(self, run: Run, X, y, counts, classifier, val, X_eval, y_eval, views=None, prefit=None,
             stacked: int | None = None):
        """Fit (unless ``prefit`` holds the fitted estimator and its fit seconds), evaluate and
        record one run; ``stacked``: the size of the stack it was fitted in."""
        params = dict(run.params)
        if prefit is None:
            estimator = create(run.method, **params, device=str(self.device))
            began = time.perf_counter()
            estimator.fit(X, y, class_counts=counts, classifier=classifier, val=val, views=views)
            fit_seconds = self._seconds_since(began)
        else:
            estimator, fit_seconds = prefit
        began = time.perf_counter()
        logits = estimator.device_logits(X_eval)  # scored where they are (featcache.metrics)
        eval_seconds = self._seconds_since(began)
        selected = getattr(estimator, "selected_", {}) or {}
        record = {"method": run.method, "params": {**_jsonable(params), **selected}, "seed": run.seed,
                  "representation": run.representation, "eval_split": self.spec.eval_split,
                  "selected_on": self.val_split if selected else None,
                  "many_threshold": self.spec.many, "few_threshold": self.spec.few,
                  "fit_seconds": round(fit_seconds, 4), "eval_seconds": round(eval_seconds, 4),
                  "cache_key": run.cache_key, "version": __version__, "job": self.job, "tuning": None}
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        if bad:
            record.update(status="failed", failure=f"non-finite logits on {bad} of {len(logits)} eval rows "
                                                   "(the fit diverged?)", **dict.fromkeys(METRIC_FIELDS))
        else:
            record.update(status="ok", failure=None, **evaluate(logits, y_eval, counts, self.spec.many,
                                                                self.spec.few))
            if not all(v is None or math.isfinite(v) for v in (record[k] for k in METRIC_FIELDS)):
                record.update(status="failed", failure="a metric is not finite", **dict.fromkeys(METRIC_FIELDS))
        if run.trial:
            record["tuning"] = {"role": "trial", "val": self._val_metrics(estimator, val, counts)
                                if record["status"] == "ok" else None}
            if stacked:
                record["tuning"]["stacked"] = stacked
            if record["status"] == "ok" and record["tuning"]["val"] is None:
                record.update(status="failed", failure=f"non-finite logits on the {self.val_split!r} split",
                              **dict.fromkeys(METRIC_FIELDS))
        return {k: record[k] for k in RECORD_FIELDS}, estimator, logits

    def _val_metrics(self, estimator, val, counts) -> dict | None:
        """A trial's metrics on the val split (what its method's choice compares); None where its
        val logits are not finite."""
        logits = estimator.device_logits(val[0])
        if not bool(torch.isfinite(logits).all()):
            return None
        labels = val[1].cpu().numpy() if isinstance(val[1], torch.Tensor) else val[1]
        metrics = evaluate(logits, labels, counts, self.spec.many, self.spec.few)
        return metrics if all(v is None or math.isfinite(v) for v in metrics.values()) else None

    def _diagnose(self, diagnostics: dict, cache, run: Run, record: dict, estimator, logits, y_eval, X_eval) -> None:
        """Keep what the plots need, for the first seed of each method: per-class accuracy, the
        reliability diagram's bins, and the diagnostics its registry entry names (weight norms; the
        val and eval curves over tau's grid). Of a tuned method's trials, those of the best trial
        so far are held until the method's choice is made."""
        if run.seed != self.spec.seeds[0] or run.method in diagnostics.get("per_class", {}):
            return
        if run.trial:
            score = record["tuning"]["val"].get(self.spec.select_metric)
            held = self._candidates.get((run.representation, run.method))
            if score is not None and better(self.spec.select_metric, score, held and held[0]):
                self._candidates[run.representation, run.method] = (
                    score, record_key(record), self._diagnostics_of(cache, run, estimator, logits, y_eval, X_eval))
            return
        self._keep_diagnostics(run.representation, run.method,
                               self._diagnostics_of(cache, run, estimator, logits, y_eval, X_eval))

    def _diagnostics_of(self, cache, run: Run, estimator, logits, y_eval, X_eval) -> dict:
        wanted = REGISTRY[run.method].info.diagnostics
        per_class = per_class_accuracy(predictions(logits), y_eval, logits.shape[1])
        found = {"per_class": [None if np.isnan(a) else float(a) for a in per_class],
                 "reliability": calibration_bins(logits, np.asarray(y_eval))}
        norms = effective_weight_norms(estimator)
        if norms is not None and "weight_norms" in wanted:
            found["weight_norms"] = norms.tolist()
        if "tau_curve" in wanted and getattr(estimator, "val_curve_", None):
            weight = torch.as_tensor(cache.classifier[0], device=X_eval.device)
            norms = weight.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            labels = torch.as_tensor(y_eval, device=X_eval.device)
            grid = list(estimator.val_curve_)
            curve = {str(t): 100 * a for t, a in zip(grid, tau_curve(X_eval, labels, weight, norms, grid,
                                                                      len(estimator.classes_)))}
            found["tau_curve"] = {"val": {str(k): 100 * v for k, v in estimator.val_curve_.items()},
                                  self.spec.eval_split: curve, "chosen": estimator.tau_}
        return found

    def _keep_diagnostics(self, label: str, method: str, found: dict) -> None:
        diagnostics = self.diagnostics.setdefault("representations", {}).setdefault(label, {})
        for name, value in found.items():
            if name == "tau_curve":
                diagnostics["tau_curve"] = value
            else:
                diagnostics.setdefault(name, {})[method] = value
        atomic_write_text(self.diagnostics_path, json.dumps(self.diagnostics))


def _jsonable(params: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}

