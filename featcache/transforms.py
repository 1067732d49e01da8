"""The image transforms of this project's data sets, as values.

Each step is a frozen dataclass: its fields are what the batching code applies
(featcache/batches.py reads mean / std, padding and sizes from them) and its ``description``, which
the cache key records, is written from the same fields. A changed parameter therefore changes the
key; it cannot leave an entry of the old transform behind under the new one's name.

Examples
--------
>>> Transform((ToTensor(), Normalize((0.5,), (0.25,)), RandomCrop(padding=4))).description
'ToTensor,Normalize((0.5,),(0.25,)),RandomCrop(pad=4)'
"""
from __future__ import annotations

from dataclasses import astuple, dataclass


class Step:
    """One transform step. Its description is the class name and its fields' values (the names
    and order torchvision's constructors take), e.g. ``Resize(256)``; a step without fields is its
    bare name. ``torchvision()`` builds the torchvision transform of the same name."""

    @property
    def description(self) -> str:
        values = astuple(self)
        name = type(self).__name__
        return f"{name}({','.join(map(str, values))})" if values else name

    def torchvision(self):
        from torchvision import transforms
        return getattr(transforms, type(self).__name__)(*astuple(self))


@dataclass(frozen=True)
class SizedStep(Step):
    """A step with one parameter, the output ``size`` in pixels."""

    size: int


class Resize(SizedStep):
    """Resize the shorter side of an image to ``size`` pixels."""


class CenterCrop(SizedStep):
    """The central ``size`` x ``size`` square."""


class RandomResizedCrop(SizedStep):
    """A random crop of random area and aspect ratio, resized to ``size`` x ``size``."""


@dataclass(frozen=True)
class ColorJitter(Step):
    """Random brightness, contrast, saturation and hue changes of these strengths."""

    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class ToTensor(Step):
    """uint8 pixels to a float C x H x W tensor in [0, 1]."""


@dataclass(frozen=True)
class Normalize(Step):
    """Per-channel ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class RandomCrop(Step):
    """Zero-pad a normalised image by ``padding`` and take a random crop of its original size
    (applied to tensors by featcache/batches.py; image files use RandomResizedCrop)."""

    padding: int

    @property
    def description(self) -> str:
        return f"RandomCrop(pad={self.padding})"


@dataclass(frozen=True)
class RandomHorizontalFlip(Step):
    """Mirror the image left-right with probability 1/2."""


@dataclass(frozen=True)
class Transform:
    """Steps applied in order; ``description`` is what the cache key records of them."""

    steps: tuple

    @property
    def description(self) -> str:
        return ",".join(step.description for step in self.steps)

    def torchvision(self):
        """The steps as one torchvision transform of a PIL image (image files)."""
        from torchvision import transforms
        return transforms.Compose([step.torchvision() for step in self.steps])
