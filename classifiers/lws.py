"""Learnable weight scaling."""
import torch

from .base import FitData, LTClassifier, register
from .training import Schedule, sgd_train, softmax_grad_


@register("lws")
class LWS(LTClassifier):
    """Learnable weight scaling: logits = (x W^T + b) * f_j, only the C scales f learned.

    W, b frozen; f learned with class-balanced sampling (official defaults: 5 epochs of N draws, SGD lr 0.2, momentum 0.9,
    wd 5e-4, batch 512, cosine schedule).

    Kang et al. ICLR 2020, Sec. 4. The frozen logits x W^T + b are computed once; training the
    scales then touches only those. Fitted: ``scales_`` (C,), ``class_draws_`` (epochs x C).
    """

    needs_classifier = True

    def __init__(self, epochs=5, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="class", seed=0, device="auto"):
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device

    def _fit(self, data: FitData) -> None:
        weight, bias = data.classifier
        frozen = bias.addmm(data.X, weight.T)
        scales = torch.ones(data.num_classes, device=data.device)

        def grad(batch):
            logits = frozen[batch]
            g = softmax_grad_(logits * scales, data.y[batch])
            return [(g * logits).sum(0)]

        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        self.class_draws_ = sgd_train([scales], grad, data.y, data.counts, schedule)
        self.weight_, self.bias_, self.scales_ = weight, bias, scales

    def _logits(self, X):
        return self.bias_.addmm(X, self.weight_.T).mul_(self.scales_)
