"""Distribution alignment of the frozen joint logits."""
import math

import torch

from .base import FitData, register, require_all_classes
from .losses import make_loss
from .training import GRWRecalibration, softmax_minus_onehot

_RECALIBRATE_ROWS = 1024  # rows of logits recalibrated at a time at inference


@register("disalign", display="DisAlign", family="beyond-paper")
class DisAlign(GRWRecalibration):
    """DisAlign: z' = (1 + sigma(v.x + v0) * alpha) * z + sigma(v.x + v0) * beta, z = x W^T + b frozen.

    The confidence sigma(v.x + v0) (one scalar per image) gates a per-class affine map of the
    joint logits; v, v0, alpha, beta learned with the generalised re-weighting loss (weights
    proportional to (1/pi_j)^rho, sum C), instance-balanced sampling. Initialised as the official
    DisAlignLinear (v = 0.1, v0 as nn.Linear's bias, from ``seed``; beta = 0) except alpha = 0
    rather than 1: training then starts from the joint classifier instead of doubling its logits
    wherever the confidence is 1, which on real Fashion-MNIST-LT features left the learned map
    unable to leave the joint predictions (Few-shot 0) at any lr we tried. Schedule: the official
    ImageNet-LT one (Megvii-BaseDetection/DisAlign, resx50...disalign.10e/config.py: 10 epochs, SGD
    momentum 0.9, wd 5e-4, batch 256, cosine stepped per epoch) but lr 0.05, half its 0.1: at 0.1
    the smallest test problem (479 training rows) never left the joint predictions.

    Parameters
    ----------
    rho : float, default=1.2
        Exponent of the re-weighting, >= 0 (0: plain cross-entropy).
    epochs : int, default=10
        Epochs of N draws; with 0 the model is the joint classifier.
    lr, momentum, weight_decay, batch_size : default=0.05, 0.9, 5e-4, 256
        The optimiser: SGD, cosine learning rate per epoch.
    sampler : {"instance", "class", "sqrt", "progressive"}, default="instance"
        Instance-balanced: the loss re-weights.
    seed : int, default=0
        Seeds v0 and the draws.
    memory_budget : int, default=2**29
        At most this many bytes of cached frozen logits (0: recompute every batch's).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where it trains and predicts ("auto": CUDA when there is one).

    Attributes
    ----------
    confidence_weight_ : ndarray of shape (D,)
        v.
    confidence_bias_ : float
        v0.
    logit_scale_, logit_bias_ : ndarray of shape (C,)
        alpha and beta.
    weight_, bias_ : ndarray of shape (C, D) and (C,)
        The joint W and b, frozen.
    class_draws_ : ndarray of shape (epochs, C)
        Per epoch, the draws of every class.
    classes_ : ndarray of shape (C,)
        ``arange(C)``, W's rows.

    References
    ----------
    .. [1] Zhang et al., "Distribution Alignment: A Unified Framework for Long-tail Visual
       Recognition", CVPR 2021.

    Examples
    --------
    With no epochs the model is the joint classifier; training learns alpha and beta:

    >>> import numpy as np
    >>> from classifiers import create
    >>> rng = np.random.default_rng(9)
    >>> X, y, W = rng.normal(size=(50, 4)), np.repeat([0, 1], [40, 10]), rng.normal(size=(2, 4))
    >>> joint = create("disalign", epochs=0).fit(X, y, classifier=(W, np.zeros(2)))
    >>> np.allclose(joint.logits(X), X @ W.T, atol=1e-5)
    True
    >>> create("disalign", epochs=2).fit(X, y, classifier=(W, np.zeros(2))).logit_scale_.shape
    (2,)
    """

    stackable = True
    per_trial = ("rho",)

    def _fit(self, data: FitData) -> None:
        self._fit_stack([self], data)

    def stack_bytes(self, rows: int, dim: int, num_classes: int) -> int:
        """One trial's v, alpha, beta (with gradients and momentum), a step's B x C temporaries and
        its fitted W (the frozen logits are the stack's, within ``memory_budget``)."""
        batch = min(self.batch_size, max(1, rows))
        return 4 * (3 * dim + 6 * num_classes + 3 * batch * num_classes + 3 * dim * num_classes)

    @staticmethod
    def _fit_stack(trials, data, tile=None) -> None:
        """Every trial's v, v0, alpha, beta in one pass on one set of frozen logits (the longest
        trial's draws), each step's frozen logits and feature rows read once; each trial its own rho."""
        require_all_classes(data, trials[0].name)
        trials, frozen, stack = DisAlign._frozen_stack(trials, data, tile)
        first, count = trials[0], len(trials)
        loss = make_loss("grw", data.counts, data.device, [{"rho": t.rho} for t in trials])
        dim = data.X.shape[1]
        generator = torch.Generator().manual_seed(int(first.seed))
        v = torch.full((count, dim), 0.1, device=data.device)
        v0 = ((torch.rand(1, generator=generator) * 2 - 1) / math.sqrt(dim)).to(data.device).repeat(count, 1)
        alpha = torch.zeros(count, data.num_classes, device=data.device)
        beta = torch.zeros(count, data.num_classes, device=data.device)
        rows_X = data.rows_X
        longest_batch = min(first.batch_size, max(map(len, frozen.epochs), default=0))
        gathered = torch.empty(longest_batch, dim, dtype=rows_X.dtype, device=data.device)  # reused: no allocator churn
        held: dict = {}

        def grad(batch, rows):
            # z' = z + c u, u = alpha z + beta, c = sigma(v.x + v0); dL/dz' = diag(r) G (softmax_minus_onehot,
            # r the row weights): d beta = G^T (r c), d alpha = (G * z)^T (r c),
            # dL/dc_i = r_i (G_i . beta + (G * z)_i . alpha), d v = sum_i dL/dc_i c_i (1 - c_i) x_i
            if held.get("batch") is not batch:  # the step's frozen logits and feature rows, once for every tile
                z, labels = frozen.batch(batch)
                features = torch.index_select(rows_X, 0, frozen.rows(batch), out=gathered[:len(batch)]).float()
                held.update(batch=batch, z=z, labels=labels, features=features)
            z, labels, features = held["z"].expand(rows.stop - rows.start, -1, -1), held["labels"], held["features"]
            conf = torch.sigmoid(torch.mm(v[rows], features.T).add_(v0[rows]))  # t x B
            u = torch.addcmul(beta[rows].unsqueeze(1), alpha[rows].unsqueeze(1), z)
            g = softmax_minus_onehot(torch.addcmul(z, u, conf.unsqueeze(-1)), labels)
            r = loss.row_weights(labels, rows)
            gated = (r * conf).unsqueeze(1)
            d_beta, d_conf = torch.bmm(gated, g).squeeze(1), torch.bmm(g, beta[rows].unsqueeze(-1)).squeeze(-1)
            g.mul_(z)
            d_alpha = torch.bmm(gated, g).squeeze(1)
            d_conf.add_(torch.bmm(g, alpha[rows].unsqueeze(-1)).squeeze(-1)).mul_(r).mul_(conf * (1 - conf))
            return [torch.mm(d_conf, features), d_conf.sum(1, keepdim=True), d_alpha, d_beta]

        first._train([v, v0, alpha, beta], grad, frozen.epochs, stack=stack)
        for k, t in enumerate(trials):
            t._v, t._v0, t._alpha, t._beta = v[k], v0[k], alpha[k], beta[k]
            t.confidence_weight_, t.confidence_bias_ = v[k].cpu().numpy(), float(v0[k])
            t.logit_scale_, t.logit_bias_ = alpha[k].cpu().numpy(), beta[k].cpu().numpy()

    def _logits(self, X, out):
        torch.addmm(self._bias, X, self._weight_t, out=out)
        conf = torch.sigmoid(torch.mv(X, self._v).add_(self._v0)).unsqueeze(1)
        for start in range(0, len(out), _RECALIBRATE_ROWS):  # z += c (alpha z + beta), one small temporary
            rows = out[start:start + _RECALIBRATE_ROWS]
            rows.addcmul_(torch.addcmul(self._beta, self._alpha, rows), conf[start:start + _RECALIBRATE_ROWS])
