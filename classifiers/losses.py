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
    """Cross-entropy; subclasses change the logits, the targets or the weights.

    A loss holds the parameters of K trials (``make_loss`` with a list of parameter dicts, one per
    trial; their own tensors have K rows) and takes the logits of the first a <= K of them,
    a x B x C (:func:`~classifiers.crt.train_together`'s stacked heads), or of one trial, B x C."""

    offset: torch.Tensor | None = None  # K x C, added to the logits during training only

    def __init__(self, counts: np.ndarray, device: torch.device, trials: list[dict]):
        self.num_classes, self.device = len(counts), device

    def grad(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int, first: int = 0) -> torch.Tensor:
        """B · dL/dz; a x B x C logits are those of trials ``first`` ... ``first`` + a - 1."""
        return _per_trial(self._grad, logits, targets, epoch, first)

    def value(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int, first: int = 0) -> torch.Tensor:
        """The batch loss of each trial (a,), or of the one trial (a scalar) for B x C logits."""
        return _per_trial(self._value, logits, targets, epoch, first)

    def _grad(self, logits, targets, epoch, rows):
        return softmax_minus_onehot(logits, targets)

    def _value(self, logits, targets, epoch, rows):
        return _nll(logits, targets).mean(-1)

    def _column(self, values) -> torch.Tensor:
        """One number per trial as a K x 1 tensor (it multiplies a trial's B rows)."""
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(1)


def _per_trial(fn, logits: torch.Tensor, targets: torch.Tensor, epoch: int, first: int) -> torch.Tensor:
    """``fn`` on a x B x C logits and the slice of the trials they are; B x C logits are one
    trial's (and get a B x C answer back)."""
    if logits.dim() == 3:
        return fn(logits, targets, epoch, slice(first, first + len(logits)))
    return fn(logits.unsqueeze(0), targets, epoch, slice(first, first + 1)).squeeze(0)


def _rows(table: torch.Tensor, targets: torch.Tensor, trials: slice) -> torch.Tensor:
    """table[k, y_i] for the ``trials`` rows of a K x C table: a x B."""
    return table[trials].index_select(1, targets)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)_{y_i}, the shape of the logits without their last axis."""
    index = targets.expand(logits.shape[:-1]).unsqueeze(-1)
    return -torch.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)


def _weighted_mean_grad(g: torch.Tensor, row_weights: torch.Tensor, by_sum: bool) -> torch.Tensor:
    """Rows of B · d(Σ_i w_i ℓ_i / divisor)/dz from the per-row dℓ_i/dz in ``g`` (a x B x C), the
    divisor B (a mean of weighted terms) or, ``by_sum``, each trial's Σ_i w_i (a weighted mean)."""
    scale = row_weights * (row_weights.shape[-1] / row_weights.sum(-1, keepdim=True)) if by_sum else row_weights
    return g.mul_(scale.unsqueeze(-1))


class LogitAdjusted(Loss):
    def __init__(self, counts, device, trials):
        super().__init__(counts, device, trials)
        log_counts = np.log(np.asarray(counts, dtype=np.float64))
        self.offset = torch.from_numpy(np.stack([t["tau"] * log_counts for t in trials]).astype(np.float32)).to(device)


class ClassBalanced(Loss):
    def __init__(self, counts, device, trials):
        super().__init__(counts, device, trials)
        self.weights = torch.from_numpy(np.stack([class_balanced_weights(counts, t["beta"]) for t in trials])
                                        .astype(np.float32)).to(device)
        self.gamma = self._column([float(t["gamma"]) for t in trials])
        self.focal = any(t["gamma"] for t in trials)

    def _grad(self, logits, targets, epoch, rows):
        g = softmax_minus_onehot(logits, targets)
        if self.focal:
            # d/dz of −(1−p)^γ log p = (p_k − δ_ky)·((1−p)^γ − γ (1−p)^{γ−1} p log p), p = p_y
            gamma = self.gamma[rows]
            log_p = -_nll(logits, targets)
            p = log_p.exp()
            rest = (1 - p).clamp_min(0)
            factor = rest.pow(gamma) - gamma * torch.where(rest > 0, rest.pow(gamma - 1) * p * log_p,
                                                           torch.zeros_like(p))
            g.mul_(torch.where(gamma > 0, factor, torch.ones_like(factor)).unsqueeze(-1))  # γ = 0: cross-entropy
        return _weighted_mean_grad(g, _rows(self.weights, targets, rows), by_sum=False)

    def _value(self, logits, targets, epoch, rows):
        nll = _nll(logits, targets)
        if self.focal:
            gamma = self.gamma[rows]
            nll = torch.where(gamma > 0, (1 - torch.exp(-nll)).clamp_min(0).pow(gamma) * nll, nll)
        return (_rows(self.weights, targets, rows) * nll).mean(-1)


class LDAM(Loss):
    def __init__(self, counts, device, trials):
        super().__init__(counts, device, trials)
        margins = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, dtype=np.float64)))
        self.margins = torch.from_numpy(np.stack([margins * (t["max_margin"] / margins.max()) for t in trials])
                                        .astype(np.float32)).to(device)
        self.s = self._column([float(t["s"]) for t in trials])
        self.drw_epochs = [int(t["drw_epoch"]) for t in trials]  # on the host: whether any trial re-weights yet
        self.drw_epoch = torch.tensor(self.drw_epochs, device=device).unsqueeze(1)  # the same, for the device's where
        self.weights = torch.from_numpy(np.stack([class_balanced_weights(counts, t["beta"]) for t in trials])
                                        .astype(np.float32)).to(device)

    def _scaled(self, logits, targets, rows):
        """s·(z − m_y e_y): one pass over the logits, then B writes."""
        s = self.s[rows]
        margins = _rows(self.margins, targets, rows).mul_(-s).unsqueeze(-1)
        return logits.mul(s.unsqueeze(-1)).scatter_add_(-1, targets.expand(logits.shape[:-1]).unsqueeze(-1), margins)

    def _grad(self, logits, targets, epoch, rows):
        g = softmax_minus_onehot(self._scaled(logits, targets, rows), targets).mul_(self.s[rows].unsqueeze(-1))
        if all(epoch < e for e in self.drw_epochs[rows]):
            return g
        weights = _rows(self.weights, targets, rows)  # from drw_epoch on: re-weighted (its trials only)
        weights = torch.where(epoch >= self.drw_epoch[rows],
                              weights * (len(targets) / weights.sum(-1, keepdim=True)), torch.ones_like(weights))
        return g.mul_(weights.unsqueeze(-1))

    def _value(self, logits, targets, epoch, rows):
        nll = _nll(self._scaled(logits, targets, rows), targets)
        w = _rows(self.weights, targets, rows)
        weighted = (w * nll).sum(-1) / w.sum(-1)
        return torch.where(epoch >= self.drw_epoch[rows, 0], weighted, nll.mean(-1))


class LabelAwareSmoothing(Loss):
    def __init__(self, counts, device, trials):
        super().__init__(counts, device, trials)
        counts = np.asarray(counts, dtype=np.float64)
        low, high = counts.min(), counts.max()
        position = (counts - low) / (high - low) if high > low else np.ones_like(counts)
        smooth = [t["smooth_tail"] + (t["smooth_head"] - t["smooth_tail"]) * np.sin(position * math.pi / 2)
                  for t in trials]
        self.smooth = torch.from_numpy(np.stack(smooth).astype(np.float32)).to(device)

    def _grad(self, logits, targets, epoch, rows):
        # (1−ε)(p − e_y) + ε(p − 1/C) = p − (1−ε) e_y − ε/C
        eps = _rows(self.smooth, targets, rows).unsqueeze(-1)
        probs = torch.softmax(logits, dim=-1).sub_(eps / self.num_classes)
        return probs.scatter_add_(-1, targets.expand(logits.shape[:-1]).unsqueeze(-1), eps - 1)

    def _value(self, logits, targets, epoch, rows):
        eps = _rows(self.smooth, targets, rows)
        log_p = torch.log_softmax(logits, dim=-1)
        nll = -log_p.gather(-1, targets.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return ((1 - eps) * nll - eps * log_p.mean(-1)).mean(-1)


class GeneralisedReweighting(Loss):
    def __init__(self, counts, device, trials):
        super().__init__(counts, device, trials)
        inverse = np.asarray(counts, dtype=np.float64).sum() / np.asarray(counts, dtype=np.float64)
        weights = [np.power(inverse, t["rho"]) for t in trials]
        self.weights = torch.from_numpy(np.stack([w / w.sum() * len(counts) for w in weights])
                                        .astype(np.float32)).to(device)

    def _grad(self, logits, targets, epoch, rows):
        return _weighted_mean_grad(softmax_minus_onehot(logits, targets), _rows(self.weights, targets, rows),
                                   by_sum=True)

    def row_weights(self, targets: torch.Tensor, trials: slice = slice(0, 1)) -> torch.Tensor:
        """r_i = w_{y_i} / sum_k w_{y_k} of each of the ``trials`` (t x B): a trial's batch loss is
        sum_i r_i CE_i."""
        weights = _rows(self.weights, targets, trials)
        return weights.div_(weights.sum(-1, keepdim=True))

    def _value(self, logits, targets, epoch, rows):
        w = _rows(self.weights, targets, rows)
        return (w * _nll(logits, targets)).sum(-1) / w.sum(-1)


_CLASSES = {"ce": Loss, "logit_adjusted": LogitAdjusted, "class_balanced": ClassBalanced, "ldam": LDAM,
            "label_aware_smoothing": LabelAwareSmoothing, "grw": GeneralisedReweighting}


def make_loss(name: str, counts: np.ndarray, device: torch.device, params: dict | list[dict]) -> Loss:
    """The loss ``name`` for these training counts, for one trial (``params``, which may hold other
    losses' parameters too) or for a stack of trials (a list of such dicts)."""
    trials = [params] if isinstance(params, dict) else list(params)
    return _CLASSES[name](counts, device, [{k: t[k] for k in LOSS_PARAMS[name]} for t in trials])
