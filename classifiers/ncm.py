"""Nearest class mean."""
import torch

from .base import FitData, LTClassifier, feature_mean, register, require_all_classes
from .params import Device, Options

FEATURE_NORMS = ("cl2n", "l2n", "un")
_CHUNK_ROWS = 2048
METRICS = ("l2", "cos", "cos_official")


def normalise(X: torch.Tensor, mode: str, mean: torch.Tensor | None) -> torch.Tensor:
    """cl2n: subtract the training mean, then L2-normalise; l2n: L2-normalise; un: unchanged."""
    return normalise_with_norms(X, mode, mean)[0]


def normalise_with_norms(X: torch.Tensor, mode: str, mean: torch.Tensor | None):
    """The normalised rows and their squared L2 norms (1, or 0 for an all-zero row, when normalised)."""
    if mode == "cl2n":
        X = X - mean
    if mode == "un":
        return X, torch.linalg.vector_norm(X, dim=1).square_()
    norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)
    nonzero = (norms > 0).squeeze(1).to(X.dtype)
    X = X.div_(norms.clamp_min_(1e-12)) if mode == "cl2n" else X / norms.clamp_min_(1e-12)
    return X, nonzero


@register("ncm", display="NCM", family="paper", default=True)
class NCM(LTClassifier):
    """Nearest class mean on cl2n features; logits = -squared distance to each centroid.

    Features are transformed by ``feature_norm`` ("cl2n": minus the training mean, then
    L2-normalised), the centroids c_j are the class means of the transformed training features, and
    logits = -||x - c_j||^2 (``metric="l2"``, the official default), cos(x, c_j) (``metric="cos"``:
    a true cosine, both sides unit length) or x . c_j / D (``metric="cos_official"``:
    classifier-balancing's ``KNNClassifier`` with ``dist_type="cos"``, ``cos_similarity``: the
    transformed x against the centroids as they are, not normalised, divided by the feature
    dimension D; on cl2n features it ranks classes by ||c_j|| cos(x, c_j), not by the cosine).
    Every class needs a training sample.

    Parameters
    ----------
    feature_norm : {"cl2n", "l2n", "un"}, default="cl2n"
        Centre on the training mean and L2-normalise, only L2-normalise, or leave unchanged.
    metric : {"l2", "cos", "cos_official"}, default="l2"
        Negative squared Euclidean distance, cosine similarity, or the official "cos" (x . c_j / D).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to fit and predict ("auto": CUDA when present).

    Attributes
    ----------
    mean_ : ndarray of shape (D,)
        The mean training feature.
    centroids_ : ndarray of shape (C, D)
        The class means of the transformed features (scaled to unit length for ``metric="cos"``).
    classes_ : ndarray of shape (C,)
        The sorted labels of ``y`` (``arange(C)`` given ``class_counts`` or ``classifier``).

    References
    ----------
    .. [1] Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
       ICLR 2020, Sec. 4 (NCM).

    Examples
    --------
    String labels work as in scikit-learn; the rarest class keeps its own centroid:

    >>> import numpy as np
    >>> from classifiers.ncm import NCM
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat(["cat", "dog", "owl"], [40, 12, 4])
    >>> X = rng.normal(size=(56, 5)) + 3 * np.eye(3, 5)[np.unique(y, return_inverse=True)[1]]
    >>> ncm = NCM().fit(X, y)
    >>> ncm.centroids_.shape, ncm.predict(X[[0, 40, 52]])
    ((3, 5), array(['cat', 'dog', 'owl'], dtype='<U3'))
    """

    search_space = {"feature_norm": FEATURE_NORMS, "metric": METRICS}
    _parameter_constraints = {"feature_norm": [Options(*FEATURE_NORMS)], "metric": [Options(*METRICS)],
                              "device": [Device()]}

    def __init__(self, feature_norm="cl2n", metric="l2", device="auto"):
        self.feature_norm = feature_norm
        self.metric = metric
        self.device = device

    def _fit(self, data: FitData) -> None:
        seen = torch.bincount(data.y, minlength=data.num_classes)
        data.counts = seen.cpu().numpy()
        require_all_classes(data, "ncm")
        mean = feature_mean(data.X)
        sums = torch.zeros(data.num_classes, data.X.shape[1], device=data.device)
        for start in range(0, len(data.X), _CHUNK_ROWS):  # normalised chunk by chunk, in cache
            rows = slice(start, start + _CHUNK_ROWS)
            sums.index_add_(0, data.y[rows], normalise(data.X[rows].float(), self.feature_norm, mean))
        centroids = sums / seen.unsqueeze(1)
        if self.metric == "cos":
            centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self._mean, self._centroids = mean, centroids
        self._centroid_sq = (centroids ** 2).sum(1)
        self.mean_, self.centroids_ = mean.cpu().numpy(), centroids.cpu().numpy()

    def _logits(self, X, out):
        for start in range(0, len(X), _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            features, squared = normalise_with_norms(X[rows], self.feature_norm, self._mean)
            if self.metric == "cos":
                features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
                torch.mm(features, self._centroids.T, out=out[rows])
                continue
            if self.metric == "cos_official":  # KNNClassifier.cos_similarity: A B^T / feat_dim
                torch.mm(features, self._centroids.T, out=out[rows]).div_(features.shape[1])
                continue
            # -||x - c||^2 = 2 x.c - ||c||^2 - ||x||^2; for normalised rows ||x||^2 = 1 joins ||c||^2
            if self.feature_norm == "un" or not bool(squared.all()):
                torch.addmm(self._centroid_sq, features, self._centroids.T, beta=-1, alpha=2, out=out[rows])
                out[rows].sub_(squared.unsqueeze(1))
            else:
                torch.addmm(self._centroid_sq + 1.0, features, self._centroids.T, beta=-1, alpha=2, out=out[rows])
