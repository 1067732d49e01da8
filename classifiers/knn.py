"""Cosine k-nearest-neighbour vote."""
import numpy as np
import torch

from featcache.distributed import resolve_device
from featcache.errors import FeatcacheError

from .base import FitData, LTClassifier, feature_mean, register
from .ncm import normalise
from .params import Device, Int, Options, Real

_BLOCK_BYTES = 64 * 2**20  # training rows normalised at a time by the CPU search


@register("knn", display="kNN", family="beyond-paper", default=True)
class KNN(LTClassifier):
    """Cosine kNN with DINO's weighted vote (k=20, T=0.07).

    score_c = sum over the k nearest training features of class c of exp(sim / T), normalised to
    sum 1 over the classes; features L2-normalised ("l2n", or "cl2n" to centre on the training mean
    first), sim their cosine similarity.

    Search on CPU: exact, with no copy of the training features: for each chunk of queries,
    faiss's brute-force ``faiss.knn`` runs against the training rows normalised one block
    (``_BLOCK_BYTES``) at a time, and ``faiss.ResultHeap`` merges the blocks' top k; the estimator
    keeps a reference to X, not a copy (as scikit-learn's KNeighborsClassifier does). On GPU: one
    normalised copy, torch matmul + topk. The logits and ``predict_proba`` are the normalised votes,
    computed as exp((sim - max sim) / T) so that no temperature overflows. Exact ties at the k-th
    similarity are broken by the block layout (deterministic for given N and D, not by row order).

    Parameters
    ----------
    k : int, default=20
        Neighbours per query (all the training rows when fewer).
    temperature : float, default=0.07
        T of the vote, > 0.
    feature_norm : {"l2n", "cl2n"}, default="l2n"
        L2-normalise, or centre on the training mean and then L2-normalise.
    chunk_size : int, default=4096
        Queries searched at a time.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where the search runs; "auto" is CUDA when present.

    Attributes
    ----------
    mean_ : ndarray of shape (D,)
        The mean training feature (used by "cl2n").
    classes_ : ndarray of shape (C,)
        The sorted labels of ``y``, or ``arange(C)`` in index mode.

    References
    ----------
    .. [1] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
       (eval_knn.py).

    Examples
    --------
    Two neighbours vote for the class of each query:

    >>> import numpy as np
    >>> from classifiers.knn import KNN
    >>> X = np.array([[1.0, 0.1], [0.9, 0.0], [0.1, 1.0], [0.0, 0.8], [0.7, 0.7]])
    >>> knn = KNN(k=2).fit(X, [0, 0, 1, 1, 1])
    >>> knn.predict(np.array([[1.0, 0.2], [0.2, 1.0]]))
    array([0, 1])
    >>> knn.predict_proba(np.array([[1.0, 0.2], [0.3, 0.9]]))
    array([[1., 0.],
           [0., 1.]])
    """

    search_space = {"k": (5, 10, 20, 50), "temperature": (0.03, 0.07, 0.2)}
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
        if data.device.type == "cpu":
            self._train = data.X  # normalised block by block at search time
        else:
            self._train = normalise(data.X.float(), self.feature_norm, mean).contiguous()

    def _fill_logits(self, X, scores):
        """All queries at once: the CPU search normalises each block of training rows once."""
        k = min(self.k, len(self._train_labels))
        scores.zero_()
        starts = range(0, len(X), self.chunk_size)
        if scores.device.type == "cpu":
            neighbours = self._search_blocks(X, k)
        else:
            neighbours = ((self._query(X, start) @ self._train.T).topk(k, dim=1) for start in starts)
        for start, (sims, ids) in zip(starts, neighbours):
            votes = torch.exp((sims - sims[:, :1]) / self.temperature)  # sorted: column 0 is the largest
            rows = scores[start:start + len(sims)]
            rows.scatter_add_(1, self._train_labels[ids.to(scores.device)], votes.to(scores.device))
            rows.div_(rows.sum(1, keepdim=True))

    def _query(self, X, start: int) -> torch.Tensor:
        """Chunk ``start`` of the queries, normalised (a chunk at a time: no full copy of X)."""
        return normalise(X[start:start + self.chunk_size].float(), self.feature_norm, self._mean).contiguous()

    def _search_blocks(self, X, k: int) -> list:
        """Per chunk of queries, the similarities and ids of its k most similar training rows, most
        similar first. Each block of training rows is normalised once and searched by every chunk."""
        import faiss
        starts = range(0, len(X), self.chunk_size)
        heaps = [faiss.ResultHeap(len(X[start:start + self.chunk_size]), k, keep_max=True) for start in starts]
        block_rows = max(k, _BLOCK_BYTES // (4 * self._train.shape[1]))
        for first in range(0, len(self._train), block_rows):
            block = normalise(self._train[first:first + block_rows].float(), self.feature_norm, self._mean)
            block = np.ascontiguousarray(block.numpy())
            for start, heap in zip(starts, heaps):
                sims, ids = faiss.knn(self._query(X, start).numpy(), block, k, faiss.METRIC_INNER_PRODUCT)
                heap.add_result(sims, np.where(ids >= 0, ids + first, -1))  # -1: a block shorter than k
        for heap in heaps:
            heap.finalize()
        return [(torch.from_numpy(heap.D), torch.from_numpy(heap.I)) for heap in heaps]

    def memory_estimate(self, rows: int, dim: int, num_classes: int, eval_rows: int | None = None) -> int:
        """On CPU a normalised block of training rows and a chunk of queries (the k best of every
        query are counted with the logits); on GPU the index holds a float32 copy of the normalised
        training features."""
        search = 4 * rows * dim if resolve_device(self.device).type != "cpu" else _BLOCK_BYTES + 4 * self.chunk_size * dim
        return super().memory_estimate(rows, dim, num_classes, eval_rows) + search

    def predict_proba(self, X) -> np.ndarray:
        """The normalised vote: each class's share of the k neighbours' weights."""
        return self.logits(X).astype(np.float64)

    def __getstate__(self):
        state = dict(super().__getstate__())
        train = state.get("_train")
        if isinstance(train, torch.Tensor) and train.untyped_storage().nbytes() > train.numel() * train.element_size():
            state["_train"] = train.clone()  # a view of a bigger tensor (a sweep's views) pickles alone
        return state

    def __setstate__(self, state):
        if "_index" in state:
            raise FeatcacheError("this knn model was pickled by a version that kept a faiss index: fit it again")
        super().__setstate__(state)
