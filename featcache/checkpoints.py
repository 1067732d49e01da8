"""Reading checkpoints in the formats users arrive with, remapped to one naming (torchvision's:
backbone keys as in torchvision's ResNet, classifier ``fc.weight`` / ``fc.bias``).

Formats: this project's own (``featcache train``; or any dict with ``arch`` and ``state_dict``),
a plain torchvision ``state_dict``, and the official classifier-balancing checkpoints
(``state_dict_best`` -> ``feat_model`` / ``classifier``, keys prefixed ``module.``). For timm /
open_clip models also ``.safetensors``, state dicts wrapped as ``{"model": ...}`` or prefixed
``model.``, and ``hf-hub:ORG/NAME`` read from the local Hugging Face cache (never downloaded).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import build_model, get_arch
from .errors import FeatcacheError
from .safe_pickle import torch_load

PREFIXES = ("module.", "_orig_mod.")
OWN_FORMAT = "featcache-checkpoint"
RANDOM_FORMAT = "random-init"
_RANDOM = re.compile(r"random(?::([0-9]+))?")


def strip_prefixes(state_dict: dict) -> dict:
    """Remove ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def strip_model_prefix(state_dict: dict) -> dict:
    """Remove a ``model.`` prefix that every key carries (timm / DeiT / MAE training wrappers)."""
    if state_dict and all(key.startswith("model.") for key in state_dict):
        return {key[len("model."):]: value for key, value in state_dict.items()}
    return state_dict


def remap_torchvision(payload: dict) -> dict:
    return strip_model_prefix(strip_prefixes(payload))


def remap_model_wrapped(payload: dict) -> dict:
    """``{"model": state_dict, "optimizer": ..., ...}`` as DeiT / MAE / DINOv2 training scripts save."""
    return strip_model_prefix(strip_prefixes(payload["model"]))


def remap_official(payload: dict) -> dict:
    """classifier-balancing: ``{state_dict_best: {feat_model: ..., classifier: ...}}``."""
    states = payload.get("state_dict_best") or payload["state_dict"]
    merged = strip_prefixes(states["feat_model"])
    classifier = strip_prefixes(states.get("classifier") or {})
    merged.update({k: v for k, v in classifier.items() if k in ("fc.weight", "fc.bias")})
    return merged


def remap_own(payload: dict) -> dict:
    return strip_prefixes(payload["state_dict"])


def detect_format(payload) -> str:
    if not isinstance(payload, dict):
        raise TypeError
    if payload.get("format") == OWN_FORMAT or ("arch" in payload and "state_dict" in payload):
        return "featcache"
    if "state_dict_best" in payload or isinstance(payload.get("state_dict"), dict) and "feat_model" in payload["state_dict"]:
        return "classifier-balancing"
    if isinstance(payload.get("state_dict"), dict):
        return "state_dict-wrapped"
    if isinstance(payload.get("model"), dict) and all(isinstance(v, torch.Tensor) for v in payload["model"].values()):
        return "model-wrapped"
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return "torchvision"
    raise TypeError


REMAPS = {"featcache": remap_own, "classifier-balancing": remap_official,
          "state_dict-wrapped": lambda p: remap_torchvision(p["state_dict"]), "model-wrapped": remap_model_wrapped,
          "torchvision": remap_torchvision}

HF_HUB_PREFIX = "hf-hub:"
# The weight files a hub repository holds, by library (timm's repos of CLIP models hold both).
HF_WEIGHT_FILES = {"timm": ("model.safetensors", "pytorch_model.bin"),
                   "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")}


_HF_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _hf_snapshot_file(repo: str, revision: str, filename: str) -> Path:
    """Where the Hugging Face cache keeps ``filename`` of ``repo`` at ``revision`` (a branch or tag
    through ``refs/``, else a commit), whether or not it is there."""
    from huggingface_hub import constants

    repo_cache = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    ref = repo_cache / "refs" / revision
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if ref.is_file():
            revision = ref.read_text().strip()
    return repo_cache / "snapshots" / revision / filename


def resolve_hf_hub(reference: str, library: str = "timm") -> Path:
    """The weights file of ``hf-hub:ORG/NAME[@REVISION]`` in the local Hugging Face cache
    (``library``'s files first; REVISION a branch, tag or commit, default ``main``); never downloads."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, at, revision = reference[len(HF_HUB_PREFIX):].partition("@")
    revision = revision if at else "main"
    parts = repo.split("/")
    if len(parts) != 2 or not all(_HF_REPO_PART.fullmatch(p) for p in parts) or ".." in repo:
        raise FeatcacheError(f"--ckpt {reference}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    if (not revision.strip() or ".." in revision.split("/") or revision.startswith("/")
            or any(c.isspace() for c in revision)):
        raise FeatcacheError(f"--ckpt {reference}: {revision!r} is not a revision (a branch, tag or commit)")
    filenames = HF_WEIGHT_FILES[library] + tuple(f for files in HF_WEIGHT_FILES.values() for f in files
                                                 if f not in HF_WEIGHT_FILES[library])
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo, filename, revision=revision)
        except (ValueError, OSError) as exc:  # huggingface_hub's validation errors are ValueErrors
            raise FeatcacheError(f"--ckpt {reference}: {' '.join(str(exc).split())}") from None
        if isinstance(found, str):
            return Path(found)
        cached = _hf_snapshot_file(repo, revision, filename)
        if cached.is_symlink() and not cached.exists():
            raise FeatcacheError(f"--ckpt {reference}: the cached weights file {cached} is a broken link (its blob "
                                 f"{os.readlink(cached)} is missing); fetch {repo} again and copy the whole cache")
    at = f" at revision {revision!r}" if revision != "main" else ""
    raise FeatcacheError(f"--ckpt {reference}: not in the local Hugging Face cache {constants.HF_HUB_CACHE}{at} "
                         f"(looked for {', '.join(filenames)}); featcache never downloads: fetch it "
                         f"where there is internet (`hf download {repo}`) and copy the cache, or set HF_HUB_CACHE")


def load_safetensors_checkpoint(path: Path) -> Checkpoint:
    """A ``.safetensors`` file: tensors only, nothing to unpickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FeatcacheError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    try:
        state_dict = load(raw)
    except (SafetensorError, ValueError, RuntimeError):
        raise FeatcacheError(f"{path} is not a safetensors file") from None
    return Checkpoint(path, hashlib.sha256(raw).hexdigest(), "safetensors",
                      strip_model_prefix(strip_prefixes(state_dict)))


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    format: str
    state_dict: dict
    arch: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def classifier(self) -> tuple[np.ndarray, np.ndarray] | None:
        if "fc.weight" not in self.state_dict:
            return None
        weight = self.state_dict["fc.weight"].detach().float().cpu().numpy()
        bias = self.state_dict.get("fc.bias")
        bias = np.zeros(len(weight), np.float32) if bias is None else bias.detach().float().cpu().numpy()
        return weight, bias

    @property
    def num_classes(self) -> int | None:
        weight = self.state_dict.get("fc.weight")
        return None if weight is None else int(weight.shape[0])

    @property
    def in_channels(self) -> int:
        first_conv = next((v for v in self.state_dict.values() if v.ndim == 4), None)
        return 3 if first_conv is None else int(first_conv.shape[1])


def library_versions() -> dict[str, str | None]:
    """The versions of the libraries that build (and randomly initialise) models, read from the
    installed distributions without importing them; None for one that is absent."""
    versions = {}
    for package in ("torch", "torchvision", "timm", "open_clip_torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def random_init(reference: str | Path) -> Checkpoint | None:
    """``random`` / ``random:SEED``: no file, the architecture's own random initialisation drawn with
    SEED (default 0). Its hash is of the seed and the versions of the libraries that draw the weights;
    it has no classifier. None for any other reference."""
    match = _RANDOM.fullmatch(str(reference))
    if match is None:
        return None
    seed = int(match.group(1) or 0)
    described = json.dumps({"random_init_seed": seed, **library_versions()}, sort_keys=True)
    return Checkpoint(Path(str(reference)), hashlib.sha256(described.encode()).hexdigest(), RANDOM_FORMAT, {},
                      meta={"seed": seed})


@contextlib.contextmanager
def initialising(checkpoint: Checkpoint):
    """Build a model inside this block: a random-init checkpoint's seed draws its weights (the
    caller's random state is restored after)."""
    if checkpoint.format != RANDOM_FORMAT:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(checkpoint.meta["seed"])
        yield


def load_checkpoint(path: str | Path, *, trust_checkpoint: bool = False) -> Checkpoint:
    """Read a checkpoint weights-only (numpy scalars and dtypes allowed); ``trust_checkpoint``
    allows full unpickling, which can run code from the file. ``random`` / ``random:SEED`` is
    :func:`random_init` (a file of that name: ``./random``)."""
    random = random_init(path)
    if random is not None:
        return random
    if str(path).startswith(HF_HUB_PREFIX):
        path = resolve_hf_hub(str(path))
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return load_safetensors_checkpoint(path)
    if not path.exists():
        raise FeatcacheError(f"checkpoint {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FeatcacheError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    try:
        payload = torch_load(raw, path, arrays=False, trust=trust_checkpoint, trust_flag="--trust-checkpoint")
    except FeatcacheError:
        raise
    except Exception:
        raise FeatcacheError(f"{path} is not a PyTorch checkpoint") from None
    try:
        fmt = detect_format(payload)
        state_dict = REMAPS[fmt](payload)
    except (TypeError, KeyError, AttributeError):
        raise FeatcacheError(f"{path} is a PyTorch file but not a checkpoint this tool knows "
                             f"(own, a state dict: plain, {{\"state_dict\": ...}} or {{\"model\": ...}}; or classifier-balancing)") from None
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "scheduler")} \
        if fmt == "featcache" else {}
    return Checkpoint(path, hashlib.sha256(raw).hexdigest(), fmt, state_dict,
                      payload.get("arch") if fmt == "featcache" else None, meta)


def load_model(checkpoint: Checkpoint, arch: str, num_classes: int | None = None) -> torch.nn.Module:
    """Build ``arch`` and load the checkpoint's weights, naming missing / unexpected keys."""
    get_arch(arch)
    classes = checkpoint.num_classes or num_classes or 1
    model = build_model(arch, classes, checkpoint.in_channels)
    expected = model.state_dict()
    if checkpoint.num_classes is None:
        expected = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    given = {k: v for k, v in checkpoint.state_dict.items() if not k.endswith("num_batches_tracked")}
    wanted = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(wanted - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        raise FeatcacheError(f"checkpoint {checkpoint.path} does not fit --arch {arch}: " + "; ".join(parts))
    for key in wanted:
        if tuple(given[key].shape) != tuple(expected[key].shape):
            raise FeatcacheError(f"checkpoint {checkpoint.path} does not fit --arch {arch}: {key} has shape "
                                 f"{tuple(given[key].shape)}, the arch expects {tuple(expected[key].shape)}")
    model.load_state_dict(given, strict=False)
    return model.eval()
