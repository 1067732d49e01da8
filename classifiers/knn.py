"""Cosine k-nearest-neighbour vote."""
import numpy as np
import torch

from .base import FitData, LTClassifier, feature_mean, register
from .ncm import normalise
from .params import Device, Int, Options, Real


@register("knn")
class KNN(LTClassifier):
    """Cosine kNN with DINO's weighted vote (k=20, T=0.07).

    score_c = sum over the k nearest training features of
    class c of exp(sim / T), normalised to sum 1 over the classes; features L2-normalised ("l2n",
    or "cl2n" to centre first).

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
    (eval_knn.py). Search: faiss exact inner product on CPU, torch matmul + topk on GPU, queries in
    chunks. The logits and ``predict_proba`` are the normalised votes, computed as
    exp((sim - max sim) / T) so that no temperature overflows.
    """

    _parameter_constraints = {"k": [Int(1)], "temperature": [Real(0, closed="neither")],
                              "feature_norm": [Options("l2n", "cl2n")], "chunk_size": [Int(1)], "device": [Device()]}

    def __init__(self, k=20, temperature=0.07, feature_norm="l2n", chunk_size=4096, device="auto"):
        self.k = k
        self.temperature = temperature
        self.feature_norm = feature_norm
        self.chunk_size = chunk_size
        self.device = device

    def _fit(self, data: FitData) -> None:
        mean = feature_mean(data.X)
        self._mean, self.mean_ = mean, mean.cpu().numpy()
        self._train_labels = data.y
        if data.device.type == "cpu":  # faiss keeps its own copy, filled chunk by chunk
            import faiss
            self._index = faiss.IndexFlatIP(data.X.shape[1])
            # reserve the final size (a std::vector keeps its capacity when resized down): growing by
            # doubling would peak at 1.4x the copy and keep up to 2x its capacity
            self._index.codes.resize(4 * data.X.shape[0] * data.X.shape[1])
            self._index.codes.resize(0)
            for start in range(0, len(data.X), self.chunk_size):
                chunk = normalise(data.X[start:start + self.chunk_size].float(), self.feature_norm, mean)
                self._index.add(np.ascontiguousarray(chunk.numpy()))
        else:
            self._index = normalise(data.X.float(), self.feature_norm, mean).contiguous()

    def _logits(self, X, scores):
        k = min(self.k, len(self._train_labels))
        scores.zero_()
        for start in range(0, len(X), self.chunk_size):  # normalised chunk by chunk: no full copy of X
            chunk = normalise(X[start:start + self.chunk_size].float(), self.feature_norm, self._mean).contiguous()
            if isinstance(self._index, torch.Tensor):
                sims, ids = (chunk @ self._index.T).topk(k, dim=1)
            else:
                sims, ids = self._index.search(np.ascontiguousarray(chunk.numpy()), k)
                sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
            votes = torch.exp((sims - sims[:, :1]) / self.temperature)  # topk: column 0 is the largest
            rows = scores[start:start + len(chunk)]
            rows.scatter_add_(1, self._train_labels[ids.to(scores.device)], votes.to(scores.device))
            rows.div_(rows.sum(1, keepdim=True))

    def memory_estimate(self, rows: int, dim: int, num_classes: int) -> int:
        """faiss (or the GPU index) holds a float32 copy of the normalised training features."""
        return super().memory_estimate(rows, dim, num_classes) + 4 * rows * dim

    def predict_proba(self, X) -> np.ndarray:
        """The normalised vote: each class's share of the k neighbours' weights."""
        return self.logits(X).astype(np.float64)

    def __getstate__(self):
        state = dict(super().__getstate__())
        if "_index" in state and not isinstance(state["_index"], torch.Tensor):
            import faiss  # a faiss index does not pickle; its serialised bytes do
            state["_index"] = faiss.serialize_index(state["_index"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("_index"), np.ndarray):
            import faiss
            state["_index"] = faiss.deserialize_index(state["_index"])
        super().__setstate__(state)
