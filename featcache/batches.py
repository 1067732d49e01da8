"""Turning split samples into normalised image batches.

In-memory data sets (digits, MNIST, Fashion-MNIST, CIFAR) are batched with tensor indexing and
vectorised augmentation, no per-sample Python; file data sets go through a DataLoader with workers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import DataSource, SplitSamples
from .errors import FeatcacheError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Transform = tuple[Callable, int]  # (RGB PIL image -> tensor, output side), e.g. timm's or open_clip's

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


def resolve_view_transform(source: DataSource, name: str) -> tuple[str, str]:
    """The --train-transform to use for ``source`` (``default``: the data set's own training
    augmentation; the official classifier-balancing one for image files) and its description."""
    array = any(samples.images is not None for samples in source.splits.values())
    if name == "default":
        name = "official" if not array else source.augment
        if name == "none":
            raise FeatcacheError(f"data set {source.name!r} has no training augmentation; choose one for the "
                                 f"views with --train-transform {' / '.join(ARRAY_VIEW_TRANSFORMS)}")
    allowed = ARRAY_VIEW_TRANSFORMS if array else FILE_VIEW_TRANSFORMS
    if name not in allowed:
        raise FeatcacheError(f"--train-transform {name!r} does not apply to data set {source.name!r}; "
                             f"choose default, {', '.join(allowed)}")
    normalize = f"Normalize({source.mean},{source.std})"
    if array:
        steps = {"flip": "RandomHorizontalFlip", "crop": f"RandomCrop(pad={_crop_padding(source)})",
                 "crop-flip": f"RandomCrop(pad={_crop_padding(source)}),RandomHorizontalFlip"}[name]
        return name, f"ToTensor,{normalize},{steps}"
    steps = {"official": f"RandomResizedCrop({source.image_size}),RandomHorizontalFlip,ColorJitter(0.4,0.4,0.4,0)",
             "rrc-flip": f"RandomResizedCrop({source.image_size}),RandomHorizontalFlip",
             "flip": f"Resize({source.resize}),CenterCrop({source.image_size}),RandomHorizontalFlip"}[name]
    return name, f"{steps},ToTensor,{normalize}"


def _crop_padding(source: DataSource) -> int:
    return 4 if source.image_size >= 28 else 1


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
                    generator: torch.Generator | None = None, transform: Transform | None = None,
                    view: ViewAugment | None = None) -> Iterator[Batch]:
    """Yield ``(images, labels, ids)`` for the rows ``order`` of ``samples``, in that order.

    ``channels`` is what the backbone expects (gray images are repeated to 3 channels). ``transform``
    replaces the data set's own (and its augmentation): every image goes through it as RGB. ``view``
    gives every image its deterministic augmented view instead of the eval transform."""
    order = np.asarray(order, dtype=np.int64)
    if view is not None and transform is not None:
        raise FeatcacheError("augmented views need the data set's own transforms, not a library's")
    if samples.images is not None and transform is not None:
        yield from _array_batches_transformed(samples, order, batch_size, transform[0])
    elif samples.images is not None:
        yield from _array_batches(source, samples, order, batch_size, augment, channels, generator, view)
    else:
        yield from _file_batches(source, samples, order, batch_size, augment, num_workers, transform, view)


def _array_batches_transformed(samples, order, batch_size, transform):
    from PIL import Image
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        x = torch.stack([transform(Image.fromarray(samples.images[row]).convert("RGB")) for row in rows])
        yield x, torch.from_numpy(samples.labels[rows]), torch.from_numpy(samples.ids[rows])


def _array_batches(source, samples, order, batch_size, augment, channels, generator, view=None):
    mean = torch.tensor(source.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(source.std, dtype=torch.float32).view(1, -1, 1, 1)
    images = torch.from_numpy(samples.images)
    labels = torch.from_numpy(samples.labels)
    ids = torch.from_numpy(samples.ids)
    for start in range(0, len(order), batch_size):
        rows = torch.from_numpy(order[start:start + batch_size])
        x = images[rows].float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = (x - mean) / std
        if view is not None:
            x = _array_view(x, samples.ids[rows.numpy()], view, _crop_padding(source))
        if augment and source.augment in ("crop", "crop-flip"):
            x = random_crop(x, padding=4 if source.image_size >= 28 else 1, generator=generator)
        if augment and source.augment in ("flip", "crop-flip"):
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if channels and x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        yield x.contiguous(), labels[rows], ids[rows]


def _array_view(x: torch.Tensor, ids: np.ndarray, view: ViewAugment, padding: int) -> torch.Tensor:
    """The training augmentation ``view.name`` of a normalised batch, drawn by :func:`view_uniforms`."""
    u = torch.from_numpy(view_uniforms(view.seed, ids, view.view, 3))
    if "crop" in view.name:
        offsets = (u[:, :2] * (2 * padding + 1)).long().clamp_(max=2 * padding)
        x = crop_at(x, padding, offsets[:, 0], offsets[:, 1])
    if "flip" in view.name:
        x = torch.where((u[:, 2] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    return x


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and take one random crop of the original size per image."""
    dy = torch.randint(0, 2 * padding + 1, (len(x),), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (len(x),), generator=generator)
    return crop_at(x, padding, dy, dx)


def crop_at(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop image i at offset (dy[i], dx[i]) to the original size."""
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(batch)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                  rows, cols]


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, source: DataSource, samples: SplitSamples, augment: bool, transform: Transform | None = None,
                 view: ViewAugment | None = None):
        from torchvision import transforms
        self.paths, self.labels, self.ids, self.view = samples.paths, samples.labels, samples.ids, view
        if transform is not None:
            self.transform, self.size = transform
            return
        normalize = transforms.Normalize(source.mean, source.std)
        if view is not None:
            steps = {"official": [transforms.RandomResizedCrop(source.image_size), transforms.RandomHorizontalFlip(),
                                  transforms.ColorJitter(0.4, 0.4, 0.4, 0)],
                     "rrc-flip": [transforms.RandomResizedCrop(source.image_size), transforms.RandomHorizontalFlip()],
                     "flip": [transforms.Resize(source.resize), transforms.CenterCrop(source.image_size),
                              transforms.RandomHorizontalFlip()]}[view.name]
        elif augment:
            steps = [transforms.RandomResizedCrop(source.image_size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(source.resize), transforms.CenterCrop(source.image_size)]
        self.transform = transforms.Compose(steps + [transforms.ToTensor(), normalize])
        self.size = source.image_size

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


def _file_batches(source, samples, order, batch_size, augment, num_workers, transform=None, view=None):
    dataset = _FileDataset(source, samples, augment, transform, view)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available())
    for images, labels, ids, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise FeatcacheError(f"cannot decode image {bad[0]} (--on-bad-image skip leaves such images out)")
        yield images, labels, ids
