"""Classifier re-training on frozen features."""
import math

import torch

from .base import FitData, LTClassifier, register
from .training import Schedule, sgd_train, softmax_grad_


@register("crt")
class CRT(LTClassifier):
    """Classifier re-training (cRT): a fresh linear layer on frozen features, class-balanced sampling.

    Official defaults: 10 epochs of N draws, SGD lr 0.2, momentum 0.9,
    wd 5e-4, batch 512, cosine schedule).

    Kang et al. ICLR 2020, Sec. 4. ``sampler`` (class | sqrt | progressive | instance) is there for
    ablations. Initialisation as nn.Linear (uniform in +-1/sqrt(D)), from ``seed``.
    Fitted: ``weight_`` (C x D), ``bias_`` (C), ``class_draws_`` (epochs x C).
    """

    def __init__(self, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="class", seed=0, device="auto"):
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device

    def _train_logit_offset(self, data: FitData) -> torch.Tensor | None:
        """Added to the logits during training only (balanced softmax overrides this)."""
        return None

    def _post_step(self, weight: torch.Tensor) -> None:
        """Called after every optimiser step (MaxNorm overrides this)."""

    def _fit(self, data: FitData) -> None:
        generator = torch.Generator().manual_seed(int(self.seed))
        bound = 1.0 / math.sqrt(data.X.shape[1])
        shape = (data.num_classes, data.X.shape[1])
        weight = (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(data.device)
        bias = (torch.rand(data.num_classes, generator=generator) * 2 - 1).mul_(bound).to(data.device)
        offset = self._train_logit_offset(data)

        def grad(batch):
            features = data.X[batch]
            logits = bias.addmm(features, weight.T)
            if offset is not None:
                logits += offset
            g = softmax_grad_(logits, data.y[batch])
            return [g.T @ features, g.sum(0)]

        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        self.class_draws_ = sgd_train([weight, bias], grad, data.y, data.counts, schedule,
                                      post_step=lambda: self._post_step(weight))
        self.weight_, self.bias_ = weight, bias

    def _logits(self, X):
        return self.bias_.addmm(X, self.weight_.T)
