"""Margin calibration of the frozen joint classifier."""
import torch

from featcache.sampling import SAMPLERS

from .base import FitData, register, require_all_classes
from .losses import make_loss
from .params import Device, Int, Options, Real
from .training import (DEFAULT_MEMORY_BUDGET, FrozenLogits, OnFrozenLogits, Schedule, draw_epochs, sgd_train,
                       softmax_minus_onehot)


@register("marc")
class MARC(OnFrozenLogits):
    """Margin calibration (MARC): z'_j = omega_j * z_j + beta_j * ||w_j||, z = x W^T + b, W frozen.

    Only the 2C values omega (init 1) and beta (init 0) are learned, with the generalised
    re-weighting loss (cross-entropy weighted by (1/pi_j)^rho, normalised to sum C; rho = 1.2),
    instance-balanced sampling; 10 epochs, SGD lr 0.05, momentum 0.9, wd 5e-4, batch 256, cosine
    schedule: the official ImageNet-LT configuration (microsoft/robustlearn, marc/config/ImageNet_LT/
    MARC.yaml; its iNaturalist one trains 30 epochs with wd 1e-4).

    Wang et al., "Margin Calibration for Long-Tailed Visual Recognition", ACML 2022 (arXiv
    2112.07225). Fitted: ``weight_``, ``bias_`` (the joint W, b), ``omega_``, ``beta_`` (C each),
    ``class_draws_``.
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
        weight, bias = data.classifier
        self._set_linear(weight, bias)
        loss = make_loss("grw", data.counts, data.device, {"rho": self.rho})
        norms = weight.norm(dim=1)
        omega = torch.ones(data.num_classes, device=data.device)
        beta = torch.zeros(data.num_classes, device=data.device)
        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, schedule, data.num_views)
        frozen = FrozenLogits(data.rows_X, data.rows_y, self._weight_t, bias, epochs, self.memory_budget)

        def grad(batch):
            # dL/dz' = diag(r) G (softmax_minus_onehot, r the row weights):
            # d omega = (G * z)^T r, d beta = ||w|| * G^T r
            z, labels = frozen.batch(batch)
            g, r = softmax_minus_onehot(torch.addcmul(beta * norms, omega, z), labels), loss.row_weights(labels)
            d_beta = torch.mv(g.T, r).mul_(norms)
            return [torch.mv(g.mul_(z).T, r), d_beta]

        sgd_train([omega, beta], grad, frozen.epochs, schedule)
        self._offset = beta * norms
        self._omega = omega
        self.omega_, self.beta_ = omega.cpu().numpy(), beta.cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out).mul_(self._omega).add_(self._offset)
