"""scikit-learn reference probe."""
import numpy as np
import torch

from .base import FitData, LTClassifier, register
from .params import Bool, Device, Int, Real


@register("logreg", display="LogReg (sklearn)", family="reference")
class BalancedLogReg(LTClassifier):
    """scikit-learn balanced logistic regression: a reference linear probe.

    ``LogisticRegression(class_weight="balanced")`` on standardised features, on the CPU whatever
    ``device`` says; classes absent from training get logit -1e9.

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 regularisation strength, > 0.
    max_iter : int, default=300
        Iterations of the solver at most.
    standardize : bool, default=True
        Standardise the features (``StandardScaler``) before the regression.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where the inputs are placed; the fit itself is scikit-learn's, on the CPU.

    Attributes
    ----------
    model_ : sklearn.pipeline.Pipeline
        The fitted scaler (if any) and regression.
    n_iter_ : int
        The iterations the solver ran.
    classes_ : ndarray of shape (C,)
        Sorted labels of ``y``, or ``arange(C)`` given ``class_counts`` or ``classifier``.

    References
    ----------
    .. [1] scikit-learn, ``sklearn.linear_model.LogisticRegression``; "balanced" class weights
       n_samples / (n_classes * n_j).

    Examples
    --------
    A probe on two imbalanced classes:

    >>> import numpy as np
    >>> from classifiers import create
    >>> rng = np.random.default_rng(3)
    >>> labels = np.repeat([0, 1], [45, 5])
    >>> probe = create("logreg", C=0.5).fit(rng.normal(size=(50, 3)) + 2 * labels[:, None], labels)
    >>> probe.predict(np.array([[0.0, 0.0, 0.0], [2.5, 2.0, 2.2]]))
    array([0, 1])
    """

    search_space = {"C": (0.01, 0.1, 1.0, 10.0)}
    _parameter_constraints = {"C": [Real(0, closed="neither")], "max_iter": [Int(1)], "standardize": [Bool()],
                              "device": [Device()]}

    def __init__(self, C=1.0, max_iter=300, standardize=True, device="auto"):
        self.C = C
        self.max_iter = max_iter
        self.standardize = standardize
        self.device = device

    def memory_estimate(self, rows: int, dim: int, num_classes: int, eval_rows: int | None = None) -> int:
        """scikit-learn works on float32 / float64 copies of the standardised features."""
        return super().memory_estimate(rows, dim, num_classes, eval_rows) + 16 * rows * dim

    def _fit(self, data: FitData) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        steps = [StandardScaler()] if self.standardize else []
        self.model_ = make_pipeline(*steps, LogisticRegression(C=float(self.C), class_weight="balanced",
                                                               max_iter=int(self.max_iter)))
        self.model_.fit(data.X.float().cpu().numpy(), data.y.cpu().numpy())
        self._trained_classes = self.model_.classes_
        self.n_iter_ = int(np.max(self.model_[-1].n_iter_))

    def _logits(self, X, out):
        scores = self.model_.decision_function(X.cpu().numpy())
        if scores.ndim == 1:  # two classes: sklearn returns one column
            scores = np.stack([-scores, scores], axis=1)
        full = np.full((len(X), len(self.classes_)), -1e9, dtype=np.float32)
        full[:, self._trained_classes] = scores
        out.copy_(torch.from_numpy(full))
