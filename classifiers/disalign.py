"""Distribution alignment of the frozen joint logits."""
import math

import torch

from featcache.sampling import SAMPLERS

from .base import FitData, register, require_all_classes
from .losses import make_loss
from .params import Device, Int, Options, Real
from .training import (DEFAULT_MEMORY_BUDGET, FrozenLogits, OnFrozenLogits, Schedule, draw_epochs, sgd_train,
                       softmax_minus_onehot)

_RECALIBRATE_ROWS = 1024  # rows of logits recalibrated at a time at inference


@register("disalign")
class DisAlign(OnFrozenLogits):
    """DisAlign: z' = (1 + sigma(v.x + v0) * alpha) * z + sigma(v.x + v0) * beta, z = x W^T + b frozen.

    The confidence sigma(v.x + v0) (one scalar per image) gates a per-class affine map of the
    joint logits; v, v0, alpha, beta learned with the generalised re-weighting loss (weights
    proportional to (1/pi_j)^rho, sum C; rho = 1.2), instance-balanced sampling. Initialised as
    the official DisAlignLinear (v = 0.1, v0 as nn.Linear's bias, from ``seed``; beta = 0) except
    alpha = 0 rather than 1: training then starts from the joint classifier instead of doubling its
    logits wherever the confidence is 1, which on real Fashion-MNIST-LT features left the learned
    map unable to leave the joint predictions (Few-shot 0) at any lr we tried. Schedule: the official
    ImageNet-LT one (Megvii-BaseDetection/DisAlign, resx50...disalign.10e/config.py: 10 epochs, SGD
    momentum 0.9, wd 5e-4, batch 256, cosine stepped per epoch) but lr 0.05, half its 0.1: at 0.1 the
    smallest test problem (479 training rows) never left the joint predictions.

    Zhang et al., "Distribution Alignment: A Unified Framework for Long-tail Visual Recognition",
    CVPR 2021. Fitted: ``weight_``, ``bias_`` (the joint W, b), ``confidence_weight_`` (D),
    ``confidence_bias_``, ``logit_scale_`` (alpha, C), ``logit_bias_`` (beta, C), ``class_draws_``.
    """

    _parameter_constraints = {
        "rho": [Real(0)], "epochs": [Int(0)], "lr": [Real(0, closed="neither")],
        "momentum": [Real(0, 1, closed="left")], "weight_decay": [Real(0)], "batch_size": [Int(1)],
        "sampler": [Options(*SAMPLERS)], "seed": [Int(0)], "memory_budget": [Int(0)], "device": [Device()]}

    def __init__(self, rho=1.2, epochs=10, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=256,
                 sampler="instance", seed=0, memory_budget=DEFAULT_MEMORY_BUDGET, device="auto"):
        self.rho, self.epochs, self.lr, self.momentum, self.weight_decay = rho, epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device
        self.memory_budget = memory_budget


    def _fit(self, data: FitData) -> None:
        require_all_classes(data, self.name)
        self._set_linear(*data.classifier)
        loss = make_loss("grw", data.counts, data.device, {"rho": self.rho})
        dim = data.X.shape[1]
        generator = torch.Generator().manual_seed(int(self.seed))
        v = torch.full((dim,), 0.1, device=data.device)
        v0 = ((torch.rand(1, generator=generator) * 2 - 1) / math.sqrt(dim)).to(data.device)
        alpha = torch.zeros(data.num_classes, device=data.device)
        beta = torch.zeros(data.num_classes, device=data.device)
        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, schedule, data.num_views)
        frozen = FrozenLogits(data.rows_X, data.rows_y, self._weight_t, self._bias, epochs, self.memory_budget)

        rows_X = data.rows_X
        longest_batch = min(self.batch_size, max(map(len, frozen.epochs), default=0))
        gathered = torch.empty(longest_batch, dim, dtype=rows_X.dtype, device=data.device)  # reused: no allocator churn

        def grad(batch):
            # z' = z + c u, u = alpha z + beta, c = sigma(v.x + v0); dL/dz' = diag(r) G (softmax_minus_onehot,
            # r the row weights): d beta = G^T (r c), d alpha = (G * z)^T (r c),
            # dL/dc_i = r_i (G_i . beta + (G * z)_i . alpha), d v = sum_i dL/dc_i c_i (1 - c_i) x_i
            z, labels = frozen.batch(batch)
            features = torch.index_select(rows_X, 0, frozen.rows(batch), out=gathered[:len(batch)]).float()
            conf = torch.sigmoid(torch.mv(features, v).add_(v0))
            g = softmax_minus_onehot(torch.addcmul(z, torch.addcmul(beta, alpha, z), conf.unsqueeze(1)), labels)
            r = loss.row_weights(labels)
            gated = r * conf
            d_beta, d_conf = torch.mv(g.T, gated), torch.mv(g, beta)
            g.mul_(z)
            d_alpha = torch.mv(g.T, gated)
            d_conf.add_(torch.mv(g, alpha)).mul_(r).mul_(conf * (1 - conf))
            return [torch.mv(features.T, d_conf), d_conf.sum().reshape(1), d_alpha, d_beta]

        sgd_train([v, v0, alpha, beta], grad, frozen.epochs, schedule)
        self._v, self._v0, self._alpha, self._beta = v, v0, alpha, beta
        self.confidence_weight_, self.confidence_bias_ = v.cpu().numpy(), float(v0)
        self.logit_scale_, self.logit_bias_ = alpha.cpu().numpy(), beta.cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out)
        conf = torch.sigmoid(torch.mv(X, self._v).add_(self._v0)).unsqueeze(1)
        for start in range(0, len(out), _RECALIBRATE_ROWS):  # z += c (alpha z + beta), one small temporary
            rows = out[start:start + _RECALIBRATE_ROWS]
            rows.addcmul_(torch.addcmul(self._beta, self._alpha, rows), conf[start:start + _RECALIBRATE_ROWS])
