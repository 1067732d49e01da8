"""Loading pickled data without running code from it.

A pickle names Python callables (module.name) that the loader calls; a crafted file can name
``os.system``. These loaders allow exactly the names plain numeric data needs and refuse any
other, naming it and the flag that trusts the file."""
from __future__ import annotations

import _compat_pickle
import contextlib
import io
import pickle
import pickletools
import warnings
from pathlib import Path

import numpy as np

from .errors import FeatcacheError

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x and 2.x pickles
# numpy scalars are pickled as scalar(dtype, bytes); dtypes as dtype(code) plus their DType class
NUMPY_DTYPE_CLASSES = tuple({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUV"})
_SCALAR_NAMES = {(module, "scalar") for module in _NUMPY_CORE}
_ARRAY_NAMES = {(module, "_reconstruct") for module in _NUMPY_CORE} | {("numpy", "ndarray")}
_DTYPE_NAMES = {("numpy", "dtype")} | {(cls.__module__, cls.__name__) for cls in NUMPY_DTYPE_CLASSES}
_PLAIN_NAMES = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
                ("builtins", "complex"), ("collections", "OrderedDict"),
                ("_codecs", "encode")}  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
ALLOWED = _SCALAR_NAMES | _ARRAY_NAMES | _DTYPE_NAMES | _PLAIN_NAMES


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, scalars, dtypes and plain containers only."""

    def find_class(self, module, name):
        py3 = _compat_pickle.NAME_MAPPING.get((module, name))  # Python 2 names (protocol <= 2)
        py3 = py3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        if py3 in ALLOWED:
            return super().find_class(*py3)
        raise _Refused(f"{module}.{name}")


def load_restricted(path: Path, *, encoding: str = "ASCII", trust_flag: str | None = None):
    """Unpickle ``path`` through :class:`RestrictedUnpickler`; a refused name is a one-line error."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, encoding=encoding).load()
    except _Refused as refused:
        hint = (f"; pass {trust_flag} only if you trust the file" if trust_flag
                else "; only numpy arrays, scalars and plain containers are loaded")
        raise FeatcacheError(f"{path} references {refused.name}, which loading would run{hint}") from None


def torch_safe_globals(arrays: bool) -> list:
    """What ``torch.load(weights_only=True)`` may build besides tensors: numpy scalars and dtypes
    (classifier-balancing checkpoints store ``best_acc`` and the like as numpy scalars), and with
    ``arrays`` also numpy arrays (feature files)."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    names = [(scalar, f"{module}.scalar") for module in _NUMPY_CORE] + [np.dtype, *NUMPY_DTYPE_CLASSES]
    if arrays:
        reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        names += [(reconstruct, f"{module}._reconstruct") for module in _NUMPY_CORE] + [np.ndarray]
    return names


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 (non-zip) torch.save file


def is_legacy_torch_file(raw: bytes) -> bool:
    """Whether ``raw`` is the old (non-zip) ``torch.save`` format: a pickled magic number first."""
    if raw[:4] == b"PK\x03\x04":
        return False
    try:
        return RestrictedUnpickler(io.BytesIO(raw[:64]), encoding="ASCII").load() == LEGACY_MAGIC
    except Exception:
        return False


def _legacy_globals(raw: bytes) -> list[str]:
    """The callables the main pickle of an old-format torch file names (read, never called)."""
    names, strings = [], []
    stream = io.BytesIO(raw)
    with contextlib.suppress(Exception):
        for _ in range(4):  # magic number, protocol version, system info, then the object itself
            strings.clear()
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _quiet_torch_load():
    """torch's own warnings about a file (``Detected pickle protocol N``) are not the user's business:
    the outcome is loaded, or one error line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*weights_only", category=FutureWarning)
        yield


def torch_load(raw: bytes, path: Path, *, arrays: bool, trust: bool, trust_flag: str):
    """``torch.load`` of ``raw``: weights-only with :func:`torch_safe_globals`; full unpickling
    only when ``trust``. Anything else the file needs is refused naming ``trust_flag``, also for an
    old-format (non-zip) file the weights-only loader cannot read."""
    import torch
    if trust:
        with _quiet_torch_load():
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    try:
        with _quiet_torch_load(), torch.serialization.safe_globals(torch_safe_globals(arrays)):
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        allowed = {f"{m}.{n}" for m, n in ALLOWED}
        if is_legacy_torch_file(raw):
            needed = [n for n in _legacy_globals(raw)
                      if n not in allowed and not n.startswith(("torch.", "collections.OrderedDict"))]
            what = f"names {', '.join(needed[:3])}" if needed else "holds what the weights-only loader cannot read"
            raise FeatcacheError(f"{path} is an old-format (non-zip) PyTorch file that {what}; loading it means "
                                 f"full unpickling, which could run code: pass {trust_flag} only if you trust the "
                                 "file (or re-save it with a current torch.save)") from None
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
        except Exception:
            raise error from None  # not a PyTorch zip file at all: the caller says what it expected
        needed = [name for name in needed if name not in allowed] or ["objects beyond tensors"]
        raise FeatcacheError(f"{path} needs {', '.join(needed[:3])} to load, which could run code; pass "
                             f"{trust_flag} only if you trust the file") from None
