"""Post-hoc logit adjustment."""
import numpy as np
import torch

from .base import FitData, balanced_top1, register, require_all_classes
from .posthoc import PostHocTau


@register("logit_adjust", display="Logit adjustment", family="beyond-paper")
class LogitAdjust(PostHocTau):
    """Post-hoc logit adjustment: joint logits - tau * log(prior).

    logits = x W^T + b - tau * log(prior_j), prior_j = n_j / N, the training class frequencies
    (from ``class_counts``, else counted from ``y``; every class needs a training sample).
    ``tau="auto"`` picks tau from ``grid`` by val balanced top-1 (ties: the smaller).

    Parameters
    ----------
    tau : float or "auto", default=1.0
        The adjustment's strength (1: the paper's correction for the balanced error), or "auto"
        to choose it on ``fit(..., val=(X_val, y_val))``.
    grid : sequence of float, default=(0.0, 0.1, ..., 2.0)
        Candidates tried by ``tau="auto"``.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to fit and predict ("auto": CUDA if present).

    Attributes
    ----------
    tau_ : float
        The tau used.
    val_curve_ : dict of float to float
        Val balanced top-1 of every candidate (``tau="auto"`` only; else empty).
    selected_ : dict
        ``{"tau": tau_}`` if tau was chosen on val, otherwise empty.
    weight_ : ndarray of shape (C, D)
        The joint W; ``bias_`` (C,) is the joint b, before the adjustment.
    classes_ : ndarray of shape (C,)
        ``arange(C)``: class indices, the rows of W.

    References
    ----------
    .. [1] Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021.

    Examples
    --------
    With an all-zero classifier the logits are the adjustment itself:

    >>> import numpy as np
    >>> from classifiers.logit_adjust import LogitAdjust
    >>> y = np.array([0, 0, 0, 1])  # prior (0.75, 0.25)
    >>> adjust = LogitAdjust(tau=1.0).fit(np.zeros((4, 2)), y, classifier=(np.eye(2), np.zeros(2)))
    >>> adjust.logits(np.zeros((1, 2))).round(3)  # -log 0.75, -log 0.25
    array([[0.288, 1.386]], dtype=float32)
    """

    def _fit(self, data: FitData) -> None:
        require_all_classes(data, self.name)
        self._set_linear(*data.classifier)
        log_prior = torch.from_numpy(np.log(data.counts / data.counts.sum()).astype(np.float32)).to(data.device)

        def val_scores(X_val, y_val):
            val_logits = torch.addmm(self._bias, X_val.float(), self._weight_t)
            return [balanced_top1(val_logits - t * log_prior, y_val, data.num_classes) for t in self.grid]

        self._set_tau(data, val_scores)
        self._offset = -self.tau_ * log_prior

    def _logits(self, X, out):
        torch.addmm(self._bias + self._offset, X, self._weight_t, out=out)
