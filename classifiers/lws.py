"""Learnable weight scaling."""
import torch

from .base import FitData, register
from .training import DEFAULT_MEMORY_BUDGET, EPOCH_STEPS_RULE, OnFrozenLogits, lr_range


@register("lws", display="LWS", family="paper", diagnostics=("weight_norms",), default=True)
class LWS(OnFrozenLogits):
    """Learnable weight scaling: logits = (x W^T + b) * f_j, only the C scales f learned.

    W, b frozen; f (initialised to 1) learned with class-balanced sampling (official defaults,
    classifier-balancing ``config/ImageNet_LT/cls_lws.yaml``: 5 epochs of int(N / B) batches, SGD
    lr 0.2, momentum 0.9, wd 5e-4 (on f too), batch 512, cosine schedule at the paper-era per-epoch
    order, epoch 1 at lr 0.2). The frozen
    logits x W^T + b of the rows the epochs draw are computed once when they fit in
    ``memory_budget`` bytes (then training the scales touches only those); otherwise each batch's
    logits are recomputed from its features (same result, one B x D x C matmul per step).

    Parameters
    ----------
    epochs : int, default=5
        Epochs of N draws; 0 leaves f = 1, the joint classifier.
    lr, momentum, weight_decay, batch_size : default=0.2, 0.9, 5e-4, 512
        SGD with the cosine schedule, stepped once per epoch (epoch e of E at 0.5 lr (1 + cos(pi e / E))).
    epoch_steps : {"floor", "ceil", "ceil+1", "floor-1"}, default="floor"
        Batches per epoch: int(N / B) of B, the official loop's ("ceil": ceil(N / B), the last one
        partial, the count before; see :class:`~classifiers.crt.ClassifierRetraining`).
    sampler : {"class", "instance", "sqrt", "progressive"}, default="class"
        Class-balanced draws, as the paper's.
    seed : int, default=0
        Seeds the draws.
    memory_budget : int, default=2**29
        Bytes of frozen logits cached (512 MiB); 0 never caches.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to train and predict; "auto" chooses CUDA when present.

    Attributes
    ----------
    scales_ : ndarray of shape (C,)
        The learned f.
    weight_ : ndarray of shape (C, D)
        The joint W (frozen); ``bias_`` (C,) is the joint b.
    class_draws_ : ndarray of shape (epochs, C)
        How often each class was drawn in each epoch.
    cached_logits_ : bool
        Whether the frozen logits were cached (fitted in a stack of trials: the stack's, whose
        cache holds the rows of its longest trial's draws; the logits are the same either way).
    classes_ : ndarray of shape (C,)
        ``arange(C)``, the checkpoint's classes.

    References
    ----------
    .. [1] Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
       ICLR 2020, Sec. 4 (learnable weight scaling).

    Examples
    --------
    On top of a classifier biased to class 0, the head is scaled down and the tail up:

    >>> import numpy as np
    >>> from classifiers.lws import LWS
    >>> y = np.repeat([0, 1, 2], [60, 15, 5])
    >>> X = np.random.default_rng(8).normal(size=(80, 3)) + 2 * np.eye(3)[y]
    >>> lws = LWS(epochs=3).fit(X, y, classifier=(np.diag([3.0, 1.0, 1.0]), np.zeros(3)))
    >>> (lws.scales_ > 1).tolist()
    [False, True, True]
    """

    _parameter_constraints = {**OnFrozenLogits._parameter_constraints, "epoch_steps": EPOCH_STEPS_RULE}
    search_space = {"lr": lr_range(0.2), "epochs": (5, 15, 45)}

    def __init__(self, epochs=5, lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=512,
                 sampler="class", seed=0, memory_budget=DEFAULT_MEMORY_BUDGET, device="auto", epoch_steps="floor"):
        self.epoch_steps = epoch_steps
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device
        self.memory_budget = memory_budget

    stackable = True

    def _fit(self, data: FitData) -> None:
        self._fit_stack([self], data)

    def stack_bytes(self, rows: int, dim: int, num_classes: int) -> int:
        """One trial's scales, gradient and momentum, a step's B x C temporaries and its fitted W
        (the frozen logits are the stack's, within ``memory_budget``)."""
        batch = min(self.batch_size, max(1, rows))
        return 4 * (3 * num_classes + 3 * batch * num_classes + 3 * dim * num_classes)

    @staticmethod
    def _fit_stack(trials, data, tile=None) -> None:
        """Every trial's scales f in one pass: the frozen logits z are computed once for all of them
        (those of the longest trial's draws), each step's batch of z read once; per trial
        d/df_j of the summed cross-entropy, sum_i (softmax(z_i * f)_j - [y_i = j]) z_ij."""
        trials, frozen, stack = LWS._frozen_stack(trials, data, tile)
        scales = torch.ones(len(trials), data.num_classes, device=data.device)
        held: dict = {}

        def grad(batch, rows):
            if held.get("batch") is not batch:  # the batch's frozen logits, read once for every tile
                logits, labels = frozen.batch(batch)
                held.update(batch=batch, logits=logits, labels=labels,
                            chosen=logits.gather(1, labels.unsqueeze(1)).squeeze(1))
            logits, labels = held["logits"].expand(rows.stop - rows.start, -1, -1), held["labels"]
            g = torch.softmax(logits * scales[rows].unsqueeze(1), dim=-1).mul_(logits).sum(1)
            g.index_add_(1, labels, held["chosen"].expand(len(g), -1), alpha=-1.0)
            return [g.div_(len(batch))]

        trials[0]._train([scales], grad, frozen.epochs, stack=stack)
        for k, t in enumerate(trials):
            t.cached_logits_ = frozen.cached
            t._scales = scales[k]
            t.scales_ = scales[k].cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out).mul_(self._scales)
