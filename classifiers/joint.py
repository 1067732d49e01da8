"""The checkpoint's own classifier."""
from .base import FitData, LTClassifier, register


@register("joint")
class Joint(LTClassifier):
    """The checkpoint's jointly trained classifier: logits = x W^T + b.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020
    (the jointly trained baseline)."""

    needs_classifier = True

    def __init__(self, device="auto"):
        self.device = device

    def _fit(self, data: FitData) -> None:
        self.weight_, self.bias_ = data.classifier

    def _logits(self, X):
        return self.bias_.addmm(X, self.weight_.T)
