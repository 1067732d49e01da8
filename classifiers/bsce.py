"""cRT with the balanced-softmax loss."""
from .base import register
from .crt import CRT, FAMILY_CONSTRAINTS, with_defaults


@register("bsce")
class BalancedSoftmaxCRT(CRT):
    """cRT trained with the balanced-softmax loss (Ren et al. 2020).

    Cross-entropy of (x W^T + b + log n_j) during training, plain x W^T + b at test time;
    instance-balanced sampling, otherwise cRT's defaults. It is the family's
    ``loss="logit_adjusted"`` at ``tau=1`` (log π_j and log n_j differ by a constant).

    Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020.
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="logit_adjusted", tau=1.0, sampler="instance")
