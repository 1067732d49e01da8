"""cRT with the balanced-softmax loss."""
import numpy as np
import torch

from .base import FitData, register, require_all_classes
from .crt import CRT


@register("bsce")
class BalancedSoftmaxCRT(CRT):
    """cRT trained with the balanced-softmax loss (Ren et al. 2020).

    Cross-entropy of (x W^T + b + log n_j) during
    training, plain x W^T + b at test time; instance-balanced sampling by default.

    Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020.
    """

    def __init__(self, epochs=10, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="instance", seed=0, device="auto"):
        super().__init__(epochs, lr, momentum, weight_decay, batch_size, sampler, seed, device)

    def _train_logit_offset(self, data: FitData) -> torch.Tensor:
        require_all_classes(data, "bsce")
        return torch.from_numpy(np.log(data.counts).astype(np.float32)).to(data.device)
