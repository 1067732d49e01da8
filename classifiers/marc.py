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

    stackable = True
    per_trial = ("rho",)

    def _fit(self, data: FitData) -> None:
        self._fit_stack([self], data)

    def stack_bytes(self, rows: int, dim: int, num_classes: int) -> int:
        """One trial's omega and beta (with gradients and momentum), a step's B x C temporaries and
        its fitted W (the frozen logits are the stack's, within ``memory_budget``)."""
        batch = min(self.batch_size, max(1, rows))
        return 4 * (6 * num_classes + 3 * batch * num_classes + 3 * dim * num_classes)

    @staticmethod
    def _fit_stack(trials, data, tile=None) -> None:
        """Every trial's omega and beta in one pass on one set of frozen logits (the longest trial's
        draws), each step's batch of them read once; each trial its own rho."""
        require_all_classes(data, trials[0].name)
        trials, frozen, stack = MARC._frozen_stack(trials, data, tile)
        loss = make_loss("grw", data.counts, data.device, [{"rho": t.rho} for t in trials])
        norms = trials[0]._weight.norm(dim=1)
        omega = torch.ones(len(trials), data.num_classes, device=data.device)
        beta = torch.zeros(len(trials), data.num_classes, device=data.device)
        held: dict = {}

        def grad(batch, rows):
            # dL/dz' = diag(r) G (softmax_minus_onehot, r the row weights):
            # d omega = (G * z)^T r, d beta = ||w|| * G^T r
            if held.get("batch") is not batch:
                held.update(zip(("batch", "z", "labels"), (batch, *frozen.batch(batch))))
            z, labels = held["z"].expand(rows.stop - rows.start, -1, -1), held["labels"]
            shifted = torch.addcmul((beta[rows] * norms).unsqueeze(1), omega[rows].unsqueeze(1), z)
            g, r = softmax_minus_onehot(shifted, labels), loss.row_weights(labels, rows).unsqueeze(1)
            d_beta = torch.bmm(r, g).squeeze(1).mul_(norms)
            return [torch.bmm(r, g.mul_(z)).squeeze(1), d_beta]

        trials[0]._train([omega, beta], grad, frozen.epochs, stack=stack)
        for k, t in enumerate(trials):
            t._offset, t._omega = beta[k] * norms, omega[k]
            t.omega_, t.beta_ = omega[k].cpu().numpy(), beta[k].cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out).mul_(self._omega).add_(self._offset)
