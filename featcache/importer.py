"""``featcache import``: build a cache entry from features a user already has (.npz, .pt, or the
official classifier-balancing ``--save_feat`` pickle with ``feats`` and ``labels``)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .errors import FeatcacheError
from .safe_pickle import load_restricted, torch_load
from .store import cache_root, cast_overflow, content_key, sha256_file, writing

FEATURE_KEYS, LABEL_KEYS = ("features", "feats"), ("labels",)
MAX_CLASSES = 1_000_000  # a label beyond this is an id, not a class index (and its counts would not fit)


def read_feature_file(path: Path, trust_pickle: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(features N x D, labels N, indices N or None)`` from an .npz, .pt or pickle file.

    .pt and pickle files are loaded so that they can build numpy / torch arrays and plain
    containers only, unless ``trust_pickle`` (full unpickling, which can run code from the file)."""
    if not path.is_file():
        raise FeatcacheError(f"feature file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                payload = {k: archive[k] for k in archive.files}
        elif suffix in (".pt", ".pth"):
            payload = torch_load(path.read_bytes(), path, arrays=True, trust=trust_pickle, trust_flag="--trust-pickle")
        elif suffix in (".pkl", ".pickle") and trust_pickle:
            with open(path, "rb") as handle:
                payload = pickle.load(handle)
        elif suffix in (".pkl", ".pickle"):
            payload = load_restricted(path, trust_flag="--trust-pickle")
        else:
            raise FeatcacheError(f"{path}: unknown feature file type {suffix!r} (use .npz, .pt or .pkl)")
    except FeatcacheError:
        raise
    except Exception as exc:
        raise FeatcacheError(f"{path} cannot be read as {suffix} ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise FeatcacheError(f"{path} must hold a dict with features/feats and labels")
    features = next((payload[k] for k in FEATURE_KEYS if k in payload), None)
    labels = next((payload[k] for k in LABEL_KEYS if k in payload), None)
    if features is None or labels is None:
        raise FeatcacheError(f"{path} must hold 'features' (or 'feats') and 'labels'; it has {sorted(payload)}")
    features, labels = _numpy(features), _numpy(labels)
    indices = _numpy(payload["indices"]) if "indices" in payload else None
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise FeatcacheError(f"{path}: features must be N x D and labels N (got {features.shape} and {labels.shape})")
    if len(labels) == 0:
        raise FeatcacheError(f"{path}: the split is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise FeatcacheError(f"{path}: labels must be integers (got {labels.dtype})")
    return features, labels.astype(np.int64), None if indices is None else indices.astype(np.int64)


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def import_features(splits: dict[str, str], *, name: str, classifier_ckpt: str | None = None,
                    cache_dir: str | None = None, dtype: str = "float32", shard_rows: int = 65536,
                    compression: str = "none", allow_nonfinite: bool = False, trust_pickle: bool = False,
                    trust_checkpoint: bool = False) -> Path:
    if not splits:
        raise FeatcacheError("featcache import needs at least one --split NAME=FILE")
    loaded = {split: read_feature_file(Path(file), trust_pickle) for split, file in splits.items()}
    dims = {split: f.shape[1] for split, (f, _, _) in loaded.items()}
    if len(set(dims.values())) > 1:
        raise FeatcacheError(f"feature-dim mismatch between splits: {dims}")
    dim = next(iter(dims.values()))
    classifier, classifier_sha = None, None
    if classifier_ckpt:
        from .checkpoints import load_checkpoint
        checkpoint = load_checkpoint(classifier_ckpt, trust_checkpoint=trust_checkpoint)
        classifier, classifier_sha = checkpoint.classifier, checkpoint.sha256
        if classifier is None:
            raise FeatcacheError(f"--classifier {classifier_ckpt} has no fc.weight / fc.bias")
        if classifier[0].shape[1] != dim:
            raise FeatcacheError(f"feature-dim mismatch: features have {dim} dims, the classifier in "
                                 f"{classifier_ckpt} takes {classifier[0].shape[1]}")
    for split, (_, labels, _) in loaded.items():
        if labels.max() >= MAX_CLASSES:
            raise FeatcacheError(f"{splits[split]}: label {int(labels.max())} is not a class index (labels must be "
                                 f"0..C-1 with C <= {MAX_CLASSES:,})")
    num_classes = max(int(labels.max()) + 1 for _, labels, _ in loaded.values())
    if classifier is not None:
        if num_classes > len(classifier[0]):
            raise FeatcacheError(f"label {num_classes - 1} is out of range for the {len(classifier[0])}-class "
                                 f"classifier in {classifier_ckpt}")
        num_classes = len(classifier[0])
    for split, (features, labels, _) in loaded.items():
        if labels.min() < 0:
            raise FeatcacheError(f"{splits[split]}: negative label {int(labels.min())}")
        if not allow_nonfinite and not np.isfinite(features).all():
            raise FeatcacheError(f"{splits[split]}: features contain NaN or Inf (--allow-nonfinite keeps them)")
        overflow = cast_overflow(features, dtype)
        if overflow:
            raise FeatcacheError(f"{splits[split]} (split {split!r}): {overflow}"
                                 + ("; use --dtype float32" if dtype == "float16" else ""))
    identity = {"import": {s: sha256_file(f) for s, f in splits.items()}, "name": name,
                "classifier_sha256": classifier_sha, "dtype": dtype}
    key = content_key(identity)
    root = cache_root(cache_dir)
    base_meta = {"kind": "import", "name": name, "arch": None, "feature_dim": int(dim), "dtype": dtype,
                 "compression": compression, "num_classes": num_classes,
                 "checkpoint": {"sha256": classifier_sha, "path": classifier_ckpt, "format": None},
                 "data": {"identity": identity, "files": dict(splits)}, "transform": None,
                 "class_names": [], "versions": {}}
    from .extract import versions
    base_meta["versions"] = versions()
    with writing(root, key, base_meta, name=name, needs=list(loaded)) as entry:
        done = entry.complete_splits()
        if classifier is not None:
            entry.write_classifier(*classifier)
        for split, (features, labels, indices) in loaded.items():
            if split not in done:
                entry.write_split(split, features, labels, indices, num_classes=num_classes, dtype=dtype,
                                  shard_rows=shard_rows, compression=compression)
    return entry.path
