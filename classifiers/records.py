"""The sweep record schema (docs/records.md): the fields of a record, the key that says two records
are the same run, and the reader of a results file. The sweep writes records; tables and plots
read them through this module."""
from __future__ import annotations

import contextlib
import gc
import json
import math
from pathlib import Path

from featcache.errors import FeatcacheError

from .base import REGISTRY

RECORD_FIELDS = ("method", "params", "seed", "representation", "eval_split", "selected_on", "status", "failure",
                 "top1", "accuracy", "top5", "many", "medium", "few", "n_many", "n_medium", "n_few",
                 "many_threshold", "few_threshold", "macro_f1", "ece", "nll", "fit_seconds", "eval_seconds",
                 "cache_key", "version", "job", "tuning")
METRIC_FIELDS = ("top1", "accuracy", "top5", "many", "medium", "few", "n_many", "n_medium", "n_few", "macro_f1", "ece",
                 "nll")
# the metrics a tuned sweep can select on, and whether higher is better
SELECTION_METRICS = {"top1": True, "accuracy": True, "top5": True, "many": True, "medium": True, "few": True,
                     "macro_f1": True, "ece": False, "nll": False}
# what makes two records the same experiment, seed aside (tables never average across these); records
# of one representation label may come from several cache entries when each entry has its own seeds
# (e.g. a backbone trained per seed), never when two of them share a seed
IDENTITY_FIELDS = ("representation", "eval_split", "many_threshold", "few_threshold")
RESULTS_FILE = "results.jsonl"
DIAGNOSTICS_FILE = "diagnostics.json"

_REQUIRED = {"method": str, "params": dict, "seed": int, "eval_split": str, "cache_key": str}


def param_items(params: dict) -> tuple:
    """Parameters as sorted (name, value) pairs, lists as tuples: the hashable form run keys use."""
    return tuple(sorted((k, _frozen(v)) for k, v in params.items()))


def _frozen(value):
    """A parameter value in hashable form: lists (at any depth) as tuples, objects as sorted pairs."""
    if isinstance(value, (list, tuple)):
        frozen = tuple(value)
        try:
            hash(frozen)  # flat (the usual case): done
            return frozen
        except TypeError:
            return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def run_key(representation: str, cache_key: str, eval_split: str, shots: tuple, method: str, params: tuple,
            seed: int, tuning: tuple | None = None) -> tuple:
    """What says two runs are the same (hashable; equal values are equal whatever their JSON spelling,
    so a parameter recorded as ``1.0`` matches a run asked for with ``1``). ``tuning``: None for a
    plain run, ``("trial",)`` for a trial of a tuned sweep, ``("selected", metric, budget)`` for the
    choice among a method's trials (whose ``params`` are then empty: the request is "tuned")."""
    return (representation, cache_key, eval_split, tuple(shots), method, tuple(params), seed, tuning)


def tuning_role(record: dict) -> str | None:
    """"trial", "selected", or None (a plain run)."""
    tuning = record.get("tuning")
    return tuning["role"] if tuning else None


def requested_params(record: dict) -> dict:
    """The parameters a record was asked for: values chosen on val go back to 'auto'; a tuned
    method's choice was asked for as no parameters at all."""
    if tuning_role(record) == "selected":
        return {}
    params = dict(record["params"])
    if record.get("selected_on") and record["method"] in REGISTRY:
        for name in REGISTRY[record["method"]].info.chosen_on_val:
            if name in params:
                params[name] = "auto"
    return params


def record_key(record: dict) -> tuple:
    """The record's :func:`run_key`: equal for two records of the same run."""
    tuning = record.get("tuning")
    key = None if not tuning else ("trial",) if tuning["role"] == "trial" else \
        ("selected", tuning["metric"], tuning["budget"])
    return run_key(record["representation"], record["cache_key"], record["eval_split"],
                   (record["many_threshold"], record["few_threshold"]), record["method"],
                   param_items(requested_params(record)), record["seed"], key)


def load_records(path: Path) -> list[dict]:
    """The records of a results file, each checked as the sweep writes it (:func:`check_record`); a
    half-written last line (an interrupted run) is skipped. Records written before the
    ``representation`` / ``status`` fields existed get their defaults."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"{path} cannot be read as a results file ({exc})") from None
    with gc_paused():
        return _parse_records(path, lines)


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off for a while: for passes that build many small containers
    and no cycles (records, their keys and groups), where its collections over the growing heap
    cost about 40% of the time. Memory is still freed by reference counting."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _parse_records(path: Path, lines: list[str]) -> list[dict]:
    records = []
    decode = _DECODER.decode
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = decode(line)
        except (json.JSONDecodeError, ValueError):
            if number != len(lines):  # only the last line may be half-written
                raise FeatcacheError(f"{path}:{number} is not a valid JSON record") from None
            continue
        if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in _REQUIRED.items()):
            raise FeatcacheError(f"{path}:{number} is not a sweep record (needs {', '.join(_REQUIRED)}; "
                                 "see docs/records.md)")
        record.setdefault("representation", record["cache_key"][:12])
        record.setdefault("status", "ok")
        record.setdefault("failure", None)
        record.setdefault("many_threshold", 100)
        record.setdefault("few_threshold", 20)
        problem = check_record(record)
        if problem:
            raise FeatcacheError(f"{path}:{number}: {problem} (see docs/records.md)")
        records.append(record)
    return records


SEED_LIMIT = 2 ** 64  # torch generators take seeds below this
PERCENT_FIELDS = ("top1", "accuracy", "top5", "many", "medium", "few", "macro_f1", "ece")
COUNT_FIELDS = ("n_many", "n_medium", "n_few")
# metrics an ``ok`` record never has null (top1 it always has; records older than the other fields may
# lack them); many / medium / few are null only when their group is empty
ALWAYS_MEASURED = ("top1", "accuracy", "top5", "macro_f1", "ece", "nll")
_KNOWN = frozenset(RECORD_FIELDS)
_OPTIONAL_TEXT = ("selected_on", "failure")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _shown(value) -> str:
    """A bad value as an error shows it: a float beyond range (``1e400`` reads as infinity) is never
    printed as ``inf``; a long value is cut."""
    if isinstance(value, float) and not math.isfinite(value):
        return "(beyond the float range)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(record: dict) -> str | None:
    """What is wrong with a record read back (None: nothing), by the schema of docs/records.md:
    known fields only; metrics finite, accuracies (and the ECE, in %) within 0..100, group sizes
    non-negative integers; an ``ok`` record has every metric but an empty group's; the seed and the
    thresholds non-negative integers."""
    if not _KNOWN.issuperset(record):
        return f"unknown field {next(k for k in record if k not in _KNOWN)!r}"
    seed = record["seed"]
    if isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        return f"seed {_shown(seed)} is not an integer in 0..2**64-1"
    for name in ("representation", "eval_split", "status", "version"):
        if name in record and not isinstance(record[name], str):
            return f"{name} {_shown(record[name])} is not a string"
    for name in _OPTIONAL_TEXT:
        if record.get(name) is not None and not isinstance(record[name], str):
            return f"{name} {_shown(record[name])} is neither a string nor null"
    status = record["status"]
    if status not in ("ok", "failed"):
        return f"status {_shown(status)} is neither 'ok' nor 'failed'"
    job = record.get("job")
    if job is not None and not (isinstance(job, dict) and set(job) == {"id", "log", "lost"}
                                and isinstance(job["id"], str) and isinstance(job["log"], str)
                                and isinstance(job["lost"], bool)):
        return f"job {_shown(job)} is neither null nor a SLURM task {{id, log, lost}}"
    for name in ("many_threshold", "few_threshold"):
        if not _is_int(record[name]) or record[name] < 0:
            return f"{name} {_shown(record[name])} is not a non-negative integer"
    for name in ("fit_seconds", "eval_seconds"):
        value = record.get(name)
        if value is not None and not (_is_number(value) and value >= 0):
            return f"{name} {_shown(value)} is not a finite non-negative number"
    for name in PERCENT_FIELDS:
        value = record.get(name)
        kind = value.__class__
        if value is None or (kind is float or kind is int) and 0 <= value <= 100 + 1e-9:
            continue  # (infinity and NaN fail the comparison)
        if not _is_number(value):
            return f"metric {name} {_shown(value)} is not a finite number"
        return f"metric {name} {_shown(value)} is outside 0..100 (a percentage)"
    for name in COUNT_FIELDS:
        value = record.get(name)
        if value is not None and not (value.__class__ is int and value >= 0):
            return f"metric {name} {_shown(value)} is not a non-negative integer"
    nll = record.get("nll")
    if nll is not None and not (_is_number(nll) and nll >= 0):
        return f"metric nll {_shown(nll)} is not a finite non-negative number"
    problem = _check_tuning(record.get("tuning"))
    if problem:
        return problem
    if status == "ok":
        for name in ALWAYS_MEASURED:
            if record.get(name) is None and (name in record or name == "top1"):
                return f"metric {name} is {'null' if name in record else 'missing'} on an 'ok' record " \
                       "(a failed run has status 'failed')"
        for group in ("many", "medium", "few"):
            size = record.get(f"n_{group}")
            if record.get(group) is None and size:
                return f"metric {group} is null but n_{group} is {size} (null only for an empty group)"
    return None


def _check_tuning(tuning) -> str | None:
    """What is wrong with a record's ``tuning`` (None: nothing): null, a trial's
    ``{"role": "trial", "val": {metric: value}}`` (with ``"stacked": K`` where it was fitted in one
    pass with K - 1 others) or a choice's ``{"role": "selected", "metric",
    "budget", "trials", "failed_trials", "chosen": {parameter: value}, "val": {metric: value}}``."""
    if tuning is None:
        return None
    if not isinstance(tuning, dict) or tuning.get("role") not in ("trial", "selected"):
        return f"tuning {_shown(tuning)} is neither null nor a trial's or a choice's tuning object"
    val = tuning.get("val")
    if val is not None and not (isinstance(val, dict) and set(val) <= set(METRIC_FIELDS)
                                and all(v is None or _is_number(v) for v in val.values())):
        return f"tuning.val {_shown(val)} is not an object of val metrics"
    expected = {"role", "val"} if tuning["role"] == "trial" else \
        {"role", "val", "metric", "budget", "trials", "failed_trials", "chosen"}
    if tuning["role"] == "trial" and "stacked" in tuning:  # fitted in one pass with others (stacking.py)
        if not _is_int(tuning["stacked"]) or tuning["stacked"] < 1:
            return f"tuning.stacked {_shown(tuning['stacked'])} is not a positive integer"
        expected = expected | {"stacked"}
    if set(tuning) != expected:
        return f"tuning of a {tuning['role']} has the fields {', '.join(sorted(tuning))}, not {', '.join(sorted(expected))}"
    if tuning["role"] == "selected":
        if tuning["metric"] not in SELECTION_METRICS:
            return f"tuning.metric {_shown(tuning['metric'])} is not one of {', '.join(SELECTION_METRICS)}"
        for name in ("budget", "trials", "failed_trials"):
            if not _is_int(tuning[name]) or tuning[name] < (1 if name == "budget" else 0):
                return f"tuning.{name} {_shown(tuning[name])} is not a {'positive' if name == 'budget' else 'non-negative'} integer"
        if not isinstance(tuning["chosen"], dict):
            return f"tuning.chosen {_shown(tuning['chosen'])} is not an object of parameter -> value"
    return None


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _numbers(values, allow_null: bool = False) -> bool:
    return isinstance(values, list) and all((allow_null and v is None) or _is_number(v) for v in values)


def read_diagnostics(path: Path, remedy: str) -> dict:
    """The checked contents of a ``diagnostics.json`` (see :func:`check_diagnostics`); damage is one
    error naming the file, what is wrong and ``remedy``."""
    try:
        diagnostics = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        diagnostics, problem = None, exc.strerror if isinstance(exc, OSError) else "not JSON"
    else:
        problem = check_diagnostics(diagnostics)
    if problem:
        raise FeatcacheError(f"{path} is damaged or not a sweep's diagnostics file ({problem}); {remedy}")
    return diagnostics


def check_diagnostics(diagnostics) -> str | None:
    """What is wrong with the contents of a ``diagnostics.json`` (None: nothing): ``representations``
    maps each label to its ``train_counts`` (one non-negative integer per class) and, optionally,
    ``cache_key``, ``per_class`` / ``weight_norms`` (method -> one number per class; per-class
    accuracies may be null), ``reliability`` (method -> the eval split's confidence bins: ``count``,
    mean ``confidence`` and ``accuracy``, null where empty) and ``tau_curve`` (split -> {tau:
    top-1}, and the ``chosen`` tau)."""
    if not isinstance(diagnostics, dict):
        return "the file holds no JSON object"
    representations = diagnostics.get("representations", {})
    if not isinstance(representations, dict):
        return "'representations' is not an object"
    for label, entry in representations.items():
        where = f"representation {label!r}"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        counts = entry.get("train_counts")
        if not (isinstance(counts, list) and counts and all(_is_int(c) and c >= 0 for c in counts)):
            return f"{where}: train_counts is not a list of non-negative integers"
        if "cache_key" in entry and not isinstance(entry["cache_key"], str):
            return f"{where}: cache_key is not a string"
        for name in ("per_class", "weight_norms"):
            by_method = entry.get(name, {})
            if not isinstance(by_method, dict):
                return f"{where}: {name} is not an object of method -> values"
            for method, values in by_method.items():
                if not _numbers(values, allow_null=name == "per_class") or len(values) != len(counts):
                    return f"{where}: {name}[{method!r}] is not {len(counts)} finite numbers (one per class)"
        reliability = entry.get("reliability", {})
        if not isinstance(reliability, dict):
            return f"{where}: reliability is not an object of method -> bins"
        for method, bins in reliability.items():
            if not (isinstance(bins, dict) and set(bins) == {"count", "confidence", "accuracy"}
                    and isinstance(bins["count"], list) and bins["count"]
                    and all(_is_int(c) and c >= 0 for c in bins["count"])
                    and all(_numbers(bins[k], allow_null=True) and len(bins[k]) == len(bins["count"])
                            for k in ("confidence", "accuracy"))):
                return f"{where}: reliability[{method!r}] is not bins of count, confidence and accuracy"
        curve = entry.get("tau_curve")
        if curve is None:
            continue
        if not isinstance(curve, dict) or not _is_number(curve.get("chosen")):
            return f"{where}: tau_curve is not an object with a numeric 'chosen'"
        for split, values in curve.items():
            if split == "chosen":
                continue
            if not isinstance(values, dict) or not values or not all(_is_number(v) for v in values.values()):
                return f"{where}: tau_curve[{split!r}] is not an object of tau -> top-1"
            try:
                [float(t) for t in values]
            except ValueError:
                return f"{where}: tau_curve[{split!r}] has a tau that is not a number"
    return None
