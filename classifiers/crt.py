"""Classifier re-training on frozen features."""
import math

import torch

from featcache.sampling import SAMPLERS

from .base import FitData, LTClassifier, register
from .params import Device, Int, Options, Real
from .training import Schedule, draw_epochs, sgd_train, softmax_minus_onehot


@register("crt")
class CRT(LTClassifier):
    """Classifier re-training (cRT): a fresh linear layer on frozen features, class-balanced sampling.

    Official defaults: 10 epochs of N draws, SGD lr 0.2, momentum 0.9,
    wd 5e-4, batch 512, cosine schedule).

    Kang et al. ICLR 2020, Sec. 4. ``sampler`` (class | sqrt | progressive | instance) is there for
    ablations. Initialisation as nn.Linear (uniform in +-1/sqrt(D)), from ``seed``.
    Fitted: ``weight_`` (C x D), ``bias_`` (C), ``class_draws_`` (epochs x C).
    """

    _parameter_constraints = {
        "epochs": [Int(1)], "lr": [Real(0, closed="neither")], "momentum": [Real(0, 1, closed="left")],
        "weight_decay": [Real(0)], "batch_size": [Int(1)], "sampler": [Options(*SAMPLERS)], "seed": [Int(0)],
        "device": [Device()]}

    def __init__(self, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="class", seed=0, device="auto"):
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device

    def _train_logit_offset(self, data: FitData) -> torch.Tensor | None:
        """Added to the logits during training only (balanced softmax overrides this)."""
        return None

    def _post_step(self, weight_t: torch.Tensor) -> None:
        """Called after every optimiser step with W^T (D x C; MaxNorm overrides this)."""

    def _fit(self, data: FitData) -> None:
        generator = torch.Generator().manual_seed(int(self.seed))
        bound = 1.0 / math.sqrt(data.X.shape[1])
        shape = (data.num_classes, data.X.shape[1])
        weight = (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(data.device)
        bias = (torch.rand(data.num_classes, generator=generator) * 2 - 1).mul_(bound).to(data.device)
        weight_t = weight.T.contiguous()  # trained as D x C: both matmuls of a step run faster
        offset = self._train_logit_offset(data)

        def grad(batch):
            features = data.X.index_select(0, batch).float()
            logits = torch.addmm(bias if offset is None else bias + offset, features, weight_t)
            g = softmax_minus_onehot(logits, data.y.index_select(0, batch))
            return [torch.mm(features.T, g).div_(len(batch)), g.sum(0).div_(len(batch))]

        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, schedule)
        sgd_train([weight_t, bias], grad, epochs, schedule, post_step=lambda: self._post_step(weight_t))
        self._set_linear(weight_t.T.contiguous(), bias)

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out)
