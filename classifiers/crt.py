"""Classifier re-training on frozen features: the cRT family (loss x head x init) and `crt`."""
import math
import types

import torch

from featcache.sampling import SAMPLERS

from .base import FitData, InvalidInputError, LTClassifier, register, require_all_classes
from .losses import LOSS_CONSTRAINTS, make_loss
from .params import Device, Int, InvalidParameterError, Options, Real
from .training import Schedule, draw_epochs, sgd_train

HEADS = ("linear", "cosine")
INITS = ("random", "joint", "class_mean")


class CRT(LTClassifier):
    """The cRT family: one hand-written SGD loop over a classifier on frozen features.

    Three orthogonal choices: ``loss`` (see classifiers/losses.py), ``head`` (``linear``:
    x W^T + b; ``cosine``: ``cosine_scale`` · cos(x, w_j), no bias) and ``init`` (``random``:
    nn.Linear's uniform ±1/√D from ``seed``; ``joint``: the checkpoint's W, b; ``class_mean``:
    L2-normalised class means, b = 0). ``epochs=0`` is allowed with ``init="joint"`` only (it is
    then the joint classifier). Registered recipes subclass this with their papers' defaults.
    Fitted: ``weight_`` (C x D), ``bias_`` (C, None for the cosine head), ``class_draws_``
    (epochs x C). With ``fit(..., views=...)`` each draw uses one of its sample's views, uniformly.
    """

    uses_views = True

    # the SGD schedule's constraints (LWS shares them); the family adds FAMILY_CONSTRAINTS
    _parameter_constraints = {
        "epochs": [Int(1)], "lr": [Real(0, closed="neither")], "momentum": [Real(0, 1, closed="left")],
        "weight_decay": [Real(0)], "batch_size": [Int(1)], "sampler": [Options(*SAMPLERS)], "seed": [Int(0)],
        "device": [Device()]}

    def __init__(self, *, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512, sampler="class",
                 loss="ce", tau=1.0, beta=0.9999, gamma=0.0, max_margin=0.5, s=30.0, drw_epoch=8,
                 smooth_head=0.3, smooth_tail=0.0, rho=1.2, head="linear", cosine_scale=25.0, init="random",
                 seed=0, device="auto"):
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.loss, self.tau, self.beta, self.gamma = batch_size, sampler, loss, tau, beta, gamma
        self.max_margin, self.s, self.drw_epoch = max_margin, s, drw_epoch
        self.smooth_head, self.smooth_tail, self.rho = smooth_head, smooth_tail, rho
        self.head, self.cosine_scale, self.init, self.seed, self.device = head, cosine_scale, init, seed, device

    def _post_step(self, weight_t: torch.Tensor) -> None:
        """Called after every optimiser step with W^T (D x C; MaxNorm overrides this)."""

    def _initial(self, data: FitData) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting W^T (D x C, contiguous) and b, fresh tensors the loop may update in place."""
        if self.init == "joint":
            if data.classifier is None:
                raise InvalidInputError(f"{self.name}: init='joint' needs the checkpoint's classifier "
                                        "(fit(..., classifier=(W, b)); this entry has none)")
            weight, bias = data.classifier
            return weight.T.contiguous(), bias.clone()
        if self.init == "class_mean":
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
        if self.epochs == 0 and self.init != "joint":
            raise InvalidParameterError(f"{self.name}: epochs=0 needs init='joint' (got init={self.init!r}); "
                                        "other initialisations need epochs >= 1")
        if self.loss != "ce":
            require_all_classes(data, self.name)
        loss = make_loss(self.loss, data.counts, data.device, self.get_params())
        weight_t, bias = self._initial(data)
        cosine = self.head == "cosine"
        epoch_now = [0]
        X, y = data.rows_X, data.rows_y  # every view's rows; the epochs index them

        def linear_grad(batch):
            features = X.index_select(0, batch).float()
            logits = torch.addmm(bias if loss.offset is None else bias + loss.offset, features, weight_t)
            g = loss.grad(logits, y.index_select(0, batch), epoch_now[0])
            return [torch.mm(features.T, g).div_(len(batch)), g.sum(0).div_(len(batch))]

        def cosine_grad(batch):
            # z = s·x̂·w_j/‖w_j‖; dL/dw_j = (s/‖w_j‖)(Σ_i g_ij x̂_i − (Σ_i g_ij cos_ij) w_j/‖w_j‖);
            # scaling the B x C logits and gradients instead of W keeps the passes over W to three
            features = torch.nn.functional.normalize(X.index_select(0, batch).float(), dim=1)
            norms = weight_t.square().sum(0).sqrt_().clamp_min_(1e-12)  # 4x faster than norm(dim=0) here
            cos = torch.mm(features, weight_t).div_(norms)
            logits = cos * self.cosine_scale if loss.offset is None else cos * self.cosine_scale + loss.offset
            g = loss.grad(logits, y.index_select(0, batch), epoch_now[0])
            along = (g * cos).sum(0).div_(norms)
            grad_t = torch.mm(features.T, g).addcmul_(weight_t, along, value=-1.0)
            return [grad_t.mul_(norms.reciprocal_().mul_(self.cosine_scale / len(batch)))]

        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, schedule, data.num_views)
        sgd_train([weight_t] if cosine else [weight_t, bias], cosine_grad if cosine else linear_grad, epochs, schedule,
                  post_step=lambda: self._post_step(weight_t), on_epoch=lambda e: epoch_now.__setitem__(0, e))
        self._set_linear(weight_t.T.contiguous(), None if cosine else bias)
        if cosine:
            self._unit_t = torch.nn.functional.normalize(weight_t, dim=0).mul_(self.cosine_scale)

    def _logits(self, X, out):
        if self.head == "cosine":
            torch.mm(torch.nn.functional.normalize(X, dim=1), self._unit_t, out=out)
        else:
            torch.addmm(self._bias, X, self._weight_t, out=out)


FAMILY_CONSTRAINTS = {**CRT._parameter_constraints, "epochs": [Int(0)], **LOSS_CONSTRAINTS,
                      "head": [Options(*HEADS)], "cosine_scale": [Real(0, closed="neither")],
                      "init": [Options(*INITS)]}


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


@register("crt")
class ClassifierRetraining(CRT):
    """Classifier re-training (cRT): a fresh linear layer on frozen features, class-balanced sampling.

    Official defaults: 10 epochs of N draws, SGD lr 0.2, momentum 0.9, wd 5e-4, batch 512, cosine
    schedule; cross-entropy, linear head, nn.Linear initialisation from ``seed``.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020,
    Sec. 4. Every choice of the family (``loss``, ``head``, ``init``, ``sampler``) is a parameter.
    """

    _parameter_constraints = FAMILY_CONSTRAINTS
