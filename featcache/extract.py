"""``featcache extract``: run a backbone in eval mode over a data set's splits and store the pooled
penultimate features in the cache. Identical requests are hits; interrupted ones resume shard by
shard; under ``torchrun`` each rank writes its own shards and rank 0 writes the manifest. A hit
builds no model: the key of a request whose inputs (checkpoint bytes, arch, data, options, library
versions) were seen before is read from the cache root's request index.

Backbones are this project's (``featcache archs``) or delegated to timm / open_clip
(``timm/NAME``, ``open_clip/MODEL``; see foundation.py), with the library's own eval transform."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import platform
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import build_model, get_arch, model_channels
from .batches import ViewAugment, iterate_batches, resolve_view_transform
from .checkpoints import (HF_HUB_PREFIX, RANDOM_FORMAT, Checkpoint, initialising, library_versions, load_checkpoint,
                          load_model, resolve_hf_hub)
from .datasets import DataSource, DataSpec
from .distributed import Dist, resolve_device
from .errors import FeatcacheError
from .foundation import (OPEN_CLIP, TIMM, Backbone, ZeroShot, is_foundation, open_clip_backbone, timm_backbone,
                         zeroshot_inputs)
from .store import MANIFEST, EntryWriter, FeatureCache, atomic_write_text, cache_root, content_key, writing
from .store.format import looks_like_key

DEFAULT_SPLITS = ("train", "val", "test")
VIEWS_SPLIT = "train"  # the split that gets --views K views per sample; the others keep one
REQUESTS_DIR = ".requests"  # under the cache root: one file per request key, holding its entry's key


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


@dataclass
class _Extraction:
    """One extraction's state, shared by the functions that run it; ``backbone`` is loaded only
    when the request is not a known hit."""

    request: ExtractRequest
    checkpoint: Checkpoint
    arch: str
    data_spec: DataSpec
    source: DataSource
    splits: list[str]
    dist: Dist
    device: torch.device
    view_transform: tuple[str, str] | None  # (name, description) of views 1..K-1; None: one view
    zeroshot: ZeroShot | None
    backbone: Backbone | None = None
    foreign_head: int | None = None  # the classes of a head that does not fit the data set (not stored)
    bar: object = None  # the progress bar, while splits are extracted

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def views_of(self, split: str) -> int:
        return self.request.views if self.view_transform and split == VIEWS_SPLIT else 1


def extract(request: ExtractRequest) -> Path:
    """Return the entry directory holding every requested split, computing only what is missing.

    A hit (every split already there) says so on stderr; an entry whose files fail their check is
    refused with the ``featcache rm`` hint, never returned."""
    run = _prepare(request)
    root, dist = cache_root(request.cache_dir), run.dist
    request_key = content_key({"request": _request_identity(run)})
    if dist.world_size == 1:
        known = _known_hit(root, request_key, run.splits, request.name)
        if known is not None:
            return known
    _load(run)
    identity = _identity(run)
    key = content_key(identity)
    _refuse_damaged(root / key, run.splits)
    # One process: a hit (every split already in the manifest) is found before locking, so a
    # complete entry under a read-only cache root reads. Under torchrun every rank locks-or-waits the
    # same way (a rank must not skip the barriers because it alone saw the manifest complete).
    needs = run.splits if dist.world_size == 1 else None
    with writing(root, key, _base_meta(run, identity), name=request.name, coordinator=dist.is_main,
                 needs=needs) as entry:
        todo = []
        if not entry.read_only:
            dist.barrier()
            todo = [s for s in run.splits if s not in entry.complete_splits()]
            dist.barrier()
        if todo:
            if request.on_bad_image == "skip":
                _skip_undecodable(run.source, todo)
            _extract_splits(run, entry, todo)
            if run.foreign_head is not None and dist.is_main:
                print(f"warning: {run.checkpoint.path} ({run.arch}) has a {run.foreign_head}-class head but data set "
                      f"{run.source.name!r} has {run.num_classes} classes: the entry stores no classifier (joint / "
                      "tau / lws need one; ncm, crt, knn do not)", file=sys.stderr, flush=True)
        elif dist.is_main:
            _say_hit(entry.path)
    if dist.is_main:
        _remember(root, request_key, key)
    return entry.path


def _identity(run: _Extraction) -> dict:
    """What the entry's key hashes (the backbone loaded)."""
    request, backbone = run.request, run.backbone
    identity = {"checkpoint_sha256": run.checkpoint.sha256, "arch": run.arch, "data": run.source.identity,
                "transform": backbone.transform_description or run.source.transform_description,
                "dtype": request.dtype, **backbone.key}
    if run.view_transform:
        identity["views"] = {"count": request.views, "train_transform": run.view_transform[1],
                             "seed": request.view_seed, "split": VIEWS_SPLIT}
    if request.on_bad_image == "skip":
        identity["on_bad_image"] = "skip"
    if run.foreign_head is not None:  # its entries once stored the head: a new key, not their old content
        identity["foreign_head_classes"] = run.foreign_head
    return identity


def _request_identity(run: _Extraction) -> dict:
    """Every input the entry's key is a function of, known without building the model: the request
    key names the entry in the request index (an input left out would be a wrong hit)."""
    request = run.request
    zeroshot = dataclasses.asdict(run.zeroshot) if run.zeroshot else None
    return {"checkpoint_sha256": run.checkpoint.sha256, "arch": run.arch, "data": run.source.identity,
            "data_options": run.data_spec.options, "data_transform": run.source.transform_description,
            "data_classes": run.source.num_classes, "dtype": request.dtype, "views": request.views,
            "train_transform": request.train_transform, "view_seed": request.view_seed,
            "on_bad_image": request.on_bad_image, "zeroshot": zeroshot, "featcache": __version__,
            "libraries": library_versions()}


def _known_hit(root: Path, request_key: str, splits: list[str], name: str | None) -> Path | None:
    """The entry a request seen before made, when it holds every split (and the name asked for)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        key = (root / REQUESTS_DIR / request_key).read_text().strip()
        if looks_like_key(key) and (root / key / MANIFEST).is_file():
            _refuse_damaged(root / key, splits)
            meta = FeatureCache.open(root / key).meta
            if all(s in meta["splits"] for s in splits) and name in (None, meta.get("name")):
                _say_hit(root / key)
                return root / key
    return None


def _remember(root: Path, request_key: str, key: str) -> None:
    """Index the request's entry; a cache root that cannot be written only loses the shortcut."""
    with contextlib.suppress(OSError, FeatcacheError):
        (root / REQUESTS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / REQUESTS_DIR / request_key, key + "\n")


def _refuse_damaged(path: Path, splits: list[str]) -> None:
    """Refuse an entry whose manifest, or a file of one of ``splits`` or its classifier, fails the
    check every read makes: a damaged entry is never a hit."""
    if not (path / MANIFEST).is_file():
        return
    try:
        cache = FeatureCache.open(path)
        problem = cache.check_files([s for s in splits if s in cache.splits])
    except FeatcacheError as exc:
        problem = str(exc)
    if problem:
        raise FeatcacheError(f"cache entry {path.name} is damaged: {problem}; remove it with "
                             f"`featcache rm {path.name}`, then extract again")


def _say_hit(path: Path) -> None:
    print(f"cache hit: {path.name} ({path})", file=sys.stderr, flush=True)


def _prepare(request: ExtractRequest) -> _Extraction:
    """Check the request, load the checkpoint and the data set (not the backbone: see :func:`_load`)."""
    dist = Dist.from_env()
    ckpt = request.ckpt
    if str(ckpt).startswith(HF_HUB_PREFIX) and (request.arch or "").startswith(OPEN_CLIP):
        ckpt = resolve_hf_hub(str(ckpt), "open_clip")
    checkpoint = load_checkpoint(ckpt, trust_checkpoint=request.trust_checkpoint)
    arch = request.arch or checkpoint.arch
    if not arch and checkpoint.format == RANDOM_FORMAT:
        raise FeatcacheError(f"--ckpt {request.ckpt} needs --arch: the architecture to initialise randomly")
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
    if (not is_foundation(arch) and checkpoint.format != RANDOM_FORMAT
            and checkpoint.in_channels < source.channels):
        raise FeatcacheError(f"checkpoint {checkpoint.path} takes {checkpoint.in_channels}-channel (grayscale) images; "
                             f"data set {source.name!r} has {source.channels}-channel images")
    device = dist.device(resolve_device(request.device))
    view_transform = _view_transform(request, source, arch)
    if view_transform and VIEWS_SPLIT not in splits:
        raise FeatcacheError(f"--views {request.views} applies to the {VIEWS_SPLIT!r} split; add it to --split "
                             f"(asked for: {', '.join(splits)})")
    zeroshot = zeroshot_inputs(source.class_names, source.num_classes, request.class_names,
                               request.templates) if request.zeroshot_head else None
    return _Extraction(request, checkpoint, arch, data_spec, source, splits, dist, device, view_transform, zeroshot)


def _load(run: _Extraction) -> None:
    """Load the backbone. A head with more classes than the data set's is not kept (a warning follows
    the extraction): the entry has no classifier, and the methods that need none work. A head too
    small for the split's labels is refused."""
    backbone = load_backbone(run.checkpoint, run.arch, run.source, run.data_spec, run.zeroshot, run.device)
    classes, wanted = backbone.num_classes, run.source.num_classes
    for name in run.splits if classes is not None else ():  # a head too small for the labels: wrong data
        labels = run.source.split(name).labels
        if labels.max() >= classes:
            raise FeatcacheError(f"split {name!r} has label {int(labels.max())}, out of range for the "
                                 f"{classes}-class classifier in {run.checkpoint.path}")
    if classes is not None and classes != wanted:
        note = f"none: the checkpoint's head has {classes} classes, the data set {wanted}"
        backbone = dataclasses.replace(backbone, num_classes=None, classifier=None, head=note,
                                       meta={**backbone.meta, "head": note})
        run.foreign_head = classes
    run.backbone = backbone


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


def _view_transform(request: ExtractRequest, source: DataSource, arch: str) -> tuple[str, str] | None:
    """(name, description) of the augmentation of views 1..K-1, or None for one view."""
    if not isinstance(request.views, int) or request.views < 1:
        raise FeatcacheError(f"--views {request.views!r}: give a positive number of views per training image")
    if request.view_seed < 0:
        raise FeatcacheError(f"--view-seed {request.view_seed}: give a non-negative seed")
    if request.views == 1:
        return None
    if is_foundation(arch):
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
                  zeroshot: ZeroShot | None, device: torch.device) -> Backbone:
    """The network with the checkpoint's weights on ``device``, its classifier and transform."""
    resize, crop = data_spec.options.get("resize"), data_spec.options.get("crop")
    if arch.startswith(TIMM):
        return timm_backbone(arch, checkpoint, resize, crop, device)
    if arch.startswith(OPEN_CLIP):
        return open_clip_backbone(arch, checkpoint, resize, crop, zeroshot, device)
    channels = model_channels(arch, source.channels)
    if checkpoint.format == RANDOM_FORMAT:
        with initialising(checkpoint):
            model = build_model(arch, source.num_classes, channels).eval().to(device)
        return Backbone(model, model.forward_features, get_arch(arch).feature_dim, None, None,
                        "none: random-init weights (--ckpt random)", channels=channels)
    model = load_model(checkpoint, arch, max(checkpoint.num_classes or 0, source.num_classes)).to(device)
    return Backbone(model, model.forward_features, get_arch(arch).feature_dim, checkpoint.num_classes,
                    (lambda: checkpoint.classifier) if checkpoint.num_classes else None,
                    "fc" if checkpoint.num_classes else "none: the checkpoint has no fc layer",
                    channels=channels)


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
            if len(pending) < len(mine) and dist.is_main:
                tqdm.write(f"resuming {len(mine) - len(pending)}/{len(mine)} shards of split {name!r} ({entry.key})",
                           file=sys.stderr)
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


def as_data_spec(data: str | DataSpec | None, root: str | Path | None = None,
                 options: dict | None = None) -> DataSpec | None:
    """``data`` as a :class:`DataSpec`: one given, or a data set's name with its root and options
    (checked when loaded); None stays None (a checkpoint's recorded data set)."""
    if isinstance(data, DataSpec) or data is None:
        if root is not None or options:
            raise FeatcacheError("data_root / data_options go with a data set name, not with "
                                 + ("a DataSpec" if data is not None else "no data"))
        return data
    return DataSpec(str(data), None if root is None else str(root), dict(options or {}))


def extract_features(ckpt: str | Path, data: str | DataSpec | None = None, *, data_root: str | Path | None = None,
                     data_options: dict | None = None, splits: str | list[str] | None = None,
                     **options) -> FeatureCache:
    """``featcache extract`` from Python (also ``featcache.extract_features``). Returns the entry.

    ``data`` is a data set name with ``data_root`` and ``data_options``, or a :class:`DataSpec`
    (default: the data set the checkpoint records); ``splits`` a list or comma string (default
    train, val, test); ``options`` are :class:`ExtractRequest`'s other fields (``arch``, ``dtype``,
    ``views``, ``cache_dir``, ``progress`` ...)::

        import featcache
        entry = featcache.extract_features(ckpt="runs/digits/last.pt", data="digits-lt")
        train = entry.split("train")
    """
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    request = ExtractRequest(ckpt=str(ckpt), data=as_data_spec(data, data_root, data_options),
                             splits=list(splits) if splits else None, **options)
    return FeatureCache.open(extract(request))

