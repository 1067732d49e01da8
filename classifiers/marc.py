"""Margin calibration of the frozen joint classifier."""
import torch

from .base import FitData, register, require_all_classes
from .losses import make_loss
from .training import GRWRecalibration, softmax_minus_onehot


@register("marc", display="MARC", family="beyond-paper")
class MARC(GRWRecalibration):
    """Margin calibration (MARC): z'_j = omega_j * z_j + beta_j * ||w_j||, z = x W^T + b, W frozen.

    Only the 2C values omega (init 1) and beta (init 0) are learned, with the generalised
    re-weighting loss (cross-entropy weighted by (1/pi_j)^rho, normalised to sum C),
    instance-balanced sampling; 10 epochs, SGD lr 0.05, momentum 0.9, wd 5e-4, batch 256, cosine
    schedule: the official ImageNet-LT configuration (microsoft/robustlearn, marc/config/ImageNet_LT/
    MARC.yaml; its iNaturalist one trains 30 epochs with wd 1e-4).

    Parameters
    ----------
    rho : float, default=1.2
        The loss weights' exponent: w_j ∝ (1 / pi_j)^rho.
    epochs : int, default=10
        Epochs of N draws (0: omega = 1, beta = 0, the joint classifier).
    lr, momentum, weight_decay, batch_size : default=0.05, 0.9, 5e-4, 256
        Learning rate (cosine, stepped per epoch), SGD momentum, L2 decay and draws per step.
    sampler : {"instance", "class", "sqrt", "progressive"}, default="instance"
        The official configuration's instance-balanced sampling.
    seed : int, default=0
        Seeds the draws of the epochs.
    memory_budget : int, default=2**29
        Cache the drawn rows' frozen logits within this many bytes; 0 never caches.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where it runs; "auto" is CUDA if available, else CPU.

    Attributes
    ----------
    omega_, beta_ : ndarray of shape (C,)
        The learned per-class scale and margin.
    weight_ : ndarray of shape (C, D)
        The joint W (frozen); ``bias_`` (C,) the joint b.
    class_draws_ : ndarray of shape (epochs, C)
        Class histogram of each epoch's draws.
    classes_ : ndarray of shape (C,)
        ``arange(C)``: class indices.

    References
    ----------
    .. [1] Wang et al., "Margin Calibration for Long-Tailed Visual Recognition", ACML 2022
       (arXiv 2112.07225).

    Examples
    --------
    Calibrate the joint logits of three classes:

    >>> import numpy as np
    >>> from classifiers.marc import MARC
    >>> y = np.repeat([0, 1, 2], [45, 12, 3])
    >>> X = np.random.default_rng(10).normal(size=(60, 3)) + np.eye(3)[y]
    >>> marc = MARC(epochs=4).fit(X, y, classifier=(np.eye(3), np.zeros(3)))
    >>> marc.omega_.shape, marc.beta_.shape, marc.predict(4 * np.eye(3))
    ((3,), (3,), array([0, 1, 2]))
    """

    def _fit(self, data: FitData) -> None:
        require_all_classes(data, self.name)
        frozen = self._frozen_logits(data)
        loss = make_loss("grw", data.counts, data.device, {"rho": self.rho})
        norms = self._weight.norm(dim=1)
        omega = torch.ones(data.num_classes, device=data.device)
        beta = torch.zeros(data.num_classes, device=data.device)

        def grad(batch):
            # dL/dz' = diag(r) G (softmax_minus_onehot, r the row weights):
            # d omega = (G * z)^T r, d beta = ||w|| * G^T r
            z, labels = frozen.batch(batch)
            g, r = softmax_minus_onehot(torch.addcmul(beta * norms, omega, z), labels), loss.row_weights(labels)
            d_beta = torch.mv(g.T, r).mul_(norms)
            return [torch.mv(g.mul_(z).T, r), d_beta]

        self._train([omega, beta], grad, frozen.epochs)
        self._offset = beta * norms
        self._omega = omega
        self.omega_, self.beta_ = omega.cpu().numpy(), beta.cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out).mul_(self._omega).add_(self._offset)
