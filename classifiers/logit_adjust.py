"""Post-hoc logit adjustment."""
import numpy as np
import torch

from .base import TAU_GRID, FitData, LTClassifier, balanced_top1, pick_on_val, register, require_all_classes, require_val
from .params import Device, Options, Real, RealSequence


@register("logit_adjust")
class LogitAdjust(LTClassifier):
    """Post-hoc logit adjustment: joint logits - tau * log(prior).

    logits = x W^T + b - tau * log(prior_j),
    prior_j = n_j / N. ``tau="auto"`` picks tau from ``grid`` by val balanced top-1 (ties: smaller).

    Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021. Fitted: ``tau_``,
    ``val_curve_`` (auto only).
    """

    needs_classifier = True
    auto_params = ("tau",)
    _parameter_constraints = {"tau": [Real(), Options("auto")], "grid": [RealSequence(Real())], "device": [Device()]}

    def __init__(self, tau=1.0, grid=TAU_GRID, device="auto"):
        self.tau = tau
        self.grid = grid
        self.device = device

    def _fit(self, data: FitData) -> None:
        require_all_classes(data, "logit_adjust")
        self._set_linear(*data.classifier)
        log_prior = torch.from_numpy(np.log(data.counts / data.counts.sum()).astype(np.float32)).to(data.device)
        self.val_curve_ = {}
        if self.tau == "auto":
            X_val, y_val = require_val(data, "logit_adjust", "tau")
            val_logits = torch.addmm(self._bias, X_val.float(), self._weight_t)
            self.val_curve_ = {float(t): balanced_top1(val_logits - t * log_prior, y_val, data.num_classes)
                               for t in self.grid}
            self.tau_ = pick_on_val(self.val_curve_)
        else:
            self.tau_ = float(self.tau)
        self.selected_ = {"tau": self.tau_} if self.tau == "auto" else {}
        self._offset = -self.tau_ * log_prior

    def _logits(self, X, out):
        torch.addmm(self._bias + self._offset, X, self._weight_t, out=out)
