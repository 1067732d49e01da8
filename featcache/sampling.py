"""Class-sampling strategies shared by Stage 1 and Stage 2 (Kang et al. 2020, Sec. 3).

p_j ∝ n_j^q: q = 1 instance-balanced, q = 0 class-balanced, q = 1/2 square-root;
progressively-balanced: p(t) = (1 - t/T) p_IB + (t/T) p_CB at epoch t of T.
Draws are vectorised index arithmetic (a per-class offset table), reproducible from a generator.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import FeatcacheError

SAMPLERS = ("instance", "class", "sqrt", "progressive")
_EXPONENT = {"instance": 1.0, "class": 0.0, "sqrt": 0.5}


def class_probabilities(counts, sampler: str, epoch: int = 0, epochs: int = 1) -> np.ndarray:
    """The probability of drawing each class in ``epoch`` (0-based) of ``epochs``."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise FeatcacheError("cannot sample: every class has zero training samples")
    if sampler == "progressive":
        t = epoch / max(1, epochs)
        return (1 - t) * class_probabilities(counts, "instance") + t * class_probabilities(counts, "class")
    if sampler not in _EXPONENT:
        raise FeatcacheError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    weights = np.zeros_like(counts)
    weights[present] = counts[present] ** _EXPONENT[sampler]
    return weights / weights.sum()


class ClassSampler:
    """Draws sample indices: a class from p, then a uniform sample of that class."""

    def __init__(self, labels, num_classes: int, device: torch.device | str = "cpu"):
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.order = torch.argsort(labels, stable=True).to(device)
        self.counts = torch.bincount(labels, minlength=num_classes).to(device)
        self.starts = (torch.cumsum(self.counts, 0) - self.counts).to(device)
        self.device = torch.device(device)

    def draw(self, probabilities: np.ndarray, num_draws: int, generator: torch.Generator) -> torch.Tensor:
        probs = torch.as_tensor(probabilities, dtype=torch.float64)
        classes = torch.multinomial(probs, num_draws, replacement=True, generator=generator).to(self.device)
        offsets = (torch.rand(num_draws, generator=generator, dtype=torch.float64).to(self.device)
                   * self.counts[classes]).long()
        return self.order[self.starts[classes] + offsets]
