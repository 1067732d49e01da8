"""Learnable weight scaling."""
import torch

from .base import FitData, LTClassifier, register
from .crt import CRT
from .params import Int
from .training import Schedule, draw_epochs, sgd_train

_CHUNK_ROWS = 8192


@register("lws")
class LWS(LTClassifier):
    """Learnable weight scaling: logits = (x W^T + b) * f_j, only the C scales f learned.

    W, b frozen; f learned with class-balanced sampling (official defaults: 5 epochs of N draws, SGD lr 0.2, momentum 0.9,
    wd 5e-4, batch 512, cosine schedule).

    Kang et al. ICLR 2020, Sec. 4. The frozen logits x W^T + b are computed once; training the
    scales then touches only those. Fitted: ``scales_`` (C,), ``class_draws_`` (epochs x C).
    """

    needs_classifier = True
    _parameter_constraints = {**CRT._parameter_constraints, "epochs": [Int(0)]}  # 0 epochs: the joint classifier

    def __init__(self, epochs=5, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="class", seed=0, device="auto"):
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device

    def _fit(self, data: FitData) -> None:
        weight, bias = data.classifier
        self._set_linear(weight, bias)
        schedule = Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size,
                            self.sampler, self.seed)
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, schedule)
        # frozen logits x W^T + b, once, for the rows the epochs actually draw (class-balanced
        # sampling leaves many head-class rows undrawn)
        rows, local = torch.unique(torch.cat(epochs), return_inverse=True) if epochs else (data.y[:0], data.y[:0])
        frozen = torch.empty(len(rows), data.num_classes, device=data.device)
        for start in range(0, len(rows), _CHUNK_ROWS):  # no full copy of the gathered features
            chunk = rows[start:start + _CHUNK_ROWS]
            torch.addmm(bias, data.X.index_select(0, chunk), self._weight_t, out=frozen[start:start + len(chunk)])
        labels_of_rows = data.y.index_select(0, rows)
        scales = torch.ones(data.num_classes, device=data.device)

        def grad(batch):
            logits = frozen.index_select(0, batch)
            labels = labels_of_rows.index_select(0, batch)
            # d/df_j of the summed cross-entropy: sum_i (p_ij - [y_i = j]) z_ij
            g = torch.softmax(logits * scales, dim=1).mul_(logits).sum(0)
            g.index_add_(0, labels, logits.gather(1, labels.unsqueeze(1)).squeeze(1), alpha=-1.0)
            return [g.div_(len(batch))]

        sgd_train([scales], grad, list(local.split([len(e) for e in epochs])), schedule)
        self._scales = scales
        self.scales_ = scales.cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out).mul_(self._scales)
