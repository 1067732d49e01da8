"""cRT with the balanced-softmax loss."""
from .base import register
from .crt import CRT, FAMILY_CONSTRAINTS, with_defaults
from .training import TUNED_EPOCHS, lr_range


@register("bsce", display="cRT + balanced softmax", family="beyond-paper")
class BalancedSoftmaxCRT(CRT):
    """cRT trained with the balanced-softmax loss (Ren et al. 2020).

    Cross-entropy of (x W^T + b + log n_j) during training, plain x W^T + b at test time. It is
    the family's ``loss="logit_adjusted"`` at ``tau=1`` (log pi_j and log n_j differ by a
    constant). Defaults: the official decoupled configuration for ImageNet-LT
    (jiawei-ren/BalancedMetaSoftmax-Classification,
    ``config/ImageNet_LT/decouple_balanced_softmax_resnet10.yaml``): a fresh layer, lr 0.4, batch
    512, 10 epochs, wd 5e-4, cosine, instance-balanced draws (``sampler: null``), and the
    classifier-balancing loop it inherits (int(N / B) batches per epoch).

    Parameters
    ----------
    lr : float, default=0.4
        The official decoupled ImageNet-LT lr (its Places-LT config: 0.02 at batch 256; CIFAR: 0.1).
    sampler : {"instance", "class", "sqrt", "progressive"}, default="instance"
        Instance-balanced: the log n_j offset does the balancing.
    loss, tau : default="logit_adjusted", 1.0
        The balanced softmax as the family's logit-adjusted loss.
    epochs, momentum, weight_decay, batch_size, epoch_steps, head, init, seed, device, ...
        Every other parameter, default and meaning of :class:`~classifiers.crt.ClassifierRetraining`.

    Attributes
    ----------
    weight_ : ndarray of shape (C, D)
        The trained W; ``bias_`` (C,), the trained b, holds no log n_j.
    class_draws_ : ndarray of shape (epochs, C)
        Draws of each class per epoch.
    classes_ : ndarray of shape (C,)
        Labels, as cRT's.

    References
    ----------
    .. [1] Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020.

    Examples
    --------
    The test-time logits are the plain x W^T + b of the trained layer:

    >>> import numpy as np
    >>> from classifiers.bsce import BalancedSoftmaxCRT
    >>> X, y = np.random.default_rng(6).normal(size=(40, 3)), np.arange(40) // 30
    >>> bsce = BalancedSoftmaxCRT(epochs=2).fit(X, y)
    >>> np.allclose(bsce.logits(X), X @ bsce.weight_.T + bsce.bias_, atol=1e-5)
    True
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    search_space = {"lr": lr_range(0.4), "epochs": TUNED_EPOCHS}
    __init__ = with_defaults(CRT.__init__, loss="logit_adjusted", tau=1.0, sampler="instance", lr=0.4,
                             epoch_steps="floor")
