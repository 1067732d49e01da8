"""tau-normalisation of the joint classifier's weights."""
import torch

from .base import TAU_GRID, FitData, LTClassifier, balanced_top1, pick_on_val, register, require_val


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
            val_logits = X_val @ weight.T
            log_norms = norms.log()
            self.val_curve_ = {float(t): balanced_top1(val_logits * torch.exp(-t * log_norms), y_val,
                                                        data.num_classes) for t in self.grid}
            self.tau_ = pick_on_val(self.val_curve_)
        else:
            self.tau_ = float(self.tau)
        self.weight_ = weight / norms.pow(self.tau_).unsqueeze(1)
        self.selected_ = {"tau": self.tau_} if self.tau == "auto" else {}

    def _logits(self, X):
        return X @ self.weight_.T
