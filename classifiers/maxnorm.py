"""cRT with per-class weight-norm capping."""
import torch

from .base import register
from .crt import CRT
from .params import Real


@register("maxnorm")
class MaxNormCRT(CRT):
    """cRT with per-class weight-norm capping and tuned weight decay (MaxNorm).

    After every step each class weight w_j is projected back into the ball
    ||w_j|| <= max_norm; weight decay is tuned up (default 5e-3); class-balanced sampling.

    Alshammari et al., "Long-Tailed Recognition via Weight Balancing", CVPR 2022 (the classifier
    stage: weight decay + MaxNorm constraint, here on frozen features).
    """

    _parameter_constraints = {**CRT._parameter_constraints, "max_norm": [Real(0, closed="neither")]}

    def __init__(self, max_norm=1.0, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-3, batch_size=512,
                 sampler="class", seed=0, device="auto"):
        self.max_norm = max_norm
        super().__init__(epochs, lr, momentum, weight_decay, batch_size, sampler, seed, device)

    def _post_step(self, weight_t: torch.Tensor) -> None:
        norms = weight_t.norm(dim=0, keepdim=True)  # one column per class
        weight_t.mul_(torch.clamp(self.max_norm / norms.clamp_min(1e-12), max=1.0))
