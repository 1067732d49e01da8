"""``featcache extract``: run a backbone in eval mode over a data set's splits and store the pooled
penultimate features in the cache. Identical requests are hits; interrupted ones resume shard by
shard; under ``torchrun`` each rank writes its own shards and rank 0 writes the manifest."""
from __future__ import annotations

import contextlib
import platform
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import get_arch, model_channels
from .batches import iterate_batches
from .checkpoints import Checkpoint, load_checkpoint, load_model
from .datasets import DataSource, DataSpec
from .distributed import Dist, resolve_device
from .errors import FeatcacheError
from .store import EntryWriter, cache_root, content_key, entry_lock

DEFAULT_SPLITS = ("train", "val", "test")


@dataclass
class ExtractRequest:
    ckpt: str
    arch: str | None = None
    data: DataSpec | None = None
    splits: list[str] | None = None
    cache_dir: str | None = None
    dtype: str = "float32"
    batch_size: int = 256
    num_workers: int = 0
    shard_rows: int = 65536
    compression: str = "none"
    device: str = "auto"
    allow_nonfinite: bool = False
    progress: bool = True
    on_bad_image: str = "fail"
    trust_checkpoint: bool = False


def resolve_data(checkpoint: Checkpoint, data: DataSpec | None) -> DataSpec:
    """The data set: the flags, on top of what the checkpoint recorded for the same data set."""
    recorded = DataSpec.from_dict(checkpoint.meta["data"]) if checkpoint.meta.get("data") else None
    if data is None:
        if recorded is None:
            raise FeatcacheError(f"--data is required: checkpoint {checkpoint.path} does not record its data set")
        return recorded
    if recorded is not None and recorded.name == data.name:
        return DataSpec(data.name, data.root or recorded.root, {**recorded.options, **data.options})
    return data


def versions() -> dict:
    import h5py
    import torchvision
    return {"featcache": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "h5py": h5py.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _check_labels(source: DataSource, splits: list[str], num_classes: int | None, ckpt: Path) -> None:
    if num_classes is None:
        return
    for name in splits:
        labels = source.split(name).labels
        if labels.max() >= num_classes:
            raise FeatcacheError(f"split {name!r} has label {int(labels.max())}, out of range for the "
                                 f"{num_classes}-class classifier in {ckpt}")


def extract(request: ExtractRequest) -> Path:
    """Return the entry directory holding every requested split, computing only what is missing."""
    dist = Dist.from_env()
    checkpoint = load_checkpoint(request.ckpt, trust_checkpoint=request.trust_checkpoint)
    arch = request.arch or checkpoint.arch
    if not arch:
        raise FeatcacheError(f"--arch is required: checkpoint {checkpoint.path} ({checkpoint.format}) "
                             "does not record its architecture")
    spec = get_arch(arch)
    data_spec = resolve_data(checkpoint, request.data)
    source = data_spec.load()
    splits = request.splits or [s for s in DEFAULT_SPLITS if s in source.splits]
    if not splits:
        raise FeatcacheError(f"data set {source.name!r} has none of the splits {', '.join(DEFAULT_SPLITS)}; "
                             f"name them with --split (it has: {', '.join(source.splits)})")
    for name in splits:
        source.split(name)
    _check_labels(source, splits, checkpoint.num_classes, checkpoint.path)
    if checkpoint.in_channels < source.channels:
        raise FeatcacheError(f"checkpoint {checkpoint.path} takes {checkpoint.in_channels}-channel (grayscale) images; "
                             f"data set {source.name!r} has {source.channels}-channel images")
    num_classes = max(checkpoint.num_classes or 0, source.num_classes)
    identity = {"checkpoint_sha256": checkpoint.sha256, "arch": arch, "data": source.identity,
                "transform": source.transform_description, "dtype": request.dtype}
    if request.on_bad_image == "skip":
        identity["on_bad_image"] = "skip"
    elif request.on_bad_image != "fail":
        raise FeatcacheError(f"--on-bad-image {request.on_bad_image!r}: choose fail or skip")
    key = content_key(identity)
    root = cache_root(request.cache_dir)
    base_meta = {"kind": "extract", "name": None, "arch": arch, "feature_dim": spec.feature_dim,
                 "dtype": request.dtype, "compression": request.compression, "num_classes": num_classes,
                 "checkpoint": {"sha256": checkpoint.sha256, "path": str(checkpoint.path),
                                "format": checkpoint.format},
                 "data": {"spec": data_spec.to_dict(), "identity": source.identity},
                 "transform": source.transform_description, "class_names": source.class_names,
                 "versions": versions()}
    writer = EntryWriter(root, key, base_meta)
    lock = entry_lock(root, key) if dist.is_main else contextlib.nullcontext()
    with lock:
        if dist.is_main:
            writer.remove_stale_temporaries()
        dist.barrier()
        todo = [s for s in splits if s not in writer.complete_splits()]
        dist.barrier()
        if not todo:
            return writer.path
        if request.on_bad_image == "skip":
            _skip_undecodable(source, todo)
        try:
            _extract_splits(request, writer, checkpoint, arch, source, todo, num_classes, dist)
        except Exception:
            if dist.is_main:
                writer.discard_incomplete()
            raise
    return writer.path


def _skip_undecodable(source: DataSource, splits: list[str]) -> None:
    from .batches import drop_undecodable
    for name in splits:
        if source.splits[name].paths is None:
            continue
        source.splits[name], bad = drop_undecodable(source.splits[name])
        if bad:
            shown = "; ".join(bad[:3]) + (f"; +{len(bad) - 3} more" if len(bad) > 3 else "")
            print(f"warning: split {name!r}: skipped {len(bad)} undecodable image(s): {shown}", file=sys.stderr)
        source.split(name)  # an all-bad split is an empty split: a clear error


def _extract_splits(request, writer, checkpoint, arch, source, todo, num_classes, dist) -> None:
    from tqdm.auto import tqdm

    device = dist.device(resolve_device(request.device))
    model = load_model(checkpoint, arch, num_classes).to(device)
    channels = model_channels(arch, source.channels)
    classifier_record = None
    if dist.is_main and checkpoint.classifier is not None and writer.existing_manifest() is None:
        classifier_record = writer.write_classifier(*checkpoint.classifier)
    total = sum(len(source.split(s)) for s in todo)
    with tqdm(total=total, unit="img", desc="extract", disable=not (request.progress and dist.is_main),
              dynamic_ncols=True, leave=False) as bar, ThreadPoolExecutor(max_workers=1) as pool:
        for name in todo:
            samples = source.split(name)
            split = writer.split_writer(name, rows=len(samples), dim=get_arch(arch).feature_dim,
                                        dtype=request.dtype, shard_rows=request.shard_rows,
                                        compression=request.compression)
            mine = [i for i in range(split.num_shards) if i % dist.world_size == dist.rank]
            pending = [i for i in mine if not split.shard_is_complete(i)]
            bar.update(sum(split.rows_in_shard(i) for i in mine if i not in pending) * dist.world_size)
            writing: Future | None = None
            for index in pending:
                start, stop = split.shard_range(index)
                features, labels, ids = _forward(model, source, samples, np.arange(start, stop), request,
                                                 channels, device, bar, dist.world_size)
                if not request.allow_nonfinite and not np.isfinite(features).all():
                    bad = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0]) + start
                    raise FeatcacheError(f"non-finite features in split {name!r} (row {bad}) from checkpoint "
                                         f"{checkpoint.path}; --allow-nonfinite stores them anyway")
                if writing is not None:
                    writing.result()
                writing = pool.submit(split.write_shard, index, features, labels, ids)
            if writing is not None:
                writing.result()
            dist.barrier()
            if dist.is_main:
                split.finish(samples.class_counts(num_classes), classifier_record)
                classifier_record = None
            dist.barrier()


@torch.no_grad()
def _forward(model, source, samples, rows, request, channels, device, bar, world_size):
    chunks, labels, ids = [], [], []
    for images, batch_labels, batch_ids in iterate_batches(source, samples, rows, request.batch_size,
                                                           channels=channels,
                                                           num_workers=request.num_workers):
        features = model.forward_features(images.to(device, non_blocking=True))
        chunks.append(features.float().cpu().numpy())
        labels.append(batch_labels.numpy())
        ids.append(batch_ids.numpy())
        bar.update(len(batch_labels) * world_size)
    return np.concatenate(chunks), np.concatenate(labels), np.concatenate(ids)
