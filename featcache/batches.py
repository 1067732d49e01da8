"""Turning split samples into normalised image batches.

In-memory data sets (digits, MNIST, Fashion-MNIST, CIFAR) are batched with tensor indexing and
vectorised augmentation, no per-sample Python; file data sets go through a DataLoader with workers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .datasets import DataSource, SplitSamples
from .errors import FeatcacheError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Transform = tuple[Callable, int]  # (RGB PIL image -> tensor, output side), e.g. timm's or open_clip's


def iterate_batches(source: DataSource, samples: SplitSamples, order: np.ndarray, batch_size: int, *,
                    augment: bool = False, channels: int | None = None, num_workers: int = 0,
                    generator: torch.Generator | None = None, transform: Transform | None = None) -> Iterator[Batch]:
    """Yield ``(images, labels, ids)`` for the rows ``order`` of ``samples``, in that order.

    ``channels`` is what the backbone expects (gray images are repeated to 3 channels). ``transform``
    replaces the data set's own (and its augmentation): every image goes through it as RGB."""
    order = np.asarray(order, dtype=np.int64)
    if samples.images is not None and transform is not None:
        yield from _array_batches_transformed(samples, order, batch_size, transform[0])
    elif samples.images is not None:
        yield from _array_batches(source, samples, order, batch_size, augment, channels, generator)
    else:
        yield from _file_batches(source, samples, order, batch_size, augment, num_workers, transform)


def _array_batches_transformed(samples, order, batch_size, transform):
    from PIL import Image
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        x = torch.stack([transform(Image.fromarray(samples.images[row]).convert("RGB")) for row in rows])
        yield x, torch.from_numpy(samples.labels[rows]), torch.from_numpy(samples.ids[rows])


def _array_batches(source, samples, order, batch_size, augment, channels, generator):
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
        if augment and source.augment in ("crop", "crop-flip"):
            x = random_crop(x, padding=4 if source.image_size >= 28 else 1, generator=generator)
        if augment and source.augment in ("flip", "crop-flip"):
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if channels and x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        yield x.contiguous(), labels[rows], ids[rows]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and take one random crop of the original size per image."""
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(batch)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                  rows, cols]


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, source: DataSource, samples: SplitSamples, augment: bool, transform: Transform | None = None):
        from torchvision import transforms
        self.paths, self.labels, self.ids = samples.paths, samples.labels, samples.ids
        if transform is not None:
            self.transform, self.size = transform
            return
        normalize = transforms.Normalize(source.mean, source.std)
        if augment:
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
                tensor = self.transform(image.convert("RGB"))
            error = ""
        except (OSError, ValueError, SyntaxError) as exc:
            tensor, error = torch.zeros(3, self.size, self.size), f"{self.paths[index]}: {exc}"
        return tensor, int(self.labels[index]), int(self.ids[index]), error


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


def _file_batches(source, samples, order, batch_size, augment, num_workers, transform=None):
    dataset = _FileDataset(source, samples, augment, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available())
    for images, labels, ids, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise FeatcacheError(f"cannot decode image {bad[0]} (--on-bad-image skip leaves such images out)")
        yield images, labels, ids
