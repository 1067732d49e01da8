"""cRT with per-class weight-norm capping."""
import torch

from .base import register
from .crt import CRT
from .params import Real
from .training import TUNED_EPOCHS, lr_range


@register("maxnorm", display="cRT + MaxNorm", family="beyond-paper")
class MaxNormCRT(CRT):
    """cRT with per-class weight-norm capping and tuned weight decay (MaxNorm).

    After every step each class weight w_j is projected back into the ball ||w_j|| <= max_norm
    (w_j <- w_j * min(1, max_norm / ||w_j||)); weight decay is tuned up (default 5e-3);
    class-balanced sampling, otherwise cRT's schedule.

    Parameters
    ----------
    max_norm : float, default=1.0
        Radius of the ball every class weight is kept in, > 0.
    weight_decay : float, default=5e-3
        Ten times cRT's: with the cap, the paper's weight balancing.
    sampler : {"class", "instance", "sqrt", "progressive"}, default="class"
        Class-balanced draws.
    epochs, lr, momentum, batch_size, loss, head, init, seed, device, ...
        The family's other parameters, with the defaults of :class:`~classifiers.crt.ClassifierRetraining`.

    Attributes
    ----------
    weight_ : ndarray of shape (C, D)
        The trained W, every row of norm at most ``max_norm``.
    bias_ : ndarray of shape (C,) or None
        The trained b (not capped; None for the cosine head).
    class_draws_, classes_
        As in :class:`~classifiers.crt.ClassifierRetraining`.

    References
    ----------
    .. [1] Alshammari et al., "Long-Tailed Recognition via Weight Balancing", CVPR 2022 (the
       classifier stage: weight decay + MaxNorm constraint, here on frozen features).

    Examples
    --------
    No class weight outgrows the cap:

    >>> import numpy as np
    >>> from classifiers.maxnorm import MaxNormCRT
    >>> y = np.repeat([0, 1, 2, 3], [32, 16, 8, 4])
    >>> capped = MaxNormCRT(max_norm=0.5, epochs=3).fit(np.random.default_rng(7).normal(size=(60, 4)) * 5, y)
    >>> bool(np.linalg.norm(capped.weight_, axis=1).max() <= 0.5 + 1e-6)
    True
    """

    per_trial = ("max_norm",)
    _parameter_constraints = {**CRT._parameter_constraints, "max_norm": [Real(0, closed="neither")]}
    search_space = {"lr": lr_range(0.2), "epochs": TUNED_EPOCHS, "max_norm": (0.5, 1.0, 2.0)}

    def __init__(self, *, max_norm=1.0, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-3, batch_size=512,
                 sampler="class", loss="ce", tau=1.0, beta=0.9999, gamma=0.0, max_margin=0.5, s=30.0, drw_epoch=8,
                 smooth_head=0.3, smooth_tail=0.0, rho=1.2, head="linear", cosine_scale=25.0, init="random",
                 seed=0, device="auto"):
        self.max_norm = max_norm
        super().__init__(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                         sampler=sampler, loss=loss, tau=tau, beta=beta, gamma=gamma, max_margin=max_margin, s=s,
                         drw_epoch=drw_epoch, smooth_head=smooth_head, smooth_tail=smooth_tail, rho=rho, head=head,
                         cosine_scale=cosine_scale, init=init, seed=seed, device=device)

    def _post_step(self, weight_t: torch.Tensor) -> None:
        norms = weight_t.norm(dim=0, keepdim=True)  # one column per class
        weight_t.mul_(torch.clamp(self.max_norm / norms.clamp_min(1e-12), max=1.0))
