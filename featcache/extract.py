"""``featcache extract``: run a backbone in eval mode over a data set's splits and store the pooled
penultimate features in the cache. Identical requests are hits; interrupted ones resume shard by
shard; under ``torchrun`` each rank writes its own shards and rank 0 writes the manifest.

Backbones are this project's (``featcache archs``) or delegated to timm / open_clip
(``timm/NAME``, ``open_clip/MODEL``; see foundation.py), with the library's own eval transform."""
from __future__ import annotations

import collections
import platform
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import get_arch, model_channels
from .batches import ViewAugment, iterate_batches, resolve_view_transform
from .checkpoints import HF_HUB_PREFIX, Checkpoint, load_checkpoint, load_model, resolve_hf_hub
from .datasets import DataSource, DataSpec
from .distributed import Dist, resolve_device
from .errors import FeatcacheError
from .foundation import OPEN_CLIP, TIMM, Backbone, is_foundation, open_clip_backbone, timm_backbone, zeroshot_inputs
from .store import EntryWriter, cache_root, content_key, writing

DEFAULT_SPLITS = ("train", "val", "test")
VIEWS_SPLIT = "train"  # the split that gets --views K views per sample; the others keep one


@dataclass(kw_only=True)
class ExtractRequest:
    """What ``featcache extract`` is asked for (the CLI's options, by name)."""

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
    zeroshot_head: bool = False  # open_clip: store the zero-shot head as the entry's classifier
    class_names: str | None = None  # file, one class name per line (default: the data set's)
    templates: str | None = None  # file, one prompt template per line (default: DEFAULT_TEMPLATES)
    name: str | None = None  # a name for the entry (not part of the key)
    trust_checkpoint: bool = False
    views: int = 1  # views per training image: view 0 the eval transform, 1..K-1 augmented
    train_transform: str = "default"  # the views' augmentation (batches.VIEW_TRANSFORMS)
    view_seed: int = 0


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


@dataclass
class _Extraction:
    """One extraction's state, shared by the functions that run it."""

    request: ExtractRequest
    checkpoint: Checkpoint
    arch: str
    backbone: Backbone
    data_spec: DataSpec
    source: DataSource
    num_classes: int
    dist: Dist
    device: torch.device
    view_transform: tuple[str, str] | None  # (name, description) of views 1..K-1; None: one view
    bar: object = None  # the progress bar, while splits are extracted

    def views_of(self, split: str) -> int:
        return self.request.views if self.view_transform and split == VIEWS_SPLIT else 1


def extract(request: ExtractRequest) -> Path:
    """Return the entry directory holding every requested split, computing only what is missing."""
    run, splits = _prepare(request)
    identity = {"checkpoint_sha256": run.checkpoint.sha256, "arch": run.arch, "data": run.source.identity,
                "transform": run.backbone.transform_description or run.source.transform_description,
                "dtype": request.dtype, **run.backbone.key}
    if run.view_transform:
        identity["views"] = {"count": request.views, "train_transform": run.view_transform[1],
                             "seed": request.view_seed, "split": VIEWS_SPLIT}
    if request.on_bad_image == "skip":
        identity["on_bad_image"] = "skip"
    dist = run.dist
    # One process: a hit (every split already in the manifest) is found before locking, so a
    # complete entry under a read-only cache root reads. Under torchrun every rank locks-or-waits the
    # same way (a rank must not skip the barriers because it alone saw the manifest complete).
    needs = splits if dist.world_size == 1 else None
    with writing(cache_root(request.cache_dir), content_key(identity), _base_meta(run, identity),
                 name=request.name, coordinator=dist.is_main, needs=needs) as entry:
        if entry.read_only:
            return entry.path
        dist.barrier()
        todo = [s for s in splits if s not in entry.complete_splits()]
        dist.barrier()
        if todo:
            if request.on_bad_image == "skip":
                _skip_undecodable(run.source, todo)
            _extract_splits(run, entry, todo)
    return entry.path


def _prepare(request: ExtractRequest) -> tuple[_Extraction, list[str]]:
    """Check the request, load the checkpoint, the data set and the backbone; the splits to extract."""
    dist = Dist.from_env()
    ckpt = request.ckpt
    if str(ckpt).startswith(HF_HUB_PREFIX) and (request.arch or "").startswith(OPEN_CLIP):
        ckpt = resolve_hf_hub(str(ckpt), "open_clip")
    checkpoint = load_checkpoint(ckpt, trust_checkpoint=request.trust_checkpoint)
    arch = request.arch or checkpoint.arch
    if not arch:
        raise FeatcacheError(f"--arch is required: checkpoint {checkpoint.path} ({checkpoint.format}) "
                             "does not record its architecture")
    if not is_foundation(arch):
        get_arch(arch)
    if (request.zeroshot_head or request.class_names or request.templates) and not arch.startswith(OPEN_CLIP):
        raise FeatcacheError(f"--zeroshot-head / --class-names / --templates need an open_clip/ arch, not {arch}")
    if (request.class_names or request.templates) and not request.zeroshot_head:
        raise FeatcacheError("--class-names / --templates are the zero-shot head's: add --zeroshot-head")
    if request.on_bad_image not in ("fail", "skip"):
        raise FeatcacheError(f"--on-bad-image {request.on_bad_image!r}: choose fail or skip")
    data_spec = resolve_data(checkpoint, request.data)
    source = data_spec.load()
    splits = request.splits or [s for s in DEFAULT_SPLITS if s in source.splits]
    if not splits:
        raise FeatcacheError(f"data set {source.name!r} has none of the splits {', '.join(DEFAULT_SPLITS)}; "
                             f"name them with --split (it has: {', '.join(source.splits)})")
    for name in splits:
        source.split(name)
    if not is_foundation(arch) and checkpoint.in_channels < source.channels:
        raise FeatcacheError(f"checkpoint {checkpoint.path} takes {checkpoint.in_channels}-channel (grayscale) images; "
                             f"data set {source.name!r} has {source.channels}-channel images")
    device = dist.device(resolve_device(request.device))
    backbone = load_backbone(checkpoint, arch, source, data_spec, request, device)
    _check_labels(source, splits, backbone.num_classes, checkpoint.path)
    view_transform = _view_transform(request, source, backbone)
    if view_transform and VIEWS_SPLIT not in splits:
        raise FeatcacheError(f"--views {request.views} applies to the {VIEWS_SPLIT!r} split; add it to --split "
                             f"(asked for: {', '.join(splits)})")
    num_classes = max(backbone.num_classes or 0, source.num_classes)
    run = _Extraction(request, checkpoint, arch, backbone, data_spec, source, num_classes, dist, device,
                      view_transform)
    return run, splits


def _base_meta(run: _Extraction, identity: dict) -> dict:
    """The new entry's manifest fields (besides its splits)."""
    request, checkpoint, backbone = run.request, run.checkpoint, run.backbone
    meta = {"kind": "extract", "name": request.name, "arch": run.arch, "feature_dim": backbone.feature_dim,
            "dtype": request.dtype, "compression": request.compression, "num_classes": run.num_classes,
            "checkpoint": {"sha256": checkpoint.sha256, "path": str(checkpoint.path),
                           "format": checkpoint.format, "training": training_summary(checkpoint)},
            "data": {"spec": run.data_spec.to_dict(), "identity": run.source.identity},
            "transform": identity["transform"], "class_names": run.source.class_names,
            "versions": versions()}
    if backbone.meta:
        meta["backbone"] = backbone.meta
    return meta


def _view_transform(request: ExtractRequest, source: DataSource, backbone: Backbone) -> tuple[str, str] | None:
    """(name, description) of the augmentation of views 1..K-1, or None for one view."""
    if not isinstance(request.views, int) or request.views < 1:
        raise FeatcacheError(f"--views {request.views!r}: give a positive number of views per training image")
    if request.view_seed < 0:
        raise FeatcacheError(f"--view-seed {request.view_seed}: give a non-negative seed")
    if request.views == 1:
        return None
    if backbone.transform is not None:
        raise FeatcacheError("--views > 1 needs the data set's own transforms; timm/ and open_clip/ backbones "
                             "bring their own eval transform, for which no training augmentation is defined here")
    return resolve_view_transform(source, request.train_transform)


def training_summary(checkpoint: Checkpoint) -> dict | None:
    """Sampler, epochs trained and seed of a ``featcache train`` checkpoint (None for other formats)."""
    args = checkpoint.meta.get("args") or {}
    if "sampler" not in args or "epoch" not in checkpoint.meta:
        return None
    return {"sampler": args["sampler"], "epochs": int(checkpoint.meta["epoch"]) + 1, "seed": args.get("seed")}


def load_backbone(checkpoint: Checkpoint, arch: str, source: DataSource, data_spec: DataSpec,
                  request: ExtractRequest, device: torch.device) -> Backbone:
    """The network with the checkpoint's weights on ``device``, its classifier and transform."""
    resize, crop = data_spec.options.get("resize"), data_spec.options.get("crop")
    if arch.startswith(TIMM):
        return timm_backbone(arch, checkpoint, resize, crop, device)
    if arch.startswith(OPEN_CLIP):
        zeroshot = zeroshot_inputs(source.class_names, source.num_classes, request.class_names,
                                   request.templates) if request.zeroshot_head else None
        return open_clip_backbone(arch, checkpoint, resize, crop, zeroshot, device)
    model = load_model(checkpoint, arch, max(checkpoint.num_classes or 0, source.num_classes)).to(device)
    return Backbone(model, model.forward_features, get_arch(arch).feature_dim, checkpoint.num_classes,
                    (lambda: checkpoint.classifier) if checkpoint.num_classes else None,
                    "fc" if checkpoint.num_classes else "none: the checkpoint has no fc layer",
                    channels=model_channels(arch, source.channels))


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


def _extract_splits(run: _Extraction, entry: EntryWriter, todo: list[str]) -> None:
    from tqdm.auto import tqdm

    request, backbone, dist = run.request, run.backbone, run.dist
    if backbone.num_classes is not None and entry.takes_classifier:
        entry.write_classifier(*backbone.classifier())
    total = sum(len(run.source.split(s)) * run.views_of(s) for s in todo)
    with tqdm(total=total, unit="img", desc="extract", disable=not (request.progress and dist.is_main),
              dynamic_ncols=True, leave=False) as run.bar, \
            _ShardWriter(max_bytes=request.shard_rows * backbone.feature_dim * 4) as background:
        for name in todo:
            samples = run.source.split(name)
            views = run.views_of(name)
            split = entry.split_writer(name, rows=len(samples) * views, dim=backbone.feature_dim,
                                       dtype=request.dtype, shard_rows=request.shard_rows,
                                       compression=request.compression, views=views)
            mine = [i for i in range(split.num_shards) if i % dist.world_size == dist.rank]
            pending = [i for i in mine if not split.shard_is_complete(i)]
            run.bar.update(sum(split.rows_in_shard(i) for i in mine if i not in pending) * dist.world_size)
            writes = []
            for index in pending:
                start, stop = split.shard_range(index)
                features, labels, ids = _forward_rows(run, samples, start, stop)
                if not request.allow_nonfinite and not np.isfinite(features).all():
                    bad = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0]) + start
                    raise FeatcacheError(f"non-finite features in split {name!r} (row {bad}) from checkpoint "
                                         f"{run.checkpoint.path}; --allow-nonfinite stores them anyway")
                writes.append(background.submit(split.write_shard, index, features, labels, ids,
                                                nbytes=features.nbytes))
            counts = samples.class_counts(run.num_classes)
            extra = {"view_transform": run.view_transform[1], "view_seed": request.view_seed} if views > 1 else None
            if dist.world_size == 1:  # commit the split behind the next split's forward pass
                background.submit(_finish_after, writes, split, counts, extra)
            else:  # every rank's shards are written before rank 0 commits the split
                background.drain()
                dist.barrier()
                if dist.is_main:
                    split.finish(counts, extra)
                dist.barrier()


class _ShardWriter:
    """One background thread that writes (hashes, fsyncs) shards and commits splits in submission
    order, overlapped with the forward pass. The features it holds (queued or being written) stay
    within ``max_bytes`` (one full shard: with the shard being computed, memory holds two shards,
    as a plain double buffer would), so small splits overlap too. A task's error is raised in the
    caller by a later ``submit``, ``drain`` or the exit of the ``with`` block; from the first error
    on, no queued or later task runs (a later split is never committed after a failed one)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.tasks: collections.deque[tuple[Future, int]] = collections.deque()
        self.held = 0
        self.failed: BaseException | None = None

    def _run(self, fn, *args):
        if self.failed is not None:  # an earlier task failed: do nothing more
            raise _Skipped()
        try:
            return fn(*args)
        except BaseException as exc:
            self.failed = exc
            raise

    def submit(self, fn, *args, nbytes: int = 0) -> Future:
        if self.failed is not None:
            self.drain()
        while self.tasks and self.held + nbytes > self.max_bytes:
            self._wait_oldest()
        task = self.pool.submit(self._run, fn, *args)
        self.tasks.append((task, nbytes))
        self.held += nbytes
        return task

    def _wait_oldest(self) -> None:
        task, nbytes = self.tasks.popleft()
        self.held -= nbytes
        try:
            task.result()
        except _Skipped:
            if self.failed is not None:
                raise self.failed from None
            raise

    def drain(self) -> None:
        while self.tasks:
            self._wait_oldest()
        if self.failed is not None:
            raise self.failed

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.drain()
        finally:  # tasks queued before an error of the caller's still run (they were asked for first)
            self.pool.shutdown(wait=True)


class _Skipped(Exception):
    """A background task not run because an earlier one failed."""


def _finish_after(writes: list[Future], split, counts: np.ndarray, extra: dict | None) -> None:
    """Commit ``split`` once its shard writes (earlier tasks of the same thread) have succeeded.

    A failed write raises here (the split is not committed) and leaves the thread's later tasks to
    run only as far as :meth:`_ShardWriter.submit` lets them: the writer stops at its first error,
    so no later split is committed after an earlier one failed (docs/reliability.md)."""
    for write in writes:
        write.result()
    split.finish(counts, extra)


def _forward_rows(run: _Extraction, samples, start: int, stop: int):
    """Features of the view-major rows [start, stop): row v * N + i is view v of sample i. Each view's
    part is its own pass; view 0 runs exactly as a single-view extraction (same batches)."""
    n = len(samples)
    parts = []
    for view in range(start // n, (stop - 1) // n + 1):
        first, last = max(start, view * n) - view * n, min(stop, (view + 1) * n) - view * n
        augment = ViewAugment(run.view_transform[0], run.request.view_seed, view) if view else None
        parts.append(_forward(run, samples, np.arange(first, last), augment))
    return tuple(np.concatenate(arrays) for arrays in zip(*parts)) if len(parts) > 1 else parts[0]


@torch.no_grad()
def _forward(run: _Extraction, samples, rows, view=None):
    backbone, request = run.backbone, run.request
    chunks, labels, ids = [], [], []
    for images, batch_labels, batch_ids in iterate_batches(run.source, samples, rows, request.batch_size,
                                                           channels=backbone.channels,
                                                           num_workers=request.num_workers,
                                                           transform=backbone.transform, view=view):
        features = backbone.features(images.to(run.device, non_blocking=True))
        chunks.append(features.float().cpu().numpy())
        labels.append(batch_labels.numpy())
        ids.append(batch_ids.numpy())
        run.bar.update(len(batch_labels) * run.dist.world_size)
    return np.concatenate(chunks), np.concatenate(labels), np.concatenate(ids)
