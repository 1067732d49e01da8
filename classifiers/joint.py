"""The checkpoint's own classifier."""
import torch

from .base import FitData, LTClassifier, register
from .params import Device


@register("joint")
class Joint(LTClassifier):
    """The checkpoint's jointly trained classifier: logits = x W^T + b.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020
    (the jointly trained baseline)."""

    needs_classifier = True
    _parameter_constraints = {"device": [Device()]}

    def __init__(self, device="auto"):
        self.device = device

    def _fit(self, data: FitData) -> None:
        self._set_linear(*data.classifier)

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out)
