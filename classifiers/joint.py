"""The checkpoint's own classifier."""
import torch

from .base import FitData, LTClassifier, register
from .params import Device


@register("joint", display="Joint", family="paper", diagnostics=("weight_norms",), default=True)
class Joint(LTClassifier):
    """The checkpoint's jointly trained classifier: logits = x W^T + b.

    The baseline every decoupled method is compared with: the classifier trained together with the
    backbone, used as it is.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to fit and predict; "auto" is CUDA when present, else the CPU.

    Attributes
    ----------
    weight_ : ndarray of shape (C, D)
        W. ``bias_``, of shape (C,), is b.
    classes_ : ndarray of shape (C,)
        ``arange(C)``: ``y`` holds class indices, the rows of W.

    References
    ----------
    .. [1] Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
       ICLR 2020 (the jointly trained baseline).

    Examples
    --------
    The logits are the checkpoint's own:

    >>> import numpy as np
    >>> from classifiers.joint import Joint
    >>> X = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    >>> W, b = np.eye(2), np.array([0.0, 0.5])
    >>> Joint().fit(X, [0, 1, 1], classifier=(W, b)).logits(X)
    array([[2. , 0.5],
           [0. , 1.5],
           [1. , 3.5]], dtype=float32)
    """

    needs_classifier = True
    _parameter_constraints = {"device": [Device()]}

    def __init__(self, device="auto"):
        self.device = device

    def _fit(self, data: FitData) -> None:
        self._set_linear(*data.classifier)

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out)
