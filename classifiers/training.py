"""The SGD loop shared by the methods that learn on frozen features (the cRT family, LWS,
DisAlign, MARC), and their bases: :class:`SGDTrained` (the schedule's parameters),
:class:`OnFrozenLogits` (learning on the frozen joint logits), :class:`GRWRecalibration`.

Gradients and the optimiser are written by hand, no autograd and no ``torch.optim``, so a step
costs its matmuls and nothing else. The update is PyTorch SGD's rule (L2 weight decay added to
the gradient, momentum buffer started at the first gradient, no dampening or Nesterov), applied
to all parameters at once with torch's multi-tensor ``_foreach`` ops (as torch.optim.SGD's
foreach path does), with the official cosine schedule stepped once per epoch.

Batches per epoch (``epoch_steps``, :data:`EPOCH_STEPS`): each official loop has its own count
for an epoch over N training samples at batch size B, and each is one option here:

- ``"floor"``: int(N / B) batches of B, classifier-balancing's ``run_networks.py`` (cRT, LWS;
  BalancedMetaSoftmax's decoupled stage inherits the loop): ``if step == self.epoch_steps: break``.
- ``"ceil"``: every one of the N draws once, ceil(N / B) batches, the last one N - B int(N / B)
  (this project's loop before it followed the official ones).
- ``"ceil+1"``: ceil(N / B) + 1 batches of B, MiSLAS's ``train_stage2.py`` (``if i > end_steps:
  break`` with ``end_steps = ceil(N / B)``), unless its class-aware loader's max_j n_j C draws
  run out first (nearly balanced data): then those, the last batch partial.
- ``"floor-1"``: int(N / B) - 1 batches of B, MARC's ``run_networks.py`` (the step counter is
  incremented before the same test).

Every epoch takes at least one step: where the official count is 0 (N < B, or N < 2B for
``"floor-1"``) the official loop would not train at all, and here the epoch is one batch of
min(N, B) draws.

Learning rate: the paper-era sequence, epoch e = 0 ... E-1 at 0.5 lr (1 + cos(pi e / E))
(:func:`cosine_lr`): classifier-balancing calls ``CosineAnnealingLR.step()`` at the top of each
epoch, the idiom of the PyTorch its README names (>= 0.4.1; the releases before 1.1), whose
first call yields epoch 0's value, the base lr. The same loop run on PyTorch >= 1.1 skips that first value (the constructor
already set it), so its epochs train at e = 1 ... E and the last one at lr 0."""
from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from featcache.sampling import SAMPLERS, ClassSampler, class_probabilities

from .base import FitData, LTClassifier
from .params import Device, Int, Options, Real


@dataclass
class Schedule:
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    sampler: str
    seed: int
    draws_per_epoch: int | None = None
    epoch_steps: str = "ceil"  # the estimators set theirs (SGDTrained.epoch_steps)


EPOCH_STEPS = ("floor", "ceil", "ceil+1", "floor-1")
# the schedule a tuned sweep searches for the SGD-trained methods (classifiers/tuning.py): each method's
# default lr x {1/4, 1, 4} and epochs {10, 30, 90} (a default's handful of steps on a small or
# many-class problem, and the longer schedules that reach convergence there)
TUNED_EPOCHS = (10, 30, 90)


def lr_range(default: float) -> tuple[float, float, float]:
    """The lrs a tuned sweep tries around a method's default: a quarter, the default, four times it."""
    return (default / 4, default, default * 4)
EPOCH_STEPS_RULE = [Options(*EPOCH_STEPS)]  # one rule object, declared by every method that takes the option


def epoch_batches(draws: int, batch_size: int, rule: str, loader_draws: int | None = None) -> tuple[int, int]:
    """(batches, draws used) of one epoch of ``draws`` (N) samples under an ``epoch_steps`` rule
    (module docstring); at least one batch, of min(N, B) draws where the rule's count is 0.
    ``loader_draws``: what the official class-aware loader yields per epoch (max_j n_j C), which
    caps ``"ceil+1"`` (MiSLAS's loop ends with its loader, on a last partial batch, when that
    comes first: on nearly balanced data)."""
    full, ceil = draws // batch_size, -(-draws // batch_size)
    if rule == "ceil":
        return ceil, draws
    if rule == "ceil+1":
        used = (ceil + 1) * batch_size if loader_draws is None else min((ceil + 1) * batch_size, loader_draws)
        return -(-used // batch_size), used
    batches = {"floor": full, "floor-1": full - 1}[rule]
    if batches < 1:
        return 1, min(draws, batch_size)
    return batches, batches * batch_size


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """The lr of epoch ``epoch`` (0-based) of ``epochs``: CosineAnnealingLR(T_max=epochs, eta_min=0)
    stepped once at the top of each epoch as on PyTorch < 1.1, so epoch 0 trains at ``base``."""
    return 0.5 * base * (1 + math.cos(math.pi * epoch / epochs))


def softmax_minus_onehot(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """G = softmax(logits) - onehot(targets): row i is d CE(z_i, y_i) / d z_i (logits B x C, or
    a x B x C for a trials of a stack). For a weighted batch loss L = sum_i r_i CE_i a parameter's
    gradient is then a matrix-vector product with r (e.g. dL/d(bias) = G^T r), without a pass to
    weight G's rows."""
    probs = torch.softmax(logits, dim=-1)
    index = targets.expand(logits.shape[:-1]).unsqueeze(-1)
    minus_one = torch.full(index.shape, -1.0, device=probs.device, dtype=probs.dtype)
    return probs.scatter_add_(-1, index, minus_one)  # cheaper than indexed assignment


def draw_epochs(labels: torch.Tensor, counts: np.ndarray, schedule: Schedule,
                num_views: int = 1) -> tuple[list[torch.Tensor], np.ndarray]:
    """Every epoch's sample indices, and the per-epoch class histogram of the draws used (E x C).

    An epoch draws N samples (``schedule.draws_per_epoch``, default the training-set size) and
    keeps the ones its ``schedule.epoch_steps`` batches use (:func:`epoch_batches`): the first
    B int(N / B) for ``"floor"``, so those batches are the ``"ceil"`` epoch's full batches; the
    rules with more than N draws (``"ceil+1"``, up to max_j n_j C) draw that many.

    With ``num_views`` K > 1 each drawn sample i then gets one of its views v uniformly (a second
    generator seeded from ``schedule.seed``, so the samples drawn are those of K = 1) and the index
    becomes the row v * N + i of the view-major rows (FitData.rows_X)."""
    num_classes = len(counts)
    sampler = ClassSampler(labels.cpu().numpy(), num_classes, labels.device)
    generator = torch.Generator().manual_seed(int(schedule.seed))
    draws = schedule.draws_per_epoch or len(labels)
    _, used = epoch_batches(draws, schedule.batch_size, schedule.epoch_steps,
                            loader_draws=int(np.max(counts)) * num_classes if len(counts) else None)
    epochs = [sampler.draw(class_probabilities(counts, schedule.sampler, epoch, schedule.epochs),
                           max(draws, used), generator)[:used]
              for epoch in range(schedule.epochs)]
    histogram = np.stack([torch.bincount(labels[i], minlength=num_classes).cpu().numpy() for i in epochs]) \
        if epochs else np.zeros((0, num_classes), dtype=np.int64)
    if num_views > 1:
        view_generator = torch.Generator().manual_seed(int(np.random.SeedSequence([int(schedule.seed), 1])
                                                           .generate_state(1)[0]))
        epochs = [e + torch.randint(0, num_views, (len(e),), generator=view_generator).to(e.device) * len(labels)
                  for e in epochs]
    return epochs, histogram


@dataclass(frozen=True)
class TrialStack:
    """K trials trained in one pass by :func:`sgd_train`: the first axis of every parameter is the
    trial. Each trial has its own base lr, number of epochs (at least 1, non-increasing in k, so the
    trials still training are always the first ones) and per-parameter lr factors; the rest of the
    schedule (momentum, weight decay, the batches) is shared. Each step runs ``tile`` trials at a
    time: the gradient of a tile, then its update (all of them: one launch each on a GPU; one on
    the CPU, where a trial's parameters and temporaries then stay in cache between the two)."""

    epochs: tuple[int, ...]
    lrs: tuple[float, ...]
    lr_factors: tuple[tuple[float, ...], ...] | None = None  # [parameter][trial]; None: all 1
    tile: int = 1

    def active(self, epoch: int) -> int:
        """How many trials (the first ones) still train in ``epoch``."""
        return sum(epochs > epoch for epochs in self.epochs)

    def steps(self, epoch: int, params: list[torch.Tensor]) -> list[float | torch.Tensor]:
        """Per parameter, the lr of ``epoch`` (:func:`cosine_lr` of each trial's own schedule, times
        its factor): one number for a single trial, else one per active trial, shaped to multiply
        the parameter's active trials."""
        lrs = [cosine_lr(self.lrs[k], epoch, self.epochs[k]) for k in range(self.active(epoch))]
        factors = self.lr_factors or [(1.0,) * len(self.lrs)] * len(params)
        if len(self.lrs) == 1:
            return [lrs[0] * f[0] for f in factors]
        return [torch.tensor([lr * f[k] for k, lr in enumerate(lrs)], device=p.device).view(-1, *[1] * (p.dim() - 1))
                for f, p in zip(factors, params)]

    @classmethod
    def of(cls, trials: list, device: torch.device, tile: int | None = None, lr_factors=None) -> "TrialStack":
        """The stack of ``trials`` (estimators, the longest schedule first); ``tile``: trials per
        matmul, default the whole stack on a GPU (one launch for all) and one on the CPU (the
        arithmetic is the same, and one trial's temporaries stay in cache)."""
        return cls(tuple(t.epochs for t in trials), tuple(float(t.lr) for t in trials), lr_factors,
                   tile or (len(trials) if device.type == "cuda" else 1))

    def tiles(self, epoch: int) -> list[slice]:
        """The active trials of ``epoch``, ``tile`` at a time."""
        active = self.active(epoch)
        return [slice(k, min(active, k + self.tile)) for k in range(0, active, self.tile)]


def sgd_train(params: list[torch.Tensor], grad_fn: Callable, epochs: list[torch.Tensor], schedule: Schedule,
              post_step: Callable | None = None, on_epoch: Callable[[int], None] | None = None,
              lr_factors: list[float] | None = None, stack: TrialStack | None = None) -> None:
    """Train ``params`` in place over the epochs' indices, ``schedule.batch_size`` at a time (the
    epochs hold what :func:`draw_epochs` kept for ``schedule.epoch_steps``); epoch e at
    :func:`cosine_lr` (e = 0 at the base lr). ``on_epoch(epoch)`` runs before each epoch (deferred
    re-weighting switches weights there). ``lr_factors``: one per parameter, its lr is
    ``factor`` x the epoch's (torch.optim's parameter groups; MiSLAS trains its classifier at 0.05 x
    the scaling layer's). ``grad_fn(indices)`` must return new tensors it keeps no reference to:
    they are updated in place, and the first step's become the momentum buffers.

    ``stack``: several trials at once (:class:`TrialStack`, which then holds the lrs, epochs and
    factors; ``schedule.lr`` and ``lr_factors`` are unused), each parameter's first axis the trial.
    Each step then calls ``grad_fn(indices, trials)`` and ``post_step(trials)`` once per tile of
    the active trials (``trials`` a slice of them, the same ``indices`` object for every tile of
    a step), and only those trials move; each trial's numbers are those of its own run. Without
    a stack the one trial's parameters are trained as a stack of one over views of them."""
    if stack is None:
        stack = TrialStack((len(epochs),), (schedule.lr,), None if lr_factors is None else tuple((f,) for f in lr_factors))
        params, one_grad, one_post = [p.unsqueeze(0) for p in params], grad_fn, post_step
        grad_fn = lambda batch, trials: [g.unsqueeze(0) for g in one_grad(batch)]  # noqa: E731
        post_step = None if one_post is None else lambda trials: one_post()  # noqa: E731
    buffers = [torch.zeros_like(p) for p in params] if schedule.momentum else None
    for epoch, indices in enumerate(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        tiles, steps = stack.tiles(epoch), stack.steps(epoch, params)
        uniform = all(isinstance(step, float) for step in steps) and len(set(steps)) == 1
        for start in range(0, len(indices), schedule.batch_size):
            batch = indices[start:start + schedule.batch_size]
            for trials in tiles:
                grads = grad_fn(batch, trials)
                live = [p[trials] for p in params]
                if schedule.weight_decay:
                    torch._foreach_add_(grads, live, alpha=schedule.weight_decay)
                if buffers is not None:  # zeros at first: the first step's buffer is its gradient
                    held = [b[trials] for b in buffers]
                    torch._foreach_mul_(held, schedule.momentum)
                    torch._foreach_add_(held, grads)
                    grads = held
                if uniform:  # one trial, one lr for all its parameters: one launch
                    torch._foreach_add_(live, grads, alpha=-steps[0])
                for param, grad, step in zip(live, grads, steps) if not uniform else ():
                    if isinstance(step, float):
                        param.add_(grad, alpha=-step)
                    else:
                        param.addcmul_(grad, step[trials], value=-1.0)
                if post_step is not None:
                    post_step(trials)


def zeros_on_huge_pages(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A float32 rows x cols tensor of zeros; in CPU memory, an anonymous mapping advised to use
    transparent huge pages where the OS offers them (Linux). Random row gathers from a large array
    mostly wait on TLB misses, far fewer over 2 MiB pages (docs/performance.md: marc, disalign, lws).
    torch's own switch, THP_MEM_ALLOC_ENABLE, is read once per process before any allocation and
    applies to all of them."""
    nbytes = rows * cols * 4
    if device.type != "cpu" or not nbytes or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(rows, cols, device=device)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: small pages, same zeros
        pass
    tensor = torch.frombuffer(memory, dtype=torch.float32).view(rows, cols)  # keeps the mapping alive
    return tensor.zero_()  # fault the pages in here, not inside the threaded matmul that fills them


DEFAULT_MEMORY_BUDGET = 2**29  # bytes of frozen logits a method may cache (512 MiB)


class FrozenLogits:
    """The frozen logits x W^T + b of the rows the epochs draw, for methods that learn on top of
    them (LWS, DisAlign, MARC). Cached once when they fit in ``memory_budget`` bytes (class-balanced
    sampling leaves many head-class rows undrawn, so only drawn rows count); otherwise each batch's
    are recomputed from its features. Both give the same numbers.

    ``epochs``: the batches to iterate (indices into the cache, or into X); ``batch(indices)``:
    (logits B x C, labels B); ``rows(indices)``: their row ids into X."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor,
                 epochs: list[torch.Tensor], memory_budget: int, chunk_rows: int = 8192):
        self.X, self.y, self.weight_t, self.bias = X, y, weight_t, bias
        drawn, local = torch.unique(torch.cat(epochs), return_inverse=True) if epochs else (y[:0], y[:0])
        self.cached = len(drawn) * len(bias) * 4 <= memory_budget
        if not self.cached:
            self.epochs = epochs
            return
        self.drawn, self.epochs = drawn, list(local.split([len(e) for e in epochs]))
        self.logits = zeros_on_huge_pages(len(drawn), len(bias), X.device)
        for start in range(0, len(drawn), chunk_rows):  # no full copy of the gathered features
            chunk = drawn[start:start + chunk_rows]
            torch.addmm(bias, X.index_select(0, chunk).float(), weight_t, out=self.logits[start:start + len(chunk)])
        self.labels = y.index_select(0, drawn)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached:
            return self.logits.index_select(0, indices), self.labels.index_select(0, indices)
        logits = torch.addmm(self.bias, self.X.index_select(0, indices).float(), self.weight_t)
        return logits, self.y.index_select(0, indices)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.drawn.index_select(0, indices) if self.cached else indices


class SGDTrained(LTClassifier):
    """Base of the estimators trained by :func:`sgd_train` (the cRT family, LWS, DisAlign, MARC).

    Declares the schedule's parameters once: ``epochs`` (0 leaves the starting point untrained),
    ``lr``, ``momentum``, ``weight_decay``, ``batch_size``, ``sampler``, ``seed`` and ``device``;
    a subclass adds its own to ``_parameter_constraints``. Each draw uses one of its sample's
    views, uniformly (``fit(..., views=...)``); ``class_draws_`` (epochs x C) counts the draws.

    ``epoch_steps`` (batches per epoch, :data:`EPOCH_STEPS`) is a parameter of the methods that
    declare it (``EPOCH_STEPS_RULE`` in their constraint table: the cRT family's recipes, LWS); the
    others train ``"ceil"`` epochs, every draw once (the class attribute)."""

    uses_views = True
    epoch_steps = "ceil"
    # trials of one stack (classifiers/stacking.py) may differ in lr, epochs and these parameters
    per_trial: tuple[str, ...] = ()
    stackable = False  # True where the class's _fit_stack(trials, data, tile) fits several trials in one pass
    _parameter_constraints = {
        "epochs": [Int(0)], "lr": [Real(0, closed="neither")], "momentum": [Real(0, 1, closed="left")],
        "weight_decay": [Real(0)], "batch_size": [Int(1)], "sampler": [Options(*SAMPLERS)], "seed": [Int(0)],
        "device": [Device()]}

    def memory_estimate(self, rows: int, dim: int, num_classes: int, eval_rows: int | None = None) -> int:
        """Beyond the base: one SGD step's float32 B x C arrays (the batch's logits, softmax minus
        one-hot, a temporary of the loss or the gradient), B the batch size, or every row where an
        epoch draws fewer ("ceil+1" epochs always end on a full batch)."""
        batch = self.batch_size if self.epoch_steps == "ceil+1" else min(self.batch_size, max(1, rows))
        return super().memory_estimate(rows, dim, num_classes, eval_rows) + 3 * 4 * batch * num_classes

    def _schedule(self) -> Schedule:
        return Schedule(self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size, self.sampler,
                        self.seed, epoch_steps=self.epoch_steps)

    def stack_varying(self) -> set[str]:
        """The parameters the trials of one stack may differ in (a stack shares all the others)."""
        return {"lr", "epochs", *self.per_trial}

    def stack_bytes(self, rows: int, dim: int, num_classes: int) -> int:
        """Bytes one trial adds to a stack: its training state (W^T, its gradient and momentum, D x C
        each), a step's B x C logits, gradient and two loss temporaries, and its fitted C x D
        matrices (the weights, W^T for inference, the numpy copy) until the caller is done with it."""
        batch = self.batch_size if self.epoch_steps == "ceil+1" else min(self.batch_size, max(1, rows))
        return 4 * (6 * dim * num_classes + 4 * batch * num_classes)

    @staticmethod
    def order_stack(trials: list["SGDTrained"]) -> list[int]:
        """The trials' positions, the longest schedule first: it draws the epochs (a shorter trial's
        are its first ones), and the trials still training are always the first ones (TrialStack)."""
        return sorted(range(len(trials)), key=lambda k: -trials[k].epochs)

    def _draw_epochs(self, data: FitData) -> list[torch.Tensor]:
        """Every epoch's indices into ``data.rows_X``, drawn by ``sampler``; sets ``class_draws_``."""
        epochs, self.class_draws_ = draw_epochs(data.y, data.counts, self._schedule(), data.num_views)
        return epochs

    def _train(self, params: list[torch.Tensor], grad_fn: Callable[[torch.Tensor], list[torch.Tensor]],
               epochs: list[torch.Tensor], **hooks) -> None:
        """:func:`sgd_train` under this estimator's schedule (``hooks``: ``post_step``, ``on_epoch``,
        ``lr_factors``, ``stack``)."""
        sgd_train(params, grad_fn, epochs, self._schedule(), **hooks)


class OnFrozenLogits(SGDTrained):
    """Base of the methods that learn on the frozen joint logits (:class:`FrozenLogits`), within
    ``memory_budget`` bytes of cached logits."""

    needs_classifier = True
    _parameter_constraints = {**SGDTrained._parameter_constraints, "memory_budget": [Int(0)]}

    def memory_estimate(self, rows: int, dim: int, num_classes: int, eval_rows: int | None = None) -> int:
        """The frozen-logit cache up to its budget, and the drawn indices."""
        cache = min(self.memory_budget, 4 * rows * num_classes)
        return super().memory_estimate(rows, dim, num_classes, eval_rows) + cache + 16 * rows * max(1, self.epochs)

    @staticmethod
    def _frozen_stack(trials: list["OnFrozenLogits"], data: FitData, tile: int | None):
        """What a stack of these methods' trials starts from: the trials, the longest first; the
        frozen logits of its draws (one set for all: a shorter trial's epochs are its first ones);
        the :class:`TrialStack`. Every trial classifies with the checkpoint's W, b."""
        from .stacking import check_stack
        check_stack(trials)
        trials = [trials[k] for k in SGDTrained.order_stack(trials)]
        first = trials[0]
        frozen = first._frozen_logits(data)
        for trial in trials[1:]:
            trial._set_linear(*data.classifier)
            trial.class_draws_ = first.class_draws_[:trial.epochs]
        return trials, frozen, TrialStack.of(trials, data.device, tile)

    def _frozen_logits(self, data: FitData) -> FrozenLogits:
        """Classify with the checkpoint's W, b (``weight_``, ``bias_``), draw the epochs, and return
        the frozen logits of the rows they draw."""
        self._set_linear(*data.classifier)
        return FrozenLogits(data.rows_X, data.rows_y, self._weight_t, self._bias, self._draw_epochs(data),
                            self.memory_budget)


class GRWRecalibration(OnFrozenLogits):
    """Base of DisAlign and MARC: a few values per class on top of the frozen joint logits, learned
    with the generalised re-weighting loss (``rho``) under the official ImageNet-LT schedule.
    Their epochs are ``"ceil"`` (every draw once, as before the official counts were offered);
    MARC's official loop runs int(N / B) - 1 batches (``"floor-1"``), docs/methods.md."""

    _parameter_constraints = {"rho": [Real(0)], **OnFrozenLogits._parameter_constraints}
    search_space = {"lr": lr_range(0.05), "epochs": TUNED_EPOCHS, "rho": (0.8, 1.2, 1.6)}

    def __init__(self, rho=1.2, epochs=10, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=256,
                 sampler="instance", seed=0, memory_budget=DEFAULT_MEMORY_BUDGET, device="auto"):
        self.rho, self.epochs, self.lr, self.momentum, self.weight_decay = rho, epochs, lr, momentum, weight_decay
        self.batch_size, self.sampler, self.seed, self.device = batch_size, sampler, seed, device
        self.memory_budget = memory_budget
