"""lt-cls: classifier strategies on cached features, as registered scikit-learn-style estimators.

Each method registers with its metadata (``cls.info``: display name, family, diagnostics, what it
needs). Tables list methods by family (the paper's, beyond the paper, reference), then in the
registration order below: joint first; beyond the paper the cRT family's recipes, then the methods
that recalibrate the frozen joint logits."""
# isort: off
from . import joint, ncm, crt, tau_norm, lws, knn, logit_adjust, bsce, maxnorm, presets  # noqa: F401
from . import disalign, marc, logreg  # noqa: F401
# isort: on
from .base import REGISTRY, LTClassifier, available, create

__all__ = ["REGISTRY", "LTClassifier", "available", "create"]
