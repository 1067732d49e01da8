"""Evaluation metrics, shared by Stage 1 (val during training) and Stage 2. Accuracies are
fractions here; records multiply by 100. Logits are numpy arrays or torch tensors: what reads
every logit (the argmax, top-k, the softmax of the NLL and the ECE) runs in torch on the logits'
device, so a GPU sweep's logits never leave the GPU; what is per row or per class runs in numpy.

Many / Medium / Few-shot: classes with > many / many..few / < few training images (defaults
100 and 20, as in Kang et al. 2020 and Liu et al. 2019). Classes absent from the evaluation split
are left out of every mean, and each group reports how many classes it averaged."""
from __future__ import annotations

import numpy as np
import torch


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class on the evaluation split; NaN for classes it does not contain."""
    seen = np.bincount(y, minlength=num_classes).astype(np.float64)
    hits = np.bincount(y[pred == y], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, hits / np.maximum(seen, 1), np.nan)


def balanced_accuracy(pred, y, num_classes) -> float:
    return float(np.nanmean(per_class_accuracy(pred, y, num_classes)))


def accuracy(pred, y) -> float:
    return float(np.mean(pred == y))


def topk_accuracy(logits, y, k: int = 5) -> float:
    """Share of rows whose class is among the k highest logits, ties ordered by class index as
    the argmax orders them (the first of equal logits ranks higher): the same on every device."""
    z_all = _logits(logits)
    labels, hits = _labels(y, z_all), 0
    for start in range(0, len(z_all), ROWS_PER_CHUNK):
        z, target = z_all[start:start + ROWS_PER_CHUNK], labels[start:start + ROWS_PER_CHUNK, None]
        own = z.gather(1, target)
        kth = z.topk(min(k, z.shape[1]), dim=1).values[:, -1:]
        hit = own > kth  # above the k-th largest: in; below it: out; equal to it, the ranks decide
        tie = (own == kth).squeeze(1)
        if bool(tie.any()):
            z, own, target = z[tie], own[tie], target[tie]
            before = (z > own).sum(1) + ((z == own) & (torch.arange(z.shape[1], device=z.device) < target)).sum(1)
            hit[tie] = (before < k).unsqueeze(1)
        hits = hits + hit.sum()
    return int(hits) / len(z_all)


def _logits(logits) -> torch.Tensor:
    """Logits as a tensor where they are: numpy arrays of any layout, byte order or writability are
    read (copied only when torch cannot view them), tensors are detached."""
    if isinstance(logits, torch.Tensor):
        return logits.detach()
    array = np.asarray(logits)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _labels(y, like: torch.Tensor) -> torch.Tensor:
    """``y`` as an int64 tensor on the device of ``like``."""
    if isinstance(y, torch.Tensor):
        return y.detach().to(device=like.device, dtype=torch.int64)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(like.device)


def predictions(logits) -> np.ndarray:
    """The argmax of each row, as a numpy array (computed where the logits are)."""
    return _logits(logits).argmax(dim=1).cpu().numpy()


def shot_groups(train_counts, many: int = 100, few: int = 20) -> dict[str, np.ndarray]:
    counts = np.asarray(train_counts)
    return {"many": counts > many, "medium": (counts >= few) & (counts <= many), "few": counts < few}


def macro_f1(pred, y, num_classes) -> float:
    """Mean F1 over the classes present in the evaluation split."""
    true = np.bincount(y, minlength=num_classes).astype(np.float64)
    predicted = np.bincount(pred, minlength=num_classes).astype(np.float64)
    hits = np.bincount(y[pred == y], minlength=num_classes).astype(np.float64)
    denominator = true + predicted
    f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    return float(f1[true > 0].mean())


ROWS_PER_CHUNK = 8192  # rows upcast to float64 at a time (bounded temporaries)


def negative_log_likelihood(logits, y) -> float:
    """Mean -log softmax(z)_y in nats, computed in float64 a chunk of rows at a time."""
    z_all = _logits(logits)
    labels, total = _labels(y, z_all), 0.0
    for start in range(0, len(z_all), ROWS_PER_CHUNK):
        z = z_all[start:start + ROWS_PER_CHUNK].double()
        total = total - torch.log_softmax(z, dim=1).gather(1, labels[start:start + ROWS_PER_CHUNK, None]).sum()
    return float(total) / len(z_all)


def calibration_bins(logits, y, bins: int = 15) -> dict[str, list]:
    """Reliability-diagram bins: ``bins`` equal-width bins over (0, 1] of the softmax's top
    probability, each with its row ``count``, mean ``confidence`` and ``accuracy`` (None where empty)."""
    z_all = _logits(logits)
    labels = _labels(y, z_all)
    count, confidence, correct = (torch.zeros(bins, dtype=torch.float64, device=z_all.device) for _ in range(3))
    for start in range(0, len(z_all), ROWS_PER_CHUNK):
        top, pred = torch.softmax(z_all[start:start + ROWS_PER_CHUNK].double(), dim=1).max(dim=1)
        which = torch.ceil(top * bins).long().sub_(1).clamp_(0, bins - 1)
        count += torch.bincount(which, minlength=bins)
        confidence += torch.bincount(which, weights=top, minlength=bins)
        correct += torch.bincount(which, weights=(pred == labels[start:start + ROWS_PER_CHUNK]).double(),
                                  minlength=bins)
    count, confidence, correct = (t.cpu().numpy() for t in (count, confidence, correct))
    filled = count > 0
    mean = lambda total: [float(t / c) if f else None for t, c, f in zip(total, count, filled)]  # noqa: E731
    return {"count": count.astype(int).tolist(), "confidence": mean(confidence), "accuracy": mean(correct)}


def expected_calibration_error(logits, y, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins over (0, 1] of the softmax's top probability:
    sum over bins of (rows in bin / N) |accuracy - mean confidence|."""
    return binned_calibration_error(calibration_bins(logits, y, bins))


def binned_calibration_error(table: dict[str, list]) -> float:
    """The ECE of :func:`calibration_bins`' table (a fraction)."""
    return float(sum(n * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
                     if n) / sum(table["count"]))


def evaluate(logits, y, train_counts, many: int = 100, few: int = 20) -> dict:
    """Every metric of a record (percentages; the NLL in nats), with the number of classes in each shot group."""
    logits = _logits(logits)  # read once for every metric below
    num_classes = logits.shape[1]
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, dtype=np.int64)
    pred = predictions(logits)
    per_class = per_class_accuracy(pred, y, num_classes)
    present = ~np.isnan(per_class)
    out = {"top1": 100 * float(np.nanmean(per_class)), "accuracy": 100 * accuracy(pred, y),
           "top5": 100 * topk_accuracy(logits, y, 5)}
    for group, mask in shot_groups(np.pad(train_counts, (0, num_classes - len(train_counts))), many, few).items():
        chosen = mask & present
        out[group] = 100 * float(per_class[chosen].mean()) if chosen.any() else None
        out[f"n_{group}"] = int(chosen.sum())
    out["macro_f1"] = 100 * macro_f1(pred, y, num_classes)
    out["ece"] = 100 * expected_calibration_error(logits, y)
    out["nll"] = negative_log_likelihood(logits, y)
    return out

