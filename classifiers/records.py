"""The sweep record schema (docs/records.md): the fields of a record, the key that says two records
are the same run, and the reader of a results file. The sweep writes records; tables and plots
read them through this module."""
from __future__ import annotations

import json
from pathlib import Path

from featcache.errors import FeatcacheError

from .base import REGISTRY

RECORD_FIELDS = ("method", "params", "seed", "representation", "eval_split", "selected_on", "status", "failure",
                 "top1", "accuracy", "top5", "many", "medium", "few", "n_many", "n_medium", "n_few",
                 "many_threshold", "few_threshold", "macro_f1", "ece", "fit_seconds", "eval_seconds", "cache_key",
                 "version")
METRIC_FIELDS = ("top1", "accuracy", "top5", "many", "medium", "few", "n_many", "n_medium", "n_few", "macro_f1", "ece")
# what makes two records the same experiment, seed aside (tables never average across these); records
# of one representation label may come from several cache entries when each entry has its own seeds
# (e.g. a backbone trained per seed), never when two of them share a seed
IDENTITY_FIELDS = ("representation", "eval_split", "many_threshold", "few_threshold")
RESULTS_FILE = "results.jsonl"
DIAGNOSTICS_FILE = "diagnostics.json"

_REQUIRED = {"method": str, "params": dict, "seed": int, "eval_split": str, "cache_key": str}


def param_items(params: dict) -> tuple:
    """Parameters as sorted (name, value) pairs, lists as tuples: the hashable form run keys use."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def run_key(representation: str, cache_key: str, eval_split: str, shots: tuple, method: str, params: tuple,
            seed: int) -> str:
    return json.dumps([representation, cache_key, eval_split, list(shots), method, list(params), seed],
                      sort_keys=True, default=str)


def requested_params(record: dict) -> dict:
    """The parameters a record was asked for: values chosen on val go back to 'auto'."""
    params = dict(record["params"])
    if record.get("selected_on") and record["method"] in REGISTRY:
        for name in REGISTRY[record["method"]].info.chosen_on_val:
            params[name] = "auto"
    return params


def record_key(record: dict) -> str:
    """The record's :func:`run_key`: equal for two records of the same run."""
    return run_key(record["representation"], record["cache_key"], record["eval_split"],
                   (record["many_threshold"], record["few_threshold"]), record["method"],
                   param_items(requested_params(record)), record["seed"])


def load_records(path: Path) -> list[dict]:
    """The records of a results file; a half-written last line (an interrupted run) is skipped.
    Records written before the ``representation`` / ``status`` fields existed get their defaults."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"{path} cannot be read as a results file ({exc})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_refuse_constant)
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
        records.append(record)
    return records


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")
