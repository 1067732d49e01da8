"""Turning split samples into normalised image batches.

In-memory data sets (digits, MNIST, Fashion-MNIST, CIFAR) are batched with tensor indexing and
vectorised augmentation, no per-sample Python; file data sets go through a DataLoader with workers.
Both apply a :class:`~featcache.transforms.Transform`, the object whose description the cache key
records, reading its parameters from its steps.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import DataSource, SplitSamples
from .errors import FeatcacheError
from .transforms import (CenterCrop, ColorJitter, Normalize, RandomCrop, RandomHorizontalFlip, RandomResizedCrop,
                         Resize, ToTensor, Transform)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LibraryTransform = tuple[Callable, int]  # (RGB PIL image -> tensor, output side), e.g. timm's or open_clip's

# --train-transform names: array data sets (digits, MNIST, Fashion-MNIST, CIFAR) and file data sets
ARRAY_VIEW_TRANSFORMS = ("flip", "crop", "crop-flip")
FILE_VIEW_TRANSFORMS = ("official", "rrc-flip", "flip")


@dataclass(frozen=True)
class ViewAugment:
    """An augmented view: the training transform ``name`` drawn from (``seed``, sample id, ``view``) alone,
    so a view is the same whatever the batch, shard or worker that computes it."""

    name: str
    seed: int
    view: int

    def crop_offsets(self, ids: np.ndarray, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the (dy, dx) of its crop from the ``padding``-padded image."""
        u = torch.from_numpy(view_uniforms(self.seed, ids, self.view, 3))
        offsets = (u[:, :2] * (2 * padding + 1)).long().clamp_(max=2 * padding)
        return offsets[:, 0], offsets[:, 1]

    def flips(self, ids: np.ndarray) -> torch.Tensor:
        """Per image, whether it is mirrored."""
        return torch.from_numpy(view_uniforms(self.seed, ids, self.view, 3))[:, 2] < 0.5


@dataclass(frozen=True)
class _FreshDraws:
    """Training augmentation's draws, fresh from ``generator`` (torch's global one when None)."""

    generator: torch.Generator | None

    def crop_offsets(self, ids: np.ndarray, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy = torch.randint(0, 2 * padding + 1, (len(ids),), generator=self.generator)
        dx = torch.randint(0, 2 * padding + 1, (len(ids),), generator=self.generator)
        return dy, dx

    def flips(self, ids: np.ndarray) -> torch.Tensor:
        return torch.rand(len(ids), generator=self.generator) < 0.5


def augmented_transform(source: DataSource, name: str) -> Transform:
    """The training transform ``name`` of ``source``: none, flip, crop or crop-flip of the normalised
    tensor for in-memory images (crop: zero padding 4, 1 below 28 pixels), official, rrc-flip or flip
    of the PIL image for image files."""
    if source.in_memory:
        crop = RandomCrop(padding=4 if source.image_size >= 28 else 1)
        random = {"none": (), "flip": (RandomHorizontalFlip(),), "crop": (crop,),
                  "crop-flip": (crop, RandomHorizontalFlip())}[name]
        return Transform((ToTensor(), source.normalize, *random))
    size = source.image_size
    random = {"official": (RandomResizedCrop(size), RandomHorizontalFlip(), ColorJitter(0.4, 0.4, 0.4, 0)),
              "rrc-flip": (RandomResizedCrop(size), RandomHorizontalFlip()),
              "flip": (Resize(source.resize), CenterCrop(size), RandomHorizontalFlip())}[name]
    return Transform((*random, ToTensor(), source.normalize))


def resolve_view_transform(source: DataSource, name: str) -> tuple[str, str]:
    """The --train-transform to use for ``source`` (``default``: the data set's own training
    augmentation; the official classifier-balancing one for image files) and its description."""
    if name == "default":
        name = source.augment if source.in_memory else "official"
        if name == "none":
            raise FeatcacheError(f"data set {source.name!r} has no training augmentation; choose one for the "
                                 f"views with --train-transform {' / '.join(ARRAY_VIEW_TRANSFORMS)}")
    allowed = ARRAY_VIEW_TRANSFORMS if source.in_memory else FILE_VIEW_TRANSFORMS
    if name not in allowed:
        raise FeatcacheError(f"--train-transform {name!r} does not apply to data set {source.name!r}; "
                             f"choose default, {', '.join(allowed)}")
    return name, augmented_transform(source, name).description


def _training_transform(source: DataSource) -> Transform:
    """``augment=True``: the data set's own augmentation (image files: RandomResizedCrop and flip)."""
    return augmented_transform(source, source.augment if source.in_memory else "rrc-flip")


def view_uniforms(seed: int, ids: np.ndarray, view: int, slots: int) -> np.ndarray:
    """Uniform numbers in [0, 1), ``len(ids) x slots``, a pure function of (seed, sample id, view, slot):
    the SplitMix64 finaliser of a counter, vectorised."""
    mask = np.uint64(2**64 - 1)
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.asarray(ids, np.uint64)[:, None] * np.uint64(0xBF58476D1CE4E5B9)
             ^ np.uint64(view & 0xFFFFFFFF) * np.uint64(0x94D049BB133111EB)
             ^ np.arange(1, slots + 1, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93)) & mask
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = ((x ^ (x >> np.uint64(shift))) * np.uint64(factor)) & mask
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def iterate_batches(source: DataSource, samples: SplitSamples, order: np.ndarray, batch_size: int, *,
                    augment: bool = False, channels: int | None = None, num_workers: int = 0,
                    generator: torch.Generator | None = None, transform: LibraryTransform | None = None,
                    view: ViewAugment | None = None) -> Iterator[Batch]:
    """Yield ``(images, labels, ids)`` for the rows ``order`` of ``samples``, in that order.

    ``channels`` is what the backbone expects (gray images are repeated to 3 channels). ``transform``
    replaces the data set's own (and its augmentation): every image goes through it as RGB. ``augment``
    applies the data set's training augmentation, drawn from ``generator``; ``view`` instead gives
    every image its deterministic augmented view."""
    order = np.asarray(order, dtype=np.int64)
    if view is not None and transform is not None:
        raise FeatcacheError("augmented views need the data set's own transforms, not a library's")
    if view is not None and augment:
        raise FeatcacheError("an augmented view is drawn from its seed: give view or augment, not both")
    if transform is not None:
        if samples.images is not None:
            yield from _array_batches_transformed(samples, order, batch_size, transform[0])
        else:
            yield from _file_batches(_FileDataset(samples, *transform), order, batch_size, num_workers)
        return
    own = (augmented_transform(source, view.name) if view is not None
           else _training_transform(source) if augment else source.eval_transform)
    if samples.images is not None:
        yield from _array_batches(samples, order, batch_size, own, view or _FreshDraws(generator), channels)
    else:
        dataset = _FileDataset(samples, own.torchvision(), source.image_size, view)
        yield from _file_batches(dataset, order, batch_size, num_workers)


def _array_batches_transformed(samples, order, batch_size, transform):
    from PIL import Image
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        x = torch.stack([transform(Image.fromarray(samples.images[row]).convert("RGB")) for row in rows])
        yield x, torch.from_numpy(samples.labels[rows]), torch.from_numpy(samples.ids[rows])


def _array_batches(samples, order, batch_size, transform: Transform, draws, channels):
    images = torch.from_numpy(samples.images)
    labels = torch.from_numpy(samples.labels)
    ids = torch.from_numpy(samples.ids)
    for start in range(0, len(order), batch_size):
        rows = torch.from_numpy(order[start:start + batch_size])
        x = _apply_to_arrays(transform, images[rows], samples.ids[rows.numpy()], draws)
        if channels and x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        yield x.contiguous(), labels[rows], ids[rows]


def _apply_to_arrays(transform: Transform, images: torch.Tensor, ids: np.ndarray, draws) -> torch.Tensor:
    """``transform`` on a uint8 batch of in-memory images, step by step; the random steps take their
    draws from ``draws`` (a :class:`ViewAugment` or fresh ones)."""
    x = images
    for step in transform.steps:
        if isinstance(step, ToTensor):
            x = x.float().div_(255.0)
            x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        elif isinstance(step, Normalize):
            mean = torch.tensor(step.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(step.std, dtype=torch.float32).view(1, -1, 1, 1)
            x = (x - mean) / std
        elif isinstance(step, RandomCrop):
            x = crop_at(x, step.padding, *draws.crop_offsets(ids, step.padding))
        elif isinstance(step, RandomHorizontalFlip):
            x = torch.where(draws.flips(ids).view(-1, 1, 1, 1), x.flip(3), x)
        else:
            raise FeatcacheError(f"{step.description} does not apply to in-memory images")
    return x


def crop_at(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop image i at offset (dy[i], dx[i]) to the original size."""
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(batch)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                  rows, cols]


class _FileDataset(torch.utils.data.Dataset):
    """Image files through ``transform`` (RGB PIL image -> tensor of side ``size``); with ``view``, each
    image's random draws are seeded from (seed, sample id, view) alone."""

    def __init__(self, samples: SplitSamples, transform: Callable, size: int, view: ViewAugment | None = None):
        self.paths, self.labels, self.ids = samples.paths, samples.labels, samples.ids
        self.transform, self.size, self.view = transform, size, view

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image
        try:
            with Image.open(self.paths[index]) as image:
                tensor = self._apply(image.convert("RGB"), index)
            error = ""
        except (OSError, ValueError, SyntaxError) as exc:
            tensor, error = torch.zeros(3, self.size, self.size), f"{self.paths[index]}: {exc}"
        return tensor, int(self.labels[index]), int(self.ids[index]), error

    def _apply(self, image, index: int) -> torch.Tensor:
        if self.view is None:
            return self.transform(image)
        # torchvision draws from torch's global generator: seed it from (seed, sample, view) alone
        seed = int(view_uniforms(self.view.seed, self.ids[index:index + 1], self.view.view, 1)[0, 0] * 2**53)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


def drop_undecodable(samples: SplitSamples) -> tuple[SplitSamples, list[str]]:
    """The split without the images PIL cannot decode, and the messages naming them."""
    from PIL import Image
    keep, bad = [], []
    for row, path in enumerate(samples.paths):
        try:
            with Image.open(path) as image:
                image.load()
            keep.append(row)
        except (OSError, ValueError, SyntaxError) as exc:
            bad.append(f"{path}: {exc}")
    keep = np.asarray(keep, dtype=np.int64)
    return SplitSamples(samples.name, samples.labels[keep], samples.ids[keep],
                        paths=[samples.paths[i] for i in keep]), bad


def _file_batches(dataset: _FileDataset, order, batch_size, num_workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available())
    for images, labels, ids, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise FeatcacheError(f"cannot decode image {bad[0]} (--on-bad-image skip leaves such images out)")
        yield images, labels, ids
