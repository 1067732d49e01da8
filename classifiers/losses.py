"""The classification losses of the cRT family, with hand-written gradients.

Each loss sees the head's logits z (B x C) with its training-time ``offset`` already added
(logit adjustment folds τ·log n_j into the bias, so a step costs its matmuls only) and returns
``grad`` = B · dL/dz, L the batch loss; callers divide their parameter gradients by B. n_j are
the training counts, π_j = n_j / N, p = softmax of the logits the loss applies the softmax to.

- ``ce``: L = mean_i −log p_{y_i}.
- ``logit_adjusted`` (Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021):
  cross-entropy of z + τ·log π. Implemented as z + τ·log n_j: the constant τ·log N cancels in
  the softmax, and at τ = 1 it is the balanced softmax of Ren et al. (NeurIPS 2020) bit for bit.
- ``class_balanced`` (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
  CVPR 2019): w_j = (1 − β) / (1 − β^{n_j}), normalised to sum C; L = (1/B) Σ_i w_{y_i} ℓ_i with
  ℓ_i = −log p_{y_i}, or the softmax focal form ℓ_i = −(1 − p_{y_i})^γ log p_{y_i} for γ > 0.
- ``ldam`` (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
  NeurIPS 2019): m_j ∝ n_j^{−1/4} with max_j m_j = ``max_margin``; L = cross-entropy of
  s·(z − m_{y_i} e_{y_i}); from epoch ``drw_epoch`` on (deferred re-weighting) weighted by the
  class-balanced w_j (β = ``beta``), reduced as PyTorch's weighted mean Σ w ℓ / Σ w like the
  official code.
- ``label_aware_smoothing`` (Zhong et al., "Improving Calibration for Long-Tailed Recognition"
  (MiSLAS), CVPR 2021): ε_j = ε_tail + (ε_head − ε_tail)·sin(π (n_j − n_min) / (2 (n_max − n_min)))
  (the paper's concave form; all ε_head when every n_j is equal);
  L = mean_i (1 − ε_{y_i})(−log p_{y_i}) + ε_{y_i}·mean_k(−log p_k), the official code's form.
- ``grw`` (generalised re-weighting, Zhang et al., "Distribution Alignment", CVPR 2021):
  w_j ∝ (1/π_j)^ρ normalised to sum C, weighted mean Σ w ℓ / Σ w."""
from __future__ import annotations

import math

import numpy as np
import torch

from .params import Int, Options, Real
from .training import softmax_minus_onehot

LOSSES = ("ce", "logit_adjusted", "class_balanced", "ldam", "label_aware_smoothing", "grw")
LOSS_PARAMS = {"ce": (), "logit_adjusted": ("tau",), "class_balanced": ("beta", "gamma"),
               "ldam": ("max_margin", "s", "drw_epoch", "beta"), "label_aware_smoothing": ("smooth_head", "smooth_tail"),
               "grw": ("rho",)}
LOSS_CONSTRAINTS = {
    "loss": [Options(*LOSSES)], "tau": [Real()], "beta": [Real(0, 1, closed="left")], "gamma": [Real(0)],
    "max_margin": [Real(0)], "s": [Real(0, closed="neither")], "drw_epoch": [Int(0)],
    "smooth_head": [Real(0, 1)], "smooth_tail": [Real(0, 1)], "rho": [Real(0)]}


def class_balanced_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """(1 − β) / (1 − β^{n_j}) normalised to sum C (Cui et al. 2019, Eq. 4)."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts)) if beta > 0 else np.ones_like(counts)
    return weights / weights.sum() * len(counts)


class Loss:
    """Cross-entropy; subclasses change the logits, the targets or the weights."""

    offset: torch.Tensor | None = None  # added to the logits during training only

    def __init__(self, counts: np.ndarray, device: torch.device):
        self.num_classes = len(counts)

    def grad(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return softmax_minus_onehot(logits, targets)

    def value(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return _nll(logits, targets).mean()


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _weighted_mean_grad(g: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor, divisor) -> torch.Tensor:
    """Rows of B · d(Σ_i w_i ℓ_i / divisor)/dz from the per-row dℓ_i/dz in ``g``."""
    row_weights = weights.index_select(0, targets)
    return g.mul_((row_weights * (len(targets) / divisor(row_weights))).unsqueeze(1))


class LogitAdjusted(Loss):
    def __init__(self, counts, device, tau: float):
        super().__init__(counts, device)
        self.offset = torch.from_numpy((tau * np.log(counts)).astype(np.float32)).to(device)


class ClassBalanced(Loss):
    def __init__(self, counts, device, beta: float, gamma: float):
        super().__init__(counts, device)
        self.weights = torch.from_numpy(class_balanced_weights(counts, beta).astype(np.float32)).to(device)
        self.gamma = float(gamma)

    def grad(self, logits, targets, epoch):
        g = softmax_minus_onehot(logits, targets)
        if self.gamma:
            # d/dz of −(1−p)^γ log p = (p_k − δ_ky)·((1−p)^γ − γ (1−p)^{γ−1} p log p), p = p_y
            log_p = -_nll(logits, targets)
            p = log_p.exp()
            rest = (1 - p).clamp_min(0)
            factor = rest.pow(self.gamma) - self.gamma * torch.where(
                rest > 0, rest.pow(self.gamma - 1) * p * log_p, torch.zeros_like(p))
            g.mul_(factor.unsqueeze(1))
        return _weighted_mean_grad(g, self.weights, targets, lambda w: len(w))

    def value(self, logits, targets, epoch):
        nll = _nll(logits, targets)
        if self.gamma:
            nll = (1 - torch.exp(-nll)).clamp_min(0).pow(self.gamma) * nll
        return (self.weights.index_select(0, targets) * nll).mean()


class LDAM(Loss):
    def __init__(self, counts, device, max_margin: float, s: float, drw_epoch: int, beta: float):
        super().__init__(counts, device)
        margins = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, dtype=np.float64)))
        self.margins = torch.from_numpy((margins * (max_margin / margins.max())).astype(np.float32)).to(device)
        self.s, self.drw_epoch = float(s), int(drw_epoch)
        self.weights = torch.from_numpy(class_balanced_weights(counts, beta).astype(np.float32)).to(device)

    def _scaled(self, logits, targets):
        """s·(z − m_y e_y): one pass over the logits, then B writes."""
        margins = self.margins.index_select(0, targets).mul_(-self.s).unsqueeze(1)
        return logits.mul(self.s).scatter_add_(1, targets.unsqueeze(1), margins)

    def grad(self, logits, targets, epoch):
        g = softmax_minus_onehot(self._scaled(logits, targets), targets).mul_(self.s)
        if epoch < self.drw_epoch:
            return g
        return _weighted_mean_grad(g, self.weights, targets, lambda w: w.sum())

    def value(self, logits, targets, epoch):
        nll = _nll(self._scaled(logits, targets), targets)
        if epoch < self.drw_epoch:
            return nll.mean()
        w = self.weights.index_select(0, targets)
        return (w * nll).sum() / w.sum()


class LabelAwareSmoothing(Loss):
    def __init__(self, counts, device, smooth_head: float, smooth_tail: float):
        super().__init__(counts, device)
        counts = np.asarray(counts, dtype=np.float64)
        low, high = counts.min(), counts.max()
        position = (counts - low) / (high - low) if high > low else np.ones_like(counts)
        smooth = smooth_tail + (smooth_head - smooth_tail) * np.sin(position * math.pi / 2)
        self.smooth = torch.from_numpy(smooth.astype(np.float32)).to(device)

    def grad(self, logits, targets, epoch):
        # (1−ε)(p − e_y) + ε(p − 1/C) = p − (1−ε) e_y − ε/C
        eps = self.smooth.index_select(0, targets).unsqueeze(1)
        probs = torch.softmax(logits, dim=1).sub_(eps / self.num_classes)
        return probs.scatter_add_(1, targets.unsqueeze(1), eps - 1)

    def value(self, logits, targets, epoch):
        eps = self.smooth.index_select(0, targets)
        log_p = torch.log_softmax(logits, dim=1)
        nll = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
        return ((1 - eps) * nll - eps * log_p.mean(1)).mean()


class GeneralisedReweighting(Loss):
    def __init__(self, counts, device, rho: float):
        super().__init__(counts, device)
        weights = np.power(np.asarray(counts, dtype=np.float64).sum() / np.asarray(counts, dtype=np.float64), rho)
        self.weights = torch.from_numpy((weights / weights.sum() * len(counts)).astype(np.float32)).to(device)

    def grad(self, logits, targets, epoch):
        return _weighted_mean_grad(softmax_minus_onehot(logits, targets), self.weights, targets, lambda w: w.sum())

    def row_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """r_i = w_{y_i} / sum_k w_{y_k}: the batch loss is sum_i r_i CE_i."""
        weights = self.weights.index_select(0, targets)
        return weights.div_(weights.sum())

    def value(self, logits, targets, epoch):
        w = self.weights.index_select(0, targets)
        return (w * _nll(logits, targets)).sum() / w.sum()


_CLASSES = {"ce": Loss, "logit_adjusted": LogitAdjusted, "class_balanced": ClassBalanced, "ldam": LDAM,
            "label_aware_smoothing": LabelAwareSmoothing, "grw": GeneralisedReweighting}


def make_loss(name: str, counts: np.ndarray, device: torch.device, params: dict) -> Loss:
    """The loss ``name`` for these training counts; ``params`` may hold other losses' parameters too."""
    return _CLASSES[name](counts, device, **{k: params[k] for k in LOSS_PARAMS[name]})
