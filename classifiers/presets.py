"""Registered recipes of the cRT family: each paper's loss with its published loss defaults.

The papers behind la_loss, cb_loss and ldam_drw train the whole network end to end (90-200
epochs) and publish no classifier-only schedule; on frozen features these recipes keep cRT's
schedule (10 epochs of int(N / B) batches, SGD lr 0.2, momentum 0.9, wd 5e-4, batch 512, cosine)
with the paper's sampler. ``las`` follows MiSLAS's stage 2. docs/methods.md lists every such
choice next to the official configuration files."""
import numpy as np

from .base import FitData, InvalidInputError, register
from .crt import CRT, FAMILY_CONSTRAINTS, with_defaults
from .params import InvalidParameterError, Options, Real
from .training import TUNED_EPOCHS, lr_range


@register("la_loss", display="cRT + LA loss", family="beyond-paper")
class LogitAdjustedLoss(CRT):
    """cRT trained with the logit-adjusted loss: cross-entropy of z + tau * log(pi_j).

    z = x W^T + b, pi_j = n_j / N; test time uses plain z. Instance-balanced sampling (the
    paper's), otherwise cRT's schedule. At tau = 1 and the same lr this is ``bsce``, bit for bit
    (``bsce`` defaults to its official decoupled lr, 0.4).

    Parameters
    ----------
    tau : float, default=1.0
        Strength of the training-time adjustment.
    sampler : {"instance", "class", "sqrt", "progressive"}, default="instance"
        How draws pick classes; instance-balanced, since the loss does the re-balancing.
    loss, epochs, lr, momentum, weight_decay, batch_size, head, init, seed, device, ...
        As in :class:`~classifiers.crt.ClassifierRetraining`, with ``loss="logit_adjusted"``.

    Attributes
    ----------
    weight_, bias_, class_draws_, classes_
        The trained linear head and the draws, as cRT's.

    References
    ----------
    .. [1] Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021, Eq. 10.

    Examples
    --------
    At tau = 1 the recipe equals ``bsce`` at the same lr:

    >>> import numpy as np
    >>> from classifiers import create
    >>> X, y = np.random.default_rng(0).normal(size=(60, 4)), np.repeat([0, 1, 2], [40, 15, 5])
    >>> la = create("la_loss", epochs=3).fit(X, y)
    >>> np.array_equal(la.weight_, create("bsce", epochs=3, lr=0.2).fit(X, y).weight_)
    True
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="logit_adjusted", tau=1.0, sampler="instance", epoch_steps="floor")
    search_space = {"lr": lr_range(0.2), "epochs": TUNED_EPOCHS, "tau": (0.5, 1.0, 1.5, 2.0)}


@register("cb_loss", display="cRT + CB loss", family="beyond-paper")
class ClassBalancedLoss(CRT):
    """cRT trained with the class-balanced loss: weights (1 - beta) / (1 - beta^n_j), sum C.

    L = (1/B) sum_i w_{y_i} l_i, l the softmax cross-entropy (or, with gamma > 0, the softmax
    focal loss -(1 - p_y)^gamma log p_y). Instance sampling, otherwise cRT's schedule.

    Parameters
    ----------
    beta : float, default=0.9999
        In [0, 1): 0 weighs every class alike; towards 1, w_j approaches 1 / n_j.
    gamma : float, default=0.0
        The focal exponent; 0 is the weighted cross-entropy.
    sampler : {"instance", "class", "sqrt", "progressive"}, default="instance"
        Instance-balanced draws: the weights re-balance.
    loss, epochs, lr, momentum, weight_decay, batch_size, head, init, seed, device, ...
        ``loss="class_balanced"``; the rest as :class:`~classifiers.crt.ClassifierRetraining`.

    Attributes
    ----------
    weight_, bias_, class_draws_, classes_
        See :class:`~classifiers.crt.ClassifierRetraining`.

    References
    ----------
    .. [1] Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019.

    Examples
    --------
    The focal form on three classes:

    >>> import numpy as np
    >>> from classifiers.presets import ClassBalancedLoss
    >>> y = np.repeat([0, 1, 2], [50, 10, 4])
    >>> X = np.random.default_rng(2).normal(size=(64, 3)) + 3 * np.eye(3)[y]
    >>> focal = ClassBalancedLoss(gamma=2.0).fit(X, y)
    >>> focal.predict(3 * np.eye(3))  # the class centres
    array([0, 1, 2])
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, loss="class_balanced", beta=0.9999, gamma=0.0, sampler="instance",
                             epoch_steps="floor")
    search_space = {"lr": lr_range(0.2), "epochs": TUNED_EPOCHS, "beta": (0.99, 0.999, 0.9999), "gamma": (0.0, 1.0)}


@register("ldam_drw", display="cRT + LDAM-DRW", family="beyond-paper")
class LDAMDRW(CRT):
    """cRT trained with the LDAM loss and deferred re-weighting, on a cosine head.

    L = CE(s * (z - m_y e_y)), z = cos(x, w_j), m_j proportional to n_j^(-1/4) with the largest
    ``max_margin``; from epoch ``drw_epoch`` (8 of 10, the paper's 160 of 200) weighted by
    (1 - beta) / (1 - beta^n_j). Instance sampling; logits at test time are cos; cRT's schedule.
    Our choice: the cosine head starts from the normalised class means (the paper trains end to end
    from random weights; a random cosine head on frozen features barely moves in 10 epochs).

    Parameters
    ----------
    max_margin : float, default=0.5
        The margin of the rarest class.
    s : float, default=30.0
        Scale of the margin-shifted cosines during training.
    drw_epoch : int, default=8
        First re-weighted epoch (0-based).
    beta : float, default=0.9999
        The class-balanced weights' beta after ``drw_epoch``.
    head, cosine_scale, init : default="cosine", 1.0, "class_mean"
        Test logits are plain cosines, the head starts at the unit class means.
    sampler : {"instance", "class", "sqrt", "progressive"}, default="instance"
        The paper's instance-balanced sampling.
    loss, epochs, lr, momentum, weight_decay, batch_size, seed, device, ...
        ``loss="ldam"``, and cRT's schedule (:class:`~classifiers.crt.ClassifierRetraining`).

    Attributes
    ----------
    weight_ : ndarray of shape (C, D)
        The trained directions (any norm; the head uses their unit vectors).
    bias_ : None
        The cosine head has no bias.
    class_draws_, classes_
        As in :class:`~classifiers.crt.ClassifierRetraining`.

    References
    ----------
    .. [1] Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
       NeurIPS 2019.

    Examples
    --------
    The test logits are cosines:

    >>> import numpy as np
    >>> from classifiers import create
    >>> rng = np.random.default_rng(4)
    >>> y = np.repeat([0, 1], [30, 6])
    >>> ldam = create("ldam_drw", epochs=3, drw_epoch=2).fit(rng.normal(size=(36, 5)) + y[:, None], y)
    >>> cosines = ldam.logits(rng.normal(size=(8, 5)))
    >>> ldam.bias_ is None, bool(np.abs(cosines).max() <= 1)
    (True, True)
    """

    __init__ = with_defaults(CRT.__init__, loss="ldam", max_margin=0.5, s=30.0, drw_epoch=8, beta=0.9999,
                             head="cosine", cosine_scale=1.0, init="class_mean", sampler="instance",
                             epoch_steps="floor")

    _parameter_constraints = FAMILY_CONSTRAINTS
    search_space = {"lr": lr_range(0.2), "epochs": TUNED_EPOCHS, "max_margin": (0.3, 0.5, 0.7)}

    @classmethod
    def trial_params(cls, params: dict, searched: set[str]) -> dict:
        """Re-weighting starts 80% of the way through a searched schedule (the paper's 160 of 200)."""
        if "epochs" in searched and "drw_epoch" not in searched:
            params = {**params, "drw_epoch": 4 * params["epochs"] // 5}
        return params


RECIPES = ("auto", "mislas", "fresh")


@register("las", display="cRT + LAS (MiSLAS)", family="beyond-paper")
class LabelAwareSmoothingCRT(CRT):
    """Label-aware smoothing, MiSLAS stage 2: the joint layer and per-class scales re-trained.

    Loss: target 1 - eps_y on the label and eps_y spread uniformly over every class, eps_j from
    ``smooth_head`` (most frequent class) to ``smooth_tail`` (rarest) by eps_tail + (eps_head -
    eps_tail) * sin(pi (n_j - n_min) / (2 (n_max - n_min))).

    Recipe (``recipe="mislas"``, the default when ``fit`` gets the checkpoint's classifier):
    dvlab-research/MiSLAS ``train_stage2.py`` with ``config/imagenet/
    imagenet_resnet50_stage2_mislas.yaml``. The linear layer starts from the joint W, b and the
    logits are f_j (x w_j + b_j) with a learnable weight scaling f (``LearnableWeightScaling``,
    init 1); one SGD over both parameter groups (momentum 0.9, wd 5e-4 on both), W and b at
    ``lr_factor`` x the epoch's lr, f at the epoch's lr; lr 0.1, cosine per epoch from the base lr
    (``adjust_learning_rate``), batch 256, 10 epochs, class-aware sampling, ceil(N / B) + 1
    batches per epoch (its ``if i > end_steps: break``; fewer where its loader's max_j n_j C draws
    end first). Test logits are f_j (x w_j + b_j), folded
    into ``weight_`` and ``bias_``. MiSLAS also re-estimates BatchNorm statistics on augmented
    images (``shift_bn``); cached features cannot.

    Without a classifier (``recipe="auto"`` on an entry that has none, or ``recipe="fresh"``) it
    falls back to the recipe ``las`` had before: a fresh layer (nn.Linear's initialisation from
    ``seed``), no scaling, every parameter at ``lr``, under the schedule parameters below (the
    earlier recipe exactly: ``recipe="fresh", lr=0.2, batch_size=512, epoch_steps="ceil"``).

    Parameters
    ----------
    recipe : {"auto", "mislas", "fresh"}, default="auto"
        "mislas" with the checkpoint's classifier, else "fresh"; "mislas" without one is an error.
    lr_factor : float, default=0.05
        MiSLAS's ``lr_factor``: the layer's lr over the scales' (the "mislas" recipe only), > 0.
    lr : float, default=0.1
        The scales' (and, under "fresh", the layer's) initial lr, cosine per epoch.
    batch_size : int, default=256
        MiSLAS's batch.
    epoch_steps : {"ceil+1", "floor", "ceil", "floor-1"}, default="ceil+1"
        MiSLAS's batches per epoch (see :class:`~classifiers.crt.ClassifierRetraining`).
    smooth_head : float, default=0.3
        eps of the most frequent class, in [0, 1] (the paper's ImageNet-LT value).
    smooth_tail : float, default=0.0
        eps of the rarest class, in [0, 1].
    sampler : {"class", "instance", "sqrt", "progressive"}, default="class"
        MiSLAS re-trains the classifier with class-balanced draws.
    loss, epochs, momentum, weight_decay, head, seed, device, ...
        With ``loss="label_aware_smoothing"``, the meaning and defaults of
        :class:`~classifiers.crt.ClassifierRetraining` (no ``init``: the recipe sets it; the
        "mislas" recipe needs ``head="linear"``).

    Attributes
    ----------
    recipe_ : {"mislas", "fresh"}
        The recipe this fit ran.
    scales_ : ndarray of shape (C,)
        The learned f (ones under "fresh").
    weight_, bias_ : ndarray of shape (C, D), (C,)
        The classifier applied at test time, f_j w_j and f_j b_j.
    class_draws_, classes_
        The draws per epoch and class, and the labels, as cRT's.

    References
    ----------
    .. [1] Zhong et al., "Improving Calibration for Long-Tailed Recognition", CVPR 2021.

    Examples
    --------
    From the joint classifier, with its scales. Each epoch is what MiSLAS's class-aware loader yields,
    max_j n_j C = 120 draws (fewer than the ceil(50 / 256) + 1 = 2 batches of 256 its loop allows):

    >>> import numpy as np
    >>> from classifiers.presets import LabelAwareSmoothingCRT
    >>> y = np.array([0] * 40 + [1] * 8 + [2] * 2)
    >>> X = np.random.default_rng(5).normal(scale=0.5, size=(50, 3)) + np.eye(3)[y]
    >>> las = LabelAwareSmoothingCRT(epochs=6, smooth_head=0.2).fit(X, y, classifier=(np.eye(3), np.zeros(3)))
    >>> las.recipe_, las.scales_.shape, las.class_draws_.sum(axis=1)
    ('mislas', (3,), array([120, 120, 120, 120, 120, 120]))

    Without a classifier, a fresh layer:

    >>> LabelAwareSmoothingCRT(epochs=2).fit(X, y).recipe_
    'fresh'
    """

    per_trial = ("lr_factor",)
    _parameter_constraints = {**{k: v for k, v in FAMILY_CONSTRAINTS.items() if k != "init"},
                              "recipe": [Options(*RECIPES)], "lr_factor": [Real(0, closed="neither")]}
    search_space = {"lr": lr_range(0.1), "epochs": TUNED_EPOCHS, "smooth_head": (0.1, 0.2, 0.3, 0.4)}

    def __init__(self, *, recipe="auto", lr_factor=0.05, epochs=10, lr=0.1, momentum=0.9, weight_decay=5e-4,
                 batch_size=256, sampler="class", epoch_steps="ceil+1", loss="label_aware_smoothing", tau=1.0,
                 beta=0.9999, gamma=0.0, max_margin=0.5, s=30.0, drw_epoch=8, smooth_head=0.3, smooth_tail=0.0,
                 rho=1.2, head="linear", cosine_scale=25.0, seed=0, device="auto"):
        self.recipe, self.lr_factor, self.epoch_steps = recipe, lr_factor, epoch_steps
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.loss, self.tau, self.beta, self.gamma = batch_size, sampler, loss, tau, beta, gamma
        self.max_margin, self.s, self.drw_epoch = max_margin, s, drw_epoch
        self.smooth_head, self.smooth_tail, self.rho = smooth_head, smooth_tail, rho
        self.head, self.cosine_scale, self.seed, self.device = head, cosine_scale, seed, device

    def _recipe(self, data: FitData) -> tuple[str, bool, float]:
        recipe = self.recipe
        if recipe == "auto":
            recipe = "fresh" if data.classifier is None else "mislas"
        if recipe == "mislas" and data.classifier is None:
            raise InvalidInputError("las: recipe='mislas' starts from the checkpoint's classifier "
                                    "(fit(..., classifier=(W, b)); this entry has none); recipe='fresh' "
                                    "trains a new layer")
        if recipe == "mislas" and self.head != "linear":
            raise InvalidParameterError(f"las: recipe='mislas' re-trains the joint linear layer; "
                                        f"head={self.head!r} needs recipe='fresh'")
        self.recipe_ = recipe
        if recipe == "fresh":
            self.scales_ = np.ones(data.num_classes, dtype=np.float32)
            return "random", False, 1.0
        return "joint", True, self.lr_factor
