"""Declared hyper-parameter constraints, checked in one place.

Each estimator lists, next to its ``__init__``, the values every parameter accepts::

    _parameter_constraints = {"epochs": [Int(1)], "lr": [Real(0, closed="neither")],
                              "sampler": [Options(*SAMPLERS)], "tau": [Real(0), Options("auto")]}

:func:`check_params` raises one :class:`InvalidParameterError` naming the method, the parameter,
the value and what is allowed. (scikit-learn's own ``_param_validation`` is private API, so this is
a small public equivalent.)"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from featcache.errors import FeatcacheError


class InvalidParameterError(FeatcacheError, ValueError):
    """A hyper-parameter value outside its declared constraints."""


@dataclass(frozen=True)
class Real:
    """A finite real number (bools excluded) in [low, high]; ``closed``: both, left, right, neither."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return False
        low_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        if self.high is None:
            return f"a finite number {'>=' if left == '[' else '>'} {self.low}" if self.low is not None \
                else "a finite number"
        low = "-inf" if self.low is None else self.low
        return f"a number in {left}{low}, {self.high}{right}"


@dataclass(frozen=True)
class Int:
    """An integer (bools excluded) in [low, high]."""

    low: int | None = None
    high: int | None = None

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return "an integer" if self.low is None else f"an integer >= {self.low}"
        return f"an integer in [{self.low}, {self.high}]"


class Options:
    """One of a fixed set of values (compared with ==, bools never equal to 0 / 1)."""

    def __init__(self, *values):
        self.values = values

    def accepts(self, value) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


class Bool:
    def accepts(self, value) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class RealSequence:
    """A non-empty sequence of finite reals each accepted by ``item`` (e.g. a grid of taus)."""

    item: Real

    def accepts(self, value) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) > 0
                and all(self.item.accepts(v) for v in value))

    def describe(self) -> str:
        return f"a non-empty list, each {self.item.describe()}"


class Device:
    def accepts(self, value) -> bool:
        return isinstance(value, str) and (value in ("auto", "cpu", "cuda")
                                           or (value.startswith("cuda:") and value[5:].isdigit()))

    def describe(self) -> str:
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"


def check_params(estimator) -> None:
    """Check every declared parameter of ``estimator``; raise one error for the first bad one."""
    method = getattr(estimator, "name", type(estimator).__name__)
    for name, rules in type(estimator)._parameter_constraints.items():
        value = getattr(estimator, name)
        if any(rule.accepts(value) for rule in rules):
            continue
        allowed = " or ".join(rule.describe() for rule in rules)
        raise InvalidParameterError(f"{method}: parameter {name}={value!r} is invalid; expected {allowed}")

