"""lt-cls: classifier strategies on cached features, as registered scikit-learn-style estimators.

Registration order is the order tables use: the paper's methods first (joint first), then the
post-hoc / re-training family beyond the paper (the cRT family's recipes, then the methods that
recalibrate the frozen joint logits)."""
# isort: off
from . import joint, ncm, crt, tau_norm, lws, knn, logit_adjust, bsce, maxnorm, presets  # noqa: F401
from . import disalign, marc, logreg  # noqa: F401
# isort: on
from .base import REGISTRY, LTClassifier, available, create

__all__ = ["REGISTRY", "LTClassifier", "available", "create"]
