"""The cache format's constants, content keys and manifest validation (spec: docs/cache-format.md)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
# The key hashes this, not FORMAT_VERSION: version 2 changed the files (a ``views`` dataset), not the
# features a single-view key names, so entries written by version 1 keep their keys and stay hits.
KEY_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENTRY_MARKER = ".featcache-entry"
CLASSIFIER_FILE = "classifier.h5"
LOCKS_DIR = ".locks"
COMPRESSIONS = ("none", "lzf", "gzip")
DTYPES = ("float32", "float16")
KEY_LENGTH = 24
CHUNK_BYTES = 1 << 20  # a shard's features are chunked by rows, about this many bytes a chunk


def content_key(identity: dict) -> str:
    """Hash of everything that changes the features (canonical JSON), with the format version."""
    payload = json.dumps({"format_version": KEY_FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def looks_like_key(name: str) -> bool:
    return len(name) == KEY_LENGTH and all(c in "0123456789abcdef" for c in name)


def training_run_label(meta: dict) -> str | None:
    """The ``featcache train`` run that made an entry's checkpoint, from its manifest
    (``tinycnn/instance/e12/s0``; ``/K4`` added for 4 views per training image); None for other
    checkpoints."""
    training = (meta.get("checkpoint") or {}).get("training")
    if not training:
        return None
    views = ((meta.get("splits") or {}).get("train") or {}).get("views", 1)
    return (f"{meta.get('arch')}/{training['sampler']}/e{training['epochs']}/s{training['seed']}"
            + (f"/K{views}" if views > 1 else ""))


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _file_problem(info, where: str) -> str | None:
    if not isinstance(info, dict):
        return f"{where} is not an object"
    for field_name in ("file", "sha256"):
        if not isinstance(info.get(field_name), str):
            return f"{where} has no {field_name!r}"
    parts = Path(info["file"]).parts
    if Path(info["file"]).is_absolute() or ".." in parts or not parts:
        return f"{where} names a file outside the entry ({info['file']!r})"
    if not (_is_int(info.get("size")) and _is_int(info.get("mtime_ns"))):
        return f"{where} has no valid size / mtime_ns"
    return None


def manifest_problem(meta: dict) -> str | None:
    """What makes a manifest unusable (missing or mistyped fields), or None."""
    if not isinstance(meta.get("key"), str):
        return "no 'key'"
    if not _is_int(meta.get("feature_dim"), 1) or not _is_int(meta.get("num_classes"), 1):
        return "'feature_dim' and 'num_classes' must be positive integers"
    if meta.get("dtype") not in DTYPES:
        return f"'dtype' is {meta.get('dtype')!r}, not one of {', '.join(DTYPES)}"
    if meta.get("classifier") is not None:
        problem = _file_problem(meta["classifier"], "'classifier'")
        if problem:
            return problem
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "no 'splits' object"
    for name, split in splits.items():
        if not isinstance(split, dict) or not _is_int(split.get("rows")):
            return f"split {name!r} has no valid 'rows'"
        counts = split.get("class_counts")
        if not isinstance(counts, list) or len(counts) != meta["num_classes"] or not all(_is_int(c) for c in counts):
            return f"split {name!r}: 'class_counts' must be {meta['num_classes']} non-negative integers"
        views = split.get("views", 1)
        if not _is_int(views, 1) or (views > 1 and meta.get("format_version") == 1):
            return f"split {name!r}: 'views' must be a positive integer (and 1 in format_version 1)"
        if split["rows"] % views or sum(counts) != split["rows"] // views:
            return (f"split {name!r}: 'class_counts' sum to {sum(counts)} samples, but 'rows' is "
                    f"{split['rows']} for {views} view(s) per sample")
        shards = split.get("shards")
        if not isinstance(shards, list) or not shards:
            return f"split {name!r} lists no shards"
        expected_start = 0
        for number, shard in enumerate(shards):
            where = f"split {name!r} shard {number}"
            problem = _file_problem(shard, where)
            if problem:
                return problem
            if shard.get("row_start") != expected_start or not _is_int(shard.get("rows")):
                return f"{where} does not continue at row {expected_start}"
            expected_start += shard["rows"]
        if expected_start != split["rows"]:
            return f"split {name!r}: its shards hold {expected_start} rows, 'rows' is {split['rows']}"
    return None
