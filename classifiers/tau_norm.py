"""tau-normalisation of the joint classifier's weights."""
import torch

from .base import FitData, register
from .posthoc import PostHocTau

_CHUNK_ROWS = 512  # a chunk of logits stays in cache while every tau is tried on it


def tau_curve(X, y, weight, norms, grid, num_classes) -> list[float]:
    """Balanced top-1 of every tau in ``grid``: one matmul over X, the taus applied chunk by chunk
    to cache-resident logits, since x (W / ||w||^tau)^T = (x W^T) * ||w||^-tau."""
    scales = torch.exp(-torch.tensor([float(t) for t in grid], device=X.device)[:, None] * norms.log()[None, :])
    hits = torch.zeros(len(scales), num_classes, dtype=torch.float64, device=X.device)
    scaled = torch.empty(_CHUNK_ROWS, num_classes, device=X.device)
    weight_t = weight.T.contiguous()
    for start in range(0, len(X), _CHUNK_ROWS):
        logits = X[start:start + _CHUNK_ROWS].float() @ weight_t
        labels = y[start:start + _CHUNK_ROWS]
        for index, scale in enumerate(scales):
            correct = argmax_is(torch.mul(logits, scale, out=scaled[:len(labels)]), labels)
            hits[index].index_add_(0, labels, correct.double())
    seen = torch.bincount(y, minlength=num_classes).double()
    present = seen > 0
    return (hits[:, present] / seen[present]).mean(1).tolist()


def argmax_is(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1) == labels`` (first index wins ties), without argmax, which is several
    times slower than a max-reduction on CPU. Scribbles on ``scores``."""
    column = labels.unsqueeze(1)
    true = scores.gather(1, column)
    others = scores.scatter_(1, column, float("-inf")).amax(1, keepdim=True)
    correct = (true > others).squeeze(1)
    tied = (true == others).squeeze(1).nonzero().squeeze(1)
    if len(tied):  # the true class ties the best other one: argmax picks the lower index
        rows = scores[tied].scatter_(1, column[tied], true[tied])
        correct[tied] = rows.argmax(1) == labels[tied]
    return correct


@register("tau", display="tau-norm", family="paper", diagnostics=("weight_norms", "tau_curve"), default=True)
class TauNorm(PostHocTau):
    """tau-normalised joint classifier, bias dropped; tau fixed or picked on val.

    w~_j = w_j / ||w_j||^tau, logits = x W~^T: tau = 0 is the joint classifier without its bias,
    tau = 1 gives every class a unit-norm weight. As in the official script the bias is dropped.
    ``tau="auto"`` evaluates every tau of ``grid`` on the validation split by balanced top-1, ties
    to the smaller tau; the whole grid costs one matmul, since x (W / ||w||^tau)^T =
    (x W^T) * ||w||^-tau column-wise.

    Parameters
    ----------
    tau : float or "auto", default=1.0
        The exponent, or "auto" to choose it on ``fit(..., val=(X_val, y_val))``.
    grid : sequence of float, default=(0.0, 0.1, ..., 2.0)
        The candidates of ``tau="auto"`` (the official sweep).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to fit and predict; "auto" picks CUDA when present.

    Attributes
    ----------
    tau_ : float
        The tau used.
    val_curve_ : dict of float to float
        {tau: val balanced top-1} for ``tau="auto"``, else empty.
    selected_ : dict
        ``{"tau": tau_}`` when chosen on val, else empty.
    weight_ : ndarray of shape (C, D)
        W~ (``bias_`` is None).
    classes_ : ndarray of shape (C,)
        ``arange(C)``, the rows of the checkpoint's W.

    References
    ----------
    .. [1] Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
       ICLR 2020, Sec. 4 (tau-normalisation).

    Examples
    --------
    With tau = 1 every class weight has unit norm; ``tau="auto"`` chooses tau on val:

    >>> import numpy as np
    >>> from classifiers import create
    >>> W = np.array([[3.0, 0.0], [0.0, 1.0]])  # the head class has the longer weight
    >>> X = np.array([[1.0, 0.5], [0.5, 1.0]])
    >>> create("tau", tau=1.0).fit(X, [0, 1], classifier=(W, np.zeros(2))).weight_
    array([[1., 0.],
           [0., 1.]], dtype=float32)
    >>> y_val = np.repeat([0, 1], 20)
    >>> X_val = np.random.default_rng(0).normal(size=(40, 2)) * 0.8 + np.eye(2)[y_val]
    >>> create("tau", tau="auto").fit(X, [0, 1], classifier=(W, np.zeros(2)), val=(X_val, y_val)).tau_
    0.7
    """

    def _fit(self, data: FitData) -> None:
        weight, _ = data.classifier
        norms = weight.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        self._set_tau(data, lambda X_val, y_val: tau_curve(X_val, y_val, weight, norms, self.grid, data.num_classes))
        self._set_linear(weight / norms.pow(self.tau_).unsqueeze(1), None)

    def _logits(self, X, out):
        torch.mm(X, self._weight_t, out=out)
