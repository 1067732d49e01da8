"""Learnable weight scaling."""
import torch

from featcache.sampling import SAMPLERS

from .base import FitData, register
from .params import Device, Int, Options, Real
from .training import DEFAULT_MEMORY_BUDGET, FrozenLogits, OnFrozenLogits, Schedule, draw_epochs, sgd_train


@register("lws")
class LWS(OnFrozenLogits):
    """Learnable weight scaling: logits = (x W^T + b) * f_j, only the C scales f learned.

    W, b frozen; f learned with class-balanced sampling (official defaults: 5 epochs of N draws, SGD lr 0.2, momentum 0.9,
    wd 5e-4, batch 512, cosine schedule).

    Kang et al. ICLR 2020, Sec. 4. The frozen logits x W^T + b of the rows the epochs draw are
    computed once when they fit in ``memory_budget`` bytes (then training the scales touches only
    those); otherwise each batch's logits are recomputed from its features (same result, one
    B x D x C matmul per step). ``memory_budget=0`` never caches. Fitted: ``scales_`` (C,),
    ``class_draws_`` (epochs x C), ``cached_logits_`` (whether the cache was used).
    """

    _parameter_constraints = {
        "epochs": [Int(0)], "lr": [Real(0, closed="neither")], "momentum": [Real(0, 1, closed="left")],
        "weight_decay": [Real(0)], "batch_size": [Int(1)], "sampler": [Options(*SAMPLERS)], "seed": [Int(0)],
        "memory_budget": [Int(0)], "device": [Device()]}  # 0 epochs: the joint classifier

    def __init__(self, epochs=5, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="class", seed=0, memory_budget=DEFAULT_MEMORY_BUDGET, device="auto"):
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device
        self.memory_budget = memory_budget


    def _fit(self, data: FitData) -> None:
        weight, bias = data.classifier
        self._set_linear(weight, bias)
        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, schedule, data.num_views)
        frozen = FrozenLogits(data.rows_X, data.rows_y, self._weight_t, bias, epochs, self.memory_budget)
        self.cached_logits_ = frozen.cached
        scales = torch.ones(data.num_classes, device=data.device)

        def grad(batch):
            logits, labels = frozen.batch(batch)
            # d/df_j of the summed cross-entropy: sum_i (p_ij - [y_i = j]) z_ij
            g = torch.softmax(logits * scales, dim=1).mul_(logits).sum(0)
            g.index_add_(0, labels, logits.gather(1, labels.unsqueeze(1)).squeeze(1), alpha=-1.0)
            return [g.div_(len(batch))]

        sgd_train([scales], grad, frozen.epochs, schedule)
        self._scales = scales
        self.scales_ = scales.cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out).mul_(self._scales)
