"""cRT with per-class weight-norm capping."""
import torch

from .base import register
from .crt import CRT, FAMILY_CONSTRAINTS
from .params import Real


@register("maxnorm")
class MaxNormCRT(CRT):
    """cRT with per-class weight-norm capping and tuned weight decay (MaxNorm).

    After every step each class weight w_j is projected back into the ball
    ||w_j|| <= max_norm; weight decay is tuned up (default 5e-3); class-balanced sampling.

    Alshammari et al., "Long-Tailed Recognition via Weight Balancing", CVPR 2022 (the classifier
    stage: weight decay + MaxNorm constraint, here on frozen features).
    """

    _parameter_constraints = {**FAMILY_CONSTRAINTS, "max_norm": [Real(0, closed="neither")]}

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
