"""The estimator contract and the registry every Stage 2 method is enumerated from.

Every method is a scikit-learn classifier (``BaseEstimator`` + ``ClassifierMixin``): ``__init__``
stores hyper-parameters only (declared in ``_parameter_constraints``, checked by :func:`create` and
by ``fit``); ``fit(X, y, *, class_counts=None, classifier=None, val=None)`` returns self; learned
state ends in ``_`` (numpy arrays); ``logits`` returns the logits (N x C, float32, columns in
``classes_`` order); ``decision_function`` the same, except that for two classes it follows
scikit-learn's convention (one column: logit of ``classes_[1]`` minus logit of ``classes_[0]``);
``predict`` returns labels from ``y``; ``predict_proba`` the softmax; ``score`` is accuracy.

Labels: without ``classifier`` / ``class_counts``, ``classes_`` are the sorted unique labels of
``y`` (strings, any integers). With either, ``y`` holds class indices 0 ... C-1 (the rows of the
checkpoint's W, the entries of ``class_counts``) and ``classes_`` is ``arange(C)``.

Torch stays inside: the sweep hands tensors (already on the device) straight to ``fit`` and
``decision_function``, which skips the scikit-learn input checks and their pass over X.

Augmented views: ``fit(..., views=V)`` with V (K x N x D) the K cached views of the N training
samples (``V[0]`` = X, the eval transform's). Methods with ``uses_views`` (the SGD-trained ones)
draw a sample by their sampler, then one of its K views uniformly; the others use X only."""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn import exceptions as sklearn_exceptions
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featcache.distributed import resolve_device
from featcache.errors import FeatcacheError

from .params import check_params

REGISTRY: dict[str, type["LTClassifier"]] = {}
_ROW_CHUNK = 16384
_HALF_CHUNK = 2048  # rows of float16 features upcast at a time: small temporaries, which malloc reuses
_FLOAT_DTYPES = (np.float32, np.float64, np.float16)


class InvalidInputError(FeatcacheError, ValueError):
    """Training or inference data that a method cannot use (shape, labels, missing inputs)."""


class NotFittedError(FeatcacheError, sklearn_exceptions.NotFittedError):
    """predict / decision_function before fit."""


# the order tables list methods in: the paper's (Kang et al. 2020) first, then the methods beyond it,
# then reference baselines; registration order within a family
FAMILIES = ("paper", "beyond-paper", "reference")
# what the sweep records for the plots, beyond every method's per-class accuracy
DIAGNOSTICS = ("weight_norms", "tau_curve")


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows of a method besides its class (``cls.info``).

    ``display``: its name in tables and plots. ``family``: one of :data:`FAMILIES`.
    ``diagnostics``: which of :data:`DIAGNOSTICS` the sweep records for it (``weight_norms``: the
    per-class norms of ``weight_``; ``tau_curve``: balanced top-1 over its tau grid on val and the
    eval split). ``default``: in the default method set (the benchmark's). ``needs_classifier``,
    ``chosen_on_val`` (the parameters whose ``"auto"`` is chosen on the val split) and
    ``search_space`` (parameter -> the values a tuned sweep tries, classifiers/tuning.py) are read
    from the class when it registers."""

    name: str
    display: str
    family: str
    diagnostics: tuple[str, ...] = ()
    default: bool = False
    needs_classifier: bool = False
    chosen_on_val: tuple[str, ...] = ()
    search_space: dict = field(default_factory=dict)


def register(name: str, *, display: str, family: str, diagnostics: tuple[str, ...] = (), default: bool = False):
    """Class decorator: register an estimator under ``name`` with its :class:`MethodInfo`."""
    if family not in FAMILIES:
        raise ValueError(f"register({name!r}): family {family!r} is not one of {', '.join(FAMILIES)}")
    unknown = sorted(set(diagnostics) - set(DIAGNOSTICS))
    if unknown:
        raise ValueError(f"register({name!r}): unknown diagnostics {', '.join(unknown)}; "
                         f"choose from {', '.join(DIAGNOSTICS)}")

    def wrap(cls):
        cls.name = name
        cls.info = MethodInfo(name, display, family, tuple(diagnostics), default, cls.needs_classifier,
                              tuple(cls.auto_params), {k: tuple(v) for k, v in cls.search_space.items()})
        REGISTRY[name] = cls
        return cls
    return wrap


def display_name(method: str) -> str:
    """The method's name in tables and plots; an unregistered name as it is."""
    return REGISTRY[method].info.display if method in REGISTRY else method


def default_methods() -> list[str]:
    """The registered methods marked ``default``, in registration order."""
    return [name for name, cls in REGISTRY.items() if cls.info.default]


def create(name: str, **params) -> "LTClassifier":
    """An estimator by registered name, its parameters checked; unknown names or parameters list
    the valid ones."""
    if name not in REGISTRY:
        raise FeatcacheError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    valid = cls.param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise FeatcacheError(f"method {name!r} has no parameter {', '.join(unknown)}; "
                             f"its parameters are {', '.join(valid)}")
    estimator = cls(**params)
    check_params(estimator)
    return estimator


def available() -> list[dict]:
    """Name, one-line description, parameters with defaults and the :class:`MethodInfo` fields
    (display, family, diagnostics, default, needs_classifier, chosen_on_val) of every registered method."""
    return [{"name": name, "description": (cls.__doc__ or "").strip().splitlines()[0],
             "params": cls.defaults(), **{k: v for k, v in asdict(cls.info).items() if k != "name"}}
            for name, cls in REGISTRY.items()]


def as_tensor(X, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """numpy or torch input on ``device``; float16 (or float64) features are cast to float32."""
    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=dtype)
    X = np.ascontiguousarray(X)
    with warnings.catch_warnings():  # read-only arrays (memmaps): never written to here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X).to(device=device, dtype=dtype)


def as_features(X, device: torch.device) -> torch.Tensor:
    """Features on ``device``: float16 stays float16 (half the memory; methods upcast each chunk or
    batch they use with ``.float()``), anything else becomes float32."""
    half = X.dtype in (torch.float16, np.float16)
    return as_tensor(X, device, torch.float16 if half else torch.float32)


def feature_mean(X: torch.Tensor, chunk: int = _HALF_CHUNK) -> torch.Tensor:
    """Mean row of X (N x D), accumulated chunk by chunk in float32 (X may be float16)."""
    total = torch.zeros(X.shape[1], dtype=torch.float32, device=X.device)
    for start in range(0, len(X), chunk):
        total += X[start:start + chunk].float().sum(0)
    return total / len(X)


@dataclass
class FitData:
    """What ``_fit`` receives, validated and on the estimator's device; ``y`` are class indices.
    ``X`` (and the val features) are float32 or float16: upcast chunks / batches with ``.float()``."""

    X: torch.Tensor
    y: torch.Tensor
    counts: np.ndarray
    num_classes: int
    classifier: tuple[torch.Tensor, torch.Tensor] | None
    val: tuple[torch.Tensor, torch.Tensor] | None
    device: torch.device
    views: torch.Tensor | None = None  # (K * N) x D, view-major: row v * N + i = view v of sample i

    @property
    def num_views(self) -> int:
        return 1 if self.views is None else len(self.views) // len(self.X)

    @property
    def rows_X(self) -> torch.Tensor:
        """The features the SGD loops index: every view's rows (just X for one view)."""
        return self.X if self.views is None else self.views

    @property
    def rows_y(self) -> torch.Tensor:
        """The label of every row of :attr:`rows_X`."""
        return self.y if self.views is None else self.y.repeat(self.num_views)


class LTClassifier(ClassifierMixin, BaseEstimator):
    """Base class: parameter and input validation, label encoding, device handling, chunked inference."""

    name = "?"
    needs_classifier = False
    uses_views = False  # True: fit(views=...) trains on augmented views (see the module docstring)
    auto_params: tuple[str, ...] = ()  # parameters that accept "auto" (chosen on the val split)
    # parameter -> the values a tuned sweep tries (lr, epochs where it trains; its own parameters)
    search_space: dict[str, tuple] = {}
    _parameter_constraints: dict = {}
    # scikit-learn estimator checks this method is known to fail, with the reason (see tests)
    _expected_failed_checks: dict[str, str] = {}

    def memory_estimate(self, rows: int, dim: int, num_classes: int, eval_rows: int | None = None) -> int:
        """Bytes ``fit`` + inference need beyond the features and the returned logits (the sweep's
        memory check), for ``rows`` training rows and at most ``eval_rows`` rows (default ``rows``)
        classified in one call: a few C x D float32 matrices, and two float32 temporaries of one
        chunk of logits, the chunk being ``_ROW_CHUNK`` rows or the whole split when it is smaller,
        unless a method says more."""
        chunk = min(_ROW_CHUNK, max(rows, eval_rows or 0))
        return 4 * num_classes * dim * 4 + 8 * chunk * num_classes

    @classmethod
    def param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def trial_params(cls, params: dict, searched: set[str]) -> dict:
        """A tuned sweep's trial: ``params`` (every parameter), of which ``searched`` were drawn from
        the search space; a method whose parameters are linked adjusts the others here."""
        return params

    @classmethod
    def defaults(cls) -> dict:
        return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, X, y, *, class_counts=None, classifier=None, val=None, views=None) -> "LTClassifier":
        """Fit on training features ``X`` (N x D) and labels ``y``.

        ``class_counts`` (C,) training images per class (default: counted from ``y``);
        ``classifier`` the checkpoint's ``(W: C x D, b: C)``; ``val`` ``(X_val, y_val)`` for
        parameters set to ``"auto"``; ``views`` (K x N x D) the K views of every training sample,
        ``views[0]`` equal to X (used by the methods with ``uses_views``, ignored by the others)."""
        self._fit(self._fit_data(X, y, class_counts=class_counts, classifier=classifier, val=val, views=views))
        return self

    def _fit_data(self, X, y, *, class_counts=None, classifier=None, val=None, views=None) -> FitData:
        """Check the parameters and the inputs of :meth:`fit`, set ``classes_``, ``n_features_in_``
        and ``device_``, and return what ``_fit`` trains on."""
        check_params(self)
        device = resolve_device(getattr(self, "device", "auto"))
        if isinstance(X, torch.Tensor):
            X_t = as_features(X, device)
            if X_t.ndim != 2 or len(X_t) != len(y):
                raise InvalidInputError(f"{self.name}: X must be N x D with one label per row "
                                        f"(got {tuple(X_t.shape)} and {len(y)} labels)")
            self.n_features_in_ = int(X_t.shape[1])
            y = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
            if len(y) == 0:
                raise InvalidInputError(f"{self.name}: the training split is empty")
        else:
            X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
            check_classification_targets(y)
            X_t = as_features(X, device)
        index_mode = classifier is not None or class_counts is not None
        if classifier is None and self.needs_classifier:
            raise InvalidInputError(f"method {self.name!r} needs the checkpoint's classifier (W, b) "
                                    "(fit(..., classifier=(W, b)); this entry has none)")
        clf = None
        if classifier is not None:
            weight, bias = (as_tensor(t, device) for t in classifier)
            if weight.ndim != 2 or weight.shape[1] != X_t.shape[1] or bias.shape != (len(weight),):
                raise InvalidInputError(
                    f"{self.name}: classifier W must be C x {X_t.shape[1]} and b of length C "
                    f"(got W {tuple(weight.shape)}, b {tuple(bias.shape)}; features have {X_t.shape[1]} dims)")
            clf = (weight, bias)
        if index_mode:
            size = max(len(clf[0]) if clf else 0, len(class_counts) if class_counts is not None else 0)
            y_idx = _class_indices(y, size, self.name, "y")
            self.classes_ = np.arange(size)
        else:
            self.classes_, y_idx = np.unique(y, return_inverse=True)
        num_classes = len(self.classes_)
        counts = (np.bincount(y_idx, minlength=num_classes) if class_counts is None
                  else np.pad(np.asarray(class_counts, dtype=np.int64), (0, num_classes - len(class_counts))))
        val_t = None
        if val is not None:
            Xv = as_features(val[0], device)
            if Xv.ndim != 2 or Xv.shape[1] != X_t.shape[1]:
                raise InvalidInputError(f"{self.name}: val features must be N x {X_t.shape[1]} "
                                        f"(got {tuple(Xv.shape)})")
            yv = val[1].cpu().numpy() if isinstance(val[1], torch.Tensor) else np.asarray(val[1])
            yv = _class_indices(yv, num_classes, self.name, "val labels") if index_mode \
                else self._encode_known(yv, "val labels")
            val_t = (Xv, torch.from_numpy(yv).to(device))
        views_t = None
        if views is not None and self.uses_views:
            views_t = as_features(views, device)
            if views_t.ndim != 3 or views_t.shape[1:] != X_t.shape:
                raise InvalidInputError(f"{self.name}: views must be K x {len(X_t)} x {X_t.shape[1]} (the views of "
                                        f"the training samples, view 0 first; got {tuple(views_t.shape)})")
            views_t = views_t.reshape(-1, X_t.shape[1]) if len(views_t) > 1 else None
        self.device_ = device
        return FitData(X_t, torch.from_numpy(y_idx).to(device), counts, num_classes, clf, val_t, device, views_t)

    def _encode_known(self, labels: np.ndarray, what: str) -> np.ndarray:
        """Class indices of ``labels`` under ``classes_``; an unseen label is an error."""
        position = np.searchsorted(self.classes_, labels).clip(0, len(self.classes_) - 1)
        unknown = self.classes_[position] != labels
        if unknown.any():
            raise InvalidInputError(f"{self.name}: {what} hold {labels[unknown][0]!r}, a class absent from y")
        return position.astype(np.int64)

    def _fit(self, data: FitData) -> None:
        raise NotImplementedError

    # -- inference ------------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:
        """The logits (N x C); for two classes scikit-learn's margin ``logit_1 - logit_0`` (N,)."""
        logits = self.logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def logits(self, X) -> np.ndarray:
        """Logits, N x C (float32), columns in ``classes_`` order (whatever the number of classes)."""
        return self.device_logits(X).cpu().numpy()

    def device_logits(self, X) -> torch.Tensor:
        """:meth:`logits` as a float32 tensor on the estimator's device, not copied to the host (a
        sweep scores them there: featcache.metrics takes tensors)."""
        try:
            check_is_fitted(self, "device_")
        except sklearn_exceptions.NotFittedError as exc:
            raise NotFittedError(str(exc)) from None
        if isinstance(X, torch.Tensor):
            X_t = as_features(X, self.device_)
            if X_t.ndim != 2 or X_t.shape[1] != self.n_features_in_:
                raise InvalidInputError(f"{self.name}: expected N x {self.n_features_in_} features, "
                                        f"got {tuple(X_t.shape)}")
        else:
            X_t = as_features(validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES), self.device_)
        out = torch.empty((len(X_t), len(self.classes_)), dtype=torch.float32, device=self.device_)
        with torch.no_grad():
            self._fill_logits(X_t, out)
        return out

    def _fill_logits(self, X: torch.Tensor, out: torch.Tensor) -> None:
        """Write the logits of X (float32 or float16) into ``out``, upcasting a chunk of rows at a time."""
        chunk = _ROW_CHUNK if X.dtype == torch.float32 else _HALF_CHUNK
        for start in range(0, len(X), chunk):
            self._logits(X[start:start + chunk].float(), out[start:start + chunk])

    def predict(self, X) -> np.ndarray:
        best = self.logits(X).argmax(axis=1)
        return self.classes_[best]

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the logits (N x C, rows sum to 1)."""
        logits = self.logits(X).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        return logits / logits.sum(axis=1, keepdims=True)

    def _set_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Classify with W (C x D) and b: ``weight_`` / ``bias_`` for the user (numpy), and a
        contiguous W^T for inference (x @ W^T runs ~10% faster on CPU with W^T laid out D x C)."""
        self._weight, self._bias = weight, bias
        self._weight_t = weight.T.contiguous()
        self.weight_ = weight.cpu().numpy()
        self.bias_ = None if bias is None else bias.cpu().numpy()

    def _logits(self, X: torch.Tensor, out: torch.Tensor) -> None:
        """Write the logits of the rows ``X`` into ``out`` (rows x C, float32, on the device)."""
        raise NotImplementedError


def _class_indices(labels: np.ndarray, num_classes: int, method: str, what: str) -> np.ndarray:
    """``labels`` as int64 class indices in [0, num_classes) (num_classes 0: no upper bound)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"{method}: with classifier=(W, b) or class_counts, {what} must be class "
                                f"indices 0..C-1 (got {labels.dtype} labels)")
    labels = labels.astype(np.int64, copy=False)
    if len(labels) and labels.min() < 0:
        raise InvalidInputError(f"{method}: {what} hold the negative class index {int(labels.min())}")
    if len(labels) and num_classes and labels.max() >= num_classes:
        raise InvalidInputError(f"{method}: {what} hold class index {int(labels.max())}, but the classifier / "
                                f"class_counts cover {num_classes} classes")
    return labels


def balanced_top1(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean per-class accuracy over the classes present in ``y`` (used to pick hyper-parameters)."""
    correct = (logits.argmax(1) == y).double()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, correct)
    seen = torch.bincount(y, minlength=num_classes).double()
    present = seen > 0
    return float((hits[present] / seen[present]).mean())


TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))


def choose_on_val(data: FitData, method: str, param: str, candidates: Sequence[float],
                  score: Callable[[torch.Tensor, torch.Tensor], Sequence[float]]) -> tuple[float, dict[float, float]]:
    """The value of ``param="auto"``: the candidate with the best val score, ties to the smaller
    value, and the val curve ``{candidate: score}``. ``score(X_val, y_val)`` returns one score per
    candidate, in order (one call, so that a method can score the whole grid in one pass)."""
    if data.val is None:
        raise InvalidInputError(f"{method}: {param}='auto' needs a validation split (val=...; --val-split)")
    curve = dict(zip((float(c) for c in candidates), score(*data.val)))
    best = max(curve.values())
    return min(c for c, s in curve.items() if s == best), curve


def require_all_classes(data: FitData, method: str) -> None:
    empty = np.flatnonzero(data.counts == 0)
    if len(empty):
        raise InvalidInputError(f"{method}: class {int(empty[0])} has no training samples "
                             f"({len(empty)} such class(es)); {method} needs at least one per class")
