"""tau-normalisation of the joint classifier's weights."""
import torch

from .base import TAU_GRID, FitData, LTClassifier, pick_on_val, register, require_val
from .params import Device, Options, Real, RealSequence

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


@register("tau")
class TauNorm(LTClassifier):
    """tau-normalised joint classifier, bias dropped; tau fixed or picked on val.

    w~_j = w_j / ||w_j||^tau, bias dropped; logits = x W~^T.

    Kang et al. ICLR 2020, Sec. 4. As in the official script the bias is dropped (tau = 0 is the
    joint classifier without bias). ``tau="auto"`` evaluates ``grid`` (0, 0.1, ..., 2.0) on the
    validation split by balanced top-1, ties to the smaller tau; the whole grid costs one matmul,
    since x (W / ||w||^tau)^T = (x W^T) * ||w||^-tau column-wise.

    Fitted: ``tau_`` (the tau used), ``val_curve_`` ({tau: val balanced top-1}, auto only).
    """

    needs_classifier = True
    auto_params = ("tau",)
    _parameter_constraints = {"tau": [Real(), Options("auto")], "grid": [RealSequence(Real())], "device": [Device()]}

    def __init__(self, tau=1.0, grid=TAU_GRID, device="auto"):
        self.tau = tau
        self.grid = grid
        self.device = device

    def _fit(self, data: FitData) -> None:
        weight, _ = data.classifier
        norms = weight.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        self.val_curve_ = {}
        if self.tau == "auto":
            X_val, y_val = require_val(data, "tau", "tau")
            self.val_curve_ = dict(zip((float(t) for t in self.grid),
                                       tau_curve(X_val, y_val, weight, norms, self.grid, data.num_classes)))
            self.tau_ = pick_on_val(self.val_curve_)
        else:
            self.tau_ = float(self.tau)
        self._set_linear(weight / norms.pow(self.tau_).unsqueeze(1), None)
        self.selected_ = {"tau": self.tau_} if self.tau == "auto" else {}

    def _logits(self, X, out):
        torch.mm(X, self._weight_t, out=out)
