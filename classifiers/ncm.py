"""Nearest class mean."""
import torch

from featcache.errors import FeatcacheError

from .base import FitData, LTClassifier, register, require_all_classes

FEATURE_NORMS = ("cl2n", "l2n", "un")
METRICS = ("l2", "cos")


def normalise(X: torch.Tensor, mode: str, mean: torch.Tensor | None) -> torch.Tensor:
    """cl2n: subtract the training mean, then L2-normalise; l2n: L2-normalise; un: unchanged."""
    if mode == "cl2n":
        X = X - mean
    if mode in ("cl2n", "l2n"):
        X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return X


@register("ncm")
class NCM(LTClassifier):
    """Nearest class mean on cl2n features; logits = -squared distance to each centroid.

    Centroids = class means of the transformed training features. logits = -||x - c_j||^2 (metric "l2") or cos(x, c_j) (metric "cos").

    Kang et al. ICLR 2020, Sec. 4 (features "cl2n" by default: minus the training mean, then
    L2-normalised). Fitted: ``mean_`` (D), ``centroids_`` (C x D).
    """

    def __init__(self, feature_norm="cl2n", metric="l2", device="auto"):
        self.feature_norm = feature_norm
        self.metric = metric
        self.device = device

    def _fit(self, data: FitData) -> None:
        if self.feature_norm not in FEATURE_NORMS:
            raise FeatcacheError(f"ncm: feature_norm {self.feature_norm!r}; choose one of {', '.join(FEATURE_NORMS)}")
        if self.metric not in METRICS:
            raise FeatcacheError(f"ncm: metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        seen = torch.bincount(data.y, minlength=data.num_classes)
        data.counts = seen.cpu().numpy()
        require_all_classes(data, "ncm")
        self.mean_ = data.X.mean(dim=0)
        features = normalise(data.X, self.feature_norm, self.mean_)
        sums = torch.zeros(data.num_classes, features.shape[1], device=data.device).index_add_(0, data.y, features)
        self.centroids_ = sums / seen.unsqueeze(1)
        if self.metric == "cos":
            self.centroids_ = self.centroids_ / self.centroids_.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self._centroid_sq = (self.centroids_ ** 2).sum(1)

    def _logits(self, X):
        features = normalise(X, self.feature_norm, self.mean_)
        if self.metric == "cos":
            features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return features @ self.centroids_.T
        # -||x - c||^2 = 2 x.c - ||c||^2 - ||x||^2
        logits = torch.addmm(self._centroid_sq, features, self.centroids_.T, beta=-1, alpha=2)
        return logits.sub_((features ** 2).sum(1, keepdim=True))
