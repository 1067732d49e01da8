"""Evaluation metrics, pure numpy, shared by Stage 1 (val during training) and Stage 2.
Accuracies are fractions here; records multiply by 100.

Many / Medium / Few-shot: classes with > many / many..few / < few training images (defaults
100 and 20, as in Kang et al. 2020 and Liu et al. 2019). Classes absent from the evaluation split
are left out of every mean, and each group reports how many classes it averaged."""
from __future__ import annotations

import numpy as np


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


def topk_accuracy(logits: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean((top == y[:, None]).any(axis=1)))


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


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


ROWS_PER_CHUNK = 8192  # rows upcast to float64 at a time (bounded temporaries)


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean -log softmax(z)_y in nats, computed in float64 a chunk of rows at a time."""
    total = 0.0
    for start in range(0, len(logits), ROWS_PER_CHUNK):
        z = logits[start:start + ROWS_PER_CHUNK].astype(np.float64)
        top = z.max(axis=1)
        log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        total += float((log_norm - z[np.arange(len(z)), y[start:start + ROWS_PER_CHUNK]]).sum())
    return total / len(logits)


def calibration_bins(logits: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, list]:
    """Reliability-diagram bins: ``bins`` equal-width bins over (0, 1] of the softmax's top
    probability, each with its row ``count``, mean ``confidence`` and ``accuracy`` (None where empty)."""
    count, confidence, correct = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for start in range(0, len(logits), ROWS_PER_CHUNK):
        probs = softmax(logits[start:start + ROWS_PER_CHUNK].astype(np.float64))
        top, pred = probs.max(axis=1), probs.argmax(axis=1)
        which = np.clip(np.ceil(top * bins).astype(int) - 1, 0, bins - 1)
        count += np.bincount(which, minlength=bins)
        confidence += np.bincount(which, weights=top, minlength=bins)
        correct += np.bincount(which, weights=(pred == y[start:start + ROWS_PER_CHUNK]), minlength=bins)
    filled = count > 0
    mean = lambda total: [float(t / c) if f else None for t, c, f in zip(total, count, filled)]  # noqa: E731
    return {"count": count.astype(int).tolist(), "confidence": mean(confidence), "accuracy": mean(correct)}


def expected_calibration_error(logits: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins over (0, 1] of the softmax's top probability:
    sum over bins of (rows in bin / N) |accuracy - mean confidence|."""
    return binned_calibration_error(calibration_bins(logits, y, bins))


def binned_calibration_error(table: dict[str, list]) -> float:
    """The ECE of :func:`calibration_bins`' table (a fraction)."""
    return float(sum(n * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
                     if n) / sum(table["count"]))


def evaluate(logits: np.ndarray, y: np.ndarray, train_counts, many: int = 100, few: int = 20) -> dict:
    """Every metric of a record (percentages; the NLL in nats), with the number of classes in each shot group."""
    num_classes = logits.shape[1]
    y = np.asarray(y, dtype=np.int64)
    pred = logits.argmax(axis=1)
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

