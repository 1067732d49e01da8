"""Cosine k-nearest-neighbour vote."""
import numpy as np
import torch

from featcache.errors import FeatcacheError

from .base import FitData, LTClassifier, register
from .ncm import normalise


@register("knn")
class KNN(LTClassifier):
    """Cosine kNN with DINO's weighted vote (k=20, T=0.07).

    score_c = sum over the k nearest training features of
    class c of exp(sim / T); features L2-normalised ("l2n", or "cl2n" to centre first).

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
    (eval_knn.py). Search: faiss exact inner product on CPU, torch matmul + topk on GPU, queries in
    chunks. The decision values are the vote scores.
    """

    def __init__(self, k=20, temperature=0.07, feature_norm="l2n", chunk_size=4096, device="auto"):
        self.k = k
        self.temperature = temperature
        self.feature_norm = feature_norm
        self.chunk_size = chunk_size
        self.device = device

    def _fit(self, data: FitData) -> None:
        if self.feature_norm not in ("l2n", "cl2n"):
            raise FeatcacheError(f"knn: feature_norm {self.feature_norm!r}; choose l2n or cl2n")
        if int(self.k) < 1:
            raise FeatcacheError(f"knn: k must be >= 1 (got {self.k})")
        self.mean_ = data.X.mean(dim=0)
        self.train_labels_ = data.y
        if data.device.type == "cpu":  # faiss keeps its own copy, filled chunk by chunk
            import faiss
            self.index_ = faiss.IndexFlatIP(data.X.shape[1])
            for start in range(0, len(data.X), int(self.chunk_size)):
                chunk = normalise(data.X[start:start + int(self.chunk_size)], self.feature_norm, self.mean_)
                self.index_.add(np.ascontiguousarray(chunk.numpy()))
        else:
            self.index_ = normalise(data.X, self.feature_norm, self.mean_).contiguous()

    def _logits(self, X, scores):
        queries = normalise(X, self.feature_norm, self.mean_).contiguous()
        k = min(int(self.k), len(self.train_labels_))
        scores.zero_()
        for start in range(0, len(queries), int(self.chunk_size)):
            chunk = queries[start:start + int(self.chunk_size)]
            if isinstance(self.index_, torch.Tensor):
                sims, ids = (chunk @ self.index_.T).topk(k, dim=1)
            else:
                sims, ids = self.index_.search(np.ascontiguousarray(chunk.numpy()), k)
                sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
            votes = torch.exp(sims / float(self.temperature))
            scores[start:start + len(chunk)].scatter_add_(1, self.train_labels_[ids.to(scores.device)], votes.to(scores.device))
