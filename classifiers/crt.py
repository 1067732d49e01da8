"""Classifier re-training on frozen features: the cRT family (loss x head x init) and `crt`."""
import math
import types

import torch

from .base import FitData, InvalidInputError, register, require_all_classes
from .losses import LOSS_CONSTRAINTS, LOSS_PARAMS, make_loss
from .params import InvalidParameterError, Options, Real
from .training import EPOCH_STEPS_RULE, TUNED_EPOCHS, SGDTrained, TrialStack, lr_range

HEADS = ("linear", "cosine")
INITS = ("random", "joint", "class_mean")


class CRT(SGDTrained):
    """The cRT family: one hand-written SGD loop over a classifier on frozen features.

    Three orthogonal choices: ``loss`` (see classifiers/losses.py), ``head`` (``linear``:
    x W^T + b; ``cosine``: ``cosine_scale`` · cos(x, w_j), no bias) and ``init`` (``random``:
    nn.Linear's uniform ±1/√D from ``seed``; ``joint``: the checkpoint's W, b; ``class_mean``:
    L2-normalised class means, b = 0). ``epochs=0`` is allowed with ``init="joint"`` only (it is
    then the joint classifier). The registered recipes (``crt``, ``bsce``, ``maxnorm``, ``la_loss``,
    ``cb_loss``, ``ldam_drw``, ``las``) subclass this with their papers' defaults;
    :class:`ClassifierRetraining` documents every parameter.

    ``epoch_steps`` (batches per epoch, classifiers/training.py) defaults to ``"ceil"`` here and is
    a declared parameter of the recipes that list ``epoch_steps`` in their constraint table
    (:data:`FAMILY_CONSTRAINTS`; all but ``maxnorm``, whose signature is its own). A recipe may
    train a learnable per-class scaling of the logits with the layer (:meth:`_recipe`; ``las``).
    """

    stackable = True
    _parameter_constraints = {**SGDTrained._parameter_constraints, **LOSS_CONSTRAINTS, "head": [Options(*HEADS)],
                              "cosine_scale": [Real(0, closed="neither")], "init": [Options(*INITS)]}

    def __init__(self, *, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512, sampler="class",
                 loss="ce", tau=1.0, beta=0.9999, gamma=0.0, max_margin=0.5, s=30.0, drw_epoch=8,
                 smooth_head=0.3, smooth_tail=0.0, rho=1.2, head="linear", cosine_scale=25.0, init="random",
                 seed=0, device="auto", epoch_steps="ceil"):
        self.epoch_steps = epoch_steps
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.loss, self.tau, self.beta, self.gamma = batch_size, sampler, loss, tau, beta, gamma
        self.max_margin, self.s, self.drw_epoch = max_margin, s, drw_epoch
        self.smooth_head, self.smooth_tail, self.rho = smooth_head, smooth_tail, rho
        self.head, self.cosine_scale, self.init, self.seed, self.device = head, cosine_scale, init, seed, device

    def _post_step(self, weight_t: torch.Tensor) -> None:
        """Called after every optimiser step with W^T (D x C; MaxNorm overrides this)."""

    def _recipe(self, data: FitData) -> tuple[str, bool, float]:
        """(init, scaling, lr_factor) of this fit: the starting point, whether per-class scales f
        (init 1; logits f_j (x w_j + b_j), MiSLAS's ``LearnableWeightScaling``) train with the layer
        at the full lr, and the factor of the layer's own lr. The family's: ``init``, no scaling, 1."""
        return self.init, False, 1.0

    def _initial(self, data: FitData, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting W^T (D x C, contiguous) and b, fresh tensors the loop may update in place."""
        if init == "joint":
            if data.classifier is None:
                raise InvalidInputError(f"{self.name}: init='joint' needs the checkpoint's classifier "
                                        "(fit(..., classifier=(W, b)); this entry has none)")
            weight, bias = data.classifier
            return weight.T.contiguous(), bias.clone()
        if init == "class_mean":
            sums = torch.zeros(data.num_classes, data.X.shape[1], device=data.device)
            for start in range(0, len(data.X), 2048):  # float16 features: upcast a chunk at a time
                sums.index_add_(0, data.y[start:start + 2048], data.X[start:start + 2048].float())
            means = torch.nn.functional.normalize(sums, dim=1)  # the class mean's direction
            return means.T.contiguous(), torch.zeros(data.num_classes, device=data.device)
        generator = torch.Generator().manual_seed(int(self.seed))
        bound = 1.0 / math.sqrt(data.X.shape[1])
        shape = (data.num_classes, data.X.shape[1])
        weight = (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(data.device)
        bias = (torch.rand(data.num_classes, generator=generator) * 2 - 1).mul_(bound).to(data.device)
        return weight.T.contiguous(), bias  # trained as D x C: both matmuls of a step run faster

    def _fit(self, data: FitData) -> None:
        train_together([self], data)

    def stack_varying(self) -> set[str]:
        """lr, epochs, the loss's own parameters and a recipe's (``per_trial``)."""
        return super().stack_varying() | set(LOSS_PARAMS[self.loss])

    @staticmethod
    def _fit_stack(trials, data, tile=None) -> None:
        train_together(trials, data, tile)

    def _finish(self, weight_t: torch.Tensor, bias: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Classify with the trained W^T (D x C), b and, where they trained, the per-class scales."""
        if scales is not None:  # fold f into the layer: logits f_j (x w_j + b_j) = x (f_j w_j) + f_j b_j
            self.scales_ = scales.cpu().numpy()
            weight_t = weight_t * scales
            bias = bias * scales
        self._set_linear(weight_t.T.contiguous(), None if self.head == "cosine" else bias)
        if self.head == "cosine":
            self._unit_t = torch.nn.functional.normalize(weight_t, dim=0).mul_(self.cosine_scale)

    def _logits(self, X, out):
        if self.head == "cosine":
            torch.mm(torch.nn.functional.normalize(X, dim=1), self._unit_t, out=out)
        else:
            torch.addmm(self._bias, X, self._weight_t, out=out)


def train_together(trials: list[CRT], data: FitData, tile: int | None = None) -> None:
    """Fit every trial on ``data`` in one pass (stacked heads): one gather of the drawn rows per
    step, the K trials' W^T stacked K x D x C, batched matmuls (``tile`` trials per matmul,
    :meth:`~classifiers.training.TrialStack.of`) for their logits and weight gradients, each
    trial's own loss parameters, lr, epochs and schedule (:class:`~classifiers.training.TrialStack`).
    Each trial ends as if fitted alone: bit for bit with one trial per matmul (the CPU's default),
    to float32 rounding otherwise. The trials must share stacking.stack_key; one trial is a plain fit."""
    from .stacking import check_stack
    check_stack(trials)
    recipes = [t._recipe(data) for t in trials]
    init, scaling = recipes[0][:2]
    if any(r[:2] != (init, scaling) for r in recipes):
        raise ValueError("train_together: the trials start from different points")
    first = trials[0]
    for t in trials:
        if t.epochs == 0 and init != "joint":
            raise InvalidParameterError(f"{t.name}: epochs=0 needs init='joint' (got init={init!r}); "
                                        "other initialisations need epochs >= 1")
    if first.loss != "ce":
        require_all_classes(data, first.name)
    cosine = first.head == "cosine"
    if scaling and cosine:
        raise InvalidParameterError(f"{first.name}: the learnable weight scaling needs head='linear'")
    order = CRT.order_stack(trials)
    trials, factors = [trials[k] for k in order], tuple(recipes[k][2] for k in order)
    first = trials[0]  # draws the epochs: the longest trial's, whose first epochs are the others'
    count = len(trials)
    loss = make_loss(first.loss, data.counts, data.device, [t.get_params() for t in trials])
    start_t, start_b = first._initial(data, init)  # every trial starts there (the same seed)
    weight_t = start_t.unsqueeze(0).repeat(count, 1, 1)  # K x D x C
    bias = start_b.unsqueeze(0).repeat(count, 1)  # K x C
    scales = torch.ones_like(bias)
    if scaling:
        params, layer = [weight_t, bias, scales], 2  # the scales train at the full lr
    else:
        params, layer = ([weight_t] if cosine else [weight_t, bias]), 1 if cosine else 2
    lr_factors = None if all(f == 1.0 for f in factors) else \
        (factors,) * layer + ((1.0,) * count,) * (len(params) - layer)
    stack = TrialStack.of(trials, data.device, tile, lr_factors)
    epoch_now = [0]
    X, y = data.rows_X, data.rows_y  # every view's rows; the epochs index them

    def on_epoch(epoch: int) -> None:
        epoch_now[0] = epoch

    held: dict = {}

    def gathered(batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's rows (B x D; unit rows for the cosine head) and labels, gathered once per step
        for all the step's tiles of trials."""
        if held.get("batch") is not batch:
            features = X.index_select(0, batch).float()
            held.update(batch=batch, targets=y.index_select(0, batch),
                        features=torch.nn.functional.normalize(features, dim=1) if cosine else features)
        return held["features"], held["targets"]

    def shifted(z: torch.Tensor, rows: slice) -> torch.Tensor:
        """The logits of trials ``rows`` (t x B x C) with the loss's training offset."""
        return z if loss.offset is None else z + loss.offset[rows].unsqueeze(1)

    def linear_grad(batch, rows):
        features, targets = gathered(batch)
        features = features.expand(rows.stop - rows.start, -1, -1)  # a view: t x B x D
        shift = bias[rows] if loss.offset is None else bias[rows] + loss.offset[rows]  # folded into b: no pass over z
        logits = torch.baddbmm(shift.unsqueeze(1), features, weight_t[rows])
        g = loss.grad(logits, targets, epoch_now[0], first=rows.start)
        return [torch.bmm(features.transpose(1, 2), g).div_(len(batch)), g.sum(1).div_(len(batch))]

    def scaled_grad(batch, rows):
        # z = f * u (+ offset), u = x W^T + b: dL/df_j = sum_i g_ij u_ij, dL/du = g * f
        features, targets = gathered(batch)
        features = features.expand(rows.stop - rows.start, -1, -1)
        raw = torch.baddbmm(bias[rows].unsqueeze(1), features, weight_t[rows])
        g = loss.grad(shifted(raw * scales[rows].unsqueeze(1), rows), targets, epoch_now[0], first=rows.start)
        grad_scales = (g * raw).sum(1).div_(len(batch))
        g.mul_(scales[rows].unsqueeze(1))
        return [torch.bmm(features.transpose(1, 2), g).div_(len(batch)), g.sum(1).div_(len(batch)), grad_scales]

    def cosine_grad(batch, rows):
        # z = s·x̂·w_j/‖w_j‖; dL/dw_j = (s/‖w_j‖)(Σ_i g_ij x̂_i − (Σ_i g_ij cos_ij) w_j/‖w_j‖);
        # scaling the B x C logits and gradients instead of W keeps the passes over W to three
        unit, targets = gathered(batch)
        unit, live, scale = unit.expand(rows.stop - rows.start, -1, -1), weight_t[rows], first.cosine_scale
        norms = live.square().sum(1, keepdim=True).sqrt_().clamp_min_(1e-12)  # 4x faster than norm() here
        cos = torch.bmm(unit, live).div_(norms)
        g = loss.grad(shifted(cos * scale, rows), targets, epoch_now[0], first=rows.start)
        along = (g * cos).sum(1, keepdim=True).div_(norms)
        grad_t = torch.bmm(unit.transpose(1, 2), g).addcmul_(live, along, value=-1.0)
        return [grad_t.mul_(norms.reciprocal_().mul_(scale / len(batch)))]

    def post_step(rows: slice) -> None:  # MaxNorm's projection, on each trial's W^T
        for k in range(rows.start, rows.stop):
            trials[k]._post_step(weight_t[k])

    capped = type(first)._post_step is not CRT._post_step
    grad_fn = scaled_grad if scaling else cosine_grad if cosine else linear_grad
    epochs = first._draw_epochs(data)
    first._train(params, grad_fn, epochs, post_step=post_step if capped else None, on_epoch=on_epoch, stack=stack)
    for k, t in enumerate(trials):
        t.class_draws_ = first.class_draws_[:t.epochs]
        t._finish(weight_t[k], bias[k], scales[k] if scaling else None)


# the constraint table of every registered recipe that takes ``epoch_steps`` (CRT's own table, which
# maxnorm extends with its own signature, leaves it out)
FAMILY_CONSTRAINTS = {**CRT._parameter_constraints, "epoch_steps": EPOCH_STEPS_RULE}


def with_defaults(method, /, **defaults):
    """A copy of the keyword-only ``method`` (an ``__init__``) with other defaults: a recipe is the
    family with its paper's defaults, and scikit-learn reads parameters and defaults from
    ``__init__``'s signature."""
    unknown = set(defaults) - set(method.__kwdefaults__)
    if unknown:
        raise TypeError(f"no parameter {', '.join(sorted(unknown))}")
    copy = types.FunctionType(method.__code__, method.__globals__, method.__name__, method.__defaults__,
                              method.__closure__)
    copy.__kwdefaults__ = {**method.__kwdefaults__, **defaults}
    copy.__qualname__, copy.__doc__ = method.__qualname__, method.__doc__
    return copy


@register("crt", display="cRT", family="paper", diagnostics=("weight_norms",), default=True)
class ClassifierRetraining(CRT):
    """Classifier re-training (cRT): a fresh linear layer on frozen features, class-balanced sampling.

    Official defaults (classifier-balancing ``config/ImageNet_LT/cls_crt.yaml``): 10 epochs of
    int(N / B) batches (the official loop's count), SGD lr 0.2, momentum 0.9, wd 5e-4, batch 512,
    cosine schedule at the paper-era per-epoch order (epoch 1 at lr 0.2); cross-entropy, linear
    head, nn.Linear initialisation from ``seed``. Every choice of
    the family (``loss``, ``head``, ``init``, ``sampler``) is a parameter; with
    ``fit(..., views=...)`` each draw uses one of its sample's views, uniformly.

    Parameters
    ----------
    epochs : int, default=10
        Epochs over the N training samples; 0 only with ``init="joint"``.
    lr : float, default=0.2
        Initial learning rate of the cosine schedule, stepped once per epoch: epoch e (0-based) of
        E trains at 0.5 lr (1 + cos(pi e / E)).
    momentum : float, default=0.9
        SGD momentum, in [0, 1).
    weight_decay : float, default=5e-4
        L2 weight decay added to the gradient.
    batch_size : int, default=512
        Draws per step.
    epoch_steps : {"floor", "ceil", "ceil+1", "floor-1"}, default="floor"
        Batches per epoch: int(N / B) batches of B (classifier-balancing's loop), ceil(N / B) with a
        final partial batch (every draw once; this project's count before it followed the official
        loop), ceil(N / B) + 1 batches of B (MiSLAS's stage 2) or int(N / B) - 1 (MARC's). At least
        one batch, of min(N, B) draws, where the count is 0.
    sampler : {"class", "instance", "sqrt", "progressive"}, default="class"
        Class-balanced (p_j equal), instance-balanced (p_j ∝ n_j), square-root (p_j ∝ √n_j) or
        progressively-balanced sampling.
    loss : {"ce", "logit_adjusted", "class_balanced", "ldam", "label_aware_smoothing", "grw"}, default="ce"
        The training loss (classifiers/losses.py); each reads only its own parameters below.
    tau : float, default=1.0
        ``logit_adjusted``: cross-entropy of z + tau log pi_j.
    beta : float, default=0.9999
        ``class_balanced`` and ``ldam``'s re-weighting: w_j ∝ (1 - beta) / (1 - beta^n_j).
    gamma : float, default=0.0
        ``class_balanced``: focal exponent (0: cross-entropy).
    max_margin : float, default=0.5
        ``ldam``: the largest margin, m_j ∝ n_j^(-1/4).
    s : float, default=30.0
        ``ldam``: scale of the margin-shifted logits.
    drw_epoch : int, default=8
        ``ldam``: the epoch deferred re-weighting starts.
    smooth_head, smooth_tail : float, default=0.3, 0.0
        ``label_aware_smoothing``: the smoothing of the most and of the least frequent class.
    rho : float, default=1.2
        ``grw``: w_j ∝ (1 / pi_j)^rho.
    head : {"linear", "cosine"}, default="linear"
        x W^T + b, or ``cosine_scale`` · cos(x, w_j) without a bias.
    cosine_scale : float, default=25.0
        The cosine head's scale, > 0.
    init : {"random", "joint", "class_mean"}, default="random"
        Starting point: nn.Linear's uniform ±1/√D, the checkpoint's W, b, or the unit class means.
    seed : int, default=0
        Seeds the initialisation and the draws.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to train and predict ("auto" is CUDA when present).

    Attributes
    ----------
    weight_ : ndarray of shape (C, D)
        The trained W.
    bias_ : ndarray of shape (C,) or None
        The trained b (None for the cosine head).
    class_draws_ : ndarray of shape (epochs, C)
        Draws of each class in each epoch.
    classes_ : ndarray of shape (C,)
        The sorted labels of ``y`` (``arange(C)`` with ``class_counts`` or ``classifier``).

    References
    ----------
    .. [1] Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
       ICLR 2020, Sec. 4 (classifier re-training).

    Examples
    --------
    Re-train a linear layer on four classes of 50, 20, 8 and 3 samples (N = 81 < B: one batch of
    81 per epoch):

    >>> import numpy as np
    >>> from classifiers import create
    >>> rng = np.random.default_rng(1)
    >>> y = np.repeat(np.arange(4), [50, 20, 8, 3])
    >>> X = rng.normal(size=(len(y), 6)) + 4 * np.eye(4, 6)[y]
    >>> crt = create("crt", epochs=5).fit(X, y)
    >>> crt.weight_.shape, crt.class_draws_.shape
    ((4, 6), (5, 4))
    >>> crt.predict(X[[0, 50, 70, 78]])
    array([0, 1, 2, 3])
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
    __init__ = with_defaults(CRT.__init__, epoch_steps="floor")
    search_space = {"lr": lr_range(0.2), "epochs": TUNED_EPOCHS}
