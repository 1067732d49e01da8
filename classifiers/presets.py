"""Registered recipes of the cRT family: each paper's loss with its published loss defaults.

The papers behind la_loss, cb_loss and ldam_drw train the whole network end to end (90-200
epochs) and publish no classifier-only schedule; on frozen features these recipes keep cRT's
schedule (10 epochs of N draws, SGD lr 0.2, momentum 0.9, wd 5e-4, batch 512, cosine) with the
paper's sampler. docs/methods.md lists every such choice."""
from .base import register
from .crt import CRT, FAMILY_CONSTRAINTS, with_defaults


@register("la_loss")
class LogitAdjustedLoss(CRT):
    """cRT trained with the logit-adjusted loss: cross-entropy of z + tau * log(pi_j).

    Test time uses plain z = x W^T + b. Defaults: tau = 1, instance-balanced sampling (the paper's).
    At tau = 1 this is bsce.

    Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021, Eq. 10.
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="logit_adjusted", tau=1.0, sampler="instance")


@register("cb_loss")
class ClassBalancedLoss(CRT):
    """cRT trained with the class-balanced loss: weights (1 - beta) / (1 - beta^n_j), sum C.

    L = (1/B) sum_i w_{y_i} l_i, l the softmax cross-entropy (or, with gamma > 0, the softmax
    focal loss -(1 - p_y)^gamma log p_y). Defaults: beta = 0.9999, gamma = 0, instance sampling.

    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019.
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="class_balanced", beta=0.9999, gamma=0.0, sampler="instance")


@register("ldam_drw")
class LDAMDRW(CRT):
    """cRT trained with the LDAM loss and deferred re-weighting, on a cosine head.

    L = CE(s * (z - m_y e_y)), z = cos(x, w_j), m_j proportional to n_j^(-1/4) with the largest
    max_margin = 0.5, s = 30; from epoch drw_epoch (8 of 10, the paper's 160 of 200) weighted by
    (1 - beta) / (1 - beta^n_j), beta = 0.9999. Instance sampling; logits at test time are cos.
    cRT's schedule. Our choice: the cosine head starts from the normalised class means (the
    paper trains end to end from random weights; a random cosine head on frozen features barely
    moves in 10 epochs).

    Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019.
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="ldam", max_margin=0.5, s=30.0, drw_epoch=8, beta=0.9999,
                             head="cosine", cosine_scale=1.0, init="class_mean", sampler="instance")


@register("las")
class LabelAwareSmoothingCRT(CRT):
    """cRT trained with label-aware smoothing (MiSLAS stage 2), class-balanced sampling.

    Target 1 - eps_y on the label and eps_y spread uniformly, eps_j from smooth_head = 0.3 (most
    frequent class) to smooth_tail = 0.0 (rarest) by eps_tail + (eps_head - eps_tail) *
    sin(pi (n_j - n_min) / (2 (n_max - n_min))); 10 epochs.

    Zhong et al., "Improving Calibration for Long-Tailed Recognition", CVPR 2021 (ImageNet-LT values).
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="label_aware_smoothing", smooth_head=0.3, smooth_tail=0.0,
                             sampler="class")
