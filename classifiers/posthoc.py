"""The base of the post-hoc corrections of the joint classifier by one strength tau (tau-norm,
logit adjustment): tau fixed, or ``"auto"`` and chosen on the val split."""
from collections.abc import Callable, Sequence

import torch

from .base import TAU_GRID, FitData, LTClassifier, choose_on_val
from .params import Device, Options, Real, RealSequence


class PostHocTau(LTClassifier):
    """Base of ``tau`` and ``logit_adjust``: the checkpoint's classifier corrected with strength
    ``tau``; ``tau="auto"`` takes the tau of ``grid`` with the best val balanced top-1."""

    needs_classifier = True
    auto_params = ("tau",)
    search_space = {"tau": TAU_GRID[::2]}  # 0, 0.2, ..., 2.0 (tau="auto" tries all 21 of TAU_GRID)
    _parameter_constraints = {"tau": [Real(), Options("auto")], "grid": [RealSequence(Real())], "device": [Device()]}

    def __init__(self, tau=1.0, grid=TAU_GRID, device="auto"):
        self.tau = tau
        self.grid = grid
        self.device = device

    def _set_tau(self, data: FitData, val_scores: Callable[[torch.Tensor, torch.Tensor], Sequence[float]]) -> None:
        """Set ``tau_``, and for ``tau="auto"`` ``val_curve_`` and ``selected_`` (both empty otherwise);
        ``val_scores(X_val, y_val)`` is the val balanced top-1 of every tau in ``grid``."""
        if self.tau == "auto":
            self.tau_, self.val_curve_ = choose_on_val(data, self.name, "tau", self.grid, val_scores)
            self.selected_ = {"tau": self.tau_}
        else:
            self.tau_, self.val_curve_, self.selected_ = float(self.tau), {}, {}
